//! What several commands do alike: find the configuration a client of the
//! daemon works with, word a file error, start the health server.

use crate::config::{self, Config, Layers, Loaded, Override, Source};
use crate::engine::Shared;
use crate::exit::{self, Failure};
use crate::http::{self, HttpServer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The configuration and state directory a client of the daemon (submit,
/// cancel) works with: the daemon's, or the one named with --state-dir.
pub fn client_config(
    config: &Option<PathBuf>,
    state_dir: &Option<PathBuf>,
) -> Result<(Loaded, PathBuf), Failure> {
    let (file, file_required) = config::paths::config_file(config.as_deref());
    let env = config::process_env();
    let flags = state_dir
        .iter()
        .map(|d| Override {
            source: Source::Flag("--state-dir".into()),
            key: "paths.state_dir".into(),
            raw: d.display().to_string(),
        })
        .collect();
    let loaded = config::load(&Layers {
        file,
        file_required,
        env: env.clone(),
        flags,
    })?;
    let dir = config::paths::daemon_state_dir(&loaded, &env);
    Ok((loaded, dir))
}

pub fn io(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::new(
        exit::CANT_CREATE,
        format!("cannot {what} {}: {e}", path.display()),
    )
}

/// Starts the health/metrics server when enabled (run and daemon); a port in
/// use is a clear start-up error (exit 73), never a daemon without health.
pub fn start_http(
    cfg: &Config,
    shared: &Arc<Shared>,
    port_file_in: Option<&Path>,
) -> Result<Option<HttpServer>, Failure> {
    let m = &cfg.monitoring;
    if !m.health_check_enabled {
        log::info!("health port off (monitoring.health_check_enabled = false)");
        return Ok(None);
    }
    let server = http::start(
        &m.health_check_bind,
        m.health_check_port,
        &m.health_check_allow,
        shared.clone(),
    )
    .map_err(|e| Failure::new(exit::CANT_CREATE, e.to_string()))?;
    log::info!(
        "serving /health, /health/detailed, /metrics and /tasks on http://{}",
        server.addr
    );
    if !server.addr.ip().is_loopback() && m.health_check_allow.is_empty() {
        log::warn!(
            "the health port {} is reachable beyond this machine and monitoring.health_check_allow is empty: \
             /health, /health/detailed and /metrics answer anyone who reaches it, /tasks (tails of agents' output) \
             answers loopback only; name who may ask in health_check_allow",
            server.addr
        );
    }
    if let Some(dir) = port_file_in {
        server.write_port_file(dir);
    }
    Ok(Some(server))
}

/// Sets up the containment of every attempt (the state lock must be held),
/// says which is in force and why, and publishes it for /health/detailed.
pub fn contain(
    cfg: &Config,
    state_dir: &Path,
    shared: &Shared,
) -> Result<Arc<crate::agent::Containment>, Failure> {
    let l = &cfg.limits;
    let c = crate::agent::Containment::establish(
        l.containment,
        l.max_memory_mb,
        l.max_processes,
        state_dir,
    )
    .map_err(|e| Failure::new(exit::UNAVAILABLE, e))?;
    log::info!("containment: {}", c.describe());
    let unenforced = c.unenforced();
    for u in &unenforced {
        log::warn!("containment: {u}");
    }
    if let Ok(mut g) = shared.containment.lock() {
        *g = Some((c.mode().to_string(), c.why.clone(), unenforced));
    }
    Ok(Arc::new(c))
}

/// The state directory a reader of records looks in (`status`, `logs`):
/// --state-dir, else the configuration's, else ./.ralph-qchat as `run`
/// uses; an error when it does not exist.
pub fn reader_state_dir(
    config: &Option<PathBuf>,
    state_dir: &Option<PathBuf>,
) -> Result<PathBuf, Failure> {
    let dir = match state_dir {
        Some(d) => d.clone(),
        None => {
            let (file, required) = config::paths::config_file(config.as_deref());
            let env = config::process_env();
            let loaded = config::load(&Layers {
                file,
                file_required: required,
                env: env.clone(),
                flags: vec![],
            })?;
            config::paths::client_state_dir(&loaded, &env, true)
        }
    };
    if !dir.is_dir() {
        return Err(Failure::new(
            crate::exit::NO_INPUT,
            format!(
                "no state directory at {} (name one with --state-dir)",
                dir.display()
            ),
        ));
    }
    Ok(dir)
}

/// Removes the temporaries that processes killed while writing left
/// (`store::atomic::abandoned_temporary`) in the state directory and those
/// of the tasks `ids`, in a thread of the lowest priority: nothing waits for
/// these files to go. Called with the state lock held.
pub fn sweep_abandoned(store: crate::store::TaskStore, ids: Vec<String>) {
    let _ = std::thread::Builder::new()
        .name("sweep".into())
        .spawn(move || {
            // SAFETY: gettid and setpriority of this thread only.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, 19);
            }
            let n = store.sweep_abandoned(&ids);
            if n > 0 {
                log::info!(
                    "removed {n} temporary file(s) (.NAME.tmpPID) that processes killed while writing had left in {}",
                    store.state_dir().display()
                );
            }
        });
}

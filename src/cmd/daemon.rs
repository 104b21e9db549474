//! `ralph-qchat daemon`: the service. Lock the state directory (or wait for
//! it in standby), recover every task, start the workers and the spool
//! intake, tell systemd we are ready, and serve until SIGTERM.

use crate::cli::RunArgs;
use crate::config::{self, Config, Layers, paths};
use crate::engine::intake::{self, Intake};
use crate::engine::notify::Notifier;
use crate::engine::{Mode, Scheduler, Shared, signals};
use crate::exit::{self, Failure};
use crate::store::{LockError, StateLock, TaskStore};
use signal_hook::consts::{SIGINT, SIGTERM};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub fn daemon(args: RunArgs, standby: bool) -> Result<i32, Failure> {
    // First, so that a SIGTERM during start-up stops us cleanly.
    let mut caught = signals::catch()
        .map_err(|e| Failure::new(exit::CANT_CREATE, format!("cannot handle signals: {e}")))?;
    let (file, file_required) = paths::config_file(args.config.as_deref());
    let layers = Layers {
        file,
        file_required,
        env: config::process_env(),
        flags: args.overrides.clone(),
    };
    let loaded = config::load(&layers)?;
    let mut cfg = loaded.config.clone();
    let cwd = std::env::current_dir().unwrap_or_default();
    cfg.adapter.anchor_command(&cwd);
    crate::logging::init(&cfg.logging).map_err(|e| Failure::new(exit::CANT_CREATE, e))?;
    for w in &loaded.warnings {
        log::warn!("{w}");
    }
    let state_dir = paths::daemon_state_dir(&loaded, &layers.env);
    cfg.paths.state_dir = state_dir.display().to_string();
    std::fs::create_dir_all(&state_dir).map_err(|e| {
        Failure::new(
            exit::CANT_CREATE,
            format!("cannot create state directory {}: {e}", state_dir.display()),
        )
    })?;
    let poll = crate::sys::time::seconds(cfg.performance.poll_interval);
    let shared = Shared::new(
        cfg.adapter.name.as_str(),
        &cfg.adapter.effective_command(),
        state_dir.clone(),
    );
    shared.standby.store(standby, Ordering::SeqCst);
    shared.set_check_every(crate::sys::time::seconds(
        cfg.monitoring.health_check_interval,
    ));
    // A standby instance answers /health while it waits; a normal one opens
    // the port only once it owns the state directory.
    let mut http = None;
    if standby {
        http = super::setup::start_http(&cfg, &shared, None)?;
    }
    let Some(_lock) = lock(&state_dir, standby, poll, &mut caught)? else {
        log::info!("stopped while in standby");
        if let Some(h) = http {
            h.stop();
        }
        return Ok(exit::OK);
    };

    let store = TaskStore::new(&state_dir);
    let contain = super::setup::contain(&cfg, &state_dir, &shared)?;
    let mut scheduler = Scheduler::new(
        cfg.clone(),
        store.clone(),
        Mode::Daemon,
        Notifier::from_env(),
        shared.clone(),
        contain.clone(),
    )
    .map_err(|e| Failure::new(exit::CANT_CREATE, format!("cannot start workers: {e}")))?;
    let mut active = Vec::new();
    let problems = store.for_each(|t| {
        if !t.status.is_finished() {
            active.push(t.id.clone());
        }
        scheduler.adopt(t)
    });
    scheduler.adopted();
    for p in &problems {
        log::error!("{p}; that task is left as it is on disk and not run");
    }
    // The port opens only once what it shows is true: the workers are up, the
    // counters an earlier run left are restored (a /metrics at 0 before them
    // reads as a counter reset), the tasks on disk are taken over, and that
    // snapshot is published.
    scheduler.publish_now();
    if http.is_none() {
        http = super::setup::start_http(&cfg, &shared, None)?;
    }
    if let Some(h) = &http {
        h.write_port_file(&state_dir);
    }
    let stop = intake::Stop::new();
    let intake = Intake {
        state_dir: state_dir.clone(),
        max_prompt: scheduler.max_prompt.clone(),
        rejected: scheduler.rejected.clone(),
        poll,
        events: scheduler.sender(),
        stop: stop.clone(),
    }
    .spawn()
    .map_err(|e| {
        Failure::new(
            exit::CANT_CREATE,
            format!("cannot start the spool intake: {e}"),
        )
    })?;
    shared.standby.store(false, Ordering::SeqCst);
    let status = scheduler.status_line();
    log::info!(
        "ralph-qchat {} serving {} with {} workers, agent {}; {status}",
        env!("CARGO_PKG_VERSION"),
        state_dir.display(),
        scheduler.workers(),
        cfg.adapter.effective_command()
    );
    Notifier::from_env().ready(&status);
    // After the port opens: beside the start it held up the adoption.
    super::setup::sweep_abandoned(store.clone(), active);

    let reload: signals::Reload = Box::new(move || reload_config(&layers));
    let finished = signals::serve(scheduler, None, Some(reload), caught);
    contain.close();
    let finished = finished
        .map_err(|e| Failure::new(exit::CANT_CREATE, format!("cannot run the scheduler: {e}")))?;
    stop.stop();
    let _ = intake.join();
    if let Some(h) = http {
        h.remove_port_file(&state_dir);
        h.stop();
    }
    log::info!(
        "stopped ({} tasks on disk, every interrupted iteration runs again on the next start)",
        finished.tasks.len()
    );
    Ok(exit::OK)
}

/// Takes the state-directory lock; in standby, waits for it. None when a
/// signal stopped the wait.
fn lock(
    state_dir: &Path,
    standby: bool,
    poll: Duration,
    caught: &mut signal_hook::iterator::Signals,
) -> Result<Option<StateLock>, Failure> {
    let mut said = false;
    loop {
        match StateLock::acquire(state_dir) {
            Ok(l) => {
                if said {
                    log::info!("standby over: took over {}", state_dir.display());
                }
                return Ok(Some(l));
            }
            Err(LockError::Held { pid, .. }) if standby => {
                if !said {
                    log::info!(
                        "standby: {} is in use by pid {}; taking over when it lets go",
                        state_dir.display(),
                        pid.map_or("?".into(), |p| p.to_string())
                    );
                    said = true;
                }
                if caught.pending().any(|s| s == SIGTERM || s == SIGINT) {
                    return Ok(None);
                }
                std::thread::sleep(poll);
            }
            Err(e @ LockError::Held { .. }) => {
                return Err(Failure::new(
                    exit::TEMPFAIL,
                    format!(
                        "{e}; stop it first, or start this one with --standby to take over when it stops"
                    ),
                ));
            }
            Err(e) => return Err(Failure::new(exit::CANT_CREATE, e.to_string())),
        }
    }
}

fn reload_config(layers: &Layers) -> Option<Config> {
    let env = config::process_env();
    let layers = Layers {
        env,
        ..layers.clone()
    };
    match config::load(&layers) {
        Ok(loaded) => {
            if let Err(e) = crate::logging::init(&loaded.config.logging) {
                log::error!("reload refused: {e}; keeping the running configuration");
                return None;
            }
            log::info!("SIGHUP: configuration read again");
            let mut cfg = loaded.config.clone();
            cfg.adapter
                .anchor_command(&std::env::current_dir().unwrap_or_default());
            cfg.paths.state_dir = paths::daemon_state_dir(&loaded, &layers.env)
                .display()
                .to_string();
            Some(cfg)
        }
        Err(e) => {
            log::error!("reload refused: {e}; keeping the running configuration");
            None
        }
    }
}

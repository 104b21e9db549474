//! `submit` and `cancel`: clients that talk to the daemon through files in
//! its state directory, so they work whether or not it is running and Unix
//! permissions decide who may use them.

use crate::config::{self, Layers, Loaded, Override, Source};
use crate::daemon::intake::cancel_dir;
use crate::exit::{self, Failure};
use crate::store::spool::{self, Spec};
use crate::task::valid_id;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Default)]
pub struct SubmitArgs {
    pub prompt: PathBuf,
    pub workdir: Option<PathBuf>,
    pub id: Option<String>,
    pub max_iterations: Option<u64>,
    pub max_runtime: Option<f64>,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct CancelArgs {
    pub id: String,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

fn load(
    config: &Option<PathBuf>,
    state_dir: &Option<PathBuf>,
) -> Result<(Loaded, PathBuf), Failure> {
    let (file, file_required) = crate::paths::config_file(config.as_deref());
    let env = crate::run::env_pairs();
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
    let dir = crate::paths::daemon_state_dir(&loaded, &env);
    Ok((loaded, dir))
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Failure {
    Failure::new(
        exit::CANT_CREATE,
        format!("cannot {what} {}: {e}", path.display()),
    )
}

/// Files written as root into a service's state directory must stay usable
/// by the service user: give them the state directory's owner.
fn match_owner(state_dir: &Path, paths: &[&Path]) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Ok(meta) = std::fs::metadata(state_dir) else {
        return;
    };
    for p in paths {
        let _ = std::os::unix::fs::chown(p, Some(meta.uid()), Some(meta.gid()));
    }
}

fn new_id(prompt: &Path) -> String {
    let stem = crate::task::id_from_file_name(
        &prompt
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let stamp: String = crate::timefmt::now_rfc3339()
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let salt = (nanos ^ (std::process::id() << 16)) & 0xffff;
    format!("{stem}-{stamp}-{salt:04x}")
}

fn task_known(state_dir: &Path, id: &str) -> bool {
    state_dir.join("tasks").join(id).exists()
        || spool::spool_dir(state_dir)
            .join(format!("{id}.toml"))
            .exists()
        || spool::spool_dir(state_dir)
            .join(format!("{id}.md"))
            .exists()
}

pub fn submit(a: SubmitArgs) -> Result<i32, Failure> {
    let (loaded, state_dir) = load(&a.config, &a.state_dir)?;
    let max_prompt = loaded.config.limits.max_prompt_size;
    let prompt = std::path::absolute(&a.prompt)
        .map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", a.prompt.display())))?;
    let meta = std::fs::metadata(&prompt).map_err(|e| {
        Failure::new(
            crate::run::NO_INPUT,
            format!("prompt file {}: {e}", prompt.display()),
        )
    })?;
    if !meta.is_file() {
        return Err(Failure::new(
            crate::run::NO_INPUT,
            format!("prompt file {} is not a regular file", prompt.display()),
        ));
    }
    if meta.len() > max_prompt {
        return Err(Failure::new(
            exit::PROMPT_REFUSED,
            format!(
                "prompt file {} is {} bytes, over limits.max_prompt_size ({max_prompt})",
                prompt.display(),
                meta.len()
            ),
        ));
    }
    let id = match &a.id {
        Some(id) if valid_id(id) => id.clone(),
        Some(id) => {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "{id:?} is not a valid task id (letters, digits, - _ . only; not starting with .)"
                ),
            ));
        }
        None => new_id(&prompt),
    };
    std::fs::create_dir_all(&state_dir).map_err(|e| io("create state directory", &state_dir, e))?;
    if task_known(&state_dir, &id) {
        return Err(Failure::new(
            exit::USAGE,
            format!(
                "a task with id {id:?} already exists in {}",
                state_dir.display()
            ),
        ));
    }
    let mut spec = Spec {
        id: Some(id.clone()),
        max_iterations: a.max_iterations,
        max_runtime: a.max_runtime,
        ..Spec::default()
    };
    let mut owned: Vec<PathBuf> = Vec::new();
    match &a.workdir {
        Some(w) => {
            let w = w
                .canonicalize()
                .map_err(|e| Failure::new(exit::USAGE, format!("workdir {}: {e}", w.display())))?;
            if !w.is_dir() {
                return Err(Failure::new(
                    exit::USAGE,
                    format!("workdir {} is not a directory", w.display()),
                ));
            }
            spec.workdir = Some(w.display().to_string());
            spec.prompt_file = prompt.display().to_string();
        }
        None => {
            let ws = spool::workspace_dir(&state_dir, &id);
            std::fs::create_dir_all(ws.parent().unwrap_or(&state_dir))
                .map_err(|e| io("create", &ws, e))?;
            std::fs::create_dir(&ws).map_err(|e| io("create workspace", &ws, e))?;
            let dest = ws.join("PROMPT.md");
            std::fs::copy(&prompt, &dest).map_err(|e| io("copy the prompt to", &dest, e))?;
            spec.workdir = Some(ws.display().to_string());
            spec.prompt_file = dest.display().to_string();
            owned.push(ws);
            owned.push(dest);
        }
    }
    let text =
        toml::to_string(&spec).map_err(|e| Failure::new(exit::TASK_FAILED, e.to_string()))?;
    let spool_dir = spool::spool_dir(&state_dir);
    let entry = spool::publish(&spool_dir, &format!("{id}.toml"), text.as_bytes())
        .map_err(|e| io("write to the spool", &spool_dir, e))?;
    owned.push(entry);
    owned.push(spool_dir);
    let refs: Vec<&Path> = owned.iter().map(PathBuf::as_path).collect();
    match_owner(&state_dir, &refs);
    println!("{id}");
    Ok(exit::OK)
}

pub fn cancel(a: CancelArgs) -> Result<i32, Failure> {
    if !valid_id(&a.id) {
        return Err(Failure::new(
            exit::USAGE,
            format!("{:?} is not a valid task id", a.id),
        ));
    }
    let (_, state_dir) = load(&a.config, &a.state_dir)?;
    if !task_known(&state_dir, &a.id) {
        return Err(Failure::new(
            crate::run::NO_INPUT,
            format!("no task {:?} in {}", a.id, state_dir.display()),
        ));
    }
    let dir = cancel_dir(&state_dir);
    match spool::publish(&dir, &a.id, b"") {
        Ok(p) => match_owner(&state_dir, &[&p, &dir]),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("write a cancel request to", &dir, e)),
    }
    println!(
        "cancel requested for task {}; the daemon stops it within poll_interval + kill_grace",
        a.id
    );
    Ok(exit::OK)
}

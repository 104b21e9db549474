//! `ralph-qchat submit PROMPT_FILE`: queues a task by writing a spool entry
//! (and, without --workdir, a fresh workspace) into the state directory, so it
//! works whether or not the daemon runs and Unix permissions decide who may.

use crate::cli::SubmitArgs;
use crate::exit::{self, Failure};
use crate::store::spool::{self, Spec};
use crate::task::valid_id;
use std::path::{Path, PathBuf};

pub fn submit(a: SubmitArgs) -> Result<i32, Failure> {
    let (loaded, state_dir) = super::setup::client_config(&a.config, &a.state_dir)?;
    let max_prompt = loaded.config.limits.max_prompt_size;
    let prompt = std::path::absolute(&a.prompt)
        .map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", a.prompt.display())))?;
    let meta = std::fs::metadata(&prompt).map_err(|e| {
        Failure::new(
            exit::NO_INPUT,
            format!("prompt file {}: {e}", prompt.display()),
        )
    })?;
    if !meta.is_file() {
        return Err(Failure::new(
            exit::NO_INPUT,
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
        None => spool::new_id(&prompt),
    };
    std::fs::create_dir_all(&state_dir)
        .map_err(|e| super::setup::io("create state directory", &state_dir, e))?;
    if spool::task_known(&state_dir, &id) {
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
            if ws.exists() {
                return Err(Failure::new(
                    exit::USAGE,
                    format!(
                        "workspace {} already exists; choose another --id",
                        ws.display()
                    ),
                ));
            }
            let bytes = crate::sys::regular::read(&prompt, max_prompt)
                .map_err(|e| super::setup::io("read", &prompt, e))?;
            // Synced before the spec that names it is published: after a
            // power loss the daemon never finds a spec and an empty prompt.
            let dest = spool::write_workspace_prompt(&ws, &bytes)
                .map_err(|e| super::setup::io("copy the prompt to", &ws, e))?;
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
        .map_err(|e| super::setup::io("write to the spool", &spool_dir, e))?;
    owned.push(entry);
    owned.push(spool_dir);
    let refs: Vec<&Path> = owned.iter().map(PathBuf::as_path).collect();
    spool::match_owner(&state_dir, &refs);
    println!("{id}");
    Ok(exit::OK)
}

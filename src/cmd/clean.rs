//! `ralph-qchat clean`: removes finished tasks' records and transcripts
//! (`<state_dir>/tasks/<id>/`), as pueue's clean does, with or without a
//! daemon on the state directory. A daemon writes a finished task's record
//! at most once more within moments of its end, and again only while its
//! on_task_end hook is due: such tasks are left for a later clean.

use crate::cli::CleanArgs;
use crate::exit::{self, Failure};
use crate::store::TaskStore;
use std::path::Path;

/// A task that ended less than this long ago may still be written once.
const JUST_ENDED: i64 = 2;

pub fn clean(a: CleanArgs) -> Result<i32, Failure> {
    let (_, state_dir) = super::setup::client_config(&a.config, &a.state_dir)?;
    let store = TaskStore::new(&state_dir);
    leftovers(&store.tasks_dir());
    let now = crate::engine::account::unix_now();
    let mut chosen = Vec::new();
    let (mut hooks, mut just) = (0, 0);
    let problems = store.for_each(|t| {
        if !t.status.is_finished() || !(a.statuses.is_empty() || a.statuses.contains(&t.status)) {
            return;
        }
        if matches!(t.hook.as_deref(), Some("pending" | "running")) {
            hooks += 1;
            return;
        }
        let ended = t
            .finished_at
            .as_deref()
            .and_then(crate::sys::time::parse_rfc3339)
            .or_else(|| modified(&store.task_dir(&t.id).join("state.json")))
            .unwrap_or(now);
        let age = now - ended;
        if a.older_than.is_some_and(|min| (age as f64) < min) {
            return;
        }
        if age < JUST_ENDED {
            just += 1;
            return;
        }
        chosen.push((t.id, t.status));
    });
    for p in &problems {
        eprintln!("ralph-qchat: {p}; left as it is");
    }
    chosen.sort_by(|x, y| x.0.cmp(&y.0));
    let mut failed = Vec::new();
    for (id, status) in &chosen {
        if a.dry_run {
            println!("would remove {id} ({})", status.as_str());
            continue;
        }
        match remove(&store, id) {
            Ok(()) => println!("removed {id} ({})", status.as_str()),
            Err(e) => failed.push(format!("{}: {e}", store.task_dir(id).display())),
        }
    }
    let done = chosen.len() - failed.len();
    let verb = if a.dry_run { "would remove" } else { "removed" };
    println!(
        "{verb} {done} finished task(s) from {}{}{}",
        store.tasks_dir().display(),
        if hooks > 0 {
            format!("; {hooks} left whose on_task_end hook is still due")
        } else {
            String::new()
        },
        if just > 0 {
            format!("; {just} left that ended moments ago (the daemon may still write them)")
        } else {
            String::new()
        }
    );
    if !failed.is_empty() {
        return Err(Failure::new(
            exit::CANT_CREATE,
            format!(
                "cannot remove {} task(s): {}",
                failed.len(),
                failed.join("; ")
            ),
        ));
    }
    Ok(exit::OK)
}

fn modified(p: &Path) -> Option<i64> {
    let t = std::fs::metadata(p).and_then(|m| m.modified()).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs() as i64)
}

/// The record disappears whole (a rename out of the ids' names), then what
/// it held is removed.
fn remove(store: &TaskStore, id: &str) -> std::io::Result<()> {
    let tasks = store.tasks_dir();
    let gone = tasks.join(format!(".removing-{id}-{}", std::process::id()));
    std::fs::rename(store.task_dir(id), &gone)?;
    crate::store::atomic::sync_dir(&tasks)?;
    std::fs::remove_dir_all(&gone)
}

/// What an interrupted clean left behind.
fn leftovers(tasks: &Path) {
    let Ok(rd) = std::fs::read_dir(tasks) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(".removing-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

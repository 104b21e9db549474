//! `ralph-qchat status`: the task records of a state directory, read from
//! disk so it works whether or not anything is running.

use crate::cli::StatusArgs;
use crate::exit::{self, Failure};
use crate::store::{StateLock, TaskStore};
use std::fmt::Write;

pub fn status(args: StatusArgs) -> Result<i32, Failure> {
    let state_dir = super::setup::reader_state_dir(&args.config, &args.state_dir)?;
    let store = TaskStore::new(&state_dir);
    let (mut tasks, problems) = store.load_all();
    for p in &problems {
        eprintln!("ralph-qchat: warning: {p}");
    }
    if let Some(id) = &args.id {
        tasks.retain(|t| &t.id == id);
        if tasks.is_empty() {
            return Err(Failure::new(
                exit::NO_INPUT,
                format!("no task {id:?} in {}", state_dir.display()),
            ));
        }
    }
    if args.json {
        let json = if args.id.is_some() {
            serde_json::to_string_pretty(&tasks[0])
        } else {
            serde_json::to_string_pretty(&tasks)
        };
        println!(
            "{}",
            json.map_err(|e| Failure::new(exit::TASK_FAILED, e.to_string()))?
        );
        return Ok(exit::OK);
    }
    let holder = StateLock::holder(&state_dir);
    let mut out = String::new();
    match holder {
        Some(pid) if pid > 0 => {
            let _ = writeln!(
                out,
                "{}: in use by ralph-qchat pid {pid}",
                state_dir.display()
            );
        }
        Some(_) => {
            let _ = writeln!(out, "{}: in use", state_dir.display());
        }
        None => {
            let _ = writeln!(out, "{}: no ralph-qchat running on it", state_dir.display());
        }
    }
    // As wide as the longest id (generated ones are long), so columns line up.
    let w = tasks
        .iter()
        .map(|t| t.id.chars().count())
        .max()
        .unwrap_or(0)
        .max(24);
    let _ = writeln!(
        out,
        "{:<w$} {:<14} {:>6} {:>6} {:>6} {:>7}  {:<13} {:<16} {:<14} {:<24} LAST ERROR",
        "ID",
        "STATUS",
        "ITER",
        "OK",
        "FAILED",
        "RETRIES",
        "LAST OUTCOME",
        "SPENT",
        "CPU/PEAK MEM",
        "UPDATED"
    );
    for t in &tasks {
        let mut status = t.status.as_str().to_string();
        if holder.is_none() && t.status == crate::task::Status::Running {
            status = "interrupted".into();
        }
        let _ = writeln!(
            out,
            "{:<w$} {:<14} {:>6} {:>6} {:>6} {:>7}  {:<13} {:<16} {:<14} {:<24} {}",
            t.id,
            status,
            t.iteration,
            t.successful_iterations,
            t.failed_iterations,
            t.retries,
            t.last_class.as_deref().unwrap_or("-"),
            spent(t),
            used(t),
            t.updated_at,
            t.last_error.as_deref().unwrap_or("-")
        );
    }
    if tasks.is_empty() {
        let _ = writeln!(out, "(no tasks)");
    }
    for t in tasks.iter().filter(|t| !t.status.is_finished()) {
        if let Some(h) = &t.waits_for {
            let _ = writeln!(
                out,
                "task {} waits for task {h}: its workdir {} is, lies in or contains that task's, \
                 and two agents never work in one tree at once",
                t.id, t.workdir
            );
        }
    }
    let (pauses, warning) = crate::store::pauses::load(&state_dir);
    if let Some(w) = warning {
        let _ = writeln!(out, "warning: {w}");
    }
    let now = crate::engine::account::unix_now();
    for (profile, p) in pauses {
        let what = match p.kind {
            crate::store::pauses::PauseKind::Auth => "not logged in".to_string(),
            crate::store::pauses::PauseKind::Quota if p.until.is_some_and(|u| u > now) => {
                format!("out of quota for {} s more", p.until.unwrap_or(now) - now)
            }
            crate::store::pauses::PauseKind::Quota => continue,
        };
        let _ = writeln!(
            out,
            "agent profile {profile} paused, {what}: {}; {}",
            p.message, p.remedy
        );
    }
    print!("{out}");
    Ok(exit::OK)
}

/// What a task's attempts used of the machine: `12.3s 245M` (CPU seconds
/// summed, the largest peak memory of one attempt).
fn used(t: &crate::task::TaskState) -> String {
    if t.cpu_seconds == 0.0 && t.peak_memory_bytes.is_none() {
        return "-".into();
    }
    let mem = t
        .peak_memory_bytes
        .map_or("-".into(), |m| format!("{}M", m.div_ceil(1024 * 1024)));
    format!("{:.1}s {mem}", t.cpu_seconds)
}

/// What a task's agent reported spending, shortly: `$0.0123`, `1.25 cr`,
/// `12345 tok`, the ones it reports.
fn spent(t: &crate::task::TaskState) -> String {
    let mut parts = vec![];
    if t.cost_usd > 0.0 {
        parts.push(format!("${:.4}", t.cost_usd));
    }
    if t.credits > 0.0 {
        parts.push(format!("{:.2} cr", t.credits));
    }
    if t.tokens > 0 {
        parts.push(format!("{} tok", t.tokens));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

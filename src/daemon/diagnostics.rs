//! The SIGUSR1 dump: every worker, every task and its child, the queue, the
//! circuit and rate limit, totals, and the process's own memory, descriptors
//! and threads; as text for the log and JSON for the file.

use super::circuit::Circuit;
use super::ratelimit::Bucket;
use super::stats::Stats;
use crate::agent::Progress;
use crate::task::TaskState;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub struct TaskView<'a> {
    pub state: &'a TaskState,
    pub phase: String,
    pub running_for: Option<Duration>,
    pub retries_now: u32,
    pub progress: &'a Progress,
}

pub struct WorkerView {
    pub index: usize,
    pub job: Option<String>,
}

pub struct View<'a> {
    pub workers_target: usize,
    pub workers: Vec<WorkerView>,
    pub in_flight: usize,
    pub ready: usize,
    pub stats: &'a Stats,
    pub circuit: &'a Circuit,
    pub bucket: &'a Bucket,
    pub cache_entries: Option<usize>,
    pub tasks: Vec<TaskView<'a>>,
}

struct ProcessView {
    rss_kib: Option<u64>,
    open_fds: Option<usize>,
    threads: Option<u64>,
}

fn process() -> ProcessView {
    ProcessView {
        rss_kib: proc_status("VmRSS:"),
        open_fds: open_fds(),
        threads: proc_status("Threads:"),
    }
}

fn by_status(v: &View) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for t in &v.tasks {
        *m.entry(t.state.status.as_str()).or_insert(0) += 1;
    }
    m
}

pub fn render(v: &View) -> String {
    let p = process();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "ralph-qchat {} pid {} at {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        crate::timefmt::now_rfc3339()
    );
    let _ = writeln!(
        s,
        "process: rss {} KiB, open fds {}, threads {}",
        p.rss_kib.unwrap_or(0),
        p.open_fds.map_or("?".into(), |n| n.to_string()),
        p.threads.map_or("?".into(), |n| n.to_string())
    );
    let _ = writeln!(
        s,
        "workers: {} total, {} busy; ready queue {}; tasks by status {:?}",
        v.workers_target,
        v.in_flight,
        v.ready,
        by_status(v)
    );
    for w in &v.workers {
        let _ = writeln!(
            s,
            "worker {}: {}",
            w.index,
            w.job.as_deref().unwrap_or("idle")
        );
    }
    let _ = writeln!(
        s,
        "circuit {}{}; rate limit {}/min ({:.1} tokens, {} waits); cache {}",
        v.circuit.label(),
        v.circuit
            .reason
            .as_ref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default(),
        v.bucket.per_minute(),
        v.bucket.tokens(),
        v.bucket.limited_total,
        v.cache_entries
            .map_or("off".into(), |n| format!("{n} entries"))
    );
    let _ = writeln!(s, "{}", v.stats.summary());
    for t in &v.tasks {
        let st = t.state;
        let _ = write!(
            s,
            "task {}: {} ({}), iteration {}, retries in this iteration {}, consecutive failures {}",
            st.id,
            st.status.as_str(),
            t.phase,
            st.iteration,
            t.retries_now,
            st.consecutive_failures
        );
        if let Some(d) = t.running_for {
            let _ = write!(
                s,
                ", child pid {}, running {:.1} s, {} bytes read",
                t.progress.pid.load(Ordering::Relaxed),
                d.as_secs_f64(),
                t.progress.bytes_read.load(Ordering::Relaxed)
            );
        }
        if let Some(e) = &st.last_error {
            let _ = write!(s, ", last error: {e}");
        }
        s.push('\n');
    }
    s
}

pub fn to_json(v: &View) -> String {
    let p = process();
    let tasks: Vec<serde_json::Value> = v
        .tasks
        .iter()
        .map(|t| {
            json!({
                "id": t.state.id,
                "status": t.state.status.as_str(),
                "phase": t.phase,
                "iteration": t.state.iteration,
                "retries_in_iteration": t.retries_now,
                "consecutive_failures": t.state.consecutive_failures,
                "child_pid": t.running_for.map(|_| t.progress.pid.load(Ordering::Relaxed)),
                "running_seconds": t.running_for.map(|d| d.as_secs_f64()),
                "bytes_read": t.running_for.map(|_| t.progress.bytes_read.load(Ordering::Relaxed)),
                "last_error": t.state.last_error,
            })
        })
        .collect();
    let workers: Vec<serde_json::Value> = v
        .workers
        .iter()
        .map(|w| json!({"index": w.index, "busy": w.job.is_some(), "job": w.job}))
        .collect();
    let doc = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "time": crate::timefmt::now_rfc3339(),
        "process": {"rss_kib": p.rss_kib, "open_fds": p.open_fds, "threads": p.threads},
        "workers": {"total": v.workers_target, "busy": v.in_flight, "each": workers},
        "queue_depth": v.ready,
        "tasks_by_status": by_status(v),
        "pending_retries": v.tasks.iter().filter(|t| t.retries_now > 0 && t.running_for.is_none()).count(),
        "circuit": {"state": v.circuit.label(), "reason": v.circuit.reason, "opened_total": v.circuit.opened_total},
        "rate_limit": {"per_minute": v.bucket.per_minute(), "tokens": v.bucket.tokens(), "waits": v.bucket.limited_total},
        "cache_entries": v.cache_entries,
        "totals": {
            "requests": v.stats.requests,
            "iterations": v.stats.iterations,
            "successes": v.stats.successes,
            "failures": v.stats.failures,
            "retries": v.stats.retries,
        },
        "tasks": tasks,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// A number in KiB (or a count) from /proc/self/status.
pub fn proc_status(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

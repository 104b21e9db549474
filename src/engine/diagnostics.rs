//! The SIGUSR1 dump: every worker, every task and its child, the queue, the
//! circuit and rate limit, totals, and the process's own memory, descriptors
//! and threads; as text for the log and JSON for the file.

use super::account::{Account, unix_now};
use super::circuit::Circuit;
use super::ratelimit::Bucket;
use super::stats::Stats;
use crate::agent::Progress;
use crate::sys::proc;
use crate::task::TaskState;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Dumps closer together than this are merged into one.
const DUMP_EVERY: Duration = Duration::from_secs(1);
const KEEP_DUMPS: usize = 20;

/// When the next dump may be made: a burst of SIGUSR1 gives one dump now
/// and at most one more a second later.
#[derive(Default)]
pub struct Throttle {
    last: Option<Instant>,
    due: Option<Instant>,
}

impl Throttle {
    /// A dump was asked for: true when it is to be made now; otherwise one
    /// is due at the end of the quiet second.
    pub fn asked(&mut self, now: Instant) -> bool {
        match self.last {
            Some(t) if now < t + DUMP_EVERY => {
                self.due.get_or_insert(t + DUMP_EVERY);
                false
            }
            _ => true,
        }
    }

    /// When a merged dump is due.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// True (once) when the merged dump is due now.
    pub fn take_due(&mut self, now: Instant) -> bool {
        if self.due.is_some_and(|t| t <= now) {
            self.due = None;
            return true;
        }
        false
    }

    pub fn made(&mut self, now: Instant) {
        self.last = Some(now);
    }
}

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
    pub account: &'a Account,
    pub cache_entries: Option<usize>,
    /// The containment in force and why.
    pub containment: String,
    pub tasks: Vec<TaskView<'a>>,
}

struct ProcessView {
    rss_kib: Option<u64>,
    open_fds: Option<usize>,
    threads: Option<u64>,
}

fn process() -> ProcessView {
    ProcessView {
        rss_kib: proc::status_field("VmRSS:"),
        open_fds: proc::open_fds().map(|n| n as usize),
        threads: proc::status_field("Threads:"),
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
        crate::sys::time::now_rfc3339()
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
    let _ = writeln!(s, "account: {}", account_line(v.account));
    let _ = writeln!(
        s,
        "containment: {}; {} adopted process(es) reaped",
        v.containment,
        crate::sys::reaper::reaped()
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
        "time": crate::sys::time::now_rfc3339(),
        "process": {"rss_kib": p.rss_kib, "open_fds": p.open_fds, "threads": p.threads},
        "workers": {"total": v.workers_target, "busy": v.in_flight, "each": workers},
        "queue_depth": v.ready,
        "tasks_by_status": by_status(v),
        "pending_retries": v.tasks.iter().filter(|t| t.retries_now > 0 && t.running_for.is_none()).count(),
        "circuit": {"state": v.circuit.label(), "reason": v.circuit.reason, "opened_total": v.circuit.opened_total},
        "rate_limit": {"per_minute": v.bucket.per_minute(), "tokens": v.bucket.tokens(), "waits": v.bucket.limited_total},
        "cache_entries": v.cache_entries,
        "account": {
            "profile": v.account.profile,
            "state": account_line(v.account),
            "throttled_in_row": v.account.throttles_in_row,
            "pauses": v.account.pauses,
        },
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

/// Logs the dump line by line and writes its JSON to
/// `<state_dir>/diagnostics/`, keeping the newest KEEP_DUMPS.
pub fn write(v: &View, state_dir: &Path) {
    let text = render(v);
    let json = to_json(v);
    for line in text.lines() {
        log::info!("diagnostics: {line}");
    }
    let dir = state_dir.join("diagnostics");
    let name = format!("{}.json", crate::sys::time::now_rfc3339().replace(':', ""));
    let path = dir.join(&name);
    let written = std::fs::create_dir_all(&dir)
        .and_then(|_| crate::store::write_atomic(&path, json.as_bytes()));
    match written {
        Ok(()) => log::info!("diagnostics written to {}", path.display()),
        Err(e) => log::warn!("cannot write diagnostics to {}: {e}", path.display()),
    }
    prune_dir(&dir, KEEP_DUMPS);
}

/// Keeps the newest `keep` files of a directory (names sort by time).
fn prune_dir(dir: &Path, keep: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    if names.len() <= keep {
        return;
    }
    names.sort();
    for p in &names[..names.len() - keep] {
        let _ = std::fs::remove_file(p);
    }
}

/// The account gate in one phrase: open, throttled, paused (why), checking.
fn account_line(a: &Account) -> String {
    let now = std::time::Instant::now();
    match a.closed(now, unix_now()) {
        None => format!("profile {}: open", a.profile),
        Some("paused") => match a.paused(unix_now()) {
            Some(p) => format!(
                "profile {} paused ({:?}): {}; {}",
                a.profile, p.kind, p.message, p.remedy
            ),
            None => format!("profile {} paused", a.profile),
        },
        Some(why) => format!(
            "profile {}: {why}{}",
            a.profile,
            a.opens_at(now, unix_now())
                .map(|t| format!(
                    " for {:.1} s",
                    t.saturating_duration_since(now).as_secs_f64()
                ))
                .unwrap_or_default()
        ),
    }
}

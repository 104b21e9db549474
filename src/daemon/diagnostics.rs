//! The SIGUSR1 dump: what every task and child is doing, plus the process's
//! own memory and file descriptors, as plain text.

use super::stats::Stats;
use crate::agent::Progress;
use crate::task::TaskState;
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

pub struct View<'a> {
    pub workers: usize,
    pub in_flight: usize,
    pub ready: usize,
    pub stats: &'a Stats,
    pub tasks: Vec<TaskView<'a>>,
}

pub fn render(v: View) -> String {
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
        proc_status("VmRSS:").unwrap_or(0),
        open_fds().map_or("?".into(), |n| n.to_string()),
        proc_status("Threads:").map_or("?".into(), |n| n.to_string())
    );
    let _ = writeln!(
        s,
        "workers: {} total, {} busy; ready queue {}",
        v.workers, v.in_flight, v.ready
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

/// A number in KiB (or a count) from /proc/self/status.
pub fn proc_status(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

pub fn open_fds() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

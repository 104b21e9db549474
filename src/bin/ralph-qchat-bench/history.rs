//! A long history: the same work (200 one-iteration tasks, 5 agents at a
//! time) on a state directory holding 10,000 finished tasks against one
//! holding 100, measured in the same run. Finished tasks leave the
//! scheduler's hot set, so the daemon's CPU per task and its memory should
//! not grow with the history.

use crate::harness::{self, Temp};
use std::path::Path;
use std::time::{Duration, Instant};

const CFG: &str = "[orchestrator]\niteration_delay = 0.0\ncheckpoint_interval = 0\nshutdown_grace = 0.0\n[adapter]\nkill_grace = 0.5\n";
const WORK: usize = 200;

/// `n` finished records, as a daemon leaves them.
fn records(state: &Path, n: usize) {
    let at = ralph_qchat::sys::time::now_rfc3339();
    for i in 0..n {
        let id = format!("old-{i:05}");
        let dir = state.join("tasks").join(&id);
        let _ = std::fs::create_dir_all(dir.join("iterations"));
        let rec = serde_json::json!({
            "id": id, "status": "completed", "iteration": 3, "successful_iterations": 3,
            "failed_iterations": 0, "consecutive_failures": 0, "retries": 0,
            "interrupted_iterations": 0, "started_at": at, "updated_at": at,
            "finished_at": at, "last_error": null, "reason": "completion_marker",
            "prompt_file": "/nowhere/PROMPT.md", "workdir": "/nowhere",
        });
        let _ = std::fs::write(dir.join("state.json"), rec.to_string());
    }
}

struct Run {
    cpu_per_task_ms: f64,
    rss_kib: u64,
    start_s: f64,
}

fn run(bin: &Path, history: usize) -> Run {
    let t = Temp::new("history");
    let state = t.0.join("state");
    records(&state, history);
    let agent = harness::agent(&t.0, "agent.sh", "exit 0");
    let started = Instant::now();
    let d = harness::daemon(bin, &t.0, CFG, &agent, 5);
    let start_s = started.elapsed().as_secs_f64();
    let cpu0 = harness::cpu_seconds(d.pid());
    let ids = harness::tasks(&state, WORK, 1);
    harness::wait(Duration::from_secs(120), || d.all_finished(&ids));
    let cpu = harness::cpu_seconds(d.pid()) - cpu0;
    let rss_kib = harness::status_kib(d.pid(), "VmRSS:");
    d.stop();
    Run {
        cpu_per_task_ms: cpu * 1000.0 / WORK as f64,
        rss_kib,
        start_s,
    }
}

pub fn history(bin: &Path, _quick: bool) -> String {
    let small = run(bin, 100);
    let large = run(bin, 10_000);
    format!(
        "## A long history\n\n\
         {WORK} one-iteration tasks, 5 agents at a time, on a state directory that already holds \
         finished tasks. Target: CPU per task and RSS with 10,000 within 10% of those with 100.\n\n\
         | finished tasks on disk | daemon CPU per task ms | RSS at the end KiB | start until serving s |\n\
         |---|---|---|---|\n\
         | 100 (floor) | {:.2} | {} | {:.2} |\n\
         | 10,000 | {:.2} | {} | {:.2} |\n\
         | ratio 10,000 / 100 | {:.2} | {:.2} | {:.2} |",
        small.cpu_per_task_ms,
        small.rss_kib,
        small.start_s,
        large.cpu_per_task_ms,
        large.rss_kib,
        large.start_s,
        large.cpu_per_task_ms / small.cpu_per_task_ms.max(1e-9),
        large.rss_kib as f64 / (small.rss_kib as f64).max(1.0),
        large.start_s / small.start_s.max(1e-9),
    )
}

//! One attempt as the scheduler and a worker see it: the request (what to
//! run), the outcome (how it ended), and the handles to cancel it and to
//! watch it from another thread.

use super::classify::{Class, Rules};
use super::profile::{OutputMode, Report};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Everything one agent run needs; built by the scheduler, run by a worker.
#[derive(Debug, Clone)]
pub struct AgentRequest {
    pub task_id: String,
    pub iteration: u64,
    pub attempt: u32,
    pub program: OsString,
    /// Arguments, the instruction last.
    pub args: Vec<OsString>,
    /// The command line for logs and transcripts, the instruction elided.
    pub shown: String,
    pub env: Vec<(OsString, OsString)>,
    pub workdir: PathBuf,
    pub timeout: Duration,
    /// The deadline is the task's remaining max_runtime, not the request timeout.
    pub timeout_is_runtime: bool,
    pub idle_timeout: Option<Duration>,
    pub kill_grace: Duration,
    pub poll_interval: Duration,
    pub buffer_size: usize,
    pub max_output: u64,
    pub max_memory_mb: u64,
    pub output_marker: Option<Vec<u8>>,
    /// The instruction's lines (trimmed, non-empty): their echo in the
    /// output never counts as the marker.
    pub echo: Arc<Vec<String>>,
    /// The profile's and the operator's outcome rules.
    pub rules: Arc<Rules>,
    pub output_mode: OutputMode,
    /// What the profile's CLI reports of its cost (read from its output).
    pub reports: &'static [Report],
    /// Fingerprint the working tree around the attempt (stall detection).
    pub watch: Option<super::worktree::WatchSpec>,
    pub transcript: Option<PathBuf>,
    /// Transcripts kept per task (0: none recycled): iteration N's new file
    /// takes the emptied inode of iteration N − keep's.
    pub keep_transcripts: usize,
    /// Echo the agent's output to our stderr as it arrives (verbose).
    pub stream: bool,
    pub cancel: Arc<Cancel>,
    pub progress: Arc<Progress>,
}

/// What an attempt cost, as far as the CLI reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Kiro's `▸ Credits:` figures, summed over the attempt's turns.
    pub credits: f64,
    /// Claude's `total_cost_usd`.
    pub cost_usd: f64,
    /// Tokens in and out (Claude's usage, Codex's `tokens used`).
    pub tokens: u64,
}

impl Usage {
    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

/// How an agent run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    IdleTimedOut,
    /// Stopped because the task's max_runtime ran out.
    RuntimeExceeded,
    Cancelled,
    ShutDown,
    /// The command is missing or not executable: retrying will not help.
    Unavailable(String),
    /// Spawning failed for another reason (EMFILE, EAGAIN …): worth a retry.
    SpawnFailed(String),
    /// A line matched a rule that ends the attempt at once (device login).
    RuleStopped,
}

impl Ending {
    pub fn is_success(&self) -> bool {
        matches!(self, Ending::Exited(0))
    }

    pub fn describe(&self) -> String {
        match self {
            Ending::Exited(c) => format!("exit status {c}"),
            Ending::Signaled(s) => format!("killed by signal {s}"),
            Ending::TimedOut => "timed out (adapter.timeout)".into(),
            Ending::IdleTimedOut => "no output for adapter.idle_timeout seconds".into(),
            Ending::RuntimeExceeded => "stopped at orchestrator.max_runtime".into(),
            Ending::Cancelled => "cancelled".into(),
            Ending::ShutDown => "stopped by shutdown".into(),
            Ending::Unavailable(m) | Ending::SpawnFailed(m) => m.clone(),
            Ending::RuleStopped => "stopped: its output matched an outcome rule".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentOutcome {
    pub ending: Ending,
    pub duration: Duration,
    pub bytes_read: u64,
    pub bytes_dropped: u64,
    pub marker_seen: bool,
    /// The last lines of stderr (or stdout if stderr was silent), ANSI
    /// stripped, for messages.
    pub tail: Vec<u8>,
    /// What the attempt means (rules over exit status).
    pub class: Class,
    /// The output line that decided the class, when a rule did.
    pub decided_by: Option<String>,
    /// How long the output asked to wait (a throttle or quota reset), read
    /// from the last lines of both streams.
    pub wait: Option<Duration>,
    /// The unix time `wait` counts from (a quota's reset is a date: the
    /// pause must end at it, not a moment later).
    pub wait_from: i64,
    pub usage: Usage,
    /// CPU, memory and processes of the whole attempt.
    pub resources: super::contain::Resources,
    /// The working tree's fingerprint before the attempt (when asked for a
    /// baseline) and after a successful one.
    pub tree_before: Option<u64>,
    pub tree_after: Option<u64>,
    /// The last lines of stdout then stderr, ANSI stripped.
    pub lines: Vec<String>,
}

impl AgentOutcome {
    pub fn truncated(&self) -> bool {
        self.bytes_dropped > 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CancelReason {
    Cancel = 1,
    Shutdown = 2,
}

/// Asks a running request to stop, from another thread, promptly: the flag is
/// read by the worker's loop and the waker interrupts its poll.
#[derive(Default, Debug)]
pub struct Cancel {
    reason: AtomicU8,
    waker: Mutex<Option<Arc<mio::Waker>>>,
}

impl Cancel {
    pub fn request(&self, reason: CancelReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        if let Ok(w) = self.waker.lock()
            && let Some(w) = w.as_ref()
        {
            let _ = w.wake();
        }
    }

    pub fn reason(&self) -> Option<CancelReason> {
        match self.reason.load(Ordering::SeqCst) {
            1 => Some(CancelReason::Cancel),
            2 => Some(CancelReason::Shutdown),
            _ => None,
        }
    }

    /// Called by the worker before it starts; a request made earlier is seen
    /// by the worker's first look at `reason`.
    pub(crate) fn attach(&self, waker: Arc<mio::Waker>) {
        if let Ok(mut w) = self.waker.lock() {
            *w = Some(waker);
        }
    }
}

/// What a running request is doing, for diagnostics dumps; one atomic store per
/// read on the hot path.
#[derive(Default, Debug)]
pub struct Progress {
    pub pid: AtomicU32,
    pub bytes_read: AtomicU64,
}

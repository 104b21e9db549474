//! Every message that crosses threads, in one place: what the signal thread,
//! the spool intake and the writer tell the scheduler (Control, Event), what
//! the scheduler gives workers and gets back (Job, JobResult), and what it
//! publishes for readers on other threads (Snapshot, Shared). Every thread's
//! code imports this module; none of them owns it.

use crate::agent::checkpoint::{CheckpointJob, Done};
use crate::agent::{AgentOutcome, AgentRequest};
use crate::config::Config;
use crate::store::pauses::Pause;
use crate::store::writer::Written;
use crate::task::TaskState;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Messages from the signal thread, the spool intake and clients.
#[derive(Debug)]
pub enum Control {
    /// Stop dispatching; give running requests `grace`, then stop them.
    /// `grace` None: the configured orchestrator.shutdown_grace (as reloaded).
    Shutdown {
        grace: Option<Duration>,
        signal: i32,
    },
    Dump,
    /// A new task from the spool; `entry` is removed once the task is on disk.
    Submit {
        state: Box<TaskState>,
        entry: PathBuf,
    },
    /// `ralph-qchat cancel`; `request` is removed once handled.
    Cancel {
        id: String,
        request: PathBuf,
    },
    /// A validated configuration (SIGHUP).
    Reload(Box<Config>),
}

/// Everything the scheduler waits for, on one channel.
pub enum Event {
    Control(Control),
    /// The writer finished a batch of task records.
    Written(Written),
    /// A worker finished job `seq` of `task`.
    Done {
        task: String,
        seq: u64,
        result: JobResult,
    },
}

/// Reading the prompt file is a worker's job, never the scheduler's: a file
/// on a hung file system, or a large one, must not stall every task.
pub struct PromptCheck {
    pub path: std::path::PathBuf,
    pub max: u64,
    pub marker: String,
}

pub enum Job {
    /// An agent attempt; then, when asked, whether the prompt file now
    /// carries the completion marker.
    Agent(Box<AgentRequest>, Option<PromptCheck>),
    /// Reads the prompt file for the next attempt.
    ReadPrompt(PromptCheck),
    /// A command run under the same supervision, for the engine (a hook).
    Command(Box<AgentRequest>),
    Checkpoint(CheckpointJob),
    /// The worker that takes this exits (the pool shrank on reload).
    Retire,
}

/// A job for whichever worker is free, tagged so its result finds its task.
pub struct JobMsg {
    pub task: String,
    pub seq: u64,
    pub job: Job,
}

pub enum JobResult {
    /// The outcome, whether the prompt file was complete after it, and the
    /// prompt file as read then (None: it could not be read).
    Agent(Box<AgentOutcome>, bool, Option<Vec<u8>>),
    Prompt(std::io::Result<Vec<u8>>),
    Command(Box<AgentOutcome>),
    Checkpoint(Done),
}

/// The view of the engine that readers on other threads get: replaced whole
/// when anything in it changed, never locked for longer than a clone.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Unfinished tasks and the last `past::RECENT` finished, by id.
    pub tasks: Vec<Arc<TaskState>>,
    /// Finished tasks not in `tasks`, by status.
    pub older: Vec<(&'static str, u64)>,
    pub workers_total: usize,
    pub workers_busy: usize,
    pub queue_depth: usize,
    pub circuit: &'static str,
    pub circuit_reason: Option<String>,
    pub rate_per_minute: u32,
    pub rate_tokens: f64,
    /// Profiles paused for quota or login, with what to do.
    pub pauses: Vec<(String, Pause)>,
}

/// (when, agent command usable, state directory writable).
pub type Checks = (Instant, bool, Result<(), String>);

/// What the engine publishes beside the snapshot: atomics and small values
/// readers load without waiting for the scheduler, and the readers' cache of
/// their own file-system checks, which the engine clears when the agent
/// command changes.
pub struct Shared {
    pub started: Instant,
    /// Milliseconds after `started` of the scheduler's last loop.
    pub tick_ms: AtomicU64,
    /// The longest the scheduler sleeps between loops.
    pub tick_every: Duration,
    pub stopping: AtomicBool,
    pub standby: AtomicBool,
    /// Why task state cannot be written, while it cannot.
    pub save_error: Mutex<Option<String>>,
    pub snapshot: Mutex<Arc<Snapshot>>,
    pub adapter: String,
    pub command: Mutex<String>,
    pub state_dir: PathBuf,
    /// How long /health reuses its file-system checks (health_check_interval).
    pub check_every: Mutex<Duration>,
    pub checks: Mutex<Option<Checks>>,
    /// The containment in force: mode, why, limits not enforced.
    pub containment: Mutex<Option<(String, String, Vec<String>)>>,
}

impl Shared {
    pub fn new(adapter: &str, command: &str, state_dir: PathBuf) -> Arc<Shared> {
        Arc::new(Shared {
            started: Instant::now(),
            tick_ms: AtomicU64::new(0),
            tick_every: Duration::from_secs(1),
            stopping: AtomicBool::new(false),
            standby: AtomicBool::new(false),
            save_error: Mutex::new(None),
            snapshot: Mutex::new(Arc::new(Snapshot::default())),
            adapter: adapter.to_string(),
            command: Mutex::new(command.to_string()),
            state_dir,
            check_every: Mutex::new(Duration::from_secs(30)),
            checks: Mutex::new(None),
            containment: Mutex::new(None),
        })
    }

    pub fn set_command(&self, c: &str) {
        if let Ok(mut g) = self.command.lock() {
            *g = c.to_string();
        }
        if let Ok(mut g) = self.checks.lock() {
            *g = None;
        }
    }

    pub fn command(&self) -> String {
        self.command.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set_check_every(&self, d: Duration) {
        if let Ok(mut g) = self.check_every.lock() {
            *g = d;
        }
    }

    pub fn tick(&self) {
        self.tick_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn publish(&self, s: Snapshot) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = Arc::new(s);
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set_save_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.save_error.lock() {
            *g = e;
        }
    }
}

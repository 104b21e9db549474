//! A task's persisted record and the pure rules of the Ralph loop: values in,
//! values out, no I/O (the clock is read only to stamp a new record).

pub mod completion;
pub mod rules;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Running,
    Completed,
    Failed,
    LimitReached,
    Cancelled,
    /// Successful iterations went round changing nothing.
    Stalled,
}

impl Status {
    pub const ALL: [Status; 7] = [
        Status::Queued,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::LimitReached,
        Status::Cancelled,
        Status::Stalled,
    ];

    pub fn is_finished(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::LimitReached => "limit_reached",
            Status::Cancelled => "cancelled",
            Status::Stalled => "stalled",
        }
    }
}

/// What `<state_dir>/tasks/<id>/state.json` holds. Only the scheduler writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    pub id: String,
    pub status: Status,
    /// Iterations started, the one in progress included.
    pub iteration: u64,
    pub successful_iterations: u64,
    pub failed_iterations: u64,
    pub consecutive_failures: u32,
    pub retries: u64,
    pub interrupted_iterations: u64,
    pub started_at: Option<String>,
    pub updated_at: String,
    pub finished_at: Option<String>,
    pub last_error: Option<String>,
    /// Why the task ended (completion_marker, output_marker, max_iterations, …).
    pub reason: Option<String>,
    pub prompt_file: String,
    pub workdir: String,
    /// The iteration that was running when this record was written; set on
    /// disk means it was interrupted if the process is gone.
    #[serde(default)]
    pub in_progress: Option<u64>,
    /// Seconds spent running, summed over every process that ran the task.
    #[serde(default)]
    pub runtime_secs: f64,
    #[serde(default)]
    pub last_checkpoint: u64,
    /// Per-task limits overriding the configuration (from a task spec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_runtime: Option<f64>,
    #[serde(default)]
    pub submitted_at: Option<String>,
    /// The spool entry the task came from, and which file of that name it
    /// was (`spool::entry_key`): a later file of the same name is another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_key: Option<String>,
    /// The class of the last agent attempt (success, throttled, auth, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_class: Option<String>,
    /// Attempts the API throttled (run again, not counted as failures).
    #[serde(default)]
    pub throttled: u64,
    /// What the agent reported spending, summed over every attempt.
    #[serde(default)]
    pub credits: f64,
    #[serde(default)]
    pub cost_usd: f64,
    #[serde(default)]
    pub tokens: u64,
    /// The on_task_end hook: pending (the task ended), running, done,
    /// failed: …, interrupted. Written before the hook starts, so it never
    /// runs twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<String>,
    /// The working tree after the last successful iteration (hex), and how
    /// many successful iterations in a row left it as it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree_fingerprint: Option<String>,
    #[serde(default)]
    pub stalled_iterations: u32,
    /// A failed verification, for the next instruction, and the iteration
    /// it failed at (the marker is not checked again before the agent ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_failed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_failed_at: Option<u64>,
    /// CPU seconds of every agent attempt's whole process tree, summed.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// The highest peak memory of one attempt, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// What the last agent attempt used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<AttemptUse>,
    /// The current iteration did not get to run (agent missing, out of
    /// quota, not logged in, throttled): the next start, in this process or
    /// the next, runs it under the same number.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rerun_iteration: bool,
    /// The task whose working directory this one's is, lies in or contains:
    /// this one starts when that one has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waits_for: Option<String>,
}

/// What one attempt used of the machine (containment's accounting).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AttemptUse {
    pub cpu_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// Most processes alive at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<u64>,
    #[serde(default)]
    pub oom_kills: u64,
    /// Processes still running when the command had exited, killed.
    #[serde(default)]
    pub left_running: u64,
}

impl TaskState {
    pub fn add_used(&mut self, r: &crate::agent::Resources) {
        self.cpu_seconds += r.cpu_seconds;
        if let Some(m) = r.peak_memory {
            self.peak_memory_bytes = Some(self.peak_memory_bytes.unwrap_or(0).max(m));
        }
        self.last_attempt = Some(AttemptUse {
            cpu_seconds: r.cpu_seconds,
            peak_memory_bytes: r.peak_memory,
            processes: r.processes,
            oom_kills: r.oom_kills,
            left_running: r.killed,
        });
    }

    /// What the task has spent so far.
    pub fn spent(&self) -> crate::agent::Usage {
        crate::agent::Usage {
            credits: self.credits,
            cost_usd: self.cost_usd,
            tokens: self.tokens,
        }
    }

    pub fn add_spent(&mut self, u: &crate::agent::Usage) {
        self.credits += u.credits;
        self.cost_usd += u.cost_usd;
        self.tokens += u.tokens;
    }

    pub fn new(id: &str, prompt_file: &str, workdir: &str) -> TaskState {
        let now = crate::sys::time::now_rfc3339();
        TaskState {
            id: id.to_string(),
            status: Status::Queued,
            iteration: 0,
            successful_iterations: 0,
            failed_iterations: 0,
            consecutive_failures: 0,
            retries: 0,
            interrupted_iterations: 0,
            started_at: None,
            updated_at: now.clone(),
            finished_at: None,
            last_error: None,
            reason: None,
            prompt_file: prompt_file.to_string(),
            workdir: workdir.to_string(),
            in_progress: None,
            runtime_secs: 0.0,
            last_checkpoint: 0,
            max_iterations: None,
            max_runtime: None,
            submitted_at: Some(now),
            source: None,
            source_key: None,
            last_class: None,
            throttled: 0,
            credits: 0.0,
            cost_usd: 0.0,
            tokens: 0,
            hook: None,
            tree_fingerprint: None,
            stalled_iterations: 0,
            verify_failed: None,
            verify_failed_at: None,
            cpu_seconds: 0.0,
            peak_memory_bytes: None,
            last_attempt: None,
            rerun_iteration: false,
            waits_for: None,
        }
    }
}

/// A task id is a file name inside the state directory: keep it plain.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A task id derived from a prompt file name (`PROMPT.md` → `PROMPT`).
pub fn id_from_file_name(name: &str) -> String {
    let stem = name.rsplit_once('.').map_or(name, |(s, _)| s);
    let mut id: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if id.is_empty() {
        id = "task".into();
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(valid_id("PROMPT"));
        assert!(valid_id("a.b-c_1"));
        assert!(!valid_id("../x"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(".."));
        assert!(!valid_id(""));
        assert_eq!(id_from_file_name("PROMPT.md"), "PROMPT");
        assert_eq!(id_from_file_name("my task.md"), "my_task");
        assert_eq!(id_from_file_name(".md"), "task");
    }

    #[test]
    fn state_round_trips_as_json() {
        let s = TaskState::new("x", "/w/PROMPT.md", "/w");
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"status\":\"queued\""));
        assert_eq!(serde_json::from_str::<TaskState>(&j).unwrap(), s);
    }
}

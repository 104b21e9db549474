//! One task as the scheduler holds it: the record, where it is in the loop
//! (its phase), and what the current iteration has used. The scheduler is the
//! only code that changes a slot.

use crate::agent::{Cancel, Progress};
use crate::sys::time::now_rfc3339;
use crate::task::{Status, TaskState};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// In the ready queue.
    Ready,
    /// Waiting for a timer (iteration delay or retry back-off).
    Waiting(Instant),
    /// A worker reads the prompt file for the next attempt.
    Reading {
        seq: u64,
    },
    Running {
        seq: u64,
        since: Instant,
    },
    Checkpointing {
        seq: u64,
        finishing: bool,
    },
    /// The task says it is complete; verify_command runs.
    Verifying {
        seq: u64,
        reason: &'static str,
    },
    /// Ended; its on_task_end hook runs.
    Hook {
        seq: u64,
    },
    Finished,
}

impl Phase {
    /// The job this phase waits for, if any.
    pub fn job(self) -> Option<u64> {
        match self {
            Phase::Running { seq, .. }
            | Phase::Reading { seq }
            | Phase::Checkpointing { seq, .. }
            | Phase::Verifying { seq, .. }
            | Phase::Hook { seq } => Some(seq),
            _ => None,
        }
    }

    pub fn text(self) -> String {
        match self {
            Phase::Ready => "ready".into(),
            Phase::Waiting(t) => format!(
                "waiting {:.1} s",
                t.saturating_duration_since(Instant::now()).as_secs_f64()
            ),
            Phase::Reading { .. } => "reading the prompt file".into(),
            Phase::Running { .. } => "running agent".into(),
            Phase::Checkpointing { .. } => "checkpointing".into(),
            Phase::Verifying { .. } => "running verify_command".into(),
            Phase::Hook { .. } => "running on_task_end hook".into(),
            Phase::Finished => "finished".into(),
        }
    }
}

pub struct Slot {
    /// The record. Shared with `published` from the moment it is written
    /// until it next changes (`st` copies it then): a task at rest, most of
    /// a big queue, is held once, not twice.
    pub state: Arc<TaskState>,
    pub phase: Phase,
    /// Retries made in the current iteration.
    pub retries_now: u32,
    /// The next dispatch re-runs `state.iteration` instead of starting a new one.
    pub rerun: bool,
    /// When this process last added to `state.runtime_secs`.
    pub active_since: Option<Instant>,
    pub cancel: Option<Arc<Cancel>>,
    pub progress: Arc<Progress>,
    pub dirty: bool,
    /// Cache key of the request in flight, stored on success.
    pub cache_key: Option<u64>,
    /// Cancel requested while a checkpoint was running.
    pub cancel_pending: bool,
    /// Failed reads of the prompt file in a row (out of descriptors, I/O).
    pub read_failures: u32,
    /// The record as last written, for readers on other threads.
    pub published: Arc<TaskState>,
    /// The working tree (`trees::key` of the workdir), once looked up.
    pub tree: Option<std::path::PathBuf>,
    /// The prompt file as the worker read it after the last attempt, and
    /// the scheduler's pass it arrived in (`Scheduler::start`).
    pub prompt_after: Option<(u64, Vec<u8>)>,
}

impl Slot {
    /// A task as found on disk or just submitted: finished ones stay
    /// finished, an iteration that was running when the last process died
    /// runs again (and is counted as interrupted).
    pub fn adopt(mut state: TaskState) -> Slot {
        let mut rerun = state.rerun_iteration && !state.status.is_finished();
        let phase = if state.status.is_finished() {
            Phase::Finished
        } else {
            if let Some(k) = state.in_progress {
                state.interrupted_iterations += 1;
                state.iteration = k;
                rerun = true;
                log::warn!(task = state.id.as_str(), iteration = k;
                    "iteration {k} was interrupted; running it again");
            }
            Phase::Ready
        };
        Slot {
            state: Arc::new(state),
            phase,
            retries_now: 0,
            rerun,
            active_since: None,
            cancel: None,
            progress: Arc::new(Progress::default()),
            dirty: true,
            cache_key: None,
            cancel_pending: false,
            read_failures: 0,
            published: Arc::new(TaskState::new("", "", "")),
            tree: None,
            prompt_after: None,
        }
    }

    /// The record, to change: copied first if a reader holds it.
    pub fn st(&mut self) -> &mut TaskState {
        Arc::make_mut(&mut self.state)
    }

    /// Seconds of running, this process's share included.
    pub fn runtime(&self) -> f64 {
        self.state.runtime_secs + self.active_since.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

/// The record changes of the loop's steps, each on one task.
impl Slot {
    /// An attempt begins: a new iteration unless this one is retried or
    /// re-run after an interruption.
    pub fn begin(&mut self, new_iteration: bool, next: u64) {
        let st = Arc::make_mut(&mut self.state);
        if new_iteration {
            st.iteration = next;
        }
        self.rerun = false;
        st.rerun_iteration = false;
        st.status = Status::Running;
        st.in_progress = Some(st.iteration);
        if st.started_at.is_none() {
            st.started_at = Some(now_rfc3339());
        }
        self.dirty = true;
    }

    /// The iteration succeeded: an earlier error is history, not the
    /// task's state (a completed task does not show an old failure).
    pub fn succeeded(&mut self) {
        let st = Arc::make_mut(&mut self.state);
        st.successful_iterations += 1;
        st.consecutive_failures = 0;
        st.in_progress = None;
        st.last_error = None;
        self.retries_now = 0;
    }

    /// The working tree after a successful iteration: how many successful
    /// iterations in a row changed nothing, or None when that is unknown
    /// (no fingerprint could be taken).
    pub fn progress(&mut self, before: Option<u64>, after: Option<u64>) -> Option<u32> {
        let st = Arc::make_mut(&mut self.state);
        if st.tree_fingerprint.is_none() {
            st.tree_fingerprint = before.map(|b| format!("{b:016x}"));
        }
        let after = format!("{:016x}", after?);
        if st.tree_fingerprint.as_deref() == Some(after.as_str()) {
            st.stalled_iterations += 1;
        } else {
            st.stalled_iterations = 0;
            st.tree_fingerprint = Some(after);
        }
        Some(st.stalled_iterations)
    }

    /// The API asked to slow down: the same iteration runs again later;
    /// neither its retries nor the failures in a row move.
    pub fn throttled(&mut self, detail: &str) {
        let st = Arc::make_mut(&mut self.state);
        st.throttled += 1;
        st.in_progress = None;
        st.last_error = Some(detail.to_string());
        // The next start runs this iteration again under its number: the
        // counter never goes back.
        self.rerun = true;
        st.rerun_iteration = true;
    }

    /// The attempt could not work at all (agent missing, no quota, no
    /// login): the iteration starts afresh later, retries and all.
    pub fn not_counted(&mut self, detail: &str) {
        // Waiting for the account is not running: the clock of max_runtime
        // stops until the next attempt starts.
        if let Some(t) = self.active_since.take() {
            self.st().runtime_secs += t.elapsed().as_secs_f64();
        }
        let st = Arc::make_mut(&mut self.state);
        st.in_progress = None;
        st.last_error = Some(detail.to_string());
        self.retries_now = 0;
        // The iteration did not run: the next start runs it under the same
        // number (the counter never goes back).
        self.rerun = true;
        self.st().rerun_iteration = true;
    }

    pub fn retrying(&mut self, detail: &str) {
        self.retries_now += 1;
        self.st().retries += 1;
        self.st().last_error = Some(detail.to_string());
    }

    /// The iteration failed for good; returns the failures in a row.
    pub fn failed(&mut self, detail: &str) -> u32 {
        let st = Arc::make_mut(&mut self.state);
        st.failed_iterations += 1;
        st.consecutive_failures += 1;
        st.in_progress = None;
        st.last_error = Some(detail.to_string());
        self.retries_now = 0;
        st.consecutive_failures
    }

    /// The task ends; returns the line that tells the operator how.
    pub fn end(&mut self, status: Status, reason: &str, error: Option<String>) -> String {
        let st = Arc::make_mut(&mut self.state);
        st.status = status;
        st.reason = Some(reason.to_string());
        st.finished_at = Some(now_rfc3339());
        st.waits_for = None;
        if error.is_some() {
            st.last_error = error;
        }
        self.cancel = None;
        self.dirty = true;
        format!(
            "task {}: {} after {} iteration(s) ({} succeeded, {} failed, {} retries){}",
            status.as_str(),
            reason,
            st.iteration,
            st.successful_iterations,
            st.failed_iterations,
            st.retries,
            st.last_error
                .as_ref()
                .filter(|_| status != Status::Completed)
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The scheduler's rule for what an attempt starts (check_attempt).
    fn start(s: &mut Slot) {
        let new = s.retries_now == 0 && !s.rerun;
        let next = s.state.iteration + u64::from(new);
        s.begin(new, next);
    }

    #[test]
    fn an_attempt_that_could_not_work_runs_its_iteration_again_and_stops_the_clock() {
        let mut s = Slot::adopt(TaskState::new("t", "/w/P.md", "/w"));
        s.active_since = Some(Instant::now() - Duration::from_secs(5));
        start(&mut s);
        s.not_counted("out of quota");
        assert_eq!(s.state.iteration, 1, "the counter does not go back");
        assert_eq!(s.state.in_progress, None);
        assert!(s.active_since.is_none());
        let ran = s.runtime();
        assert!((5.0..6.0).contains(&ran), "{ran}");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.runtime(), ran, "a paused task's runtime does not grow");
        // Its next start runs iteration 1, not 2.
        start(&mut s);
        assert_eq!(s.state.iteration, 1);
    }

    #[test]
    fn iterations_that_change_nothing_are_counted_until_one_does() {
        let mut s = Slot::adopt(TaskState::new("t", "/w/P.md", "/w"));
        assert_eq!(s.progress(Some(1), Some(1)), Some(1));
        assert_eq!(s.progress(None, Some(1)), Some(2));
        assert_eq!(s.progress(None, None), None);
        assert_eq!(s.state.stalled_iterations, 2);
        assert_eq!(s.progress(None, Some(2)), Some(0));
        assert_eq!(s.progress(None, Some(2)), Some(1));
    }

    #[test]
    fn a_throttled_attempt_runs_its_iteration_again() {
        let mut s = Slot::adopt(TaskState::new("t", "/w/P.md", "/w"));
        start(&mut s);
        s.succeeded();
        start(&mut s);
        s.throttled("rate limit");
        assert_eq!(s.state.throttled, 1);
        assert_eq!(s.state.iteration, 2, "the counter does not go back");
        assert_eq!(s.state.failed_iterations, 0);
        assert_eq!(s.state.consecutive_failures, 0);
        assert_eq!(s.retries_now, 0);
        start(&mut s);
        assert_eq!(s.state.iteration, 2, "the same iteration runs again");
    }

    use proptest::prelude::*;

    proptest! {
        /// Whatever the attempts' outcomes, and crashes between them, no
        /// counter of the record ever decreases, and no iteration is counted
        /// as both or twice.
        #[test]
        fn counters_never_decrease(outcomes in proptest::collection::vec(0u8..6, 1..60)) {
            let mut s = Slot::adopt(TaskState::new("t", "/w/P.md", "/w"));
            let counters = |st: &TaskState| [
                st.iteration,
                st.successful_iterations,
                st.failed_iterations,
                st.retries,
                st.interrupted_iterations,
                st.throttled,
            ];
            let mut last = counters(&s.state);
            for o in outcomes {
                start(&mut s);
                match o {
                    0 => s.succeeded(),
                    1 => s.retrying("failed"),
                    2 => { s.failed("failed"); }
                    3 => s.throttled("rate limit"),
                    4 => s.not_counted("agent missing"),
                    // The process dies mid-attempt; the next one adopts the record.
                    _ => s = Slot::adopt((*s.state).clone()),
                }
                let now = counters(&s.state);
                for (a, b) in last.iter().zip(now.iter()) {
                    prop_assert!(b >= a, "{last:?} -> {now:?} after outcome {o}");
                }
                let st = &s.state;
                prop_assert!(st.successful_iterations + st.failed_iterations <= st.iteration,
                    "{now:?}");
                last = now;
            }
        }
    }
}

//! The scheduler: the one owner of task state. It decides what runs next,
//! hands jobs to workers, judges their results, keeps timers, and writes every
//! state change to disk in batches.

use super::request::{self, Inputs};
use super::stats::Stats;
use super::worker::{Job, JobMsg, JobResult, spawn_worker};
use crate::agent::{AgentOutcome, Cancel, CancelReason, Progress};
use crate::config::Config;
use crate::store::TaskStore;
use crate::task::checkpoint::{CheckpointJob, Done};
use crate::task::completion::prompt_complete;
use crate::task::rules::{self, Limits, Verdict};
use crate::task::{Status, TaskState};
use crate::timefmt::now_rfc3339;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages from the signal thread (and later the spool and clients).
#[derive(Debug)]
pub enum Control {
    /// Stop dispatching; give running requests `grace`, then stop them.
    Shutdown {
        grace: Duration,
        signal: i32,
    },
    Dump,
}

pub enum Event {
    Control(Control),
    Done {
        task: String,
        seq: u64,
        result: JobResult,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    /// In the ready queue.
    Ready,
    /// Waiting for a timer (iteration delay or retry back-off).
    Waiting(Instant),
    Running {
        seq: u64,
        since: Instant,
    },
    Checkpointing {
        seq: u64,
        finishing: bool,
    },
    Finished,
}

struct Slot {
    state: TaskState,
    phase: Phase,
    /// Retries made in the current iteration.
    retries_now: u32,
    /// The next dispatch re-runs `state.iteration` instead of starting a new one.
    rerun: bool,
    /// When this process last added to `state.runtime_secs`.
    active_since: Option<Instant>,
    cancel: Option<Arc<Cancel>>,
    progress: Arc<Progress>,
    dirty: bool,
}

impl Slot {
    fn runtime(&self) -> f64 {
        self.state.runtime_secs + self.active_since.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}

/// How the scheduler stopped.
pub struct Finished {
    pub tasks: Vec<TaskState>,
    /// The signal that stopped it, if one did.
    pub signal: Option<i32>,
    /// Set when a task failed because the agent command cannot run.
    pub unavailable: bool,
    pub refused: bool,
}

pub struct Scheduler {
    cfg: Config,
    store: TaskStore,
    slots: BTreeMap<String, Slot>,
    ready: VecDeque<String>,
    jobs: Sender<JobMsg>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    workers: usize,
    in_flight: usize,
    seq: u64,
    stats: Stats,
    /// Stop when every task has finished (`run`); a daemon waits for more.
    exit_when_idle: bool,
    stream_output: bool,
    shutdown: Option<(Instant, i32)>,
    next_summary: Option<Instant>,
    save_error: Option<String>,
    unavailable: bool,
    refused: bool,
    rng: u64,
}

impl Scheduler {
    pub fn new(cfg: Config, store: TaskStore, exit_when_idle: bool) -> std::io::Result<Scheduler> {
        let (events_tx, events) = crossbeam_channel::unbounded();
        let (jobs, jobs_rx) = crossbeam_channel::unbounded();
        let workers = cfg.performance.max_concurrent as usize;
        for i in 0..workers {
            spawn_worker(i, jobs_rx.clone(), events_tx.clone())?;
        }
        let interval = cfg.monitoring.metrics_interval;
        Ok(Scheduler {
            stream_output: cfg.logging.verbose,
            next_summary: (interval > 0.0)
                .then(|| Instant::now() + Duration::from_secs_f64(interval)),
            cfg,
            store,
            slots: BTreeMap::new(),
            ready: VecDeque::new(),
            jobs,
            events,
            events_tx,
            workers,
            in_flight: 0,
            seq: 0,
            stats: Stats::default(),
            exit_when_idle,
            shutdown: None,
            save_error: None,
            unavailable: false,
            refused: false,
            rng: seed(),
        })
    }

    /// A sender for control messages (signals, clients).
    pub fn sender(&self) -> Sender<Event> {
        self.events_tx.clone()
    }

    /// Takes over a task as found on disk: finished ones stay finished, an
    /// iteration that was running when the last process died runs again.
    pub fn adopt(&mut self, mut state: TaskState) {
        let id = state.id.clone();
        let mut rerun = false;
        let phase = if state.status.is_finished() {
            Phase::Finished
        } else {
            if let Some(k) = state.in_progress {
                state.interrupted_iterations += 1;
                state.iteration = k;
                rerun = true;
                let killed = crate::agent::kill_leftovers(&request::owner_marker(
                    self.store.state_dir(),
                    &id,
                ));
                log::warn!(task = id.as_str(), iteration = k;
                    "iteration {k} was interrupted; running it again{}",
                    if killed.is_empty() { String::new() } else { format!(" (ended {} leftover agent processes: {killed:?})", killed.len()) });
            }
            self.ready.push_back(id.clone());
            Phase::Ready
        };
        self.slots.insert(
            id,
            Slot {
                state,
                phase,
                retries_now: 0,
                rerun,
                active_since: None,
                cancel: None,
                progress: Arc::new(Progress::default()),
                dirty: true,
            },
        );
    }

    pub fn run(mut self) -> Finished {
        loop {
            self.dispatch();
            self.flush();
            let busy = self.in_flight > 0;
            if !busy && self.shutdown.is_some() {
                break;
            }
            if !busy
                && self.exit_when_idle
                && self.slots.values().all(|s| s.phase == Phase::Finished)
            {
                break;
            }
            let now = Instant::now();
            let next = self.next_wake();
            let timeout = next.map_or(Duration::from_secs(3600), |t| {
                t.saturating_duration_since(now)
            });
            match self.events.recv_timeout(timeout) {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.timers();
        }
        self.flush();
        for s in self.slots.values_mut() {
            s.active_since = None;
        }
        drop(self.jobs);
        Finished {
            tasks: self.slots.into_values().map(|s| s.state).collect(),
            signal: self.shutdown.map(|(_, s)| s),
            unavailable: self.unavailable,
            refused: self.refused,
        }
    }

    fn next_wake(&self) -> Option<Instant> {
        let timers = self.slots.values().filter_map(|s| match s.phase {
            Phase::Waiting(t) if self.shutdown.is_none() => Some(t),
            _ => None,
        });
        timers
            .chain(self.next_summary)
            .chain(self.shutdown.map(|(t, _)| t).filter(|_| self.in_flight > 0))
            .min()
    }

    fn timers(&mut self) {
        let now = Instant::now();
        if self.shutdown.is_none() {
            for (id, s) in self.slots.iter_mut() {
                if let Phase::Waiting(t) = s.phase
                    && t <= now
                {
                    s.phase = Phase::Ready;
                    self.ready.push_back(id.clone());
                }
            }
        }
        if let Some(t) = self.next_summary
            && t <= now
        {
            log::info!("{}", self.stats.summary());
            let every = Duration::from_secs_f64(self.cfg.monitoring.metrics_interval);
            self.next_summary = Some(now + every);
        }
        if let Some((deadline, _)) = self.shutdown
            && now >= deadline
        {
            self.cancel_all(CancelReason::Shutdown);
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Control(Control::Shutdown { grace, signal }) => {
                if self.shutdown.is_none() {
                    log::info!(
                        "signal {signal}: stopping; {} running request(s) get {:.1} s to finish",
                        self.in_flight,
                        grace.as_secs_f64()
                    );
                    self.shutdown = Some((Instant::now() + grace, signal));
                    self.ready.clear();
                    if grace.is_zero() {
                        self.cancel_all(CancelReason::Shutdown);
                    }
                } else {
                    log::info!("signal {signal} again: stopping running requests now");
                    self.cancel_all(CancelReason::Shutdown);
                }
            }
            Event::Control(Control::Dump) => self.dump(),
            Event::Done { task, seq, result } => {
                let current = self.slots.get(&task).map(|s| s.phase);
                let matches = match current {
                    Some(Phase::Running { seq: s, .. })
                    | Some(Phase::Checkpointing { seq: s, .. }) => s == seq,
                    _ => false,
                };
                if !matches {
                    return;
                }
                self.in_flight -= 1;
                match result {
                    JobResult::Agent(o) => self.agent_done(&task, o),
                    JobResult::Checkpoint(d) => self.checkpoint_done(&task, d),
                }
            }
        }
    }

    fn cancel_all(&mut self, reason: CancelReason) {
        for s in self.slots.values() {
            if let (Phase::Running { .. }, Some(c)) = (s.phase, &s.cancel) {
                c.request(reason);
            }
        }
    }

    fn limits(&self, s: &TaskState) -> Limits {
        let o = &self.cfg.orchestrator;
        Limits {
            max_iterations: s.max_iterations.unwrap_or(o.max_iterations),
            max_runtime: s.max_runtime.unwrap_or(o.max_runtime),
            max_consecutive_failures: o.max_consecutive_failures,
            max_retries: self.cfg.adapter.max_retries,
        }
    }

    fn dispatch(&mut self) {
        while self.shutdown.is_none() && self.in_flight < self.workers {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            if self.slots.get(&id).map(|s| s.phase) != Some(Phase::Ready) {
                continue;
            }
            self.start(&id);
        }
    }

    /// Starts the next attempt of a ready task, or ends it.
    fn start(&mut self, id: &str) {
        let seq = self.next_seq();
        let cfg = &self.cfg;
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        if slot.active_since.is_none() {
            slot.active_since = Some(Instant::now());
        }
        let prompt_path = slot.state.prompt_file.clone();
        let raw = match std::fs::read(&prompt_path) {
            Ok(b) => b,
            Err(e) => {
                let msg = format!("cannot read prompt file {prompt_path}: {e}");
                return self.finish(id, Status::Failed, "prompt_unreadable", Some(msg));
            }
        };
        let new_iteration = slot.retries_now == 0 && !slot.rerun;
        if new_iteration && prompt_complete(&raw, &cfg.orchestrator.completion_marker) {
            return self.finish(id, Status::Completed, "completion_marker", None);
        }
        let limits = Limits {
            max_iterations: slot
                .state
                .max_iterations
                .unwrap_or(cfg.orchestrator.max_iterations),
            max_runtime: slot
                .state
                .max_runtime
                .unwrap_or(cfg.orchestrator.max_runtime),
            max_consecutive_failures: cfg.orchestrator.max_consecutive_failures,
            max_retries: cfg.adapter.max_retries,
        };
        let next = if new_iteration {
            slot.state.iteration + 1
        } else {
            slot.state.iteration
        };
        let runtime = slot.runtime();
        if let Some(which) =
            rules::limit_before(if new_iteration { next } else { 0 }, runtime, &limits)
        {
            return self.finish(id, Status::LimitReached, which, None);
        }
        let prompt = match crate::agent::instruction::check_prompt(
            raw,
            cfg.limits.max_prompt_size,
            &cfg.limits.blocked_patterns,
        ) {
            Ok(p) => p,
            Err(refusal) => {
                self.refused = true;
                let msg = format!("{prompt_path}: {refusal}");
                return self.finish(id, Status::Failed, "prompt_refused", Some(msg));
            }
        };
        if prompt.nul_stripped > 0 {
            log::warn!(task = id; "removed {} NUL byte(s) from the prompt {prompt_path}", prompt.nul_stripped);
        }
        let st = &mut slot.state;
        if new_iteration {
            st.iteration = next;
        }
        slot.rerun = false;
        st.status = Status::Running;
        st.in_progress = Some(st.iteration);
        if st.started_at.is_none() {
            st.started_at = Some(now_rfc3339());
        }
        slot.dirty = true;
        let cancel = Arc::new(Cancel::default());
        slot.cancel = Some(cancel.clone());
        let attempt = slot.retries_now + 1;
        let (req, by_reference) = request::build(Inputs {
            cfg,
            state_dir: self.store.state_dir(),
            task: &slot.state,
            prompt: &prompt.text,
            attempt,
            remaining_runtime: limits.max_runtime - runtime,
            transcript: Some(self.store.transcript_path(id, slot.state.iteration)),
            stream: self.stream_output,
            cancel,
            progress: slot.progress.clone(),
        });
        let it = slot.state.iteration;
        if by_reference {
            log::info!(task = id, iteration = it; "the instruction would exceed one argument's 128 KiB; telling the agent to read {prompt_path}");
        }
        log::info!(task = id, iteration = it; "starting agent (attempt {attempt}): {}", req.shown);
        log::debug!(task = id, iteration = it; "prompt: {}", String::from_utf8_lossy(&prompt.text));
        slot.phase = Phase::Running {
            seq,
            since: Instant::now(),
        };
        self.send(id, seq, Job::Agent(Box::new(req)));
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn send(&mut self, id: &str, seq: u64, job: Job) {
        self.in_flight += 1;
        if self
            .jobs
            .send(JobMsg {
                task: id.to_string(),
                seq,
                job,
            })
            .is_err()
        {
            // Only happens while tearing down; the task resumes next start.
            self.in_flight -= 1;
        }
    }

    fn agent_done(&mut self, id: &str, o: AgentOutcome) {
        self.stats.record_request(&o);
        let limits = match self.slots.get(id) {
            Some(s) => self.limits(&s.state),
            None => return,
        };
        let delay_base = self.cfg.adapter.retry_delay;
        let delay_cap = self.cfg.adapter.max_retry_delay;
        let jitter = self.jitter();
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.cancel = None;
        let it = slot.state.iteration;
        let verdict = rules::judge(&o.ending, slot.retries_now, limits.max_retries);
        let detail = describe(&o);
        if o.truncated() {
            log::warn!(task = id, iteration = it; "agent output over limits.max_output_size: {} bytes dropped", o.bytes_dropped);
        }
        slot.dirty = true;
        match verdict {
            Verdict::Success => {
                log::info!(task = id, iteration = it; "agent finished in {:.2} s ({} bytes of output)", o.duration.as_secs_f64(), o.bytes_read);
                let st = &mut slot.state;
                st.successful_iterations += 1;
                st.consecutive_failures = 0;
                st.in_progress = None;
                slot.retries_now = 0;
                self.stats.iterations += 1;
                self.stats.successes += 1;
                if o.marker_seen {
                    return self.finish(id, Status::Completed, "output_marker", None);
                }
                self.after_iteration(id);
            }
            Verdict::Retry => {
                slot.retries_now += 1;
                slot.state.retries += 1;
                slot.state.last_error = Some(detail.clone());
                self.stats.retries += 1;
                let delay = rules::retry_delay(delay_base, slot.retries_now, delay_cap, jitter);
                log::warn!(task = id, iteration = it; "agent failed: {detail}; retry {} of {} in {:.2} s", slot.retries_now, limits.max_retries, delay.as_secs_f64());
                slot.phase = Phase::Waiting(Instant::now() + delay);
            }
            Verdict::Failed => {
                let st = &mut slot.state;
                st.failed_iterations += 1;
                st.consecutive_failures += 1;
                st.in_progress = None;
                st.last_error = Some(detail.clone());
                slot.retries_now = 0;
                self.stats.iterations += 1;
                self.stats.failures += 1;
                let n = st.consecutive_failures;
                log::error!(task = id, iteration = it; "iteration failed after {} retries: {detail} ({n} in a row, limit {})", limits.max_retries, limits.max_consecutive_failures);
                if n >= limits.max_consecutive_failures {
                    return self.finish(
                        id,
                        Status::Failed,
                        "max_consecutive_failures",
                        Some(detail),
                    );
                }
                self.after_iteration(id);
            }
            Verdict::Unavailable => {
                slot.state.in_progress = None;
                slot.state.iteration = slot.state.iteration.saturating_sub(1);
                self.unavailable = true;
                log::error!(task = id; "{detail}");
                self.finish(id, Status::Failed, "agent_unavailable", Some(detail));
            }
            Verdict::RuntimeOut => {
                slot.state.in_progress = None;
                self.finish(id, Status::LimitReached, "max_runtime", None);
            }
            Verdict::Cancelled => {
                slot.state.in_progress = None;
                self.finish(id, Status::Cancelled, "cancelled", None);
            }
            Verdict::Interrupted => {
                log::warn!(task = id, iteration = it; "agent stopped by shutdown; iteration {it} will run again on the next start");
                slot.phase = Phase::Waiting(Instant::now());
            }
        }
    }

    /// After an iteration that did not end the task: completion, checkpoint, pause.
    fn after_iteration(&mut self, id: &str) {
        let marker = self.cfg.orchestrator.completion_marker.clone();
        let interval = self.cfg.orchestrator.checkpoint_interval;
        let delay = Duration::from_secs_f64(self.cfg.orchestrator.iteration_delay);
        let keep = self.cfg.orchestrator.keep_transcripts as usize;
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        self.store.prune_transcripts(id, keep.max(1));
        let complete = std::fs::read(&slot.state.prompt_file)
            .map(|t| prompt_complete(&t, &marker))
            .unwrap_or(false);
        if complete {
            return self.finish(id, Status::Completed, "completion_marker", None);
        }
        let it = slot.state.iteration;
        if interval > 0 && it % interval == 0 && slot.state.last_checkpoint < it {
            return self.checkpoint(id, false);
        }
        slot.phase = Phase::Waiting(Instant::now() + delay);
    }

    fn checkpoint(&mut self, id: &str, finishing: bool) {
        let seq = self.next_seq();
        let o = &self.cfg.orchestrator;
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let job = CheckpointJob {
            task_id: id.to_string(),
            iteration: slot.state.iteration,
            prompt_file: slot.state.prompt_file.clone().into(),
            workdir: slot.state.workdir.clone().into(),
            archive_dir: o.archive_prompts.then(|| self.store.archive_dir(id)),
            git: o.git_checkpoint,
            state_dir: self.store.state_dir().to_path_buf(),
        };
        slot.state.last_checkpoint = slot.state.iteration;
        slot.dirty = true;
        slot.phase = Phase::Checkpointing { seq, finishing };
        self.send(id, seq, Job::Checkpoint(job));
    }

    fn checkpoint_done(&mut self, id: &str, d: Done) {
        let delay = Duration::from_secs_f64(self.cfg.orchestrator.iteration_delay);
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let it = slot.state.iteration;
        for n in &d.notes {
            log::warn!(task = id, iteration = it; "{n}");
        }
        match &d.commit {
            Some(c) => log::info!(task = id, iteration = it; "checkpoint: committed {c}"),
            None => log::info!(task = id, iteration = it; "checkpoint written"),
        }
        let finishing = matches!(
            slot.phase,
            Phase::Checkpointing {
                finishing: true,
                ..
            }
        );
        slot.phase = if finishing {
            Phase::Finished
        } else {
            Phase::Waiting(Instant::now() + delay)
        };
    }

    /// Ends a task, with a last checkpoint when it ran since the previous one.
    fn finish(&mut self, id: &str, status: Status, reason: &str, error: Option<String>) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let st = &mut slot.state;
        st.status = status;
        st.reason = Some(reason.to_string());
        st.finished_at = Some(now_rfc3339());
        if error.is_some() {
            st.last_error = error;
        }
        slot.cancel = None;
        slot.dirty = true;
        let it = st.iteration;
        let msg = format!(
            "task {}: {} after {} iteration(s) ({} succeeded, {} failed, {} retries){}",
            status.as_str(),
            reason,
            it,
            st.successful_iterations,
            st.failed_iterations,
            st.retries,
            st.last_error
                .as_ref()
                .filter(|_| status != Status::Completed)
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        match status {
            Status::Completed | Status::Cancelled => log::info!(task = id; "{msg}"),
            Status::LimitReached => log::warn!(task = id; "{msg}"),
            _ => log::error!(task = id; "{msg}"),
        }
        let ran_since_checkpoint = st.last_checkpoint < it && it > 0;
        let o = &self.cfg.orchestrator;
        if ran_since_checkpoint
            && (o.git_checkpoint || o.archive_prompts)
            && o.checkpoint_interval > 0
        {
            self.checkpoint(id, true);
        } else {
            slot.phase = Phase::Finished;
        }
    }

    /// Writes every changed record; on failure keeps them dirty and says so once.
    fn flush(&mut self) {
        let now = Instant::now();
        let mut error = None;
        for s in self.slots.values_mut().filter(|s| s.dirty) {
            if let Some(t) = s.active_since {
                s.state.runtime_secs += now.duration_since(t).as_secs_f64();
                s.active_since = (s.phase != Phase::Finished).then_some(now);
            }
            s.state.updated_at = now_rfc3339();
            match self.store.save(&s.state) {
                Ok(()) => s.dirty = false,
                Err(e) => error = Some(format!("cannot write state of task {}: {e}", s.state.id)),
            }
        }
        if error != self.save_error {
            match &error {
                Some(e) => {
                    log::error!("{e}; will retry (check that the state directory is writable)")
                }
                None => log::info!("task state is being written again"),
            }
            self.save_error = error;
        }
    }

    fn dump(&self) {
        let text = super::diagnostics::render(super::diagnostics::View {
            workers: self.workers,
            in_flight: self.in_flight,
            ready: self.ready.len(),
            stats: &self.stats,
            tasks: self
                .slots
                .values()
                .map(|s| super::diagnostics::TaskView {
                    state: &s.state,
                    phase: phase_text(s.phase),
                    running_for: match s.phase {
                        Phase::Running { since, .. } => Some(since.elapsed()),
                        _ => None,
                    },
                    retries_now: s.retries_now,
                    progress: &s.progress,
                })
                .collect(),
        });
        for line in text.lines() {
            log::info!("diagnostics: {line}");
        }
        let path = self.store.state_dir().join("diagnostics.txt");
        match crate::store::write_atomic(&path, text.as_bytes()) {
            Ok(()) => log::info!("diagnostics written to {}", path.display()),
            Err(e) => log::warn!("cannot write diagnostics to {}: {e}", path.display()),
        }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn phase_text(p: Phase) -> String {
    match p {
        Phase::Ready => "ready".into(),
        Phase::Waiting(t) => format!(
            "waiting {:.1} s",
            t.saturating_duration_since(Instant::now()).as_secs_f64()
        ),
        Phase::Running { .. } => "running agent".into(),
        Phase::Checkpointing { .. } => "checkpointing".into(),
        Phase::Finished => "finished".into(),
    }
}

fn describe(o: &AgentOutcome) -> String {
    let tail = String::from_utf8_lossy(&o.tail);
    let last = tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let last: String = last.chars().take(300).collect();
    if last.is_empty() || o.ending.is_success() {
        o.ending.describe()
    } else {
        format!("{}: {last}", o.ending.describe())
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32) | 1
}

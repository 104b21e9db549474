//! The scheduler: the one owner of task state. It decides what runs next,
//! hands jobs to workers, judges their results, keeps timers, and writes every
//! state change to disk in batches.

use super::cache::{self, Cache};
use super::circuit::Circuit;
use super::notify::Notifier;
use super::ratelimit::Bucket;
use super::request::{self, Inputs};
use super::stats::Stats;
use super::worker::{Job, JobMsg, JobResult, WorkerState, spawn_worker};
use crate::agent::{AgentOutcome, Cancel, CancelReason, Progress};
use crate::config::Config;
use crate::http::{Shared, Snapshot};
use crate::metrics::METRICS;
use crate::store::TaskStore;
use crate::task::checkpoint::{CheckpointJob, Done};
use crate::task::completion::prompt_complete;
use crate::task::rules::{self, Limits, Verdict};
use crate::task::{Status, TaskState};
use crate::timefmt::now_rfc3339;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `run` ends with its one task and reports an unusable agent at once; the
/// daemon waits for more tasks and lets the circuit breaker handle outages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Run,
    Daemon,
}

/// Dumps closer together than this are merged into one.
const DUMP_EVERY: Duration = Duration::from_secs(1);
const KEEP_DUMPS: usize = 20;

/// Messages from the signal thread (and later the spool and clients).
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

pub enum Event {
    Control(Control),
    /// The writer finished a batch of task records.
    Written(crate::store::writer::Written),
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
    /// Cache key of the request in flight, stored on success.
    cache_key: Option<u64>,
    /// Cancel requested while a checkpoint was running.
    cancel_pending: bool,
    /// Failed reads of the prompt file in a row (out of descriptors, I/O).
    read_failures: u32,
    /// The record as last written, for readers on other threads.
    published: Arc<TaskState>,
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
    jobs_rx: Receiver<JobMsg>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    workers: usize,
    worker_states: Vec<Arc<WorkerState>>,
    mode: Mode,
    circuit: Circuit,
    bucket: Bucket,
    cache: Option<Cache>,
    notifier: Notifier,
    last_dump: Option<Instant>,
    dump_due: Option<Instant>,
    /// Shared with the spool intake, which checks sizes before we see a task.
    pub max_prompt: Arc<AtomicU64>,
    shared: Arc<Shared>,
    writer: crate::store::writer::Writer,
    /// Records that could not be written, and when to try them again.
    write_retry: Option<(Instant, Vec<String>)>,
    /// Set when something readers see has changed since the last publish.
    publish_due: bool,
    metrics_saved: Option<(Instant, crate::metrics::Totals)>,
    in_flight: usize,
    seq: u64,
    stats: Stats,
    stream_output: bool,
    shutdown: Option<(Instant, i32)>,
    next_summary: Option<Instant>,
    save_error: Option<String>,
    unavailable: bool,
    refused: bool,
    rng: u64,
}

impl Scheduler {
    pub fn new(
        cfg: Config,
        store: TaskStore,
        mode: Mode,
        notifier: Notifier,
        shared: Arc<Shared>,
    ) -> std::io::Result<Scheduler> {
        let (events_tx, events) = crossbeam_channel::unbounded();
        let (jobs, jobs_rx) = crossbeam_channel::unbounded();
        let interval = cfg.monitoring.metrics_interval;
        let now = Instant::now();
        let report = events_tx.clone();
        let writer = crate::store::writer::Writer::start(store.clone(), move |w| {
            let _ = report.send(Event::Written(w));
        })?;
        let mut s = Scheduler {
            writer,
            write_retry: None,
            circuit: Circuit::new(
                cfg.circuit_breaker.failure_threshold,
                Duration::from_secs_f64(cfg.circuit_breaker.cooldown),
            ),
            bucket: Bucket::new(cfg.performance.max_requests_per_minute, now),
            cache: cache_for(&cfg),
            notifier,
            last_dump: None,
            dump_due: None,
            max_prompt: Arc::new(AtomicU64::new(cfg.limits.max_prompt_size)),
            shared,
            publish_due: true,
            metrics_saved: None,
            mode,
            jobs_rx,
            worker_states: Vec::new(),
            workers: 0,
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
            in_flight: 0,
            seq: 0,
            stats: Stats::default(),
            shutdown: None,
            save_error: None,
            unavailable: false,
            refused: false,
            rng: seed(),
        };
        s.resize_pool(s.cfg.performance.max_concurrent as usize)?;
        s.restore_metrics();
        Ok(s)
    }

    /// Grows the pool with new threads, or shrinks it by retiring idle
    /// workers; a running agent is never interrupted.
    fn resize_pool(&mut self, target: usize) -> std::io::Result<()> {
        while self.workers < target {
            let st = Arc::new(WorkerState::default());
            spawn_worker(
                self.worker_states.len(),
                self.jobs_rx.clone(),
                self.events_tx.clone(),
                st.clone(),
            )?;
            self.worker_states.push(st);
            self.workers += 1;
        }
        while self.workers > target {
            let _ = self.jobs.send(JobMsg {
                task: String::new(),
                seq: 0,
                job: Job::Retire,
            });
            self.workers -= 1;
        }
        Ok(())
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn task_count(&self) -> usize {
        self.slots.len()
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
                cache_key: None,
                cancel_pending: false,
                read_failures: 0,
                published: Arc::new(TaskState::new("", "", "")),
            },
        );
    }

    /// One line for systemd's STATUS= and logs.
    pub fn status_line(&self) -> String {
        let mut by = BTreeMap::new();
        for s in self.slots.values() {
            *by.entry(s.state.status.as_str()).or_insert(0) += 1;
        }
        let tasks: Vec<String> = by.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!(
            "{}/{} workers busy; tasks: {}; circuit {}",
            self.in_flight,
            self.workers,
            if tasks.is_empty() {
                "none".into()
            } else {
                tasks.join(", ")
            },
            self.circuit.label()
        )
    }

    pub fn run(mut self) -> Finished {
        loop {
            self.dispatch();
            self.flush();
            let now = Instant::now();
            self.notifier.tick(now);
            self.shared.tick();
            METRICS
                .queue_depth
                .store(self.ready.len() as u64, Ordering::Relaxed);
            METRICS
                .circuit_open
                .store(self.circuit.is_open() as u64, Ordering::Relaxed);
            self.publish();
            self.save_metrics(false);
            if self.notifier.enabled() {
                let line = self.status_line();
                self.notifier.status(line);
            }
            let busy = self.in_flight > 0;
            if !busy && self.shutdown.is_some() {
                break;
            }
            if !busy
                && self.mode == Mode::Run
                && self.slots.values().all(|s| s.phase == Phase::Finished)
            {
                break;
            }
            let next = self.next_wake(now);
            // Wake at least every tick so /health can tell a live scheduler.
            let timeout = next
                .map_or(self.shared.tick_every, |t| t.saturating_duration_since(now))
                .min(self.shared.tick_every);
            match self.events.recv_timeout(timeout) {
                Ok(ev) => {
                    self.handle(ev);
                    // Everything already queued is handled before the next
                    // flush, so one batch carries all their state changes.
                    while let Ok(ev) = self.events.try_recv() {
                        self.handle(ev);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.timers();
        }
        self.flush();
        self.writer.finish();
        while let Ok(ev) = self.events.try_recv() {
            if let Event::Written(w) = ev {
                if let Some(e) = w.error {
                    log::error!(
                        "{e}: the last state of these tasks is not on disk: {:?}",
                        w.failed
                    );
                }
            }
        }
        self.publish();
        self.save_metrics(true);
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

    fn next_wake(&mut self, now: Instant) -> Option<Instant> {
        let gates =
            if self.ready.is_empty() || self.shutdown.is_some() || self.in_flight >= self.workers {
                None
            } else {
                self.bucket
                    .wait(now)
                    .into_iter()
                    .chain(self.circuit.reopens_at())
                    .max()
            };
        let timers = self.slots.values().filter_map(|s| match s.phase {
            Phase::Waiting(t) if self.shutdown.is_none() => Some(t),
            _ => None,
        });
        let mut next: Vec<Instant> = timers.collect();
        next.extend(self.next_summary);
        next.extend(self.shutdown.map(|(t, _)| t).filter(|_| self.in_flight > 0));
        next.extend(gates);
        next.extend(self.notifier.next_watchdog);
        next.extend(self.dump_due);
        next.extend(self.write_retry.as_ref().map(|(t, _)| *t));
        next.into_iter().min()
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
        if self.dump_due.is_some_and(|t| t <= now) {
            self.dump_due = None;
            self.dump();
        }
        if self.write_retry.as_ref().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, ids)) = self.write_retry.take() {
                for id in ids {
                    if let Some(s) = self.slots.get_mut(&id) {
                        s.dirty = true;
                    }
                }
            }
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Control(Control::Shutdown { grace, signal }) => {
                let grace = grace.unwrap_or_else(|| {
                    Duration::from_secs_f64(self.cfg.orchestrator.shutdown_grace)
                });
                if self.shutdown.is_none() {
                    log::info!(
                        "signal {signal}: stopping; {} running request(s) get {:.1} s to finish",
                        self.in_flight,
                        grace.as_secs_f64()
                    );
                    self.shutdown = Some((Instant::now() + grace, signal));
                    self.notifier.stopping();
                    self.shared.stopping.store(true, Ordering::SeqCst);
                    self.ready.clear();
                    if grace.is_zero() {
                        self.cancel_all(CancelReason::Shutdown);
                    }
                } else {
                    log::info!("signal {signal} again: stopping running requests now");
                    self.cancel_all(CancelReason::Shutdown);
                }
            }
            Event::Control(Control::Dump) => {
                let now = Instant::now();
                match self.last_dump {
                    Some(t) if now < t + DUMP_EVERY => {
                        self.dump_due.get_or_insert(t + DUMP_EVERY);
                    }
                    _ => self.dump(),
                }
            }
            Event::Control(Control::Submit { state, entry }) => self.submit(*state, entry),
            Event::Control(Control::Cancel { id, request }) => self.cancel(&id, request),
            Event::Control(Control::Reload(cfg)) => self.reload(*cfg),
            Event::Written(w) => self.written(w),
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
                    JobResult::Agent(o) => {
                        METRICS.active.fetch_sub(1, Ordering::Relaxed);
                        self.record_metrics(&o);
                        self.agent_done(&task, o)
                    }
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
            let Some(id) = self.ready.front().cloned() else {
                break;
            };
            if self.slots.get(&id).map(|s| s.phase) != Some(Phase::Ready) {
                self.ready.pop_front();
                continue;
            }
            // Closed gates keep the task at the head of the queue, unspent.
            let now = Instant::now();
            let circuit_ok = self.mode == Mode::Run || self.circuit.allows(now);
            if !circuit_ok || self.bucket.wait(now).is_some() {
                if !circuit_ok {
                    self.stats.paused_by_circuit += 1;
                } else {
                    self.bucket.limited_total += 1;
                }
                break;
            }
            self.ready.pop_front();
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let msg = format!("cannot read prompt file {prompt_path}: {e}");
                return self.finish(id, Status::Failed, "prompt_unreadable", Some(msg));
            }
            Err(e) => {
                // Out of descriptors, I/O trouble: wait and try again, the
                // task keeps its iteration and its place.
                slot.read_failures += 1;
                let delay = rules::retry_delay(
                    cfg.adapter.retry_delay.max(0.1),
                    slot.read_failures,
                    cfg.adapter.max_retry_delay.max(0.1),
                    0.0,
                );
                let msg = format!("cannot read prompt file {prompt_path}: {e}");
                if slot.read_failures == 1 {
                    log::warn!(task = id; "{msg}; trying again with growing delays");
                } else {
                    log::debug!(task = id; "{msg}; trying again in {:.1} s", delay.as_secs_f64());
                }
                slot.state.last_error = Some(msg);
                slot.dirty = true;
                slot.phase = Phase::Waiting(Instant::now() + delay);
                return;
            }
        };
        if slot.read_failures > 0 {
            log::info!(task = id; "prompt file readable again after {} failed reads", slot.read_failures);
            slot.read_failures = 0;
        }
        let new_iteration = slot.retries_now == 0 && !slot.rerun;
        // Before every attempt: an interrupted or failed attempt may already
        // have finished the task, and a complete task never runs again.
        if prompt_complete(&raw, &cfg.orchestrator.completion_marker) {
            slot.state.in_progress = None;
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
        let key = self
            .cache
            .as_ref()
            .map(|_| cache::key(&req.program, &req.args, &req.workdir, &prompt.text));
        slot.cache_key = key;
        if by_reference {
            log::info!(task = id, iteration = it; "the instruction would exceed one argument's 128 KiB; telling the agent to read {prompt_path}");
        }
        log::info!(task = id, iteration = it; "starting agent (attempt {attempt}): {}", req.shown);
        log::debug!(task = id, iteration = it; "prompt: {}", String::from_utf8_lossy(&prompt.text));
        slot.phase = Phase::Running {
            seq,
            since: Instant::now(),
        };
        let now = Instant::now();
        if let (Some(c), Some(k)) = (self.cache.as_mut(), key) {
            if let Some(hit) = c.get(k, now) {
                log::info!(task = id, iteration = it; "identical request answered from the cache (cache.enabled); no agent started");
                if let Some(path) = &req.transcript {
                    let note = format!(
                        "=== iteration {it}: answered from the response cache, no agent was started\n"
                    );
                    let _ = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .and_then(|mut f| std::io::Write::write_all(&mut f, note.as_bytes()));
                }
                return self.agent_done(id, hit);
            }
        }
        self.bucket.take(now);
        if self.mode == Mode::Daemon {
            self.circuit.dispatched();
        }
        METRICS.active.fetch_add(1, Ordering::Relaxed);
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
        let key = slot.cache_key.take();
        let now = Instant::now();
        if self.mode == Mode::Daemon {
            match verdict {
                Verdict::Success => {
                    if self.circuit.is_open() {
                        log::info!("circuit breaker closed: requests succeed again");
                    }
                    self.circuit.success();
                }
                Verdict::Retry | Verdict::Failed if self.circuit.failure(now, &detail) => {
                    log::warn!(
                        "circuit breaker open after {} failed requests in a row (last: {detail}); no requests for {:.0} s",
                        self.cfg.circuit_breaker.failure_threshold,
                        self.cfg.circuit_breaker.cooldown
                    );
                }
                _ => {}
            }
        }
        if let (Verdict::Success, Some(c), Some(k)) = (&verdict, self.cache.as_mut(), key) {
            c.put(k, o.clone(), now);
        }
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
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
                METRICS.iterations_success.fetch_add(1, Ordering::Relaxed);
                if o.marker_seen {
                    return self.finish(id, Status::Completed, "output_marker", None);
                }
                self.after_iteration(id);
            }
            Verdict::Retry => {
                METRICS.retries.fetch_add(1, Ordering::Relaxed);
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
                METRICS.iterations_failure.fetch_add(1, Ordering::Relaxed);
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
                slot.state.last_error = Some(detail.clone());
                if self.mode == Mode::Daemon {
                    // Not the task's fault: it keeps its place and waits.
                    slot.phase = Phase::Ready;
                    self.ready.push_front(id.to_string());
                    if self.circuit.trip(now, &detail) {
                        log::error!(
                            "{detail}; no agent requests for {:.0} s (circuit_breaker.cooldown), then one probe; tasks wait",
                            self.cfg.circuit_breaker.cooldown
                        );
                    }
                    return;
                }
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
        if slot.cancel_pending && !finishing {
            slot.phase = Phase::Waiting(Instant::now());
            return self.finish(id, Status::Cancelled, "cancelled", None);
        }
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
    /// Hands every changed record to the writer as one batch.
    fn flush(&mut self) {
        let now = Instant::now();
        let mut batch = Vec::new();
        for s in self.slots.values_mut().filter(|s| s.dirty) {
            if let Some(t) = s.active_since {
                s.state.runtime_secs += now.duration_since(t).as_secs_f64();
                s.active_since = (s.phase != Phase::Finished).then_some(now);
            }
            s.state.updated_at = now_rfc3339();
            match serde_json::to_vec_pretty(&s.state) {
                Ok(json) => batch.push((s.state.id.clone(), json)),
                Err(e) => log::error!(task = s.state.id.as_str(); "cannot encode task state: {e}"),
            }
            s.dirty = false;
            s.published = Arc::new(s.state.clone());
            self.publish_due = true;
        }
        if !batch.is_empty() {
            self.writer.send(batch);
        }
    }

    /// A batch is on disk, or some of it could not be written: those are
    /// written again a second later, and /health says so meanwhile.
    fn written(&mut self, w: crate::store::writer::Written) {
        if !w.failed.is_empty() {
            let retry = self
                .write_retry
                .get_or_insert((Instant::now() + Duration::from_secs(1), Vec::new()));
            retry.1.extend(w.failed);
        }
        // A good batch does not clear the alarm while a retry is pending.
        let error = w.error.or_else(|| {
            self.write_retry
                .as_ref()
                .and_then(|_| self.save_error.clone())
        });
        if error != self.save_error {
            match &error {
                Some(e) => {
                    log::error!("{e}; will retry (check that the state directory is writable)")
                }
                None => log::info!("task state is being written again"),
            }
            self.shared.set_save_error(error.clone());
            self.save_error = error;
        }
    }

    /// Gives readers (HTTP) a fresh view when anything they show changed.
    fn publish(&mut self) {
        let key = (
            self.in_flight,
            self.ready.len(),
            self.circuit.label(),
            self.workers,
        );
        let snap = self.shared.snapshot();
        let same = (
            snap.workers_busy,
            snap.queue_depth,
            snap.circuit,
            snap.workers_total,
        ) == key;
        if !self.publish_due && same {
            return;
        }
        self.publish_due = false;
        self.shared.publish(Snapshot {
            tasks: self.slots.values().map(|s| s.published.clone()).collect(),
            workers_total: self.workers,
            workers_busy: self.in_flight,
            queue_depth: self.ready.len(),
            circuit: self.circuit.label(),
            circuit_reason: self.circuit.reason.clone(),
            rate_per_minute: self.bucket.per_minute(),
            rate_tokens: self.bucket.tokens(),
        });
    }

    fn record_metrics(&self, o: &AgentOutcome) {
        use crate::agent::Ending;
        METRICS.request_done(o.duration.as_secs_f64());
        let kind = match &o.ending {
            Ending::TimedOut => Some("timeout"),
            Ending::IdleTimedOut => Some("idle_timeout"),
            Ending::Exited(0) => None,
            Ending::Exited(_) => Some("nonzero_exit"),
            Ending::Signaled(_) => Some("signaled"),
            Ending::SpawnFailed(_) | Ending::Unavailable(_) => Some("spawn_failed"),
            Ending::Cancelled => Some("cancelled"),
            Ending::RuntimeExceeded | Ending::ShutDown => None,
        };
        if let Some(k) = kind {
            METRICS.error(k);
        }
        if o.truncated() {
            METRICS.error("output_truncated");
        }
    }

    fn metrics_path(&self) -> PathBuf {
        self.store.state_dir().join("metrics.json")
    }

    /// Counters continue across restarts: add what the last process saved.
    fn restore_metrics(&mut self) {
        let Ok(bytes) = std::fs::read(self.metrics_path()) else {
            return;
        };
        match serde_json::from_slice::<crate::metrics::Totals>(&bytes) {
            Ok(t) => {
                METRICS.restore(&t);
                self.metrics_saved = Some((Instant::now(), METRICS.totals()));
            }
            Err(e) => log::warn!(
                "{}: {e}; counters start from zero",
                self.metrics_path().display()
            ),
        }
    }

    /// Saves the counters at most once a second (and at the end), and only
    /// when they moved.
    fn save_metrics(&mut self, now_regardless: bool) {
        let totals = METRICS.totals();
        if let Some((at, last)) = &self.metrics_saved {
            if *last == totals || (!now_regardless && at.elapsed() < Duration::from_secs(1)) {
                return;
            }
        }
        if let Ok(json) = serde_json::to_vec(&totals) {
            if crate::store::write_atomic(&self.metrics_path(), &json).is_ok() {
                self.metrics_saved = Some((Instant::now(), totals));
            }
        }
    }

    fn dump(&mut self) {
        let now = Instant::now();
        self.last_dump = Some(now);
        let workers: Vec<super::diagnostics::WorkerView> = self
            .worker_states
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.retired.load(Ordering::SeqCst))
            .map(|(i, w)| super::diagnostics::WorkerView {
                index: i,
                job: w.job.lock().ok().and_then(|j| j.clone()),
            })
            .collect();
        let view = super::diagnostics::View {
            workers_target: self.workers,
            workers,
            in_flight: self.in_flight,
            ready: self.ready.len(),
            stats: &self.stats,
            circuit: &self.circuit,
            bucket: &self.bucket,
            cache_entries: self.cache.as_ref().map(|c| c.len()),
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
        };
        let text = super::diagnostics::render(&view);
        let json = super::diagnostics::to_json(&view);
        for line in text.lines() {
            log::info!("diagnostics: {line}");
        }
        let dir = self.store.state_dir().join("diagnostics");
        let name = format!("{}.json", crate::timefmt::now_rfc3339().replace(':', ""));
        let path = dir.join(&name);
        let written = std::fs::create_dir_all(&dir)
            .and_then(|_| crate::store::write_atomic(&path, json.as_bytes()));
        match written {
            Ok(()) => log::info!("diagnostics written to {}", path.display()),
            Err(e) => log::warn!("cannot write diagnostics to {}: {e}", path.display()),
        }
        prune_dir(&dir, KEEP_DUMPS);
    }

    fn submit(&mut self, state: TaskState, entry: PathBuf) {
        let id = state.id.clone();
        if let Some(existing) = self.slots.get(&id) {
            if existing.state.source.is_some() && existing.state.source == state.source {
                // Taken before a crash that kept the entry: nothing new.
                let _ = std::fs::remove_file(&entry);
            } else {
                let spool = entry.parent().map(PathBuf::from).unwrap_or_default();
                let reason = format!("a task with id {id:?} already exists");
                match crate::store::spool::reject(&spool, &entry, &reason) {
                    Ok(d) => {
                        log::warn!("spool entry rejected: {reason} (moved to {})", d.display())
                    }
                    Err(e) => log::error!(
                        "spool entry {} rejected ({reason}) but cannot be moved: {e}",
                        entry.display()
                    ),
                }
            }
            return;
        }
        if let Err(e) = self.store.save(&state) {
            log::error!(task = id.as_str(); "cannot record submitted task: {e}; the spool entry {} stays and is tried again", entry.display());
            return;
        }
        if let Err(e) = std::fs::remove_file(&entry) {
            log::warn!(task = id.as_str(); "task recorded, but its spool entry {} cannot be removed: {e}", entry.display());
        }
        log::info!(task = id.as_str(); "task accepted from the spool: prompt {}, workdir {}", state.prompt_file, state.workdir);
        self.adopt(state);
    }

    fn cancel(&mut self, id: &str, request: PathBuf) {
        let _ = std::fs::remove_file(&request);
        let Some(slot) = self.slots.get_mut(id) else {
            log::warn!("cancel request for unknown task {id:?} ignored");
            return;
        };
        match slot.phase {
            Phase::Finished => {
                log::info!(task = id; "cancel request ignored: the task already ended {}", slot.state.status.as_str())
            }
            Phase::Running { .. } => {
                log::info!(task = id; "cancelling: stopping the running agent");
                if let Some(c) = &slot.cancel {
                    c.request(CancelReason::Cancel);
                }
            }
            Phase::Checkpointing { .. } => slot.cancel_pending = true,
            Phase::Ready | Phase::Waiting(_) => {
                slot.state.in_progress = None;
                self.finish(id, Status::Cancelled, "cancelled", None);
            }
        }
    }

    fn reload(&mut self, cfg: Config) {
        if cfg.paths.state_dir != self.cfg.paths.state_dir {
            log::warn!(
                "reload: paths.state_dir cannot change while running; restart to move the state"
            );
        }
        self.stream_output = cfg.logging.verbose;
        self.circuit.configure(
            cfg.circuit_breaker.failure_threshold,
            Duration::from_secs_f64(cfg.circuit_breaker.cooldown),
        );
        self.bucket
            .configure(cfg.performance.max_requests_per_minute);
        if cfg.cache != self.cfg.cache {
            self.cache = cache_for(&cfg);
        }
        self.max_prompt
            .store(cfg.limits.max_prompt_size, Ordering::Relaxed);
        self.shared.set_command(&cfg.adapter.effective_command());
        self.shared.set_check_every(Duration::from_secs_f64(
            cfg.monitoring.health_check_interval,
        ));
        let interval = cfg.monitoring.metrics_interval;
        self.next_summary =
            (interval > 0.0).then(|| Instant::now() + Duration::from_secs_f64(interval));
        let target = cfg.performance.max_concurrent as usize;
        let before = self.workers;
        let paths = self.cfg.paths.clone();
        self.cfg = cfg;
        self.cfg.paths = paths;
        if let Err(e) = self.resize_pool(target) {
            log::error!(
                "reload: cannot start more workers: {e}; running with {}",
                self.workers
            );
        }
        log::info!(
            "configuration reloaded; workers {before} -> {}",
            self.workers
        );
        self.notifier.ready(&self.status_line());
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

fn cache_for(cfg: &Config) -> Option<Cache> {
    cfg.cache.enabled.then(|| {
        Cache::new(
            cfg.cache.max_size as usize,
            Duration::from_secs_f64(cfg.cache.ttl),
        )
    })
}

/// Keeps the newest `keep` files of a directory (names sort by time).
fn prune_dir(dir: &std::path::Path, keep: usize) {
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

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32) | 1
}

//! The scheduler: the one owner of task state. It decides what runs next,
//! hands jobs to workers, judges their results, keeps timers, and writes every
//! state change to disk in batches.

mod control;
mod persist;
mod results;

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
    /// Freed memory was handed back since the last job ended.
    trimmed: bool,
    seq: u64,
    stats: Stats,
    stream_output: bool,
    shutdown: Option<(Instant, i32)>,
    next_summary: Option<Instant>,
    save_error: Option<String>,
    unavailable: bool,
    refused: bool,
    rng: u64,
    /// What this state directory's agents carry in `RALPH_QCHAT_OWNER`.
    owner: String,
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
        let owner = request::owner_prefix(store.state_dir());
        let tick = crate::store::writer::TICK;
        let writer = crate::store::writer::Writer::start(store.clone(), tick, move |w| {
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
            trimmed: true,
            seq: 0,
            stats: Stats::default(),
            shutdown: None,
            save_error: None,
            unavailable: false,
            refused: false,
            rng: seed(),
            owner,
        };
        s.end_leftovers();
        s.resize_pool(s.cfg.performance.max_concurrent as usize)?;
        s.restore_metrics();
        Ok(s)
    }

    /// Ends whatever agents of an earlier instance on this state directory
    /// still run (it was killed with -9, or died). The state lock is ours, so
    /// every process carrying this directory's marker is such a leftover —
    /// including those of an agent started just before the kill, whose
    /// iteration had not reached state.json yet.
    fn end_leftovers(&self) {
        let mut by_task: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (task, pid) in crate::agent::kill_leftovers(&self.owner) {
            by_task.entry(task).or_default().push(pid);
        }
        for (task, pids) in by_task {
            log::warn!(task = task.as_str();
                "ended {} leftover agent processes of an earlier instance: {pids:?}",
                pids.len());
        }
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
                log::warn!(task = id, iteration = k;
                    "iteration {k} was interrupted; running it again");
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
            if busy {
                self.trimmed = false;
            } else if !self.trimmed {
                self.trimmed = true;
                release_free_memory();
            }
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
        self.save_metrics(true);
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
            owner: &self.owner,
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

    fn jitter(&mut self) -> f64 {
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Hands the heap's free pages back to the kernel. glibc keeps what its
/// per-thread arenas freed for reuse; after a busy spell (twenty workers
/// allocating and freeing per request) the pages scattered between live
/// allocations stay resident and RSS creeps up without anything leaking.
/// Done when the last job ends, so an idle daemon shows its real size.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own arenas.
    unsafe { libc::malloc_trim(0) };
}

fn cache_for(cfg: &Config) -> Option<Cache> {
    cfg.cache.enabled.then(|| {
        Cache::new(
            cfg.cache.max_size as usize,
            Duration::from_secs_f64(cfg.cache.ttl),
        )
    })
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32) | 1
}

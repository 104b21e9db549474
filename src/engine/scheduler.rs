//! The scheduler: the one owner of task state. It holds the task map and each
//! task's place in the loop, decides what runs next, hands jobs to the pool,
//! judges their results and keeps the timers. Whether a request may go is the
//! gates' question; what is written when is `persist`'s.

use super::account::{Account, MAX_PAUSE, unix_now};
use super::diagnostics::{self, TaskView, Throttle, View};
use super::gates::{Closed, Gates};
use super::msg::{Control, Event, Job, JobResult, PromptCheck, Shared, Snapshot};
use super::notify::Notifier;
use super::past::Past;
use super::persist::Persist;
use super::pool::Pool;
use super::request::{self, Inputs};
use super::slot::{Phase, Slot};
use super::stats::{self, Stats};
use super::trees::{self, Trees};
use crate::agent::Containment;
use crate::agent::checkpoint::{CheckpointJob, Done};
use crate::agent::classify::Rules;
use crate::agent::instruction::{self, Prompt};
use crate::agent::{AgentOutcome, Cancel, CancelReason, Class};
use crate::config::Config;
use crate::metrics::METRICS;
use crate::store::TaskStore;
use crate::store::pauses::{self, Pause, PauseKind};
use crate::task::completion::prompt_complete;
use crate::task::rules::{self, Limits, Verdict};
use crate::task::{Status, TaskState};
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

/// How the scheduler stopped.
pub struct Finished {
    pub tasks: Vec<TaskState>,
    /// The signal that stopped it, if one did.
    pub signal: Option<i32>,
    /// Set when a task failed because the agent command cannot run.
    pub unavailable: bool,
    pub refused: bool,
}

/// An attempt that passed the checks before it: what the agent is given.
struct Attempt {
    prompt: Prompt,
    new_iteration: bool,
    next: u64,
    /// Seconds left of the task's max_runtime.
    remaining: f64,
}

pub struct Scheduler {
    /// Containment of every attempt, for the dump.
    contain: Arc<Containment>,
    cfg: Config,
    mode: Mode,
    store: TaskStore,
    slots: BTreeMap<String, Slot>,
    ready: VecDeque<String>,
    /// Working trees of started tasks: no two tasks run in one.
    trees: Trees,
    /// Finished tasks out of `slots`: the last few, and counts.
    past: Past,
    pool: Pool,
    gates: Gates,
    persist: Persist,
    notifier: Notifier,
    shared: Arc<Shared>,
    events: Receiver<Event>,
    events_tx: Sender<Event>,
    /// Shared with the spool intake, which checks sizes before we see a task.
    pub max_prompt: Arc<AtomicU64>,
    /// Shared with the intake, which prunes spool/rejected.
    pub rejected: Arc<super::intake::Retention>,
    dumps: Throttle,
    stats: Stats,
    /// Set when something readers see has changed since the last publish.
    publish_due: bool,
    /// Freed memory was handed back since the last job ended.
    trimmed: bool,
    seq: u64,
    /// Passes of the loop: a dispatch, then the events that arrive.
    pass: u64,
    stream_output: bool,
    shutdown: Option<(Instant, i32)>,
    next_summary: Option<Instant>,
    unavailable: bool,
    refused: bool,
    rng: u64,
    /// What this state directory's agents carry in `RALPH_QCHAT_OWNER`.
    owner: String,
    /// The profile's and the operator's outcome rules.
    rules: Arc<Rules>,
    /// The sequence number of the running preflight, and its cancel.
    preflight_seq: Option<u64>,
    preflight_cancel: Option<Arc<Cancel>>,
}

/// The pool's tag of a preflight job: no task has an empty id.
const PREFLIGHT: &str = "";

/// The limits that apply to a task: its own where its spec set them.
fn limits(cfg: &Config, s: &TaskState) -> Limits {
    let o = &cfg.orchestrator;
    Limits {
        max_iterations: s.max_iterations.unwrap_or(o.max_iterations),
        max_runtime: s.max_runtime.unwrap_or(o.max_runtime),
        max_consecutive_failures: o.max_consecutive_failures,
        max_retries: cfg.adapter.max_retries,
        max_credits: o.max_credits,
        max_cost_usd: o.max_cost_usd,
    }
}

impl Scheduler {
    pub fn new(
        cfg: Config,
        store: TaskStore,
        mode: Mode,
        notifier: Notifier,
        shared: Arc<Shared>,
        contain: Arc<Containment>,
    ) -> std::io::Result<Scheduler> {
        let (events_tx, events) = crossbeam_channel::unbounded();
        let interval = cfg.monitoring.metrics_interval;
        let owner = request::owner_prefix(store.state_dir());
        let persist = Persist::start(&store, events_tx.clone())?;
        let (saved, warning) = pauses::load(store.state_dir());
        if let Some(w) = warning {
            log::warn!("{w}");
        }
        let account = Account::new(cfg.adapter.name.as_str(), saved);
        if let Some(p) = account.paused(unix_now()) {
            log::warn!(
                "agent profile {} is paused since an earlier run: {} ({})",
                cfg.adapter.name.as_str(),
                p.message,
                p.remedy
            );
        }
        let mut s = Scheduler {
            rules: request::rules(&cfg),
            preflight_seq: None,
            pass: 0,
            preflight_cancel: None,
            gates: Gates::new(&cfg, mode == Mode::Daemon, Instant::now(), account),
            pool: Pool::new(events_tx.clone(), contain.clone()),
            contain,
            persist,
            notifier,
            dumps: Throttle::default(),
            max_prompt: Arc::new(AtomicU64::new(cfg.limits.max_prompt_size)),
            rejected: {
                let r = Arc::new(super::intake::Retention::default());
                r.set(cfg.paths.keep_rejected, cfg.paths.rejected_max_age);
                r
            },
            shared,
            publish_due: true,
            mode,
            stream_output: cfg.logging.verbose,
            next_summary: (interval > 0.0)
                .then(|| Instant::now() + crate::sys::time::seconds(interval)),
            cfg,
            store,
            slots: BTreeMap::new(),
            ready: VecDeque::new(),
            trees: Trees::default(),
            past: Past::default(),
            events,
            events_tx,
            trimmed: true,
            seq: 0,
            stats: Stats::default(),
            shutdown: None,
            unavailable: false,
            refused: false,
            rng: seed(),
            owner,
        };
        s.end_leftovers();
        s.pool.resize(s.cfg.performance.max_concurrent as usize)?;
        s.persist.restore_metrics();
        s.preflight();
        // /health tells a pause an earlier run left from the first request on.
        s.publish();
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

    pub fn workers(&self) -> usize {
        self.pool.size()
    }

    /// A sender for control messages (signals, clients).
    pub fn sender(&self) -> Sender<Event> {
        self.events_tx.clone()
    }

    /// Takes over a task as found on disk (see `Slot::adopt`); a finished
    /// one with nothing left to do goes straight to the past.
    pub fn adopt(&mut self, state: TaskState) {
        let hook_due = matches!(state.hook.as_deref(), Some("pending" | "running"));
        if state.status.is_finished() && !hook_due && state.in_progress.is_none() {
            self.past.restore(state);
            return;
        }
        let id = state.id.clone();
        let mut slot = Slot::adopt(state);
        if slot.phase == Phase::Ready {
            self.ready.push_back(id.clone());
        }
        let hook = slot.state.hook.clone();
        if hook.as_deref() == Some("running") {
            log::warn!(task = id.as_str(); "the on_task_end hook was running when the last process ended; it is not run again");
            slot.st().hook = Some("interrupted".into());
            slot.dirty = true;
        }
        self.slots.insert(id.clone(), slot);
        if hook.as_deref() == Some("pending") {
            self.ended(&id);
        }
    }

    /// Every task on disk is adopted: the past in the order /tasks shows it.
    pub fn adopted(&mut self) {
        self.past.sort();
    }

    /// One line for systemd's STATUS= and logs.
    pub fn status_line(&self) -> String {
        let mut by = BTreeMap::new();
        for s in self.slots.values() {
            *by.entry(s.state.status.as_str()).or_insert(0) += 1;
        }
        for st in Status::ALL.into_iter().filter(|s| s.is_finished()) {
            let n = self.past.count(st);
            if n > 0 {
                *by.entry(st.as_str()).or_insert(0) += n;
            }
        }
        let tasks: Vec<String> = by.iter().map(|(k, v)| format!("{v} {k}")).collect();
        format!(
            "{}/{} workers busy; tasks: {}; circuit {}",
            self.pool.busy(),
            self.pool.size(),
            if tasks.is_empty() {
                "none".into()
            } else {
                tasks.join(", ")
            },
            self.gates.circuit().label()
        )
    }

    pub fn run(mut self) -> Finished {
        loop {
            self.dispatch();
            self.pass += 1;
            self.flush();
            let now = Instant::now();
            self.notifier.tick(now);
            self.shared.tick();
            METRICS
                .queue_depth
                .store(self.ready.len() as u64, Ordering::Relaxed);
            METRICS
                .circuit_open
                .store(self.gates.circuit().is_open() as u64, Ordering::Relaxed);
            self.publish();
            self.persist.save_metrics(false);
            if self.notifier.enabled() {
                let line = self.status_line();
                self.notifier.status(line);
            }
            let busy = self.pool.busy() > 0;
            if busy {
                self.trimmed = false;
            } else if !self.trimmed {
                self.trimmed = true;
                crate::sys::malloc::release_free_memory();
                self.contain.rest();
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
                    // flush, so one batch carries all their state changes;
                    // only that, so timers run however fast events come.
                    for _ in 0..self.events.len() {
                        match self.events.try_recv() {
                            Ok(ev) => self.handle(ev),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.timers();
        }
        self.flush();
        self.persist.save_metrics(true);
        self.persist.finish();
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
        // Closing the job queue lets the workers go.
        drop(self.pool);
        let past: Vec<TaskState> = self.past.recent().map(|t| (**t).clone()).collect();
        Finished {
            tasks: self
                .slots
                .into_values()
                .map(|s| Arc::unwrap_or_clone(s.state))
                .chain(past)
                .collect(),
            signal: self.shutdown.map(|(_, s)| s),
            unavailable: self.unavailable,
            refused: self.refused,
        }
    }

    fn next_wake(&mut self, now: Instant) -> Option<Instant> {
        let gates = if self.ready.is_empty() || self.shutdown.is_some() || !self.pool.has_room() {
            None
        } else {
            self.gates.next_open(now)
        };
        let timers = self.slots.values().filter_map(|s| match s.phase {
            Phase::Waiting(t) if self.shutdown.is_none() => Some(t),
            _ => None,
        });
        let mut next: Vec<Instant> = timers.collect();
        next.extend(self.next_summary);
        next.extend(
            self.shutdown
                .map(|(t, _)| t)
                .filter(|_| self.pool.busy() > 0),
        );
        next.extend(gates);
        next.extend(self.notifier.next_watchdog);
        next.extend(self.dumps.due());
        next.extend(self.persist.retry_at());
        next.extend(self.gates.account.preflight_at);
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
            let every = crate::sys::time::seconds(self.cfg.monitoring.metrics_interval);
            self.next_summary = Some(now + every);
        }
        if let Some((deadline, _)) = self.shutdown
            && now >= deadline
        {
            self.cancel_all(CancelReason::Shutdown);
        }
        if self.dumps.take_due(now) {
            self.dump();
        }
        let ended = self.gates.account.expire(unix_now());
        if !ended.is_empty() {
            for (profile, p) in &ended {
                log::info!(
                    "agent profile {profile}: quota pause over ({}); resuming",
                    p.message
                );
            }
            self.save_pauses();
        }
        if self.gates.account.preflight_at.is_some_and(|t| t <= now) {
            self.gates.account.preflight_at = None;
            self.preflight();
        }
        for id in self.persist.retry_due(now) {
            if let Some(s) = self.slots.get_mut(&id) {
                s.dirty = true;
            }
        }
    }

    /// A finished task whose last record is on disk leaves the hot set.
    fn retire(&mut self, id: &str) {
        let done = self.slots.get(id).is_some_and(|s| {
            s.phase == Phase::Finished && !s.dirty && s.published.status.is_finished()
        });
        if !done || self.persist.retrying(id) {
            return;
        }
        if let Some(s) = self.slots.remove(id) {
            self.past.push(s.published);
            self.publish_due = true;
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Control(Control::Shutdown { grace, signal }) => self.shut_down(grace, signal),
            Event::Control(Control::Dump) => {
                if self.dumps.asked(Instant::now()) {
                    self.dump();
                }
            }
            Event::Control(Control::Submit { state, entry }) => self.submit(*state, entry),
            Event::Control(Control::Cancel { id, request }) => self.cancel(&id, request),
            Event::Control(Control::Reload(cfg)) => self.reload(*cfg),
            Event::Written(mut w) => {
                let ok = std::mem::take(&mut w.ok);
                self.persist.written(w, &self.shared);
                for id in ok {
                    self.retire(&id);
                }
            }
            Event::Done { task, seq, result } if task == PREFLIGHT => {
                if self.preflight_seq == Some(seq) {
                    self.pool.done();
                    if let JobResult::Agent(o, _, _) = result {
                        self.preflight_done(*o);
                    }
                }
            }
            Event::Done { task, seq, result } => {
                if self.slots.get(&task).and_then(|s| s.phase.job()) != Some(seq) {
                    return;
                }
                self.pool.done();
                match result {
                    JobResult::Agent(o, complete, prompt) => {
                        METRICS.active.fetch_sub(1, Ordering::Relaxed);
                        if let Some(slot) = self.slots.get_mut(&task) {
                            slot.prompt_after = prompt.map(|p| (self.pass, p));
                        }
                        stats::count_in_metrics(&o);
                        self.agent_done(&task, *o, complete);
                        // Kept only for a start in this pass; a task that
                        // waits (a delay, a back-off, a check) or ended
                        // would hold the prompt's bytes until then.
                        let now = Instant::now();
                        if let Some(slot) = self.slots.get_mut(&task)
                            && !matches!(slot.phase, Phase::Ready)
                            && !matches!(slot.phase, Phase::Waiting(t) if t <= now)
                        {
                            slot.prompt_after = None;
                        }
                    }
                    JobResult::Prompt(read) => self.prompt_read(&task, read),
                    JobResult::Checkpoint(d) => self.checkpoint_done(&task, d),
                    JobResult::Command(o) => match self.slots.get(&task).map(|s| s.phase) {
                        Some(Phase::Verifying { reason, .. }) => {
                            self.verify_done(&task, reason, *o)
                        }
                        _ => self.hook_done(&task, *o),
                    },
                }
            }
        }
    }

    fn shut_down(&mut self, grace: Option<Duration>, signal: i32) {
        let grace = grace
            .unwrap_or_else(|| crate::sys::time::seconds(self.cfg.orchestrator.shutdown_grace));
        if self.shutdown.is_some() {
            log::info!("signal {signal} again: stopping running requests now");
            self.cancel_all(CancelReason::Shutdown);
            return;
        }
        log::info!(
            "signal {signal}: stopping; {} running request(s) get {:.1} s to finish",
            self.pool.busy(),
            grace.as_secs_f64()
        );
        self.shutdown = Some((Instant::now() + grace, signal));
        self.notifier.stopping();
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.ready.clear();
        // A preflight is no work of a task's: it need not finish.
        if let Some(c) = &self.preflight_cancel {
            c.request(CancelReason::Shutdown);
        }
        if grace.is_zero() {
            self.cancel_all(CancelReason::Shutdown);
        }
    }

    fn cancel_all(&mut self, reason: CancelReason) {
        if let Some(c) = &self.preflight_cancel {
            c.request(reason);
        }
        for s in self.slots.values() {
            if let (
                Phase::Running { .. }
                | Phase::Verifying { .. }
                | Phase::Checkpointing { .. }
                | Phase::Hook { .. },
                Some(c),
            ) = (s.phase, &s.cancel)
            {
                c.request(reason);
            }
        }
    }

    fn dispatch(&mut self) {
        // In queue order; a task whose tree another task holds keeps its
        // place and the ones behind it go ahead.
        let mut i = 0;
        while self.shutdown.is_none() && self.pool.has_room() {
            let Some(id) = self.ready.get(i).cloned() else {
                break;
            };
            if self.slots.get(&id).map(|s| s.phase) != Some(Phase::Ready) {
                self.ready.remove(i);
                continue;
            }
            if self.tree_taken(&id) {
                i += 1;
                continue;
            }
            // Closed gates keep the task in its place, unspent.
            match self.gates.admit(Instant::now()) {
                Err(Closed::Circuit) => {
                    self.stats.paused_by_circuit += 1;
                    break;
                }
                Err(Closed::Rate | Closed::Account) => break,
                Ok(()) => {}
            }
            self.ready.remove(i);
            self.start(&id);
        }
    }

    /// Whether another started task works in this task's tree (noted on the
    /// task for `status`); else the tree is this task's until it ends.
    fn tree_taken(&mut self, id: &str) -> bool {
        if self.trees.holds(id) {
            return false;
        }
        let Some(slot) = self.slots.get_mut(id) else {
            return false;
        };
        let tree = slot
            .tree
            .get_or_insert_with(|| trees::key(&slot.state.workdir))
            .clone();
        let holder = self.trees.holder(id, &tree).map(str::to_string);
        if slot.state.waits_for != holder {
            if let Some(h) = &holder {
                log::info!(task = id; "waits for task {h}, which works in the same tree as {}", slot.state.workdir);
            }
            slot.st().waits_for = holder.clone();
            slot.dirty = true;
        }
        if holder.is_none() {
            self.trees.take(id, tree);
        }
        holder.is_some()
    }

    /// Starts the next attempt of a ready task: a worker reads its prompt
    /// file first (`prompt_read` goes on from there). A task that goes on
    /// in the pass its last attempt ended in takes the prompt file as that
    /// attempt's worker read it after the attempt, microseconds ago, instead:
    /// a trip to a worker and back per iteration saved (a tenth of the
    /// daemon's CPU per request at high rates). Anything between (a delay,
    /// a verify command, a hook, a checkpoint, a wait for a gate or a
    /// worker) ends the pass, and the file is read again.
    fn start(&mut self, id: &str) {
        let pass = self.pass;
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        if slot.active_since.is_none() {
            slot.active_since = Some(Instant::now());
        }
        if let Some((_, prompt)) = slot.prompt_after.take().filter(|(p, _)| *p == pass) {
            return self.prompt_read(id, Ok(prompt));
        }
        let seq = self.next_seq();
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.phase = Phase::Reading { seq };
        let check = PromptCheck {
            path: PathBuf::from(&slot.state.prompt_file),
            max: self.cfg.limits.max_prompt_size,
            marker: self.cfg.orchestrator.completion_marker.clone(),
        };
        self.pool.send(id, seq, Job::ReadPrompt(check));
    }

    /// The prompt file was read (or not): the attempt goes ahead, or the
    /// task ends or waits and gives its place in the gates back.
    fn prompt_read(&mut self, id: &str, read: std::io::Result<Vec<u8>>) {
        if !self.attempt_from(id, read) {
            self.gates.unreserve();
        }
    }

    /// True when the attempt was launched.
    fn attempt_from(&mut self, id: &str, read: std::io::Result<Vec<u8>>) -> bool {
        let Some(slot) = self.slots.get_mut(id) else {
            return false;
        };
        if slot.cancel_pending {
            slot.cancel_pending = false;
            slot.st().in_progress = None;
            slot.phase = Phase::Waiting(Instant::now());
            self.finish(id, Status::Cancelled, "cancelled", None);
            return false;
        }
        if self.shutdown.is_some() {
            // Not started: the next process starts it.
            slot.phase = Phase::Ready;
            return false;
        }
        let Some(raw) = self.read_prompt(id, read) else {
            return false;
        };
        let Some(attempt) = self.check_attempt(id, raw) else {
            return false;
        };
        let seq = self.next_seq();
        self.launch(id, seq, attempt);
        true
    }

    /// The prompt file's bytes. None when the task ended (the file is gone)
    /// or waits to read it again (out of descriptors, I/O trouble: the task
    /// keeps its iteration and its place).
    fn read_prompt(&mut self, id: &str, read: std::io::Result<Vec<u8>>) -> Option<Vec<u8>> {
        let a = &self.cfg.adapter;
        let slot = self.slots.get_mut(id)?;
        let prompt_path = slot.state.prompt_file.clone();
        match read {
            Ok(raw) => {
                if slot.read_failures > 0 {
                    log::info!(task = id; "prompt file readable again after {} failed reads", slot.read_failures);
                    slot.read_failures = 0;
                }
                Some(raw)
            }
            // Gone, or replaced by something that is not a file (a FIFO
            // would block, /dev/zero never ends): this task's error alone.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput
                ) =>
            {
                let msg = format!("cannot read prompt file {prompt_path}: {e}");
                self.finish(id, Status::Failed, "prompt_unreadable", Some(msg));
                None
            }
            Err(e) => {
                slot.read_failures += 1;
                let delay = rules::retry_delay(
                    a.retry_delay.max(0.1),
                    slot.read_failures,
                    a.max_retry_delay.max(0.1),
                    0.0,
                );
                let msg = format!("cannot read prompt file {prompt_path}: {e}");
                if slot.read_failures == 1 {
                    log::warn!(task = id; "{msg}; trying again with growing delays");
                } else {
                    log::debug!(task = id; "{msg}; trying again in {:.1} s", delay.as_secs_f64());
                }
                slot.st().last_error = Some(msg);
                slot.dirty = true;
                slot.phase = Phase::Waiting(Instant::now() + delay);
                None
            }
        }
    }

    /// Before every attempt: an interrupted or failed attempt may already
    /// have finished the task (a complete task never runs again), a limit may
    /// end it, the prompt may be refused. None when the task ended.
    fn check_attempt(&mut self, id: &str, raw: Vec<u8>) -> Option<Attempt> {
        let cfg = &self.cfg;
        let slot = self.slots.get_mut(id)?;
        let new_iteration = slot.retries_now == 0 && !slot.rerun;
        // A marker whose verification failed at this very iteration stays
        // until the agent has seen the failure: the attempt goes ahead.
        let verified_failed_now = !cfg.orchestrator.verify_command.is_empty()
            && slot.state.verify_failed_at == Some(slot.state.iteration);
        if prompt_complete(&raw, &cfg.orchestrator.completion_marker) && !verified_failed_now {
            slot.st().in_progress = None;
            self.complete(id, "completion_marker");
            return None;
        }
        let limits = limits(cfg, &slot.state);
        let next = slot.state.iteration + u64::from(new_iteration);
        let runtime = slot.runtime();
        if let Some(which) = rules::limit_before(
            if new_iteration { next } else { 0 },
            runtime,
            &slot.state.spent(),
            &limits,
        ) {
            self.finish(id, Status::LimitReached, which, None);
            return None;
        }
        let prompt = match instruction::check_prompt(
            raw,
            cfg.limits.max_prompt_size,
            &cfg.limits.blocked_patterns,
        ) {
            Ok(p) => p,
            Err(refusal) => {
                self.refused = true;
                let msg = format!("{}: {refusal}", slot.state.prompt_file);
                self.finish(id, Status::Failed, "prompt_refused", Some(msg));
                return None;
            }
        };
        if prompt.nul_stripped > 0 {
            log::warn!(task = id; "removed {} NUL byte(s) from the prompt {}", prompt.nul_stripped, slot.state.prompt_file);
        }
        Some(Attempt {
            prompt,
            new_iteration,
            next,
            remaining: limits.max_runtime - runtime,
        })
    }

    /// Records the attempt's start and hands it to a worker (or answers it
    /// from the cache).
    fn launch(&mut self, id: &str, seq: u64, a: Attempt) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.begin(a.new_iteration, a.next);
        let cancel = Arc::new(Cancel::default());
        slot.cancel = Some(cancel.clone());
        let attempt = slot.retries_now + 1;
        let it = slot.state.iteration;
        let (req, by_reference) = request::build(Inputs {
            cfg: &self.cfg,
            owner: &self.owner,
            task: &slot.state,
            prompt: &a.prompt.text,
            attempt,
            remaining_runtime: a.remaining,
            transcript: Some(self.store.transcript_path(id, it)),
            stream: self.stream_output,
            cancel,
            progress: slot.progress.clone(),
            rules: self.rules.clone(),
            state_dir: self.store.state_dir(),
        });
        let key = self.gates.key(&req, &a.prompt.text);
        slot.cache_key = key;
        if by_reference {
            log::info!(task = id, iteration = it; "the instruction would exceed one argument's 128 KiB; telling the agent to read {}", slot.state.prompt_file);
        }
        log::info!(task = id, iteration = it; "starting agent (attempt {attempt}): {}", req.shown);
        log::debug!(task = id, iteration = it; "prompt: {}", String::from_utf8_lossy(&a.prompt.text));
        slot.phase = Phase::Running {
            seq,
            since: Instant::now(),
        };
        if let Some(mut hit) = self.gates.take(key, Instant::now()) {
            // No agent ran: nothing was spent.
            hit.usage = Default::default();
            hit.resources = Default::default();
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
            // No agent ran: the prompt is as the check before found it.
            return self.agent_done(id, hit, false);
        }
        METRICS.active.fetch_add(1, Ordering::Relaxed);
        let check = PromptCheck {
            path: PathBuf::from(&slot.state.prompt_file),
            max: self.cfg.limits.max_prompt_size,
            marker: self.cfg.orchestrator.completion_marker.clone(),
        };
        self.pool
            .send(id, seq, Job::Agent(Box::new(req), Some(check)));
    }

    /// What an agent run means for its task: success, retry, failure, a
    /// wait for the account, or the end of the task.
    fn agent_done(&mut self, id: &str, o: AgentOutcome, complete: bool) {
        self.stats.record_request(&o);
        let delay_base = self.cfg.adapter.retry_delay;
        let delay_cap = self.cfg.adapter.max_retry_delay;
        let jitter = self.jitter();
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let limits = limits(&self.cfg, &slot.state);
        slot.cancel = None;
        let it = slot.state.iteration;
        let verdict = rules::judge(o.class, &o.ending, slot.retries_now, limits.max_retries);
        let detail = describe(&o);
        let now = Instant::now();
        self.gates
            .judged(&verdict, &detail, slot.cache_key.take(), &o, now);
        if o.truncated() {
            log::warn!(task = id, iteration = it; "agent output over limits.max_output_size: {} bytes dropped", o.bytes_dropped);
        }
        if o.class != Class::Stopped {
            slot.st().last_class = Some(o.class.as_str().to_string());
        }
        // Every attempt's cost counts, failed and throttled ones too.
        slot.st().add_spent(&o.usage);
        METRICS.spent(self.cfg.adapter.name.as_str(), &o.usage);
        if !o.resources.is_empty() {
            slot.st().add_used(&o.resources);
            METRICS.used(self.cfg.adapter.name.as_str(), &o.resources);
        }
        slot.dirty = true;
        match verdict {
            Verdict::Success => {
                log::info!(task = id, iteration = it; "agent finished in {:.2} s ({} bytes of output)", o.duration.as_secs_f64(), o.bytes_read);
                slot.succeeded();
                // The agent has seen the failed verification.
                slot.st().verify_failed = None;
                self.gates.account.succeeded();
                self.stats.iterations += 1;
                self.stats.successes += 1;
                METRICS.iterations_success.fetch_add(1, Ordering::Relaxed);
                if o.marker_seen {
                    return self.complete(id, "output_marker");
                }
                let max_stalled = self.cfg.orchestrator.max_stalled_iterations;
                if let Some(n) = slot.progress(o.tree_before, o.tree_after)
                    && max_stalled > 0
                {
                    if n >= max_stalled {
                        let msg = format!(
                            "{n} successful iterations in a row changed neither the prompt file nor the working tree (orchestrator.max_stalled_iterations)"
                        );
                        return self.finish(
                            id,
                            Status::Stalled,
                            "max_stalled_iterations",
                            Some(msg),
                        );
                    }
                    if n > 0 {
                        log::info!(task = id, iteration = it; "iteration changed nothing ({n} in a row, limit {max_stalled})");
                    }
                }
                self.after_iteration(id, complete);
            }
            Verdict::Retry => {
                METRICS.retries.fetch_add(1, Ordering::Relaxed);
                slot.retrying(&detail);
                self.stats.retries += 1;
                let delay = rules::retry_delay(delay_base, slot.retries_now, delay_cap, jitter);
                log::warn!(task = id, iteration = it; "agent {}: {detail}; retry {} of {} in {:.2} s", o.class.as_str(), slot.retries_now, limits.max_retries, delay.as_secs_f64());
                slot.phase = Phase::Waiting(Instant::now() + delay);
            }
            Verdict::Failed => {
                let n = slot.failed(&detail);
                self.stats.iterations += 1;
                self.stats.failures += 1;
                METRICS.iterations_failure.fetch_add(1, Ordering::Relaxed);
                if o.class == Class::ContextLimit {
                    log::error!(task = id, iteration = it; "iteration failed: {detail} (the conversation is too large; not retried; {n} in a row, limit {})", limits.max_consecutive_failures);
                } else {
                    log::error!(task = id, iteration = it; "iteration failed after {} retries: {detail} ({n} in a row, limit {})", limits.max_retries, limits.max_consecutive_failures);
                }
                if n >= limits.max_consecutive_failures {
                    return self.finish(
                        id,
                        Status::Failed,
                        "max_consecutive_failures",
                        Some(detail),
                    );
                }
                self.after_iteration(id, complete);
            }
            Verdict::Throttled => {
                slot.throttled(&detail);
                let hinted = o.wait;
                let n = self.gates.account.throttles_in_row + 1;
                let delay = match hinted {
                    Some(h) => h.min(Duration::from_secs(3600)),
                    None => rules::retry_delay(delay_base.max(0.1), n, delay_cap.max(0.1), jitter),
                };
                self.gates.account.throttle(now, delay);
                log::warn!(task = id, iteration = it; "agent throttled: {detail}; every task waits {:.1} s{} (throttled {n} time(s) in a row); the iteration runs again and is not counted as failed", delay.as_secs_f64(), if hinted.is_some() { " as the message asks" } else { "" });
                slot.phase = Phase::Waiting(now + delay);
            }
            Verdict::Quota | Verdict::Auth => {
                slot.not_counted(&detail);
                slot.phase = Phase::Ready;
                self.ready.push_front(id.to_string());
                let line = o.decided_by.clone().unwrap_or_else(|| detail.clone());
                if verdict == Verdict::Quota {
                    self.pause_quota(&line, o.wait, o.wait_from);
                } else {
                    self.pause_auth(&line);
                }
            }
            Verdict::Unavailable => {
                slot.not_counted(&detail);
                if self.mode == Mode::Daemon {
                    // Not the task's fault: it keeps its place and waits.
                    slot.phase = Phase::Ready;
                    self.ready.push_front(id.to_string());
                    self.gates.unavailable(&detail, now);
                    return;
                }
                self.unavailable = true;
                log::error!(task = id; "{detail}");
                self.finish(id, Status::Failed, "agent_unavailable", Some(detail));
            }
            Verdict::RuntimeOut => {
                slot.st().in_progress = None;
                self.finish(id, Status::LimitReached, "max_runtime", None);
            }
            Verdict::Cancelled => {
                slot.st().in_progress = None;
                self.finish(id, Status::Cancelled, "cancelled", None);
            }
            Verdict::Interrupted => {
                log::warn!(task = id, iteration = it; "agent stopped by shutdown; iteration {it} will run again on the next start");
                slot.phase = Phase::Waiting(Instant::now());
            }
        }
    }

    /// The account is out of requests: every task of the profile waits for
    /// the reset the message names, or `[adapter] quota_pause`.
    fn pause_quota(&mut self, message: &str, hint: Option<Duration>, hint_from: i64) {
        let a = &self.cfg.adapter;
        let wait = hint
            .unwrap_or_else(|| crate::sys::time::seconds(a.quota_pause))
            .min(MAX_PAUSE);
        // A hint counts from when the output was read; a second may have
        // turned since, and the reset is a date.
        let from = if hint.is_some() {
            hint_from
        } else {
            unix_now()
        };
        let until = (from + wait.as_secs().max(1) as i64).max(unix_now() + 1);
        let remedy = format!(
            "waiting until {} ({}); `systemctl reload ralph-qchat` does not end it, removing {} and restarting does",
            crate::sys::time::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(until as u64)),
            if hint.is_some() {
                "the reset the message names"
            } else {
                "adapter.quota_pause"
            },
            pauses::path(self.store.state_dir()).display()
        );
        let new = self.gates.account.pause(Pause {
            kind: PauseKind::Quota,
            until: Some(until),
            message: message.to_string(),
            remedy: remedy.clone(),
            since: unix_now(),
        });
        if new {
            log::warn!(
                "agent profile {}: out of quota: {message}; every task of the profile pauses, {remedy}",
                a.name.as_str()
            );
        }
        self.save_pauses();
        self.publish_due = true;
    }

    /// The agent is not logged in: not retried. `run` ends (an operator is
    /// at the terminal); the daemon pauses the profile until its preflight
    /// passes, checked every preflight_interval and at once on SIGHUP.
    fn pause_auth(&mut self, message: &str) {
        let a = &self.cfg.adapter;
        let hint = a.profile().login_hint;
        let user = crate::sys::proc::user_name().unwrap_or_else(|| "ralph-qchat".into());
        let remedy = format!(
            "run `sudo -u {user} -H {hint}`, then `systemctl reload ralph-qchat` (or wait: checked every {:.0} s)",
            a.preflight_interval
        );
        if self.mode == Mode::Run {
            self.unavailable = true;
            let msg =
                format!("the agent is not logged in: {message}; log in ({hint}) and run again");
            let ids: Vec<String> = self
                .slots
                .iter()
                .filter(|(_, s)| matches!(s.phase, Phase::Ready | Phase::Waiting(_)))
                .map(|(id, _)| id.clone())
                .collect();
            for id in ids {
                self.ready.retain(|r| r != &id);
                self.finish(&id, Status::Failed, "auth", Some(msg.clone()));
            }
            return;
        }
        let new = self.gates.account.pause(Pause {
            kind: PauseKind::Auth,
            until: None,
            message: message.to_string(),
            remedy: remedy.clone(),
            since: unix_now(),
        });
        self.gates.account.preflight_at =
            Some(Instant::now() + crate::sys::time::seconds(a.preflight_interval));
        if new {
            log::error!(
                "agent profile {}: not logged in: {message}; every task of the profile pauses; {remedy}",
                a.name.as_str()
            );
        }
        self.save_pauses();
        self.publish_due = true;
    }

    fn save_pauses(&mut self) {
        if let Err(e) = pauses::save(self.store.state_dir(), &self.gates.account.pauses) {
            log::error!(
                "cannot write {}: {e}; the pause holds until this process ends",
                pauses::path(self.store.state_dir()).display()
            );
        }
        self.publish_due = true;
    }

    /// Runs the profile's preflight (`q whoami`) when it has one; without one,
    /// an auth pause ends and the next attempt is the probe.
    fn preflight(&mut self) {
        let Some(argv) = self.cfg.adapter.effective_preflight() else {
            if self
                .gates
                .account
                .paused(unix_now())
                .is_some_and(|p| p.kind == PauseKind::Auth)
            {
                log::info!(
                    "agent profile {}: no preflight; the next attempt tells whether the login works again",
                    self.cfg.adapter.name.as_str()
                );
                self.gates.account.resume();
                self.save_pauses();
            }
            return;
        };
        if self.preflight_seq.is_some() {
            return;
        }
        let seq = self.next_seq();
        let req = request::preflight(&self.cfg, &argv, self.store.state_dir(), self.rules.clone());
        self.preflight_cancel = Some(req.cancel.clone());
        log::info!("preflight: {}", argv.join(" "));
        self.preflight_seq = Some(seq);
        self.gates.account.preflight_running = true;
        self.pool
            .send(PREFLIGHT, seq, Job::Agent(Box::new(req), None));
    }

    fn preflight_done(&mut self, o: AgentOutcome) {
        self.preflight_seq = None;
        self.preflight_cancel = None;
        self.gates.account.preflight_running = false;
        let a = &self.cfg.adapter;
        match o.class {
            Class::Success => {
                let auth = self
                    .gates
                    .account
                    .paused(unix_now())
                    .is_some_and(|p| p.kind == PauseKind::Auth);
                if auth && let Some(p) = self.gates.account.resume() {
                    log::info!(
                        "agent profile {}: preflight passed; the login pause ({}) is over, tasks resume",
                        a.name.as_str(),
                        p.message
                    );
                    self.save_pauses();
                } else {
                    log::info!("preflight passed");
                }
            }
            Class::Unavailable => {
                // The agent's own start will say so, through the circuit or run's exit.
                log::warn!("preflight cannot run: {}", o.ending.describe());
            }
            Class::Stopped => {}
            _ => {
                let line = o.decided_by.clone().unwrap_or_else(|| describe(&o));
                self.pause_auth(&format!("preflight failed: {line}"));
            }
        }
    }

    /// After an iteration that did not end the task: completion, checkpoint, pause.
    /// `complete`: the prompt file carried the marker after the attempt
    /// (read by the worker).
    fn after_iteration(&mut self, id: &str, complete: bool) {
        let o = &self.cfg.orchestrator;
        let delay = crate::sys::time::seconds(o.iteration_delay);
        let keep = (o.keep_transcripts as usize).max(1);
        let interval = o.checkpoint_interval;
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        // One transcript per iteration: nothing to prune before there are more.
        if slot.state.iteration as usize > keep {
            self.persist.prune_transcripts(id, keep);
        }
        if complete {
            return self.complete(id, "completion_marker");
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
            keep_archived: o.keep_archived_prompts as usize,
            archive_max_age: o.archived_prompt_max_age,
            max_prompt: self.cfg.limits.max_prompt_size,
            git: o.git_checkpoint,
            state_dir: self.store.state_dir().to_path_buf(),
            timeout: crate::sys::time::seconds(o.checkpoint_timeout),
            kill_grace: crate::sys::time::seconds(self.cfg.adapter.kill_grace),
            cancel: Arc::new(Cancel::default()),
        };
        // Shutdown stops a checkpoint that outlives the grace period.
        slot.cancel = Some(job.cancel.clone());
        slot.st().last_checkpoint = slot.state.iteration;
        slot.dirty = true;
        slot.phase = Phase::Checkpointing { seq, finishing };
        self.pool.send(id, seq, Job::Checkpoint(job));
    }

    fn checkpoint_done(&mut self, id: &str, d: Done) {
        let delay = crate::sys::time::seconds(self.cfg.orchestrator.iteration_delay);
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.cancel = None;
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
        if finishing {
            return self.ended(id);
        }
        slot.phase = Phase::Waiting(Instant::now() + delay);
    }

    /// The task says it is complete: verify_command decides, when there is
    /// one.
    fn complete(&mut self, id: &str, reason: &'static str) {
        if self.cfg.orchestrator.verify_command.is_empty() {
            return self.finish(id, Status::Completed, reason, None);
        }
        let seq = self.next_seq();
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let it = slot.state.iteration;
        let transcript = self.store.transcript_path(id, it);
        let req = request::verify(&self.cfg, &self.owner, &slot.state, transcript);
        log::info!(task = id, iteration = it; "the task says it is complete ({reason}); running {}", req.shown);
        slot.cancel = Some(req.cancel.clone());
        slot.phase = Phase::Verifying { seq, reason };
        slot.dirty = true;
        self.pool.send(id, seq, Job::Command(Box::new(req)));
    }

    fn verify_done(&mut self, id: &str, reason: &'static str, o: AgentOutcome) {
        let delay = crate::sys::time::seconds(self.cfg.orchestrator.iteration_delay);
        let failure = crate::engine::request::verify_failure(&self.cfg, &o);
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.cancel = None;
        slot.dirty = true;
        let it = slot.state.iteration;
        match (o.class, &o.ending) {
            (Class::Success, _) => {
                log::info!(task = id, iteration = it; "verification passed in {:.2} s", o.duration.as_secs_f64());
                slot.st().verify_failed = None;
                slot.st().verify_failed_at = None;
                self.finish(id, Status::Completed, reason, None);
            }
            (Class::Stopped, crate::agent::Ending::Cancelled) => {
                self.finish(id, Status::Cancelled, "cancelled", None);
            }
            (Class::Stopped, _) => {
                // Shutdown: verified again on the next start.
                slot.phase = Phase::Waiting(Instant::now());
            }
            _ => {
                let detail = describe(&o);
                log::warn!(task = id, iteration = it; "verification failed: {detail}; the loop goes on and the next instruction carries its output");
                slot.st().last_error = Some(format!("verify_command failed: {detail}"));
                slot.st().verify_failed = Some(failure);
                slot.st().verify_failed_at = Some(it);
                slot.phase = Phase::Waiting(Instant::now() + delay);
            }
        }
    }

    /// Ends a task, with a last checkpoint when it ran since the previous one.
    fn finish(&mut self, id: &str, status: Status, reason: &str, error: Option<String>) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        let msg = slot.end(status, reason, error);
        if !self.cfg.hooks.on_task_end.is_empty() && slot.state.hook.is_none() {
            // Written with the end itself: a crash before the hook ran
            // leaves it to the next start.
            slot.st().hook = Some("pending".into());
        }
        match status {
            Status::Completed | Status::Cancelled => log::info!(task = id; "{msg}"),
            Status::LimitReached | Status::Stalled => log::warn!(task = id; "{msg}"),
            _ => log::error!(task = id; "{msg}"),
        }
        let it = slot.state.iteration;
        let ran_since_checkpoint = slot.state.last_checkpoint < it && it > 0;
        let o = &self.cfg.orchestrator;
        if ran_since_checkpoint
            && (o.git_checkpoint || o.archive_prompts)
            && o.checkpoint_interval > 0
        {
            self.checkpoint(id, true);
        } else {
            self.ended(id);
        }
    }

    /// The task's end is recorded (and its last checkpoint made): its hook
    /// runs, or it is finished.
    fn ended(&mut self, id: &str) {
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        if slot.state.hook.as_deref() == Some("pending") && !self.cfg.hooks.on_task_end.is_empty() {
            return self.start_hook(id);
        }
        slot.phase = Phase::Finished;
        // Written once more as finished, then it leaves the hot set (`retire`).
        slot.dirty = true;
        self.trees.release(id);
    }

    /// Runs the on_task_end hook, once: "running" is on disk before it
    /// starts, so neither a crash nor a restart runs it a second time.
    fn start_hook(&mut self, id: &str) {
        let seq = self.next_seq();
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.st().hook = Some("running".into());
        slot.st().updated_at = crate::sys::time::now_rfc3339();
        if let Err(e) = self.store.save(&slot.state) {
            log::error!(task = id; "cannot record that the on_task_end hook starts: {e}; running it anyway");
        }
        slot.dirty = true;
        let log_path = self.store.task_dir(id).join("hook.log");
        let req = request::hook(
            &self.cfg,
            &self.owner,
            &slot.state,
            self.store.state_dir(),
            log_path,
        );
        log::info!(task = id; "running {}", req.shown);
        slot.cancel = Some(req.cancel.clone());
        slot.phase = Phase::Hook { seq };
        self.pool.send(id, seq, Job::Command(Box::new(req)));
    }

    fn hook_done(&mut self, id: &str, o: AgentOutcome) {
        let timeout = self.cfg.hooks.timeout;
        let log_path = self.store.task_dir(id).join("hook.log");
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        slot.cancel = None;
        let result = match o.class {
            Class::Success => {
                log::info!(task = id; "on_task_end hook done in {:.2} s", o.duration.as_secs_f64());
                "done".to_string()
            }
            Class::Stopped => {
                log::warn!(task = id; "on_task_end hook stopped by shutdown; it is not run again");
                "interrupted".to_string()
            }
            Class::Timeout => {
                let m = format!("failed: timed out after {timeout:.0} s (hooks.timeout)");
                log::warn!(task = id; "on_task_end hook {m}; its output is in {}", log_path.display());
                m
            }
            _ => {
                let m = format!("failed: {}", describe(&o));
                log::warn!(task = id; "on_task_end hook {m}; its output is in {}", log_path.display());
                m
            }
        };
        slot.st().hook = Some(result);
        slot.dirty = true;
        slot.phase = Phase::Finished;
        // Written once more as finished, then it leaves the hot set (`retire`).
        slot.dirty = true;
        self.trees.release(id);
    }

    /// Hands every changed record to the writer as one batch.
    fn flush(&mut self) {
        if self.persist.flush(self.slots.values_mut()) {
            self.publish_due = true;
        }
    }

    /// Publishes the snapshot now, whatever changed (before the port opens).
    pub fn publish_now(&mut self) {
        self.publish_due = true;
        self.publish();
    }

    /// Gives readers (HTTP) a fresh view when anything they show changed.
    fn publish(&mut self) {
        let circuit = self.gates.circuit();
        let key = (
            self.pool.busy(),
            self.ready.len(),
            circuit.label(),
            self.pool.size(),
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
        let bucket = self.gates.bucket();
        let mut tasks: Vec<Arc<TaskState>> = self
            .slots
            .values()
            .map(|s| s.published.clone())
            .chain(self.past.recent().cloned())
            .collect();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        self.shared.publish(Snapshot {
            tasks,
            older: self.past.older(),
            workers_total: self.pool.size(),
            workers_busy: self.pool.busy(),
            queue_depth: self.ready.len(),
            circuit: circuit.label(),
            circuit_reason: circuit.reason.clone(),
            rate_per_minute: bucket.per_minute(),
            rate_tokens: bucket.tokens(),
            pauses: {
                let now = unix_now();
                let a = &self.gates.account;
                a.pauses
                    .iter()
                    .filter(|(k, _)| **k == a.profile && a.paused(now).is_some())
                    .map(|(k, p)| (k.clone(), p.clone()))
                    .collect()
            },
        });
    }

    fn dump(&mut self) {
        self.dumps.made(Instant::now());
        let view = View {
            workers_target: self.pool.size(),
            workers: self.pool.views(),
            in_flight: self.pool.busy(),
            ready: self.ready.len(),
            stats: &self.stats,
            circuit: self.gates.circuit(),
            bucket: self.gates.bucket(),
            account: &self.gates.account,
            cache_entries: self.gates.cache_entries(),
            containment: self.contain.describe(),
            tasks: self
                .slots
                .values()
                .map(|s| TaskView {
                    state: &s.state,
                    phase: s.phase.text(),
                    running_for: match s.phase {
                        Phase::Running { since, .. } => Some(since.elapsed()),
                        _ => None,
                    },
                    retries_now: s.retries_now,
                    progress: &s.progress,
                })
                .collect(),
        };
        diagnostics::write(&view, self.store.state_dir());
    }

    fn submit(&mut self, state: TaskState, entry: PathBuf) {
        let id = state.id.clone();
        // A finished task is no longer in the hot set: its record is.
        let existing = match self.slots.get(&id) {
            Some(s) => Some((s.state.source.clone(), s.state.source_key.clone())),
            None => match self.store.load(&id) {
                Ok(Some(t)) => Some((t.source, t.source_key)),
                Ok(None) => None,
                Err(_) => Some((None, None)),
            },
        };
        if let Some((source, source_key)) = existing {
            if source.is_some() && source == state.source && source_key == state.source_key {
                // Taken before a crash that kept the entry: nothing new.
                let _ = std::fs::remove_file(&entry);
            } else {
                let spool = crate::store::spool::spool_dir(self.store.state_dir());
                let reason = format!(
                    "a task with id {id:?} already exists; drop the prompt under another name (or a spec with another id)"
                );
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
        self.past.forget(&id);
        self.adopt(state);
    }

    fn cancel(&mut self, id: &str, request: PathBuf) {
        let _ = std::fs::remove_file(&request);
        let Some(slot) = self.slots.get_mut(id) else {
            match self.store.load(id) {
                Ok(Some(t)) => {
                    log::info!(task = id; "cancel request ignored: the task already ended {}", t.status.as_str())
                }
                _ => log::warn!("cancel request for unknown task {id:?} ignored"),
            }
            return;
        };
        match slot.phase {
            Phase::Finished => {
                log::info!(task = id; "cancel request ignored: the task already ended {}", slot.state.status.as_str())
            }
            Phase::Running { .. } | Phase::Verifying { .. } => {
                log::info!(task = id; "cancelling: stopping the running agent");
                if let Some(c) = &slot.cancel {
                    c.request(CancelReason::Cancel);
                }
            }
            Phase::Checkpointing { .. } | Phase::Reading { .. } => slot.cancel_pending = true,
            Phase::Hook { .. } => {
                log::info!(task = id; "cancel request ignored: the task already ended {}; its on_task_end hook runs", slot.state.status.as_str())
            }
            Phase::Ready | Phase::Waiting(_) => {
                slot.st().in_progress = None;
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
        if cfg.limits.containment != self.cfg.limits.containment {
            log::warn!(
                "reload: limits.containment cannot change while running (it stays {}); restart to change it",
                self.contain.mode()
            );
        }
        let (l, old) = (&cfg.limits, &self.cfg.limits);
        if (l.max_memory_mb, l.max_processes) != (old.max_memory_mb, old.max_processes) {
            self.contain.set_limits(l.max_memory_mb, l.max_processes);
        }
        self.stream_output = cfg.logging.verbose;
        self.gates.configure(&cfg);
        self.rules = request::rules(&cfg);
        self.gates.account.profile = cfg.adapter.name.as_str().to_string();
        self.max_prompt
            .store(cfg.limits.max_prompt_size, Ordering::Relaxed);
        self.rejected
            .set(cfg.paths.keep_rejected, cfg.paths.rejected_max_age);
        self.shared.set_command(&cfg.adapter.effective_command());
        self.shared.set_check_every(crate::sys::time::seconds(
            cfg.monitoring.health_check_interval,
        ));
        let interval = cfg.monitoring.metrics_interval;
        self.next_summary =
            (interval > 0.0).then(|| Instant::now() + crate::sys::time::seconds(interval));
        let target = cfg.performance.max_concurrent as usize;
        let before = self.pool.size();
        let paths = self.cfg.paths.clone();
        self.cfg = cfg;
        self.cfg.paths = paths;
        if let Err(e) = self.pool.resize(target) {
            log::error!(
                "reload: cannot start more workers: {e}; running with {}",
                self.pool.size()
            );
        }
        log::info!(
            "configuration reloaded; workers {before} -> {}",
            self.pool.size()
        );
        self.notifier.ready(&self.status_line());
        if self
            .gates
            .account
            .paused(unix_now())
            .is_some_and(|p| p.kind == PauseKind::Auth)
        {
            log::info!("reload: checking the login now");
            self.preflight();
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The ending, and the agent's words that decided its class (or its last
/// words when it went wrong).
fn describe(o: &AgentOutcome) -> String {
    if let Some(line) = &o.decided_by {
        let line: String = line.chars().take(300).collect();
        return format!("{} ({}): {line}", o.ending.describe(), o.class.as_str());
    }
    let tail = String::from_utf8_lossy(&o.tail);
    let last = tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    let last: String = last.chars().take(300).collect();
    if last.is_empty() || o.class == Class::Success {
        o.ending.describe()
    } else if o.ending.is_success() {
        // Exit 0 that is not a success: say why.
        format!("exit status 0 ({}): {last}", o.class.as_str())
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

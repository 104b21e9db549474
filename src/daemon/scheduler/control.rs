//! Requests from outside the loop: diagnostics dumps, spool submissions,
//! cancel, configuration reload.

use super::*;

impl Scheduler {
    pub(super) fn dump(&mut self) {
        let now = Instant::now();
        self.last_dump = Some(now);
        let workers: Vec<crate::daemon::diagnostics::WorkerView> = self
            .worker_states
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.retired.load(Ordering::SeqCst))
            .map(|(i, w)| crate::daemon::diagnostics::WorkerView {
                index: i,
                job: w.job.lock().ok().and_then(|j| j.clone()),
            })
            .collect();
        let view = crate::daemon::diagnostics::View {
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
                .map(|s| crate::daemon::diagnostics::TaskView {
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
        let text = crate::daemon::diagnostics::render(&view);
        let json = crate::daemon::diagnostics::to_json(&view);
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

    pub(super) fn submit(&mut self, state: TaskState, entry: PathBuf) {
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

    pub(super) fn cancel(&mut self, id: &str, request: PathBuf) {
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

    pub(super) fn reload(&mut self, cfg: Config) {
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
}

pub(super) fn phase_text(p: Phase) -> String {
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

/// Keeps the newest `keep` files of a directory (names sort by time).
pub(super) fn prune_dir(dir: &std::path::Path, keep: usize) {
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

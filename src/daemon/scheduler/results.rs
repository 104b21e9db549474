//! What an agent run or a checkpoint means for its task: success, retry,
//! failure, the end of the task, checkpoints.

use super::*;

impl Scheduler {
    pub(super) fn agent_done(&mut self, id: &str, o: AgentOutcome) {
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
    pub(super) fn after_iteration(&mut self, id: &str) {
        let marker = self.cfg.orchestrator.completion_marker.clone();
        let interval = self.cfg.orchestrator.checkpoint_interval;
        let delay = Duration::from_secs_f64(self.cfg.orchestrator.iteration_delay);
        let keep = self.cfg.orchestrator.keep_transcripts as usize;
        let Some(slot) = self.slots.get_mut(id) else {
            return;
        };
        // One transcript per iteration: nothing to prune before there are more.
        if slot.state.iteration as usize > keep.max(1) {
            self.writer.prune_transcripts(id, keep.max(1));
        }
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

    pub(super) fn checkpoint(&mut self, id: &str, finishing: bool) {
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

    pub(super) fn checkpoint_done(&mut self, id: &str, d: Done) {
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
    pub(super) fn finish(&mut self, id: &str, status: Status, reason: &str, error: Option<String>) {
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
}

pub(super) fn describe(o: &AgentOutcome) -> String {
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

//! Getting state out of the scheduler: records to the writer, the snapshot
//! for readers on other threads, the metrics and their saved totals.

use super::*;

impl Scheduler {
    /// Hands every changed record to the writer as one batch.
    pub(super) fn flush(&mut self) {
        let now = Instant::now();
        let mut batch = Vec::new();
        // A task that started, ended or paused is written without waiting for
        // the writer's tick: what an operator looks for after a crash.
        let mut urgent = false;
        for s in self.slots.values_mut().filter(|s| s.dirty) {
            urgent |= s.state.status != s.published.status;
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
            self.writer.send(batch, urgent);
        }
    }

    /// A batch is on disk, or some of it could not be written: those are
    /// written again a second later, and /health says so meanwhile.
    pub(super) fn written(&mut self, w: crate::store::writer::Written) {
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
    pub(super) fn publish(&mut self) {
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

    pub(super) fn record_metrics(&self, o: &AgentOutcome) {
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

    pub(super) fn metrics_path(&self) -> PathBuf {
        self.store.state_dir().join("metrics.json")
    }

    /// Counters continue across restarts: add what the last process saved.
    pub(super) fn restore_metrics(&mut self) {
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
    pub(super) fn save_metrics(&mut self, now_regardless: bool) {
        let totals = METRICS.totals();
        if let Some((at, last)) = &self.metrics_saved {
            if *last == totals || (!now_regardless && at.elapsed() < Duration::from_secs(1)) {
                return;
            }
        }
        if let Ok(json) = serde_json::to_vec(&totals) {
            self.writer.save_file(self.metrics_path(), json);
            self.metrics_saved = Some((Instant::now(), totals));
        }
    }
}

//! What the scheduler writes, and when: changed task records go to the
//! writer thread as one batch per turn (a change of status without waiting
//! for its tick), records that could not be written are sent again a second
//! later, and the metrics' totals are saved at most once a second so that
//! counters go on across restarts.

use super::msg::{Event, Shared};
use super::slot::{Phase, Slot};
use crate::metrics::{METRICS, Totals};
use crate::store::TaskStore;
use crate::store::writer::{self, Writer, Written};
use crate::sys::time::now_rfc3339;
use crossbeam_channel::Sender;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct Persist {
    writer: Writer,
    /// Records that could not be written, and when to try them again.
    retry: Option<(Instant, Vec<String>)>,
    /// Why records cannot be written, while they cannot.
    save_error: Option<String>,
    metrics_saved: Option<(Instant, Totals)>,
    metrics_path: PathBuf,
}

impl Persist {
    /// Starts the writer thread; its reports come back as `Event::Written`.
    pub fn start(store: &TaskStore, report: Sender<Event>) -> std::io::Result<Persist> {
        let writer = Writer::start(store.clone(), writer::TICK, move |w| {
            let _ = report.send(Event::Written(w));
        })?;
        Ok(Persist {
            writer,
            retry: None,
            save_error: None,
            metrics_saved: None,
            metrics_path: store.state_dir().join("metrics.json"),
        })
    }

    /// Hands every changed record to the writer as one batch; true when a
    /// record changed (readers need a fresh snapshot).
    pub fn flush<'a>(&mut self, slots: impl Iterator<Item = &'a mut Slot>) -> bool {
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut changed = false;
        // A task that started, ended or paused is written without waiting for
        // the writer's tick: what an operator looks for after a crash.
        let mut urgent = false;
        let mut last = Vec::new();
        for s in slots.filter(|s| s.dirty) {
            if s.phase == Phase::Finished {
                last.push(s.state.id.clone());
            }
            urgent |= s.state.status != s.published.status;
            if let Some(t) = s.active_since {
                s.st().runtime_secs += now.duration_since(t).as_secs_f64();
                s.active_since =
                    (!matches!(s.phase, Phase::Finished | Phase::Hook { .. })).then_some(now);
            }
            s.st().updated_at = now_rfc3339();
            match serde_json::to_vec_pretty(&*s.state) {
                Ok(json) => batch.push((s.state.id.clone(), json)),
                Err(e) => log::error!(task = s.state.id.as_str(); "cannot encode task state: {e}"),
            }
            s.dirty = false;
            s.published = s.state.clone();
            changed = true;
        }
        if !batch.is_empty() {
            self.writer.send(batch, urgent);
        }
        for id in last {
            self.writer.finished(&id);
        }
        changed
    }

    /// A batch is on disk, or some of it could not be written: those are
    /// written again a second later, and /health says so meanwhile.
    pub fn written(&mut self, w: Written, shared: &Shared) {
        if !w.failed.is_empty() {
            let retry = self
                .retry
                .get_or_insert((Instant::now() + Duration::from_secs(1), Vec::new()));
            retry.1.extend(w.failed);
        }
        // A good batch does not clear the alarm while a retry is pending.
        let error = w
            .error
            .or_else(|| self.retry.as_ref().and_then(|_| self.save_error.clone()));
        if error != self.save_error {
            match &error {
                Some(e) => {
                    log::error!("{e}; will retry (check that the state directory is writable)")
                }
                None => log::info!("task state is being written again"),
            }
            shared.set_save_error(error.clone());
            self.save_error = error;
        }
    }

    /// A record of this task waits to be written again.
    pub fn retrying(&self, id: &str) -> bool {
        self.retry
            .as_ref()
            .is_some_and(|(_, ids)| ids.iter().any(|i| i == id))
    }

    /// When records that failed are due to be written again.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry.as_ref().map(|(t, _)| *t)
    }

    /// The tasks whose records are due to be written again.
    pub fn retry_due(&mut self, now: Instant) -> Vec<String> {
        if self.retry.as_ref().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, ids)) = self.retry.take() {
                return ids;
            }
        }
        Vec::new()
    }

    pub fn prune_transcripts(&self, id: &str, keep: usize) {
        self.writer.prune_transcripts(id, keep);
    }

    /// Counters continue across restarts: add what the last process saved.
    pub fn restore_metrics(&mut self) {
        let Ok(bytes) = std::fs::read(&self.metrics_path) else {
            return;
        };
        match serde_json::from_slice::<Totals>(&bytes) {
            Ok(t) => {
                METRICS.restore(&t);
                self.metrics_saved = Some((Instant::now(), METRICS.totals()));
            }
            Err(e) => log::warn!(
                "{}: {e}; counters start from zero",
                self.metrics_path.display()
            ),
        }
    }

    /// Saves the counters at most once a second (and at the end), and only
    /// when they moved.
    pub fn save_metrics(&mut self, now_regardless: bool) {
        let totals = METRICS.totals();
        if let Some((at, last)) = &self.metrics_saved {
            if *last == totals || (!now_regardless && at.elapsed() < Duration::from_secs(1)) {
                return;
            }
        }
        if let Ok(json) = serde_json::to_vec(&totals) {
            self.writer.save_file(self.metrics_path.clone(), json);
            self.metrics_saved = Some((Instant::now(), totals));
        }
    }

    /// Writes what is queued and stops the writer.
    pub fn finish(&mut self) {
        self.writer.finish();
    }
}

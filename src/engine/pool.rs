//! The worker pool: starts workers, grows or shrinks on reload (a running
//! agent is never interrupted: idle workers retire), hands out jobs and
//! counts those in flight.

use super::diagnostics::WorkerView;
use super::msg::{Event, Job, JobMsg};
use super::worker::{WorkerState, spawn_worker};
use crate::agent::Containment;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub struct Pool {
    contain: Arc<Containment>,
    jobs: Sender<JobMsg>,
    jobs_rx: Receiver<JobMsg>,
    events: Sender<Event>,
    states: Vec<Arc<WorkerState>>,
    size: usize,
    busy: usize,
}

impl Pool {
    /// An empty pool whose workers will report to `events`.
    pub fn new(events: Sender<Event>, contain: Arc<Containment>) -> Pool {
        let (jobs, jobs_rx) = crossbeam_channel::unbounded();
        Pool {
            contain,
            jobs,
            jobs_rx,
            events,
            states: Vec::new(),
            size: 0,
            busy: 0,
        }
    }

    /// Grows the pool with new threads, or shrinks it by retiring idle
    /// workers.
    pub fn resize(&mut self, target: usize) -> std::io::Result<()> {
        while self.size < target {
            let st = Arc::new(WorkerState::default());
            spawn_worker(
                self.states.len(),
                self.jobs_rx.clone(),
                self.events.clone(),
                st.clone(),
                self.contain.clone(),
            )?;
            self.states.push(st);
            self.size += 1;
        }
        while self.size > target {
            let _ = self.jobs.send(JobMsg {
                task: String::new(),
                seq: 0,
                job: Job::Retire,
            });
            self.size -= 1;
        }
        Ok(())
    }

    /// Workers the pool is meant to have.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Jobs handed out and not yet reported done.
    pub fn busy(&self) -> usize {
        self.busy
    }

    pub fn has_room(&self) -> bool {
        self.busy < self.size
    }

    /// Queues a job for the next free worker.
    pub fn send(&mut self, task: &str, seq: u64, job: Job) {
        self.busy += 1;
        let msg = JobMsg {
            task: task.to_string(),
            seq,
            job,
        };
        if self.jobs.send(msg).is_err() {
            // Only happens while tearing down; the task resumes next start.
            self.busy -= 1;
        }
    }

    /// A job handed out earlier has reported back.
    pub fn done(&mut self) {
        self.busy -= 1;
    }

    /// What each live worker is doing, for diagnostics.
    pub fn views(&self) -> Vec<WorkerView> {
        self.states
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.retired.load(Ordering::SeqCst))
            .map(|(i, w)| WorkerView {
                index: i,
                job: w.job.lock().ok().and_then(|j| j.clone()),
            })
            .collect()
    }
}

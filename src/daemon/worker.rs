//! Worker threads: each takes one job at a time (an agent run or a
//! checkpoint), does it, and reports back. Workers hold no task state.

use super::scheduler::Event;
use crate::agent::{AgentOutcome, AgentRequest, Supervisor};
use crate::task::checkpoint::{CheckpointJob, Done, checkpoint};
use crossbeam_channel::{Receiver, Sender};
use std::thread::JoinHandle;

pub enum Job {
    Agent(Box<AgentRequest>),
    Checkpoint(CheckpointJob),
    /// The worker that takes this exits (the pool shrank on reload).
    Retire,
}

/// What a worker is doing, for diagnostics: written by the worker at the
/// start and end of each job, read by the scheduler's dumps.
#[derive(Default)]
pub struct WorkerState {
    pub job: std::sync::Mutex<Option<String>>,
    pub retired: std::sync::atomic::AtomicBool,
}

pub struct JobMsg {
    pub task: String,
    pub seq: u64,
    pub job: Job,
}

pub enum JobResult {
    Agent(AgentOutcome),
    Checkpoint(Done),
}

pub fn spawn_worker(
    index: usize,
    jobs: Receiver<JobMsg>,
    events: Sender<Event>,
    state: std::sync::Arc<WorkerState>,
) -> std::io::Result<JoinHandle<()>> {
    let mut supervisor = Supervisor::new()?;
    std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || {
            let set = |what: Option<String>| {
                if let Ok(mut j) = state.job.lock() {
                    *j = what;
                }
            };
            for msg in jobs.iter() {
                let result = match &msg.job {
                    Job::Agent(req) => {
                        set(Some(format!(
                            "agent for task {} iteration {}",
                            req.task_id, req.iteration
                        )));
                        JobResult::Agent(supervisor.run(req))
                    }
                    Job::Checkpoint(job) => {
                        set(Some(format!("checkpoint of task {}", job.task_id)));
                        JobResult::Checkpoint(checkpoint(job))
                    }
                    Job::Retire => break,
                };
                set(None);
                let done = Event::Done {
                    task: msg.task,
                    seq: msg.seq,
                    result,
                };
                if events.send(done).is_err() {
                    break;
                }
            }
            state
                .retired
                .store(true, std::sync::atomic::Ordering::SeqCst);
        })
}

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
) -> std::io::Result<JoinHandle<()>> {
    let mut supervisor = Supervisor::new()?;
    std::thread::Builder::new()
        .name(format!("worker-{index}"))
        .spawn(move || {
            for msg in jobs.iter() {
                let result = match &msg.job {
                    Job::Agent(req) => JobResult::Agent(supervisor.run(req)),
                    Job::Checkpoint(job) => JobResult::Checkpoint(checkpoint(job)),
                };
                let done = Event::Done {
                    task: msg.task,
                    seq: msg.seq,
                    result,
                };
                if events.send(done).is_err() {
                    break;
                }
            }
        })
}

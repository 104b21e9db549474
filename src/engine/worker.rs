//! Worker threads: each takes one job at a time (an agent run or a
//! checkpoint), does it, and reports back. Workers hold no task state.

use super::msg::{Event, Job, JobMsg, JobResult};
use crate::agent::checkpoint::checkpoint;
use crate::agent::{Containment, Supervisor};
use crate::task::completion::prompt_complete;
use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// What a worker is doing, for diagnostics: written by the worker at the
/// start and end of each job, read by the scheduler's dumps.
#[derive(Default)]
pub struct WorkerState {
    pub job: std::sync::Mutex<Option<String>>,
    pub retired: AtomicBool,
}

pub fn spawn_worker(
    index: usize,
    jobs: Receiver<JobMsg>,
    events: Sender<Event>,
    state: Arc<WorkerState>,
    contain: Arc<Containment>,
) -> std::io::Result<JoinHandle<()>> {
    let mut supervisor = Supervisor::new(contain.clone())?;
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
                    Job::Agent(req, check) => {
                        // Fault injection for the test that a worker's panic
                        // ends the process (debug builds only).
                        #[cfg(debug_assertions)]
                        if std::env::var_os("RALPH_QCHAT_TEST_PANIC").is_some_and(|v| v == "worker")
                        {
                            panic!("injected by RALPH_QCHAT_TEST_PANIC");
                        }
                        set(Some(format!(
                            "agent for task {} iteration {}",
                            req.task_id, req.iteration
                        )));
                        let (o, after) =
                            run_watched(&mut supervisor, req, check.as_ref(), &contain);
                        let marker = check.as_ref().map_or("", |c| c.marker.as_str());
                        let read = after.map(|t| (prompt_complete(&t, marker), t));
                        let complete = read.as_ref().is_some_and(|(done, _)| *done);
                        JobResult::Agent(Box::new(o), complete, read.map(|(_, t)| t))
                    }
                    Job::ReadPrompt(c) => {
                        set(Some(format!("reading the prompt of task {}", msg.task)));
                        JobResult::Prompt(crate::sys::regular::read(&c.path, c.max))
                    }
                    Job::Command(req) => {
                        set(Some(format!("{} of task {}", req.shown, req.task_id)));
                        JobResult::Command(Box::new(supervisor.run(req)))
                    }
                    Job::Checkpoint(job) => {
                        set(Some(format!("checkpoint of task {}", job.task_id)));
                        JobResult::Checkpoint(checkpoint(job, &contain))
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
            state.retired.store(true, Ordering::SeqCst);
        })
}

/// Runs an agent, fingerprinting the working tree around it when asked
/// (before: only for a baseline; after: only when it succeeded), and reads
/// the prompt file as the attempt left it for the completion check. The
/// fingerprint hashes those same bytes when it is the same file, not a
/// second read of it.
fn run_watched(
    supervisor: &mut Supervisor,
    req: &crate::agent::AgentRequest,
    check: Option<&super::msg::PromptCheck>,
    contain: &Containment,
) -> (crate::agent::AgentOutcome, Option<Vec<u8>>) {
    use crate::agent::worktree::fingerprint;
    let before = req
        .watch
        .as_ref()
        .filter(|w| w.baseline)
        .and_then(|w| fingerprint(w, None, contain));
    let mut o = supervisor.run(req);
    o.tree_before = before;
    let after = check.and_then(|c| crate::sys::regular::read(&c.path, c.max).ok());
    if o.class == crate::agent::Class::Success {
        o.tree_after = req.watch.as_ref().and_then(|w| {
            let same = check.is_some_and(|c| c.path == w.prompt_file);
            fingerprint(w, after.as_deref().filter(|_| same), contain)
        });
    }
    (o, after)
}

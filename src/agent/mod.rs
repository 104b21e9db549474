//! The child processes an attempt runs: what to run (a request), how it
//! ended (an outcome), the supervisor that runs it without ever hanging on
//! it, and the git checkpoint, the other process a worker runs.

mod attempt;
pub mod checkpoint;
mod group;
pub mod instruction;
mod output;
mod spawn;
mod supervise;
mod transcript;

pub use attempt::{AgentOutcome, AgentRequest, Cancel, CancelReason, Ending, Progress};
pub use group::{group_alive, kill_leftovers};
pub use spawn::MARKER_VAR;
pub use supervise::Supervisor;

//! The child processes an attempt runs: the CLIs it knows (profiles), what
//! to run (a request), how it ended and what that means (an outcome and its
//! class), the supervisor that runs it without ever hanging on it, and the
//! git checkpoint, the other process a worker runs.

mod attempt;
mod bounded;
pub mod checkpoint;
pub mod classify;
pub mod contain;
mod group;
pub mod instruction;
mod output;
mod plan;
pub mod profile;
mod spawn;
mod supervise;
pub mod text;
mod transcript;
pub mod worktree;

pub use attempt::{AgentOutcome, AgentRequest, Cancel, CancelReason, Ending, Progress, Usage};
pub use classify::Class;
pub use contain::{Containment, Resources};
pub use group::{group_alive, kill_leftovers};
pub use spawn::MARKER_VAR;
pub use supervise::Supervisor;
pub use transcript::Record as TranscriptRecord;

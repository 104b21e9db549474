//! The engine shared by `run` and `daemon`: a scheduler thread that owns every
//! task, workers that run agents, signals forwarded as messages.

pub mod cache;
pub mod circuit;
pub mod diagnostics;
pub mod intake;
pub mod notify;
pub mod ratelimit;
pub mod request;
pub mod scheduler;
pub mod signals;
pub mod stats;
pub mod worker;

pub use scheduler::{Control, Event, Finished, Scheduler};

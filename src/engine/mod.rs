//! The engine shared by `run` and `daemon`: one scheduler thread that owns
//! every task, a pool of workers that run agents and checkpoints, the spool
//! intake, signals turned into messages. Threads talk only through `msg`.
//!
//! ```text
//! signals ─┐
//! intake ──┼─ Event ─▶ scheduler ─ Job ─▶ pool ─▶ worker 1..N
//! writer ──┘    ▲        │ (slots, gates,           │
//!               │        │  persist)                │
//!               └────────┼──── Event::Done ─────────┘
//!                        └─ Snapshot ─▶ Shared ◀─ http (reads only)
//! ```

pub mod account;
pub mod cache;
pub mod circuit;
pub mod diagnostics;
pub mod gates;
pub mod intake;
pub mod msg;
pub mod notify;
pub mod past;
pub mod persist;
pub mod pool;
pub mod ratelimit;
pub mod request;
pub mod scheduler;
pub mod signals;
pub mod slot;
pub mod stats;
pub mod trees;
pub mod worker;

pub use msg::{Control, Event, Shared, Snapshot};
pub use scheduler::{Finished, Mode, Scheduler};

//! Everything on disk: atomic writes, the state-directory lock, task records
//! and transcripts.

pub mod atomic;
pub mod backup;
pub mod lock;
pub mod pauses;
pub mod spool;
pub mod tasks;
pub mod transcripts;
pub mod writer;

pub use atomic::write_atomic;
pub use lock::{LockError, StateLock};
pub use tasks::TaskStore;

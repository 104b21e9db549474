//! The operating system, in one place: /proc readings, time formatting, and
//! the malloc tuning of the long-running commands.

pub mod malloc;
pub mod proc;
pub mod time;

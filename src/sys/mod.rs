//! The operating system, in one place: /proc readings, cgroups, the child
//! subreaper, bounded reads of files others may replace, time formatting,
//! inotify, and the malloc tuning of the long-running commands.

pub mod cgroup;
pub mod inotify;
pub mod malloc;
pub mod proc;
pub mod prune;
pub mod reaper;
pub mod regular;
pub mod rename;
pub mod time;

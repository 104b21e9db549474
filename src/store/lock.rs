//! The state-directory lock: one process owns a state directory at a time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held for the life of the owning process; the kernel drops it when we die.
/// The held descriptor is read-only, so the state directory's file system can
/// still be remounted read-only (an operator's or the kernel's reaction to
/// disk errors) while we run.
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug)]
pub enum LockError {
    /// Another process holds it; its pid when it wrote one.
    Held { path: PathBuf, pid: Option<u32> },
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Held {
                path,
                pid: Some(pid),
            } => write!(
                f,
                "state directory is in use by another ralph-qchat (pid {pid}, lock {})",
                path.display()
            ),
            LockError::Held { path, pid: None } => write!(
                f,
                "state directory is in use by another ralph-qchat (lock {})",
                path.display()
            ),
            LockError::Io { path, error } => {
                write!(f, "cannot open lock file {}: {error}", path.display())
            }
        }
    }
}

impl StateLock {
    /// Tries once (the caller retries for standby).
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let path = state_dir.join("lock");
        let io = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        // Create it once; the lock itself is taken on a read-only descriptor.
        OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let mut file = File::open(&path).map_err(io)?;
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => {
                    let mut s = String::new();
                    let _ = file.read_to_string(&mut s);
                    return Err(LockError::Held {
                        path: path.clone(),
                        pid: s.trim().parse().ok(),
                    });
                }
                _ => return Err(io(e)),
            }
        }
        // Ours now: say who holds it, on a descriptor closed right after.
        let mut w = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .map_err(io)?;
        w.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(io)?;
        Ok(StateLock { _file: file, path })
    }

    /// The pid written by the holder, if the lock is held by someone; None if free.
    pub fn holder(state_dir: &Path) -> Option<u32> {
        let path = state_dir.join("lock");
        let file = File::open(&path).ok()?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return None;
        }
        let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok();
        Some(pid.unwrap_or(0))
    }
}

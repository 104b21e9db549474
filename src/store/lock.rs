//! The state-directory lock: one process owns a state directory at a time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held for the life of the owning process; the kernel drops it when we die.
pub struct StateLock {
    file: File,
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
    /// Tries once; with `wait`, blocks until the holder lets go.
    pub fn acquire(state_dir: &Path, wait: bool) -> Result<StateLock, LockError> {
        let path = state_dir.join("lock");
        let io = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let op = if wait {
            libc::LOCK_EX
        } else {
            libc::LOCK_EX | libc::LOCK_NB
        };
        loop {
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
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
        let pid = format!("{}\n", std::process::id());
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        file.write_all(pid.as_bytes()).map_err(io)?;
        Ok(StateLock { file, path })
    }

    /// The pid written by the holder, if the lock is held by someone; None if free.
    pub fn holder(state_dir: &Path) -> Option<u32> {
        match StateLock::acquire(state_dir, false) {
            Err(LockError::Held { pid, .. }) => pid.or(Some(0)),
            _ => None,
        }
    }
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

//! inotify(7), for `logs --follow`: a blocking wait until something changes
//! in the directories watched, instead of looking again every so often.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

pub struct Watch {
    fd: OwnedFd,
}

/// A file in the directory was written, created, renamed into it or closed.
pub const CHANGES: u32 =
    libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE;

impl Watch {
    pub fn new() -> io::Result<Watch> {
        // SAFETY: no pointers; the descriptor is owned from here on.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        Ok(Watch {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `dir` (again: adding a watched directory only updates it).
    pub fn add(&self, dir: &Path, mask: u32) -> io::Result<()> {
        let c = CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))?;
        // SAFETY: c is a valid NUL-terminated string for the call's duration.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Blocks until at least one event, and takes every event queued.
    pub fn wait(&self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

//! Child subreaper. What escapes an attempt (a tool shell's `setsid cmd &`
//! whose parent exits) is reparented to us instead of init, so the attempt's
//! end can find it among our descendants, and it is reaped here: no zombie
//! is left, also when we are PID 1 in a container.
//!
//! It must never reap a child a worker waits for (the worker would lose its
//! exit status), so it never calls waitpid(-1). The kernel hands an orphan
//! to the first live thread of its subreaper: our main thread, which starts
//! no child of its own, while every agent and helper is the child of the
//! worker thread that started it. So on each SIGCHLD this thread reaps the
//! zombies among the main thread's children, and only those.
//!
//! Every agent's exit sends SIGCHLD too (the worker waits for it; exec
//! sets the exit signal back to SIGCHLD whatever clone asked), hundreds a
//! second at high rates, and each look reads /proc: it looks at most once
//! per `SCAN_EVERY`, the signals that came meanwhile covered by that look.
//! An orphan's zombie waits that much longer at most.

use signal_hook::consts::SIGCHLD;
use signal_hook::iterator::Signals;
use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SCAN_EVERY: Duration = Duration::from_millis(50);

static STARTED: OnceLock<()> = OnceLock::new();
static REAPED: AtomicU64 = AtomicU64::new(0);

/// Makes this process a child subreaper and starts the reaping thread (once).
pub fn start() -> io::Result<()> {
    if STARTED.get().is_some() {
        return Ok(());
    }
    // SAFETY: prctl with an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut signals = Signals::new([SIGCHLD])?;
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            reap_all();
            let mut last = Instant::now();
            // wait() blocks until a signal came; an empty return is spurious.
            loop {
                if signals.wait().count() == 0 {
                    if signals.is_closed() {
                        break;
                    }
                    continue;
                }
                let since = last.elapsed();
                if since < SCAN_EVERY {
                    std::thread::sleep(SCAN_EVERY - since);
                }
                let _ = signals.pending().count();
                reap_all();
                last = Instant::now();
            }
        })?;
    let _ = STARTED.set(());
    Ok(())
}

/// Whether the reaper runs (it does in `run` and the daemon).
pub fn active() -> bool {
    STARTED.get().is_some()
}

/// Adopted processes reaped so far, for the diagnostics dump.
pub fn reaped() -> u64 {
    REAPED.load(Ordering::Relaxed)
}

/// Reaps the zombies among the main thread's children at once (from any
/// thread: it waits only for those, never for a worker's own child).
pub fn reap_now() {
    if active() {
        reap_all();
    }
}

fn reap_all() {
    let me = std::process::id();
    let Ok(list) = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")) else {
        return;
    };
    for pid in list
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if !matches!(crate::sys::proc::state_and_group(pid), Some(('Z', _))) {
            continue;
        }
        let mut status = 0;
        // SAFETY: waitpid on a zombie child of ours, with a valid status pointer.
        if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) } == pid {
            REAPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

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
//! An orphan's zombie waits that much longer at most. The signal is blocked
//! in every thread and taken here with sigwaitinfo (`block_sigchld`).

use std::io;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SCAN_EVERY: Duration = Duration::from_millis(50);

static STARTED: OnceLock<()> = OnceLock::new();
static REAPED: AtomicU64 = AtomicU64::new(0);

fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset fill the set they are given.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

/// Blocks SIGCHLD in the calling thread, and so in every thread it starts
/// afterwards; called by `run` and the daemon before they start any. The
/// reaper takes the signal with sigwaitinfo instead of a handler: a
/// handler made each agent's exit interrupt one of our threads (a signal
/// frame, the handler's write to a pipe, rt_sigreturn, a wake-up: 2.3
/// system calls per request of the daemon's threads). Blocked, a SIGCHLD that comes while
/// one is pending is dropped by the kernel at once, and the reaper wakes at
/// most once per `SCAN_EVERY`. The disposition is set to SIG_DFL: one
/// inherited as SIG_IGN would make the kernel reap every worker's child
/// itself. Children get an empty mask (the launcher's child sets it, as
/// std's Command does).
pub fn block_sigchld() {
    let set = sigchld_set();
    // SAFETY: a valid set; SIG_DFL for SIGCHLD through a zeroed sigaction.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGCHLD, &dfl, std::ptr::null_mut());
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Makes this process a child subreaper and starts the reaping thread (once).
pub fn start() -> io::Result<()> {
    if STARTED.get().is_some() {
        return Ok(());
    }
    // SAFETY: prctl with an integer argument.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Again here for a caller that did not (the unit tests): sigwaitinfo
    // needs the signal blocked in the thread made below.
    block_sigchld();
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || {
            let set = sigchld_set();
            reap_all();
            let mut last = Instant::now();
            loop {
                // SAFETY: a valid set; no siginfo wanted.
                let got = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
                if got != libc::SIGCHLD {
                    continue; // EINTR
                }
                let since = last.elapsed();
                if since < SCAN_EVERY {
                    std::thread::sleep(SCAN_EVERY - since);
                }
                // The signal that came meanwhile (one pending at most) is
                // covered by the look that follows.
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: a valid set and timeout.
                unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
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
    let Some(list) = crate::sys::proc::children(format!("/proc/{me}/task/{me}/children")) else {
        return;
    };
    for pid in list {
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

//! A helper command (git for checkpoints and fingerprints) run like an
//! agent in the small: its own process group and containment, a deadline,
//! a cancel, and nothing of it left when it returns. A git that hangs (an
//! fsmonitor or filter an agent put in .git/config) is killed, never waited
//! on.

use super::attempt::Cancel;
use super::contain::Containment;
use super::spawn::{Launcher, SpawnError, Spec};
use super::supervise::pidfd_open;
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Output kept per stream; the rest is read and dropped.
const MAX_KEPT: usize = 16 * 1024 * 1024;

#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

#[derive(Debug)]
pub enum Failure {
    /// It could not be started.
    Spawn(io::Error),
    /// Stopped at its deadline.
    TimedOut,
    /// Stopped because the job was cancelled (shutdown).
    Cancelled,
}

/// Runs what `cmd` describes (program, arguments, added environment,
/// directory; it is not spawned by std) in its own containment (`label`
/// names it), to its end, or until `deadline` or `cancel`: then SIGTERM to
/// its group, and SIGKILL of all of it after `grace`.
pub fn run(
    cmd: &Command,
    deadline: Instant,
    grace: Duration,
    cancel: Option<&Cancel>,
    contain: &Containment,
    label: &str,
) -> Result<Finished, Failure> {
    let args: Vec<OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
    let env: Vec<(OsString, OsString)> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    let workdir = cmd
        .get_current_dir()
        .map(|d| d.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut jail = contain.enter(label, None);
    let joins = jail.joins();
    let spec = Spec {
        nonblocking: false,
        role: "helper command",
        program: cmd.get_program(),
        args: &args,
        env: &env,
        workdir: &workdir,
        max_as: 0,
        joins: &joins,
    };
    let spawned = Launcher::new().map_err(Failure::Spawn).and_then(|mut l| {
        l.spawn(&spec).map_err(|e| {
            let (kind, m) = match e {
                SpawnError::Unavailable(m) => (io::ErrorKind::NotFound, m),
                SpawnError::Other(m) => (io::ErrorKind::Other, m),
            };
            Failure::Spawn(io::Error::new(kind, m))
        })
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(f) => {
            jail.finish(grace, None, label);
            return Err(f);
        }
    };
    let pid = child.id();
    jail.started(pid);
    let (tx, rx) = mpsc::channel();
    for (i, pipe) in [child.stdout.take(), child.stderr.take()]
        .into_iter()
        .enumerate()
    {
        let tx = tx.clone();
        let Some(pipe) = pipe else { continue };
        let mut pipe = std::fs::File::from(pipe);
        let _ = std::thread::Builder::new()
            .name("helper-output".into())
            .spawn(move || {
                let mut kept = Vec::new();
                let mut buf = [0u8; 8192];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let room = MAX_KEPT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
                let _ = tx.send((i, kept));
            });
    }
    drop(tx);
    let pidfd = child.pidfd.take().or_else(|| pidfd_open(pid));
    let mut stopping: Option<(Failure, Instant)> = None;
    let mut killed = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(_) => break ExitStatus::default(),
        }
        let now = Instant::now();
        if stopping.is_none() {
            let why = if cancel.is_some_and(|c| c.reason().is_some()) {
                Some(Failure::Cancelled)
            } else if now >= deadline {
                Some(Failure::TimedOut)
            } else {
                None
            };
            if let Some(why) = why {
                // SAFETY: signalling the process group this child leads.
                unsafe { libc::kill(-pid, libc::SIGTERM) };
                stopping = Some((why, now + grace));
            }
        }
        let mut next = deadline;
        if let Some((_, kill_at)) = &stopping {
            if now >= *kill_at && !killed {
                // SAFETY: as above.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                jail.kill_all();
                killed = true;
            }
            next = *kill_at;
        }
        // The cancel has no fd: look at it every 50 ms.
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(50));
        wait_exit(pidfd.as_ref(), wait);
    };
    // The command is the attempt: what it left goes with it.
    jail.kill_all();
    let mut out = [Vec::new(), Vec::new()];
    let until = Instant::now() + grace;
    for _ in 0..2 {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok((i, v)) => out[i] = v,
            // Something out of reach holds a pipe: stop waiting.
            Err(_) => break,
        }
    }
    jail.finish(grace, child.rusage, label);
    if let Some((why, _)) = stopping {
        return Err(why);
    }
    let [stdout, stderr] = out;
    Ok(Finished {
        status,
        stdout,
        stderr,
    })
}

/// Sleeps until the child exits or `wait` has passed.
fn wait_exit(pidfd: Option<&OwnedFd>, wait: Duration) {
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    match pidfd {
        Some(fd) => {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the stack.
            unsafe { libc::poll(&mut p, 1, ms) };
        }
        None => std::thread::sleep(wait.min(Duration::from_millis(5))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_status_come_back() {
        let f = run(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Instant::now() + Duration::from_secs(10),
            Duration::from_secs(1),
            None,
            &Containment::group_only(),
            "t",
        )
        .unwrap();
        assert_eq!(f.status.code(), Some(3));
        assert_eq!(f.stdout, b"out\n");
        assert_eq!(f.stderr, b"err\n");
    }

    #[test]
    fn a_hang_is_killed_at_the_deadline_with_its_group() {
        let t = Instant::now();
        let r = run(
            Command::new("sh").args(["-c", "sleep 300 & sleep 300"]),
            Instant::now() + Duration::from_millis(300),
            Duration::from_millis(300),
            None,
            &Containment::group_only(),
            "t",
        );
        assert!(matches!(r, Err(Failure::TimedOut)), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_cancel_stops_it() {
        let c = Cancel::default();
        c.request(crate::agent::CancelReason::Shutdown);
        let r = run(
            Command::new("sleep").arg("300"),
            Instant::now() + Duration::from_secs(300),
            Duration::from_millis(200),
            Some(&c),
            &Containment::group_only(),
            "t",
        );
        assert!(matches!(r, Err(Failure::Cancelled)), "{r:?}");
    }
}

//! A helper command (git for checkpoints and fingerprints) run like an
//! agent in the small: its own process group, a deadline, a cancel, and
//! nothing of its group left when it returns. A git that hangs (an
//! fsmonitor or filter an agent put in .git/config) is killed, never waited
//! on.

use super::attempt::Cancel;
use super::group::terminate_group;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
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

/// Runs `cmd` to its end, or until `deadline` or `cancel`, then SIGTERM to
/// its group and SIGKILL after `grace`.
pub fn run(
    cmd: &mut Command,
    deadline: Instant,
    grace: Duration,
    cancel: Option<&Cancel>,
) -> Result<Finished, Failure> {
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(Failure::Spawn)?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    for (i, pipe) in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        let Some(mut pipe) = pipe else { continue };
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
    let mut stopping: Option<(Failure, Instant)> = None;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
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
        if let Some((_, kill_at)) = &stopping
            && now >= *kill_at
        {
            // SAFETY: as above.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // Whatever it left in its group goes with it.
    terminate_group(pid, grace);
    let mut out = [Vec::new(), Vec::new()];
    let until = Instant::now() + grace;
    for _ in 0..2 {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok((i, v)) => out[i] = v,
            // Something outside the group holds a pipe: stop waiting.
            Err(_) => break,
        }
    }
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
        );
        assert!(matches!(r, Err(Failure::Cancelled)), "{r:?}");
    }
}

//! Running one agent child to its end: pipes polled with mio, timeouts, the
//! output cap, cancellation, and cleanup of the whole process group.

use super::group::{group_alive, terminate_group};
use super::spawn::{Launcher, SpawnError, Spawned};
use super::{AgentOutcome, AgentRequest, CancelReason, Ending};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const OUT: Token = Token(0);
const ERR: Token = Token(1);
const EXIT: Token = Token(2);
const WAKE: Token = Token(3);
/// How long to keep reading after the child exited while something it left
/// behind still holds the pipes.
const DRAIN: Duration = Duration::from_millis(200);
/// Reads per stream per turn, so one flooding stream cannot starve the other
/// or the timers.
const READS_PER_TURN: usize = 16;
const TAIL: usize = 2048;

/// A worker's reusable poller, waker and read buffer.
pub struct Supervisor {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
    buf: Vec<u8>,
    launcher: Launcher,
}

impl Supervisor {
    pub fn new() -> io::Result<Supervisor> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        Ok(Supervisor {
            poll,
            events: Events::with_capacity(8),
            waker,
            buf: Vec::new(),
            launcher: Launcher::new()?,
        })
    }

    pub fn run(&mut self, req: &AgentRequest) -> AgentOutcome {
        req.cancel.attach(self.waker.clone());
        if self.buf.len() != req.buffer_size {
            self.buf = vec![0; req.buffer_size.max(1)];
        }
        let started = Instant::now();
        let finish = |ending: Ending, transcript: &mut Transcript, run: Option<&Run>| {
            let outcome = AgentOutcome {
                duration: started.elapsed(),
                bytes_read: run.map_or(0, |r| r.bytes_read),
                bytes_dropped: run.map_or(0, |r| r.bytes_dropped),
                marker_seen: run.is_some_and(|r| r.marker_seen),
                tail: run.map(|r| r.tail()).unwrap_or_default(),
                ending,
            };
            transcript.footer(&outcome);
            outcome
        };
        let unstarted = |ending: Ending| finish(ending, &mut Transcript::open(req), None);
        if let Some(r) = req.cancel.reason() {
            return unstarted(cancel_ending(r));
        }
        if !req.workdir.is_dir() {
            let msg = format!("working directory {} does not exist", req.workdir.display());
            return unstarted(Ending::SpawnFailed(msg));
        }
        let mut child = match self.launcher.spawn(req) {
            Ok(c) => c,
            Err(SpawnError::Unavailable(m)) => return unstarted(Ending::Unavailable(m)),
            Err(SpawnError::Other(m)) => return unstarted(Ending::SpawnFailed(m)),
        };
        // Created while the agent loads: the file system's cost of a new
        // transcript is off the path to the agent's start. Its output waits
        // in the pipes meanwhile.
        let mut transcript = Transcript::open(req);
        let pid = child.id();
        req.progress.pid.store(pid as u32, Ordering::Relaxed);
        req.progress.bytes_read.store(0, Ordering::Relaxed);
        let mut run = Run::new(req);
        let ending = self.supervise(req, &mut child, &mut run, &mut transcript);
        req.progress.pid.store(0, Ordering::Relaxed);
        finish(ending, &mut transcript, Some(&run))
    }

    fn supervise(
        &mut self,
        req: &AgentRequest,
        child: &mut Spawned,
        run: &mut Run,
        transcript: &mut Transcript,
    ) -> Ending {
        let pid = child.id();
        let out = child.stdout.take();
        let err = child.stderr.take();
        let mut pipes: [Option<OwnedFd>; 2] = [out, err];
        for (i, p) in pipes.iter().enumerate() {
            if let Some(fd) = p {
                set_nonblocking(fd.as_raw_fd());
                let _ = self.poll.registry().register(
                    &mut SourceFd(&fd.as_raw_fd()),
                    Token(i),
                    Interest::READABLE,
                );
            }
        }
        let pidfd = pidfd_open(pid);
        if let Some(fd) = &pidfd {
            let _ = self.poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                EXIT,
                Interest::READABLE,
            );
        }
        let start = Instant::now();
        let deadline = start + req.timeout;
        let mut last_output = start;
        let mut readable = [true, true];
        let mut exited: Option<ExitStatus> = None;
        let mut drain_until: Option<Instant> = None;
        // Why we are stopping the child, and when SIGKILL is due.
        let mut stopping: Option<(Ending, Instant)> = None;
        let mut killed = false;

        let ending = loop {
            let now = Instant::now();
            if stopping.is_none() {
                let why = if let Some(r) = req.cancel.reason() {
                    Some(cancel_ending(r))
                } else if now >= deadline {
                    Some(if req.timeout_is_runtime {
                        Ending::RuntimeExceeded
                    } else {
                        Ending::TimedOut
                    })
                } else if req
                    .idle_timeout
                    .is_some_and(|idle| now >= last_output + idle)
                {
                    Some(Ending::IdleTimedOut)
                } else {
                    None
                };
                if let Some(why) = why {
                    if exited.is_none() {
                        signal_group(pid, libc::SIGTERM);
                        stopping = Some((why, now + req.kill_grace));
                    } else if drain_until.is_some() {
                        // Already exited; only leftovers hold the pipes: stop draining.
                        drain_until = Some(now);
                    }
                }
            }
            if let Some((_, kill_at)) = &stopping
                && !killed
                && now >= *kill_at
            {
                signal_group(pid, libc::SIGKILL);
                killed = true;
            }
            if exited.is_none()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
            }
            let open = pipes.iter().any(Option::is_some);
            if exited.is_some() {
                if !open {
                    break stopping.map(|(e, _)| e);
                }
                let until =
                    *drain_until.get_or_insert(now + if killed { Duration::ZERO } else { DRAIN });
                if now >= until {
                    break stopping.map(|(e, _)| e);
                }
            }

            // Read what is there, a bounded amount per stream.
            let mut more = false;
            for i in 0..2 {
                if !readable[i] {
                    continue;
                }
                let Some(fd) = &pipes[i] else { continue };
                match self.read_some(fd.as_raw_fd(), i, run, req, transcript) {
                    ReadState::More => {
                        last_output = Instant::now();
                        more = true;
                    }
                    ReadState::Drained(got) => {
                        if got {
                            last_output = Instant::now();
                        }
                        readable[i] = false;
                    }
                    ReadState::Closed => {
                        let _ = self
                            .poll
                            .registry()
                            .deregister(&mut SourceFd(&fd.as_raw_fd()));
                        pipes[i] = None;
                        readable[i] = false;
                    }
                }
            }
            if exited.is_some() && pipes.iter().all(Option::is_none) {
                // The last pipe closed after the exit was seen: done now, not
                // at the end of the drain period.
                continue;
            }
            if more {
                // Check timers and the other stream before reading on.
                let _ = self.poll.poll(&mut self.events, Some(Duration::ZERO));
            } else {
                transcript.flush();
                let now = Instant::now();
                let mut wake = vec![];
                match &stopping {
                    Some((_, kill_at)) if !killed => wake.push(*kill_at),
                    None => {
                        wake.push(deadline);
                        if let Some(idle) = req.idle_timeout {
                            wake.push(last_output + idle);
                        }
                    }
                    _ => {}
                }
                if let Some(d) = drain_until {
                    wake.push(d);
                }
                if exited.is_none() && (pidfd.is_none() || killed) {
                    // No exit notification available: look again shortly.
                    wake.push(now + req.poll_interval.min(Duration::from_millis(50)));
                }
                let timeout = wake
                    .into_iter()
                    .min()
                    .map(|w| w.saturating_duration_since(now));
                if let Err(e) = self.poll.poll(&mut self.events, timeout)
                    && e.kind() != io::ErrorKind::Interrupted
                {
                    log::warn!("polling agent pid {pid} failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            for ev in self.events.iter() {
                match ev.token() {
                    OUT => readable[0] = true,
                    ERR => readable[1] = true,
                    _ => {}
                }
            }
        };
        for fd in pipes.iter().flatten() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        if let Some(fd) = &pidfd {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        drop(pipes);
        let status = match exited {
            Some(s) => s,
            None => {
                signal_group(pid, libc::SIGKILL);
                match child.wait() {
                    Ok(s) => s,
                    Err(_) => return ending.unwrap_or(Ending::Signaled(libc::SIGKILL)),
                }
            }
        };
        // Whatever the child left in its group goes with it.
        if killed {
            signal_group(pid, libc::SIGKILL);
        } else if group_alive(pid) {
            log::debug!("agent pid {pid} exited leaving processes in its group; terminating them");
            terminate_group(pid, req.kill_grace);
        }
        if let Some(e) = ending {
            return e;
        }
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => Ending::Exited(c),
            (None, Some(s)) => Ending::Signaled(s),
            _ => Ending::Exited(-1),
        }
    }

    fn read_some(
        &mut self,
        fd: RawFd,
        stream: usize,
        run: &mut Run,
        req: &AgentRequest,
        transcript: &mut Transcript,
    ) -> ReadState {
        let mut got = false;
        for _ in 0..READS_PER_TURN {
            // SAFETY: reading into our own buffer from a pipe fd we own.
            let n = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n > 0 {
                got = true;
                run.take(stream, &self.buf[..n as usize], req, transcript);
                continue;
            }
            if n == 0 {
                return ReadState::Closed;
            }
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => ReadState::Drained(got),
                io::ErrorKind::Interrupted => ReadState::More,
                _ => ReadState::Closed,
            };
        }
        ReadState::More
    }
}

enum ReadState {
    More,
    Drained(bool),
    Closed,
}

fn cancel_ending(r: CancelReason) -> Ending {
    match r {
        CancelReason::Cancel => Ending::Cancelled,
        CancelReason::Shutdown => Ending::ShutDown,
    }
}

/// Per-run accounting of the output.
struct Run {
    bytes_read: u64,
    kept: u64,
    bytes_dropped: u64,
    marker: Option<Vec<u8>>,
    marker_seen: bool,
    carry: [Vec<u8>; 2],
    tails: [Vec<u8>; 2],
}

impl Run {
    fn new(req: &AgentRequest) -> Run {
        Run {
            bytes_read: 0,
            kept: 0,
            bytes_dropped: 0,
            marker: req.output_marker.clone().filter(|m| !m.is_empty()),
            marker_seen: false,
            carry: [Vec::new(), Vec::new()],
            tails: [Vec::new(), Vec::new()],
        }
    }

    fn take(
        &mut self,
        stream: usize,
        chunk: &[u8],
        req: &AgentRequest,
        transcript: &mut Transcript,
    ) {
        self.bytes_read += chunk.len() as u64;
        req.progress
            .bytes_read
            .store(self.bytes_read, Ordering::Relaxed);
        let room = req.max_output.saturating_sub(self.kept);
        let keep = &chunk[..(chunk.len() as u64).min(room) as usize];
        self.kept += keep.len() as u64;
        self.bytes_dropped += (chunk.len() - keep.len()) as u64;
        if !keep.is_empty() {
            transcript.write(keep);
            if req.stream {
                let mut e = io::stderr().lock();
                let _ = e.write_all(keep);
                let _ = e.flush();
            }
        }
        if let Some(m) = &self.marker
            && !self.marker_seen
        {
            let carry = &mut self.carry[stream];
            carry.extend_from_slice(chunk);
            if find(carry, m) {
                self.marker_seen = true;
            }
            let keep_from = carry.len().saturating_sub(m.len() - 1);
            carry.drain(..keep_from);
        }
        let tail = &mut self.tails[stream];
        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(TAIL)..]);
        let over = tail.len().saturating_sub(TAIL);
        tail.drain(..over);
    }

    fn tail(&self) -> Vec<u8> {
        if self.tails[1].iter().any(|b| !b.is_ascii_whitespace()) {
            self.tails[1].clone()
        } else {
            self.tails[0].clone()
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The iteration's transcript file, written as output arrives: buffered
/// while the agent floods, flushed whenever its pipes run dry, so `tail -f`
/// sees everything the agent has paused after.
struct Transcript {
    file: Option<std::io::BufWriter<File>>,
}

impl Transcript {
    fn open(req: &AgentRequest) -> Transcript {
        let Some(path) = &req.transcript else {
            return Transcript { file: None };
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        let mut t = match file {
            Ok(f) => Transcript {
                file: Some(std::io::BufWriter::with_capacity(64 * 1024, f)),
            },
            Err(e) => {
                log::warn!(task = req.task_id.as_str(); "cannot write transcript {}: {e}", path.display());
                Transcript { file: None }
            }
        };
        let header = format!(
            "=== ralph-qchat iteration {} attempt {} started {}\n=== argv: {}\n",
            req.iteration,
            req.attempt,
            crate::timefmt::now_rfc3339(),
            req.shown
        );
        t.write(header.as_bytes());
        t
    }

    fn write(&mut self, bytes: &[u8]) {
        if let Some(f) = &mut self.file
            && f.write_all(bytes).is_err()
        {
            self.file = None;
        }
    }

    fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            if f.flush().is_err() {
                self.file = None;
            }
        }
    }

    fn footer(&mut self, o: &AgentOutcome) {
        let line = format!(
            "\n=== end: {} after {:.3} s; {} bytes of output{}\n",
            o.ending.describe(),
            o.duration.as_secs_f64(),
            o.bytes_read,
            if o.truncated() {
                format!(
                    ", truncated: {} bytes dropped (limits.max_output_size)",
                    o.bytes_dropped
                )
            } else {
                String::new()
            }
        );
        self.write(line.as_bytes());
        self.flush();
    }
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: signalling the process group our child leads.
    unsafe { libc::kill(-pgid, sig) };
}

/// A pidfd becomes readable when the child exits, so exits need no polling.
/// None on kernels before 5.3.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        None
    } else {
        // SAFETY: a fresh fd returned by the kernel.
        Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_across_chunks() {
        assert!(find(b"abcLOOP_COMPLETEdef", b"LOOP_COMPLETE"));
        assert!(!find(b"LOOP_COMPLET", b"LOOP_COMPLETE"));
    }
}

//! Running one agent child to its end: pipes polled with mio, timeouts,
//! cancellation, and cleanup of the whole process group. What the output
//! holds is `output`'s business, where it is written `transcript`'s.

use super::attempt::{AgentOutcome, AgentRequest, CancelReason, Ending};
use super::classify::{Class, Said, classify, wait_hint};
use super::group::{group_alive, terminate_group};
use super::output::Output;
use super::spawn::{Launcher, SpawnError, Spawned};
use super::transcript::Transcript;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use std::io;
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

/// A worker's reusable poller, waker and read buffer.
pub struct Supervisor {
    poll: Poll,
    events: Events,
    waker: Arc<Waker>,
    buf: Vec<u8>,
    launcher: Launcher,
}

/// Where one running child is: its pipes, its exit, and why and since when
/// we are stopping it.
struct Watch {
    pid: i32,
    pipes: [Option<OwnedFd>; 2],
    readable: [bool; 2],
    pidfd: Option<OwnedFd>,
    deadline: Instant,
    last_output: Instant,
    exited: Option<ExitStatus>,
    drain_until: Option<Instant>,
    /// Why we are stopping the child, and when SIGKILL is due.
    stopping: Option<(Ending, Instant)>,
    killed: bool,
    /// The output matched a rule that ends the attempt at once.
    rule_stop: bool,
}

impl Watch {
    /// Cancel, timeout and idle timeout become SIGTERM to the group, and
    /// SIGKILL once kill_grace has passed.
    fn enforce(&mut self, req: &AgentRequest, now: Instant) {
        if self.stopping.is_none() {
            let why = if let Some(r) = req.cancel.reason() {
                Some(cancel_ending(r))
            } else if self.rule_stop {
                Some(Ending::RuleStopped)
            } else if now >= self.deadline {
                Some(if req.timeout_is_runtime {
                    Ending::RuntimeExceeded
                } else {
                    Ending::TimedOut
                })
            } else if req
                .idle_timeout
                .is_some_and(|idle| now >= self.last_output + idle)
            {
                Some(Ending::IdleTimedOut)
            } else {
                None
            };
            if let Some(why) = why {
                if self.exited.is_none() {
                    signal_group(self.pid, libc::SIGTERM);
                    self.stopping = Some((why, now + req.kill_grace));
                } else if self.drain_until.is_some() {
                    // Already exited; only leftovers hold the pipes: stop draining.
                    self.drain_until = Some(now);
                }
            }
        }
        if let Some((_, kill_at)) = &self.stopping
            && !self.killed
            && now >= *kill_at
        {
            signal_group(self.pid, libc::SIGKILL);
            self.killed = true;
        }
    }

    /// Some(why we stopped it, if we did) once the child has exited and its
    /// pipes are closed, or the drain period after its exit is over.
    fn over(&mut self, now: Instant) -> Option<Option<Ending>> {
        self.exited?;
        if self.pipes.iter().all(Option::is_none) {
            return Some(self.stopping.take().map(|(e, _)| e));
        }
        let grace = if self.killed { Duration::ZERO } else { DRAIN };
        let until = *self.drain_until.get_or_insert(now + grace);
        (now >= until).then(|| self.stopping.take().map(|(e, _)| e))
    }

    /// When the next timer of this child is due.
    fn wake_at(&self, req: &AgentRequest, now: Instant) -> Option<Instant> {
        let mut wake = vec![];
        match &self.stopping {
            Some((_, kill_at)) if !self.killed => wake.push(*kill_at),
            None => {
                wake.push(self.deadline);
                if let Some(idle) = req.idle_timeout {
                    wake.push(self.last_output + idle);
                }
            }
            _ => {}
        }
        wake.extend(self.drain_until);
        if self.exited.is_none() && (self.pidfd.is_none() || self.killed) {
            // No exit notification available: look again shortly.
            wake.push(now + req.poll_interval.min(Duration::from_millis(50)));
        }
        wake.into_iter().min()
    }
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
        let finish = |ending: Ending, transcript: &mut Transcript, out: Option<&Output>| {
            let none = Said::default();
            let said = match out {
                Some(o) => &o.said,
                None => &none,
            };
            let (class, decided_by) = classify(&ending, said, &req.rules);
            let wait = matches!(class, Class::Throttled | Class::Quota)
                .then(|| wait_hint(&said.lines.join("\n"), unix_seconds()))
                .flatten();
            let outcome = AgentOutcome {
                class,
                decided_by,
                wait,
                usage: out.map(|o| o.usage).unwrap_or_default(),
                tree_before: None,
                tree_after: None,
                lines: said.lines.clone(),
                duration: started.elapsed(),
                bytes_read: out.map_or(0, |r| r.bytes_read),
                bytes_dropped: out.map_or(0, |r| r.bytes_dropped),
                marker_seen: out.is_some_and(|r| r.marker_seen),
                tail: out.map(|r| r.tail()).unwrap_or_default(),
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
        let mut out = Output::new(req);
        let ending = self.supervise(req, &mut child, &mut out, &mut transcript);
        req.progress.pid.store(0, Ordering::Relaxed);
        out.finish(req);
        finish(ending, &mut transcript, Some(&out))
    }

    fn supervise(
        &mut self,
        req: &AgentRequest,
        child: &mut Spawned,
        out: &mut Output,
        transcript: &mut Transcript,
    ) -> Ending {
        let mut w = self.watch(req, child);
        let ending = loop {
            let now = Instant::now();
            w.enforce(req, now);
            if w.exited.is_none()
                && let Ok(Some(status)) = child.try_wait()
            {
                w.exited = Some(status);
            }
            if let Some(ending) = w.over(now) {
                break ending;
            }
            let more = self.read_pipes(&mut w, out, req, transcript);
            if !w.rule_stop && out.stop_due().is_some() {
                // Stop now, not at the next timer.
                w.rule_stop = true;
                continue;
            }
            if w.exited.is_some() && w.pipes.iter().all(Option::is_none) {
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
                let timeout = w
                    .wake_at(req, now)
                    .map(|t| t.saturating_duration_since(now));
                if let Err(e) = self.poll.poll(&mut self.events, timeout)
                    && e.kind() != io::ErrorKind::Interrupted
                {
                    log::warn!("polling agent pid {} failed: {e}", w.pid);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            for ev in self.events.iter() {
                match ev.token() {
                    OUT => w.readable[0] = true,
                    ERR => w.readable[1] = true,
                    _ => {}
                }
            }
        };
        self.end(w, child, ending, req)
    }

    /// Registers the child's pipes and exit notification with our poller.
    fn watch(&mut self, req: &AgentRequest, child: &mut Spawned) -> Watch {
        let pid = child.id();
        let pipes: [Option<OwnedFd>; 2] = [child.stdout.take(), child.stderr.take()];
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
        Watch {
            pid,
            pipes,
            readable: [true, true],
            pidfd,
            deadline: start + req.timeout,
            last_output: start,
            exited: None,
            drain_until: None,
            stopping: None,
            killed: false,
            rule_stop: false,
        }
    }

    /// Reads what is there, a bounded amount per stream; true when a stream
    /// may have more.
    fn read_pipes(
        &mut self,
        w: &mut Watch,
        out: &mut Output,
        req: &AgentRequest,
        transcript: &mut Transcript,
    ) -> bool {
        let mut more = false;
        for i in 0..2 {
            if !w.readable[i] {
                continue;
            }
            let Some(fd) = &w.pipes[i] else { continue };
            let fd = fd.as_raw_fd();
            match self.read_some(fd, i, out, req, transcript) {
                ReadState::More => {
                    w.last_output = Instant::now();
                    more = true;
                }
                ReadState::Drained(got) => {
                    if got {
                        w.last_output = Instant::now();
                    }
                    w.readable[i] = false;
                }
                ReadState::Closed => {
                    let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                    w.pipes[i] = None;
                    w.readable[i] = false;
                }
            }
        }
        more
    }

    /// Unregisters the child, reaps it, and ends whatever it left in its
    /// group; the ending is ours when we stopped it, else its exit status.
    fn end(
        &mut self,
        w: Watch,
        child: &mut Spawned,
        ending: Option<Ending>,
        req: &AgentRequest,
    ) -> Ending {
        for fd in w.pipes.iter().chain([&w.pidfd]).flatten() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        let Watch {
            pid,
            pipes,
            exited,
            killed,
            ..
        } = w;
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
            // We stopped the attempt: nothing it started may outlive it,
            // also what left its group (agents run tools in new sessions).
            // An attempt that ends by itself is not searched for: that costs
            // a /proc scan per request.
            if let Some(marker) = marker_of(req) {
                let n = super::group::kill_marked(&marker);
                if n > 0 {
                    log::warn!(task = req.task_id.as_str(); "killed {n} process(es) the agent had started outside its process group");
                }
            }
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
        out: &mut Output,
        req: &AgentRequest,
        transcript: &mut Transcript,
    ) -> ReadState {
        let mut got = false;
        for _ in 0..READS_PER_TURN {
            // SAFETY: reading into our own buffer from a pipe fd we own.
            let n = unsafe { libc::read(fd, self.buf.as_mut_ptr().cast(), self.buf.len()) };
            if n > 0 {
                got = true;
                out.take(stream, &self.buf[..n as usize], req, transcript);
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

fn unix_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The attempt's mark in its environment, which its descendants inherit.
fn marker_of(req: &AgentRequest) -> Option<String> {
    req.env
        .iter()
        .find(|(k, _)| k == super::spawn::MARKER_VAR)
        .map(|(_, v)| v.to_string_lossy().into_owned())
}

fn cancel_ending(r: CancelReason) -> Ending {
    match r {
        CancelReason::Cancel => Ending::Cancelled,
        CancelReason::Shutdown => Ending::ShutDown,
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

//! Running one agent child to its end: pipes polled with mio, timeouts,
//! cancellation, and the end of everything it started (`contain`). What the output
//! holds is `output`'s business, where it is written `transcript`'s.

use super::attempt::{AgentOutcome, AgentRequest, CancelReason, Ending};
use super::classify::{Class, Said, classify, wait_hint};
use super::contain::{Containment, Jail, Resources};
use super::output::Output;
use super::spawn::{Launcher, SpawnError, Spawned, Spec};
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
    /// The transcripts' buffer, handed from one attempt to the next.
    transcript_buf: Vec<u8>,
    launcher: Launcher,
    contain: Arc<Containment>,
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
    /// SIGKILL of the whole attempt once kill_grace has passed.
    fn enforce(&mut self, req: &AgentRequest, jail: &Jail, now: Instant) {
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
            jail.kill_all();
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
    pub fn new(contain: Arc<Containment>) -> io::Result<Supervisor> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        Ok(Supervisor {
            poll,
            events: Events::with_capacity(8),
            waker,
            buf: Vec::new(),
            transcript_buf: Vec::new(),
            launcher: Launcher::new()?,
            contain,
        })
    }

    pub fn run(&mut self, req: &AgentRequest) -> AgentOutcome {
        req.cancel.attach(self.waker.clone());
        if self.buf.len() != req.buffer_size {
            self.buf = vec![0; req.buffer_size.max(1)];
        }
        let started = Instant::now();
        let finish = |ending: Ending,
                      transcript: &mut Transcript,
                      out: Option<&Output>,
                      resources: Resources| {
            let none = Said::default();
            let said = match out {
                Some(o) => &o.said,
                None => &none,
            };
            let (mut class, mut decided_by) = classify(&ending, said, &req.rules);
            if resources.oom_kills > 0 {
                log::warn!(task = req.task_id.as_str();
                    "the kernel killed {} process(es) of this attempt at its memory limit (limits.max_memory_mb = {})",
                    resources.oom_kills, req.max_memory_mb);
                if class != Class::Success {
                    class = Class::Oom;
                    decided_by = Some(format!(
                        "{} process(es) killed at limits.max_memory_mb = {}",
                        resources.oom_kills, req.max_memory_mb
                    ));
                }
            }
            let wait_from = unix_seconds();
            let wait = matches!(class, Class::Throttled | Class::Quota)
                .then(|| wait_hint(&said.lines.join("\n"), wait_from))
                .flatten();
            let outcome = AgentOutcome {
                class,
                decided_by,
                wait,
                wait_from,
                usage: out.map(|o| o.usage).unwrap_or_default(),
                resources,
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
        let unstarted = |ending: Ending| {
            finish(
                ending,
                &mut Transcript::open(req, Vec::new()),
                None,
                Resources::default(),
            )
        };
        if let Some(r) = req.cancel.reason() {
            return unstarted(cancel_ending(r));
        }
        // A working directory that is gone is the child's chdir failing
        // (spawn says so): no stat of it before every start.
        let contain = self.contain.clone();
        let mut jail = contain.enter(&req.task_id, marker_of(req));
        let joins = jail.joins();
        let spawned = self
            .launcher
            .spawn(&Spec::agent(req, &joins, jail.rlimit_as()));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                jail.finish(req.kill_grace, None, &req.task_id);
                return match e {
                    SpawnError::Unavailable(m) => unstarted(Ending::Unavailable(m)),
                    SpawnError::Other(m) => unstarted(Ending::SpawnFailed(m)),
                };
            }
        };
        jail.started(child.id());
        // Created while the agent loads: the file system's cost of a new
        // transcript is off the path to the agent's start. Its output waits
        // in the pipes meanwhile.
        let mut transcript = Transcript::open(req, std::mem::take(&mut self.transcript_buf));
        let pid = child.id();
        req.progress.pid.store(pid as u32, Ordering::Relaxed);
        req.progress.bytes_read.store(0, Ordering::Relaxed);
        let mut out = Output::new(req);
        let ending = self.supervise(req, &mut child, &mut out, &mut transcript, &jail);
        // Nothing of the attempt is alive once this returns.
        let resources = jail.finish(req.kill_grace, child.rusage, &req.task_id);
        req.progress.pid.store(0, Ordering::Relaxed);
        out.finish(req);
        let outcome = finish(ending, &mut transcript, Some(&out), resources);
        self.transcript_buf = transcript.into_buffer();
        outcome
    }

    fn supervise(
        &mut self,
        req: &AgentRequest,
        child: &mut Spawned,
        out: &mut Output,
        transcript: &mut Transcript,
        jail: &Jail,
    ) -> Ending {
        let mut w = self.watch(req, child);
        let ending = loop {
            let now = Instant::now();
            w.enforce(req, jail, now);
            let status = match child.try_wait() {
                _ if w.exited.is_some() => None,
                Ok(s) => s,
                Err(e) => {
                    // Someone else reaped it: never wait for an exit that
                    // cannot be seen any more.
                    log::error!(task = req.task_id.as_str(); "cannot wait for agent pid {}: {e}; taking it as exited", w.pid);
                    Some(std::os::unix::process::ExitStatusExt::from_raw(255 << 8))
                }
            };
            if let Some(status) = status {
                w.exited = Some(status);
                // The attempt is its leader: what it leaves running goes now,
                // so the pipes close and the result waits for nothing.
                jail.kill_all();
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
        self.end(w, child, ending, jail)
    }

    /// Registers the child's pipes and exit notification with our poller.
    fn watch(&mut self, req: &AgentRequest, child: &mut Spawned) -> Watch {
        let pid = child.id();
        let pipes: [Option<OwnedFd>; 2] = [child.stdout.take(), child.stderr.take()];
        for (i, p) in pipes.iter().enumerate() {
            if let Some(fd) = p {
                // Non-blocking already (Spec::agent).
                let _ = self.poll.registry().register(
                    &mut SourceFd(&fd.as_raw_fd()),
                    Token(i),
                    Interest::READABLE,
                );
            }
        }
        let pidfd = child.pidfd.take().or_else(|| pidfd_open(pid));
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

    /// Unregisters the child and reaps it; the ending is ours when we
    /// stopped it, else its exit status.
    fn end(
        &mut self,
        w: Watch,
        child: &mut Spawned,
        ending: Option<Ending>,
        jail: &Jail,
    ) -> Ending {
        for fd in w.pipes.iter().chain([&w.pidfd]).flatten() {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
        let Watch {
            pid, pipes, exited, ..
        } = w;
        drop(pipes);
        let status = match exited {
            Some(s) => s,
            None => {
                signal_group(pid, libc::SIGKILL);
                jail.kill_all();
                match child.wait() {
                    Ok(s) => s,
                    Err(_) => return ending.unwrap_or(Ending::Signaled(libc::SIGKILL)),
                }
            }
        };
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

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: signalling the process group our child leads.
    unsafe { libc::kill(-pgid, sig) };
}

/// A pidfd becomes readable when the child exits, so exits need no polling.
/// None on kernels before 5.3.
pub(super) fn pidfd_open(pid: i32) -> Option<OwnedFd> {
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
    use crate::agent::output::tests::request;
    use crate::agent::profile::OutputMode;

    #[test]
    fn a_working_directory_that_is_gone_is_said_so() {
        let mut req = request(OutputMode::Text, None, &[]);
        req.program = "/bin/true".into();
        req.workdir = "/nonexistent/ralph-qchat-test".into();
        let mut s = Supervisor::new(Arc::new(Containment::group_only())).unwrap();
        let o = s.run(&req);
        match &o.ending {
            Ending::SpawnFailed(m) => assert!(
                m.contains("working directory /nonexistent/ralph-qchat-test does not exist"),
                "{m}"
            ),
            e => panic!("{e:?}"),
        }
        assert_eq!(o.class, Class::Failed);
    }
}

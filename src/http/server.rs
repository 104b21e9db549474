//! The health port's HTTP/1.1 server: one mio thread owns every connection
//! and a few handler threads compute answers.
//!
//! Our own and not tiny_http 0.12 (the latest release), which reads a header
//! line into an unbounded buffer, starts a thread per connection, keeps idle
//! connections forever and leaves its accept loop for good on the first
//! accept error. The port faces the network in containers, so everything a
//! peer can make us hold is bounded here: the head's size, the time to send
//! it, the time a kept-alive connection may idle, the time to take an answer,
//! the number of connections (the longest-waiting one makes room for a new
//! one), and the threads (fixed). An accept error (EMFILE) is logged, waited
//! out with back-off, and serving goes on.

use super::wire::{self, Parsed, Reply, Request};
use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What one peer may make the server hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request line and headers; more is a 431 and a close.
    pub max_head: usize,
    /// From a request's first byte (a new connection: from accept) to its end.
    pub head_timeout: Duration,
    /// A kept-alive connection with no new request.
    pub idle_timeout: Duration,
    /// To compute an answer and for the peer to take it.
    pub write_timeout: Duration,
    /// After an answer that closes: unread input is discarded this long (and
    /// up to 64 KiB) so the peer reads the answer instead of a reset.
    pub linger: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
            linger: Duration::from_secs(1),
            max_connections: 128,
        }
    }
}

pub type Handler = dyn Fn(&Request, SocketAddr) -> Reply + Send + Sync;

pub struct Server {
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    waker: Arc<Waker>,
    threads: Vec<JoinHandle<()>>,
    pub addr: SocketAddr,
}

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

struct Job {
    slot: usize,
    serial: u64,
    peer: SocketAddr,
    req: Request,
}

struct Done {
    slot: usize,
    serial: u64,
    bytes: Vec<u8>,
    close: bool,
}

/// Serves `listener` until `stop`, answering with `handler` on `handlers`
/// threads.
pub fn serve(
    listener: std::net::TcpListener,
    limits: Limits,
    handlers: usize,
    handler: Arc<Handler>,
) -> io::Result<Server> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let mut listener = TcpListener::from_std(listener);
    let poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let stop = Arc::new(AtomicBool::new(false));
    let open = Arc::new(AtomicUsize::new(0));
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Done>();
    let mut threads = Vec::new();
    for i in 0..handlers.max(1) {
        let (jobs, done, waker, handler) = (
            jobs_rx.clone(),
            done_tx.clone(),
            waker.clone(),
            handler.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || answer(&jobs, &done, &waker, &*handler))?,
        );
    }
    let mut l = Loop {
        poll,
        listener,
        limits,
        conns: Vec::new(),
        free: Vec::new(),
        open: open.clone(),
        serial: 0,
        jobs: jobs_tx,
        done: done_rx,
        next_sweep: None,
        accept_retry: None,
        backoff: FIRST_BACKOFF,
        refused: 0,
    };
    let flag = stop.clone();
    threads.push(
        std::thread::Builder::new()
            .name("http".into())
            .spawn(move || l.run(&flag))?,
    );
    Ok(Server {
        stop,
        open,
        waker,
        threads,
        addr,
    })
}

impl Server {
    /// Connections held now.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn answer(jobs: &Receiver<Job>, done: &Sender<Done>, waker: &Waker, handler: &Handler) {
    while let Ok(job) = jobs.recv() {
        let reply = handler(&job.req, job.peer);
        let date = crate::sys::time::http_date(std::time::SystemTime::now());
        let keep = job.req.keep_alive;
        let bytes = wire::response(
            &reply,
            job.req.method == "HEAD",
            keep,
            job.req.legacy_keep_alive,
            &date,
        );
        let d = Done {
            slot: job.slot,
            serial: job.serial,
            bytes,
            close: !keep,
        };
        if done.send(d).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for (the rest of) a request head.
    Reading,
    /// A handler has the request.
    Busy,
    /// Sending an answer; then close or read the next request.
    Writing { close: bool },
    /// Answered and shut for writing; discarding what still comes.
    Lingering,
}

struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    serial: u64,
    state: State,
    input: Vec<u8>,
    output: Vec<u8>,
    sent: usize,
    /// No byte of the current request has come yet.
    fresh: bool,
    /// When the current wait for a request began (who makes room first).
    since: Instant,
    deadline: Instant,
}

struct Loop {
    poll: Poll,
    listener: TcpListener,
    limits: Limits,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: Arc<AtomicUsize>,
    serial: u64,
    jobs: Sender<Job>,
    done: Receiver<Done>,
    next_sweep: Option<Instant>,
    accept_retry: Option<Instant>,
    backoff: Duration,
    refused: u64,
}

enum Step {
    Again,
    Wait,
    Close,
}

impl Loop {
    fn run(&mut self, stop: &AtomicBool) {
        let mut events = Events::with_capacity(256);
        while !stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let wake = [self.next_sweep, self.accept_retry]
                .into_iter()
                .flatten()
                .min();
            let timeout = wake.map(|w| w.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::warn!("health port: waiting for connections failed: {e}; trying again");
                    std::thread::sleep(FIRST_BACKOFF);
                }
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => {
                        if self.accept_retry.is_none() {
                            self.accept_all();
                        }
                    }
                    WAKER => {}
                    Token(slot) => self.drive(slot),
                }
            }
            while let Ok(d) = self.done.try_recv() {
                self.answered(d);
            }
            let now = Instant::now();
            if self.accept_retry.is_some_and(|t| now >= t) {
                self.accept_retry = None;
                self.accept_all();
            }
            if self.next_sweep.is_some_and(|t| now >= t) {
                self.sweep(now);
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if self.refused > 0 {
                        log::info!(
                            "health port: accepting connections again ({} accept attempts had failed)",
                            self.refused
                        );
                        self.refused = 0;
                    }
                    self.backoff = FIRST_BACKOFF;
                    self.admit(stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM: the waiting
                    // connection stays in the backlog; try again later.
                    if self.refused == 0 {
                        log::warn!(
                            "health port: cannot accept a connection: {e}; serving the {} open ones and \
                             trying again with back-off (raise LimitNOFILE= if descriptors run out)",
                            self.open.load(Ordering::Relaxed)
                        );
                    }
                    self.refused += 1;
                    self.accept_retry = Some(Instant::now() + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        if self.open.load(Ordering::Relaxed) >= self.limits.max_connections && !self.make_room() {
            return;
        }
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if self
            .poll
            .registry()
            .register(
                &mut stream,
                Token(slot),
                Interest::READABLE | Interest::WRITABLE,
            )
            .is_err()
        {
            self.free.push(slot);
            return;
        }
        let _ = stream.set_nodelay(true);
        let now = Instant::now();
        self.serial += 1;
        let deadline = now + self.limits.head_timeout;
        self.conns[slot] = Some(Conn {
            stream,
            peer,
            serial: self.serial,
            state: State::Reading,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            fresh: true,
            since: now,
            deadline,
        });
        self.open.fetch_add(1, Ordering::Relaxed);
        self.watch(deadline);
    }

    /// At the cap: closes a lingering connection, else the one that has
    /// waited longest for a request. False when every one is being answered.
    fn make_room(&mut self) -> bool {
        let victim = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| matches!(c.state, State::Reading | State::Lingering))
            .min_by_key(|(_, c)| (c.state != State::Lingering, c.since))
            .map(|(i, _)| i);
        match victim {
            Some(i) => {
                self.close(i);
                true
            }
            None => false,
        }
    }

    fn watch(&mut self, deadline: Instant) {
        self.next_sweep = Some(self.next_sweep.map_or(deadline, |t| t.min(deadline)));
    }

    fn close(&mut self, slot: usize) {
        if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            self.free.push(slot);
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn sweep(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.as_ref().is_some_and(|c| c.deadline <= now))
            .map(|(i, _)| i)
            .collect();
        for i in late {
            self.close(i);
        }
        self.next_sweep = self.conns.iter().flatten().map(|c| c.deadline).min();
    }

    fn answered(&mut self, d: Done) {
        let write_timeout = self.limits.write_timeout;
        let Some(c) = self.conns.get_mut(d.slot).and_then(Option::as_mut) else {
            return;
        };
        if c.serial != d.serial || c.state != State::Busy {
            return;
        }
        c.output = d.bytes;
        c.sent = 0;
        c.state = State::Writing { close: d.close };
        c.deadline = Instant::now() + write_timeout;
        let deadline = c.deadline;
        self.watch(deadline);
        self.drive(d.slot);
    }

    fn drive(&mut self, slot: usize) {
        loop {
            let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let before = c.deadline;
            let step = match c.state {
                State::Writing { close } => write(c, close, &self.limits),
                State::Reading => read(c, &self.limits, &self.jobs, slot),
                State::Busy => Step::Wait,
                State::Lingering => discard(c, LINGER_BYTES),
            };
            let after = c.deadline;
            if after != before {
                self.watch(after);
            }
            match step {
                Step::Again => {}
                Step::Wait => return,
                Step::Close => {
                    self.close(slot);
                    return;
                }
            }
        }
    }
}

fn write(c: &mut Conn, close: bool, limits: &Limits) -> Step {
    while c.sent < c.output.len() {
        match c.stream.write(&c.output[c.sent..]) {
            Ok(0) => return Step::Close,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Close,
        }
    }
    c.output = Vec::new();
    c.sent = 0;
    let now = Instant::now();
    if close {
        let _ = c.stream.shutdown(std::net::Shutdown::Write);
        c.state = State::Lingering;
        // Counts what is discarded from here on.
        c.sent = 0;
        c.deadline = now + limits.linger;
    } else {
        c.state = State::Reading;
        c.fresh = true;
        c.since = now;
        c.deadline = now + limits.idle_timeout;
    }
    Step::Again
}

fn read(c: &mut Conn, limits: &Limits, jobs: &Sender<Job>, slot: usize) -> Step {
    let refuse = |c: &mut Conn, code: u16, why: &str| {
        let r = Reply::error(code, why);
        let date = crate::sys::time::http_date(std::time::SystemTime::now());
        c.output = wire::response(&r, false, false, false, &date);
        c.sent = 0;
        c.state = State::Writing { close: true };
        c.deadline = Instant::now() + limits.write_timeout;
        Step::Again
    };
    match wire::parse(&c.input) {
        Parsed::Done(req, n) => {
            c.input.drain(..n);
            c.state = State::Busy;
            c.deadline = Instant::now() + limits.write_timeout;
            let job = Job {
                slot,
                serial: c.serial,
                peer: c.peer,
                req,
            };
            if jobs.send(job).is_err() {
                return Step::Close;
            }
            return Step::Wait;
        }
        Parsed::Bad(code, why) => return refuse(c, code, why),
        Parsed::Partial => {}
    }
    let room = limits.max_head.saturating_sub(c.input.len());
    if room == 0 {
        return refuse(
            c,
            431,
            &format!("request head larger than {} bytes", limits.max_head),
        );
    }
    let mut chunk = [0u8; 4096];
    let want = room.min(chunk.len());
    match c.stream.read(&mut chunk[..want]) {
        Ok(0) => Step::Close,
        Ok(n) => {
            if c.fresh {
                c.fresh = false;
                c.deadline = c.deadline.min(Instant::now() + limits.head_timeout);
            }
            c.input.extend_from_slice(&chunk[..n]);
            Step::Again
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Step::Wait,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Step::Again,
        Err(_) => Step::Close,
    }
}

fn discard(c: &mut Conn, most: usize) -> Step {
    let mut chunk = [0u8; 4096];
    loop {
        match c.stream.read(&mut chunk) {
            Ok(0) => return Step::Close,
            Ok(n) => {
                c.sent += n;
                if c.sent > most {
                    return Step::Close;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Close,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream as Std;

    fn serve_with(limits: Limits) -> Server {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let handler = |r: &Request, _: SocketAddr| Reply {
            status: 200,
            content_type: "text/plain",
            body: r.path.clone().into_bytes(),
            allow: None,
        };
        serve(l, limits, 2, Arc::new(handler)).unwrap()
    }

    fn connect(s: &Server) -> Std {
        let c = Std::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c
    }

    /// Everything until the server closes, and how long that took.
    fn until_closed(c: &mut Std) -> (String, Duration) {
        let t = Instant::now();
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
        (String::from_utf8_lossy(&buf).into_owned(), t.elapsed())
    }

    fn short() -> Limits {
        Limits {
            head_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            linger: Duration::from_millis(200),
            ..Limits::default()
        }
    }

    #[test]
    fn pipelined_requests_are_answered_in_order_and_head_has_no_body() {
        let s = serve_with(short());
        let mut c = connect(&s);
        c.write_all(
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nHEAD /two HTTP/1.1\r\nHost: a\r\n\r\nGET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let (text, _) = until_closed(&mut c);
        let one = text.find("\r\n\r\n/one").unwrap();
        let two = text[one..].find("HTTP/1.1 200 OK").unwrap() + one;
        assert!(text[two..].contains("Content-Length: 4\r\n"), "{text}");
        assert!(text.ends_with("Connection: close\r\n\r\n/three"), "{text}");
        assert!(!text.contains("/two"), "HEAD answered with a body: {text}");
        s.stop();
    }

    #[test]
    fn a_head_over_the_cap_is_431_and_the_connection_closes() {
        let s = serve_with(short());
        let mut c = connect(&s);
        let mut w = c.try_clone().unwrap();
        // Far more than the cap, sent while the answer is read: the server
        // stops reading at 16 KiB.
        let sender = std::thread::spawn(move || {
            let line = vec![b'a'; 64 * 1024];
            let _ = w.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ");
            let mut sent = 0usize;
            while sent < 64 << 20 && w.write_all(&line).is_ok() {
                sent += line.len();
            }
            sent
        });
        let (text, _) = until_closed(&mut c);
        assert!(
            text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{text}"
        );
        assert!(text.contains("Connection: close"), "{text}");
        assert!(sender.join().unwrap() < 64 << 20, "the server read it all");
        s.stop();
    }

    #[test]
    fn a_slow_head_and_an_idle_keep_alive_connection_are_closed_at_their_deadlines() {
        let s = serve_with(short());
        // One byte of a head, then nothing.
        let mut slow = connect(&s);
        slow.write_all(b"G").unwrap();
        let (text, took) = until_closed(&mut slow);
        assert_eq!(text, "");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        // Answered, then idle.
        let mut idle = connect(&s);
        idle.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        let (text, took) = until_closed(&mut idle);
        assert!(text.ends_with("/x"), "{text}");
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        s.stop();
    }

    #[test]
    fn at_the_cap_the_longest_waiting_connection_makes_room() {
        let s = serve_with(Limits {
            max_connections: 4,
            ..Limits::default()
        });
        let mut old: Vec<Std> = (0..4).map(|_| connect(&s)).collect();
        for c in &mut old {
            c.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        }
        // Once the server holds all four, a fifth comes and is answered.
        let t = Instant::now();
        while s.connections() < 4 {
            assert!(t.elapsed() < Duration::from_secs(5), "{}", s.connections());
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut new = connect(&s);
        new.write_all(b"GET /new HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .unwrap();
        let (text, _) = until_closed(&mut new);
        assert!(text.ends_with("/new"), "{text}");
        // The first one was closed to make room; the others still wait.
        let (text, took) = until_closed(&mut old[0]);
        assert_eq!(text, "");
        assert!(took < Duration::from_secs(1), "{took:?}");
        s.stop();
    }

    #[test]
    fn malformed_and_http2_get_their_status_and_a_close() {
        let s = serve_with(short());
        for (raw, want) in [
            (&b"\xff\x00\r\n\r\n"[..], "HTTP/1.1 400 "),
            (b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 400 "),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/1.1 505 "),
        ] {
            let mut c = connect(&s);
            c.write_all(raw).unwrap();
            let (text, _) = until_closed(&mut c);
            assert!(text.starts_with(want), "{text}");
            assert!(text.contains("Connection: close\r\n"), "{text}");
        }
        s.stop();
    }
}

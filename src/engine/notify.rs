//! systemd notifications (sd_notify): READY, STATUS, WATCHDOG, RELOADING,
//! STOPPING. Silent when not run by systemd. Written here rather than with the
//! sd-notify crate because its sends block when the receiver is slow or stuck,
//! and a notification must never stall the scheduler: ours are non-blocking
//! and dropped (with a debug line) when the socket is full.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half of WATCHDOG_USEC, when the unit has a watchdog.
    pub watchdog_every: Option<Duration>,
    pub next_watchdog: Option<Instant>,
    last_status: String,
    status_at: Option<Instant>,
}

/// The notification socket named by NOTIFY_SOCKET (a path, or `@name` for
/// the abstract namespace).
fn target() -> Option<(UnixDatagram, SocketAddr)> {
    let path = std::env::var_os("NOTIFY_SOCKET")?;
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name).ok()?,
        None => SocketAddr::from_pathname(std::path::Path::new(&path)).ok()?,
    };
    let sock = UnixDatagram::unbound().ok()?;
    sock.set_nonblocking(true).ok()?;
    Some((sock, addr))
}

fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec) / 2)
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let target = target();
        let watchdog_every = watchdog_interval().filter(|_| target.is_some());
        Notifier {
            target,
            watchdog_every,
            next_watchdog: watchdog_every.map(|_| Instant::now()),
            last_status: String::new(),
            status_at: None,
        }
    }

    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog_every: None,
            next_watchdog: None,
            last_status: String::new(),
            status_at: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    fn send(&self, msg: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(msg.as_bytes(), addr) {
                log::debug!("systemd notification not sent ({e}): {msg:?}");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    pub fn reloading(&self) {
        self.send("RELOADING=1\n");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping\n");
    }

    /// STATUS= when it changed, at most once a second.
    pub fn status(&mut self, status: String) {
        if !self.enabled() || status == self.last_status {
            return;
        }
        if self
            .status_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.send(&format!("STATUS={status}\n"));
        self.last_status = status;
        self.status_at = Some(Instant::now());
    }

    /// Pets the watchdog when due; called from the scheduler's own loop, so a
    /// stuck scheduler stops the pings and systemd restarts the unit.
    pub fn tick(&mut self, now: Instant) {
        if let (Some(every), Some(due)) = (self.watchdog_every, self.next_watchdog) {
            if now >= due {
                self.send("WATCHDOG=1\n");
                self.next_watchdog = Some(now + every);
            }
        }
    }
}

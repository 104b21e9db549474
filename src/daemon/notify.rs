//! systemd notifications (sd_notify): READY, STATUS, WATCHDOG, RELOADING,
//! STOPPING. Silent when not run by systemd.

use sd_notify::NotifyState;
use std::time::{Duration, Instant};

pub struct Notifier {
    enabled: bool,
    /// Half of WATCHDOG_USEC, when the unit has a watchdog.
    pub watchdog_every: Option<Duration>,
    pub next_watchdog: Option<Instant>,
    last_status: String,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog_every = sd_notify::watchdog_enabled()
            .map(|d| d / 2)
            .filter(|_| enabled);
        Notifier {
            enabled,
            watchdog_every,
            next_watchdog: watchdog_every.map(|_| Instant::now()),
            last_status: String::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn disabled() -> Notifier {
        Notifier {
            enabled: false,
            watchdog_every: None,
            next_watchdog: None,
            last_status: String::new(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(states) {
                log::warn!("cannot notify systemd: {e}");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        self.send(&[NotifyState::Reloading]);
    }

    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub fn status(&mut self, status: String) {
        if self.enabled && status != self.last_status {
            self.send(&[NotifyState::Status(&status)]);
            self.last_status = status;
        }
    }

    /// Pets the watchdog when due; called from the scheduler's own loop, so a
    /// stuck scheduler stops the pings and systemd restarts the unit.
    pub fn tick(&mut self, now: Instant) {
        if let (Some(every), Some(due)) = (self.watchdog_every, self.next_watchdog) {
            if now >= due {
                self.send(&[NotifyState::Watchdog]);
                self.next_watchdog = Some(now + every);
            }
        }
    }
}

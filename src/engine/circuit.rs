//! Circuit breaker across all tasks: after `threshold` failed requests in a
//! row nothing is dispatched for `cooldown`; then one probe decides.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// Cooldown over: one probe request may go.
    HalfOpen {
        probe_in_flight: bool,
    },
}

#[derive(Debug)]
pub struct Circuit {
    pub state: State,
    failures: u32,
    threshold: u32,
    cooldown: Duration,
    /// Why it opened last, for logs, /health and diagnostics.
    pub reason: Option<String>,
    pub opened_total: u64,
}

impl Circuit {
    pub fn new(threshold: u32, cooldown: Duration) -> Circuit {
        Circuit {
            state: State::Closed,
            failures: 0,
            threshold,
            cooldown,
            reason: None,
            opened_total: 0,
        }
    }

    pub fn configure(&mut self, threshold: u32, cooldown: Duration) {
        self.threshold = threshold;
        self.cooldown = cooldown;
    }

    /// Whether a request may be dispatched now (moving Open → HalfOpen when due).
    pub fn allows(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen {
                    probe_in_flight: false,
                };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probe_in_flight } => !probe_in_flight,
        }
    }

    /// A request was dispatched.
    pub fn dispatched(&mut self) {
        if let State::HalfOpen { .. } = self.state {
            self.state = State::HalfOpen {
                probe_in_flight: true,
            };
        }
    }

    /// The probe came back saying nothing about the agent's health (it was
    /// cancelled, throttled, out of quota): another request may probe.
    pub fn undecided(&mut self) {
        if let State::HalfOpen { .. } = self.state {
            self.state = State::HalfOpen {
                probe_in_flight: false,
            };
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.state = State::Closed;
        self.reason = None;
    }

    /// A failed request; true when this opened the circuit.
    pub fn failure(&mut self, now: Instant, why: &str) -> bool {
        self.failures += 1;
        let trip = matches!(self.state, State::HalfOpen { .. })
            || (self.state == State::Closed && self.failures >= self.threshold);
        if trip {
            self.open(now, why);
        }
        trip
    }

    /// The agent cannot run at all: open at once. True when it was not open yet.
    pub fn trip(&mut self, now: Instant, why: &str) -> bool {
        if matches!(self.state, State::Open { .. }) {
            return false;
        }
        self.open(now, why);
        true
    }

    fn open(&mut self, now: Instant, why: &str) {
        self.state = State::Open {
            until: now + self.cooldown,
        };
        self.reason = Some(why.to_string());
        self.opened_total += 1;
    }

    pub fn reopens_at(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    pub fn is_open(&self) -> bool {
        !matches!(self.state, State::Closed)
    }

    pub fn label(&self) -> &'static str {
        match self.state {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_then_probes() {
        let t0 = Instant::now();
        let mut c = Circuit::new(3, Duration::from_secs(10));
        assert!(!c.failure(t0, "x"));
        assert!(!c.failure(t0, "x"));
        assert!(c.failure(t0, "x"));
        assert!(!c.allows(t0 + Duration::from_secs(9)));
        assert!(c.allows(t0 + Duration::from_secs(10)));
        c.dispatched();
        assert!(!c.allows(t0 + Duration::from_secs(10)), "only one probe");
        // The probe fails: open again for a full cooldown.
        assert!(c.failure(t0 + Duration::from_secs(11), "x"));
        assert!(!c.allows(t0 + Duration::from_secs(20)));
        assert!(c.allows(t0 + Duration::from_secs(21)));
        c.dispatched();
        c.success();
        assert_eq!(c.state, State::Closed);
        assert!(!c.failure(t0, "x"), "the count starts again");
    }

    #[test]
    fn an_undecided_probe_lets_the_next_one_go() {
        let t0 = Instant::now();
        let mut c = Circuit::new(1, Duration::from_secs(1));
        c.failure(t0, "x");
        let later = t0 + Duration::from_secs(2);
        assert!(c.allows(later));
        c.dispatched();
        assert!(!c.allows(later));
        c.undecided();
        assert!(
            c.allows(later),
            "a cancelled probe must not stop dispatch for good"
        );
    }

    #[test]
    fn success_resets_the_count_and_trip_opens_at_once() {
        let t0 = Instant::now();
        let mut c = Circuit::new(2, Duration::from_secs(5));
        c.failure(t0, "x");
        c.success();
        assert!(!c.failure(t0, "x"));
        assert!(c.trip(t0, "missing"));
        assert!(!c.trip(t0, "missing"), "already open: not news");
        assert_eq!(c.reason.as_deref(), Some("missing"));
    }
}

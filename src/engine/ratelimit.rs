//! One token bucket across all tasks: `per_minute` requests a minute, bursts
//! of up to one second's worth (at least one).

use std::time::Instant;

#[derive(Debug)]
pub struct Bucket {
    per_minute: u32,
    tokens: f64,
    last: Instant,
    pub limited_total: u64,
}

impl Bucket {
    pub fn new(per_minute: u32, now: Instant) -> Bucket {
        let mut b = Bucket {
            per_minute,
            tokens: 0.0,
            last: now,
            limited_total: 0,
        };
        b.tokens = b.capacity();
        b
    }

    pub fn configure(&mut self, per_minute: u32) {
        self.per_minute = per_minute;
        self.tokens = self.tokens.min(self.capacity());
    }

    fn capacity(&self) -> f64 {
        (self.per_minute as f64 / 60.0).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_minute as f64 / 60.0).min(self.capacity());
    }

    /// None when a request may go now, else when the next token is due.
    pub fn wait(&mut self, now: Instant) -> Option<Instant> {
        self.wait_behind(now, 0)
    }

    /// The same, with `ahead` requests admitted that have not taken their
    /// token yet.
    pub fn wait_behind(&mut self, now: Instant, ahead: u32) -> Option<Instant> {
        if self.per_minute == 0 {
            return None;
        }
        self.refill(now);
        let need = 1.0 + f64::from(ahead);
        if self.tokens >= need {
            None
        } else {
            let secs = (need - self.tokens) * 60.0 / self.per_minute as f64;
            Some(now + crate::sys::time::seconds(secs))
        }
    }

    pub fn take(&mut self, now: Instant) {
        if self.per_minute == 0 {
            return;
        }
        self.refill(now);
        self.tokens -= 1.0;
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unlimited_never_waits() {
        let t = Instant::now();
        let mut b = Bucket::new(0, t);
        for _ in 0..1000 {
            assert_eq!(b.wait(t), None);
            b.take(t);
        }
    }

    #[test]
    fn holds_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(120, t0); // 2 a second, bursts of 2
        let mut sent = 0;
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            match b.wait(now) {
                None => {
                    b.take(now);
                    sent += 1;
                }
                Some(t) => now = t,
            }
        }
        assert!((20..=22).contains(&sent), "{sent}");
    }
}

//! Counting what agent runs did: the totals of the periodic summary line,
//! and the Prometheus counters each ending bumps.

use crate::agent::{AgentOutcome, Class, Ending};
use crate::metrics::METRICS;
use std::time::Duration;

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub requests: u64,
    pub iterations: u64,
    pub successes: u64,
    pub failures: u64,
    pub retries: u64,
    pub total_time: Duration,
    pub max_time: Duration,
    pub paused_by_circuit: u64,
}

impl Stats {
    pub fn record_request(&mut self, o: &AgentOutcome) {
        self.requests += 1;
        self.total_time += o.duration;
        self.max_time = self.max_time.max(o.duration);
    }

    pub fn summary(&self) -> String {
        let mean = if self.requests == 0 {
            0.0
        } else {
            self.total_time.as_secs_f64() / self.requests as f64
        };
        format!(
            "summary: {} iterations ({} succeeded, {} failed), {} agent requests, {} retries, request time mean {:.3} s max {:.3} s",
            self.iterations,
            self.successes,
            self.failures,
            self.requests,
            self.retries,
            mean,
            self.max_time.as_secs_f64()
        )
    }
}

/// An agent run's duration and, when it went wrong, its class as the
/// error type.
pub fn count_in_metrics(o: &AgentOutcome) {
    METRICS.request_done(o.duration.as_secs_f64());
    let kind = match o.class {
        Class::Success => None,
        Class::Stopped if o.ending == Ending::Cancelled => Some("cancelled"),
        Class::Stopped => None,
        c => Some(c.as_str()),
    };
    if let Some(k) = kind {
        METRICS.error(k);
    }
    if o.truncated() {
        METRICS.error("output_truncated");
    }
}

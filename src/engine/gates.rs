//! The dispatch gates, behind one question — may a request go now? — and the
//! feedback that moves them: the account's pauses (throttle, quota, auth,
//! preflight), the circuit breaker (daemon only), the rate bucket, and the
//! opt-in response cache.

use super::account::{Account, unix_now};
use super::cache::{self, Cache};
use super::circuit::Circuit;
use super::ratelimit::Bucket;
use crate::agent::{AgentOutcome, AgentRequest};
use crate::config::{self, Config};
use crate::task::rules::Verdict;
use std::time::Instant;

/// Why a request may not go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The account: a preflight runs, a quota or auth pause, a throttle wait.
    Account,
    Circuit,
    Rate,
}

pub struct Gates {
    pub account: Account,
    circuit: Circuit,
    bucket: Bucket,
    cache: Option<Cache>,
    cache_cfg: config::Cache,
    /// `run` has one task and reports an unusable agent at once: no circuit.
    circuit_on: bool,
    threshold: u32,
    cooldown: f64,
    /// Admitted and not yet started or given up (their prompt is being
    /// read): each holds a token it has not taken, and the circuit's probe.
    reserved: u32,
}

fn cache_for(c: &config::Cache) -> Option<Cache> {
    c.enabled
        .then(|| Cache::new(c.max_size as usize, crate::sys::time::seconds(c.ttl)))
}

impl Gates {
    pub fn new(cfg: &Config, circuit_on: bool, now: Instant, account: Account) -> Gates {
        let cb = &cfg.circuit_breaker;
        Gates {
            account,
            circuit: Circuit::new(cb.failure_threshold, crate::sys::time::seconds(cb.cooldown)),
            bucket: Bucket::new(cfg.performance.max_requests_per_minute, now),
            cache: cache_for(&cfg.cache),
            cache_cfg: cfg.cache.clone(),
            circuit_on,
            threshold: cb.failure_threshold,
            cooldown: cb.cooldown,
            reserved: 0,
        }
    }

    /// A reloaded configuration; the cache starts afresh only when its
    /// settings changed.
    pub fn configure(&mut self, cfg: &Config) {
        let cb = &cfg.circuit_breaker;
        self.circuit
            .configure(cb.failure_threshold, crate::sys::time::seconds(cb.cooldown));
        self.threshold = cb.failure_threshold;
        self.cooldown = cb.cooldown;
        self.bucket
            .configure(cfg.performance.max_requests_per_minute);
        if cfg.cache != self.cache_cfg {
            self.cache = cache_for(&cfg.cache);
            self.cache_cfg = cfg.cache.clone();
        }
    }

    /// May a request go now? A closed gate keeps the task at the head of the
    /// queue, unspent. An admitted request holds its place in the gates
    /// until it `take`s them or is given up (`unreserve`).
    pub fn admit(&mut self, now: Instant) -> Result<(), Closed> {
        if self.account.closed(now, unix_now()).is_some() {
            return Err(Closed::Account);
        }
        if self.circuit_on && !self.circuit.allows(now) {
            return Err(Closed::Circuit);
        }
        if self.bucket.wait_behind(now, self.reserved).is_some() {
            self.bucket.limited_total += 1;
            return Err(Closed::Rate);
        }
        if self.circuit_on {
            // A half-open circuit's one probe is this request's from now.
            self.circuit.dispatched();
        }
        self.reserved += 1;
        Ok(())
    }

    /// An admitted request ended before an agent was asked (the task ended,
    /// waits, or the daemon stops): its token stays, its probe is released.
    pub fn unreserve(&mut self) {
        self.reserved = self.reserved.saturating_sub(1);
        if self.circuit_on {
            self.circuit.undecided();
        }
    }

    /// When a closed gate may open.
    pub fn next_open(&mut self, now: Instant) -> Option<Instant> {
        if self.account.closed(now, unix_now()).is_some() {
            return self.account.opens_at(now, unix_now());
        }
        self.bucket
            .wait_behind(now, self.reserved)
            .into_iter()
            .chain(self.circuit.reopens_at())
            .max()
    }

    /// The cache key of a request, when the cache is on.
    pub fn key(&self, req: &AgentRequest, prompt: &[u8]) -> Option<u64> {
        self.cache
            .as_ref()
            .map(|_| cache::key(&req.program, &req.args, &req.workdir, prompt))
    }

    /// A recorded answer to an identical request; None: the request goes
    /// to an agent, and takes its token (and the circuit's probe) now.
    pub fn take(&mut self, key: Option<u64>, now: Instant) -> Option<AgentOutcome> {
        self.reserved = self.reserved.saturating_sub(1);
        if let (Some(c), Some(k)) = (self.cache.as_mut(), key) {
            if let Some(hit) = c.get(k, now) {
                return Some(hit);
            }
        }
        self.bucket.take(now);
        if self.circuit_on {
            self.circuit.dispatched();
        }
        None
    }

    /// What an agent run's verdict tells the gates.
    pub fn judged(
        &mut self,
        verdict: &Verdict,
        detail: &str,
        key: Option<u64>,
        o: &AgentOutcome,
        now: Instant,
    ) {
        if self.circuit_on {
            match verdict {
                Verdict::Success => {
                    if self.circuit.is_open() {
                        log::info!("circuit breaker closed: requests succeed again");
                    }
                    self.circuit.success();
                }
                Verdict::Retry | Verdict::Failed => {
                    if self.circuit.failure(now, detail) {
                        log::warn!(
                            "circuit breaker open after {} failed requests in a row (last: {detail}); no requests for {:.0} s",
                            self.threshold,
                            self.cooldown
                        );
                    }
                }
                // Unavailable trips the circuit itself (`unavailable`).
                Verdict::Unavailable => {}
                _ => self.circuit.undecided(),
            }
        }
        if let (Verdict::Success, Some(c), Some(k)) = (verdict, self.cache.as_mut(), key) {
            c.put(k, o.clone(), now);
        }
    }

    /// The agent command cannot run at all: no requests for a cooldown.
    pub fn unavailable(&mut self, detail: &str, now: Instant) {
        if self.circuit.trip(now, detail) {
            log::error!(
                "{detail}; no agent requests for {:.0} s (circuit_breaker.cooldown), then one probe; tasks wait",
                self.cooldown
            );
        }
    }

    pub fn circuit(&self) -> &Circuit {
        &self.circuit
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    pub fn cache_entries(&self) -> Option<usize> {
        self.cache.as_ref().map(|c| c.len())
    }
}

//! The loop's decisions as plain functions: limits, retry delays, and what an
//! agent run's ending means for the iteration.

use crate::agent::{Class, Ending, Usage};
use std::time::Duration;

/// The limits that apply to one task.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_iterations: u64,
    pub max_runtime: f64,
    pub max_consecutive_failures: u32,
    pub max_retries: u32,
    /// 0 = no cap.
    pub max_credits: f64,
    pub max_cost_usd: f64,
}

/// Which limit, if any, stops the task before iteration `next` starts,
/// given what it has spent so far.
pub fn limit_before(
    next: u64,
    runtime_secs: f64,
    spent: &Usage,
    l: &Limits,
) -> Option<&'static str> {
    if next > l.max_iterations {
        Some("max_iterations")
    } else if runtime_secs >= l.max_runtime {
        Some("max_runtime")
    } else if l.max_credits > 0.0 && spent.credits >= l.max_credits {
        Some("max_credits")
    } else if l.max_cost_usd > 0.0 && spent.cost_usd >= l.max_cost_usd {
        Some("max_cost_usd")
    } else {
        None
    }
}

/// Delay before retry `attempt` (1 = the first retry): base × 2^(attempt−1),
/// up to a quarter more by `jitter` in [0, 1), capped.
pub fn retry_delay(base: f64, attempt: u32, cap: f64, jitter: f64) -> Duration {
    let exp = 2f64.powi(attempt.saturating_sub(1).min(60) as i32);
    let d = (base * exp * (1.0 + 0.25 * jitter.clamp(0.0, 1.0))).min(cap);
    crate::sys::time::seconds(d.max(0.0))
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Success,
    /// Try the same iteration again after a delay.
    Retry,
    /// Retries exhausted: the iteration failed.
    Failed,
    /// The agent command cannot run: stop, tell the operator.
    Unavailable,
    /// Stopped by max_runtime: the task ends on its limit.
    RuntimeOut,
    Cancelled,
    /// Stopped by our shutdown: the iteration is interrupted, not failed.
    Interrupted,
    /// The API asked us to slow down: the same iteration again after a
    /// shared wait; neither a retry nor a failure.
    Throttled,
    /// The account is out of requests: every task of the profile pauses.
    Quota,
    /// The agent is not logged in: not retried; the profile pauses.
    Auth,
}

/// What an attempt's class means, given that `retries_done` retries were
/// already made; the ending tells apart the ways we stopped it.
pub fn judge(class: Class, ending: &Ending, retries_done: u32, max_retries: u32) -> Verdict {
    match class {
        Class::Success => Verdict::Success,
        Class::Unavailable => Verdict::Unavailable,
        Class::Throttled => Verdict::Throttled,
        Class::Quota => Verdict::Quota,
        Class::Auth => Verdict::Auth,
        // The same conversation would overflow again: no retries.
        Class::ContextLimit => Verdict::Failed,
        Class::Stopped => match ending {
            Ending::RuntimeExceeded => Verdict::RuntimeOut,
            Ending::Cancelled => Verdict::Cancelled,
            _ => Verdict::Interrupted,
        },
        Class::Failed | Class::Timeout | Class::IdleTimeout | Class::Oom
            if retries_done < max_retries =>
        {
            Verdict::Retry
        }
        Class::Failed | Class::Timeout | Class::IdleTimeout | Class::Oom => Verdict::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        max_iterations: 3,
        max_runtime: 10.0,
        max_consecutive_failures: 2,
        max_retries: 2,
        max_credits: 1.0,
        max_cost_usd: 0.0,
    };

    #[test]
    fn limits() {
        let none = Usage::default();
        assert_eq!(limit_before(3, 0.0, &none, &L), None);
        assert_eq!(limit_before(4, 0.0, &none, &L), Some("max_iterations"));
        assert_eq!(limit_before(1, 10.0, &none, &L), Some("max_runtime"));
        let spent = Usage {
            credits: 1.0,
            cost_usd: 50.0,
            tokens: 9,
        };
        assert_eq!(limit_before(1, 0.0, &spent, &L), Some("max_credits"));
        // 0 means no cap: any cost goes.
        let l = Limits {
            max_credits: 0.0,
            max_cost_usd: 0.0,
            ..L
        };
        assert_eq!(limit_before(1, 0.0, &spent, &l), None);
        let l = Limits {
            max_credits: 0.0,
            max_cost_usd: 50.0,
            ..L
        };
        assert_eq!(limit_before(1, 0.0, &spent, &l), Some("max_cost_usd"));
    }

    #[test]
    fn delays_double_with_bounded_jitter_and_cap() {
        assert_eq!(retry_delay(1.0, 1, 60.0, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(1.0, 3, 60.0, 0.0), Duration::from_secs(4));
        assert_eq!(retry_delay(1.0, 3, 60.0, 1.0), Duration::from_secs(5));
        assert_eq!(retry_delay(1.0, 10, 60.0, 0.5), Duration::from_secs(60));
        assert_eq!(retry_delay(1.0, 1000, 60.0, 0.5), Duration::from_secs(60));
        // Even the largest jitter never makes a retry wait less than the one before.
        for a in 1..8 {
            assert!(retry_delay(0.5, a, 1e9, 1.0) < retry_delay(0.5, a + 1, 1e9, 0.0));
        }
    }

    #[test]
    fn verdicts() {
        let e = Ending::Exited(0);
        assert_eq!(judge(Class::Success, &e, 0, 2), Verdict::Success);
        assert_eq!(judge(Class::Failed, &e, 0, 2), Verdict::Retry);
        assert_eq!(
            judge(Class::Timeout, &Ending::TimedOut, 2, 2),
            Verdict::Failed
        );
        assert_eq!(judge(Class::Unavailable, &e, 0, 2), Verdict::Unavailable);
        assert_eq!(
            judge(Class::Stopped, &Ending::ShutDown, 0, 2),
            Verdict::Interrupted
        );
        assert_eq!(
            judge(Class::Stopped, &Ending::Cancelled, 0, 2),
            Verdict::Cancelled
        );
        assert_eq!(
            judge(Class::Stopped, &Ending::RuntimeExceeded, 0, 2),
            Verdict::RuntimeOut
        );
        // Throttling is neither a retry nor a failure, however often.
        assert_eq!(judge(Class::Throttled, &e, 2, 2), Verdict::Throttled);
        assert_eq!(judge(Class::ContextLimit, &e, 0, 2), Verdict::Failed);
        assert_eq!(judge(Class::Auth, &e, 0, 2), Verdict::Auth);
        assert_eq!(judge(Class::Quota, &e, 0, 2), Verdict::Quota);
    }
}

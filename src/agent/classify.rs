//! What an attempt's outcome means, decided from how it ended and what it
//! said: real CLIs exit 0 after a rate limit, an exhausted quota or a bad
//! login, so the exit status alone is not the answer. Rules are data (the
//! profile's, and the operator's `[[adapter.rules]]` before them); they are
//! matched against whole lines of ANSI-stripped output with the leading
//! symbols removed (see `text::rule_text`), and only against the last lines
//! of each stream, where CLIs print the error that ended them: an agent
//! that prints "rate limit" while working on rate-limiting code is not
//! throttled.

use super::attempt::Ending;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How an attempt ended, as the loop acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Success,
    /// Retried with backoff; counts as a failure when retries run out.
    Failed,
    /// Retried after the hinted or backoff delay, shared by every task; not
    /// a failure.
    Throttled,
    /// The account is out of requests: every task of the profile pauses until
    /// the reset.
    Quota,
    /// Not logged in or a bad key: not retried; the profile pauses until its
    /// preflight passes.
    Auth,
    /// The conversation is too large: the iteration failed, retrying it as is
    /// will not help.
    ContextLimit,
    /// The command cannot run at all.
    Unavailable,
    Timeout,
    IdleTimeout,
    /// The kernel killed a process of the attempt at its memory limit
    /// (limits.max_memory_mb in the attempt's cgroup): retried like failed.
    Oom,
    /// Stopped by us (cancel, shutdown, max_runtime): says nothing of the agent.
    Stopped,
}

pub const CLASSES: &[Class] = &[
    Class::Success,
    Class::Failed,
    Class::Throttled,
    Class::Quota,
    Class::Auth,
    Class::ContextLimit,
    Class::Unavailable,
    Class::Timeout,
    Class::IdleTimeout,
    Class::Oom,
    Class::Stopped,
];

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Success => "success",
            Class::Failed => "failed",
            Class::Throttled => "throttled",
            Class::Quota => "quota",
            Class::Auth => "auth",
            Class::ContextLimit => "context_limit",
            Class::Unavailable => "unavailable",
            Class::Timeout => "timeout",
            Class::IdleTimeout => "idle_timeout",
            Class::Oom => "oom",
            Class::Stopped => "stopped",
        }
    }

    pub fn parse(s: &str) -> Option<Class> {
        CLASSES.iter().copied().find(|c| c.as_str() == s)
    }

    /// The classes an operator's rule may give a line.
    pub fn ruled(self) -> bool {
        matches!(
            self,
            Class::Success
                | Class::Failed
                | Class::Throttled
                | Class::Quota
                | Class::Auth
                | Class::ContextLimit
        )
    }
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub re: Regex,
    pub class: Class,
    /// Seen while the agent runs, the attempt ends at once (a device-login
    /// prompt waits forever).
    pub stop: bool,
    /// Where the rule comes from, for logs: `profile kiro`, `adapter.rules[2]`.
    pub origin: String,
}

/// An ordered list of rules: the first rule that matches any of the last
/// lines decides.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub list: Vec<Rule>,
    /// A line a real turn always prints; exit 0 without it failed.
    pub proof: Option<Regex>,
}

/// A rule as written (the operator's, or a profile's table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(rename = "match")]
    pub pattern: String,
    pub class: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stop: bool,
}

impl Rules {
    /// Compiles rules; the error names the rule's place in `origins`.
    pub fn compile<'a>(
        specs: impl IntoIterator<Item = (&'a RuleSpec, String)>,
    ) -> Result<Rules, (String, String)> {
        let mut list = vec![];
        for (spec, origin) in specs {
            let class = Class::parse(&spec.class)
                .filter(|c| c.ruled())
                .ok_or_else(|| {
                    (
                        origin.clone(),
                        format!(
                            "class {:?} is not one of success, failed, throttled, quota, auth, context_limit",
                            spec.class
                        ),
                    )
                })?;
            if spec.pattern.is_empty() {
                return Err((origin, "match must not be empty".into()));
            }
            let re = regex::RegexBuilder::new(&spec.pattern)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| {
                    (
                        origin.clone(),
                        format!("match is not a valid regular expression: {e}"),
                    )
                })?;
            list.push(Rule {
                re,
                class,
                stop: spec.stop,
                origin,
            });
        }
        Ok(Rules { list, proof: None })
    }

    /// A line that ends the attempt while it runs.
    pub fn stop_on(&self, line: &str) -> Option<(Class, &Rule)> {
        let t = super::text::rule_text(line);
        self.list
            .iter()
            .find(|r| r.stop && r.re.is_match(t))
            .map(|r| (r.class, r))
    }

    /// The first rule, in order, that matches one of `lines`, and the line.
    pub fn judge<'l>(&self, lines: &'l [String]) -> Option<(&Rule, &'l str)> {
        self.list.iter().find_map(|r| {
            lines
                .iter()
                .rev()
                .find(|l| r.re.is_match(super::text::rule_text(l)))
                .map(|l| (r, l.as_str()))
        })
    }
}

/// What the output said about the attempt, besides its exit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Said {
    /// The last lines of stdout and of stderr (content lines only).
    pub lines: Vec<String>,
    /// A machine-readable result said it failed (Claude's `is_error`).
    pub reported_error: bool,
    /// An HTTP status the CLI reported for its failed API call.
    pub api_status: Option<u16>,
    /// A rule that stopped the attempt while it ran.
    pub stopped_by: Option<(Class, String)>,
}

/// The class of an attempt and the line that decided it, if a line did.
pub fn classify(ending: &Ending, said: &Said, rules: &Rules) -> (Class, Option<String>) {
    match ending {
        Ending::Unavailable(_) => return (Class::Unavailable, None),
        Ending::SpawnFailed(_) => return (Class::Failed, None),
        Ending::Cancelled | Ending::ShutDown | Ending::RuntimeExceeded => {
            return (Class::Stopped, None);
        }
        Ending::RuleStopped => {
            if let Some((c, line)) = &said.stopped_by {
                return (*c, Some(line.clone()));
            }
        }
        _ => {}
    }
    if let Some((rule, line)) = rules.judge(&said.lines) {
        return (rule.class, Some(line.to_string()));
    }
    match said.api_status {
        Some(401 | 403) => return (Class::Auth, None),
        Some(429 | 529 | 503) => return (Class::Throttled, None),
        _ => {}
    }
    match ending {
        Ending::TimedOut => (Class::Timeout, None),
        Ending::IdleTimedOut => (Class::IdleTimeout, None),
        Ending::Exited(0) if !said.reported_error => match &rules.proof {
            Some(p)
                if !said
                    .lines
                    .iter()
                    .any(|l| p.is_match(super::text::rule_text(l))) =>
            {
                (
                    Class::Failed,
                    Some(format!(
                        "exit 0 without a line matching `{p}`: the CLI ran no turn"
                    )),
                )
            }
            _ => (Class::Success, None),
        },
        _ => (Class::Failed, None),
    }
}

/// How long the text says to wait: "try again in 2 days 17 hours 14
/// minutes", "retry after 30 seconds", `"resets_in_seconds": 120`,
/// `resets_at: <unix time>`, "The limits reset on 12/01." (UTC midnight).
/// `now` is the current unix time. None when it names no time we can read.
pub fn wait_hint(text: &str, now: i64) -> Option<Duration> {
    use std::sync::LazyLock;
    static IN: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?i)(?:try again|retry|resets?|wait)\s+(?:in|after)\s+((?:\d+(?:\.\d+)?\s*(?:days?|d|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)\b[\s,]*(?:and\s+)?)+)").unwrap_or_else(|_| unreachable!())
    });
    static PART: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"(?i)(\d+(?:\.\d+)?)\s*(days?|d|hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)\b",
        )
        .unwrap_or_else(|_| unreachable!())
    });
    static SECS: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r#"(?i)resets?_in_seconds"?\s*[:=]\s*(\d+)"#).unwrap_or_else(|_| unreachable!())
    });
    static AT: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r#"(?i)resets?_at"?\s*[:=]\s*(\d{9,11})"#).unwrap_or_else(|_| unreachable!())
    });
    static ON: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"(?i)reset on (\d{1,2})/(\d{1,2})").unwrap_or_else(|_| unreachable!())
    });
    if let Some(c) = SECS.captures(text) {
        return c[1].parse().ok().map(Duration::from_secs);
    }
    if let Some(c) = AT.captures(text) {
        let at: i64 = c[1].parse().ok()?;
        return Some(Duration::from_secs(at.saturating_sub(now).max(0) as u64));
    }
    if let Some(c) = IN.captures(text) {
        let mut secs = 0.0;
        for p in PART.captures_iter(&c[1]) {
            let n: f64 = p[1].parse().ok()?;
            let unit = p[2].to_ascii_lowercase();
            secs += n * match unit.chars().next() {
                Some('d') => 86400.0,
                Some('h') => 3600.0,
                Some('m') => 60.0,
                _ => 1.0,
            };
        }
        // Beyond any real reset; also keeps from_secs_f64 from overflowing.
        return Some(crate::sys::time::seconds(secs.min(1e10)));
    }
    if let Some(c) = ON.captures(text) {
        let month: u32 = c[1].parse().ok()?;
        let day: u32 = c[2].parse().ok()?;
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
            return None;
        }
        let (y, _, _) = civil_from_days(now.div_euclid(86400));
        let mut at = days_from_civil(y, month, day) * 86400;
        if at <= now {
            at = days_from_civil(y + 1, month, day) * 86400;
        }
        return Some(Duration::from_secs((at - now) as u64));
    }
    None
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(specs: &[(&str, &str)]) -> Rules {
        let specs: Vec<RuleSpec> = specs
            .iter()
            .map(|(p, c)| RuleSpec {
                pattern: p.to_string(),
                class: c.to_string(),
                stop: false,
            })
            .collect();
        Rules::compile(specs.iter().map(|s| (s, "test".to_string()))).unwrap()
    }

    fn said(lines: &[&str]) -> Said {
        Said {
            lines: lines.iter().map(|s| s.to_string()).collect(),
            ..Said::default()
        }
    }

    #[test]
    fn rules_beat_the_exit_status_and_go_in_order() {
        let r = rules(&[
            ("^Rate limit reached", "throttled"),
            ("^Not logged in", "auth"),
        ]);
        let (c, line) = classify(
            &Ending::Exited(0),
            &said(&["work", "⚠️ Rate limit reached"]),
            &r,
        );
        assert_eq!(c, Class::Throttled);
        assert_eq!(line.as_deref(), Some("⚠️ Rate limit reached"));
        assert_eq!(
            classify(
                &Ending::Exited(1),
                &said(&["Not logged in", "Rate limit reached"]),
                &r
            )
            .0,
            Class::Throttled
        );
        assert_eq!(
            classify(&Ending::Exited(0), &said(&["fine"]), &r).0,
            Class::Success
        );
        assert_eq!(
            classify(&Ending::Exited(3), &said(&[]), &r).0,
            Class::Failed
        );
        assert_eq!(
            classify(&Ending::TimedOut, &said(&[]), &r).0,
            Class::Timeout
        );
    }

    #[test]
    fn a_reported_error_or_api_status_is_not_success() {
        let r = Rules::default();
        let mut s = said(&[]);
        s.reported_error = true;
        assert_eq!(classify(&Ending::Exited(0), &s, &r).0, Class::Failed);
        s.api_status = Some(401);
        assert_eq!(classify(&Ending::Exited(1), &s, &r).0, Class::Auth);
        s.api_status = Some(529);
        assert_eq!(classify(&Ending::Exited(1), &s, &r).0, Class::Throttled);
    }

    #[test]
    fn exit_0_without_the_proof_line_is_a_failure() {
        let r = Rules {
            proof: Some(Regex::new("^Credits: ").unwrap()),
            ..Rules::default()
        };
        let ok = said(&["> PONG", "▸ Credits: 0.01 • Time: 1s"]);
        assert_eq!(classify(&Ending::Exited(0), &ok, &r).0, Class::Success);
        let (c, why) = classify(&Ending::Exited(0), &said(&[]), &r);
        assert_eq!(c, Class::Failed);
        assert!(why.unwrap().contains("ran no turn"));
    }

    #[test]
    fn bad_rules_are_refused_with_their_origin() {
        let bad = RuleSpec {
            pattern: "(unclosed".into(),
            class: "auth".into(),
            stop: false,
        };
        let e = Rules::compile([(&bad, "adapter.rules[1]".to_string())]).unwrap_err();
        assert_eq!(e.0, "adapter.rules[1]");
        assert!(e.1.contains("regular expression"), "{}", e.1);
        let wrong = RuleSpec {
            pattern: "x".into(),
            class: "timeout".into(),
            stop: false,
        };
        assert!(Rules::compile([(&wrong, "r".to_string())]).is_err());
    }

    #[test]
    fn wait_hints() {
        let now = 1_764_547_200; // 2025-12-01T00:00:00Z
        let h = |t: &str| wait_hint(t, now).map(|d| d.as_secs());
        assert_eq!(
            h("You've hit your usage limit. Upgrade or try again in 2 days 17 hours 14 minutes."),
            Some(2 * 86400 + 17 * 3600 + 14 * 60)
        );
        assert_eq!(h("please retry after 30 seconds"), Some(30));
        assert_eq!(h("try again in 1h 5m"), Some(3900));
        assert_eq!(h(r#"{"resets_in_seconds": 120}"#), Some(120));
        assert_eq!(h(r#"resets_at: 1764547500"#), Some(300));
        // Next Jan 1st at midnight UTC.
        assert_eq!(h("The limits reset on 01/01."), Some(31 * 86400));
        // Today at midnight has passed: next year.
        assert_eq!(h("The limits reset on 12/01."), Some(365 * 86400));
        assert_eq!(h("Please wait a moment and try again."), None);
        assert_eq!(h("resets 1pm (Europe/Lisbon)"), None);
        assert!(h("try again in 99999999999999999999999 days").is_some());
    }

    #[test]
    fn civil_dates_round_trip() {
        for days in [-1000, 0, 59, 60, 365, 11_016, 20_423, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}

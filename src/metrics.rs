//! Counters any thread bumps with one atomic add, read by the /metrics
//! serialiser; totals are saved in the state directory so a restart does not
//! reset them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the request-duration histogram, in seconds.
pub const BUCKETS: [f64; 11] = [
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    f64::INFINITY,
];
/// The outcome classes of failed attempts, and two events beside them.
pub const ERROR_TYPES: [&str; 11] = [
    "failed",
    "throttled",
    "quota",
    "auth",
    "context_limit",
    "unavailable",
    "timeout",
    "idle_timeout",
    "oom",
    "output_truncated",
    "cancelled",
];

/// What the error types of releases before outcome classes (saved by
/// position) count as now.
const OLD_ERROR_TYPES: [&str; 7] = [
    "timeout",
    "idle_timeout",
    "failed",
    "failed",
    "failed",
    "output_truncated",
    "cancelled",
];

pub struct Metrics {
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub iterations_success: AtomicU64,
    pub iterations_failure: AtomicU64,
    pub errors: [AtomicU64; 11],
    /// Cumulative counts per bucket (Prometheus `le` semantics).
    pub buckets: [AtomicU64; 11],
    pub duration_micros: AtomicU64,
    pub active: AtomicU64,
    pub queue_depth: AtomicU64,
    pub circuit_open: AtomicU64,
    /// What agents reported spending, per profile (a few updates per
    /// request: a lock is cheap enough).
    pub spent: Mutex<BTreeMap<String, Spent>>,
}

/// Credits, US dollars and tokens one profile's agents reported, and what
/// their attempts used of the machine (containment's accounting).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    pub credits: f64,
    pub cost_usd: f64,
    pub tokens: u64,
    #[serde(default)]
    pub cpu_seconds: f64,
    /// Sum over attempts of the most processes alive at once.
    #[serde(default)]
    pub processes: u64,
    #[serde(default)]
    pub oom_kills: u64,
    /// Attempts by peak memory, cumulative per MEMORY_BUCKETS (`le`).
    #[serde(default)]
    pub memory_buckets: Vec<u64>,
    #[serde(default)]
    pub memory_sum: u64,
    #[serde(default)]
    pub memory_count: u64,
}

/// Peak memory of an attempt, bytes: 64 MiB to 16 GiB.
pub const MEMORY_BUCKETS: [f64; 9] = [
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
    2147483648.0,
    4294967296.0,
    17179869184.0,
    f64::INFINITY,
];

impl Spent {
    fn add(&mut self, v: &Spent) {
        self.credits += v.credits;
        self.cost_usd += v.cost_usd;
        self.tokens += v.tokens;
        self.cpu_seconds += v.cpu_seconds;
        self.processes += v.processes;
        self.oom_kills += v.oom_kills;
        self.memory_buckets.resize(MEMORY_BUCKETS.len(), 0);
        for (a, b) in self.memory_buckets.iter_mut().zip(&v.memory_buckets) {
            *a += b;
        }
        self.memory_sum += v.memory_sum;
        self.memory_count += v.memory_count;
    }
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    /// All zero (the process-wide counters start here).
    pub const fn new() -> Metrics {
        Metrics {
            requests: ZERO,
            retries: ZERO,
            iterations_success: ZERO,
            iterations_failure: ZERO,
            errors: [ZERO; 11],
            buckets: [ZERO; 11],
            duration_micros: ZERO,
            active: ZERO,
            queue_depth: ZERO,
            circuit_open: ZERO,
            spent: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn spent(&self, profile: &str, u: &crate::agent::Usage) {
        if u.is_zero() {
            return;
        }
        self.add_spent(
            profile,
            &Spent {
                credits: u.credits,
                cost_usd: u.cost_usd,
                tokens: u.tokens,
                ..Spent::default()
            },
        );
    }

    /// What one attempt used of the machine.
    pub fn used(&self, profile: &str, r: &crate::agent::Resources) {
        let mut v = Spent {
            cpu_seconds: r.cpu_seconds,
            processes: r.processes.unwrap_or(0),
            oom_kills: r.oom_kills,
            ..Spent::default()
        };
        if let Some(m) = r.peak_memory {
            v.memory_buckets = MEMORY_BUCKETS
                .iter()
                .map(|le| u64::from(m as f64 <= *le))
                .collect();
            v.memory_sum = m;
            v.memory_count = 1;
        }
        self.add_spent(profile, &v);
    }

    fn add_spent(&self, profile: &str, v: &Spent) {
        if let Ok(mut m) = self.spent.lock() {
            m.entry(profile.to_string()).or_default().add(v);
        }
    }

    pub fn request_done(&self, seconds: f64) {
        self.requests.fetch_add(1, Relaxed);
        self.duration_micros
            .fetch_add((seconds * 1e6) as u64, Relaxed);
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.buckets[i].fetch_add(1, Relaxed);
            }
        }
    }

    pub fn error(&self, error_type: &str) {
        self.error_n(error_type, 1);
    }

    fn error_n(&self, error_type: &str, n: u64) {
        if let Some(i) = ERROR_TYPES.iter().position(|t| *t == error_type) {
            self.errors[i].fetch_add(n, Relaxed);
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            requests: self.requests.load(Relaxed),
            retries: self.retries.load(Relaxed),
            iterations_success: self.iterations_success.load(Relaxed),
            iterations_failure: self.iterations_failure.load(Relaxed),
            errors: Vec::new(),
            error_types: ERROR_TYPES
                .iter()
                .zip(&self.errors)
                .map(|(t, a)| (t.to_string(), a.load(Relaxed)))
                .collect(),
            buckets: self.buckets.iter().map(|a| a.load(Relaxed)).collect(),
            duration_micros: self.duration_micros.load(Relaxed),
            spent: self.spent.lock().map(|m| m.clone()).unwrap_or_default(),
        }
    }

    /// Adds totals saved by an earlier process.
    pub fn restore(&self, t: &Totals) {
        self.requests.fetch_add(t.requests, Relaxed);
        self.retries.fetch_add(t.retries, Relaxed);
        self.iterations_success
            .fetch_add(t.iterations_success, Relaxed);
        self.iterations_failure
            .fetch_add(t.iterations_failure, Relaxed);
        for (old, v) in OLD_ERROR_TYPES.iter().zip(&t.errors) {
            self.error_n(old, *v);
        }
        for (name, v) in &t.error_types {
            self.error_n(name, *v);
        }
        for (a, v) in self.buckets.iter().zip(&t.buckets) {
            a.fetch_add(*v, Relaxed);
        }
        self.duration_micros.fetch_add(t.duration_micros, Relaxed);
        for (p, v) in &t.spent {
            self.add_spent(p, v);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The persisted form of the counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    pub requests: u64,
    pub retries: u64,
    pub iterations_success: u64,
    pub iterations_failure: u64,
    /// Errors by position in the old seven types (files of older releases).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<u64>,
    /// Errors by type name.
    #[serde(default)]
    pub error_types: std::collections::BTreeMap<String, u64>,
    pub buckets: Vec<u64>,
    pub duration_micros: u64,
    /// Per profile.
    #[serde(default)]
    pub spent: BTreeMap<String, Spent>,
}

/// What the exposition needs besides the counters.
pub struct Gauges<'a> {
    /// The configured profile: always shown in the spending families.
    pub profile: &'a str,
    pub tasks_by_status: &'a [(&'static str, u64)],
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub start_time: Option<f64>,
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
}

/// A family with one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    out.push_str(&format!("{name} {value}\n"));
}

/// Prometheus text exposition format 0.0.4.
pub fn render(m: &Metrics, g: &Gauges) -> String {
    let mut o = String::with_capacity(4096);
    let requests = m.requests.load(Relaxed);
    single(
        &mut o,
        "qchat_requests_total",
        "counter",
        "Agent requests completed.",
        requests,
    );
    family(
        &mut o,
        "qchat_request_duration_seconds",
        "histogram",
        "Duration of agent requests in seconds.",
    );
    for (i, le) in BUCKETS.iter().enumerate() {
        let le = if le.is_infinite() {
            "+Inf".to_string()
        } else {
            format!("{le}")
        };
        o.push_str(&format!(
            "qchat_request_duration_seconds_bucket{{le=\"{le}\"}} {}\n",
            m.buckets[i].load(Relaxed)
        ));
    }
    o.push_str(&format!(
        "qchat_request_duration_seconds_sum {}\n",
        m.duration_micros.load(Relaxed) as f64 / 1e6
    ));
    o.push_str(&format!(
        "qchat_request_duration_seconds_count {}\n",
        m.requests.load(Relaxed)
    ));
    let active = m.active.load(Relaxed);
    single(
        &mut o,
        "qchat_active_requests",
        "gauge",
        "Agent requests running now.",
        active,
    );
    family(
        &mut o,
        "qchat_errors_total",
        "counter",
        "Agent requests that did not succeed, by outcome class.",
    );
    for (i, t) in ERROR_TYPES.iter().enumerate() {
        o.push_str(&format!(
            "qchat_errors_total{{error_type=\"{t}\"}} {}\n",
            m.errors[i].load(Relaxed)
        ));
    }
    let retries = m.retries.load(Relaxed);
    single(
        &mut o,
        "qchat_retries_total",
        "counter",
        "Retries of failed agent requests.",
        retries,
    );
    let queue = m.queue_depth.load(Relaxed);
    single(
        &mut o,
        "qchat_queue_depth",
        "gauge",
        "Tasks ready and waiting for a worker.",
        queue,
    );
    family(&mut o, "ralph_tasks", "gauge", "Tasks by status.");
    for (s, n) in g.tasks_by_status {
        o.push_str(&format!("ralph_tasks{{status=\"{s}\"}} {n}\n"));
    }
    family(
        &mut o,
        "ralph_iterations_total",
        "counter",
        "Loop iterations by result.",
    );
    o.push_str(&format!(
        "ralph_iterations_total{{result=\"success\"}} {}\n",
        m.iterations_success.load(Relaxed)
    ));
    o.push_str(&format!(
        "ralph_iterations_total{{result=\"failure\"}} {}\n",
        m.iterations_failure.load(Relaxed)
    ));
    let mut spent = m.spent.lock().map(|s| s.clone()).unwrap_or_default();
    spent.entry(g.profile.to_string()).or_default();
    type Field = fn(&Spent) -> String;
    let families: [(&str, &str, Field); 6] = [
        (
            "ralph_agent_credits_total",
            "Credits agents reported (Kiro), by profile.",
            |v| v.credits.to_string(),
        ),
        (
            "ralph_agent_cost_usd_total",
            "US dollars agents reported (Claude), by profile.",
            |v| v.cost_usd.to_string(),
        ),
        (
            "ralph_agent_tokens_total",
            "Tokens agents reported (Claude, Codex), by profile.",
            |v| v.tokens.to_string(),
        ),
        (
            "ralph_attempt_cpu_seconds_total",
            "CPU seconds of attempts' whole process trees (cgroup cpu.stat; the command and what it waited for in subreaper mode), by profile.",
            |v| v.cpu_seconds.to_string(),
        ),
        (
            "ralph_attempt_processes_total",
            "Sum over attempts of the most processes alive at once (pids.peak), by profile.",
            |v| v.processes.to_string(),
        ),
        (
            "ralph_attempt_oom_kills_total",
            "Processes of attempts the kernel killed at limits.max_memory_mb, by profile.",
            |v| v.oom_kills.to_string(),
        ),
    ];
    for (name, help, value) in families {
        family(&mut o, name, "counter", help);
        for (p, v) in &spent {
            o.push_str(&format!("{name}{{profile=\"{p}\"}} {}\n", value(v)));
        }
    }
    family(
        &mut o,
        "ralph_attempt_peak_memory_bytes",
        "histogram",
        "Peak memory of attempts (the cgroup's memory.peak; the largest process's RSS in subreaper mode), by profile.",
    );
    for (p, v) in &spent {
        for (i, le) in MEMORY_BUCKETS.iter().enumerate() {
            let le = if le.is_infinite() {
                "+Inf".to_string()
            } else {
                format!("{le}")
            };
            o.push_str(&format!(
                "ralph_attempt_peak_memory_bytes_bucket{{profile=\"{p}\",le=\"{le}\"}} {}\n",
                v.memory_buckets.get(i).copied().unwrap_or(0)
            ));
        }
        o.push_str(&format!(
            "ralph_attempt_peak_memory_bytes_sum{{profile=\"{p}\"}} {}\n",
            v.memory_sum
        ));
        o.push_str(&format!(
            "ralph_attempt_peak_memory_bytes_count{{profile=\"{p}\"}} {}\n",
            v.memory_count
        ));
    }
    let open = m.circuit_open.load(Relaxed);
    single(
        &mut o,
        "qchat_circuit_open",
        "gauge",
        "1 while the circuit breaker stops dispatching.",
        open,
    );
    family(
        &mut o,
        "ralph_qchat_build_info",
        "gauge",
        "Build information.",
    );
    o.push_str(&format!(
        "ralph_qchat_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    ));
    let process: [(&str, &str, &str, Option<String>); 4] = [
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            g.rss_bytes.map(|v| v.to_string()),
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            g.cpu_seconds.map(|v| v.to_string()),
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            g.open_fds.map(|v| v.to_string()),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            g.start_time.map(|v| v.to_string()),
        ),
    ];
    for (name, kind, help, value) in process {
        if let Some(v) = value {
            single(&mut o, name, kind, help, v);
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_totals_round_trip() {
        let m = Metrics::new();
        m.request_done(0.2);
        m.request_done(3.0);
        m.request_done(1000.0);
        m.error("timeout");
        let t = m.totals();
        assert_eq!(t.buckets[0], 1); // <= 0.5
        assert_eq!(t.buckets[3], 2); // <= 5
        assert_eq!(t.buckets[10], 3); // +Inf
        assert_eq!(t.error_types["timeout"], 1);
        let text = render(
            &m,
            &Gauges {
                profile: "qchat",
                tasks_by_status: &[("queued", 2)],
                rss_bytes: None,
                cpu_seconds: None,
                open_fds: None,
                start_time: None,
            },
        );
        assert!(text.contains("qchat_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("qchat_request_duration_seconds_count 3\n"));
        assert!(text.contains("ralph_tasks{status=\"queued\"} 2\n"));
        assert!(text.contains("ralph_agent_credits_total{profile=\"qchat\"} 0\n"));
        m.restore(&t);
        assert_eq!(m.totals().requests, 6);
        assert_eq!(m.totals().error_types["timeout"], 2);
    }

    #[test]
    fn totals_of_an_older_release_keep_their_errors() {
        let m = Metrics::new();
        let old: Totals =
            serde_json::from_str(r#"{"requests":9,"retries":0,"iterations_success":0,"iterations_failure":0,"errors":[1,0,4,2,0,0,3],"buckets":[],"duration_micros":0}"#)
                .unwrap();
        m.restore(&old);
        let t = m.totals();
        assert_eq!(t.error_types["timeout"], 1);
        assert_eq!(t.error_types["failed"], 6);
        assert_eq!(t.error_types["cancelled"], 3);
    }
}

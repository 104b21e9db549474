//! Range checks on a fully merged configuration: pure, so every rule is testable
//! without files.

use super::types::{AgentName, Config};
use crate::agent::classify::Rules;

type Invalid = (String, String);

fn bad(key: &str, message: impl Into<String>) -> Result<(), Invalid> {
    Err((key.to_string(), message.into()))
}

/// The longest duration any setting may name: ten years. Anything longer is
/// a typo, and deadlines computed from it would overflow the clock.
pub const MAX_SECONDS: f64 = 10.0 * 365.0 * 86400.0;

fn too_long(key: &str, v: f64) -> Result<(), Invalid> {
    bad(
        key,
        format!("must be at most {MAX_SECONDS} seconds (ten years), found {v}"),
    )
}

fn positive(key: &str, v: f64) -> Result<(), Invalid> {
    if v.is_finite() && v > MAX_SECONDS {
        return too_long(key, v);
    }
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        bad(
            key,
            format!("must be a number of seconds greater than 0, found {v}"),
        )
    }
}

fn non_negative(key: &str, v: f64) -> Result<(), Invalid> {
    if v.is_finite() && v > MAX_SECONDS {
        return too_long(key, v);
    }
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        bad(key, format!("must be 0 or more seconds, found {v}"))
    }
}

/// The placeholders a prompt template may use.
pub const PLACEHOLDERS: &[&str] = &[
    "{prompt_file}",
    "{prompt}",
    "{marker}",
    "{iteration}",
    "{verify_output}",
];

pub fn validate(c: &Config) -> Result<(), Invalid> {
    let a = &c.adapter;
    non_negative("adapter.timeout", a.timeout)?;
    positive("adapter.quota_pause", a.quota_pause)?;
    positive("adapter.preflight_timeout", a.preflight_timeout)?;
    positive("adapter.preflight_interval", a.preflight_interval)?;
    if a.name == AgentName::Custom && a.command.trim().is_empty() {
        bad(
            "adapter.command",
            "the custom profile has no program of its own: set [adapter] command (or --agent-command)",
        )?;
    }
    if let Some(p) = &a.preflight
        && p.first().is_some_and(|c| c.trim().is_empty())
    {
        bad("adapter.preflight", "the first element must name a program")?;
    }
    let specs = a.rule_specs();
    if let Err((origin, message)) = Rules::compile(specs.iter().map(|(r, o)| (r, o.clone()))) {
        bad(&format!("{origin}.match"), message)?;
    }
    non_negative("adapter.idle_timeout", a.idle_timeout)?;
    non_negative("adapter.retry_delay", a.retry_delay)?;
    non_negative("adapter.max_retry_delay", a.max_retry_delay)?;
    non_negative("adapter.kill_grace", a.kill_grace)?;
    if a.max_retries > 100 {
        bad(
            "adapter.max_retries",
            format!("at most 100, found {}", a.max_retries),
        )?;
    }
    if a.command.contains('\0') {
        bad("adapter.command", "must not contain a NUL byte")?;
    }
    for k in a.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            bad(
                "adapter.env",
                format!("{k:?} is not a valid environment variable name"),
            )?;
        }
    }

    positive("hooks.timeout", c.hooks.timeout)?;
    if c.hooks
        .on_task_end
        .first()
        .is_some_and(|p| p.trim().is_empty())
    {
        bad("hooks.on_task_end", "the first element must name a program")?;
    }
    let o = &c.orchestrator;
    if o.prompt_file.is_empty() {
        bad("orchestrator.prompt_file", "must name a file")?;
    }
    if o.max_iterations == 0 {
        bad("orchestrator.max_iterations", "must be at least 1")?;
    }
    positive("orchestrator.max_runtime", o.max_runtime)?;
    if o.max_consecutive_failures == 0 {
        bad(
            "orchestrator.max_consecutive_failures",
            "must be at least 1",
        )?;
    }
    non_negative("orchestrator.iteration_delay", o.iteration_delay)?;
    non_negative("orchestrator.shutdown_grace", o.shutdown_grace)?;
    non_negative(
        "orchestrator.archived_prompt_max_age",
        o.archived_prompt_max_age,
    )?;
    non_negative("paths.rejected_max_age", c.paths.rejected_max_age)?;
    positive("orchestrator.verify_timeout", o.verify_timeout)?;
    positive("orchestrator.checkpoint_timeout", o.checkpoint_timeout)?;
    if o.verify_command
        .first()
        .is_some_and(|p| p.trim().is_empty())
    {
        bad(
            "orchestrator.verify_command",
            "the first element must name a program",
        )?;
    }
    if !(o.max_credits.is_finite() && o.max_credits >= 0.0) {
        bad(
            "orchestrator.max_credits",
            format!(
                "must be 0 (no cap) or more credits, found {}",
                o.max_credits
            ),
        )?;
    }
    if !(o.max_cost_usd.is_finite() && o.max_cost_usd >= 0.0) {
        bad(
            "orchestrator.max_cost_usd",
            format!(
                "must be 0 (no cap) or more US dollars, found {}",
                o.max_cost_usd
            ),
        )?;
    }
    let marker = o.completion_marker.trim();
    if marker.is_empty() || marker.contains(char::is_whitespace) || marker.len() > 200 {
        bad(
            "orchestrator.completion_marker",
            "must be one word of at most 200 characters",
        )?;
    }
    if !o.prompt_template.contains("{prompt_file}") && !o.prompt_template.contains("{prompt}") {
        bad(
            "orchestrator.prompt_template",
            "must contain {prompt} or {prompt_file}, or the agent never sees the task",
        )?;
    }
    if let Some(unknown) = unknown_placeholder(&o.prompt_template) {
        bad(
            "orchestrator.prompt_template",
            format!(
                "unknown placeholder {unknown}; known: {}",
                PLACEHOLDERS.join(", ")
            ),
        )?;
    }
    if o.prompt_template.len() > 64 * 1024 {
        bad("orchestrator.prompt_template", "must be at most 64 KiB")?;
    }

    let p = &c.performance;
    if p.buffer_size == 0 || p.buffer_size > 16 * 1024 * 1024 {
        bad(
            "performance.buffer_size",
            format!(
                "must be between 1 and 16777216 bytes, found {}",
                p.buffer_size
            ),
        )?;
    }
    if !(p.poll_interval.is_finite() && p.poll_interval >= 0.001 && p.poll_interval <= 60.0) {
        bad(
            "performance.poll_interval",
            format!(
                "must be between 0.001 and 60 seconds, found {}",
                p.poll_interval
            ),
        )?;
    }
    if p.max_concurrent == 0 || p.max_concurrent > 1024 {
        bad(
            "performance.max_concurrent",
            format!(
                "must be between 1 and 1024 workers, found {}",
                p.max_concurrent
            ),
        )?;
    }

    let l = &c.limits;
    if l.max_output_size == 0 {
        bad("limits.max_output_size", "must be at least 1 byte")?;
    }
    if l.max_prompt_size == 0 {
        bad("limits.max_prompt_size", "must be at least 1 byte")?;
    }
    if l.blocked_patterns.iter().any(|s| s.is_empty()) {
        bad(
            "limits.blocked_patterns",
            "an empty pattern would block every prompt",
        )?;
    }

    let g = &c.logging;
    if !["error", "warn", "warning", "info", "debug", "trace"]
        .contains(&g.level.to_ascii_lowercase().as_str())
    {
        bad(
            "logging.level",
            format!(
                "unknown level {:?} (error, warn, info, debug, trace)",
                g.level
            ),
        )?;
    }
    if g.max_file_size < 1024 {
        bad("logging.max_file_size", "must be at least 1024 bytes")?;
    }
    if g.facility().is_none() {
        bad(
            "logging.syslog_facility",
            format!(
                "unknown facility {:?} (daemon, user, local0 … local7)",
                g.syslog_facility
            ),
        )?;
    }

    if c.circuit_breaker.failure_threshold == 0 {
        bad("circuit_breaker.failure_threshold", "must be at least 1")?;
    }
    non_negative("circuit_breaker.cooldown", c.circuit_breaker.cooldown)?;
    positive("cache.ttl", c.cache.ttl)?;

    let m = &c.monitoring;
    non_negative("monitoring.metrics_interval", m.metrics_interval)?;
    positive("monitoring.health_check_interval", m.health_check_interval)?;
    if m.health_check_bind.parse::<std::net::IpAddr>().is_err() {
        bad(
            "monitoring.health_check_bind",
            format!("{:?} is not an IP address", m.health_check_bind),
        )?;
    }
    for cidr in &m.health_check_allow {
        if !valid_cidr(cidr) {
            bad(
                "monitoring.health_check_allow",
                format!("{cidr:?} is not an address or CIDR block (e.g. 10.0.0.0/8, ::1/128)"),
            )?;
        }
    }
    Ok(())
}

fn unknown_placeholder(template: &str) -> Option<String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let tail = &rest[start..];
        let end = tail.find('}')?;
        let candidate = &tail[..=end];
        let inner = &candidate[1..candidate.len() - 1];
        let looks_like_name =
            !inner.is_empty() && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if looks_like_name && !PLACEHOLDERS.contains(&candidate) {
            return Some(candidate.to_string());
        }
        rest = &tail[1..];
    }
    None
}

pub fn valid_cidr(s: &str) -> bool {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let Ok(ip) = addr.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match len {
        None => true,
        Some(l) => l.parse::<u32>().map(|n| n <= max).unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: impl FnOnce(&mut Config)) -> Option<String> {
        let mut c = Config::default();
        f(&mut c);
        validate(&c).err().map(|(k, _)| k)
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(check(|_| {}), None);
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        assert_eq!(
            check(|c| c.performance.max_concurrent = 0).as_deref(),
            Some("performance.max_concurrent")
        );
        assert_eq!(
            check(|c| c.adapter.timeout = -1.0).as_deref(),
            Some("adapter.timeout")
        );
        assert_eq!(
            check(|c| c.performance.buffer_size = 0).as_deref(),
            Some("performance.buffer_size")
        );
        assert_eq!(
            check(|c| c.logging.level = "loud".into()).as_deref(),
            Some("logging.level")
        );
        assert_eq!(
            check(|c| c.orchestrator.prompt_template = "do {thing} in {prompt_file}".into())
                .as_deref(),
            Some("orchestrator.prompt_template")
        );
        assert_eq!(
            check(|c| c.monitoring.health_check_allow = vec!["10.0.0.0/33".into()]).as_deref(),
            Some("monitoring.health_check_allow")
        );
    }

    #[test]
    fn cidrs() {
        assert!(valid_cidr("10.0.0.0/8"));
        assert!(valid_cidr("::1"));
        assert!(valid_cidr("fd00::/8"));
        assert!(!valid_cidr("10.0.0.0/"));
        assert!(!valid_cidr("example.org"));
    }

    #[test]
    fn literal_braces_in_template_are_allowed() {
        assert_eq!(
            check(|c| c.orchestrator.prompt_template =
                "Read {prompt_file}; JSON like {\"a\": 1} is fine".into()),
            None
        );
    }
}

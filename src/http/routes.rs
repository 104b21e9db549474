//! Requests to responses: /health, /health/detailed, /metrics, /tasks.

use super::allow::{Cidr, allowed};
use super::wire::{Reply, Request};
use crate::engine::{Shared, Snapshot};
use crate::metrics::{self, Gauges, METRICS};
use crate::store::pauses::PauseKind;
use crate::sys::proc::{self, CpuMeter};
use crate::task::valid_id;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

const STATUSES: [&str; 7] = [
    "queued",
    "running",
    "completed",
    "failed",
    "limit_reached",
    "cancelled",
    "stalled",
];

fn json_reply(status: u16, v: &Value) -> Reply {
    Reply::json(status, v)
}

fn error(status: u16, msg: &str) -> Reply {
    Reply::error(status, msg)
}

pub fn handle(
    rq: &Request,
    peer: SocketAddr,
    shared: &Shared,
    allow: &[Cidr],
    cpu: &CpuMeter,
) -> Reply {
    route(rq, peer, shared, allow, cpu)
}

fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        v4 => v4.is_loopback(),
    }
}

fn route(rq: &Request, peer: SocketAddr, shared: &Shared, allow: &[Cidr], cpu: &CpuMeter) -> Reply {
    if !allowed(allow, peer.ip()) {
        return error(403, "forbidden: this address is not in health_check_allow");
    }
    if rq.method != "GET" && rq.method != "HEAD" {
        let mut r = error(405, "method not allowed: GET and HEAD only");
        r.allow = Some("GET, HEAD");
        return r;
    }
    let path = rq.path.as_str();
    // /tasks carries the tails of agents' output: with no allowlist it
    // answers this machine only, wherever the port listens.
    if path.starts_with("/tasks") && allow.is_empty() && !is_loopback(peer.ip()) {
        return error(
            403,
            "forbidden: /tasks answers only loopback and the addresses in health_check_allow",
        );
    }
    match path {
        "/health" => {
            let (code, v) = health(shared);
            json_reply(code, &v)
        }
        "/health/detailed" => {
            let (code, mut v) = health(shared);
            detailed(shared, cpu, &mut v);
            json_reply(code, &v)
        }
        "/metrics" => Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics_text(shared).into_bytes(),
            allow: None,
        },
        "/tasks" | "/tasks/" => {
            let snap = shared.snapshot();
            let tasks: Vec<&crate::task::TaskState> =
                snap.tasks.iter().map(|t| t.as_ref()).collect();
            json_reply(200, &serde_json::to_value(tasks).unwrap_or_default())
        }
        p if p.starts_with("/tasks/") => {
            let id = &p["/tasks/".len()..];
            if !valid_id(id) {
                return error(404, "no such task");
            }
            let snap = shared.snapshot();
            match snap.tasks.iter().find(|t| t.id == id) {
                Some(t) => json_reply(200, &serde_json::to_value(t.as_ref()).unwrap_or_default()),
                // Finished long ago: the record on disk.
                None => match crate::store::TaskStore::new(&shared.state_dir).load(id) {
                    Ok(Some(t)) => json_reply(200, &serde_json::to_value(t).unwrap_or_default()),
                    _ => error(404, "no such task"),
                },
            }
        }
        _ => error(
            404,
            "not found: try /health, /health/detailed, /metrics, /tasks",
        ),
    }
}

/// Is the agent command there and executable (a bare name: somewhere on PATH)?
fn command_available(cmd: &str) -> bool {
    let exec = |p: &std::path::Path| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: access on a valid C string.
        p.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
    };
    if cmd.contains('/') {
        return exec(std::path::Path::new(cmd));
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| exec(&d.join(cmd))))
        .unwrap_or(false)
}

/// The file-system checks of /health, redone at most every health_check_interval.
fn checks(shared: &Shared) -> (bool, Result<(), String>) {
    let every = shared.check_every.lock().map(|g| *g).unwrap_or_default();
    if let Ok(mut g) = shared.checks.lock() {
        if let Some((at, cmd, w)) = g.as_ref() {
            if at.elapsed() < every {
                return (*cmd, w.clone());
            }
        }
        let fresh = (
            command_available(&shared.command()),
            state_dir_writable(shared),
        );
        *g = Some((std::time::Instant::now(), fresh.0, fresh.1.clone()));
        return fresh;
    }
    (
        command_available(&shared.command()),
        state_dir_writable(shared),
    )
}

fn state_dir_writable(shared: &Shared) -> Result<(), String> {
    let Ok(c) = std::ffi::CString::new(shared.state_dir.as_os_str().as_encoded_bytes()) else {
        return Err("state directory path is not valid".into());
    };
    // SAFETY: access on a valid C string.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(format!(
            "state directory {} is not writable: {}",
            shared.state_dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    // A full file system: records may still fit in the blocks they had
    // (the writer reuses its files), but transcripts, archives and new
    // tasks do not.
    // SAFETY: statvfs on a valid C string into a zeroed struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0 {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let blocks = if root { st.f_bfree } else { st.f_bavail };
        let free = blocks as u64 * st.f_frsize as u64;
        if free < MIN_FREE {
            return Err(format!(
                "the file system of state directory {} is full ({} KiB free): transcripts, archives and new tasks cannot be written; free some space",
                shared.state_dir.display(),
                free / 1024
            ));
        }
    }
    Ok(())
}

/// Free space below which the state directory counts as full.
const MIN_FREE: u64 = 64 * 1024;

pub(super) fn health(shared: &Shared) -> (u16, Value) {
    let base = |status: &str| {
        json!({
            "status": status,
            "adapter": shared.adapter,
            "version": env!("CARGO_PKG_VERSION"),
        })
    };
    if shared.standby.load(Ordering::SeqCst) {
        return (200, base("standby"));
    }
    let mut bad = Vec::new();
    if shared.stopping.load(Ordering::SeqCst) {
        let mut v = base("stopping");
        v["reasons"] = json!(["shutting down"]);
        return (503, v);
    }
    let now_ms = shared.started.elapsed().as_millis() as u64;
    let last = shared.tick_ms.load(Ordering::Relaxed);
    let limit = 3 * shared.tick_every.as_millis() as u64;
    if now_ms.saturating_sub(last) > limit {
        bad.push(format!(
            "scheduler has not run for {:.1} s",
            now_ms.saturating_sub(last) as f64 / 1000.0
        ));
    }
    let (command_ok, writable) = checks(shared);
    if let Some(e) = shared.save_error.lock().ok().and_then(|g| g.clone()) {
        bad.push(e);
    } else if let Err(e) = writable {
        bad.push(e);
    }
    if !bad.is_empty() {
        let mut v = base("unhealthy");
        v["reasons"] = json!(bad);
        return (503, v);
    }
    let snap = shared.snapshot();
    let mut degraded = Vec::new();
    if snap.circuit != "closed" && !snap.circuit.is_empty() {
        degraded.push(format!(
            "circuit breaker {}{}",
            snap.circuit,
            snap.circuit_reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ));
    }
    for (profile, p) in &snap.pauses {
        let what = match p.kind {
            PauseKind::Quota => "out of quota",
            PauseKind::Auth => "not logged in",
        };
        degraded.push(format!(
            "agent profile {profile} paused, {what}: {}; {}",
            p.message, p.remedy
        ));
    }
    if !command_ok {
        degraded.push(format!(
            "agent command `{}` not found or not executable",
            shared.command()
        ));
    }
    if degraded.is_empty() {
        (200, base("healthy"))
    } else {
        let mut v = base("degraded");
        v["reasons"] = json!(degraded);
        (200, v)
    }
}

/// Every task by status: those in the snapshot, and the finished ones that
/// left it.
fn by_status(snap: &Snapshot) -> Vec<(&'static str, u64)> {
    STATUSES
        .iter()
        .map(|s| {
            let older = snap
                .older
                .iter()
                .find(|(k, _)| k == s)
                .map_or(0, |(_, n)| *n);
            let here = snap
                .tasks
                .iter()
                .filter(|t| t.status.as_str() == *s)
                .count() as u64;
            (*s, here + older)
        })
        .collect()
}

fn detailed(shared: &Shared, cpu: &CpuMeter, v: &mut Value) {
    let snap = shared.snapshot();
    let tasks: serde_json::Map<String, Value> = by_status(&snap)
        .into_iter()
        .map(|(k, n)| (k.to_string(), json!(n)))
        .collect();
    v["system"] = json!({
        "cpu_percent": cpu.percent(),
        "memory_percent": proc::memory_percent(),
        "disk_usage": proc::disk_percent(&shared.state_dir),
    });
    v["process"] = json!({
        "pid": std::process::id(),
        "uptime_seconds": shared.started.elapsed().as_secs_f64(),
        "rss_bytes": proc::rss_bytes(),
        "open_fds": proc::open_fds(),
        "threads": proc::threads(),
    });
    v["workers"] = json!({ "total": snap.workers_total, "busy": snap.workers_busy });
    v["queue_depth"] = json!(snap.queue_depth);
    v["tasks"] = Value::Object(tasks);
    v["circuit"] = json!({ "state": snap.circuit, "reason": snap.circuit_reason });
    v["pauses"] = json!(snap.pauses.iter().map(|(profile, p)| json!({
        "profile": profile,
        "kind": p.kind,
        "until": p.until.map(|u| crate::sys::time::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u.max(0) as u64))),
        "message": p.message,
        "remedy": p.remedy,
    })).collect::<Vec<_>>());
    v["rate_limit"] = json!({ "per_minute": snap.rate_per_minute, "tokens": snap.rate_tokens });
    v["environment"] = json!(std::env::var("ENVIRONMENT").ok());
    if let Some((mode, why, unenforced)) = shared.containment.lock().ok().and_then(|g| g.clone()) {
        v["containment"] = json!({ "mode": mode, "why": why, "not_enforced": unenforced });
    }
}

fn metrics_text(shared: &Shared) -> String {
    let snap = shared.snapshot();
    let by = by_status(&snap);
    metrics::render(
        &METRICS,
        &Gauges {
            profile: &shared.adapter,
            tasks_by_status: &by,
            rss_bytes: proc::rss_bytes(),
            cpu_seconds: proc::cpu_seconds(),
            open_fds: proc::open_fds(),
            start_time: proc::start_time(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn shared() -> Shared {
        let s = Shared::new("qchat", "/bin/sh", std::env::temp_dir());
        std::sync::Arc::try_unwrap(s).ok().unwrap()
    }

    #[test]
    fn a_scheduler_that_stopped_ticking_is_unhealthy() {
        let mut s = shared();
        s.tick();
        assert_eq!(health(&s).0, 200);
        s.started = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        let (code, v) = health(&s);
        assert_eq!(code, 503);
        assert_eq!(v["status"], "unhealthy");
        assert!(
            v["reasons"][0]
                .as_str()
                .unwrap()
                .contains("scheduler has not run")
        );
    }

    #[test]
    fn standby_and_stopping() {
        let s = shared();
        s.tick();
        s.standby.store(true, Ordering::SeqCst);
        assert_eq!(health(&s).1["status"], "standby");
        s.standby.store(false, Ordering::SeqCst);
        s.stopping.store(true, Ordering::SeqCst);
        let (code, v) = health(&s);
        assert_eq!((code, v["status"].as_str()), (503, Some("stopping")));
    }
}

//! What every benchmark needs: a temporary directory, fake agents, the daemon
//! started and stopped, readings from /proc.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    let p = me.parent().map(|d| d.join(name)).unwrap_or_default();
    if !p.is_file() {
        eprintln!(
            "{} not found: build it first (cargo build --release)",
            p.display()
        );
        std::process::exit(1);
    }
    p
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

pub fn now() -> String {
    ralph_qchat::sys::time::now_rfc3339()
}

pub struct Temp(pub PathBuf);

impl Temp {
    pub fn new(tag: &str) -> Temp {
        Temp::under(&std::env::temp_dir(), tag)
    }

    pub fn under(base: &Path, tag: &str) -> Temp {
        let p = base.join(format!("ralph-qchat-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::create_dir_all(&p);
        Temp(p)
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn agent(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    let _ = std::fs::write(&p, format!("#!/bin/sh\n{body}\n"));
    let _ = Command::new("chmod").arg("755").arg(&p).status();
    p
}

/// Queues `n` tasks by writing specs straight into the spool.
pub fn tasks(state: &Path, n: usize, max_iterations: u64) -> Vec<String> {
    let spool = state.join("spool");
    let _ = std::fs::create_dir_all(&spool);
    (0..n)
        .map(|i| {
            let id = format!("b{i:04}");
            let ws = state.join("workspaces").join(&id);
            let _ = std::fs::create_dir_all(&ws);
            let _ = std::fs::write(ws.join("PROMPT.md"), "# bench\n");
            let spec = format!(
                "id = \"{id}\"\nprompt_file = \"{}\"\nworkdir = \"{}\"\nmax_iterations = {max_iterations}\n",
                ws.join("PROMPT.md").display(),
                ws.display()
            );
            let _ = std::fs::write(spool.join(format!("{id}.toml")), spec);
            id
        })
        .collect()
}

pub struct Daemon {
    pub child: Child,
    pub state: PathBuf,
    pub port: u16,
}

/// Starts the daemon and waits until it serves (its port file appears).
pub fn daemon(bin: &Path, dir: &Path, config: &str, agent: &Path, workers: usize) -> Daemon {
    daemon_env(bin, dir, config, agent, workers, &[])
}

/// The same with extra environment variables.
pub fn daemon_env(
    bin: &Path,
    dir: &Path,
    config: &str,
    agent: &Path,
    workers: usize,
    env: &[(&str, &str)],
) -> Daemon {
    let state = dir.join("state");
    let cfg = dir.join("bench.toml");
    let _ = std::fs::write(&cfg, config);
    let mut cmd = Command::new(bin);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .args(["daemon", "--health-port", "0", "--metrics-interval", "0"])
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .arg("--agent-command")
        .arg(agent)
        .env("QCHAT_MAX_CONCURRENT", workers.to_string())
        .env("QCHAT_POLL_INTERVAL", "0.01")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            eprintln!("cannot start {}: {e}", bin.display());
            std::process::exit(1)
        });
    let port_file = state.join("http.port");
    wait(Duration::from_secs(10), || port_file.is_file());
    let port = std::fs::read_to_string(&port_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    Daemon { child, state, port }
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM, and the time until it exited.
    pub fn stop(mut self) -> Duration {
        let t = Instant::now();
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let _ = self.child.wait();
        t.elapsed()
    }

    pub fn task_status(&self, id: &str) -> String {
        std::fs::read_to_string(self.state.join("tasks").join(id).join("state.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["status"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn all_finished(&self, ids: &[String]) -> bool {
        ids.iter().all(|id| {
            let s = self.task_status(id);
            !s.is_empty() && s != "running" && s != "queued"
        })
    }
}

pub fn wait(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

fn stat_field(pid: i32, i: usize) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..]
        .split_whitespace()
        .nth(i)?
        .parse()
        .ok()
}

pub fn cpu_seconds(pid: i32) -> f64 {
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (stat_field(pid, 11).unwrap_or(0) + stat_field(pid, 12).unwrap_or(0)) as f64 / ticks
}

/// CPU time of every live thread of `pid` in nanoseconds (schedstat), far
/// finer than the clock ticks of /proc/PID/stat.
pub fn cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

pub fn status_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(field)).and_then(|l| {
                l[field.len()..]
                    .split_whitespace()
                    .next()
                    .map(str::to_string)
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

//! Test harness: a sandbox directory per test, the real binary run against
//! fake agents, waits with deadlines, and a check that nothing started by
//! the test is left running.

#![allow(dead_code)]

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ralph-qchat");

pub struct Sandbox {
    pub dir: PathBuf,
    pub tag: String,
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// Peak resident memory of ralph-qchat (and children it waited for), KiB.
    pub maxrss_kib: i64,
}

impl Finished {
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        static N: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("ralph-qchat-test-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        std::fs::write(dir.join("PROMPT.md"), "# Task\n\nMake the tests pass.\n").unwrap();
        Sandbox { dir, tag }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, content).unwrap();
        p
    }

    /// Writes a script (an agent of the test's own) and makes it executable.
    pub fn write_exec(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.write(rel, content);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    pub fn agent(name: &str) -> String {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fake-agents")
            .join(name)
            .display()
            .to_string()
    }

    /// The binary, in the sandbox, isolated from the caller's environment.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(&self.dir)
            .env("RALPH_TEST_TAG", &self.tag)
            .env("HOME", &self.dir)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("QCHAT_") || k.starts_with("HEALTH_CHECK_") || k.starts_with("FAKE_") {
                c.env_remove(k);
            }
        }
        c
    }

    /// `run` with a fake agent, fast defaults (no delays), and extra args.
    pub fn run_cmd(&self, agent: &str, extra: &[&str]) -> Command {
        self.run_program(&Sandbox::agent(agent), extra)
    }

    /// `run` with any agent program (a real CLI), fast defaults, extra args.
    pub fn run_program(&self, program: &str, extra: &[&str]) -> Command {
        let mut args = vec![
            "run",
            "--agent-command",
            program,
            "--iteration-delay",
            "0",
            "--retry-delay",
            "0.05",
            "--metrics-interval",
            "0",
        ];
        args.extend_from_slice(extra);
        self.cmd(&args)
    }

    pub fn state(&self) -> serde_json::Value {
        self.state_of("PROMPT")
    }

    pub fn state_of(&self, id: &str) -> serde_json::Value {
        let p = self.path(&format!(".ralph-qchat/tasks/{id}/state.json"));
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap()
    }

    pub fn runs(&self) -> usize {
        self.read("fake-runs.log").lines().count()
    }

    /// Processes carrying this sandbox's tag that are not zombies.
    pub fn live_processes(&self) -> Vec<i32> {
        self.live_commands()
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// The same, each with its command line (arguments joined by spaces).
    pub fn live_commands(&self) -> Vec<(i32, String)> {
        let needle = format!("RALPH_TEST_TAG={}", self.tag);
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
                continue;
            };
            if !env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
                continue;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rfind(')').and_then(|i| stat[i + 2..].chars().next());
            if state.is_some_and(|s| s != 'Z') {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                found.push((pid, cmdline.trim_end().to_string()));
            }
        }
        found
    }

    /// Asserts that nothing this test started is running, allowing a moment
    /// for processes that were just killed to disappear.
    pub fn assert_nothing_left(&self) {
        let ok = wait_until(Duration::from_secs(5), || self.live_processes().is_empty());
        if !ok {
            let left = self.live_commands();
            for (p, _) in &left {
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
            panic!("processes left running after the test: {left:?}");
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Every test ends with the check that nothing it started is running.
        if !std::thread::panicking() {
            self.assert_nothing_left();
        }
        for p in self.live_processes() {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("sandbox kept for inspection: {}", self.dir.display());
        }
    }
}

/// The daemon's log, for tests that start it with `--log-file daemon.log`.
pub fn log_of(sb: &Sandbox) -> String {
    sb.read("daemon.log")
}

/// Waits (failing with the daemon's log after `secs`) for task `id` to have
/// `status`.
pub fn await_status(sb: &Sandbox, id: &str, status: &str, secs: u64) {
    assert!(
        wait_until(Duration::from_secs(secs), || sb.task(id)["status"]
            == status),
        "{id} is not {status}: {}",
        log_of(sb)
    );
}

/// Waits (failing with the daemon's log after `secs`) for every task of
/// `ids` to have finished.
pub fn await_finished(sb: &Sandbox, ids: &[String], secs: u64) {
    assert!(
        wait_until(Duration::from_secs(secs), || sb.all_finished(ids)),
        "{}",
        log_of(sb)
    );
}

/// How many daemons have logged their start-up line in `daemon.log`.
pub fn start_lines(sb: &Sandbox) -> usize {
    log_of(sb).matches(" workers, agent ").count()
}

pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Spawns with piped output drained on threads, so a chatty child never blocks.
pub struct Running {
    pub child: Child,
    started: Instant,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
}

pub fn start(mut cmd: Command) -> Running {
    let mut child = cmd.spawn().expect("spawn ralph-qchat");
    fn drain(
        pipe: Option<impl std::io::Read + Send + 'static>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    Running {
        child,
        started: Instant::now(),
        out: Some(out),
        err: Some(err),
    }
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// SIGTERM, then the orderly exit: 0 within ten seconds.
    pub fn stop(self) {
        self.signal(libc::SIGTERM);
        let f = self.finish(Duration::from_secs(10));
        assert_eq!(f.code(), 0, "{}", f.stderr);
    }

    /// Waits for exit (killing it and failing after `limit`), with rusage.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let pid = self.pid();
        let deadline = Instant::now() + limit;
        let mut status = 0;
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if r == pid {
                break;
            }
            if Instant::now() >= deadline {
                unsafe { libc::kill(pid, libc::SIGKILL) };
                unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
                let err = self
                    .err
                    .take()
                    .map(|h| h.join().unwrap())
                    .unwrap_or_default();
                panic!(
                    "ralph-qchat did not finish within {limit:?}; stderr:\n{}",
                    String::from_utf8_lossy(&err)
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let elapsed = self.started.elapsed();
        // The Child no longer owns a process: keep std from waiting on it.
        std::mem::forget(self.child);
        let stdout = self
            .out
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        let stderr = self
            .err
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        Finished {
            status: ExitStatus::from_raw(status),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            elapsed,
            maxrss_kib: usage.ru_maxrss,
        }
    }
}

pub fn run(cmd: Command) -> Finished {
    start(cmd).finish(Duration::from_secs(30))
}

impl Sandbox {
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// `daemon` on the sandbox's state directory with fast timings.
    pub fn daemon_cmd(&self, agent: &str, extra: &[&str]) -> Command {
        self.daemon_cmd_on(&self.state_dir(), agent, extra)
    }

    /// The same on the state directory named by `state_dir`.
    pub fn daemon_cmd_on(&self, state_dir: &Path, agent: &str, extra: &[&str]) -> Command {
        let a = Sandbox::agent(agent);
        let sd = state_dir.display().to_string();
        let mut args = vec![
            "daemon",
            "--state-dir",
            sd.as_str(),
            "--agent-command",
            a.as_str(),
            "--iteration-delay",
            "0",
            "--retry-delay",
            "0.05",
            "--metrics-interval",
            "0",
        ];
        args.extend_from_slice(&["--health-port", "0"]);
        args.extend_from_slice(extra);
        let mut c = self.cmd(&args);
        c.env("QCHAT_POLL_INTERVAL", "0.05");
        c
    }

    pub fn submit(&self, prompt_text: &str, id: &str, extra: &[&str]) {
        let p = self.write(&format!("{id}.prompt.md"), prompt_text);
        let sd = self.state_dir().display().to_string();
        let ps = p.display().to_string();
        let mut args = vec![
            "submit",
            ps.as_str(),
            "--state-dir",
            sd.as_str(),
            "--id",
            id,
        ];
        args.extend_from_slice(extra);
        let r = run(self.cmd(&args));
        assert_eq!(r.code(), 0, "submit {id}: {}", r.stderr);
        assert_eq!(r.stdout.trim(), id);
    }

    /// The task's record; Null when there is none yet. A record that exists
    /// must parse: records are replaced atomically, never seen half written.
    pub fn task(&self, id: &str) -> serde_json::Value {
        let p = self.state_dir().join("tasks").join(id).join("state.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", p.display())),
            Err(_) => serde_json::Value::Null,
        }
    }

    pub fn task_ids(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state_dir().join("tasks"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn all_finished(&self, ids: &[String]) -> bool {
        ids.iter().all(|id| {
            let s = self.task(id)["status"].as_str().unwrap_or("").to_string();
            !s.is_empty() && s != "running" && s != "queued"
        })
    }
}

/// A tool the tests need from PATH: CI must have it (.ci/run installs it);
/// elsewhere the test says it is skipped.
pub fn ci_tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must provide {name}");
        eprintln!("{name} not on PATH: skipping (CI runs it)");
    }
    found
}

/// strace is on PATH (CI must have it; elsewhere its tests are skipped).
pub fn strace_available() -> bool {
    ci_tool("strace").is_some()
}

/// A number from /proc/PID/status (`VmRSS:` in KiB, `Threads:`), 0 if absent.
pub fn proc_status(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `c` run under `strace -f -y`, tracing the system calls `trace` names.
pub fn traced(c: &Command, log: &Path, trace: &str) -> Command {
    let mut s = Command::new("strace");
    s.args(["-f", "-y", "-qq", "-s", "512", "-o"])
        .arg(log)
        .arg("-e")
        .arg(format!("trace={trace}"))
        .arg(c.get_program())
        .args(c.get_args())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(d) = c.get_current_dir() {
        s.current_dir(d);
    }
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => s.env(k, v),
            None => s.env_remove(k),
        };
    }
    s
}

/// The successful system-call lines of a trace, without thread ids.
pub fn calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("= -1 "))
        .map(|l| {
            l.split_once(' ')
                .map_or(l, |(_, rest)| rest)
                .trim_start()
                .to_string()
        })
        .collect()
}

/// The ralph-qchat that strace started, once it runs. Not simply strace's
/// first child: strace forks short-lived probes of its own at start (of
/// what ptrace supports), and under load a look at its children can find one.
pub fn traced_child(strace: i32) -> i32 {
    let ours = std::fs::canonicalize(BIN).unwrap();
    let mut pid = 0;
    assert!(wait_until(Duration::from_secs(10), || {
        pid = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .find(|p: &i32| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == ours))
            .unwrap_or(0);
        pid > 0
    }));
    pid
}

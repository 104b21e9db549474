//! Reliability: a long soak, faults injected into the disk, the agent binary
//! and the file-descriptor limit, and many tasks of mixed behaviour through
//! repeated kill -9. Bounded to a few minutes in all.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn health(sb: &Sandbox) -> serde_json::Value {
    let port = std::fs::read_to_string(sb.state_dir().join("http.port")).unwrap_or_default();
    let url = format!("http://127.0.0.1:{}/health", port.trim());
    ralph_qchat::http::client::get(&url, Duration::from_secs(2))
        .ok()
        .and_then(|(_, b)| serde_json::from_str(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn specs(sb: &Sandbox, n: usize, start: usize, max_iterations: u64) -> Vec<String> {
    spool_specs(sb, n, start, max_iterations, true)
}

/// Specs for `ws/s0000..` whose PROMPT.md the caller wrote.
fn specs_keeping_prompts(sb: &Sandbox, n: usize, max_iterations: u64) -> Vec<String> {
    spool_specs(sb, n, 0, max_iterations, false)
}

fn spool_specs(
    sb: &Sandbox,
    n: usize,
    start: usize,
    max_iterations: u64,
    write_prompt: bool,
) -> Vec<String> {
    let spool = sb.state_dir().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    (start..start + n)
        .map(|i| {
            let id = format!("s{i:04}");
            let ws = sb.path(&format!("ws/{id}"));
            std::fs::create_dir_all(&ws).unwrap();
            if write_prompt {
                std::fs::write(ws.join("PROMPT.md"), "# soak\n").unwrap();
            }
            std::fs::write(
                spool.join(format!("{id}.toml")),
                format!(
                    "prompt_file = {:?}\nworkdir = {:?}\nmax_iterations = {max_iterations}\n",
                    ws.join("PROMPT.md").display().to_string(),
                    ws.display().to_string()
                ),
            )
            .unwrap();
            id
        })
        .collect()
}

fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The daemon's open descriptors at rest: the fewest seen over a second. Its
/// writer may still be saving a file when the last task ends (an fd open for
/// a moment, or for an fsync's length on a busy disk); a leaked descriptor
/// stays open through every sample.
fn resting_fds(pid: i32) -> usize {
    (0..20)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            fds(pid)
        })
        .min()
        .unwrap()
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The daemon on `cfg.toml` with /bin/true as its agent, warnings only, in
/// daemon.log; `extra` arguments after those.
fn true_daemon(sb: &Sandbox, extra: &[&str]) -> Running {
    let state = sb.state_dir().display().to_string();
    let mut args = vec![
        "daemon",
        "--state-dir",
        state.as_str(),
        "--agent-command",
        "/bin/true",
        "--config",
        "cfg.toml",
        "--health-port",
        "0",
        "--metrics-interval",
        "0",
        "--log-file",
        "daemon.log",
        "--log-level",
        "warn",
    ];
    args.extend_from_slice(extra);
    let mut c = sb.cmd(&args);
    c.env("QCHAT_POLL_INTERVAL", "0.05");
    start(c)
}

#[test]
fn soak_20000_requests_keeps_fds_and_memory_flat() {
    let sb = Sandbox::new("soak");
    sb.write(
        "cfg.toml",
        "[orchestrator]\ncheckpoint_interval = 0\nkeep_transcripts = 2\nmax_stalled_iterations = 0\n[performance]\nmax_concurrent = 20\n",
    );
    // /bin/true: the cheapest agent there is, so the daemon's own costs show
    // (it changes nothing, so stall detection is off).
    let d = true_daemon(&sb, &["--iteration-delay", "0"]);
    let pid = d.pid();
    // 1,000 requests, then the baseline.
    let first = specs(&sb, 20, 0, 50);
    await_finished(&sb, &first, 120);
    let (fd0, rss0) = (resting_fds(pid), rss_kib(pid));
    // 19,000 more.
    let rest = specs(&sb, 20, 20, 950);
    await_finished(&sb, &rest, 300);
    let (fd1, rss1) = (resting_fds(pid), rss_kib(pid));
    let done: u64 = first
        .iter()
        .chain(&rest)
        .map(|id| sb.task(id)["successful_iterations"].as_u64().unwrap())
        .sum();
    assert_eq!(done, 20_000);
    d.stop();
    eprintln!("soak: fds {fd0} -> {fd1}, RSS {rss0} KiB -> {rss1} KiB");
    assert_eq!(fd0, fd1, "open descriptors went from {fd0} to {fd1}");
    assert!(rss1 < rss0 + 1024, "RSS grew from {rss0} KiB to {rss1} KiB");
}

#[test]
fn agent_replaced_by_a_non_executable_file_mid_run_pauses_then_recovers() {
    let sb = Sandbox::new("noexecmid");
    sb.write("cfg.toml", "[circuit_breaker]\ncooldown = 0.5\n");
    std::fs::create_dir(sb.path("bin")).unwrap();
    let agent = sb.path("bin/agent");
    std::fs::copy(Sandbox::agent("complete-after.sh"), &agent).unwrap();
    let all: Vec<String> = (0..3).map(|i| format!("t{i}")).collect();
    for id in &all {
        sb.submit("# t\n", id, &[]);
    }
    let sd = sb.state_dir().display().to_string();
    let a = agent.display().to_string();
    let mut c = sb.cmd(&[
        "daemon",
        "--state-dir",
        &sd,
        "--agent-command",
        &a,
        "--config",
        "cfg.toml",
        "--iteration-delay",
        "0.2",
        "--health-port",
        "0",
        "--log-file",
        "daemon.log",
    ]);
    c.env("FAKE_N", "6").env("QCHAT_POLL_INTERVAL", "0.05");
    let d = start(c);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("t0")["successful_iterations"].as_u64() >= Some(1)
    ));
    // An upgrade gone wrong: the agent is now a text file without +x.
    std::fs::remove_file(&agent).unwrap();
    std::fs::write(&agent, "not a program\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || log_of(&sb)
            .contains("cannot be executed")),
        "{}",
        log_of(&sb)
    );
    assert!(wait_until(Duration::from_secs(5), || health(&sb)["status"]
        == "degraded"));
    for id in &all {
        assert_ne!(sb.task(id)["status"], "failed", "{}", sb.task(id));
    }
    std::fs::remove_file(&agent).unwrap();
    std::fs::copy(Sandbox::agent("complete-after.sh"), &agent).unwrap();
    await_finished(&sb, &all, 20);
    for id in &all {
        assert_eq!(sb.task(id)["status"], "completed", "{}", sb.task(id));
    }
    d.stop();
}

fn set_nofile(pid: i32, soft: u64) {
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: 4096,
    };
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn emfile_when_spawning_is_a_clear_message_and_nothing_is_lost() {
    let sb = Sandbox::new("emfile");
    sb.write(
        "cfg.toml",
        "[performance]\nmax_concurrent = 2\n[orchestrator]\nmax_consecutive_failures = 1000\n[adapter]\nmax_retries = 100\nretry_delay = 0.05\nmax_retry_delay = 0.1\n[circuit_breaker]\nfailure_threshold = 1000\n",
    );
    sb.submit("# t\n", "t1", &[]);
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &[
            "--config",
            "cfg.toml",
            "--log-file",
            "daemon.log",
            "--iteration-delay",
            "0.3",
        ],
    );
    c.env("FAKE_N", "4");
    let d = start(c);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("t1")["successful_iterations"].as_u64() >= Some(1)
    ));
    // Room to read the prompt and open the transcript, none for the agent's pipes.
    set_nofile(d.pid(), fds(d.pid()) as u64 + 2);
    // The agent cannot be started, and says why; so does the state writer.
    assert!(
        wait_until(Duration::from_secs(10), || {
            log_of(&sb).lines().any(|l| {
                l.contains("cannot start agent command") && l.contains("Too many open files")
            })
        }),
        "{}",
        log_of(&sb)
    );
    set_nofile(d.pid(), 4096);
    await_status(&sb, "t1", "completed", 20);
    assert!(sb.task("t1")["retries"].as_u64().unwrap() >= 1);
    d.stop();
}

/// A tmpfs of its own for the state directory, unmounted at the end.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &std::path::Path, size: &str) -> Mount {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs (the suite runs as root)");
        Mount(at.to_path_buf())
    }

    /// Remounts, retrying while a file is open for writing (EBUSY).
    fn remount(&self, opt: &str) {
        let ok = wait_until(Duration::from_secs(10), || {
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,{opt}")])
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(ok, "remount {opt}");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn read_only_state_dir_mid_run_is_reported_and_recovered() {
    let sb = Sandbox::new("readonly");
    let m = Mount::tmpfs(&sb.state_dir(), "16m");
    sb.submit("# t\n", "t1", &[]);
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--log-file", "daemon.log", "--iteration-delay", "0.2"],
    );
    c.env("FAKE_N", "8").env("HEALTH_CHECK_INTERVAL", "0.1");
    let d = start(c);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("t1")["successful_iterations"].as_u64() >= Some(1)
    ));
    m.remount("ro");
    assert!(
        wait_until(Duration::from_secs(10), || health(&sb)["status"]
            == "unhealthy"),
        "{}",
        health(&sb)
    );
    // The writer itself must have hit the read-only file system (a
    // transcript warning says so too, earlier): only then is there a
    // recovery to see.
    assert!(
        wait_until(Duration::from_secs(10), || log_of(&sb).lines().any(|l| l
            .contains("Read-only file system")
            && l.contains("will retry"))),
        "{}",
        log_of(&sb)
    );
    let frozen = sb.task("t1");
    m.remount("rw");
    await_status(&sb, "t1", "completed", 20);
    // The record reaches the disk before the scheduler hears back from the
    // writer and says so: wait for the line.
    assert!(wait_until(Duration::from_secs(5), || log_of(&sb)
        .contains("task state is being written again")));
    assert!(
        sb.task("t1")["successful_iterations"].as_u64() >= frozen["successful_iterations"].as_u64()
    );
    assert_eq!(health(&sb)["status"], "healthy");
    d.stop();
}

#[test]
fn full_disk_is_reported_and_recovered() {
    let sb = Sandbox::new("diskfull");
    let _m = Mount::tmpfs(&sb.state_dir(), "2m");
    sb.submit("# t\n", "t1", &[]);
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--log-file", "daemon.log", "--iteration-delay", "0.2"],
    );
    c.env("FAKE_N", "8").env("HEALTH_CHECK_INTERVAL", "0.1");
    let d = start(c);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("t1")["successful_iterations"].as_u64() >= Some(1)
    ));
    // Fill what is left.
    let filler = sb.state_dir().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    assert!(
        wait_until(Duration::from_secs(10), || log_of(&sb)
            .contains("No space left on device")),
        "{}",
        log_of(&sb)
    );
    assert!(
        wait_until(Duration::from_secs(10), || health(&sb)["status"]
            == "unhealthy"),
        "{}",
        health(&sb)
    );
    let why = health(&sb)["reasons"].to_string();
    assert!(
        why.contains("is full") || why.contains("No space left"),
        "{why}"
    );
    std::fs::remove_file(&filler).unwrap();
    await_status(&sb, "t1", "completed", 20);
    let t = sb.task("t1");
    // The task went on after the disk filled, and its record is whole.
    assert!(t["successful_iterations"].as_u64().unwrap() >= 1, "{t}");
    assert_eq!(t["in_progress"], serde_json::Value::Null, "{t}");
    d.stop();
}

#[test]
fn twenty_kills_of_twenty_mixed_tasks_lose_nothing() {
    let sb = Sandbox::new("crash20");
    let kinds = ["", "SLOW", "FLAKY", "CHILD"];
    let all: Vec<String> = (0..20).map(|i| format!("m{i:02}")).collect();
    for (i, id) in all.iter().enumerate() {
        // m00 also works until released: an agent surely running at the
        // kills, which must die with its daemon.
        let hold = if i == 0 { " HOLD" } else { "" };
        sb.submit(&format!("# task {}{hold}\n", kinds[i % 4]), id, &[]);
    }
    sb.write(
        "cfg.toml",
        "[performance]\nmax_concurrent = 6\n[adapter]\nmax_retries = 1\nkill_grace = 0.3\n",
    );
    let daemon = || {
        let mut c = sb.daemon_cmd(
            "mixed.sh",
            &["--config", "cfg.toml", "--log-file", "daemon.log"],
        );
        c.env("FAKE_N", "5").env("FAKE_RELEASE", sb.path("release"));
        start(c)
    };
    let mut seed =
        (Instant::now().elapsed().as_nanos() as u64) ^ (std::process::id() as u64) << 20 | 1;
    let mut before = std::collections::HashMap::new();
    for round in 0..20 {
        let d = daemon();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(100 + seed % 400));
        d.signal(libc::SIGKILL);
        assert_eq!(
            d.finish(Duration::from_secs(10)).code(),
            137,
            "round {round}"
        );
        // The agents die with their daemon. What they started in the
        // background (CHILD's sleep) lives until the next start ends it:
        // only systemd's cgroup can end it sooner (packaging/systemd-test.sh).
        let agents = || -> Vec<(i32, String)> {
            sb.live_commands()
                .into_iter()
                .filter(|(_, c)| c.contains("mixed.sh"))
                .collect()
        };
        assert!(
            wait_until(Duration::from_secs(5), || agents().is_empty()),
            "round {round}: agents outlived their daemon: {:?}",
            agents()
        );
        for id in &all {
            let t = sb.task(id);
            if t.is_null() {
                continue;
            }
            let now: Vec<u64> = [
                "iteration",
                "successful_iterations",
                "failed_iterations",
                "retries",
                "interrupted_iterations",
            ]
            .iter()
            .map(|k| t[*k].as_u64().unwrap())
            .collect();
            if let Some(prev) = before.get(id) {
                let prev: &Vec<u64> = prev;
                for (k, (a, b)) in now.iter().zip(prev).enumerate() {
                    assert!(
                        a >= b || k == 0,
                        "round {round}: {id} counter {k} went back from {b} to {a}"
                    );
                }
            }
            before.insert(id.clone(), now);
        }
    }
    sb.write("release", "");
    // Killed at random moments, some daemons died before they logged that
    // they started; this one must get there.
    let before_last = start_lines(&sb);
    let d = daemon();
    assert!(
        wait_until(Duration::from_secs(10), || start_lines(&sb)
            == before_last + 1),
        "{}",
        log_of(&sb)
    );
    await_finished(&sb, &all, 90);
    d.stop();
    assert_eq!(sb.task_ids(), all);
    for id in &all {
        let t = sb.task(id);
        assert_eq!(t["status"], "completed", "{t}");
        let prompt =
            std::fs::read_to_string(sb.state_dir().join("workspaces").join(id).join("PROMPT.md"))
                .unwrap();
        assert_eq!(
            prompt.matches("TASK_COMPLETE").count(),
            1,
            "{id} ran again after completing"
        );
    }
}

/// Twenty agents running, then SIGTERM: with a grace long enough their
/// requests finish; with grace 0 they are stopped at once. Either way the
/// daemon exits 0 in time, nothing is left running, and the next start
/// resumes every task.
#[test]
fn drain_of_twenty_running_agents_with_a_long_grace_and_with_none() {
    for (grace, sleep) in [(20.0, "3"), (0.0, "300")] {
        let sb = Sandbox::new(if grace > 0.0 {
            "drainlong"
        } else {
            "drainnone"
        });
        sb.write(
            "cfg.toml",
            format!(
                "[orchestrator]\nshutdown_grace = {grace:.1}\n[adapter]\nkill_grace = 0.5\n[performance]\nmax_concurrent = 20\n"
            ),
        );
        let all = specs(&sb, 20, 0, 2);
        let mut c = sb.daemon_cmd(
            "sleep.sh",
            &["--config", "cfg.toml", "--log-file", "daemon.log"],
        );
        c.env("FAKE_SLEEP", sleep);
        let d = start(c);
        let started = || {
            all.iter()
                .all(|id| sb.path(&format!("ws/{id}/agent.pid")).is_file())
        };
        assert!(
            wait_until(Duration::from_secs(20), started),
            "{}",
            log_of(&sb)
        );
        let t0 = Instant::now();
        d.signal(libc::SIGTERM);
        let r = d.finish(Duration::from_secs(30));
        let took = t0.elapsed();
        assert_eq!(r.code(), 0, "grace {grace}: {}", log_of(&sb));
        // Long grace: the 3 s requests, not the 20 s grace. None: the kill
        // grace (0.5 s) and the time to write the records.
        let limit = if grace > 0.0 { 15 } else { 3 };
        assert!(
            took < Duration::from_secs(limit),
            "grace {grace}: took {took:?}"
        );
        sb.assert_nothing_left();
        for id in &all {
            let t = sb.task(id);
            if grace > 0.0 {
                assert_eq!(t["in_progress"], serde_json::Value::Null, "{t}");
            } else {
                // Cut short: still marked, so the next start runs it again.
                assert_eq!(t["in_progress"], 1, "{t}");
            }
        }
        // The next start resumes them all: the agent now completes at once.
        let mut c = sb.daemon_cmd(
            "complete-after.sh",
            &["--config", "cfg.toml", "--log-file", "daemon.log"],
        );
        c.env("FAKE_N", "1");
        let d = start(c);
        await_finished(&sb, &all, 30);
        d.stop();
        for id in &all {
            let t = sb.task(id);
            assert!(
                t["status"] == "completed" || t["status"] == "limit_reached",
                "{t}"
            );
            // Long grace: iteration 1 finished under the old daemon, so the
            // new one runs iteration 2. None: iteration 1 runs again.
            let (done, cut) = if grace > 0.0 { (2, 0) } else { (1, 1) };
            assert_eq!(t["successful_iterations"], done, "grace {grace}: {t}");
            assert_eq!(t["interrupted_iterations"], cut, "grace {grace}: {t}");
        }
        sb.assert_nothing_left();
    }
}

#[test]
fn tasks_waiting_between_iterations_hold_no_copy_of_their_prompt() {
    let sb = Sandbox::new("prompt-held");
    sb.write(
        "cfg.toml",
        "[orchestrator]\ncheckpoint_interval = 0\nmax_stalled_iterations = 0\niteration_delay = 600\n[performance]\nmax_concurrent = 20\n",
    );
    let d = true_daemon(&sb, &[]);
    let pid = d.pid();
    assert!(wait_until(Duration::from_secs(10), || sb
        .state_dir()
        .join("http.port")
        .is_file()));
    let base = rss_kib(pid);
    // 200 tasks with 200 KiB prompts: 40 MiB if each kept the copy its
    // last attempt's worker read, for the 600 s it waits. What stays
    // without (records, worker buffers, the allocator's leftovers) is 6-8 MiB.
    let big = "# a long task\n".repeat(200 * 1024 / 14);
    for i in 0..200 {
        std::fs::create_dir_all(sb.path(&format!("ws/s{i:04}"))).unwrap();
        std::fs::write(sb.path(&format!("ws/s{i:04}/PROMPT.md")), &big).unwrap();
    }
    // The prompts are in place before the specs (which keep them) arrive.
    let ids = specs_keeping_prompts(&sb, 200, 1000);
    assert!(
        wait_until(Duration::from_secs(60), || ids
            .iter()
            .all(|id| sb.task(id)["successful_iterations"].as_u64() == Some(1))),
        "{}",
        sb.read("daemon.log")
    );
    // Idle, the daemon gives freed memory back: what stays is what it holds.
    let mut rss = 0;
    let held = wait_until(Duration::from_secs(10), || {
        rss = rss_kib(pid);
        rss < base + 16 * 1024
    });
    d.stop();
    eprintln!("RSS {base} KiB before, {rss} KiB with 200 tasks waiting");
    assert!(
        held,
        "RSS {base} KiB before, {rss} KiB with 200 tasks waiting"
    );
}

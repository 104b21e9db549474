//! The service as an operator runs it: many tasks from the spool, a bounded
//! worker pool, cancel, reload, diagnostics, systemd notifications, a second
//! instance, standby takeover.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t{i:02}")).collect()
}

/// (task, start, end) from the shared log.
fn intervals(text: &str) -> Vec<(String, f64, f64)> {
    let mut starts = std::collections::HashMap::new();
    let mut out = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() != 3 {
            continue;
        }
        let t: f64 = f[2].parse().unwrap();
        match f[0] {
            "start" => {
                starts.insert(f[1].to_string(), t);
            }
            "end" => {
                let s = starts.remove(f[1]).unwrap();
                out.push((f[1].to_string(), s, t));
            }
            _ => {}
        }
    }
    out
}

#[test]
fn fifty_tasks_never_more_than_max_concurrent_and_none_starves() {
    let sb = Sandbox::new("pool");
    let all = ids(50);
    for id in &all {
        sb.submit("# task\n", id, &[]);
    }
    let shared = sb.path("shared.log").display().to_string();
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("QCHAT_MAX_CONCURRENT", "5")
        .env("FAKE_N", "1")
        .env("FAKE_DELAY", "0.1")
        .env("FAKE_SHARED_LOG", &shared);
    let d = start(c);
    await_finished(&sb, &all, 60);
    d.signal(libc::SIGTERM);
    let r = d.finish(Duration::from_secs(10));
    assert_eq!(r.code(), 0, "{}", log_of(&sb));
    for id in &all {
        assert_eq!(sb.task(id)["status"], "completed", "{id}");
    }
    let iv = intervals(&sb.read("shared.log"));
    assert_eq!(iv.len(), 50);
    let mut max = 0;
    for (_, s, _) in &iv {
        let running = iv.iter().filter(|(_, s2, e2)| s2 <= s && s < e2).count();
        max = max.max(running);
    }
    assert!(max <= 5, "{max} agents at once");
    assert!(max >= 2, "never ran in parallel ({max})");
    // Served in arrival order: when the daemon started each (its record),
    // not when each agent got round to logging its start, which a loaded
    // machine delays by more than the 0.1 s a task takes.
    let mut by_start: Vec<(String, String)> = all
        .iter()
        .map(|id| {
            let t = sb.task(id);
            (
                t["started_at"].as_str().unwrap_or("").to_string(),
                id.clone(),
            )
        })
        .collect();
    by_start.sort();
    let order: Vec<&str> = by_start.iter().map(|(_, id)| id.as_str()).collect();
    let mut firsts = order.clone();
    firsts.truncate(5);
    firsts.sort();
    assert_eq!(firsts, ["t00", "t01", "t02", "t03", "t04"], "{order:?}");
    assert!(
        order.iter().position(|i| *i == "t49").unwrap() >= 45,
        "{order:?}"
    );
}

#[test]
fn sigterm_gives_running_agents_the_grace_then_stops_them_and_restart_resumes() {
    let sb = Sandbox::new("drain");
    sb.write(
        "cfg.toml",
        "[orchestrator]\nshutdown_grace = 1.0\n[adapter]\nkill_grace = 0.5\n",
    );
    let all = ids(3);
    for id in &all {
        sb.submit("# task\n", id, &[]);
    }
    let mut c = sb.daemon_cmd(
        "sleep.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_SLEEP", "300");
    let d = start(c);
    let running = || all.iter().all(|id| sb.task(id)["in_progress"] == 1);
    assert!(
        wait_until(Duration::from_secs(10), running),
        "{}",
        log_of(&sb)
    );
    assert!(wait_until(Duration::from_secs(5), || {
        all.iter().all(|id| {
            sb.state_dir()
                .join("workspaces")
                .join(id)
                .join("agent.pid")
                .is_file()
        })
    }));
    let t0 = Instant::now();
    d.signal(libc::SIGTERM);
    let r = d.finish(Duration::from_secs(10));
    assert_eq!(r.code(), 0, "{}", log_of(&sb));
    // grace 1 + kill_grace 0.5 + 1 s.
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t0.elapsed()
    );
    sb.assert_nothing_left();
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "1").env("FAKE_LOG", "rerun.log");
    let d = start(c);
    await_finished(&sb, &all, 20);
    d.stop();
    for id in &all {
        let t = sb.task(id);
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(t["interrupted_iterations"], 1, "{t}");
        assert_eq!(t["iteration"], 1, "{t}");
    }
}

#[test]
fn sigterm_lets_a_request_that_fits_in_the_grace_finish() {
    let sb = Sandbox::new("grace");
    sb.write(
        "cfg.toml",
        "[orchestrator]\nshutdown_grace = 20.0\nmax_iterations = 1\n",
    );
    sb.submit("# task\n", "t00", &[]);
    let mut c = sb.daemon_cmd(
        "sleep.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_SLEEP", "1");
    let d = start(c);
    assert!(wait_until(Duration::from_secs(10), || sb
        .state_dir()
        .join("workspaces/t00/agent.pid")
        .is_file()));
    d.signal(libc::SIGTERM);
    let r = d.finish(Duration::from_secs(15));
    assert_eq!(r.code(), 0);
    let t = sb.task("t00");
    assert_eq!(t["successful_iterations"], 1, "{t}");
    assert_eq!(t["in_progress"], serde_json::Value::Null, "{t}");
    assert_eq!(t["interrupted_iterations"], 0, "{t}");
}

#[test]
fn second_daemon_on_the_same_state_exits_75_naming_the_first() {
    let sb = Sandbox::new("twodaemons");
    let d = start(sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]));
    assert!(wait_until(Duration::from_secs(10), || log_of(&sb).contains("serving")));
    let r = run(sb.daemon_cmd("complete-after.sh", &[]));
    assert_eq!(r.code(), 75, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("pid {}", d.pid())),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("--standby"), "{}", r.stderr);
    d.stop();
}

#[test]
fn standby_takes_over_when_the_running_instance_stops() {
    let sb = Sandbox::new("standby");
    sb.write(
        "cfg.toml",
        "[orchestrator]\nshutdown_grace = 0.0\n[adapter]\nkill_grace = 0.5\n",
    );
    sb.submit("# task\n", "t00", &[]);
    let mut c = sb.daemon_cmd(
        "sleep.sh",
        &["--config", "cfg.toml", "--log-file", "old.log"],
    );
    c.env("FAKE_SLEEP", "300");
    let old = start(c);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("t00")["in_progress"] == 1
    ));
    let mut c = sb.daemon_cmd("complete-after.sh", &["--standby", "--log-file", "new.log"]);
    c.env("FAKE_N", "1").env("FAKE_LOG", "new-runs.log");
    let new = start(c);
    assert!(wait_until(Duration::from_secs(10), || sb
        .read("new.log")
        .contains("standby:")));
    old.stop();
    assert!(
        wait_until(Duration::from_secs(10), || sb.task("t00")["status"]
            == "completed"),
        "{}",
        sb.read("new.log")
    );
    assert!(sb.read("new.log").contains("took over"));
    assert_eq!(sb.task("t00")["interrupted_iterations"], 1);
    new.stop();
}

#[test]
fn cancel_stops_a_running_task_and_a_queued_one() {
    let sb = Sandbox::new("cancel");
    sb.write(
        "cfg.toml",
        "[adapter]\nkill_grace = 0.5\n[performance]\nmax_concurrent = 1\n",
    );
    sb.submit("# a\n", "running", &[]);
    sb.submit("# b\n", "queued", &[]);
    let mut c = sb.daemon_cmd(
        "ignore-term.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_SLEEP", "300");
    let d = start(c);
    let pidfile = sb.state_dir().join("workspaces/running/agent.pid");
    assert!(wait_until(Duration::from_secs(10), || pidfile.is_file()));
    let sd = sb.state_dir().display().to_string();
    let t0 = Instant::now();
    for id in ["queued", "running"] {
        let r = run(sb.cmd(&["cancel", id, "--state-dir", &sd]));
        assert_eq!(r.code(), 0, "{}", r.stderr);
    }
    // poll_interval 0.05 + kill_grace 0.5, and some slack for a busy machine.
    assert!(
        wait_until(Duration::from_secs(5), || {
            sb.task("running")["status"] == "cancelled"
                && sb.task("queued")["status"] == "cancelled"
        }),
        "{}",
        log_of(&sb)
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(sb.task("queued")["iteration"], 0);
    let r = run(sb.cmd(&["cancel", "nosuch", "--state-dir", &sd]));
    assert_ne!(r.code(), 0);
    assert!(r.stderr.contains("nosuch"));
    d.stop();
}

#[test]
fn bad_spool_entries_are_rejected_with_their_reason() {
    let sb = Sandbox::new("spool");
    sb.write("cfg.toml", "[limits]\nmax_prompt_size = 100\n");
    let spool = sb.state_dir().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let outside = sb.write("outside.md", "secret");
    std::os::unix::fs::symlink(&outside, spool.join("link.md")).unwrap();
    std::fs::create_dir(spool.join("adir.md")).unwrap();
    std::fs::write(spool.join("big.md"), "x".repeat(200)).unwrap();
    std::fs::write(spool.join("broken.toml"), "prompt_file = \n").unwrap();
    let p = sb.path("PROMPT.md").display().to_string();
    std::fs::write(
        spool.join("unknown.toml"),
        format!("prompt_file = {p:?}\ncolour = 1\n"),
    )
    .unwrap();
    std::fs::write(
        spool.join("dots.toml"),
        format!("id = \"../x\"\nprompt_file = {p:?}\n"),
    )
    .unwrap();
    std::fs::write(
        spool.join("nowd.toml"),
        format!("prompt_file = {p:?}\nworkdir = \"/no/such/dir\"\n"),
    )
    .unwrap();
    std::fs::write(spool.join("note.txt"), "hello").unwrap();
    std::fs::write(spool.join("good.md"), "# fine\n").unwrap();
    // Files still being written (editor and tool temporaries) are left alone.
    for name in ["draft.toml.tmp", "late.md.part", "notes.md~", ".hidden.md"] {
        std::fs::write(spool.join(name), "# later\n").unwrap();
    }
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_N", "1");
    let d = start(c);
    await_status(&sb, "good", "completed", 10);
    let reason = |name: &str| {
        std::fs::read_to_string(spool.join("rejected").join(format!("{name}.reason")))
            .unwrap_or_default()
    };
    assert!(wait_until(Duration::from_secs(5), || !reason("nowd.toml").is_empty()));
    for (entry, why) in [
        ("link.md", "symbolic link"),
        ("adir.md", "not a regular file"),
        ("big.md", "over the limit"),
        ("broken.toml", "line 1"),
        ("unknown.toml", "colour"),
        ("dots.toml", "not a valid task id"),
        ("nowd.toml", "does not exist"),
        ("note.txt", "unknown kind"),
    ] {
        assert!(reason(entry).contains(why), "{entry}: {}", reason(entry));
    }
    for name in ["draft.toml.tmp", "late.md.part", "notes.md~", ".hidden.md"] {
        assert!(spool.join(name).is_file(), "{name} was taken");
        assert!(reason(name).is_empty(), "{name} was rejected");
    }
    // Renamed into place, the finished file is taken.
    std::fs::rename(spool.join("late.md.part"), spool.join("late.md")).unwrap();
    await_status(&sb, "late", "completed", 10);
    // The link was moved, never followed: its target is untouched.
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret");
    assert!(
        std::fs::symlink_metadata(spool.join("rejected/link.md"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(sb.task_ids(), ["good", "late"]);
    assert!(log_of(&sb).contains("spool entry big.md rejected"));
    d.stop();
}

#[test]
fn submit_while_the_daemon_is_down_then_it_takes_the_task() {
    let sb = Sandbox::new("submitdown");
    let wd = sb.path("project");
    std::fs::create_dir(&wd).unwrap();
    std::fs::write(wd.join("TASK.md"), "# in place\n").unwrap();
    let sd = sb.state_dir().display().to_string();
    let prompt = wd.join("TASK.md").display().to_string();
    let w = wd.display().to_string();
    let r = run(sb.cmd(&[
        "submit",
        &prompt,
        "--workdir",
        &w,
        "--state-dir",
        &sd,
        "--max-iterations",
        "3",
    ]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let id = r.stdout.trim().to_string();
    assert!(id.starts_with("TASK-"), "{id}");
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "100");
    let d = start(c);
    await_status(&sb, &id, "limit_reached", 10);
    let t = sb.task(&id);
    assert_eq!(t["workdir"], w.as_str());
    assert_eq!(t["prompt_file"], prompt.as_str());
    assert_eq!(t["iteration"], 3);
    // It worked in place.
    assert!(wd.join("work.txt").is_file());
    let r = run(sb.cmd(&["status", "--state-dir", &sd, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v[0]["id"], id.as_str());
    d.stop();
}

#[test]
fn sighup_reloads_log_level_and_workers_and_refuses_a_broken_file() {
    let sb = Sandbox::new("reload");
    sb.write(
        "cfg.toml",
        "[performance]\nmax_concurrent = 1\n[logging]\nlevel = \"info\"\nfile = \"daemon.log\"\n",
    );
    let shared = sb.path("shared.log").display().to_string();
    let mut c = sb.daemon_cmd("complete-after.sh", &["--config", "cfg.toml"]);
    c.env("FAKE_N", "1")
        .env("FAKE_DELAY", "1")
        .env("FAKE_SHARED_LOG", &shared);
    let d = start(c);
    assert!(wait_until(Duration::from_secs(10), || log_of(&sb).contains("serving")));
    assert!(!log_of(&sb).contains("DEBUG"));
    sb.write(
        "cfg.toml",
        "[performance]\nmax_concurrent = 3\n[logging]\nlevel = \"debug\"\nfile = \"daemon.log\"\n",
    );
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || log_of(&sb)
            .contains("workers 1 -> 3")),
        "{}",
        log_of(&sb)
    );
    let all = ids(3);
    for id in &all {
        sb.submit("# t\n", id, &[]);
    }
    await_finished(&sb, &all, 20);
    assert!(log_of(&sb).contains("DEBUG"), "{}", log_of(&sb));
    let iv = intervals(&sb.read("shared.log"));
    let overlap = iv
        .iter()
        .filter(|(_, s, _)| iv.iter().all(|(_, s2, e2)| s2 < e2 && s < e2))
        .count();
    assert_eq!(overlap, 3, "three workers ran together: {iv:?}");
    // A broken file is refused and the running configuration stays.
    sb.write(
        "cfg.toml",
        "[performance]\nmax_concurrent = 3\nmax_concurent = 4\n",
    );
    d.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || log_of(&sb)
            .contains("reload refused")),
        "{}",
        log_of(&sb)
    );
    let log = log_of(&sb);
    let line = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(
        line.contains("cfg.toml line 3") && line.contains("max_concurent"),
        "{line}"
    );
    sb.submit("# t\n", "after", &[]);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("after")["status"] == "completed"
    ));
    d.stop();
}

#[test]
fn circuit_opens_on_failures_pauses_dispatch_then_recovers() {
    let sb = Sandbox::new("circuit");
    sb.write(
        "cfg.toml",
        "[circuit_breaker]\nfailure_threshold = 3\ncooldown = 1.5\n[adapter]\nmax_retries = 0\n[orchestrator]\nmax_consecutive_failures = 100\n[performance]\nmax_concurrent = 1\n",
    );
    let flag = sb.write("outage", "");
    let shared = sb.path("shared.log").display().to_string();
    sb.submit("# a\n", "a", &[]);
    sb.submit("# b\n", "b", &[]);
    let mut c = sb.daemon_cmd(
        "flaky.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_FLAG", &flag).env("FAKE_SHARED_LOG", &shared);
    let d = start(c);
    assert!(
        wait_until(Duration::from_secs(10), || log_of(&sb)
            .contains("circuit breaker open")),
        "{}",
        log_of(&sb)
    );
    std::fs::remove_file(&flag).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || sb
            .all_finished(&["a".into(), "b".into()])),
        "{}",
        log_of(&sb)
    );
    assert!(log_of(&sb).contains("circuit breaker closed"));
    let times: Vec<f64> = sb
        .read("shared.log")
        .lines()
        .map(|l| l.split(' ').nth(2).unwrap().parse().unwrap())
        .collect();
    // The third failure in a row opened it; then nothing ran for the cooldown.
    assert!(times.len() >= 5, "{times:?}");
    assert!(times[3] - times[2] >= 1.4, "{times:?}");
    assert!(times[2] - times[0] < 1.0, "{times:?}");
    for id in ["a", "b"] {
        let t = sb.task(id);
        assert_eq!(t["status"], "completed", "{t}");
    }
    d.stop();
}

#[test]
fn missing_agent_opens_the_circuit_fails_no_task_and_recovers_when_installed() {
    let sb = Sandbox::new("circuitmissing");
    sb.write("cfg.toml", "[circuit_breaker]\ncooldown = 1.0\n");
    for id in ["a", "b", "c"] {
        sb.submit("# t\n", id, &[]);
    }
    let agent = sb.path("bin/agent");
    let sd = sb.state_dir().display().to_string();
    let a = agent.display().to_string();
    let mut c = sb.cmd(&[
        "daemon",
        "--state-dir",
        &sd,
        "--agent-command",
        &a,
        "--health-port",
        "0",
        "--config",
        "cfg.toml",
        "--iteration-delay",
        "0",
        "--log-file",
        "daemon.log",
    ]);
    c.env("QCHAT_POLL_INTERVAL", "0.05").env("FAKE_N", "1");
    let d = start(c);
    assert!(
        wait_until(Duration::from_secs(10), || log_of(&sb)
            .contains("not found")),
        "{}",
        log_of(&sb)
    );
    std::thread::sleep(Duration::from_millis(300));
    for id in ["a", "b", "c"] {
        let t = sb.task(id);
        assert_ne!(t["status"], "failed", "{t}");
        // Its first iteration waits under its number: it has not run, and
        // the counter never goes back (#14).
        assert_eq!(t["iteration"], 1, "{t}");
        assert_eq!(t["successful_iterations"], 0, "{t}");
        assert_eq!(t["failed_iterations"], 0, "{t}");
    }
    // Logged once for the outage, not once per task.
    assert_eq!(
        log_of(&sb).matches("not found").count(),
        1,
        "{}",
        log_of(&sb)
    );
    std::fs::create_dir_all(sb.path("bin")).unwrap();
    std::fs::copy(Sandbox::agent("complete-after.sh"), &agent).unwrap();
    let all: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    await_finished(&sb, &all, 10);
    for id in &all {
        assert_eq!(sb.task(id)["status"], "completed");
    }
    d.stop();
}

#[test]
fn rate_limit_holds_across_tasks() {
    let sb = Sandbox::new("ratelimit");
    sb.write(
        "cfg.toml",
        "[performance]\nmax_requests_per_minute = 120\nmax_concurrent = 5\n",
    );
    let all = ids(10);
    for id in &all {
        sb.submit("# t\n", id, &[]);
    }
    let shared = sb.path("shared.log").display().to_string();
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_N", "1").env("FAKE_SHARED_LOG", &shared);
    let d = start(c);
    await_finished(&sb, &all, 30);
    d.stop();
    let mut starts: Vec<f64> = intervals(&sb.read("shared.log"))
        .iter()
        .map(|i| i.1)
        .collect();
    starts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(starts.len(), 10);
    // 2 a second with bursts of 2: ten requests need at least 4 seconds.
    let span = starts[9] - starts[0];
    assert!(span >= 3.8, "ten requests in {span} s");
    for (i, s) in starts.iter().enumerate() {
        let in_window = starts[i..].iter().filter(|t| **t < s + 1.0).count();
        assert!(
            in_window <= 4,
            "{in_window} requests within a second: {starts:?}"
        );
    }
}

#[test]
fn systemd_notifications_ready_watchdog_reloading_stopping() {
    let sb = Sandbox::new("notify");
    let sock_path = sb.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000");
    let d = start(c);
    let mut got = Vec::new();
    let recv_until = |want: &str, got: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                let hit = m.lines().any(|l| l == want);
                got.push(m);
                if hit {
                    return true;
                }
            }
        }
        false
    };
    assert!(recv_until("READY=1", &mut got), "{got:?}");
    assert!(got.iter().any(|m| m.contains("STATUS=")), "{got:?}");
    for _ in 0..3 {
        assert!(recv_until("WATCHDOG=1", &mut got), "{got:?}");
    }
    d.signal(libc::SIGHUP);
    assert!(recv_until("RELOADING=1", &mut got), "{got:?}");
    assert!(recv_until("READY=1", &mut got), "{got:?}");
    d.signal(libc::SIGTERM);
    assert!(recv_until("STOPPING=1", &mut got), "{got:?}");
    assert_eq!(d.finish(Duration::from_secs(10)).code(), 0);
}

#[test]
fn sigusr1_storm_is_coalesced_and_does_not_disturb_work() {
    let sb = Sandbox::new("storm");
    let all = ids(4);
    for id in &all {
        sb.submit("# t\n", id, &[]);
    }
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "3").env("FAKE_DELAY", "0.2");
    let d = start(c);
    assert!(wait_until(Duration::from_secs(10), || {
        sb.task("t00")["in_progress"].is_number()
    }));
    let t0 = Instant::now();
    for _ in 0..50 {
        d.signal(libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(5));
    }
    let storm = t0.elapsed().as_secs_f64();
    await_finished(&sb, &all, 30);
    let dumps = std::fs::read_dir(sb.state_dir().join("diagnostics"))
        .unwrap()
        .count();
    assert!(
        dumps >= 1 && (dumps as f64) <= storm.ceil() + 1.0,
        "{dumps} dumps for a {storm} s storm"
    );
    for id in &all {
        let t = sb.task(id);
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(t["successful_iterations"], 3, "{t}");
        assert_eq!(t["failed_iterations"], 0, "{t}");
    }
    d.stop();
}

/// Counters that must never go back, read from every task record.
fn counters(sb: &Sandbox, ids: &[String]) -> Vec<[u64; 5]> {
    ids.iter()
        .map(|id| {
            let t = sb.task(id);
            let n = |k: &str| t[k].as_u64().unwrap_or(0);
            [
                n("successful_iterations"),
                n("failed_iterations"),
                n("retries"),
                n("interrupted_iterations"),
                n("iteration").max(n("successful_iterations")),
            ]
        })
        .collect()
}

#[test]
fn kill_9_at_random_moments_loses_nothing_and_leaves_nothing() {
    let sb = Sandbox::new("crashloop");
    let all = ids(8);
    for id in &all {
        sb.submit("# t\n", id, &[]);
    }
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash loop seed {seed}");
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let daemon = || {
        let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
        c.env("FAKE_N", "6")
            .env("FAKE_DELAY", "0.3")
            .env("QCHAT_MAX_CONCURRENT", "4");
        start(c)
    };
    let mut before = counters(&sb, &all);
    for round in 0..10 {
        let d = daemon();
        std::thread::sleep(Duration::from_millis(150 + rand(500)));
        d.signal(libc::SIGKILL);
        let r = d.finish(Duration::from_secs(10));
        assert_eq!(r.code(), 137, "round {round}");
        // Every record parses and no counter went back.
        let after = counters(&sb, &all);
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            if sb.task(&all[i]).is_null() {
                continue;
            }
            for k in 0..5 {
                assert!(
                    a[k] >= b[k],
                    "round {round}: {} counter {k} went from {} to {}",
                    all[i],
                    b[k],
                    a[k]
                );
            }
        }
        before = after;
    }
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
    await_finished(&sb, &all, 60);
    d.stop();
    assert_eq!(sb.task_ids(), all, "tasks lost or duplicated");
    // Neither waiting nor claimed-and-not-recorded.
    let spool: Vec<_> = ["spool", "spool/.claimed"]
        .iter()
        .flat_map(|d| std::fs::read_dir(sb.state_dir().join(d)).unwrap().flatten())
        .map(|e| e.file_name())
        .filter(|n| n != "rejected" && n != ".claimed")
        .collect();
    assert!(spool.is_empty(), "left in the spool: {spool:?}");
    for id in &all {
        let t = sb.task(id);
        assert_eq!(t["status"], "completed", "{t}");
        // Never run again after completion: exactly one marker was added.
        let prompt =
            std::fs::read_to_string(sb.state_dir().join("workspaces").join(id).join("PROMPT.md"))
                .unwrap();
        assert_eq!(prompt.matches("TASK_COMPLETE").count(), 1, "{id}: {prompt}");
    }
}

/// The record of an attempt reaches state.json in the background, so a
/// kill -9 just after an agent started can leave it unrecorded: the agent
/// dies with the daemon, but what it started in the background works on in
/// the task's directory. The next start must end it all the same (a
/// crash-loop test found such orphans). Here the orphan is made by hand, for
/// a task whose record says nothing was running.
#[test]
fn next_start_ends_an_agents_leftovers_even_when_its_start_was_not_recorded() {
    let sb = Sandbox::new("unrecorded");
    let agent = sb.write_exec(
        "owner.sh",
        "#!/bin/sh\nprintf %s \"$RALPH_QCHAT_OWNER\" > \"$RALPH_TEST_OWNER_FILE\"\n\
         printf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    sb.submit("# t\n", "t1", &[]);
    // The second daemon reaches the same directory through a symlink: the
    // mark is the directory's real path.
    let link = sb.path("state-link");
    std::os::unix::fs::symlink(sb.state_dir(), &link).unwrap();
    let daemon = |state_dir: &std::path::Path| {
        let a = agent.display().to_string();
        let mut c = sb.daemon_cmd_on(state_dir, &a, &["--log-file", "daemon.log"]);
        c.env("RALPH_TEST_OWNER_FILE", sb.path("owner"));
        start(c)
    };
    let d = daemon(&sb.state_dir());
    await_status(&sb, "t1", "completed", 10);
    d.stop();
    let owner = sb.read("owner");
    assert!(owner.ends_with("#t1"), "{owner:?}");
    assert_eq!(sb.task("t1")["in_progress"], serde_json::Value::Null);

    let mut orphan = std::process::Command::new("sleep")
        .arg("300")
        .env("RALPH_QCHAT_OWNER", &owner)
        .env("RALPH_TEST_TAG", &sb.tag)
        .spawn()
        .unwrap();
    let before = start_lines(&sb);
    let d = daemon(&link);
    assert!(
        wait_until(Duration::from_secs(10), || start_lines(&sb) == before + 1),
        "{}",
        log_of(&sb)
    );
    assert!(
        wait_until(Duration::from_secs(5), || orphan
            .try_wait()
            .unwrap()
            .is_some()),
        "the leftover {} of an earlier instance is still running",
        orphan.id()
    );
    let log = log_of(&sb);
    assert!(
        log.contains(&format!(
            "ended 1 leftover agent processes of an earlier instance: [{}]",
            orphan.id()
        )),
        "{log}"
    );
    // A finished task stays finished: the agent did not run again.
    assert_eq!(sb.task("t1")["iteration"], 1);
    d.stop();
}

#[test]
fn opt_in_cache_answers_an_identical_request_without_spawning() {
    let sb = Sandbox::new("cache");
    sb.write("cfg.toml", "[cache]\nenabled = true\n[performance]\nmax_concurrent = 1\n[orchestrator]\nmax_iterations = 1\n");
    let wd = sb.path("project");
    std::fs::create_dir(&wd).unwrap();
    std::fs::write(wd.join("PROMPT.md"), "# same work\n").unwrap();
    let sd = sb.state_dir().display().to_string();
    let p = wd.join("PROMPT.md").display().to_string();
    let w = wd.display().to_string();
    for id in ["first", "second"] {
        let r = run(sb.cmd(&[
            "submit",
            &p,
            "--workdir",
            &w,
            "--state-dir",
            &sd,
            "--id",
            id,
        ]));
        assert_eq!(r.code(), 0, "{}", r.stderr);
    }
    let shared = sb.path("shared.log").display().to_string();
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_N", "100").env("FAKE_SHARED_LOG", &shared);
    let d = start(c);
    let both = ["first".to_string(), "second".to_string()];
    await_finished(&sb, &both, 10);
    d.stop();
    // Two iterations, one agent run: the second was answered from the cache.
    assert_eq!(
        intervals(&sb.read("shared.log")).len(),
        1,
        "{}",
        sb.read("shared.log")
    );
    assert!(log_of(&sb).contains("answered from the cache"));
    assert_eq!(sb.task("second")["successful_iterations"], 1);
}

#[test]
fn without_cache_identical_requests_each_run_the_agent() {
    let sb = Sandbox::new("nocache");
    sb.write(
        "cfg.toml",
        "[performance]\nmax_concurrent = 1\n[orchestrator]\nmax_iterations = 1\n",
    );
    let wd = sb.path("project");
    std::fs::create_dir(&wd).unwrap();
    std::fs::write(wd.join("PROMPT.md"), "# same work\n").unwrap();
    let sd = sb.state_dir().display().to_string();
    let p = wd.join("PROMPT.md").display().to_string();
    let w = wd.display().to_string();
    for id in ["first", "second"] {
        assert_eq!(
            run(sb.cmd(&[
                "submit",
                &p,
                "--workdir",
                &w,
                "--state-dir",
                &sd,
                "--id",
                id
            ]))
            .code(),
            0
        );
    }
    let shared = sb.path("shared.log").display().to_string();
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_N", "100").env("FAKE_SHARED_LOG", &shared);
    let d = start(c);
    let both = ["first".to_string(), "second".to_string()];
    await_finished(&sb, &both, 10);
    d.stop();
    assert_eq!(intervals(&sb.read("shared.log")).len(), 2);
}

#[test]
fn a_notify_socket_nobody_reads_never_stalls_the_daemon() {
    let sb = Sandbox::new("notifystuck");
    let sock_path = sb.path("notify.sock");
    // Bound and never read: its queue fills up with WATCHDOG=1 in no time.
    let _sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    let all = ids(5);
    for id in &all {
        sb.submit("# t\n", id, &[]);
    }
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000")
        .env("FAKE_N", "3");
    let d = start(c);
    await_finished(&sb, &all, 20);
    let t0 = Instant::now();
    d.stop();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn relative_agent_command_means_the_operators_directory() {
    let sb = Sandbox::new("relcmd");
    std::fs::create_dir(sb.path("bin")).unwrap();
    std::fs::copy(Sandbox::agent("complete-after.sh"), sb.path("bin/agent")).unwrap();
    sb.submit("# t\n", "t1", &[]);
    let sd = sb.state_dir().display().to_string();
    let mut c = sb.cmd(&[
        "daemon",
        "--state-dir",
        &sd,
        "--agent-command",
        "./bin/agent",
        "--health-port",
        "0",
        "--iteration-delay",
        "0",
        "--log-file",
        "daemon.log",
    ]);
    c.env("FAKE_N", "1").env("QCHAT_POLL_INTERVAL", "0.05");
    let d = start(c);
    await_status(&sb, "t1", "completed", 10);
    d.stop();
}

/// A half-open circuit lets one probe go; however that probe ends — even
/// cancelled, or stopped at its task's max_runtime — the next request may go.
#[test]
fn every_ending_of_the_circuits_probe_releases_it() {
    let sb = Sandbox::new("probe");
    sb.write_exec(
        "agent.sh",
        "#!/bin/sh\necho \"$RALPH_QCHAT_TASK_ID\" >> \"$FAKE_TRACE\"\ncase \"$RALPH_QCHAT_TASK_ID\" in\n  bad*) echo broken >&2; exit 1 ;;\n  hang*) exec sleep 300 ;;\nesac\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    sb.write(
        "cfg.toml",
        "[circuit_breaker]\nfailure_threshold = 1\ncooldown = 1.0\n[adapter]\nmax_retries = 0\nkill_grace = 0.5\n[orchestrator]\nmax_consecutive_failures = 1\n",
    );
    let agent = sb.path("agent.sh").display().to_string();
    let mut c = sb.daemon_cmd(
        &agent,
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_TRACE", sb.path("trace"));
    let d = start(c);
    let ran = |id: &str| sb.read("trace").lines().any(|l| l == id);
    let sd = sb.state_dir().display().to_string();
    for (n, ending) in ["cancel", "max_runtime"].iter().enumerate() {
        // A failure opens the circuit.
        let bad = format!("bad{n}");
        sb.submit("# t\n", &bad, &[]);
        await_status(&sb, &bad, "failed", 15);
        // The next task is the probe once the cooldown is over; it hangs.
        let probe = format!("hang{n}");
        let extra: &[&str] = if *ending == "max_runtime" {
            &["--max-runtime", "1.5"]
        } else {
            &[]
        };
        sb.submit("# t\n", &probe, extra);
        assert!(
            wait_until(Duration::from_secs(10), || ran(&probe)),
            "{}",
            log_of(&sb)
        );
        if *ending == "cancel" {
            assert_eq!(
                run(sb.cmd(&["cancel", &probe, "--state-dir", &sd])).code(),
                0
            );
            await_status(&sb, &probe, "cancelled", 15);
        } else {
            await_status(&sb, &probe, "limit_reached", 15);
        }
        // Released: a good task still runs.
        let good = format!("good{n}");
        sb.submit("# t\n", &good, &[]);
        await_status(&sb, &good, "completed", 10);
    }
    d.stop();
}

/// Waiting for a missing agent (the circuit's cooldown) is not running: it
/// does not count into max_runtime. Only attempts do.
#[test]
fn waiting_for_a_missing_agent_is_not_runtime() {
    let sb = Sandbox::new("waitrt");
    std::fs::create_dir_all(sb.path("bin")).unwrap();
    let agent = sb.path("bin/agent").display().to_string();
    sb.write("cfg.toml", "[circuit_breaker]\ncooldown = 1.0\n");
    let d = start(sb.daemon_cmd(
        &agent,
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    ));
    for id in ["a", "b", "c"] {
        sb.submit("# t\n", id, &[]);
    }
    assert!(
        wait_until(Duration::from_secs(10), || log_of(&sb)
            .matches("not found")
            .count()
            >= 3),
        "{}",
        log_of(&sb)
    );
    sb.write_exec(
        "bin/agent",
        "#!/bin/sh\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    await_finished(&sb, &ids, 15);
    for id in &ids {
        let t = sb.task(id);
        assert_eq!(t["status"], "completed", "{t}");
        let rt = t["runtime_secs"].as_f64().unwrap_or(f64::MAX);
        assert!(
            rt < 1.0,
            "{id}: {rt} s of runtime for a few ms of attempts: {t}"
        );
    }
    d.stop();
}

/// An agent that replaces its prompt file by a FIFO (or a link to /dev/zero)
/// fails its own task with a clear error; the scheduler never blocks on it,
/// other tasks go on, and SIGTERM still stops the daemon.
#[test]
fn a_prompt_replaced_by_a_fifo_or_a_device_fails_only_its_task() {
    let sb = Sandbox::new("fifo");
    sb.write_exec(
        "agent.sh",
        "#!/bin/sh\ncase \"$RALPH_QCHAT_TASK_ID\" in\n  fifo) rm -f \"$RALPH_QCHAT_PROMPT_FILE\"; mkfifo \"$RALPH_QCHAT_PROMPT_FILE\" ;;\n  zero) ln -sf /dev/zero \"$RALPH_QCHAT_PROMPT_FILE\" ;;\n  *) n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; [ $n -ge 3 ] && printf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\" ;;\nesac\nexit 0\n",
    );
    let agent = sb.path("agent.sh").display().to_string();
    let d = start(sb.daemon_cmd(&agent, &["--log-file", "daemon.log"]));
    for id in ["fifo", "zero", "other"] {
        sb.submit("# t\n", id, &[]);
    }
    for (id, what) in [("fifo", "is a FIFO"), ("zero", "a character device")] {
        await_status(&sb, id, "failed", 15);
        let t = sb.task(id);
        assert!(t["last_error"].as_str().unwrap_or("").contains(what), "{t}");
    }
    await_status(&sb, "other", "completed", 15);
    d.stop();
}

/// A prompt dropped into the spool under the name an earlier task came from
/// is another drop: it is rejected with its reason, and never touches the
/// earlier task's files (it used to overwrite its workspace prompt, also
/// while it ran, and vanish without a word).
#[test]
fn a_second_drop_under_a_taken_name_never_touches_the_first_task() {
    let sb = Sandbox::new("samename");
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "1");
    let d = start(c);
    let spool = sb.state_dir().join("spool");
    assert!(wait_until(Duration::from_secs(10), || spool.is_dir()));
    std::fs::write(spool.join(".t1.md"), "# first\n").unwrap();
    std::fs::rename(spool.join(".t1.md"), spool.join("t1.md")).unwrap();
    await_status(&sb, "t1", "completed", 15);
    let ws = sb.state_dir().join("workspaces/t1/PROMPT.md");
    let before = std::fs::read_to_string(&ws).unwrap();
    std::fs::write(spool.join(".t1.md"), "# SECOND\n").unwrap();
    std::fs::rename(spool.join(".t1.md"), spool.join("t1.md")).unwrap();
    let rejected = spool.join("rejected/t1.md");
    assert!(
        wait_until(Duration::from_secs(10), || rejected.is_file()),
        "{}",
        log_of(&sb)
    );
    assert_eq!(std::fs::read_to_string(&ws).unwrap(), before);
    assert!(
        log_of(&sb).contains("a task with id \"t1\" already exists"),
        "{}",
        log_of(&sb)
    );
    assert_eq!(std::fs::read_to_string(&rejected).unwrap(), "# SECOND\n");
    d.stop();
}

/// Two agents in one tree corrupt each other's git state: tasks whose
/// workdirs are the same or nested never run at once, the later one waits
/// and `status` says for which task; a task elsewhere runs beside them.
#[test]
fn tasks_in_one_tree_never_run_at_once_and_status_says_who_waits() {
    let sb = Sandbox::new("trees");
    std::fs::create_dir_all(sb.path("repo/sub")).unwrap();
    std::fs::create_dir_all(sb.path("other")).unwrap();
    std::os::unix::fs::symlink(sb.path("repo"), sb.path("alias")).unwrap();
    let repo = sb.path("repo").display().to_string();
    let sub = sb.path("repo/sub").display().to_string();
    let alias = sb.path("alias").display().to_string();
    let other = sb.path("other").display().to_string();
    for (id, dir) in [
        ("a", &repo),
        ("b", &repo),
        ("c", &sub),
        ("d", &alias),
        ("e", &other),
    ] {
        sb.submit("# task\n", id, &["--workdir", dir]);
    }
    let shared = sb.path("shared.log").display().to_string();
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("QCHAT_MAX_CONCURRENT", "5")
        .env("FAKE_N", "1")
        .env("FAKE_DELAY", "0.6")
        .env("FAKE_SHARED_LOG", &shared);
    let d = start(c);
    let sd = sb.state_dir().display().to_string();
    let mut said = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            said = run(sb.cmd(&["status", "--state-dir", &sd])).stdout;
            said.contains("task b waits for task a")
        }),
        "{said}\n{}",
        log_of(&sb)
    );
    assert!(said.contains(&repo), "{said}");
    let all: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
    await_finished(&sb, &all, 30);
    d.stop();
    let iv = intervals(&sb.read("shared.log"));
    assert_eq!(iv.len(), 5, "{iv:?}");
    let of = |id: &str| iv.iter().find(|(i, _, _)| i == id).cloned().unwrap();
    let tree = ["a", "b", "c", "d"].map(of);
    for (i, x) in tree.iter().enumerate() {
        for y in &tree[i + 1..] {
            assert!(x.2 <= y.1 || y.2 <= x.1, "{x:?} and {y:?} ran at once");
        }
    }
    let e = of("e");
    assert!(
        tree.iter().any(|t| t.1 < e.2 && e.1 < t.2),
        "the task in another tree waited too: {iv:?}"
    );
    for id in &all {
        assert_eq!(sb.task(id)["status"], "completed", "{id}");
        assert!(
            sb.task(id).get("waits_for").is_none(),
            "{id}: {}",
            sb.task(id)
        );
    }
}

/// A prompt file on a hung file system, or a large one, must not stall every
/// task: the prompt is read by workers (before an attempt, for the
/// completion check after one), never by the scheduler thread.
#[test]
fn the_scheduler_thread_never_reads_a_prompt_file() {
    if !strace_available() {
        return;
    }
    let sb = Sandbox::new("offthread");
    sb.submit("# t\n", "t", &[]);
    let log = sb.path("strace.log");
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "2");
    let d = start(traced(&c, &log, "openat"));
    let daemon = traced_child(d.pid());
    await_status(&sb, "t", "completed", 20);
    let names: std::collections::HashMap<String, String> =
        std::fs::read_dir(format!("/proc/{daemon}/task"))
            .unwrap()
            .flatten()
            .map(|t| {
                let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                (
                    t.file_name().to_string_lossy().into_owned(),
                    comm.trim().to_string(),
                )
            })
            .collect();
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    let f = d.finish(Duration::from_secs(20));
    assert_eq!(f.code(), 0, "{}", f.stderr);
    let trace = std::fs::read_to_string(&log).unwrap();
    let readers: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("workspaces/t/PROMPT.md") && !l.contains("= -1 "))
        .filter(|l| l.contains("O_RDONLY") && !l.contains("O_WRONLY") && !l.contains("O_RDWR"))
        .filter_map(|l| names.get(l.split_whitespace().next()?).map(String::as_str))
        .collect();
    assert!(names.values().any(|n| n == "scheduler"), "{names:?}");
    assert!(
        !readers.is_empty(),
        "no thread of the daemon read the prompt:\n{trace}"
    );
    assert!(
        readers.iter().all(|n| n.starts_with("worker-")),
        "read by {readers:?}"
    );
}

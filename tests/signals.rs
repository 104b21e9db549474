//! Stopping and resuming: SIGTERM, kill -9, SIGUSR1, and two runs on one
//! state directory.

mod common;
use common::*;
use std::time::Duration;

/// The fake agent has written its pid (the file exists a moment before the
/// pid is in it).
fn agent_started(sb: &Sandbox) -> bool {
    wait_until(Duration::from_secs(10), || {
        sb.read("agent.pid").trim().parse::<i32>().is_ok()
    })
}

/// The newest diagnostics dump of the sandbox's state directory.
pub fn newest_dump(sb: &Sandbox) -> serde_json::Value {
    let dir = sb.path(".ralph-qchat/diagnostics");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return serde_json::Value::Null;
    };
    let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    names.sort();
    names
        .last()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn agent_pid(sb: &Sandbox) -> i32 {
    sb.read("agent.pid").trim().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rfind(')')
        .and_then(|i| stat[i + 2..].chars().next())
        .is_some_and(|s| s != 'Z')
}

#[test]
fn sigterm_mid_run_stops_everything_and_a_rerun_resumes() {
    let sb = Sandbox::new("sigterm");
    sb.write("cfg.toml", "[adapter]\nkill_grace = 1\n");
    // An agent that ignores SIGTERM: the daemon must escalate within kill_grace.
    let r = start(sb.run_cmd("ignore-term.sh", &["--config", "cfg.toml"]));
    assert!(agent_started(&sb));
    // The record is written by the writer thread, a moment after the agent
    // may already have started: wait for it, do not race it.
    assert!(wait_until(Duration::from_secs(5), || {
        let s = sb.state();
        s["status"] == "running" && s["in_progress"] == 1
    }));
    let t0 = std::time::Instant::now();
    r.signal(libc::SIGTERM);
    let r = r.finish(Duration::from_secs(10));
    assert_eq!(r.code(), 143, "{}", r.stderr);
    // kill_grace + 1 s.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    sb.assert_nothing_left();
    let s = sb.state();
    assert_eq!(s["status"], "running");
    assert_eq!(s["in_progress"], 1);
    assert_eq!(s["iteration"], 1);

    let mut rerun = sb.run_cmd("complete-after.sh", &[]);
    rerun.env("FAKE_N", "2").env("FAKE_LOG", "rerun.log");
    let r = run(rerun);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("iteration 1 was interrupted"),
        "{}",
        r.stderr
    );
    let s = sb.state();
    assert_eq!(s["status"], "completed");
    assert_eq!(s["interrupted_iterations"], 1);
    // Iteration 1 ran again, then iteration 2.
    assert_eq!(s["iteration"], 2);
    assert_eq!(s["successful_iterations"], 2);
    sb.assert_nothing_left();
}

#[test]
fn sigint_exits_130() {
    let sb = Sandbox::new("sigint");
    let r = start(sb.run_cmd("sleep.sh", &[]));
    assert!(agent_started(&sb));
    r.signal(libc::SIGINT);
    let r = r.finish(Duration::from_secs(10));
    assert_eq!(r.code(), 130, "{}", r.stderr);
    sb.assert_nothing_left();
}

#[test]
fn kill_9_mid_run_takes_the_agent_along_and_a_rerun_resumes() {
    let sb = Sandbox::new("kill9");
    let mut first = sb.run_cmd("sleep.sh", &[]);
    first.env("FAKE_SLEEP", "300");
    let r = start(first);
    assert!(agent_started(&sb));
    let agent = agent_pid(&sb);
    // The agent's own child is what the rerun must find left over: wait
    // until it is there (the agent writes its pid before it starts it).
    assert!(wait_until(Duration::from_secs(10), || sb
        .live_commands()
        .iter()
        .any(|(_, c)| c == "sleep 300")));
    // What the rerun reads: the iteration recorded as in progress.
    assert!(wait_until(
        Duration::from_secs(5),
        || sb.state()["in_progress"] == 1
    ));
    r.signal(libc::SIGKILL);
    let r = r.finish(Duration::from_secs(10));
    assert_eq!(r.code(), 128 + 9);
    // The agent dies with the process that ran it.
    assert!(
        wait_until(Duration::from_secs(5), || !alive(agent)),
        "agent {agent} outlived its supervisor"
    );
    let mut rerun = sb.run_cmd("complete-after.sh", &[]);
    rerun.env("FAKE_N", "1");
    let r = run(rerun);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["interrupted_iterations"], 1);
    assert_eq!(s["iteration"], 1);
    assert_eq!(s["status"], "completed");
    // Ended through the cgroup the killed run recorded (cgroup mode, as
    // root here) or by the mark (subreaper mode).
    assert!(
        r.stderr.contains("leftover agent processes")
            || r.stderr.contains("an earlier instance left in cgroup"),
        "{}",
        r.stderr
    );
    // Whatever the killed agent had started is gone too.
    sb.assert_nothing_left();
}

#[test]
fn sigusr1_dumps_diagnostics_and_the_run_goes_on() {
    let sb = Sandbox::new("usr1");
    let mut cmd = sb.run_cmd("sleep.sh", &["--max-iterations", "1"]);
    cmd.env("FAKE_SLEEP", "2");
    let r = start(cmd);
    assert!(agent_started(&sb));
    let agent = agent_pid(&sb);
    // The agent can write its pid before the worker has recorded it; a dump
    // shows the moment it was asked for, so ask until it shows the child.
    let mut last_sent = std::time::Instant::now() - Duration::from_secs(2);
    let mut dump = serde_json::Value::Null;
    let shows_child = wait_until(Duration::from_secs(8), || {
        if last_sent.elapsed() >= Duration::from_millis(1100) {
            r.signal(libc::SIGUSR1);
            last_sent = std::time::Instant::now();
        }
        dump = newest_dump(&sb);
        dump["tasks"][0]["child_pid"] == agent
    });
    assert!(shows_child, "{dump}");
    let task = &dump["tasks"][0];
    assert_eq!(task["id"], "PROMPT");
    assert_eq!(task["status"], "running");
    assert_eq!(task["iteration"], 1);
    assert!(task["running_seconds"].as_f64().is_some(), "{dump}");
    assert!(dump["process"]["rss_kib"].as_u64().unwrap() > 0, "{dump}");
    assert!(dump["process"]["open_fds"].as_u64().unwrap() > 0, "{dump}");
    assert_eq!(dump["workers"]["busy"], 1, "{dump}");
    let r = r.finish(Duration::from_secs(20));
    // The run went on to its end: one iteration, then the limit.
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("diagnostics: task PROMPT"),
        "{}",
        r.stderr
    );
    assert_eq!(sb.state()["successful_iterations"], 1);
}

#[test]
fn second_run_on_the_same_state_exits_75_naming_the_holder() {
    let sb = Sandbox::new("locked");
    let first = start(sb.run_cmd("sleep.sh", &[]));
    assert!(agent_started(&sb));
    let second = run(sb.run_cmd("sleep.sh", &[]));
    assert_eq!(second.code(), 75, "{}", second.stderr);
    assert!(
        second.stderr.contains(&format!("pid {}", first.pid())),
        "{}",
        second.stderr
    );
    first.signal(libc::SIGTERM);
    let r = first.finish(Duration::from_secs(10));
    assert_eq!(r.code(), 143);
    sb.assert_nothing_left();
}

/// A panic in any thread (here the scheduler's, injected) ends the process
/// promptly with status 70 and a clear line, so that systemd restarts it;
/// it never leaves a half-dead daemon that ignores SIGTERM.
#[test]
fn a_panic_in_any_thread_ends_the_process_with_status_70() {
    let sb = Sandbox::new("panic");
    let mut c = sb.daemon_cmd("complete-after.sh", &[]);
    c.env("RALPH_QCHAT_TEST_PANIC", "scheduler");
    let r = start(c).finish(Duration::from_secs(10));
    assert_eq!(r.code(), 70, "{}", r.stderr);
    assert!(
        r.stderr.contains("internal error in thread scheduler"),
        "{}",
        r.stderr
    );
}

/// A worker that panics as it takes an agent job ends the process the same
/// way; its task is not left running: the next start runs it to the end.
#[test]
fn a_panicking_worker_ends_the_process_and_its_task_resumes() {
    let sb = Sandbox::new("panicworker");
    sb.submit("# t\n", "t", &[]);
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("RALPH_QCHAT_TEST_PANIC", "worker").env("FAKE_N", "1");
    let r = start(c).finish(Duration::from_secs(10));
    assert_eq!(r.code(), 70, "{}", r.stderr);
    assert!(
        r.stderr.contains("internal error in thread worker-"),
        "{}",
        r.stderr
    );
    sb.assert_nothing_left();
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "1");
    let d = start(c);
    await_status(&sb, "t", "completed", 20);
    d.stop();
    assert_eq!(sb.task("t")["successful_iterations"], 1);
}

/// Durations past ten years are refused naming the key, not accepted and
/// then overflowing the clock.
#[test]
fn absurd_durations_are_refused_naming_the_key() {
    let sb = Sandbox::new("absurd");
    let r = run(sb.run_cmd(
        "complete-after.sh",
        &["--timeout", "1e20", "--max-runtime", "1e20"],
    ));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("adapter.timeout"), "{}", r.stderr);
    assert!(r.stderr.contains("ten years"), "{}", r.stderr);
}

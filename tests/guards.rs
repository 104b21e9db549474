//! Loop guards: what agents report spending is summed in the task record
//! and caps it, across restarts.

mod common;
use common::*;
use std::time::Duration;

fn kiro_cmd(sb: &Sandbox, script: &[&str], extra: &[&str]) -> std::process::Command {
    sb.write("script", script.join("\n") + "\n");
    let mut args = vec!["--agent", "kiro"];
    args.extend_from_slice(extra);
    let mut c = sb.run_cmd("cli/kiro-cli", &args);
    c.env("FAKE_SCRIPT", sb.path("script"))
        .env("FAKE_LOG", sb.path("fake-runs.log"))
        .env("FAKE_LOGGED_OUT", sb.path("fake-logged-out"))
        .env("FAKE_WHOAMI_LOG", sb.path("fake-whoami.log"))
        .env("FAKE_CREDITS", "0.25");
    c
}

#[test]
fn kiro_credits_are_summed_and_max_credits_ends_the_task_across_runs() {
    let sb = Sandbox::new("credits");
    // Two iterations: 0.5 credits, kept in the record.
    let r = run(kiro_cmd(&sb, &["work"], &["--max-iterations", "2"]));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["reason"], "max_iterations");
    assert_eq!(s["credits"], 0.5);
    // Run again with a cap of 1 credit: two more iterations, not four.
    sb.write("cfg.toml", "[orchestrator]\nmax_credits = 1.0\n");
    let r = run(kiro_cmd(
        &sb,
        &["work"],
        &["--config", "cfg.toml", "--max-iterations", "10"],
    ));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["status"], "limit_reached");
    assert_eq!(s["reason"], "max_credits", "{s}");
    assert_eq!(s["credits"], 1.0);
    assert_eq!(s["iteration"], 4);
    assert_eq!(sb.runs(), 4);
    assert!(r.stderr.contains("max_credits"), "{}", r.stderr);
}

#[test]
fn the_daemon_caps_credits_and_shows_the_sums_in_status_tasks_and_metrics() {
    let sb = Sandbox::new("d-credits");
    sb.write("script", "work\n");
    sb.write("cfg.toml", "[orchestrator]\nmax_credits = 0.5\n");
    sb.submit("# a\n", "a", &[]);
    let start_daemon = || {
        let _ = std::fs::remove_file(sb.state_dir().join("http.port"));
        let mut c = sb.daemon_cmd(
            "cli/kiro-cli",
            &[
                "--agent",
                "kiro",
                "--config",
                "cfg.toml",
                "--log-file",
                "daemon.log",
            ],
        );
        c.env("FAKE_SCRIPT", sb.path("script"))
            .env("FAKE_LOG", sb.path("fake-runs.log"))
            .env("FAKE_LOGGED_OUT", sb.path("fake-logged-out"))
            .env("FAKE_WHOAMI_LOG", sb.path("fake-whoami.log"))
            .env("FAKE_CREDITS", "0.25");
        let d = start(c);
        let port_file = sb.state_dir().join("http.port");
        assert!(wait_until(Duration::from_secs(10), || port_file.is_file()));
        let port = std::fs::read_to_string(port_file)
            .unwrap()
            .trim()
            .to_string();
        (d, format!("http://127.0.0.1:{port}"))
    };
    let get = |url: &str| {
        ralph_qchat::http::client::get(url, Duration::from_secs(2))
            .unwrap()
            .1
    };
    let (d, url) = start_daemon();
    await_status(&sb, "a", "limit_reached", 20);
    let t = sb.task("a");
    assert_eq!(t["reason"], "max_credits", "{t}");
    assert_eq!(t["credits"], 0.5);
    assert_eq!(t["iteration"], 2);
    assert!(get(&format!("{url}/tasks")).contains("\"credits\":0.5"));
    let metrics = get(&format!("{url}/metrics"));
    assert!(
        metrics.contains("ralph_agent_credits_total{profile=\"kiro\"} 0.5\n"),
        "{metrics}"
    );
    let sd = sb.state_dir().display().to_string();
    let st = run(sb.cmd(&["status", "--state-dir", &sd]));
    let line = st.stdout.lines().find(|l| l.starts_with("a ")).unwrap();
    assert!(line.contains("0.50 cr"), "{line}");
    d.stop();
    // A restart keeps the totals and does not run the capped task again.
    let (d, url) = start_daemon();
    let metrics = get(&format!("{url}/metrics"));
    assert!(
        metrics.contains("ralph_agent_credits_total{profile=\"kiro\"} 0.5\n"),
        "{metrics}"
    );
    assert_eq!(sb.runs(), 2);
    d.stop();
}

/// A hook that appends what it was told to `hook.out` (one line per run).
fn hook_script(sb: &Sandbox, extra: &str) -> String {
    let out = sb.path("hook.out").display().to_string();
    sb.write_exec(
        "hook.sh",
        format!(
            "#!/bin/bash\necho \"$RALPH_QCHAT_TASK_ID $RALPH_QCHAT_STATUS $RALPH_QCHAT_REASON it=$RALPH_QCHAT_ITERATIONS ok=$RALPH_QCHAT_SUCCESSFUL_ITERATIONS cr=$RALPH_QCHAT_CREDITS\" >> '{out}'\n{extra}\n"
        ),
    )
    .display()
    .to_string()
}

#[test]
fn the_hook_runs_once_when_a_run_ends_with_the_task_in_its_environment() {
    let sb = Sandbox::new("hook-run");
    let hook = hook_script(&sb, "");
    sb.write("cfg.toml", format!("[hooks]\non_task_end = [\"{hook}\"]\n"));
    let mut c = sb.run_cmd("complete-after.sh", &["--config", "cfg.toml"]);
    c.env("FAKE_N", "2");
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(
        sb.read("hook.out"),
        "PROMPT completed completion_marker it=2 ok=2 cr=0\n"
    );
    assert_eq!(sb.state()["hook"], "done");
    // The task is complete: running again does nothing, the hook included.
    let r = run(sb.run_cmd("complete-after.sh", &["--config", "cfg.toml"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(sb.read("hook.out").lines().count(), 1);
}

#[test]
fn a_failing_or_hanging_hook_is_logged_and_killed_not_fatal() {
    let sb = Sandbox::new("hook-fail");
    let hook = hook_script(&sb, "echo 'mail server down' >&2; exit 3");
    sb.write("cfg.toml", format!("[hooks]\non_task_end = [\"{hook}\"]\n"));
    let r = run(sb.run_cmd("complete-after.sh", &["--config", "cfg.toml"]));
    assert_eq!(r.code(), 0, "the task completed: {}", r.stderr);
    let s = sb.state();
    assert_eq!(s["status"], "completed");
    let h = s["hook"].as_str().unwrap();
    assert!(
        h.starts_with("failed: exit status 3") && h.contains("mail server down"),
        "{h}"
    );
    assert!(r.stderr.contains("on_task_end hook failed"), "{}", r.stderr);

    let sb = Sandbox::new("hook-hang");
    let hook = hook_script(&sb, "sleep 300");
    sb.write(
        "cfg.toml",
        format!("[hooks]\non_task_end = [\"{hook}\"]\ntimeout = 1.0\n"),
    );
    let r = run(sb.run_cmd("complete-after.sh", &["--config", "cfg.toml"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(15), "{:?}", r.elapsed);
    assert!(sb.state()["hook"].as_str().unwrap().contains("timed out"));
    sb.assert_nothing_left();
}

#[test]
fn the_daemon_runs_each_hook_exactly_once_across_restarts() {
    let sb = Sandbox::new("hook-daemon");
    let hook = hook_script(&sb, "");
    sb.write("cfg.toml", format!("[hooks]\non_task_end = [\"{hook}\"]\n"));
    sb.submit("# a\n", "a", &[]);
    sb.submit("# b\n", "b", &["--max-iterations", "1"]);
    let daemon = || {
        let mut c = sb.daemon_cmd(
            "complete-after.sh",
            &["--config", "cfg.toml", "--log-file", "daemon.log"],
        );
        c.env("FAKE_N", "2");
        start(c)
    };
    let d = daemon();
    let ids = ["a".to_string(), "b".to_string()];
    assert!(
        wait_until(Duration::from_secs(20), || ids
            .iter()
            .all(|id| sb.task(id)["hook"] == "done")),
        "{}",
        log_of(&sb)
    );
    d.stop();
    let mut lines: Vec<String> = sb.read("hook.out").lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].starts_with("a completed completion_marker"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("b limit_reached max_iterations it=1"),
        "{lines:?}"
    );
    // A restart runs no hook again.
    let d = daemon();
    assert!(wait_until(Duration::from_secs(10), || start_lines(&sb) == 2));
    d.stop();
    assert_eq!(sb.read("hook.out").lines().count(), 2);

    // A task that ended while no hook could run (the process died between
    // its last record and the hook) gets its hook on the next start, once.
    let p = sb.state_dir().join("tasks/a/state.json");
    let mut a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    a["hook"] = "pending".into();
    std::fs::write(&p, serde_json::to_vec(&a).unwrap()).unwrap();
    // And one whose hook was running then is not run a second time.
    let p = sb.state_dir().join("tasks/b/state.json");
    let mut b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    b["hook"] = "running".into();
    std::fs::write(&p, serde_json::to_vec(&b).unwrap()).unwrap();
    let d = daemon();
    assert!(wait_until(Duration::from_secs(10), || sb.task("a")["hook"] == "done"));
    assert!(wait_until(Duration::from_secs(10), || sb.task("b")["hook"]
        == "interrupted"));
    d.stop();
    let out = sb.read("hook.out");
    assert_eq!(out.lines().count(), 3, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("b ")).count(),
        1,
        "{out}"
    );
}

fn git(dir: &std::path::Path, args: &[&str]) {
    let ok = std::process::Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap()
        .status
        .success();
    assert!(ok, "git {args:?}");
}

#[test]
fn an_agent_that_changes_nothing_stalls_after_exactly_max_stalled_iterations() {
    let sb = Sandbox::new("stall");
    let log = std::env::temp_dir().join(format!("{}-outside.log", sb.tag));
    let mut c = sb.run_cmd("idle.sh", &["--max-iterations", "20"]);
    c.env("FAKE_LOG", &log);
    let r = run(c);
    let _ = std::fs::remove_file(&log);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["status"], "stalled", "{s}");
    assert_eq!(s["reason"], "max_stalled_iterations");
    assert_eq!(s["iteration"], 5, "the default is 5: {s}");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .contains("changed neither"),
        "{s}"
    );
    // In a git work tree too, with a limit of 3; the state directory inside
    // the tree (run's .ralph-qchat, its transcripts changing) does not count.
    let sb = Sandbox::new("stall-git");
    git(&sb.dir, &["init", "-q"]);
    git(&sb.dir, &["add", "PROMPT.md"]);
    git(&sb.dir, &["commit", "-q", "-m", "task"]);
    sb.write("cfg.toml", "[orchestrator]\nmax_stalled_iterations = 3\n");
    let mut c = sb.run_cmd("idle.sh", &["--config", "cfg.toml", "--no-git"]);
    let log = std::env::temp_dir().join(format!("{}-outside.log", sb.tag));
    c.env("FAKE_LOG", &log);
    let r = run(c);
    let _ = std::fs::remove_file(&log);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["status"], "stalled", "{s}");
    assert_eq!(s["iteration"], 3, "{s}");
}

#[test]
fn an_agent_that_commits_its_work_each_iteration_is_not_stalled() {
    let sb = Sandbox::new("commits");
    git(&sb.dir, &["init", "-q"]);
    git(&sb.dir, &["add", "PROMPT.md"]);
    git(&sb.dir, &["commit", "-q", "-m", "task"]);
    sb.write("cfg.toml", "[orchestrator]\nmax_stalled_iterations = 2\n");
    let mut c = sb.run_cmd(
        "idle.sh",
        &["--config", "cfg.toml", "--no-git", "--max-iterations", "6"],
    );
    let log = std::env::temp_dir().join(format!("{}-outside.log", sb.tag));
    c.env("FAKE_LOG", &log)
        .env("FAKE_COMMIT", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null");
    let r = run(c);
    let _ = std::fs::remove_file(&log);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(
        s["reason"], "max_iterations",
        "a committing agent is progressing: {s}"
    );
    assert_eq!(s["iteration"], 6);
    assert_eq!(s["stalled_iterations"], 0);
}

#[test]
fn verify_command_gates_completion_and_its_failure_reaches_the_next_instruction() {
    let sb = Sandbox::new("verify");
    let vlog = sb.path("verify.log").display().to_string();
    let verify = sb.write_exec(
        "verify.sh",
        format!("#!/bin/bash\necho run >> '{vlog}'\nif [ -e fixed ]; then echo 'all 12 tests pass'; exit 0; fi\necho 'FAILED tests/test_cli.py::test_parse - AssertionError'\necho '1 failed, 11 passed'\nexit 1\n"),
    );
    sb.write(
        "cfg.toml",
        format!(
            "[orchestrator]\nverify_command = [\"{}\"]\nverify_timeout = 10.0\n",
            verify.display()
        ),
    );
    let r = run(sb.run_cmd("verify-aware.sh", &["--config", "cfg.toml", "--no-git"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["reason"], "completion_marker");
    // Iteration 1 claimed completion and failed verification; iteration 2
    // was told why, fixed it, and the second verification passed.
    assert_eq!(s["iteration"], 2, "{s}");
    assert_eq!(sb.read("verify.log").lines().count(), 2);
    let instructions = sb.read("fake-runs.log.instructions");
    let second = instructions.split("=====\n").nth(1).unwrap();
    assert!(second.contains("the verification command"), "{second}");
    assert!(
        second.contains("FAILED tests/test_cli.py::test_parse - AssertionError"),
        "{second}"
    );
    assert!(second.contains("1 failed, 11 passed"), "{second}");
    assert!(
        !instructions
            .split("=====\n")
            .next()
            .unwrap()
            .contains("verification")
    );
    assert!(r.stderr.contains("verification failed"), "{}", r.stderr);
    // The verification's output is in the iteration's transcript.
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(t.contains("1 failed, 11 passed"), "{t}");
}

#[test]
fn an_edit_of_the_prompt_between_iterations_reaches_the_next_instruction() {
    // The verify command runs between two attempts and edits the prompt
    // file: the next attempt must be told the file as it is then, not as
    // the last attempt left it (which the scheduler may reuse only when
    // nothing ran in between).
    let sb = Sandbox::new("verify-edits");
    let prompt = sb.path("PROMPT.md").display().to_string();
    let verify = sb.write_exec(
        "verify.sh",
        format!("#!/bin/bash\nif [ -e fixed ]; then exit 0; fi\necho 'note added by verify' >> '{prompt}'\necho 'FAILED tests/test_parse'\nexit 1\n"),
    );
    sb.write(
        "cfg.toml",
        format!(
            "[orchestrator]\nverify_command = [\"{}\"]\nverify_timeout = 10.0\niteration_delay = 0.0\n",
            verify.display()
        ),
    );
    let r = run(sb.run_cmd("verify-aware.sh", &["--config", "cfg.toml", "--no-git"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(sb.state()["iteration"], 2);
    let instructions = sb.read("fake-runs.log.instructions");
    let mut each = instructions.split("=====\n");
    assert!(!each.next().unwrap().contains("note added by verify"));
    let second = each.next().unwrap();
    assert!(second.contains("note added by verify"), "{second}");
}

#[test]
fn a_task_whose_verification_never_passes_does_not_complete() {
    let sb = Sandbox::new("verify-never");
    sb.write(
        "cfg.toml",
        "[orchestrator]\nverify_command = [\"/bin/false\"]\nmax_stalled_iterations = 0\n",
    );
    let r = run(sb.run_cmd(
        "verify-aware.sh",
        &["--config", "cfg.toml", "--no-git", "--max-iterations", "3"],
    ));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["reason"], "max_iterations", "{s}");
    assert!(
        s["last_error"]
            .as_str()
            .unwrap()
            .starts_with("verify_command failed"),
        "{s}"
    );
}

#[test]
fn the_daemon_caps_cost_and_shows_it_per_profile() {
    let sb = Sandbox::new("d-cost");
    sb.write("cfg.toml", "[orchestrator]\nmax_cost_usd = 0.05\n");
    sb.submit("# a\n", "a", &[]);
    let mut c = sb.daemon_cmd(
        "claude-json.sh",
        &[
            "--agent",
            "claude",
            "--config",
            "cfg.toml",
            "--log-file",
            "daemon.log",
        ],
    );
    c.env("FAKE_COST", "0.02");
    let d = start(c);
    await_status(&sb, "a", "limit_reached", 20);
    let t = sb.task("a");
    assert_eq!(t["reason"], "max_cost_usd", "{t}");
    // 0.02 a run: the third run reaches 0.06 and ends it.
    assert_eq!(t["iteration"], 3, "{t}");
    assert!((t["cost_usd"].as_f64().unwrap() - 0.06).abs() < 1e-9, "{t}");
    assert_eq!(t["tokens"], 3 * 150);
    let port_file = sb.state_dir().join("http.port");
    assert!(wait_until(Duration::from_secs(10), || port_file.is_file()));
    let port = std::fs::read_to_string(port_file)
        .unwrap()
        .trim()
        .to_string();
    let (_, metrics) = ralph_qchat::http::client::get(
        &format!("http://127.0.0.1:{port}/metrics"),
        Duration::from_secs(2),
    )
    .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("ralph_agent_cost_usd_total{profile=\"claude\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    let v: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((v - 0.06).abs() < 1e-9, "{line}");
    assert!(
        metrics.contains("ralph_agent_tokens_total{profile=\"claude\"} 450\n"),
        "{metrics}"
    );
    d.stop();
}

/// A git work tree with what an agent could leave in .git/config: a
/// monitor that never answers.
fn hanging_fsmonitor(sb: &Sandbox) {
    git(&sb.dir, &["init", "-q"]);
    let hang = sb.write_exec("hang-monitor.sh", "#!/bin/sh\nexec sleep 300\n");
    git(
        &sb.dir,
        &["config", "core.fsmonitor", hang.to_str().unwrap()],
    );
}

#[test]
fn a_hanging_git_fsmonitor_does_not_hang_the_checkpoint_nor_shutdown() {
    let sb = Sandbox::new("fsmonitor");
    hanging_fsmonitor(&sb);
    sb.write(
        "cfg.toml",
        "[orchestrator]\ncheckpoint_interval = 1\ncheckpoint_timeout = 2.0\n",
    );
    let mut c = sb.run_cmd("complete-after.sh", &["--config", "cfg.toml"]);
    c.env("FAKE_N", "2");
    let r = start(c).finish(Duration::from_secs(30));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(sb.state()["status"], "completed");
    assert!(
        r.stderr.contains("did not finish within 2 s"),
        "{}",
        r.stderr
    );
    assert!(r.elapsed < Duration::from_secs(20), "{:?}", r.elapsed);
    sb.assert_nothing_left();

    // Shutdown while a checkpoint hangs: stopped after the grace period.
    let sb = Sandbox::new("fsmonitor-term");
    hanging_fsmonitor(&sb);
    sb.write(
        "cfg.toml",
        "[orchestrator]\ncheckpoint_interval = 1\ncheckpoint_timeout = 300.0\nshutdown_grace = 1.0\n",
    );
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_N", "5");
    sb.submit("# a\n", "a", &["--workdir", sb.dir.to_str().unwrap()]);
    let d = start(c);
    assert!(
        wait_until(Duration::from_secs(15), || sb
            .live_commands()
            .iter()
            .any(|(_, c)| c.contains("sleep 300"))),
        "{}",
        log_of(&sb)
    );
    let t = std::time::Instant::now();
    d.signal(libc::SIGTERM);
    let f = d.finish(Duration::from_secs(15));
    assert_eq!(f.code(), 0, "{}", f.stderr);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    sb.assert_nothing_left();
}

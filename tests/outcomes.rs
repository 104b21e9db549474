//! Outcome classes against fakes that print exactly what q and Kiro print:
//! errors with exit 0 are told apart from work, throttling is not a failure,
//! quota and auth pause the profile (persisted, shown in /health) and end by
//! themselves, a device-login prompt ends at once, and an echo of the
//! instruction never completes a task.

mod common;
use common::*;
use std::time::Duration;

/// The fake CLIs' own files, as absolute paths (the preflight runs in the
/// state directory, the agent in the task's).
fn cli_env(sb: &Sandbox, c: &mut std::process::Command, script: &[&str]) {
    sb.write("script", script.join("\n") + "\n");
    c.env("FAKE_SCRIPT", sb.path("script"))
        .env("FAKE_LOG", sb.path("fake-runs.log"))
        .env("FAKE_LOGGED_OUT", sb.path("fake-logged-out"))
        .env("FAKE_WHOAMI_LOG", sb.path("fake-whoami.log"));
}

fn run_cli(sb: &Sandbox, cli: &str, script: &[&str], extra: &[&str]) -> Finished {
    let mut args = vec!["--max-iterations", "10"];
    if cli == "kiro-cli" {
        args.extend(["--agent", "kiro"]);
    }
    args.extend_from_slice(extra);
    let mut c = sb.run_cmd(&format!("cli/{cli}"), &args);
    cli_env(sb, &mut c, script);
    run(c)
}

fn health(addr: &str) -> serde_json::Value {
    let (_, body) =
        ralph_qchat::http::client::get(&format!("http://{addr}/health"), Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("GET /health: {e}"));
    serde_json::from_str(&body).unwrap()
}

fn port(sb: &Sandbox) -> String {
    let port_file = sb.state_dir().join("http.port");
    assert!(
        wait_until(Duration::from_secs(10), || port_file.is_file()),
        "{}",
        log_of(sb)
    );
    format!(
        "127.0.0.1:{}",
        std::fs::read_to_string(port_file).unwrap().trim()
    )
}

fn daemon(sb: &Sandbox, cli: &str, script: &[&str], extra: &[&str]) -> Running {
    let _ = std::fs::remove_file(sb.state_dir().join("http.port"));
    let mut args = vec!["--log-file", "daemon.log"];
    if cli == "kiro-cli" {
        args.extend(["--agent", "kiro"]);
    }
    args.extend_from_slice(extra);
    let mut c = sb.daemon_cmd(&format!("cli/{cli}"), &args);
    cli_env(sb, &mut c, script);
    start(c)
}

#[test]
fn q_throttling_with_exit_0_is_retried_and_not_a_failure() {
    let sb = Sandbox::new("q-throttle");
    let r = run_cli(
        &sb,
        "q",
        &["throttle", "throttle", "throttle", "complete"],
        &[],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["status"], "completed");
    assert_eq!(s["throttled"], 3);
    assert_eq!(s["failed_iterations"], 0);
    assert_eq!(s["retries"], 0);
    assert_eq!(s["consecutive_failures"], 0);
    // Three throttled attempts of iteration 1, which then succeeded.
    assert_eq!(s["iteration"], 1);
    assert_eq!(s["successful_iterations"], 1);
    assert_eq!(s["last_class"], "success");
    assert!(s["last_error"].is_null(), "{s}");
    assert_eq!(sb.runs(), 4);
    assert!(r.stderr.contains("agent throttled"), "{}", r.stderr);
    // The transcript keeps the raw bytes and names the class.
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(
        t.contains("\x1b[33m ⚠️  Amazon Q rate limit reached:"),
        "{t}"
    );
    assert!(
        t.contains("(throttled: ⚠️  Amazon Q rate limit reached:)"),
        "{t}"
    );
}

#[test]
fn words_about_rate_limits_in_real_work_are_success() {
    let sb = Sandbox::new("near-miss");
    for (cli, ..) in [("q", 0), ("kiro-cli", 0)] {
        let _ = std::fs::remove_dir_all(sb.path(".ralph-qchat"));
        let _ = std::fs::remove_file(sb.path("fake-runs.log"));
        sb.write("PROMPT.md", "# Task\n");
        let r = run_cli(&sb, cli, &["near-miss", "near-miss", "complete"], &[]);
        assert_eq!(r.code(), 0, "{cli}: {}", r.stderr);
        let s = sb.state();
        assert_eq!(s["successful_iterations"], 3, "{cli}: {s}");
        assert_eq!(s["throttled"], 0, "{cli}: {s}");
        assert_eq!(s["iteration"], 3, "{cli}: {s}");
    }
}

#[test]
fn kiro_messages_with_exit_0_are_classified() {
    // Each message, then work that completes; `throttle` and `many` cost no
    // iteration, `invalid-key` ends the run as a login problem.
    let sb = Sandbox::new("kiro-classes");
    let r = run_cli(
        &sb,
        "kiro-cli",
        &["throttle", "many", "work", "complete"],
        &[],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["throttled"], 2, "{s}");
    assert_eq!(s["iteration"], 2, "{s}");
    assert_eq!(s["failed_iterations"], 0, "{s}");

    // A silent exit 0 ran no turn (no credits line): failed, retried.
    let sb = Sandbox::new("kiro-silent");
    let r = run_cli(&sb, "kiro-cli", &["silent", "complete"], &[]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["retries"], 1, "{s}");
    assert_eq!(s["iteration"], 1, "{s}");
    assert!(r.stderr.contains("the CLI ran no turn"), "{}", r.stderr);

    let sb = Sandbox::new("kiro-badkey");
    let r = run_cli(&sb, "kiro-cli", &["invalid-key"], &[]);
    assert_eq!(r.code(), 69, "{}", r.stderr);
    assert_eq!(sb.runs(), 1, "auth is not retried");
    let s = sb.state();
    assert_eq!(s["reason"], "auth");
    assert_eq!(s["last_class"], "auth");
    assert!(
        r.stderr
            .contains("Authentication failed. Your API key may be invalid or expired."),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("kiro-cli login"), "{}", r.stderr);
}

#[test]
fn an_expired_q_login_ends_run_after_one_launch_with_what_to_do() {
    let sb = Sandbox::new("q-expired");
    let r = run_cli(&sb, "q", &["work", "expired"], &[]);
    assert_eq!(r.code(), 69, "{}", r.stderr);
    assert_eq!(sb.runs(), 2);
    assert!(
        r.stderr.contains("Your login session has expired"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("q login"), "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["successful_iterations"], 1);
    assert_eq!(s["reason"], "auth");
    // The expired attempt is neither a success nor a failure; iteration 2
    // keeps its number for the next run (counters never go back, #14).
    assert_eq!(s["failed_iterations"], 0);
    assert_eq!(s["iteration"], 2);
    assert_eq!(s["rerun_iteration"], true);
}

#[test]
fn a_failed_preflight_ends_run_before_any_launch() {
    let sb = Sandbox::new("q-preflight");
    sb.write("fake-logged-out", "");
    let r = run_cli(&sb, "q", &["complete"], &[]);
    assert_eq!(r.code(), 69, "{}", r.stderr);
    assert_eq!(sb.runs(), 0);
    assert!(r.stderr.contains("preflight failed: "), "{}", r.stderr);
    assert!(r.stderr.contains("Not logged in"), "{}", r.stderr);
}

#[test]
fn a_device_login_prompt_is_auth_within_seconds() {
    let sb = Sandbox::new("kiro-device");
    // kiro's request timeout is 300 s: only the prompt itself can end this fast.
    let r = run_cli(&sb, "kiro-cli", &["device-login"], &[]);
    assert_eq!(r.code(), 69, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(15), "{:?}", r.elapsed);
    assert!(r.stderr.contains("Logging in..."), "{}", r.stderr);
    assert_eq!(sb.runs(), 1);
    sb.assert_nothing_left();
}

#[test]
fn the_echo_of_the_instruction_never_completes_a_task() {
    let sb = Sandbox::new("echo");
    // The marker is a line of the prompt, so of the instruction, so of its echo.
    sb.write(
        "PROMPT.md",
        "# Task\n\nWhen everything works, print this line on its own:\nLOOP_DONE\n",
    );
    sb.write(
        "cfg.toml",
        "[orchestrator]\noutput_completion_marker = \"LOOP_DONE\"\n",
    );
    let mut c = sb.run_cmd("echo-instruction.sh", &["--config", "cfg.toml"]);
    c.env("FAKE_N", "3").env("FAKE_MARKER", "LOOP_DONE");
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["reason"], "output_marker");
    assert_eq!(
        s["iteration"], 3,
        "the echo or `Not LOOP_DONE yet` completed it: {s}"
    );
}

#[test]
fn daemon_throttling_is_one_shared_wait_and_not_a_failure() {
    let sb = Sandbox::new("d-throttle");
    sb.submit("# a\n", "a", &[]);
    sb.submit("# b\n", "b", &[]);
    let d = daemon(&sb, "q", &["throttle", "throttle", "complete"], &[]);
    let ids = vec!["a".to_string(), "b".to_string()];
    await_finished(&sb, &ids, 20);
    for id in &ids {
        let t = sb.task(id);
        assert_eq!(t["status"], "completed", "{t}");
        assert_eq!(t["failed_iterations"], 0, "{t}");
        assert_eq!(t["retries"], 0, "{t}");
    }
    let throttled: u64 = ids
        .iter()
        .map(|id| sb.task(id)["throttled"].as_u64().unwrap())
        .sum();
    assert_eq!(throttled, 2);
    assert!(log_of(&sb).contains("every task waits"), "{}", log_of(&sb));
    d.stop();
}

#[test]
fn quota_pauses_every_task_across_a_restart_then_resumes() {
    let sb = Sandbox::new("d-quota");
    sb.write(
        "cfg.toml",
        "[adapter]\nquota_pause = 4.0\n[performance]\nmax_concurrent = 1\n",
    );
    sb.submit("# a\n", "a", &[]);
    sb.submit("# b\n", "b", &[]);
    let script = ["daily", "complete", "complete"];
    let d = daemon(&sb, "kiro-cli", &script, &["--config", "cfg.toml"]);
    let pauses = sb.state_dir().join("pauses.json");
    assert!(
        wait_until(Duration::from_secs(10), || pauses.is_file()),
        "{}",
        log_of(&sb)
    );
    let addr = port(&sb);
    let h = health(&addr);
    assert_eq!(h["status"], "degraded", "{h}");
    let reasons = h["reasons"].to_string();
    assert!(reasons.contains("out of quota"), "{reasons}");
    assert!(reasons.contains("daily usage limit"), "{reasons}");
    d.stop();
    assert_eq!(sb.runs(), 1, "no task ran during the pause");
    // A new process keeps the pause: still nothing runs, /health still says so.
    let d = daemon(&sb, "kiro-cli", &script, &["--config", "cfg.toml"]);
    let addr = port(&sb);
    assert_eq!(health(&addr)["status"], "degraded");
    assert_eq!(sb.runs(), 1);
    let ids = vec!["a".to_string(), "b".to_string()];
    await_finished(&sb, &ids, 20);
    assert_eq!(sb.task("a")["status"], "completed");
    assert_eq!(sb.task("b")["status"], "completed");
    assert_eq!(sb.runs(), 3);
    assert!(!pauses.exists());
    assert_eq!(health(&addr)["status"], "healthy");
    // Neither task counted the quota attempt as an iteration or a failure.
    assert_eq!(
        sb.task("a")["iteration"].as_u64().unwrap() + sb.task("b")["iteration"].as_u64().unwrap(),
        2
    );
    assert!(log_of(&sb).contains("quota pause over"), "{}", log_of(&sb));
    d.stop();
}

#[test]
fn auth_pause_says_what_to_run_and_resumes_after_login_and_sighup() {
    let sb = Sandbox::new("d-auth");
    sb.write("fake-logged-out", "");
    sb.submit("# a\n", "a", &[]);
    let d = daemon(&sb, "q", &["complete"], &[]);
    let addr = port(&sb);
    assert!(
        wait_until(Duration::from_secs(10), || health(&addr)["status"]
            == "degraded"),
        "{}",
        log_of(&sb)
    );
    let reasons = health(&addr)["reasons"].to_string();
    assert!(reasons.contains("not logged in"), "{reasons}");
    assert!(reasons.contains("-H q login"), "{reasons}");
    assert_eq!(sb.runs(), 0);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("a")["status"] == "queued"
    ));
    // The diagnostics dump says why nothing runs.
    d.signal(libc::SIGUSR1);
    let dumps = sb.state_dir().join("diagnostics");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_dir(&dumps)
            .map(|rd| rd.flatten().any(|e| std::fs::read_to_string(e.path())
                .is_ok_and(|t| t.contains("paused (Auth)") && t.contains("Not logged in"))))
            .unwrap_or(false)),
        "{}",
        log_of(&sb)
    );
    let whoamis = sb.read("fake-whoami.log").lines().count();
    // The operator logs in and reloads: checked at once, not in 5 minutes.
    std::fs::remove_file(sb.path("fake-logged-out")).unwrap();
    d.signal(libc::SIGHUP);
    await_status(&sb, "a", "completed", 10);
    assert!(sb.read("fake-whoami.log").lines().count() > whoamis);
    assert_eq!(health(&addr)["status"], "healthy");
    assert_eq!(sb.runs(), 1);
    d.stop();
}

#[test]
fn a_login_that_expires_mid_run_pauses_the_daemon_without_retries() {
    let sb = Sandbox::new("d-expire");
    sb.write("cfg.toml", "[adapter]\npreflight_interval = 0.5\n");
    sb.submit("# a\n", "a", &[]);
    let d = daemon(
        &sb,
        "q",
        &["work", "expired", "complete"],
        &["--config", "cfg.toml"],
    );
    let addr = port(&sb);
    assert!(
        wait_until(Duration::from_secs(10), || health(&addr)["status"]
            == "degraded"),
        "{}",
        log_of(&sb)
    );
    assert_eq!(sb.runs(), 2);
    // The preflight keeps failing while logged out: no launch meanwhile.
    assert!(wait_until(Duration::from_secs(10), || sb
        .read("fake-whoami.log")
        .lines()
        .count()
        >= 3));
    assert_eq!(sb.runs(), 2);
    assert_eq!(sb.task("a")["retries"], 0);
    // Logged in again: the next periodic preflight resumes the task.
    std::fs::remove_file(sb.path("fake-logged-out")).unwrap();
    await_status(&sb, "a", "completed", 10);
    assert_eq!(sb.task("a")["failed_iterations"], 0);
    d.stop();
}

/// (task, start time) of each run the fake q logged.
fn run_times(sb: &Sandbox) -> Vec<(String, f64)> {
    sb.read("fake-runs.log")
        .lines()
        .map(|l| {
            let field = |k: &str| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix(k))
                    .unwrap_or_default()
                    .to_string()
            };
            (field("task="), field("t=").parse().unwrap())
        })
        .collect()
}

#[test]
fn one_throttled_task_makes_every_task_wait() {
    let sb = Sandbox::new("d-shared-wait");
    sb.write("cfg.toml", "[performance]\nmax_concurrent = 1\n");
    sb.submit("# a\n", "a", &[]);
    sb.submit("# b\n", "b", &[]);
    let d = daemon(
        &sb,
        "q",
        &["throttle", "complete", "complete"],
        &["--config", "cfg.toml", "--retry-delay", "1.5"],
    );
    await_finished(&sb, &["a".to_string(), "b".to_string()], 20);
    let runs = run_times(&sb);
    assert_eq!(runs.len(), 3, "{runs:?}");
    // The second run is the other task's (or the same task's again): either
    // way it waited for the shared pause the first run's throttle began.
    let gap = runs[1].1 - runs[0].1;
    assert!(
        gap >= 1.4,
        "the next request went {gap:.2} s after a throttle: {runs:?}"
    );
    d.stop();
}

#[test]
fn status_and_tasks_show_the_last_outcome_class() {
    let sb = Sandbox::new("d-class-shown");
    sb.submit("# a\n", "a", &[]);
    let d = daemon(&sb, "q", &["throttle", "complete"], &[]);
    await_status(&sb, "a", "completed", 20);
    let addr = port(&sb);
    let (_, body) =
        ralph_qchat::http::client::get(&format!("http://{addr}/tasks"), Duration::from_secs(2))
            .unwrap();
    assert!(body.contains("\"last_class\":\"success\""), "{body}");
    assert!(body.contains("\"throttled\":1"), "{body}");
    let sd = sb.state_dir().display().to_string();
    let r = run(sb.cmd(&["status", "--state-dir", &sd]));
    assert!(r.stdout.contains("LAST OUTCOME"), "{}", r.stdout);
    let line = r.stdout.lines().find(|l| l.starts_with("a ")).unwrap();
    assert!(line.contains("success"), "{line}");
    d.stop();
}

#[test]
fn a_hanging_preflight_holds_no_task_and_no_shutdown() {
    let sb = Sandbox::new("d-preflight-hang");
    sb.submit("# a\n", "a", &[]);
    let mut c = sb.daemon_cmd("cli/q", &["--log-file", "daemon.log"]);
    cli_env(&sb, &mut c, &["complete"]);
    c.env("FAKE_WHOAMI_HANG", "1");
    let d = start(c);
    assert!(wait_until(Duration::from_secs(10), || sb
        .read("fake-whoami.log")
        .contains("whoami")));
    // Nothing is dispatched while the preflight has not answered.
    assert!(wait_until(Duration::from_secs(5), || log_of(&sb)
        .contains("task accepted from the spool")));
    assert_eq!(sb.runs(), 0);
    d.signal(libc::SIGTERM);
    let f = d.finish(Duration::from_secs(5));
    assert_eq!(f.code(), 0, "{}", f.stderr);
    sb.assert_nothing_left();
}

#[test]
fn q_quota_pauses_until_the_reset_date_it_names() {
    let sb = Sandbox::new("d-q-quota");
    sb.submit("# a\n", "a", &[]);
    let d = daemon(&sb, "q", &["quota"], &[]);
    let pauses = sb.state_dir().join("pauses.json");
    assert!(
        wait_until(Duration::from_secs(10), || pauses.is_file()),
        "{}",
        log_of(&sb)
    );
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&pauses).unwrap()).unwrap();
    let until = p["qchat"]["until"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // "The limits reset on 01/01.": the next 1 January, midnight UTC.
    assert_eq!(until % 86400, 0, "{p}");
    assert!(until > now && until - now <= 366 * 86400, "{p}");
    let addr = port(&sb);
    let (_, body) = ralph_qchat::http::client::get(
        &format!("http://{addr}/health/detailed"),
        Duration::from_secs(2),
    )
    .unwrap();
    assert!(body.contains("-01-01T00:00:00"), "{body}");
    assert!(body.contains("Monthly request limit reached"), "{body}");
    let sd = sb.state_dir().display().to_string();
    let r = run(sb.cmd(&["status", "--state-dir", &sd]));
    assert!(
        r.stdout
            .contains("agent profile qchat paused, out of quota for"),
        "{}",
        r.stdout
    );
    assert_eq!(sb.runs(), 1);
    // The quota attempt is neither a success nor a failure: iteration 1
    // waits under its number (counters never go back, #14).
    assert!(
        wait_until(Duration::from_secs(5), || {
            let t = sb.task("a");
            t["rerun_iteration"] == true
                && t["iteration"] == 1
                && t["failed_iterations"] == 0
                && t["successful_iterations"] == 0
        }),
        "the quota attempt is not an iteration: {}",
        sb.task("a")
    );
    let t = sb.task("a");
    assert_eq!(t["last_class"], "quota");
    let e = t["last_error"].as_str().unwrap();
    assert!(e.contains("(quota): Monthly request limit reached"), "{e}");
    d.stop();
}

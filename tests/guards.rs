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

//! The real Claude Code CLI (from the npm registry, pinned in
//! tests/agent-cli.sh) driven by `ralph-qchat run --agent claude` against
//! a scripted model server on 127.0.0.1: real tool calls, real retries,
//! real exit codes. Without the CLI these tests fail under CI=true and say
//! so loudly elsewhere; they never pass by skipping quietly.

mod common;
mod scripted_model;

use common::*;
use scripted_model::{ModelServer, Script};
use std::path::PathBuf;
use std::time::Duration;

fn claude() -> Option<PathBuf> {
    scripted_model::real_cli("claude")
}

fn claude_run(
    sb: &Sandbox,
    bin: &std::path::Path,
    server: &ModelServer,
    extra: &[&str],
) -> std::process::Command {
    let b = bin.display().to_string();
    let mut args = vec!["--agent", "claude", "--no-git"];
    args.extend_from_slice(extra);
    let mut c = sb.run_program(&b, &args);
    c.env("ANTHROPIC_BASE_URL", &server.url)
        .env("ANTHROPIC_API_KEY", "sk-ant-test-key");
    c
}

#[test]
fn claude_edits_the_prompt_with_a_real_tool_call_and_completes() {
    let Some(bin) = claude() else { return };
    let sb = Sandbox::new("claude-work");
    let prompt = sb.path("PROMPT.md").display().to_string();
    let server = ModelServer::start(Script::Work {
        prompt,
        complete_on: 3,
    });
    let r = start(claude_run(&sb, &bin, &server, &[])).finish(Duration::from_secs(90));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["status"], "completed", "{s}");
    assert_eq!(s["reason"], "completion_marker");
    assert_eq!(s["iteration"], 3);
    assert_eq!(s["last_class"], "success");
    assert_eq!(server.launches(), 3);
    let p = sb.read("PROMPT.md");
    assert!(p.contains("progress 1") && p.contains("progress 2"), "{p}");
    // The transcript keeps Claude's stream-json, and its result line.
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000003.log");
    assert!(t.contains("\"type\":\"result\""), "{t}");
}

#[test]
fn claude_401_is_auth_after_one_launch_with_a_clear_message() {
    let Some(bin) = claude() else { return };
    let sb = Sandbox::new("claude-401");
    let server = ModelServer::start(Script::Status(401));
    let r = start(claude_run(&sb, &bin, &server, &[])).finish(Duration::from_secs(60));
    assert_eq!(r.code(), 69, "{}", r.stderr);
    assert_eq!(server.sessions(), 1, "auth is not retried");
    let s = sb.state();
    assert_eq!(s["reason"], "auth");
    assert_eq!(s["last_class"], "auth");
    assert!(r.stderr.contains("Failed to authenticate"), "{}", r.stderr);
    assert!(r.stderr.contains("ANTHROPIC_API_KEY"), "{}", r.stderr);
}

#[test]
fn claude_persistent_529_is_throttled_not_bare_timeouts() {
    let Some(bin) = claude() else { return };
    let sb = Sandbox::new("claude-529");
    let server = ModelServer::start(Script::Status(529));
    // Long enough for two launches when the machine is loaded: node's start
    // and Claude's own retry of the 529 take 4-5 s a launch then (8 s made
    // one launch on a loaded machine).
    let r = start(claude_run(&sb, &bin, &server, &["--max-runtime", "15"]))
        .finish(Duration::from_secs(60));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["reason"], "max_runtime", "{s}");
    assert_eq!(s["last_class"], "throttled", "{s}");
    assert!(s["throttled"].as_u64().unwrap() >= 2, "{s}");
    assert_eq!(s["failed_iterations"], 0, "{s}");
    assert!(r.stderr.contains("agent throttled"), "{}", r.stderr);
    assert!(!r.stderr.contains("timed out"), "{}", r.stderr);
    // Claude's own retries are bounded by the profile: about two requests a launch.
    assert!(
        server.posts() <= 3 * server.sessions(),
        "{} posts, {} launches",
        server.posts(),
        server.sessions()
    );
    sb.assert_nothing_left();
}

#[test]
fn a_hung_model_times_out_with_nothing_left_running() {
    let Some(bin) = claude() else { return };
    let sb = Sandbox::new("claude-hang");
    sb.write("cfg.toml", "[orchestrator]\nmax_consecutive_failures = 1\n");
    let server = ModelServer::start(Script::Hang);
    let r = start(claude_run(
        &sb,
        &bin,
        &server,
        &[
            "--config",
            "cfg.toml",
            "--timeout",
            "4",
            "--max-retries",
            "0",
        ],
    ))
    .finish(Duration::from_secs(60));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["last_class"], "timeout", "{s}");
    assert_eq!(s["reason"], "max_consecutive_failures");
    sb.assert_nothing_left();
}

#[test]
fn sigterm_while_a_tool_runs_exits_143_with_nothing_left_running() {
    let Some(bin) = claude() else { return };
    let sb = Sandbox::new("claude-term");
    let server = ModelServer::start(Script::Tool("sleep 47".into()));
    let run = start(claude_run(&sb, &bin, &server, &[]));
    assert!(
        wait_until(Duration::from_secs(30), || sb
            .live_commands()
            .iter()
            .any(|(_, c)| c.contains("sleep 47"))),
        "the tool never started: {:?}",
        sb.live_commands()
    );
    run.signal(libc::SIGTERM);
    let r = run.finish(Duration::from_secs(30));
    assert_eq!(r.code(), 143, "{}", r.stderr);
    sb.assert_nothing_left();
}

/// `total_cost_usd` of each result line in a task's transcripts.
fn reported_costs(sb: &Sandbox) -> Vec<f64> {
    let dir = sb.path(".ralph-qchat/tasks/PROMPT/iterations");
    let mut costs = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(l)
                && v["type"] == "result"
            {
                costs.push(v["total_cost_usd"].as_f64().unwrap());
            }
        }
    }
    costs
}

#[test]
fn claude_cost_and_tokens_are_summed_and_max_cost_usd_ends_the_task() {
    let Some(bin) = claude() else { return };
    let sb = Sandbox::new("claude-cost");
    let prompt = sb.path("PROMPT.md").display().to_string();
    let server = ModelServer::start(Script::Work {
        prompt,
        complete_on: 99,
    });
    let r = start(claude_run(&sb, &bin, &server, &["--max-iterations", "2"]))
        .finish(Duration::from_secs(90));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    let costs = reported_costs(&sb);
    assert_eq!(costs.len(), 2);
    let sum: f64 = costs.iter().sum();
    assert!(sum > 0.0);
    assert!(
        (s["cost_usd"].as_f64().unwrap() - sum).abs() < 1e-12,
        "{s} vs {costs:?}"
    );
    assert!(s["tokens"].as_u64().unwrap() > 0, "{s}");
    // A cap below what was spent ends the task before its next attempt.
    sb.write(
        "cfg.toml",
        format!("[orchestrator]\nmax_cost_usd = {sum}\n"),
    );
    let r = start(claude_run(
        &sb,
        &bin,
        &server,
        &["--config", "cfg.toml", "--max-iterations", "10"],
    ))
    .finish(Duration::from_secs(90));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let s = sb.state();
    assert_eq!(s["reason"], "max_cost_usd", "{s}");
    assert_eq!(s["iteration"], 2, "no attempt after the cap: {s}");
    assert_eq!(server.launches(), 2);
}

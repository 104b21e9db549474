//! The Ralph loop as an operator sees it: completion, limits, retries, git
//! checkpoints, transcripts.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn completes_after_exactly_n_iterations() {
    let sb = Sandbox::new("complete");
    let mut cmd = sb.run_cmd("complete-after.sh", &[]);
    cmd.env("FAKE_N", "3");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(sb.runs(), 3);
    let s = sb.state();
    assert_eq!(s["status"], "completed");
    assert_eq!(s["reason"], "completion_marker");
    assert_eq!(s["iteration"], 3);
    assert_eq!(s["successful_iterations"], 3);
    assert_eq!(s["in_progress"], serde_json::Value::Null);
    // One transcript per iteration, each with its header and footer.
    for i in 1..=3 {
        let t = sb.read(&format!(".ralph-qchat/tasks/PROMPT/iterations/{i:06}.log"));
        assert!(t.contains(&format!("iteration {i} attempt 1")), "{t}");
        assert!(t.contains(&format!("working on iteration {i}")), "{t}");
        assert!(t.contains("=== end: exit status 0"), "{t}");
    }
    // Running it again does nothing: the task is complete.
    let again = run(sb.run_cmd("complete-after.sh", &[]));
    assert_eq!(again.code(), 0);
    assert_eq!(sb.runs(), 3);
    sb.assert_nothing_left();
}

#[test]
fn stops_at_max_iterations_with_limit_reached() {
    let sb = Sandbox::new("limit");
    let mut cmd = sb.run_cmd("complete-after.sh", &["--max-iterations", "2"]);
    cmd.env("FAKE_N", "100");
    let r = run(cmd);
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert_eq!(sb.runs(), 2);
    let s = sb.state();
    assert_eq!(s["status"], "limit_reached");
    assert_eq!(s["reason"], "max_iterations");
    assert_eq!(s["iteration"], 2);
    // Raising the limit lets the same task go on where it stopped.
    let mut cmd = sb.run_cmd("complete-after.sh", &["--max-iterations", "5"]);
    cmd.env("FAKE_N", "4");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(sb.state()["iteration"], 4);
    sb.assert_nothing_left();
}

fn times(log: &str) -> Vec<f64> {
    log.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .map(|t| t.trim().parse::<f64>().unwrap())
        .collect()
}

#[test]
fn retries_with_growing_delays_then_fails_after_consecutive_failures() {
    let sb = Sandbox::new("retries");
    sb.write(
        "cfg.toml",
        "[orchestrator]\nmax_consecutive_failures = 2\n[adapter]\nmax_retries = 2\n",
    );
    let r = run(sb.run_cmd("fail.sh", &["--config", "cfg.toml", "--retry-delay", "0.3"]));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    // Two iterations of one attempt and two retries each.
    assert_eq!(sb.runs(), 6);
    let s = sb.state();
    assert_eq!(s["status"], "failed");
    assert_eq!(s["reason"], "max_consecutive_failures");
    assert_eq!(s["failed_iterations"], 2);
    assert_eq!(s["consecutive_failures"], 2);
    assert_eq!(s["retries"], 4);
    let last_error = s["last_error"].as_str().unwrap();
    assert!(last_error.contains("exit status 1"), "{last_error}");
    assert!(last_error.contains("throttled"), "{last_error}");
    let t = times(&sb.read("fake-runs.log"));
    for it in [0, 3] {
        let first_gap = t[it + 1] - t[it];
        let second_gap = t[it + 2] - t[it + 1];
        assert!(first_gap >= 0.3, "first retry after {first_gap} s");
        assert!(second_gap >= 0.6, "second retry after {second_gap} s");
        assert!(second_gap > first_gap, "{first_gap} then {second_gap}");
    }
    assert!(r.stderr.contains("retry 1 of 2"), "{}", r.stderr);
    sb.assert_nothing_left();
}

fn git(sb: &Sandbox, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .args(args)
        .current_dir(&sb.dir)
        .env("HOME", &sb.dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn git_checkpoints_every_n_iterations_without_the_state_dir() {
    let sb = Sandbox::new("git");
    git(&sb, &["init", "-q", "."]);
    let mut cmd = sb.run_cmd("complete-after.sh", &["--checkpoint-interval", "2"]);
    cmd.env("FAKE_N", "5");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let log = git(&sb, &["log", "--format=%s|%an"]);
    let subjects: Vec<&str> = log.lines().collect();
    // Iterations 2 and 4, and the last one when the task completed.
    assert_eq!(
        subjects,
        [
            "ralph-qchat checkpoint: task PROMPT after iteration 5|ralph-qchat",
            "ralph-qchat checkpoint: task PROMPT after iteration 4|ralph-qchat",
            "ralph-qchat checkpoint: task PROMPT after iteration 2|ralph-qchat",
        ],
        "{log}"
    );
    let files = git(&sb, &["ls-files"]);
    assert!(files.contains("work.txt"), "{files}");
    assert!(!files.contains(".ralph-qchat"), "state committed: {files}");
    // The commit at iteration 2 holds the work of two runs.
    let at2 = git(&sb, &["show", "HEAD~2:work.txt"]);
    assert_eq!(at2.lines().count(), 2, "{at2}");
    // The prompt was archived at each checkpoint.
    for i in [2, 4, 5] {
        assert!(
            sb.path(&format!(
                ".ralph-qchat/tasks/PROMPT/archive/prompt-{i:06}.md"
            ))
            .is_file(),
            "no archive for {i}"
        );
    }
    sb.assert_nothing_left();
}

#[test]
fn no_git_and_no_archive_switch_checkpoints_off() {
    let sb = Sandbox::new("nogit");
    git(&sb, &["init", "-q", "."]);
    let mut cmd = sb.run_cmd(
        "complete-after.sh",
        &["--checkpoint-interval", "1", "--no-git", "--no-archive"],
    );
    cmd.env("FAKE_N", "2");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let o = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(&sb.dir)
        .output()
        .unwrap();
    assert!(!o.status.success(), "a commit was made");
    assert!(!sb.path(".ralph-qchat/tasks/PROMPT/archive").exists());
}

#[test]
fn keeps_only_the_newest_transcripts() {
    let sb = Sandbox::new("keep");
    sb.write("cfg.toml", "[orchestrator]\nkeep_transcripts = 2\n");
    let mut cmd = sb.run_cmd("complete-after.sh", &["--config", "cfg.toml"]);
    cmd.env("FAKE_N", "4");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let mut names: Vec<String> = std::fs::read_dir(sb.path(".ralph-qchat/tasks/PROMPT/iterations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["000003.log", "000004.log"]);
}

#[test]
fn verbose_streams_agent_output() {
    let sb = Sandbox::new("verbose");
    let mut cmd = sb.run_cmd("complete-after.sh", &["--verbose"]);
    cmd.env("FAKE_N", "2");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stderr.contains("working on iteration 1"), "{}", r.stderr);
    let quiet = Sandbox::new("quiet");
    let mut cmd = quiet.run_cmd("complete-after.sh", &[]);
    cmd.env("FAKE_N", "1");
    let r = run(cmd);
    assert!(!r.stderr.contains("working on iteration"), "{}", r.stderr);
}

#[test]
fn summary_line_every_metrics_interval() {
    let sb = Sandbox::new("summary");
    let mut cmd = sb.run_cmd(
        "sleep.sh",
        &["--metrics-interval", "0.1", "--max-iterations", "2"],
    );
    cmd.env("FAKE_SLEEP", "0.4");
    let r = start(cmd).finish(Duration::from_secs(30));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let summaries: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("summary:"))
        .collect();
    assert!(summaries.len() >= 3, "{}", r.stderr);
    let last = summaries.last().unwrap();
    assert!(
        last.contains("agent requests") && last.contains("max"),
        "{last}"
    );
}

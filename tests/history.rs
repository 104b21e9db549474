//! A long history costs nothing: a daemon whose state directory holds 10,000
//! finished tasks costs what one holding 100 costs (finished tasks leave the
//! hot set; their records stay on disk), and `clean` removes them.

mod common;
use common::*;
use std::time::Duration;

/// `n` finished task records, as a daemon leaves them: every tenth failed,
/// task i finished 1 + i % 28 days ago.
fn history(sb: &Sandbox, n: usize) {
    let tasks = sb.state_dir().join("tasks");
    let now = std::time::SystemTime::now();
    for i in 0..n {
        let id = format!("old-{i:05}");
        let dir = tasks.join(&id);
        std::fs::create_dir_all(dir.join("iterations")).unwrap();
        let status = if i % 10 == 0 { "failed" } else { "completed" };
        let ago = Duration::from_secs(86400 * (1 + i as u64 % 28));
        let at = ralph_qchat::sys::time::rfc3339(now - ago);
        let rec = serde_json::json!({
            "id": id, "status": status, "iteration": 3, "successful_iterations": 3,
            "failed_iterations": 0, "consecutive_failures": 0, "retries": 0,
            "interrupted_iterations": 0, "started_at": at, "updated_at": at,
            "finished_at": at, "last_error": null, "reason": "completion_marker",
            "prompt_file": "/nowhere/PROMPT.md", "workdir": "/nowhere",
        });
        std::fs::write(dir.join("state.json"), rec.to_string()).unwrap();
        std::fs::write(dir.join("iterations/000003.log"), "=== iteration 3\n").unwrap();
    }
}

/// The body of a GET of `path` on the daemon's port.
fn http_get(port: &str, path: &str) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    ralph_qchat::http::client::get(&url, Duration::from_secs(10))
        .map(|(_, body)| body)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// (RSS in KiB once the history is taken over, tasks /tasks lists).
fn daemon_on_history(n: usize) -> (u64, usize) {
    let sb = Sandbox::new("history");
    history(&sb, n);
    let d = start(sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]));
    let port_file = sb.state_dir().join("http.port");
    assert!(
        wait_until(Duration::from_secs(30), || port_file.is_file()),
        "{}",
        log_of(&sb)
    );
    let port = std::fs::read_to_string(&port_file)
        .unwrap()
        .trim()
        .to_string();
    let metrics = http_get(&port, "/metrics");
    let want = format!("ralph_tasks{{status=\"completed\"}} {}", n - n.div_ceil(10));
    assert!(metrics.contains(&want), "{want} not in\n{metrics}");
    let listed: serde_json::Value = serde_json::from_str(&http_get(&port, "/tasks")).unwrap();
    let listed = listed.as_array().unwrap().len();
    // One that left the hot set long ago is still answered, from disk.
    let old: serde_json::Value =
        serde_json::from_str(&http_get(&port, "/tasks/old-00001")).unwrap();
    assert_eq!(old["status"], "completed");
    let rss = proc_status(d.pid(), "VmRSS:");
    d.stop();
    (rss, listed)
}

#[test]
fn ten_thousand_finished_tasks_cost_what_a_hundred_cost() {
    let (small, small_listed) = daemon_on_history(100);
    let (large, large_listed) = daemon_on_history(10_000);
    eprintln!("RSS with 100 finished tasks: {small} KiB; with 10,000: {large} KiB");
    // What every publish clones: the same few in both.
    assert_eq!(small_listed, 100);
    assert_eq!(large_listed, 100);
    assert!(
        large * 10 <= small * 11,
        "RSS {large} KiB with 10,000 finished tasks against {small} KiB with 100"
    );
}

fn ids_on_disk(sb: &Sandbox) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(sb.state_dir().join("tasks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `clean` removes finished tasks' records and transcripts by status and
/// age, lists what it removes (or would), and never touches an unfinished
/// task, one whose hook is still due, or a workspace.
#[test]
fn clean_removes_finished_tasks_by_status_and_age() {
    let sb = Sandbox::new("clean");
    history(&sb, 30);
    let sd = sb.state_dir().display().to_string();
    // Unfinished, hook still due, and a workspace: never removed.
    sb.submit("# later\n", "waiting", &[]);
    let spec = sb.state_dir().join("spool/waiting.toml");
    assert!(spec.is_file());
    let hooked = sb.state_dir().join("tasks/old-00011/state.json");
    let mut rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&hooked).unwrap()).unwrap();
    rec["hook"] = "pending".into();
    std::fs::write(&hooked, rec.to_string()).unwrap();
    let ws = sb.state_dir().join("workspaces/old-00001");
    std::fs::create_dir_all(&ws).unwrap();

    let r = run(sb.cmd(&["clean", "--state-dir", &sd, "--status", "failed"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // old-00000, -00010, -00020 failed.
    assert!(
        r.stdout.contains("removed old-00010 (failed)"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("removed 3 finished task(s)"),
        "{}",
        r.stdout
    );
    assert_eq!(ids_on_disk(&sb).len(), 27);

    // Finished 20 days ago or more: i % 28 >= 19.
    let r = run(sb.cmd(&[
        "clean",
        "--state-dir",
        &sd,
        "--older-than",
        "20d",
        "--dry-run",
    ]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("would remove old-00019 (completed)"),
        "{}",
        r.stdout
    );
    assert!(!r.stdout.contains("old-00018"), "{}", r.stdout);
    assert_eq!(ids_on_disk(&sb).len(), 27, "a dry run removed something");
    let r = run(sb.cmd(&["clean", "--state-dir", &sd, "--older-than", "20d"]));
    assert!(
        r.stdout.contains("removed 8 finished task(s)"),
        "{}",
        r.stdout
    );

    let r = run(sb.cmd(&["clean", "--state-dir", &sd]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("1 left whose on_task_end hook is still due"),
        "{}",
        r.stdout
    );
    assert_eq!(ids_on_disk(&sb), ["old-00011"]);
    assert!(spec.is_file() && ws.is_dir());
    let r = run(sb.cmd(&["clean", "--state-dir", &sd, "--status", "running"]));
    assert_eq!(r.code(), 64, "{}", r.stderr);
    assert!(
        r.stderr.contains("not a status a finished task has"),
        "{}",
        r.stderr
    );
}

/// Beside a running daemon: a task that has ended is cleaned away, and its
/// id can be used again.
#[test]
fn clean_beside_a_running_daemon() {
    let sb = Sandbox::new("cleanlive");
    sb.submit("# t\n", "t", &[]);
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "1");
    let d = start(c);
    await_status(&sb, "t", "completed", 20);
    let sd = sb.state_dir().display().to_string();
    let mut out = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            out = run(sb.cmd(&["clean", "--state-dir", &sd])).stdout;
            out.contains("removed t (completed)")
        }),
        "{out}"
    );
    assert!(!sb.state_dir().join("tasks/t").exists());
    // Its workspace is kept (the agent's work): the new task works elsewhere.
    assert!(sb.state_dir().join("workspaces/t").is_dir());
    std::fs::create_dir_all(sb.path("elsewhere")).unwrap();
    let elsewhere = sb.path("elsewhere").display().to_string();
    sb.submit("# again\n", "t", &["--workdir", &elsewhere]);
    await_status(&sb, "t", "completed", 20);
    d.stop();
    let listed = sb.task_ids();
    assert_eq!(listed, ["t"]);
}

fn names(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// spool/rejected and a task's prompt archive stay within their counts
/// (paths.keep_rejected, orchestrator.keep_archived_prompts): the newest
/// are kept, each rejected entry with its reason.
#[test]
fn rejected_entries_and_archived_prompts_are_pruned_to_their_counts() {
    let sb = Sandbox::new("prune");
    sb.write(
        "cfg.toml",
        "[paths]\nkeep_rejected = 2\n[orchestrator]\nkeep_archived_prompts = 2\ncheckpoint_interval = 1\ngit_checkpoint = false\nmax_stalled_iterations = 0\n",
    );
    sb.submit("# t\n", "t", &[]);
    let spool = sb.state_dir().join("spool");
    let mut c = sb.daemon_cmd(
        "complete-after.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
    );
    c.env("FAKE_N", "4");
    let d = start(c);
    await_status(&sb, "t", "completed", 30);
    for i in 0..5 {
        std::fs::write(spool.join(format!(".bad{i}.tmp")), "x").unwrap();
        std::fs::rename(
            spool.join(format!(".bad{i}.tmp")),
            spool.join(format!("bad{i}.txt")),
        )
        .unwrap();
    }
    let rejected = spool.join("rejected");
    assert!(
        wait_until(Duration::from_secs(10), || {
            names(&spool).iter().all(|n| !n.starts_with("bad")) && names(&rejected).len() == 4
        }),
        "{:?} {:?}\n{}",
        names(&spool),
        names(&rejected),
        log_of(&sb)
    );
    let left = names(&rejected);
    assert!(left.iter().all(|n| n.starts_with("bad")), "{left:?}");
    assert_eq!(
        left.iter().filter(|n| n.ends_with(".reason")).count(),
        2,
        "{left:?}"
    );
    d.stop();
    let archive = names(&sb.state_dir().join("tasks/t/archive"));
    assert_eq!(
        archive,
        ["prompt-000003.md", "prompt-000004.md"],
        "{}",
        log_of(&sb)
    );
}

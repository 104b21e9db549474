//! A long history costs nothing: a daemon whose state directory holds 10,000
//! finished tasks costs what one holding 100 costs (finished tasks leave the
//! hot set; their records stay on disk), and `clean` removes them.

mod common;
use common::*;
use std::io::{Read, Write};
use std::time::Duration;

/// `n` finished task records, as a daemon leaves them.
fn history(sb: &Sandbox, n: usize) {
    let tasks = sb.state_dir().join("tasks");
    for i in 0..n {
        let id = format!("old-{i:05}");
        let dir = tasks.join(&id);
        std::fs::create_dir_all(dir.join("iterations")).unwrap();
        let (status, day) = if i % 10 == 0 {
            ("failed", 1 + i % 28)
        } else {
            ("completed", 1 + i % 28)
        };
        let at = format!("2026-11-{day:02}T10:00:00.000Z");
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

fn http_get(port: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
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
    let rss = rss_kib(d.pid());
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

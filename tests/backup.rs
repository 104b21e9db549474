//! `ralph-qchat backup` while the daemon runs and `ralph-qchat restore`:
//! what comes back resumes, records as of one instant, clear refusals.

mod common;
use common::*;
use std::os::fd::AsRawFd;
use std::time::Duration;

fn records(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir.join("tasks")).unwrap().flatten() {
        let p = e.path().join("state.json");
        let b = std::fs::read(&p).unwrap();
        v.push(serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{}: {e}", p.display())));
    }
    v.sort_by(|a: &serde_json::Value, b| a["id"].as_str().cmp(&b["id"].as_str()));
    v
}

#[test]
fn a_backup_taken_while_20_tasks_run_restores_and_resumes_them_all() {
    let sb = Sandbox::new("backup-20");
    let ids: Vec<String> = (0..20).map(|i| format!("t{i:02}")).collect();
    // Far above the default limit of 100 iterations: under a loaded machine
    // the first tasks reach 100 before the last has made 2, and a task that
    // ended before the backup is not one it could show resuming.
    for id in &ids {
        sb.submit("# work\n", id, &["--max-iterations", "100000"]);
    }
    // Tasks that would go on for ever: the restored daemon lets them finish.
    let mut c = sb.daemon_cmd("complete-after.sh", &[]);
    c.env("FAKE_N", "100000")
        .env("FAKE_DELAY", "0.02")
        .env("QCHAT_MAX_CONCURRENT", "20");
    let d = start(c);
    assert!(
        wait_until(Duration::from_secs(30), || ids.iter().all(|id| sb.task(id)
            ["iteration"]
            .as_u64()
            .unwrap_or(0)
            >= 2)),
        "{}",
        log_of(&sb)
    );
    let archive = sb.path("state.tgz");
    let r = run(sb.cmd(&[
        "backup",
        archive.to_str().unwrap(),
        "--state-dir",
        sb.state_dir().to_str().unwrap(),
    ]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stderr.contains("backed up 20 task(s)"), "{}", r.stderr);
    d.stop();

    let restored = sb.path("restored");
    let r = run(sb.cmd(&[
        "restore",
        archive.to_str().unwrap(),
        "--state-dir",
        restored.to_str().unwrap(),
    ]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stderr.contains("restored 20 task(s)"), "{}", r.stderr);
    // Every record parses; each names its workspace in the new directory.
    let before = records(&restored);
    assert_eq!(before.len(), 20);
    for t in &before {
        assert_eq!(t["status"], "running", "{t}");
        for key in ["prompt_file", "workdir"] {
            let p = t[key].as_str().unwrap();
            assert!(p.starts_with(restored.to_str().unwrap()), "{key} {p}");
        }
    }
    let mut c = sb.daemon_cmd_on(&restored, "complete-after.sh", &[]);
    c.env("FAKE_N", "1").env("QCHAT_MAX_CONCURRENT", "20");
    let d = start(c);
    let restored_ids = ids.clone();
    assert!(
        wait_until(Duration::from_secs(30), || records(&restored)
            .iter()
            .filter(|t| t["status"] == "completed")
            .count()
            == restored_ids.len()),
        "{}",
        std::fs::read_to_string(sb.path("restored/tasks/t00/state.json")).unwrap_or_default()
    );
    d.stop();
    let after = records(&restored);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b["id"], a["id"]);
        // The interrupted iteration runs again under its number; it and any
        // after it are counted as they succeed.
        assert!(
            a["iteration"].as_u64() >= b["iteration"].as_u64(),
            "{b} → {a}"
        );
        assert!(
            a["successful_iterations"].as_u64() > b["successful_iterations"].as_u64(),
            "{b} → {a}"
        );
        // Running when the backup was taken: that iteration ran again and counts.
        let interrupted = b["in_progress"].is_number() as u64;
        assert_eq!(
            a["interrupted_iterations"].as_u64().unwrap(),
            b["interrupted_iterations"].as_u64().unwrap() + interrupted,
            "{b} → {a}"
        );
    }
    assert!(
        before.iter().any(|t| t["in_progress"].is_number()),
        "no task was running when the backup was taken"
    );
    // The restored tasks worked in their restored workspaces.
    for id in &ids {
        let log =
            std::fs::read_to_string(restored.join("workspaces").join(id).join("fake-runs.log"))
                .unwrap();
        assert!(log.lines().count() >= 3, "{id}: {log}");
    }
    sb.assert_nothing_left();
}

#[test]
fn the_daemon_writes_no_record_while_a_backup_holds_the_records() {
    let sb = Sandbox::new("backup-lock");
    sb.submit("# work\n", "a", &[]);
    let mut c = sb.daemon_cmd("complete-after.sh", &[]);
    c.env("FAKE_N", "100000").env("FAKE_DELAY", "0.02");
    let d = start(c);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("a")["iteration"].as_u64().unwrap_or(0) >= 2
    ));
    let lock = std::fs::File::open(sb.state_dir().join("records.lock")).unwrap();
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    // What the record said once the writer's last batch was through.
    let held = sb.task("a")["iteration"].as_u64().unwrap();
    let runs = sb.read("state/workspaces/a/fake-runs.log").lines().count();
    // The agent goes on: more iterations run while the lock is held...
    assert!(wait_until(Duration::from_secs(10), || sb
        .read("state/workspaces/a/fake-runs.log")
        .lines()
        .count()
        >= runs + 5));
    // ... and none of them reaches the record until it is let go.
    assert_eq!(sb.task("a")["iteration"].as_u64().unwrap(), held);
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_UN) };
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("a")["iteration"].as_u64().unwrap() >= held + 5
    ));
    d.stop();
}

#[test]
fn restore_refuses_what_it_must_not_touch_and_backup_what_it_cannot_write() {
    let sb = Sandbox::new("backup-refuse");
    sb.submit("# work\n", "a", &[]);
    let sd = sb.state_dir().display().to_string();
    let archive = sb.path("a.tgz").display().to_string();
    let r = run(sb.cmd(&["backup", &archive, "--state-dir", &sd, "--no-transcripts"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    // An archive is never overwritten.
    let again = run(sb.cmd(&["backup", &archive, "--state-dir", &sd]));
    assert_eq!(again.code(), 73, "{}", again.stderr);
    assert!(again.stderr.contains("exists"), "{}", again.stderr);
    // Not empty: refused, and left as it was.
    let r = run(sb.cmd(&["restore", &archive, "--state-dir", &sd]));
    assert_eq!(r.code(), 73, "{}", r.stderr);
    assert!(r.stderr.contains("is not empty"), "{}", r.stderr);
    // In use by a daemon.
    let empty = sb.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let d = start(sb.daemon_cmd_on(&empty, "complete-after.sh", &[]));
    assert!(wait_until(Duration::from_secs(10), || empty
        .join("http.port")
        .is_file()));
    let r = run(sb.cmd(&["restore", &archive, "--state-dir", empty.to_str().unwrap()]));
    assert_eq!(r.code(), 75, "{}", r.stderr);
    assert!(
        r.stderr.contains("is in use by a ralph-qchat"),
        "{}",
        r.stderr
    );
    d.stop();
    // Not a backup: refused, nothing created.
    sb.write("junk.tgz", b"\x1f\x8b not really");
    let fresh = sb.path("fresh");
    let r = run(sb.cmd(&[
        "restore",
        "junk.tgz",
        "--state-dir",
        fresh.to_str().unwrap(),
    ]));
    assert_eq!(r.code(), 65, "{}", r.stderr);
    assert!(
        r.stderr.contains("not a ralph-qchat backup"),
        "{}",
        r.stderr
    );
    assert!(!fresh.exists());
    let r = run(sb.cmd(&[
        "restore",
        "missing.tgz",
        "--state-dir",
        fresh.to_str().unwrap(),
    ]));
    assert_eq!(r.code(), 66, "{}", r.stderr);
    // The good one restores the queued task, without transcripts.
    let r = run(sb.cmd(&["restore", &archive, "--state-dir", fresh.to_str().unwrap()]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(fresh.join("spool/a.toml").is_file());
    let spec = std::fs::read_to_string(fresh.join("spool/a.toml")).unwrap();
    assert!(spec.contains(fresh.to_str().unwrap()), "{spec}");
}

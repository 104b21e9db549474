//! What a power loss must not undo, read from the system calls in the order
//! the kernel saw them (strace): a prompt is on disk before anything names
//! it, a task is recorded before its spool entry goes, a new directory is
//! synced in its parent, and a spool entry is claimed by a rename that
//! replaces nothing.

mod common;
use common::*;

/// What orders writes on disk.
const DISK: &str =
    "fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,link,linkat";
use std::time::Duration;

/// Each step found after the one before it: the first call at or after the
/// previous step's that starts with the step's name and contains all its
/// parts.
fn in_order(calls: &[String], steps: &[(&str, &str, &[&str])]) {
    let mut from = 0;
    for (what, name, parts) in steps {
        let Some(i) = calls[from..]
            .iter()
            .position(|c| c.starts_with(name) && parts.iter().all(|p| c.contains(p)))
        else {
            panic!(
                "{what} ({name} with {parts:?}) is missing after call {from}:\n{}",
                calls.join("\n")
            );
        };
        from += i + 1;
    }
}

#[test]
fn submit_syncs_the_workspace_prompt_before_publishing_the_spec() {
    if !strace_available() {
        return;
    }
    let sb = Sandbox::new("sync-submit");
    let p = sb.write("fix.md", "# fix it\n");
    let sd = sb.state_dir();
    std::fs::create_dir_all(&sd).unwrap();
    let log = sb.path("strace.log");
    let c = sb.cmd(&[
        "submit",
        p.to_str().unwrap(),
        "--state-dir",
        sd.to_str().unwrap(),
        "--id",
        "fix",
    ]);
    let r = run(traced(&c, &log, DISK));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let c = calls(&log);
    let ws = format!("{}/workspaces/fix", sd.display());
    in_order(
        &c,
        &[
            (
                "workspaces/ synced after fix/ is made",
                "fsync",
                &[&format!("{}/workspaces>", sd.display())],
            ),
            (
                "the prompt's content synced",
                "fsync",
                &[&format!("{ws}/.PROMPT.md.tmp")],
            ),
            (
                "the prompt renamed into place",
                "rename",
                &[&format!("{ws}/PROMPT.md\"")],
            ),
            ("the workspace synced", "fsync", &[&format!("{ws}>")]),
            ("the spec published", "rename", &["spool/fix.toml\""]),
        ],
    );
}

#[test]
fn intake_claims_copies_records_then_removes_in_that_order() {
    if !strace_available() {
        return;
    }
    let sb = Sandbox::new("sync-intake");
    let sd = sb.state_dir();
    std::fs::create_dir_all(sd.join("spool")).unwrap();
    let log = sb.path("strace.log");
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "1");
    let d = start(traced(&c, &log, DISK));
    // The daemon is strace's child.
    let daemon = traced_child(d.pid());
    assert!(wait_until(Duration::from_secs(10), || sd
        .join("http.port")
        .is_file()));
    std::fs::write(sd.join("spool/.drop.tmp"), "# dropped\n").unwrap();
    std::fs::rename(sd.join("spool/.drop.tmp"), sd.join("spool/drop.md")).unwrap();
    await_status(&sb, "drop", "completed", 20);
    // Once the claimed entry is gone the trace holds every step.
    let traced = wait_until(Duration::from_secs(10), || {
        !sd.join("spool/.claimed/drop.md").exists()
            && calls(&log)
                .iter()
                .any(|c| c.contains(".claimed/drop.md\"") && c.starts_with("unlink"))
    });
    unsafe { libc::kill(daemon, libc::SIGTERM) };
    let f = d.finish(Duration::from_secs(20));
    assert!(
        traced,
        "the trace ends before the claimed entry is removed: {}",
        f.stderr
    );
    assert_eq!(f.code(), 0, "{}", f.stderr);
    let c = calls(&log);
    let spool = format!("{}/spool", sd.display());
    let ws = format!("{}/workspaces/drop", sd.display());
    let task = format!("{}/tasks/drop", sd.display());
    in_order(
        &c,
        &[
            (
                "claimed without replacing",
                "renameat2",
                &[
                    &format!("{spool}/drop.md\""),
                    ".claimed/drop.md\"",
                    "RENAME_NOREPLACE",
                ],
            ),
            (
                "the prompt's content synced",
                "fsync",
                &[&format!("{ws}/.PROMPT.md.tmp")],
            ),
            (
                "the prompt renamed into place",
                "rename",
                &[&format!("{ws}/PROMPT.md\"")],
            ),
            ("the workspace synced", "fsync", &[&format!("{ws}>")]),
            (
                "tasks/ synced after drop/ is made",
                "fsync",
                &[&format!("{}/tasks>", sd.display())],
            ),
            (
                "the record's content synced",
                "fsync",
                &[&format!("{task}/.state.json.tmp")],
            ),
            (
                "the record renamed into place",
                "rename",
                &[&format!("{task}/state.json\"")],
            ),
            ("the task directory synced", "fsync", &[&format!("{task}>")]),
            (
                "the claimed entry removed",
                "unlink",
                &[".claimed/drop.md\""],
            ),
        ],
    );
}

/// A crash between claiming an entry and recording its task leaves it in
/// spool/.claimed: the next start takes it; one whose task was recorded is
/// only removed.
#[test]
fn entries_claimed_before_a_crash_are_taken_at_the_next_start() {
    let sb = Sandbox::new("claimed");
    let claimed = sb.state_dir().join("spool/.claimed");
    std::fs::create_dir_all(&claimed).unwrap();
    std::fs::write(claimed.join("orphan.md"), "# claimed, never recorded\n").unwrap();
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("FAKE_N", "1");
    let d = start(c);
    await_status(&sb, "orphan", "completed", 20);
    assert!(
        wait_until(Duration::from_secs(5), || !claimed
            .join("orphan.md")
            .exists()),
        "{}",
        log_of(&sb)
    );
    d.stop();
    let prompt = sb.state_dir().join("workspaces/orphan/PROMPT.md");
    assert!(
        std::fs::read_to_string(prompt)
            .unwrap()
            .starts_with("# claimed, never recorded")
    );
}

#[test]
fn temporaries_left_by_killed_writers_are_removed_at_start() {
    let sb = Sandbox::new("abandoned");
    sb.submit("# work\n", "a", &[]);
    let daemon = || {
        let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
        c.env("FAKE_N", "100000").env("FAKE_DELAY", "0.05");
        start(c)
    };
    // A task the next start takes over, not finished.
    let d = daemon();
    assert!(
        wait_until(Duration::from_secs(10), || sb.task("a")["iteration"]
            .as_u64()
            .unwrap_or(0)
            >= 1),
        "{}",
        sb.read("daemon.log")
    );
    d.stop();
    // What a kill -9 between write and rename leaves: `.NAME.tmpPID`, of a
    // process that is gone (above any pid_max Linux allows) ...
    let state = sb.state_dir();
    let gone = [
        state.join(".metrics.json.tmp4194305"),
        state.join("tasks/a/.state.json.tmp4194306"),
    ];
    for p in &gone {
        std::fs::write(p, "half").unwrap();
    }
    // ... and one of a process still writing it (this test), which stays.
    let live = state.join(format!("tasks/a/.state.json.tmp{}", std::process::id()));
    std::fs::write(&live, "being written").unwrap();
    let d = daemon();
    // The sweep says what it removed once it has.
    assert!(
        wait_until(Duration::from_secs(10), || sb
            .read("daemon.log")
            .contains("removed 2 temporary file(s)")),
        "{}",
        sb.read("daemon.log")
    );
    assert!(gone.iter().all(|p| !p.exists()));
    assert!(live.exists());
    d.stop();
}

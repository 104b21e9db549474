//! `ralph-qchat logs`: a task's transcripts as the agent wrote them, followed
//! while it runs, after a kill -9, and within keep_transcripts.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn logs(sb: &Sandbox, args: &[&str]) -> std::process::Output {
    let mut all = vec!["logs", "PROMPT", "--state-dir", ".ralph-qchat"];
    all.extend_from_slice(args);
    sb.cmd(&all).output().unwrap()
}

/// The agent's bytes in raw `logs` output: what lies between an attempt's
/// `=== argv:` line and its `\n=== end:` footer.
fn outputs(raw: &[u8]) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    let mut rest = raw;
    while let Some(i) = find(rest, b"=== argv: ") {
        let after = &rest[i..];
        let start = after.iter().position(|&b| b == b'\n').unwrap() + 1;
        let body = &after[start..];
        let end = find(body, b"\n=== end: ").unwrap_or(body.len());
        found.push(body[..end].to_vec());
        rest = &body[end..];
    }
    found
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

#[test]
fn logs_of_a_finished_task_are_the_bytes_the_agent_wrote() {
    let sb = Sandbox::new("logs-bytes");
    // Binary, invalid UTF-8, escapes, no final newline, a line that looks like ours.
    let agent = sb.write_exec(
        "agent.sh",
        "#!/bin/bash\nprintf 'before \\xff\\xfe\\xc3\\x28 \\033[31mred\\033[0m\\n=== end: fake\\n\\x00tail'\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    let r = run(sb.run_program(agent.to_str().unwrap(), &[]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let out = logs(&sb, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want: &[u8] = b"before \xff\xfe\xc3\x28 \x1b[31mred\x1b[0m\n=== end: fake\n\x00tail";
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with("=== ralph-qchat iteration 1 attempt 1 started "),
        "{text}"
    );
    assert!(find(&out.stdout, want).is_some(), "{text}");
    assert!(text.contains("=== end: exit status 0 (success)"), "{text}");
    assert!(!text.contains("=== record"), "{text}");
    // The same attempt as JSON: its header fields and the output as text.
    let json = logs(&sb, &["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["iteration"], 1);
    assert_eq!(v["attempt"], 1);
    assert_eq!(v["exit"], 0);
    assert_eq!(v["class"], "success");
    assert_eq!(v["truncated"], false);
    assert_eq!(v["output"], String::from_utf8_lossy(want).as_ref());
    // --strip-ansi removes the colour, nothing else.
    let plain = logs(&sb, &["--strip-ansi"]);
    assert!(
        find(
            &plain.stdout,
            b"before \xff\xfe\xc3\x28 red\n=== end: fake\n\x00tail"
        )
        .is_some()
    );
}

#[test]
fn a_flood_is_capped_at_max_output_size_and_logs_says_so() {
    let sb = Sandbox::new("logs-flood");
    let agent = sb.write_exec(
        "agent.sh",
        "#!/bin/bash\nhead -c 300000 /dev/zero | tr '\\0' 'x'\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    sb.write("qchat.toml", "[limits]\nmax_output_size = 100000\n");
    let r = run(sb.run_program(agent.to_str().unwrap(), &["--config", "qchat.toml"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let out = logs(&sb, &[]);
    let got = outputs(&out.stdout);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0], vec![b'x'; 100000]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "300000 bytes of output, truncated: 200000 bytes dropped (limits.max_output_size)"
        ),
        "{}",
        &text[text.len() - 300..]
    );
    let v: serde_json::Value = serde_json::from_slice(&logs(&sb, &["--json"]).stdout).unwrap();
    assert_eq!(v["truncated"], true);
    assert_eq!(v["bytes_dropped"], 200000);
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[test]
fn follow_sees_a_running_agents_output_at_once_and_ends_with_the_task() {
    let sb = Sandbox::new("logs-follow");
    // Three iterations; in each the agent writes a stamped line, waits for
    // the test to let it go on, writes another.
    let agent = sb.write_exec(
        "agent.sh",
        "#!/bin/bash\nn=$RALPH_QCHAT_ITERATION\necho \"first $n $(date +%s.%N)\"\n\
         while [ ! -e go-$n ]; do sleep 0.01; done\necho \"second $n $(date +%s.%N)\"\n\
         [ \"$n\" = 3 ] && printf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\nexit 0\n",
    );
    let daemon = start(sb.run_program(agent.to_str().unwrap(), &[]));
    assert!(
        wait_until(Duration::from_secs(10), || sb
            .path(".ralph-qchat/tasks/PROMPT/iterations")
            .is_dir()),
        "no transcript directory"
    );
    let mut follow = Command::new(BIN)
        .args(["logs", "PROMPT", "--follow", "--state-dir"])
        .arg(sb.path(".ralph-qchat"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(String, f64)>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((line, now()));
        }
    });
    let mut worst: f64 = 0.0;
    for n in 1..=3 {
        for which in ["first", "second"] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let (line, seen) = rx
                    .recv_timeout(left)
                    .unwrap_or_else(|_| panic!("no '{which} {n}' line from logs --follow"));
                if let Some(t) = line.strip_prefix(&format!("{which} {n} ")) {
                    worst = worst.max(seen - t.parse::<f64>().unwrap());
                    break;
                }
            }
            if which == "first" {
                sb.write(&format!("go-{n}"), "");
            }
        }
    }
    // The task completes after iteration 3: follow ends by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = follow.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "logs --follow did not end with the task"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success());
    assert!(
        worst < 0.1,
        "a line reached logs --follow {worst:.3} s after the agent wrote it"
    );
    let r = daemon.finish(Duration::from_secs(10));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    sb.assert_nothing_left();
}

#[test]
fn a_kill_9_mid_iteration_leaves_a_transcript_logs_reads_to_the_last_write() {
    let sb = Sandbox::new("logs-kill");
    let agent = sb.write_exec(
        "agent.sh",
        "#!/bin/bash\nprintf 'written before the kill\\n\\xffpartial'\nexec sleep 300\n",
    );
    let run = start(sb.run_program(agent.to_str().unwrap(), &[]));
    let t = sb.path(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(wait_until(Duration::from_secs(10), || {
        std::fs::read(&t).is_ok_and(|b| find(&b, b"\xffpartial").is_some())
    }));
    run.signal(libc::SIGKILL);
    let _ = run.finish(Duration::from_secs(5));
    assert!(wait_until(Duration::from_secs(5), || sb
        .live_processes()
        .is_empty()));
    let out = logs(&sb, &[]);
    assert!(out.status.success());
    assert_eq!(
        outputs(&out.stdout),
        vec![b"written before the kill\n\xffpartial".to_vec()]
    );
    let v: serde_json::Value = serde_json::from_slice(&logs(&sb, &["--json"]).stdout).unwrap();
    assert_eq!(v["complete"], false);
    assert_eq!(v["output"], "written before the kill\n\u{fffd}partial");
    sb.assert_nothing_left();
}

#[test]
fn keep_transcripts_holds_the_last_n_iterations_and_their_bytes() {
    let sb = Sandbox::new("logs-keep");
    sb.write("qchat.toml", "[orchestrator]\nkeep_transcripts = 3\n");
    let mut cmd = sb.run_cmd("complete-after.sh", &["--config", "qchat.toml"]);
    cmd.env("FAKE_N", "10");
    let r = run(cmd);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let out = logs(&sb, &["--json"]);
    let iterations: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["iteration"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(iterations, vec![8, 9, 10]);
    // On disk: those three files and nothing else.
    let dir = sb.path(".ralph-qchat/tasks/PROMPT/iterations");
    let mut names = Vec::new();
    let mut bytes = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let e = e.unwrap();
        let len = e.metadata().unwrap().len();
        let name = e.file_name().into_string().unwrap();
        bytes += len;
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["000008.log", "000009.log", "000010.log"]);
    let shown: u64 = [8, 9, 10]
        .iter()
        .map(|i| {
            std::fs::metadata(dir.join(format!("{i:06}.log")))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(bytes, shown);
    // `--last 2` and `--iteration 9` pick from them; a pruned one is an error.
    let last: Vec<String> = String::from_utf8_lossy(&logs(&sb, &["--last", "2"]).stdout)
        .lines()
        .filter(|l| l.starts_with("=== ralph-qchat iteration"))
        .map(|l| l.split_whitespace().nth(3).unwrap().to_string())
        .collect();
    assert_eq!(last, ["9", "10"]);
    let one = logs(&sb, &["--iteration", "9"]);
    assert_eq!(
        outputs(&one.stdout),
        vec![b"working on iteration 9 (run 9)\n".to_vec()]
    );
    let gone = logs(&sb, &["--iteration", "2"]);
    assert_eq!(gone.status.code(), Some(66));
    assert!(
        String::from_utf8_lossy(&gone.stderr)
            .contains("iteration 2 of task PROMPT has no transcript (kept: 8 to 10"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
}

#[test]
fn a_fast_loop_allocates_no_inode_per_iteration() {
    if !strace_available() {
        return;
    }
    let sb = Sandbox::new("logs-inodes");
    sb.write("qchat.toml", "[orchestrator]\nkeep_transcripts = 2\n");
    let mut cmd = sb.run_cmd("complete-after.sh", &["--config", "qchat.toml"]);
    cmd.env("FAKE_N", "12");
    let log = sb.path("trace");
    let r = run(traced(
        &cmd,
        &log,
        "unlink,unlinkat,rename,renameat,renameat2",
    ));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let calls = calls(&log);
    let removed: Vec<&String> = calls
        .iter()
        .filter(|c| c.contains("unlink") && c.contains("/iterations/"))
        .collect();
    assert!(
        removed.is_empty(),
        "transcripts removed instead of reused: {removed:?}"
    );
    let reused = calls
        .iter()
        .filter(|c| c.contains("rename") && c.matches("/iterations/0").count() == 2)
        .count();
    // Iterations 3..12 each take the inode of the one that falls out.
    assert_eq!(reused, 10, "{calls:?}");
    let names: Vec<String> = std::fs::read_dir(sb.path(".ralph-qchat/tasks/PROMPT/iterations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // The task's record likewise: each new one is swapped with the last
    // (which the next one overwrites), no file made and freed per record.
    let records: Vec<&String> = calls
        .iter()
        .filter(|c| c.contains("rename") && c.contains("/state.json\""))
        .collect();
    let swapped = records
        .iter()
        .filter(|c| c.contains("RENAME_EXCHANGE") && c.ends_with("= 0"))
        .count();
    let replaced = records
        .iter()
        .filter(|c| !c.contains("RENAME_EXCHANGE") && c.ends_with("= 0"))
        .count();
    assert!(swapped >= 2, "{records:?}");
    assert!(
        replaced <= 1,
        "records renamed over state.json: {records:?}"
    );
    // A finished task keeps one record file, not a spare beside it.
    let task = sb.path(".ralph-qchat/tasks/PROMPT");
    assert!(task.join("state.json").is_file());
    assert!(!task.join(".state.json.tmp").exists());
}

#[test]
fn logs_of_an_unknown_task_is_a_clear_error() {
    let sb = Sandbox::new("logs-unknown");
    std::fs::create_dir_all(sb.path(".ralph-qchat/tasks")).unwrap();
    let out = sb
        .cmd(&["logs", "nosuch", "--state-dir", ".ralph-qchat"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(66));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no task \"nosuch\" in") && err.contains("ralph-qchat status lists"),
        "{err}"
    );
    let usage = sb.cmd(&["logs"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(64));
}

/// What each iteration of a fast loop costs the daemon, seen in its system
/// calls: the prompt file read once after each attempt (the completion
/// check and the fingerprint share the bytes).
#[test]
fn a_fast_loop_reads_the_prompt_once_per_iteration() {
    if !strace_available() {
        return;
    }
    let sb = Sandbox::new("logs-syscalls");
    // No checkpoints: each ends a scheduler pass, and the prompt is read
    // again after one.
    sb.write("qchat.toml", "[orchestrator]\ncheckpoint_interval = 0\n");
    let mut cmd = sb.run_cmd("complete-after.sh", &["--config", "qchat.toml"]);
    cmd.env("FAKE_N", "12");
    let log = sb.path("trace");
    let r = run(traced(&cmd, &log, "openat"));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let calls = calls(&log);
    // The daemon's reads (O_NONBLOCK: the agent's shell never asks for it).
    let reads = calls
        .iter()
        .filter(|c| {
            c.starts_with("openat(") && c.contains("PROMPT.md\"") && c.contains("O_NONBLOCK")
        })
        .count();
    // 12 after the attempts, the first iteration's prompt and fingerprint
    // before the first attempt (two a read per iteration).
    assert!(
        (12..=15).contains(&reads),
        "{reads} reads of the prompt for 12 iterations: {calls:#?}"
    );
}

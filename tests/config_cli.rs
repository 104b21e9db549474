//! Configuration and the command line as an operator meets them: errors that
//! name the key and where it was set, check-config, dry runs, status, logs.

mod common;
use common::*;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

#[test]
fn unknown_key_in_file_exits_78_naming_key_file_and_line() {
    let sb = Sandbox::new("cfgunknown");
    sb.write(
        "qchat.toml",
        "[adapter]\ntimeout = 300\n\n[performance]\nbufer_size = 8192\n",
    );
    let r = run(sb.cmd(&["run", "--config", "qchat.toml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("qchat.toml line 5"), "{}", r.stderr);
    assert!(r.stderr.contains("bufer_size"), "{}", r.stderr);
}

#[test]
fn wrong_type_and_out_of_range_exit_78_naming_key_and_line() {
    let sb = Sandbox::new("cfgrange");
    sb.write("a.toml", "[adapter]\ntimeout = \"five minutes\"\n");
    let r = run(sb.cmd(&["check-config", "--config", "a.toml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("a.toml line 2"), "{}", r.stderr);
    sb.write("b.toml", "# workers\n[performance]\nmax_concurrent = 0\n");
    let r = run(sb.cmd(&["check-config", "--config", "b.toml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("b.toml line 3"), "{}", r.stderr);
    assert!(
        r.stderr.contains("performance.max_concurrent"),
        "{}",
        r.stderr
    );
    sb.write("c.toml", "[adapter]\nkill_grace = -1.0\n");
    let r = run(sb.cmd(&["run", "--config", "c.toml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("adapter.kill_grace"), "{}", r.stderr);
}

#[test]
fn bad_environment_value_exits_78_naming_the_variable() {
    let sb = Sandbox::new("cfgenv");
    let mut c = sb.cmd(&["check-config"]);
    c.env("QCHAT_TIMEOUT", "soon");
    let r = run(c);
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("QCHAT_TIMEOUT"), "{}", r.stderr);
    let mut c = sb.cmd(&["run"]);
    c.env("QCHAT_BUFFER_SIZE", "0");
    let r = run(c);
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("QCHAT_BUFFER_SIZE"), "{}", r.stderr);
    assert!(r.stderr.contains("performance.buffer_size"), "{}", r.stderr);
}

#[test]
fn bad_flag_value_exits_78_naming_the_flag() {
    let sb = Sandbox::new("cfgflag");
    let r = run(sb.cmd(&["run", "--timeout", "-3"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("--timeout"), "{}", r.stderr);
    let r = run(sb.cmd(&["run", "--agent", "gpt"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("--agent"), "{}", r.stderr);
}

#[test]
fn yaml_config_gets_told_the_format_is_toml() {
    let sb = Sandbox::new("cfgyaml");
    sb.write(
        "qchat.yaml",
        "adapter:\n  name: qchat\n  timeout: 300\nperformance:\n  buffer_size: 8192\n",
    );
    let r = run(sb.cmd(&["run", "--config", "qchat.yaml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("TOML"), "{}", r.stderr);
    assert!(r.stderr.contains("ralph-qchat.toml(5)"), "{}", r.stderr);
}

#[test]
fn missing_config_file_exits_78() {
    let sb = Sandbox::new("cfgmissing");
    let r = run(sb.cmd(&["run", "--config", "nope.toml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("nope.toml"), "{}", r.stderr);
}

#[test]
fn check_config_prints_effective_toml_with_origins() {
    let sb = Sandbox::new("checkcfg");
    sb.write(
        "qchat.toml",
        "[adapter]\nname = \"kiro\"\ntimeout = 300\nenv = { KIRO_API_KEY = \"sekrit\" }\n",
    );
    let mut c = sb.cmd(&[
        "check-config",
        "--config",
        "qchat.toml",
        "--max-iterations",
        "7",
    ]);
    c.env("QCHAT_MAX_RETRIES", "9");
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let out = &r.stdout;
    assert!(out.contains("timeout = 300.0  # from "), "{out}");
    assert!(out.contains("qchat.toml line 3"), "{out}");
    assert!(
        out.contains("max_retries = 9  # from environment variable QCHAT_MAX_RETRIES"),
        "{out}"
    );
    assert!(
        out.contains("max_iterations = 7  # from flag --max-iterations"),
        "{out}"
    );
    assert!(
        out.contains("command = \"kiro-cli\"  # default of the kiro profile"),
        "{out}"
    );
    assert!(out.contains("kill_grace = 3.0\n"), "{out}");
    assert!(!out.contains("sekrit"), "secret printed: {out}");
    // What it prints is itself a valid configuration.
    let parsed: toml::Table = toml::from_str(out).expect("check-config output is TOML");
    assert_eq!(parsed["adapter"]["timeout"].as_float(), Some(300.0));
}

#[test]
fn dry_run_prints_the_argv_and_limits_and_runs_nothing() {
    let sb = Sandbox::new("dryrun");
    let a = Sandbox::agent("complete-after.sh");
    let r = run(sb.cmd(&["--agent-command", &a, "--max-iterations", "9", "--dry-run"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains(&format!("argv[0]: {a}")), "{}", r.stdout);
    assert!(r.stdout.contains("argv[1]: chat\n"), "{}", r.stdout);
    assert!(
        r.stdout.contains("argv[2]: --no-interactive\n"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("argv[3]: --trust-all-tools\n"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("Make the tests pass."), "{}", r.stdout);
    assert!(r.stdout.contains("max_iterations=9"), "{}", r.stdout);
    assert_eq!(sb.runs(), 0);
    assert!(!sb.path(".ralph-qchat").exists());
}

#[test]
fn the_guides_invocation_works_as_written() {
    let sb = Sandbox::new("guide");
    std::fs::create_dir(sb.path("bin")).unwrap();
    std::os::unix::fs::symlink(Sandbox::agent("complete-after.sh"), sb.path("bin/q")).unwrap();
    sb.write(
        "qchat.toml",
        "[adapter]\nname = \"qchat\"\ntimeout = 300\n[orchestrator]\niteration_delay = 0\n",
    );
    let mut c = sb.cmd(&[
        "--agent",
        "q",
        "--config",
        "qchat.toml",
        "--checkpoint-interval",
        "10",
        "--max-iterations",
        "1000",
        "--metrics-interval",
        "60",
        "--log-file",
        "logs/orchestrator.log",
        "--verbose",
        "--debug",
        "--log-level",
        "DEBUG",
    ]);
    let path = format!(
        "{}:{}",
        sb.path("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    c.env("PATH", path).env("FAKE_N", "2");
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert_eq!(sb.runs(), 2);
    let log = sb.read("logs/orchestrator.log");
    assert!(log.contains("DEBUG [PROMPT #1] prompt: # Task"), "{log}");
    assert!(log.contains("task completed"), "{log}");
}

#[test]
fn status_lists_tasks_as_text_and_json() {
    let sb = Sandbox::new("status");
    let mut c = sb.run_cmd("complete-after.sh", &[]);
    c.env("FAKE_N", "2");
    assert_eq!(run(c).code(), 0);
    let r = run(sb.cmd(&["status"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("PROMPT"), "{}", r.stdout);
    assert!(r.stdout.contains("completed"), "{}", r.stdout);
    let r = run(sb.cmd(&["status", "--json", "--state-dir", ".ralph-qchat"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let t = &v.as_array().unwrap()[0];
    for key in [
        "id",
        "status",
        "iteration",
        "successful_iterations",
        "failed_iterations",
        "consecutive_failures",
        "retries",
        "interrupted_iterations",
        "started_at",
        "updated_at",
        "last_error",
        "prompt_file",
        "workdir",
    ] {
        assert!(t.get(key).is_some(), "no {key} in {t}");
    }
    assert_eq!(t["iteration"], 2);
    let r = run(sb.cmd(&["status", "nosuch"]));
    assert_ne!(r.code(), 0);
    assert!(r.stderr.contains("nosuch"), "{}", r.stderr);
}

#[test]
fn unwritable_state_dir_exits_73() {
    let sb = Sandbox::new("nostate");
    sb.write("afile", "x");
    let r = run(sb.run_cmd("complete-after.sh", &["--state-dir", "afile/state"]));
    assert_eq!(r.code(), 73, "{}", r.stderr);
    assert!(r.stderr.contains("afile/state"), "{}", r.stderr);
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let sb = Sandbox::new("usage");
    assert_eq!(run(sb.cmd(&["frobnicate"])).code(), 64);
    let r = run(sb.cmd(&["run", "--no-such-flag"]));
    assert_eq!(r.code(), 64);
    assert!(r.stderr.contains("--no-such-flag"), "{}", r.stderr);
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["check-config", "--help"],
        &["status", "--help"],
    ] {
        let r = run(sb.cmd(args));
        assert_eq!(r.code(), 0, "{args:?}");
        assert!(r.stdout.contains("Usage"), "{args:?}: {}", r.stdout);
    }
    for args in [
        &["--version"][..],
        &["run", "--version"],
        &["status", "--version"],
    ] {
        let r = run(sb.cmd(args));
        assert_eq!(r.code(), 0);
        assert_eq!(
            r.stdout.trim(),
            format!("ralph-qchat {}", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn missing_prompt_file_is_a_clear_error() {
    let sb = Sandbox::new("noprompt");
    std::fs::remove_file(sb.path("PROMPT.md")).unwrap();
    let r = run(sb.run_cmd("complete-after.sh", &[]));
    assert_eq!(r.code(), 66, "{}", r.stderr);
    assert!(r.stderr.contains("PROMPT.md"), "{}", r.stderr);
}

#[test]
fn json_logs_carry_task_and_iteration() {
    let sb = Sandbox::new("jsonlog");
    let mut c = sb.run_cmd("complete-after.sh", &["--log-format", "json"]);
    c.env("FAKE_N", "1");
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let lines: Vec<serde_json::Value> = r
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let start = lines
        .iter()
        .find(|v| v["msg"].as_str().unwrap().starts_with("starting agent"))
        .unwrap();
    assert_eq!(start["task"], "PROMPT");
    assert_eq!(start["iteration"], 1);
    assert_eq!(start["level"], "INFO");
    assert!(start["ts"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn journald_gets_priority_prefixes() {
    let sb = Sandbox::new("journal");
    let f = std::fs::File::create(sb.path("stderr.txt")).unwrap();
    let m = f.metadata().unwrap();
    let mut c = sb.run_cmd("fail.sh", &["--max-iterations", "1", "--max-retries", "0"]);
    c.stderr(f)
        .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
    let r = run(c);
    assert_eq!(r.code(), 2);
    let text = sb.read("stderr.txt");
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
    assert!(text.contains("<6>"), "{text}");
    assert!(text.contains("<3>"), "{text}");
}

#[test]
fn syslog_receives_the_log() {
    let sb = Sandbox::new("syslog");
    let sock_path = sb.path("log.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sb.write(
        "cfg.toml",
        format!(
            "[logging]\nsyslog = true\nsyslog_facility = \"local3\"\nsyslog_socket = \"{}\"\n",
            sock_path.display()
        ),
    );
    let mut c = sb.run_cmd("complete-after.sh", &["--config", "cfg.toml"]);
    c.env("FAKE_N", "1");
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    sock.set_nonblocking(true).unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // local3 (19) * 8 + info (6) = 158.
    assert!(
        got.iter().any(|m| m.starts_with("<158>")
            && m.contains("ralph-qchat[")
            && m.contains("task completed")),
        "{got:?}"
    );
}

#[test]
fn a_bad_outcome_rule_is_refused_naming_the_rule_and_its_line() {
    let sb = Sandbox::new("cfgrule");
    sb.write(
        "r.toml",
        "[adapter]\nname = \"kiro\"\n\n[[adapter.rules]]\nmatch = \"^Fine$\"\nclass = \"success\"\n\n[[adapter.rules]]\nmatch = \"^Quota (reached\"\nclass = \"quota\"\n",
    );
    let r = run(sb.cmd(&["check-config", "--config", "r.toml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("r.toml line 8"), "{}", r.stderr);
    assert!(r.stderr.contains("adapter.rules[2].match"), "{}", r.stderr);
    assert!(r.stderr.contains("regular expression"), "{}", r.stderr);
    sb.write(
        "c.toml",
        "[[adapter.rules]]\nmatch = \"x\"\nclass = \"timeout\"\n",
    );
    let r = run(sb.cmd(&["check-config", "--config", "c.toml"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("c.toml line 1"), "{}", r.stderr);
    assert!(r.stderr.contains("\"timeout\""), "{}", r.stderr);
    // A good rule is accepted and shown.
    sb.write(
        "g.toml",
        "[[adapter.rules]]\nmatch = \"^Service quota reached\"\nclass = \"quota\"\n",
    );
    let r = run(sb.cmd(&["check-config", "--config", "g.toml"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("Service quota reached"), "{}", r.stdout);
}

#[test]
fn every_profile_runs_from_the_command_line_without_a_config_file() {
    let sb = Sandbox::new("profiles");
    let cases = [
        ("q", "q", "chat --no-interactive --trust-all-tools"),
        ("qchat", "q", "chat --no-interactive --trust-all-tools"),
        (
            "kiro",
            "kiro-cli",
            "chat --no-interactive --trust-all-tools --wrap never",
        ),
        (
            "claude",
            "claude",
            "-p --dangerously-skip-permissions --output-format stream-json --verbose",
        ),
        (
            "codex",
            "codex",
            "exec --skip-git-repo-check --dangerously-bypass-approvals-and-sandbox",
        ),
        ("gemini", "gemini", "--yolo -p"),
    ];
    for (name, program, args) in cases {
        let r = run(sb.cmd(&["run", "--agent", name, "--dry-run"]));
        assert_eq!(r.code(), 0, "{name}: {}", r.stderr);
        assert!(
            r.stdout.contains(&format!("argv[0]: {program}\n")),
            "{name}: {}",
            r.stdout
        );
        let shown: Vec<String> = args
            .split(' ')
            .enumerate()
            .map(|(i, a)| format!("argv[{}]: {a}\n", i + 1))
            .collect();
        for s in &shown {
            assert!(
                r.stdout.contains(s.as_str()),
                "{name}: {s} not in {}",
                r.stdout
            );
        }
        // The instruction comes last, after the profile's arguments.
        let n = shown.len() + 1;
        assert!(
            r.stdout
                .contains(&format!("argv[{n}]: You are one iteration")),
            "{name}: {}",
            r.stdout
        );
    }
    // The custom profile has no program of its own.
    let r = run(sb.cmd(&["run", "--agent", "custom", "--dry-run"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("adapter.command"), "{}", r.stderr);
    let r = run(sb.cmd(&[
        "run",
        "--agent",
        "custom",
        "--agent-command",
        "/bin/my-agent",
        "--dry-run",
    ]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("argv[0]: /bin/my-agent\nargv[1]: You are one iteration"),
        "{}",
        r.stdout
    );
    // An unknown profile names the known ones.
    let r = run(sb.cmd(&["run", "--agent", "copilot", "--dry-run"]));
    assert_eq!(r.code(), 78, "{}", r.stderr);
    assert!(r.stderr.contains("claude"), "{}", r.stderr);
}

#[test]
fn repeated_agent_arg_replaces_the_profile_arguments() {
    let sb = Sandbox::new("agentargs");
    let r = run(sb.cmd(&[
        "run",
        "--agent",
        "kiro",
        "--agent-arg",
        "chat",
        "--agent-arg",
        "--model",
        "--agent-arg",
        "fast one",
        "--dry-run",
    ]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("argv[0]: kiro-cli\nargv[1]: chat\nargv[2]: --model\nargv[3]: fast one\nargv[4]: You are one iteration"),
        "{}",
        r.stdout
    );
    let r = run(sb.cmd(&["check-config", "--agent-arg", "x"]));
    assert!(
        r.stdout.contains("args = [\"x\"]  # from flag --agent-arg"),
        "{}",
        r.stdout
    );
}

#[test]
fn status_reads_state_directory_as_the_daemon_does_and_aligns_long_ids() {
    let sb = Sandbox::new("status-sd");
    let long = "a-generated-task-id-20261201-123456-abcdef";
    sb.write(&format!("{long}.md"), "# Task\n");
    let mut c = sb.run_cmd("complete-after.sh", &["--prompt", &format!("{long}.md")]);
    c.env("FAKE_N", "1");
    assert_eq!(run(c).code(), 0);
    // The state somewhere else, named only by systemd's variable.
    std::fs::rename(sb.path(".ralph-qchat"), sb.path("elsewhere")).unwrap();
    std::fs::create_dir_all(sb.path("other")).unwrap();
    let mut c = sb.cmd(&["status"]);
    c.current_dir(sb.path("other"))
        .env("STATE_DIRECTORY", sb.path("elsewhere"));
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    let head = lines.iter().find(|l| l.starts_with("ID ")).unwrap();
    let row = lines
        .iter()
        .find(|l| l.starts_with(long))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    let col = |l: &str, word: &str| l.find(word).unwrap_or(usize::MAX);
    assert_eq!(col(head, "STATUS"), col(row, "completed"), "{}", r.stdout);
}

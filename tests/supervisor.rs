//! The agent child under hostile behaviour: hangs, silence, ignored SIGTERM,
//! grandchildren holding the pipes, floods, bad bytes, questions on stdin,
//! missing commands, huge or refused prompts. Nothing may hang or be left.

mod common;
use common::*;
use std::time::Duration;

fn config(sb: &Sandbox, text: &str) {
    sb.write("cfg.toml", text);
}

#[test]
fn wall_clock_timeout_kills_the_agent() {
    let sb = Sandbox::new("timeout");
    config(
        &sb,
        "[orchestrator]\nmax_consecutive_failures = 1\n[adapter]\nmax_retries = 0\nkill_grace = 0.5\n",
    );
    let r = run(sb.run_cmd("sleep.sh", &["--config", "cfg.toml", "--timeout", "1"]));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    let s = sb.state();
    assert!(
        s["last_error"].as_str().unwrap().contains("timed out"),
        "{s}"
    );
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(t.contains("thinking..."), "{t}");
    assert!(t.contains("=== end: timed out"), "{t}");
    sb.assert_nothing_left();
}

#[test]
fn idle_timeout_kills_a_silent_agent() {
    let sb = Sandbox::new("idle");
    config(
        &sb,
        "[orchestrator]\nmax_consecutive_failures = 1\n[adapter]\nmax_retries = 0\nkill_grace = 0.5\n",
    );
    let r = run(sb.run_cmd(
        "silent.sh",
        &[
            "--config",
            "cfg.toml",
            "--timeout",
            "60",
            "--idle-timeout",
            "1",
        ],
    ));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    let e = sb.state()["last_error"].as_str().unwrap().to_string();
    assert!(e.contains("no output"), "{e}");
    sb.assert_nothing_left();
}

#[test]
fn agent_ignoring_sigterm_is_killed_after_the_grace() {
    let sb = Sandbox::new("ignoreterm");
    config(
        &sb,
        "[orchestrator]\nmax_consecutive_failures = 1\n[adapter]\nmax_retries = 0\nkill_grace = 1\n",
    );
    let r = run(sb.run_cmd(
        "ignore-term.sh",
        &["--config", "cfg.toml", "--timeout", "1"],
    ));
    assert_eq!(r.code(), 1, "{}", r.stderr);
    // 1 s timeout + 1 s grace, then SIGKILL; well before the agent's own end.
    assert!(r.elapsed >= Duration::from_secs(2), "{:?}", r.elapsed);
    assert!(r.elapsed < Duration::from_secs(8), "{:?}", r.elapsed);
    sb.assert_nothing_left();
}

#[test]
fn grandchild_holding_stdout_does_not_hold_up_the_iteration() {
    let sb = Sandbox::new("grandchild");
    let r = run(sb.run_cmd("grandchild.sh", &[]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    let gc: i32 = sb.read("grandchild.pid").trim().parse().unwrap();
    assert!(gc > 0);
    sb.assert_nothing_left();
}

#[test]
fn flood_on_both_pipes_is_capped_without_deadlock_or_memory_growth() {
    let sb = Sandbox::new("flood");
    let r = start(sb.run_cmd("flood.sh", &[])).finish(Duration::from_secs(60));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let t = std::fs::metadata(sb.path(".ralph-qchat/tasks/PROMPT/iterations/000001.log"))
        .unwrap()
        .len();
    let cap = 10 * 1024 * 1024;
    assert!(t >= cap && t < cap + 4096, "transcript of {t} bytes");
    let text = std::fs::read(sb.path(".ralph-qchat/tasks/PROMPT/iterations/000001.log")).unwrap();
    // The footer, then the record line (whose length depends on the path).
    let tail = String::from_utf8_lossy(&text[text.len() - 2048..]).into_owned();
    assert!(tail.contains("104857600 bytes of output"), "{tail}");
    assert!(tail.contains("truncated: 94371840 bytes dropped"), "{tail}");
    assert!(r.stderr.contains("94371840 bytes dropped"), "{}", r.stderr);
    // 100 MB went through; the daemon's peak stays far below that.
    assert!(r.maxrss_kib < 40 * 1024, "peak RSS {} KiB", r.maxrss_kib);
    sb.assert_nothing_left();
}

#[test]
fn invalid_utf8_output_is_kept_byte_for_byte() {
    let sb = Sandbox::new("bytes");
    let r = run(sb.run_cmd("bytes.sh", &[]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let t = std::fs::read(sb.path(".ralph-qchat/tasks/PROMPT/iterations/000001.log")).unwrap();
    let needle = b"before \xff\xfe\xc3\x28 after\n";
    assert!(t.windows(needle.len()).any(|w| w == needle));
}

#[test]
fn agent_reading_stdin_gets_eof() {
    let sb = Sandbox::new("stdin");
    let r = run(sb.run_cmd("read-stdin.sh", &["--timeout", "20"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(t.contains("stdin: EOF"), "{t}");
}

#[test]
fn missing_agent_command_exits_69_without_retrying() {
    let sb = Sandbox::new("missing");
    let r = run(sb.cmd(&[
        "run",
        "--agent-command",
        "no-such-agent-xyz",
        "--retry-delay",
        "5",
    ]));
    assert_eq!(r.code(), 69, "{}", r.stderr);
    assert!(r.stderr.contains("no-such-agent-xyz"), "{}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    assert!(
        r.elapsed < Duration::from_secs(3),
        "retried: {:?}",
        r.elapsed
    );
    let s = sb.state();
    assert_eq!(s["status"], "failed");
    assert_eq!(s["reason"], "agent_unavailable");
    assert_eq!(s["retries"], 0);
}

#[test]
fn non_executable_agent_command_exits_69() {
    let sb = Sandbox::new("noexec");
    sb.write("agent.sh", "#!/bin/sh\necho hi\n");
    let r = run(sb.cmd(&["run", "--agent-command", "./agent.sh", "--retry-delay", "5"]));
    assert_eq!(r.code(), 69, "{}", r.stderr);
    assert!(r.stderr.contains("agent.sh"), "{}", r.stderr);
    assert!(r.stderr.contains("cannot be executed"), "{}", r.stderr);
    assert!(
        r.elapsed < Duration::from_secs(3),
        "retried: {:?}",
        r.elapsed
    );
}

#[test]
fn one_mebibyte_prompt_runs_without_e2big() {
    let sb = Sandbox::new("bigprompt");
    let mut prompt = String::from("# Big task\n");
    while prompt.len() < 1024 * 1024 {
        prompt.push_str("Refactor every module so that it reads well. ");
    }
    sb.write("PROMPT.md", &prompt);
    let r = run(sb.run_cmd("args.sh", &[]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let instruction = sb.read("instruction.txt");
    assert!(instruction.len() < 128 * 1024, "{}", instruction.len());
    assert!(instruction.contains(&sb.path("PROMPT.md").display().to_string()));
    assert!(r.stderr.contains("read"), "{}", r.stderr);
}

#[test]
fn prompt_over_max_prompt_size_is_refused_with_65() {
    let sb = Sandbox::new("oversize");
    config(&sb, "[limits]\nmax_prompt_size = 100\n");
    sb.write("PROMPT.md", "x".repeat(200));
    let r = run(sb.run_cmd("args.sh", &["--config", "cfg.toml"]));
    assert_eq!(r.code(), 65, "{}", r.stderr);
    assert!(r.stderr.contains("max_prompt_size"), "{}", r.stderr);
    assert_eq!(sb.runs(), 0);
}

#[test]
fn blocked_pattern_is_refused_with_65_naming_it() {
    let sb = Sandbox::new("blocked");
    config(&sb, "[limits]\nblocked_patterns = [\"rm -rf /\"]\n");
    sb.write("PROMPT.md", "clean up: rm -rf / please\n");
    let r = run(sb.run_cmd("args.sh", &["--config", "cfg.toml"]));
    assert_eq!(r.code(), 65, "{}", r.stderr);
    assert!(r.stderr.contains("\"rm -rf /\""), "{}", r.stderr);
    assert_eq!(sb.runs(), 0);
}

#[test]
fn nul_bytes_are_stripped_and_logged() {
    let sb = Sandbox::new("nul");
    sb.write("PROMPT.md", b"fix the\0 bug\0\n");
    let r = run(sb.run_cmd("args.sh", &[]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stderr.contains("removed 2 NUL byte(s)"), "{}", r.stderr);
    assert!(sb.read("instruction.txt").contains("fix the bug"));
}

#[test]
fn memory_limit_is_the_agents_address_space_in_subreaper_mode() {
    let sb = Sandbox::new("rlimit");
    sb.write_exec(
        "mem.sh",
        "#!/bin/bash\necho \"as=$(ulimit -v) core=$(ulimit -c)\"\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    config(
        &sb,
        "[limits]\ncontainment = \"subreaper\"\nmax_memory_mb = 512\n",
    );
    let r = run(sb.cmd(&["run", "--config", "cfg.toml", "--agent-command", "./mem.sh"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(t.contains("as=524288 core=0"), "{t}");
    assert!(
        r.stderr
            .contains("max_memory_mb is the address-space limit"),
        "{}",
        r.stderr
    );
}

#[test]
fn memory_limit_is_the_attempts_cgroup_in_cgroup_mode() {
    let sb = Sandbox::new("memcg");
    // The agent reads its own cgroup's limit: v1 memory where the host keeps
    // its controllers there, else v2 memory.max.
    sb.write_exec(
        "mem.sh",
        r#"#!/bin/bash
p=$(awk -F: '$2=="memory"{print $3}' /proc/self/cgroup)
if [ -n "$p" ]; then lim=$(cat "/sys/fs/cgroup/memory$p/memory.limit_in_bytes")
else p=$(awk -F: '$1=="0"{print $3}' /proc/self/cgroup); lim=$(cat "/sys/fs/cgroup$p/memory.max")
fi
echo "as=$(ulimit -v) lim=$lim"
printf '
TASK_COMPLETE
' >> "$RALPH_QCHAT_PROMPT_FILE"
"#,
    );
    config(
        &sb,
        "[limits]\ncontainment = \"cgroup\"\nmax_memory_mb = 512\n",
    );
    let r = run(sb.cmd(&["run", "--config", "cfg.toml", "--agent-command", "./mem.sh"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(t.contains("as=unlimited lim=536870912"), "{t}");
}

#[test]
fn max_runtime_stops_a_running_request_without_waiting_for_its_timeout() {
    let sb = Sandbox::new("runtime");
    sb.write("cfg.toml", "[adapter]\nkill_grace = 0.5\n");
    let r = run(sb.run_cmd(
        "sleep.sh",
        &[
            "--config",
            "cfg.toml",
            "--timeout",
            "60",
            "--max-runtime",
            "1",
        ],
    ));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
    let s = sb.state();
    assert_eq!(s["status"], "limit_reached");
    assert_eq!(s["reason"], "max_runtime");
    sb.assert_nothing_left();
}

#[test]
fn waiting_on_a_silent_agent_does_not_burn_cpu() {
    let sb = Sandbox::new("idlecpu");
    let mut c = sb.run_cmd("sleep.sh", &["--max-iterations", "1"]);
    c.env("FAKE_SLEEP", "3");
    let r = start(c);
    let pid = r.pid();
    assert!(wait_until(Duration::from_secs(10), || sb
        .path("agent.pid")
        .is_file()));
    let cpu = |pid: i32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    };
    let before = cpu(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu(pid) - before;
    let r = r.finish(Duration::from_secs(20));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    // A polling loop would use most of a core over those two seconds.
    assert!(used < 0.2, "{used} s of CPU while the agent was silent");
}

#[test]
fn the_agent_starts_clean_found_in_path_in_its_own_group() {
    let sb = Sandbox::new("clean");
    std::fs::create_dir(sb.path("bin")).unwrap();
    // Signal mask and ignored signals as the kernel reports them, its process
    // group, its directory, and a variable set for the daemon itself.
    sb.write_exec(
        "bin/probe-agent",
        "#!/bin/bash\ngrep -E '^(SigBlk|SigIgn):' /proc/self/status\necho \"pgrp=$(cut -d' ' -f5 /proc/$$/stat) pid=$$\"\necho \"cwd=$PWD\"\necho \"daemon comm=$(cat /proc/$PPID/comm)\"\necho \"inherited=$PROBE_INHERITED tunables=${GLIBC_TUNABLES-unset} carried=${RALPH_QCHAT_OPERATOR_TUNABLES-unset}\"\necho \"daemon $(tr '\\0' '\\n' < /proc/$PPID/environ | grep -E '^(GLIBC_TUNABLES=|glibc[.])' | paste -sd:)\"\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    let path = format!("{}:/usr/bin:/bin", sb.path("bin").display());
    let mut c = sb.cmd(&["run", "--agent-command", "probe-agent"]);
    c.env("PATH", path).env("PROBE_INHERITED", "yes");
    let r = run(c);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    // Nothing blocked, nothing ignored: not even SIGPIPE, which Rust ignores.
    assert!(t.contains("SigBlk:\t0000000000000000"), "{t}");
    assert!(t.contains("SigIgn:\t0000000000000000"), "{t}");
    let line = t.lines().find(|l| l.starts_with("pgrp=")).unwrap();
    let (pgrp, pid) = line.split_once(' ').unwrap();
    assert_eq!(&pgrp[5..], &pid[4..], "{t}");
    assert!(t.contains(&format!("cwd={}", sb.dir.display())), "{t}");
    // ps, top and pkill see the daemon by its name, re-execution or not.
    assert!(t.contains("daemon comm=ralph-qchat\n"), "{t}");
    // The daemon re-executed itself (glibc cuts the variable at each ':' in
    // place, hence the pasting of the agent script) with glibc's thread caches off (see
    // src/malloc.rs); the agent sees the environment the operator gave.
    assert!(
        t.contains("inherited=yes tunables=unset carried=unset"),
        "{t}"
    );
    assert!(
        t.contains("daemon GLIBC_TUNABLES=glibc.malloc.tcache_count=0"),
        "{t}"
    );
}

#[test]
fn the_operators_glibc_tunables_reach_the_agent_unchanged() {
    let sb = Sandbox::new("tunables");
    sb.write_exec(
        "probe.sh",
        "#!/bin/bash\necho \"tunables=${GLIBC_TUNABLES-unset}\"\necho \"daemon $(tr '\\0' '\\n' < /proc/$PPID/environ | grep -E '^(GLIBC_TUNABLES=|glibc[.])' | paste -sd:)\"\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    for (given, daemon) in [
        (
            "glibc.malloc.arena_max=2",
            "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0",
        ),
        // The operator's own tcache size is kept: no re-execution.
        ("glibc.malloc.tcache_count=3", "glibc.malloc.tcache_count=3"),
    ] {
        let _ = std::fs::remove_dir_all(sb.path(".ralph-qchat"));
        sb.write("PROMPT.md", "# t\n");
        let mut c = sb.cmd(&["run", "--agent-command", "./probe.sh"]);
        c.env("GLIBC_TUNABLES", given);
        let r = run(c);
        assert_eq!(r.code(), 0, "{}", r.stderr);
        let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
        assert!(t.contains(&format!("tunables={given}\n")), "{t}");
        assert!(
            t.contains(&format!("daemon GLIBC_TUNABLES={daemon}\n")),
            "{t}"
        );
    }
}

#[test]
fn the_agent_gets_blocking_stdout_and_stderr() {
    // Our ends of its pipes are non-blocking; its own must not be (a CLI
    // writing to a non-blocking pipe gets EAGAIN: node and Python fail).
    let sb = Sandbox::new("blocking");
    sb.write_exec(
        "probe.sh",
        "#!/bin/sh\necho \"out $(grep '^flags' /proc/$$/fdinfo/1)\"\necho \"err $(grep '^flags' /proc/$$/fdinfo/2)\" >&2\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    let r = run(sb.cmd(&["run", "--agent-command", "./probe.sh", "--no-git"]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    for which in ["out", "err"] {
        let line = t
            .lines()
            .find(|l| l.starts_with(&format!("{which} flags:")))
            .unwrap_or_else(|| panic!("no {which} flags in {t}"));
        let octal = line.rsplit(|c: char| c.is_whitespace()).next().unwrap();
        let flags = i64::from_str_radix(octal, 8).unwrap();
        assert_eq!(
            flags & libc::O_NONBLOCK as i64,
            0,
            "{which} is non-blocking: {line}"
        );
    }
}

#[test]
fn an_iteration_ends_when_its_output_ends_not_after_the_drain_period() {
    let sb = Sandbox::new("drainend");
    // The agent exits first; a helper holding its pipes follows as soon as it
    // sees it gone. The exit is seen before the last end of file, the case
    // that used to wait out the whole drain period (200 ms) every time.
    sb.write_exec(
        "brief-helper.sh",
        "#!/bin/bash\nleader=$$\n( while kill -0 $leader 2>/dev/null; do sleep 0.01; done ) &\necho working\nexit 0\n",
    );
    let r = run(sb.cmd(&[
        "run",
        "--agent-command",
        "./brief-helper.sh",
        "--max-iterations",
        "3",
        "--iteration-delay",
        "0",
    ]));
    assert_eq!(r.code(), 2, "{}", r.stderr);
    let mut total = 0.0;
    for i in 1..=3 {
        let t = sb.read(&format!(".ralph-qchat/tasks/PROMPT/iterations/{i:06}.log"));
        let secs: f64 = t
            .split("after ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no duration in {t}"));
        total += secs;
    }
    // With the old wait each iteration took at least 0.2 s.
    assert!(total < 0.45, "three iterations took {total} s");
    sb.assert_nothing_left();
}

#[test]
fn the_daemons_own_variables_win_over_adapter_env_of_the_same_name() {
    let sb = Sandbox::new("envwins");
    sb.write_exec(
        "probe.sh",
        "#!/bin/bash\necho \"task=$RALPH_QCHAT_TASK_ID extra=$PROBE_EXTRA\"\n# As exec gave it (bash itself keeps the last of two copies).\ntr '\\0' '\\n' < /proc/$$/environ | grep '^RALPH_QCHAT_TASK_ID=' | paste -sd, | sed 's/^/raw=/'\nprintf '\\nTASK_COMPLETE\\n' >> \"$RALPH_QCHAT_PROMPT_FILE\"\n",
    );
    config(
        &sb,
        "[adapter.env]\nRALPH_QCHAT_TASK_ID = \"spoofed\"\nPROBE_EXTRA = \"given\"\n",
    );
    let r = run(sb.cmd(&[
        "run",
        "--config",
        "cfg.toml",
        "--agent-command",
        "./probe.sh",
    ]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let t = sb.read(".ralph-qchat/tasks/PROMPT/iterations/000001.log");
    assert!(t.contains("task=PROMPT extra=given"), "{t}");
    assert!(t.contains("raw=RALPH_QCHAT_TASK_ID=PROMPT\n"), "{t}");
}

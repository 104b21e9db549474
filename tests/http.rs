//! The monitoring port as operators and Prometheus use it.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

fn request(addr: &str, raw: &str) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut buf = Vec::new();
    if let Err(e) = s.read_to_end(&mut buf) {
        eprintln!("read error after {} bytes: {e}", buf.len());
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Reply {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        headers: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

fn get(addr: &str, path: &str) -> Reply {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
}

fn json(r: &Reply) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

/// Starts the daemon and waits for its port.
fn daemon_with_port(
    sb: &Sandbox,
    agent: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Running, String) {
    let mut c = sb.daemon_cmd(agent, extra);
    for (k, v) in env {
        c.env(k, v);
    }
    let d = start(c);
    let port_file = sb.state_dir().join("http.port");
    assert!(
        wait_until(Duration::from_secs(10), || port_file.is_file()),
        "{}",
        sb.read("daemon.log")
    );
    let port = std::fs::read_to_string(&port_file)
        .unwrap()
        .trim()
        .to_string();
    (d, format!("127.0.0.1:{port}"))
}

fn stop(d: Running) {
    d.stop();
}

#[test]
fn health_and_detailed_answer_with_their_fields() {
    let sb = Sandbox::new("health");
    let (d, addr) = daemon_with_port(
        &sb,
        "complete-after.sh",
        &["--log-file", "daemon.log"],
        &[("ENVIRONMENT", "production")],
    );
    let r = get(&addr, "/health");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.headers.contains("content-type: application/json"),
        "{}",
        r.headers
    );
    assert!(
        r.headers
            .contains(&format!("content-length: {}", r.body.len())),
        "{}",
        r.headers
    );
    let v = json(&r);
    assert_eq!(v["status"], "healthy");
    assert_eq!(v["adapter"], "qchat");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let v = json(&get(&addr, "/health/detailed"));
    for k in ["cpu_percent", "memory_percent", "disk_usage"] {
        assert!(v["system"][k].is_number(), "system.{k}: {v}");
    }
    for k in ["pid", "uptime_seconds", "rss_bytes", "open_fds", "threads"] {
        assert!(v["process"][k].is_number(), "process.{k}: {v}");
    }
    assert_eq!(v["process"]["pid"], d.pid());
    assert_eq!(v["workers"]["total"], 5);
    assert!(v["queue_depth"].is_number());
    assert!(v["tasks"].is_object());
    assert_eq!(v["circuit"]["state"], "closed");
    assert!(v["rate_limit"].is_object());
    assert_eq!(v["environment"], "production");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    // HEAD: same headers, no body.
    let r = request(
        &addr,
        "HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    stop(d);
}

#[test]
fn wrong_method_is_405_with_allow_and_unknown_path_404() {
    let sb = Sandbox::new("methods");
    let (d, addr) = daemon_with_port(&sb, "complete-after.sh", &[], &[]);
    let r = request(
        &addr,
        "POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(r.status, 405);
    assert!(r.headers.contains("allow: get, head"), "{}", r.headers);
    assert_eq!(
        request(
            &addr,
            "DELETE /tasks/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .status,
        405
    );
    assert_eq!(get(&addr, "/nope").status, 404);
    assert_eq!(get(&addr, "/tasks/..%2F..%2Fetc").status, 404);
    assert_eq!(get(&addr, "/tasks/../../etc/passwd").status, 404);
    stop(d);
}

#[test]
fn tasks_endpoint_lists_what_status_json_lists() {
    let sb = Sandbox::new("tasksep");
    sb.submit("# t\n", "alpha", &[]);
    let (d, addr) = daemon_with_port(&sb, "complete-after.sh", &[], &[("FAKE_N", "1")]);
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("alpha")["status"] == "completed"
    ));
    assert!(wait_until(Duration::from_secs(5), || json(&get(
        &addr,
        "/tasks/alpha"
    ))["status"]
        == "completed"));
    let all = json(&get(&addr, "/tasks"));
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["id"], "alpha");
    assert_eq!(all[0]["successful_iterations"], 1);
    assert_eq!(get(&addr, "/tasks/beta").status, 404);
    stop(d);
}

#[test]
fn stopping_daemon_answers_503() {
    let sb = Sandbox::new("stopping");
    sb.write("cfg.toml", "[orchestrator]\nshutdown_grace = 10.0\n");
    sb.submit("# t\n", "slow", &[]);
    let (d, addr) = daemon_with_port(
        &sb,
        "sleep.sh",
        &["--config", "cfg.toml"],
        &[("FAKE_SLEEP", "2")],
    );
    assert!(wait_until(Duration::from_secs(10), || sb
        .state_dir()
        .join("workspaces/slow/agent.pid")
        .is_file()));
    d.signal(libc::SIGTERM);
    let mut seen = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            let r = get(&addr, "/health");
            seen = Some((r.status, r.body.clone()));
            r.status == 503
        }),
        "{seen:?}"
    );
    let v: serde_json::Value = serde_json::from_str(&seen.unwrap().1).unwrap();
    assert_eq!(v["status"], "stopping");
    assert_eq!(d.finish(Duration::from_secs(15)).code(), 0);
}

#[test]
fn open_circuit_and_missing_agent_are_degraded() {
    let sb = Sandbox::new("degraded");
    sb.submit("# t\n", "t1", &[]);
    let sd = sb.state_dir().display().to_string();
    let mut c = sb.cmd(&[
        "daemon",
        "--state-dir",
        &sd,
        "--agent-command",
        "/nonexistent/agent",
        "--health-port",
        "0",
    ]);
    c.env("QCHAT_POLL_INTERVAL", "0.05");
    let d = start(c);
    let port_file = sb.state_dir().join("http.port");
    assert!(wait_until(Duration::from_secs(10), || port_file.is_file()));
    let addr = format!(
        "127.0.0.1:{}",
        std::fs::read_to_string(&port_file).unwrap().trim()
    );
    let mut v = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(5), || {
            v = json(&get(&addr, "/health"));
            v["reasons"].as_array().is_some_and(|r| r.len() == 2)
        }),
        "{v}"
    );
    assert_eq!(v["status"], "degraded");
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("circuit breaker open"), "{reasons}");
    assert!(reasons.contains("/nonexistent/agent"), "{reasons}");
    assert_eq!(get(&addr, "/health").status, 200);
    stop(d);
}

#[test]
fn unwritable_state_is_unhealthy_and_recovers() {
    let sb = Sandbox::new("unwritable");
    sb.submit("# t\n", "t1", &[]);
    let (d, addr) = daemon_with_port(
        &sb,
        "sleep.sh",
        &["--log-file", "daemon.log"],
        &[("FAKE_SLEEP", "1")],
    );
    assert!(wait_until(Duration::from_secs(10), || sb
        .state_dir()
        .join("workspaces/t1/agent.pid")
        .is_file()));
    // The task's directory becomes a file: its record cannot be written.
    let tdir = sb.state_dir().join("tasks/t1");
    std::fs::rename(&tdir, sb.path("t1-aside")).unwrap();
    std::fs::write(&tdir, "in the way").unwrap();
    let mut v = serde_json::Value::Null;
    assert!(
        wait_until(Duration::from_secs(10), || {
            v = json(&get(&addr, "/health"));
            v["status"] == "unhealthy"
        }),
        "{v}"
    );
    assert!(
        v["reasons"]
            .to_string()
            .contains("cannot write state of task t1"),
        "{v}"
    );
    assert_eq!(get(&addr, "/health").status, 503);
    std::fs::remove_file(&tdir).unwrap();
    std::fs::rename(sb.path("t1-aside"), &tdir).unwrap();
    assert!(wait_until(Duration::from_secs(10), || json(&get(
        &addr, "/health"
    ))["status"]
        == "healthy"));
    assert!(
        sb.read("daemon.log")
            .contains("task state is being written again")
    );
    stop(d);
}

#[test]
fn allowlist_403_and_200_on_ipv4_and_ipv6_loopback() {
    for (bind, allow, host, want) in [
        ("127.0.0.1", "10.0.0.0/8", "127.0.0.1", 403),
        ("127.0.0.1", "127.0.0.0/8", "127.0.0.1", 200),
        ("::1", "::1/128", "[::1]", 200),
        ("::1", "fd00::/8", "[::1]", 403),
    ] {
        let sb = Sandbox::new("allow");
        sb.write(
            "cfg.toml",
            format!(
                "[monitoring]\nhealth_check_bind = \"{bind}\"\nhealth_check_allow = [\"{allow}\"]\n"
            ),
        );
        let mut c = sb.daemon_cmd("complete-after.sh", &["--config", "cfg.toml"]);
        c.env("RUST_LOG", "info");
        let d = start(c);
        let port_file = sb.state_dir().join("http.port");
        assert!(wait_until(Duration::from_secs(10), || port_file.is_file()));
        let addr = format!(
            "{host}:{}",
            std::fs::read_to_string(&port_file).unwrap().trim()
        );
        for path in ["/health", "/metrics", "/tasks"] {
            assert_eq!(get(&addr, path).status, want, "{bind} allow {allow} {path}");
        }
        stop(d);
    }
}

fn listening_sockets(pid: i32) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.to_string_lossy().into_owned();
            if let Some(n) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                inodes.insert(n.to_string());
            }
        }
    }
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn health_disabled_opens_no_port() {
    let sb = Sandbox::new("disabled");
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    c.env("HEALTH_CHECK_ENABLED", "false");
    let d = start(c);
    assert!(wait_until(Duration::from_secs(10), || sb
        .read("daemon.log")
        .contains(" workers, agent ")));
    assert!(sb.read("daemon.log").contains("health port off"));
    assert!(!sb.state_dir().join("http.port").exists());
    assert_eq!(listening_sockets(d.pid()), 0);
    stop(d);
    // And the check itself finds a listening port when there is one.
    let sb = Sandbox::new("enabled");
    let (d, _) = daemon_with_port(&sb, "complete-after.sh", &[], &[]);
    assert_eq!(listening_sockets(d.pid()), 1);
    stop(d);
}

#[test]
fn port_in_use_is_a_clear_start_up_error() {
    let sb = Sandbox::new("inuse");
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let sd = sb.state_dir().display().to_string();
    let r = run(sb.cmd(&["daemon", "--state-dir", &sd, "--health-port", &port]));
    assert_eq!(r.code(), 73, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("127.0.0.1:{port} is already in use")),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("health_check_port"), "{}", r.stderr);
}

#[test]
fn garbage_huge_headers_and_idle_connections_do_not_stop_health() {
    let sb = Sandbox::new("abuse");
    let (d, addr) = daemon_with_port(&sb, "complete-after.sh", &[], &[]);
    let mut idle = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(&addr).unwrap();
        if i % 2 == 0 {
            // Half-open: a request line and no end of headers.
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n");
        }
        idle.push(s);
    }
    let mut garbage = TcpStream::connect(&addr).unwrap();
    let _ = garbage.write_all(&[0xff, 0x00, 0x13, 0x37, b'\r', b'\n', b'\r', b'\n']);
    // Arriving in the same instant as the burst, the probe is answered.
    let t0 = Instant::now();
    let r = get(&addr, "/health");
    assert_eq!(
        r.status,
        200,
        "after {:?}: {:?} {:?}",
        t0.elapsed(),
        r.headers,
        r.body
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let mut answer = String::new();
    garbage
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = garbage.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    drop(idle);
    stop(d);
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// tiny_http read a header line into an unbounded buffer: 256 MiB of header
/// took the daemon from 4 MB to 266 MB. Now the head stops at 16 KiB.
#[test]
fn an_endless_header_is_431_and_costs_no_memory() {
    let sb = Sandbox::new("bighead");
    let (d, addr) = daemon_with_port(&sb, "complete-after.sh", &[], &[]);
    assert_eq!(get(&addr, "/health").status, 200);
    let rss0 = proc_status(d.pid(), "VmRSS:");
    let mut c = TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let chunk = vec![b'a'; 1 << 20];
        let _ = w.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Endless: ");
        let mut sent = 0usize;
        while sent < 256 << 20 && w.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        sent
    });
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let sent = sender.join().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert!(sent < 256 << 20, "the daemon took all of it");
    let rss1 = proc_status(d.pid(), "VmRSS:");
    assert!(rss1 < rss0 + 4096, "RSS {rss0} kB before, {rss1} kB after");
    assert_eq!(get(&addr, "/health").status, 200);
    stop(d);
}

/// The test process needs a descriptor per connection it opens.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        r.rlim_cur = r.rlim_max.min(65_536);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
    }
}

/// 1,000 connections fed one byte a second: the daemon keeps its threads,
/// at most its connection cap of descriptors and a few MB more, and answers
/// every other client meanwhile (the longest-waiting connection makes room).
#[test]
fn slowloris_holds_no_threads_and_health_answers_others() {
    raise_nofile();
    let sb = Sandbox::new("slowloris");
    let (d, addr) = daemon_with_port(&sb, "complete-after.sh", &[], &[]);
    assert_eq!(get(&addr, "/health").status, 200);
    let pid = d.pid();
    // The start's own short-lived threads (the temporaries' sweep at nice
    // 19, the preflight's output readers) end on their own: counted before
    // they did, the count fell during the attack (13 against 14 once, on a
    // busy CI machine).
    let transient = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten().any(|t| {
                    let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                    matches!(comm.trim(), "sweep" | "helper-output")
                })
            })
            .unwrap_or(false)
    };
    assert!(
        wait_until(Duration::from_secs(10), || !transient()),
        "the start's threads did not end"
    );
    let (threads0, rss0, fds0) = (
        proc_status(pid, "Threads:"),
        proc_status(pid, "VmRSS:"),
        open_fds(pid),
    );
    let head = b"GET /health HTTP/1.1\r\nHost: slow\r\nX-Slow: ";
    let mut slow: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let mut worst = Duration::ZERO;
    let (mut threads, mut rss, mut fds) = (0, 0, 0);
    for round in 0..3 {
        for c in slow.iter_mut() {
            if c.write_all(&head[round..round + 1]).is_err() {
                // Closed to make room: an attacker connects again.
                *c = TcpStream::connect(&addr).unwrap();
            }
        }
        for _ in 0..10 {
            let t = Instant::now();
            let r = get(&addr, "/health");
            assert_eq!(r.status, 200, "{r:?}", r = r.body);
            worst = worst.max(t.elapsed());
        }
        threads = threads.max(proc_status(pid, "Threads:"));
        rss = rss.max(proc_status(pid, "VmRSS:"));
        fds = fds.max(open_fds(pid));
        if round < 2 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    eprintln!("slowest /health during the attack: {worst:?}");
    assert_eq!(threads, threads0, "threads grew");
    assert!(rss < rss0 + 8192, "RSS {rss0} kB before, {rss} kB during");
    // 128 connections at most, and a few for the probes.
    assert!(
        fds <= fds0 + 128 + 4,
        "{fds0} descriptors before, {fds} during"
    );
    drop(slow);
    stop(d);
}

/// Out of descriptors, tiny_http left its accept loop for good. Now the
/// daemon says so, waits with back-off, and answers again once descriptors
/// are free, while what it had accepted keeps being served.
#[test]
fn out_of_descriptors_the_port_waits_and_answers_again() {
    use std::os::unix::process::CommandExt;
    let sb = Sandbox::new("emfile");
    let mut c = sb.daemon_cmd("complete-after.sh", &["--log-file", "daemon.log"]);
    unsafe {
        c.pre_exec(|| {
            let r = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let d = start(c);
    let port_file = sb.state_dir().join("http.port");
    assert!(
        wait_until(Duration::from_secs(10), || port_file.is_file()),
        "{}",
        log_of(&sb)
    );
    let addr = format!(
        "127.0.0.1:{}",
        std::fs::read_to_string(&port_file).unwrap().trim()
    );
    // A kept-alive connection accepted before the descriptors run out.
    let mut kept = TcpStream::connect(&addr).unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ask = |s: &mut TcpStream| {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert!(ask(&mut kept).starts_with("HTTP/1.1 200 OK"));
    let mut held = Vec::new();
    while !log_of(&sb).contains("cannot accept a connection") {
        assert!(
            held.len() < 200,
            "no accept error after {} connections: {}",
            held.len(),
            log_of(&sb)
        );
        let mut s = TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(b"G");
        held.push(s);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        log_of(&sb).contains("Too many open files"),
        "{}",
        log_of(&sb)
    );
    // Out of descriptors: what is open is still served.
    assert!(ask(&mut kept).starts_with("HTTP/1.1 200 OK"));
    drop(held);
    let t = Instant::now();
    let r = get(&addr, "/health");
    assert_eq!(r.status, 200, "{}", log_of(&sb));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(
        wait_until(Duration::from_secs(5), || log_of(&sb)
            .contains("accepting connections again")),
        "{}",
        log_of(&sb)
    );
    drop(kept);
    stop(d);
}

#[test]
fn metrics_parse_and_counters_move() {
    let sb = Sandbox::new("metrics");
    sb.write(
        "cfg.toml",
        "[adapter]\nmax_retries = 1\ntimeout = 1\nkill_grace = 0.2\n[orchestrator]\nmax_iterations = 1\n",
    );
    // One success, one failure with a retry, one timeout.
    for (id, text) in [("ok", "# ok\n"), ("bad", "# FAIL\n"), ("slow", "# SLEEP\n")] {
        sb.submit(text, id, &[]);
    }
    let agent = sb.write_exec(
        "agent.sh",
        "#!/bin/bash\nif grep -q FAIL \"$RALPH_QCHAT_PROMPT_FILE\"; then exit 3; fi\nif grep -q SLEEP \"$RALPH_QCHAT_PROMPT_FILE\"; then exec sleep 30; fi\necho done\n",
    );
    let a = agent.display().to_string();
    let (d, addr) = daemon_with_port(
        &sb,
        "complete-after.sh",
        &["--config", "cfg.toml", "--agent-command", &a],
        &[],
    );
    let all: Vec<String> = ["ok", "bad", "slow"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert!(wait_until(Duration::from_secs(20), || sb.all_finished(&all)));
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            text = get(&addr, "/metrics").body;
            value(&text, "qchat_requests_total") == Some(5.0)
        }),
        "{text}"
    );
    // ok: 1 request; bad: 2 (one retry); slow: 2 (one retry), both timing out.
    assert_eq!(value(&text, "qchat_retries_total"), Some(2.0), "{text}");
    assert_eq!(
        value(&text, "qchat_errors_total{error_type=\"failed\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "qchat_errors_total{error_type=\"timeout\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "ralph_iterations_total{result=\"success\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "ralph_iterations_total{result=\"failure\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "qchat_request_duration_seconds_count"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "qchat_request_duration_seconds_bucket{le=\"+Inf\"}"),
        Some(5.0),
        "{text}"
    );
    assert_eq!(
        value(&text, "ralph_tasks{status=\"limit_reached\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(value(&text, "qchat_active_requests"), Some(0.0), "{text}");
    assert_eq!(value(&text, "qchat_circuit_open"), Some(0.0), "{text}");
    assert!(value(&text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(value(&text, "process_start_time_seconds").unwrap() > 1.7e9);
    assert!(text.contains(&format!(
        "ralph_qchat_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    check_exposition(&text);
    promtool(&text);
    stop(d);
    // Counters survive a restart.
    let (d, addr) = daemon_with_port(&sb, "complete-after.sh", &["--config", "cfg.toml"], &[]);
    assert_eq!(
        value(&get(&addr, "/metrics").body, "qchat_requests_total"),
        Some(5.0)
    );
    stop(d);
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Every sample belongs to a family announced with HELP and TYPE.
fn check_exposition(text: &str) {
    let mut typed = std::collections::HashMap::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut f = rest.split(' ');
            typed.insert(f.next().unwrap().to_string(), f.next().unwrap().to_string());
        } else if !l.starts_with('#') && !l.is_empty() {
            let name = l.split(['{', ' ']).next().unwrap();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|b| typed.get(*b).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            assert!(typed.contains_key(base), "no TYPE for {name}");
            let v = l.rsplit(' ').next().unwrap();
            assert!(v.parse::<f64>().is_ok(), "bad value in {l}");
            assert!(
                text.contains(&format!("# HELP {base} ")),
                "no HELP for {base}"
            );
        }
    }
}

/// promtool (from Debian's prometheus package) must find nothing to report.
/// CI installs it; elsewhere the check runs when it is on PATH.
fn promtool(text: &str) {
    if ci_tool("promtool").is_none() {
        return;
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

#[test]
fn probe_exit_codes() {
    let sb = Sandbox::new("probe");
    let (d, addr) = daemon_with_port(&sb, "complete-after.sh", &[], &[]);
    let url = format!("http://{addr}/health");
    let r = run(sb.cmd(&["health", "--url", &url]));
    assert_eq!(r.code(), 0, "{}", r.stderr);
    assert!(r.stdout.contains("\"healthy\""), "{}", r.stdout);
    // Through the configuration's port.
    let port = addr.rsplit(':').next().unwrap();
    sb.write(
        "cfg.toml",
        format!("[monitoring]\nhealth_check_port = {port}\n"),
    );
    assert_eq!(run(sb.cmd(&["health", "--config", "cfg.toml"])).code(), 0);
    let r = run(sb.cmd(&["health", "--url", &format!("http://{addr}/nope")]));
    assert_eq!(r.code(), 1);
    stop(d);
    let r = run(sb.cmd(&["health", "--url", &url, "--timeout", "1"]));
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains(&addr), "{}", r.stderr);
    assert_eq!(run(sb.cmd(&["health", "--url", "ftp://x"])).code(), 1);
}

#[test]
fn standby_answers_standby_then_takes_over() {
    let sb = Sandbox::new("standbyhttp");
    let (old, _) = daemon_with_port(&sb, "complete-after.sh", &[], &[]);
    let c = sb.daemon_cmd("complete-after.sh", &["--standby", "--log-file", "new.log"]);
    let new = start(c);
    let mut addr = String::new();
    assert!(wait_until(Duration::from_secs(10), || {
        let log = sb.read("new.log");
        match log.lines().find_map(|l| l.split("on http://").nth(1)) {
            Some(a) => {
                addr = a.trim().to_string();
                true
            }
            None => false,
        }
    }));
    let v = json(&get(&addr, "/health"));
    assert_eq!(v["status"], "standby", "{v}");
    assert_eq!(
        run(sb.cmd(&["health", "--url", &format!("http://{addr}/health")])).code(),
        0
    );
    stop(old);
    assert!(wait_until(Duration::from_secs(10), || json(&get(
        &addr, "/health"
    ))["status"]
        == "healthy"));
    let port = std::fs::read_to_string(sb.state_dir().join("http.port")).unwrap();
    assert_eq!(format!("127.0.0.1:{}", port.trim()), addr);
    stop(new);
}

#[test]
fn run_serves_the_endpoints_with_health_port() {
    let sb = Sandbox::new("runhttp");
    let mut c = sb.run_cmd("sleep.sh", &["--health-port", "0", "--max-iterations", "1"]);
    c.env("FAKE_SLEEP", "2");
    let r = start(c);
    let port_file = sb.path(".ralph-qchat/http.port");
    assert!(wait_until(Duration::from_secs(10), || port_file.is_file()));
    let addr = format!(
        "127.0.0.1:{}",
        std::fs::read_to_string(&port_file).unwrap().trim()
    );
    assert_eq!(json(&get(&addr, "/health"))["status"], "healthy");
    assert!(wait_until(Duration::from_secs(5), || json(&get(
        &addr,
        "/tasks/PROMPT"
    ))["status"]
        == "running"));
    assert_eq!(r.finish(Duration::from_secs(20)).code(), 2);
    assert!(!port_file.exists());
}

#[test]
fn secrets_stay_out_of_logs_dumps_and_detailed_health() {
    let sb = Sandbox::new("secrets");
    let secret = "s3cr3t-value-XYZZY";
    sb.write(
        "cfg.toml",
        format!("[adapter]\nenv = {{ KIRO_API_KEY = \"{secret}\" }}\n"),
    );
    sb.submit("# t\n", "t1", &[]);
    let (d, addr) = daemon_with_port(
        &sb,
        "complete-after.sh",
        &[
            "--config",
            "cfg.toml",
            "--log-file",
            "daemon.log",
            "--debug",
        ],
        &[("AWS_SECRET_ACCESS_KEY", secret), ("FAKE_N", "1")],
    );
    assert!(wait_until(
        Duration::from_secs(10),
        || sb.task("t1")["status"] == "completed"
    ));
    d.signal(libc::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || sb
        .state_dir()
        .join("diagnostics")
        .is_dir()));
    let detailed = get(&addr, "/health/detailed").body;
    let check = run(sb.cmd(&["check-config", "--config", "cfg.toml"]));
    stop(d);
    let mut everything = detailed + &check.stdout + &sb.read("daemon.log");
    for e in std::fs::read_dir(sb.state_dir().join("diagnostics"))
        .unwrap()
        .flatten()
    {
        everything += &std::fs::read_to_string(e.path()).unwrap();
    }
    assert!(everything.contains("KIRO_API_KEY"), "the name may show");
    assert!(!everything.contains(secret), "a secret leaked");
}

/// The port opens only once what it shows is true: a scraper that connects
/// the first moment it can sees the counters an earlier run left (a 0
/// before them reads as a counter reset) and the workers up.
#[test]
fn the_port_opens_only_after_counters_are_restored_and_workers_are_up() {
    let sb = Sandbox::new("port-order");
    std::fs::create_dir_all(sb.state_dir()).unwrap();
    sb.write(
        "state/metrics.json",
        r#"{"requests":7,"retries":0,"iterations_success":7,"iterations_failure":0,"error_types":{},"buckets":[0,0,0,0,0,0,0,0,0,0,7],"duration_micros":7000000,"spent":{}}"#,
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = sb.daemon_cmd("complete-after.sh", &[]);
    let args: Vec<String> = c
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let i = args.iter().position(|a| a == "--health-port").unwrap();
    let mut args = args;
    args[i + 1] = port.to_string();
    let d = start(sb.cmd(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let addr = format!("127.0.0.1:{port}");
    // Connect the first moment the port accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Ok(mut s) = TcpStream::connect(&addr) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            break buf;
        }
        assert!(Instant::now() < deadline, "the port never opened");
        std::thread::yield_now();
    };
    assert!(first.contains("\nqchat_requests_total 7\n"), "{first}");
    let detailed = json(&get(&addr, "/health/detailed"));
    assert_eq!(detailed["workers"]["total"], 5, "{detailed}");
    stop(d);
}

/// Bound beyond loopback with no allowlist: the daemon warns at start, and
/// /tasks (tails of agents' output) answers only this machine's loopback,
/// while /health still answers the network.
#[test]
fn tasks_answer_only_loopback_when_the_port_is_open_to_all() {
    // This machine's own non-loopback address, to ask from.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let _ = probe.connect("192.0.2.1:9");
    let Some(own) = probe
        .local_addr()
        .ok()
        .map(|a| a.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
    else {
        panic!("this machine has no non-loopback address to test from");
    };
    let sb = Sandbox::new("openport");
    sb.write(
        "cfg.toml",
        "[monitoring]\nhealth_check_bind = \"0.0.0.0\"\n",
    );
    let (d, addr) = daemon_with_port(
        &sb,
        "complete-after.sh",
        &["--config", "cfg.toml", "--log-file", "daemon.log"],
        &[],
    );
    assert!(
        log_of(&sb)
            .contains("reachable beyond this machine and monitoring.health_check_allow is empty"),
        "{}",
        log_of(&sb)
    );
    let port = addr.rsplit(':').next().unwrap();
    let outside = format!("{own}:{port}");
    assert_eq!(get(&addr, "/tasks").status, 200);
    assert_eq!(get(&outside, "/tasks").status, 403);
    assert_eq!(get(&outside, "/tasks/x").status, 403);
    assert_eq!(get(&outside, "/health").status, 200);
    stop(d);
}

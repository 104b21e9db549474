//! /health under 10 keep-alive clients while 20 agents run, against the same
//! server answering a constant (what the routes cost) on the same machine at
//! the same time; then /health for new connections while 1,000 slowloris
//! connections feed the port one byte a second, against the same probes
//! without them.

use crate::harness::{self, Temp};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const CLIENTS: usize = 10;
const AGENTS: usize = 20;

struct Load {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<f64>,
}

/// `CLIENTS` keep-alive connections asking `path` for `time`.
fn load(addr: &str, path: &str, time: Duration) -> Load {
    let start = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = addr.to_string();
            let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
            std::thread::spawn(move || -> Vec<f64> {
                let mut lat = Vec::new();
                let Ok(s) = TcpStream::connect(&addr) else {
                    return lat;
                };
                s.set_nodelay(true).ok();
                let Ok(mut w) = s.try_clone() else {
                    return lat;
                };
                let mut r = BufReader::new(s);
                while start.elapsed() < time {
                    let t = Instant::now();
                    if w.write_all(req.as_bytes()).is_err() {
                        break;
                    }
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        match r.read_line(&mut line) {
                            Ok(0) | Err(_) => return lat,
                            Ok(_) => {}
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        break;
                    }
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                lat
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(t.join().unwrap_or_default());
    }
    Load {
        requests: latencies.len(),
        elapsed: start.elapsed(),
        latencies,
    }
}

pub fn health(bin: &Path, quick: bool) -> String {
    let time = Duration::from_secs(if quick { 2 } else { 5 });
    let t = Temp::new("health");
    let agent = harness::agent(&t.0, "agent.sh", "exec sleep 600");
    let ids = harness::tasks(&t.0.join("state"), AGENTS, 1);
    let cfg = "[orchestrator]\nshutdown_grace = 0.0\niteration_delay = 0.0\n[adapter]\nkill_grace = 0.5\ntimeout = 3600\n";
    let d = harness::daemon(bin, &t.0, cfg, &agent, AGENTS);
    harness::wait(Duration::from_secs(10), || {
        ids.iter().all(|id| d.task_status(id) == "running")
    });
    let floor = match floor_server() {
        Ok(f) => f,
        Err(e) => return format!("health: cannot start the floor server: {e}"),
    };
    let base_addr = floor.addr.to_string();
    let mut base = load(&base_addr, "/health", time);
    let addr = format!("127.0.0.1:{}", d.port);
    let mut ours = load(&addr, "/health", time);
    let attack = slowloris(&addr, d.pid(), time);
    d.stop();
    floor.stop();
    let rps = |l: &Load| l.requests as f64 / l.elapsed.as_secs_f64();
    let (bp50, bp99) = (
        harness::pct(&mut base.latencies, 0.5),
        harness::pct(&mut base.latencies, 0.99),
    );
    let (op50, op99) = (
        harness::pct(&mut ours.latencies, 0.5),
        harness::pct(&mut ours.latencies, 0.99),
    );
    format!(
        "## /health under load\n\n\
         {CLIENTS} keep-alive clients for {} s while {AGENTS} agents run. Targets: ≥ 5,000 requests/s, p99 ≤ 5 ms.\n\n\
         | | requests/s | p50 ms | p99 ms |\n|---|---|---|---|\n\
         | the same server answering a constant (floor) | {:.0} | {bp50:.3} | {bp99:.3} |\n\
         | ralph-qchat daemon | {:.0} | {op50:.3} | {op99:.3} |\n\
         | ratio daemon / floor | {:.2} | | |\n\n{attack}",
        time.as_secs(),
        rps(&base),
        rps(&ours),
        rps(&ours) / rps(&base).max(1e-9)
    )
}

/// Our server (src/http/server.rs) with its default limits, answering a constant.
fn floor_server() -> std::io::Result<ralph_qchat::http::server::Server> {
    use ralph_qchat::http::server::{self, Limits};
    use ralph_qchat::http::wire::Reply;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let handler = |_: &ralph_qchat::http::wire::Request, _: std::net::SocketAddr| Reply {
        status: 200,
        content_type: "application/json",
        body: b"{\"status\":\"healthy\"}".to_vec(),
        allow: None,
    };
    server::serve(l, Limits::default(), 2, std::sync::Arc::new(handler))
}

/// As many descriptors as the hard limit allows (1,000 connections need them).
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max.min(65_536);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// New-connection /health probes, one at a time, for `time`: latencies in ms
/// and how many got no answer within 2 s.
fn probes(addr: &str, time: Duration) -> (Vec<f64>, usize) {
    let start = Instant::now();
    let (mut lat, mut failed) = (Vec::new(), 0);
    while start.elapsed() < time {
        let t = Instant::now();
        match ralph_qchat::http::client::get(
            &format!("http://{addr}/health"),
            Duration::from_secs(2),
        ) {
            Ok((200, _)) => lat.push(t.elapsed().as_secs_f64() * 1000.0),
            _ => failed += 1,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (lat, failed)
}

fn slowloris(addr: &str, pid: i32, time: Duration) -> String {
    const SLOW: usize = 1000;
    raise_nofile();
    let (mut calm, calm_failed) = probes(addr, time);
    let threads0 = harness::status_kib(pid, "Threads:");
    let rss0 = harness::status_kib(pid, "VmRSS:");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (addr, stop) = (addr.to_string(), stop.clone());
        std::thread::spawn(move || {
            let mut conns: Vec<TcpStream> = (0..SLOW)
                .filter_map(|_| TcpStream::connect(&addr).ok())
                .collect();
            let opened = conns.len();
            let head = b"GET /health HTTP/1.1\r\nHost: slow\r\nX-Slow: ";
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // One byte a second on each; a connection the server closed
                // is opened again, as an attacker would.
                for c in conns.iter_mut() {
                    if c.write_all(&[head[i % head.len()]]).is_err() {
                        if let Ok(n) = TcpStream::connect(&addr) {
                            *c = n;
                        }
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            opened
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let (mut hit, hit_failed) = probes(addr, time);
    let threads1 = harness::status_kib(pid, "Threads:");
    let rss1 = harness::status_kib(pid, "VmRSS:");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let opened = feeder.join().unwrap_or(0);
    let (c99, h99) = (harness::pct(&mut calm, 0.99), harness::pct(&mut hit, 0.99));
    format!(
        "### /health for new connections while {opened} slowloris connections feed one byte a second\n\n\
         Target: p99 ≤ 50 ms, threads unchanged, a few MB.\n\n\
         | | answered | unanswered | p50 ms | p99 ms | daemon threads | daemon RSS MiB |\n|---|---|---|---|---|---|---|\n\
         | without (floor) | {} | {calm_failed} | {:.3} | {c99:.3} | {threads0} | {:.1} |\n\
         | during | {} | {hit_failed} | {:.3} | {h99:.3} | {threads1} | {:.1} |\n\
         | ratio during / without | | | | {:.2} | | {:.2} |",
        calm.len(),
        harness::pct(&mut calm, 0.5),
        rss0 as f64 / 1024.0,
        hit.len(),
        harness::pct(&mut hit, 0.5),
        rss1 as f64 / 1024.0,
        h99 / c99.max(1e-9),
        rss1 as f64 / (rss0 as f64).max(1.0),
    )
}

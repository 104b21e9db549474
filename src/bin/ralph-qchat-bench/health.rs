//! /health under 10 keep-alive clients while 20 agents run, against a bare
//! tiny_http server answering a constant on the same machine at the same time.

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
    let server = match tiny_http::Server::http("127.0.0.1:0") {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => return format!("health: cannot start the baseline server: {e}"),
    };
    let base_addr = server.server_addr().to_string();
    for _ in 0..4 {
        let s = server.clone();
        std::thread::spawn(move || {
            while let Ok(rq) = s.recv() {
                let _ = rq.respond(tiny_http::Response::from_string("{\"status\":\"healthy\"}"));
            }
        });
    }
    let mut base = load(&base_addr, "/health", time);
    let mut ours = load(&format!("127.0.0.1:{}", d.port), "/health", time);
    d.stop();
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
         | bare tiny_http (floor) | {:.0} | {bp50:.3} | {bp99:.3} |\n\
         | ralph-qchat daemon | {:.0} | {op50:.3} | {op99:.3} |\n\
         | ratio daemon / floor | {:.2} | | |",
        time.as_secs(),
        rps(&base),
        rps(&ours),
        rps(&ours) / rps(&base).max(1e-9)
    )
}

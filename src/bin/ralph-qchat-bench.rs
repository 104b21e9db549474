//! Benchmarks of ralph-qchat against baselines measured in the same run (the
//! machines are shared and noisy: ratios mean something, absolute numbers
//! only describe this run). Run: `cargo run --release --bin ralph-qchat-bench`.
//!
//! health: /health requests per second and latency under 10 keep-alive
//! clients while 20 fake agents run, against a bare tiny_http server that
//! answers a constant on the same machine at the same time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLIENTS: usize = 10;
const AGENTS: usize = 20;

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3.0);
    let bin = sibling("ralph-qchat");
    let dir = std::env::temp_dir().join(format!("ralph-qchat-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let report = health(&bin, &dir, Duration::from_secs_f64(secs));
    println!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("own path");
    let p = me.parent().expect("bin dir").join(name);
    if !p.is_file() {
        eprintln!(
            "{} not found: build it first (cargo build --release)",
            p.display()
        );
        std::process::exit(1);
    }
    p
}

struct Load {
    requests: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Load {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }
}

/// `CLIENTS` keep-alive connections asking `path` for `time`.
fn load(addr: &str, path: &str, time: Duration) -> Load {
    let start = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = addr.to_string();
            let path = path.to_string();
            std::thread::spawn(move || {
                let s = TcpStream::connect(&addr).expect("connect");
                s.set_nodelay(true).ok();
                let mut w = s.try_clone().expect("clone");
                let mut r = BufReader::new(s);
                let mut lat = Vec::new();
                let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n");
                while start.elapsed() < time {
                    let t = Instant::now();
                    w.write_all(req.as_bytes()).expect("write");
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if r.read_line(&mut line).expect("read") == 0 {
                            return lat;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let l = line.to_ascii_lowercase();
                        if let Some(v) = l.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).expect("body");
                    lat.push(t.elapsed());
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

fn baseline_server() -> (std::sync::Arc<tiny_http::Server>, String) {
    let server = std::sync::Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind"));
    let addr = server.server_addr().to_string();
    for _ in 0..4 {
        let s = server.clone();
        std::thread::spawn(move || {
            while let Ok(rq) = s.recv() {
                let _ = rq.respond(tiny_http::Response::from_string("{\"status\":\"healthy\"}"));
            }
        });
    }
    (server, addr)
}

fn daemon(bin: &Path, dir: &Path) -> (Child, String) {
    let agent = dir.join("agent.sh");
    std::fs::write(&agent, "#!/bin/sh\nexec sleep 600\n").expect("agent");
    Command::new("chmod")
        .arg("+x")
        .arg(&agent)
        .status()
        .expect("chmod");
    let state = dir.join("state");
    let cfg = dir.join("bench.toml");
    // No grace at the end: the agents sleep for ten minutes.
    std::fs::write(
        &cfg,
        "[orchestrator]\nshutdown_grace = 0.0\n[adapter]\nkill_grace = 0.5\n",
    )
    .expect("config");
    for i in 0..AGENTS {
        let p = dir.join(format!("p{i}.md"));
        std::fs::write(&p, "# bench\n").expect("prompt");
        Command::new(bin)
            .args(["submit"])
            .arg(&p)
            .arg("--state-dir")
            .arg(&state)
            .stdout(Stdio::null())
            .status()
            .expect("submit");
    }
    let child = Command::new(bin)
        .args(["daemon", "--health-port", "0", "--iteration-delay", "0"])
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .arg("--agent-command")
        .arg(&agent)
        .env("QCHAT_MAX_CONCURRENT", AGENTS.to_string())
        .env("QCHAT_TIMEOUT", "3600")
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon");
    let port_file = state.join("http.port");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !port_file.is_file() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let port = std::fs::read_to_string(&port_file).unwrap_or_default();
    // Wait until every agent runs.
    let running = || {
        std::fs::read_dir(state.join("tasks"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("state.json"))
                            .map(|s| s.contains("\"in_progress\": 1"))
                            .unwrap_or(false)
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    while running() < AGENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, format!("127.0.0.1:{}", port.trim()))
}

fn health(bin: &Path, dir: &Path, time: Duration) -> String {
    let (mut d, addr) = daemon(bin, dir);
    let (base_server, base_addr) = baseline_server();
    let base = load(&base_addr, "/health", time);
    let ours = load(&addr, "/health", time);
    drop(base_server);
    unsafe { libc::kill(d.id() as i32, libc::SIGTERM) };
    let _ = d.wait();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "| /health, {CLIENTS} keep-alive clients, {AGENTS} agents running | requests/s | p50 ms | p99 ms |\n\
         |---|---|---|---|\n\
         | bare tiny_http (baseline) | {:.0} | {:.3} | {:.3} |\n\
         | ralph-qchat daemon | {:.0} | {:.3} | {:.3} |\n\
         | ratio (daemon / baseline) | {:.2} | | |",
        base.rps(),
        ms(base.pct(0.5)),
        ms(base.pct(0.99)),
        ours.rps(),
        ms(ours.pct(0.5)),
        ms(ours.pct(0.99)),
        ours.rps() / base.rps().max(1e-9),
    )
}

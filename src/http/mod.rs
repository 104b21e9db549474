//! The monitoring face: tiny_http on threads of its own, reading only atomics
//! and the snapshot the scheduler publishes; nothing here changes state.

pub mod allow;
mod routes;
pub mod system;

use crate::task::TaskState;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the scheduler publishes for readers on other threads.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub tasks: Vec<Arc<TaskState>>,
    pub workers_total: usize,
    pub workers_busy: usize,
    pub queue_depth: usize,
    pub circuit: &'static str,
    pub circuit_reason: Option<String>,
    pub rate_per_minute: u32,
    pub rate_tokens: f64,
}

/// (when, agent command usable, state directory writable).
pub type Checks = (Instant, bool, Result<(), String>);

pub struct Shared {
    pub started: Instant,
    /// Milliseconds after `started` of the scheduler's last loop.
    pub tick_ms: AtomicU64,
    /// The longest the scheduler sleeps between loops.
    pub tick_every: Duration,
    pub stopping: AtomicBool,
    pub standby: AtomicBool,
    /// Why task state cannot be written, while it cannot.
    pub save_error: Mutex<Option<String>>,
    pub snapshot: Mutex<Arc<Snapshot>>,
    pub adapter: String,
    pub command: Mutex<String>,
    pub state_dir: PathBuf,
    /// How long /health reuses its file-system checks (health_check_interval).
    pub check_every: Mutex<Duration>,
    pub checks: Mutex<Option<Checks>>,
}

impl Shared {
    pub fn new(adapter: &str, command: &str, state_dir: PathBuf) -> Arc<Shared> {
        Arc::new(Shared {
            started: Instant::now(),
            tick_ms: AtomicU64::new(0),
            tick_every: Duration::from_secs(1),
            stopping: AtomicBool::new(false),
            standby: AtomicBool::new(false),
            save_error: Mutex::new(None),
            snapshot: Mutex::new(Arc::new(Snapshot::default())),
            adapter: adapter.to_string(),
            command: Mutex::new(command.to_string()),
            state_dir,
            check_every: Mutex::new(Duration::from_secs(30)),
            checks: Mutex::new(None),
        })
    }

    pub fn set_command(&self, c: &str) {
        if let Ok(mut g) = self.command.lock() {
            *g = c.to_string();
        }
        if let Ok(mut g) = self.checks.lock() {
            *g = None;
        }
    }

    pub fn command(&self) -> String {
        self.command.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set_check_every(&self, d: Duration) {
        if let Ok(mut g) = self.check_every.lock() {
            *g = d;
        }
    }

    pub fn tick(&self) {
        self.tick_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn publish(&self, s: Snapshot) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = Arc::new(s);
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.lock().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn set_save_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.save_error.lock() {
            *g = e;
        }
    }
}

pub struct HttpServer {
    server: Arc<tiny_http::Server>,
    threads: Vec<JoinHandle<()>>,
    pub addr: std::net::SocketAddr,
}

const HANDLERS: usize = 4;

#[derive(Debug)]
pub enum StartError {
    InUse(String),
    Other(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::InUse(m) | StartError::Other(m) => f.write_str(m),
        }
    }
}

/// Binds `bind:port` (port 0 picks a free one) and starts serving.
pub fn start(
    bind: &str,
    port: u16,
    allow: &[String],
    shared: Arc<Shared>,
) -> Result<HttpServer, StartError> {
    let ip: std::net::IpAddr = bind.parse().map_err(|_| {
        StartError::Other(format!("health_check_bind {bind:?} is not an IP address"))
    })?;
    let addr = std::net::SocketAddr::new(ip, port);
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            StartError::InUse(format!(
                "health port {addr} is already in use (another ralph-qchat?); choose another with \
                 [monitoring] health_check_port or --health-port, or turn it off with health_check_enabled = false"
            ))
        } else {
            StartError::Other(format!("cannot listen on {addr}: {e}"))
        }
    })?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Other(format!("cannot read the listening address: {e}")))?;
    let server = tiny_http::Server::from_listener(listener, None)
        .map_err(|e| StartError::Other(format!("cannot serve on {addr}: {e}")))?;
    let server = Arc::new(server);
    let allow: Vec<allow::Cidr> = allow.iter().filter_map(|c| allow::Cidr::parse(c)).collect();
    let cpu = Arc::new(system::CpuMeter::new());
    let mut threads = Vec::new();
    for i in 0..HANDLERS {
        let server = server.clone();
        let shared = shared.clone();
        let allow = allow.clone();
        let cpu = cpu.clone();
        let t = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                while let Ok(rq) = server.recv() {
                    routes::handle(rq, &shared, &allow, &cpu);
                }
            })
            .map_err(|e| StartError::Other(format!("cannot start HTTP thread: {e}")))?;
        threads.push(t);
    }
    Ok(HttpServer {
        server,
        threads,
        addr,
    })
}

impl HttpServer {
    pub fn stop(self) {
        for _ in 0..self.threads.len() {
            self.server.unblock();
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

//! The monitoring face: tiny_http on threads of its own, reading only atomics
//! and what the engine publishes (`engine::Shared`); nothing here changes
//! state, and the engine does not know this module exists.

pub mod allow;
pub mod client;
mod routes;

use crate::engine::Shared;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

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
    let cpu = Arc::new(crate::sys::proc::CpuMeter::new());
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

    /// `<state_dir>/http.port`: where to find this instance's port (useful
    /// with port 0).
    pub fn write_port_file(&self, state_dir: &Path) {
        let port_file = state_dir.join("http.port");
        let text = format!("{}\n", self.addr.port());
        if let Err(e) = crate::store::write_atomic(&port_file, text.as_bytes()) {
            log::warn!("cannot write {}: {e}", port_file.display());
        }
    }

    /// Removes the port file if it still names our port (a standby successor
    /// may have written its own).
    pub fn remove_port_file(&self, state_dir: &Path) {
        let port_file = state_dir.join("http.port");
        let ours = std::fs::read_to_string(&port_file)
            .map(|s| s.trim() == self.addr.port().to_string())
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(port_file);
        }
    }
}

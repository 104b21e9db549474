//! The monitoring face: a bounded HTTP/1.1 server (server.rs) on threads of
//! its own, reading only atomics and what the engine publishes
//! (`engine::Shared`); nothing here changes state, and the engine does not
//! know this module exists.

pub mod allow;
pub mod client;
mod routes;
pub mod server;
pub mod wire;

use crate::engine::Shared;
use std::path::Path;
use std::sync::Arc;

pub struct HttpServer {
    server: server::Server,
    pub addr: std::net::SocketAddr,
}

/// Threads computing answers; connections are held by one more.
const HANDLERS: usize = 2;

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
    let allow: Vec<allow::Cidr> = allow.iter().filter_map(|c| allow::Cidr::parse(c)).collect();
    let cpu = crate::sys::proc::CpuMeter::new();
    let handler = move |rq: &wire::Request, peer: std::net::SocketAddr| {
        routes::handle(rq, peer, &shared, &allow, &cpu)
    };
    let server = server::serve(
        listener,
        server::Limits::default(),
        HANDLERS,
        Arc::new(handler),
    )
    .map_err(|e| StartError::Other(format!("cannot serve on {addr}: {e}")))?;
    Ok(HttpServer { server, addr })
}

impl HttpServer {
    pub fn stop(self) {
        self.server.stop();
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

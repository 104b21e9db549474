//! The smallest HTTP/1.1 client: one GET with deadlines, for `ralph-qchat
//! health` (a container's HEALTHCHECK needs no curl) and the tests.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// (host:port, path) of an http:// URL.
pub fn parse_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/health"),
    };
    if hostport.is_empty() {
        return None;
    }
    let hostport = if hostport.ends_with(']') || !hostport.contains(':') {
        format!("{hostport}:80")
    } else {
        hostport.to_string()
    };
    Some((hostport, path.to_string()))
}

/// (status code, body) of a GET.
pub fn get(url: &str, timeout: Duration) -> Result<(u16, String), String> {
    let (hostport, path) =
        parse_url(url).ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{url}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let mut buf = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{url}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/health"),
            Some(("127.0.0.1:8080".into(), "/health".into()))
        );
        assert_eq!(
            parse_url("http://localhost:9"),
            Some(("localhost:9".into(), "/health".into()))
        );
        assert_eq!(
            parse_url("http://[::1]:8081/health"),
            Some(("[::1]:8081".into(), "/health".into()))
        );
        assert_eq!(
            parse_url("http://[::1]/x"),
            Some(("[::1]:80".into(), "/x".into()))
        );
        assert_eq!(parse_url("https://x/"), None);
        assert_eq!(parse_url("http:///health"), None);
    }
}

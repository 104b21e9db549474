//! HTTP/1.1 on the wire (RFC 9112): a request head from bytes, a response to
//! bytes. Pure functions; the server decides when to call them.
//!
//! Only what a monitoring port needs: GET and HEAD with no body. A request
//! that carries a body is answered and its connection closed, since we never
//! read one; anything malformed is a 400 and a close, never a guess.

/// What a request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query, from origin-form or absolute-form.
    pub path: String,
    /// The connection stays open after the answer.
    pub keep_alive: bool,
    /// HTTP/1.0 asked for keep-alive: the answer must say it keeps it.
    pub legacy_keep_alive: bool,
}

/// The outcome of looking at the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A complete head, and how many bytes it took (leading blank lines
    /// included).
    Done(Request, usize),
    /// Not a request we answer: the status and why; the connection closes.
    Bad(u16, &'static str),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// The end of the head: the index just past the blank line, bare LF allowed
/// (RFC 9112 §2.2).
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let nl = from + i;
        let next = nl + 1;
        match buf.get(next) {
            Some(b'\n') => return Some(next + 1),
            Some(b'\r') if buf.get(next + 1) == Some(&b'\n') => return Some(next + 2),
            Some(_) => from = next,
            None => return None,
        }
    }
    None
}

fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    head.split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
}

/// Parses the head at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    // A server SHOULD ignore at least one empty line before the request line.
    let skip = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    let rest = &buf[skip..];
    if rest.is_empty() {
        return Parsed::Partial;
    }
    let Some(end) = head_end(rest) else {
        return Parsed::Partial;
    };
    match request(&rest[..end]) {
        Ok(r) => Parsed::Done(r, skip + end),
        Err((code, why)) => Parsed::Bad(code, why),
    }
}

fn request(head: &[u8]) -> Result<Request, (u16, &'static str)> {
    let mut it = lines(head);
    let line = it.next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "malformed request line"));
    };
    if !is_token(method) {
        return Err((400, "malformed method"));
    }
    let minor = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        v if v.len() == 8 && v.starts_with(b"HTTP/") && v[5].is_ascii_digit() => {
            return Err((
                505,
                "HTTP version not supported: HTTP/1.0 and HTTP/1.1 only",
            ));
        }
        _ => return Err((400, "malformed HTTP version")),
    };
    let path = path_of(target).ok_or((400, "malformed request target"))?;
    let mut host = 0;
    let mut close = false;
    let mut keep = false;
    let mut body = false;
    let mut length: Option<&[u8]> = None;
    for l in it {
        if l.is_empty() {
            break;
        }
        if l[0] == b' ' || l[0] == b'\t' {
            return Err((400, "obsolete line folding in a header"));
        }
        let Some(colon) = memchr::memchr(b':', l) else {
            return Err((400, "malformed header line"));
        };
        let name = &l[..colon];
        if !is_token(name) {
            return Err((400, "malformed header name"));
        }
        let value = l[colon + 1..].trim_ascii();
        if value.iter().any(|&b| b == 0 || b == b'\r') {
            return Err((400, "malformed header value"));
        }
        if name.eq_ignore_ascii_case(b"host") {
            host += 1;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for opt in value.split(|&b| b == b',').map(|o| o.trim_ascii()) {
                close |= opt.eq_ignore_ascii_case(b"close");
                keep |= opt.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if !value.iter().all(u8::is_ascii_digit) || value.is_empty() {
                return Err((400, "malformed Content-Length"));
            }
            if length.is_some_and(|l| l != value) {
                return Err((400, "conflicting Content-Length"));
            }
            length = Some(value);
            body |= value.iter().any(|&b| b != b'0');
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            body = true;
        }
    }
    if minor == 1 && host != 1 {
        return Err((400, "an HTTP/1.1 request needs exactly one Host header"));
    }
    let keep_alive = !close && !body && (minor == 1 || keep);
    Ok(Request {
        method: String::from_utf8_lossy(method).into_owned(),
        path,
        keep_alive,
        legacy_keep_alive: keep_alive && minor == 0,
    })
}

/// origin-form (`/a?b`), absolute-form (`http://h/a`, which servers MUST
/// accept) and asterisk-form; the query is dropped.
fn path_of(target: &[u8]) -> Option<String> {
    if target.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return None;
    }
    let target = std::str::from_utf8(target).ok()?;
    let origin = if target.starts_with('/') || target == "*" {
        target
    } else {
        let lower = target.get(..7)?.to_ascii_lowercase();
        let rest = if lower == "http://" {
            &target[7..]
        } else if target.get(..8)?.eq_ignore_ascii_case("https://") {
            &target[8..]
        } else {
            return None;
        };
        rest.find('/').map_or("/", |i| &rest[i..])
    };
    let path = origin.split(['?', '#']).next().unwrap_or("");
    Some(path.to_string())
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// What a route answers.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// An `Allow` header (a 405 must carry one).
    pub allow: Option<&'static str>,
}

impl Reply {
    pub fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(v).unwrap_or_default(),
            allow: None,
        }
    }

    pub fn error(status: u16, msg: &str) -> Reply {
        Reply::json(status, &serde_json::json!({ "error": msg }))
    }
}

/// The bytes of an answer. `head_only` (a HEAD request) leaves out the body
/// and keeps its Content-Length; `keep` says the connection stays open.
pub fn response(r: &Reply, head_only: bool, keep: bool, legacy: bool, date: &str) -> Vec<u8> {
    use std::io::Write;
    let mut out = Vec::with_capacity(160 + r.body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nDate: {date}\r\nServer: ralph-qchat\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    if let Some(a) = r.allow {
        let _ = write!(out, "Allow: {a}\r\n");
    }
    if !keep {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if legacy {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(&r.body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(s: &str) -> Request {
        match parse(s.as_bytes()) {
            Parsed::Done(r, n) => {
                assert_eq!(n, s.len(), "{s:?}");
                r
            }
            other => panic!("{s:?}: {other:?}"),
        }
    }

    fn bad(s: &str) -> u16 {
        match parse(s.as_bytes()) {
            Parsed::Bad(code, _) => code,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn requests_and_their_connection() {
        let r = done("GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/health"));
        assert!(r.keep_alive && !r.legacy_keep_alive);
        assert!(!done("GET / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n").keep_alive);
        assert!(!done("GET / HTTP/1.0\r\n\r\n").keep_alive);
        let r = done("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(r.keep_alive && r.legacy_keep_alive);
        // Bare LF, leading blank lines, absolute-form.
        assert_eq!(done("\r\n\nGET /m HTTP/1.1\nHost: a\n\n").path, "/m");
        assert_eq!(
            done("GET http://h:1/tasks/a HTTP/1.1\r\nHost: h\r\n\r\n").path,
            "/tasks/a"
        );
        // A body we will not read: answered, then closed.
        let r = done("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n");
        assert!(!r.keep_alive);
        assert!(done("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert!(
            !done("GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n").keep_alive
        );
    }

    #[test]
    fn partial_heads_wait() {
        for s in [
            "",
            "\r\n",
            "\n",
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n\r",
        ] {
            assert_eq!(parse(s.as_bytes()), Parsed::Partial, "{s:?}");
        }
    }

    #[test]
    fn malformed_is_400_and_other_versions_505() {
        for s in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
            "G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "GET nothing HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTX/1.1\r\nHost: a\r\n\r\n",
            "\u{ff}\u{0}\r\n\r\n",
        ] {
            assert_eq!(bad(s), 400, "{s:?}");
        }
        assert_eq!(bad("GET / HTTP/2.0\r\n\r\n"), 505);
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let r = Reply::error(405, "no");
        let text = String::from_utf8(response(&r, false, false, false, "D")).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\nDate: D\r\n"));
        assert!(text.contains("Content-Length: 14\r\n") && text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"no\"}"));
        let head = String::from_utf8(response(&r, true, true, true, "D")).unwrap();
        assert!(head.ends_with("Content-Length: 14\r\nConnection: keep-alive\r\n\r\n"));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Parsed::Done(_, n) = parse(&bytes) {
                proptest::prop_assert!(n <= bytes.len());
            }
        }

        #[test]
        fn a_head_split_anywhere_parses_the_same(cut in 0usize..60) {
            let s = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n";
            let cut = cut.min(s.len() - 1);
            proptest::prop_assert_eq!(parse(&s[..cut]), Parsed::Partial);
            proptest::prop_assert!(matches!(parse(s), Parsed::Done(_, n) if n == s.len()));
        }
    }
}

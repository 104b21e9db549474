//! The real agent CLIs and a scripted model server for them, on 127.0.0.1
//! port 0: enough of the Anthropic Messages API, streamed as server-sent
//! events, for Claude Code to run a real tool call, and of the OpenAI
//! Responses API for Codex to answer. What it answers is the test's script:
//! do the work (a Bash command that edits the prompt file, the last launch
//! adding the completion marker), a long-running tool, say given texts, an
//! HTTP error status, or never.

#![allow(dead_code)]

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    /// Each launch edits `prompt` with a Bash call; launch `complete_on`
    /// appends the completion marker instead.
    Work { prompt: String, complete_on: usize },
    /// Every launch runs this Bash command (e.g. a long `sleep`).
    Tool(String),
    /// Every request gets this HTTP status and an Anthropic error body.
    Status(u16),
    /// Requests are read and never answered.
    Hang,
    /// Responses API: launch N says text N (the last repeats).
    Say(Vec<String>),
}

/// The pinned real CLI `name` (claude, codex), installed by
/// tests/agent-cli.sh when missing. None, said loudly, where it cannot be
/// installed; under CI=true that is a failure.
pub fn real_cli(name: &str) -> Option<std::path::PathBuf> {
    use std::sync::OnceLock;
    static FOUND: OnceLock<
        Mutex<std::collections::HashMap<String, Result<std::path::PathBuf, String>>>,
    > = OnceLock::new();
    let map = FOUND.get_or_init(Default::default);
    let mut map = map.lock().unwrap();
    let found = map.entry(name.to_string()).or_insert_with(|| {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agent-cli.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(name)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {name} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(std::path::PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim(),
        ))
    });
    match found {
        Ok(p) => Some(p.clone()),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("the real {name} CLI is not installed and cannot be: {e}")
        }
        Err(e) => {
            eprintln!(
                "\n!!!!!!!! NOT TESTED against the real {name} CLI: {e}\n!!!!!!!! (under CI=true this is a failure)\n"
            );
            None
        }
    }
}

#[derive(Default)]
struct Seen {
    posts: usize,
    /// Claude Code sends one session id per launch.
    sessions: BTreeSet<String>,
    /// First turns (launches) that were offered the Bash tool.
    launches: usize,
    /// Responses API requests.
    responses: usize,
}

pub struct ModelServer {
    pub url: String,
    script: Arc<Mutex<Script>>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
}

impl ModelServer {
    pub fn start(script: Script) -> ModelServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let script = Arc::new(Mutex::new(script));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, n, st) = (script.clone(), seen.clone(), stop.clone());
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, n, st) = (s.clone(), n.clone(), st.clone());
                        std::thread::spawn(move || serve(conn, &s, &n, &st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ModelServer {
            url,
            script,
            seen,
            stop,
        }
    }

    pub fn set(&self, script: Script) {
        *self.script.lock().unwrap() = script;
    }

    pub fn posts(&self) -> usize {
        self.seen.lock().unwrap().posts
    }

    pub fn sessions(&self) -> usize {
        self.seen.lock().unwrap().sessions.len()
    }

    pub fn launches(&self) -> usize {
        self.seen.lock().unwrap().launches
    }

    pub fn responses(&self) -> usize {
        self.seen.lock().unwrap().responses
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(conn: TcpStream, script: &Mutex<Script>, seen: &Mutex<Seen>, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(conn);
    // One connection carries many requests (keep-alive).
    while !stop.load(Ordering::SeqCst) {
        let Some((method, path, headers, body)) = read_request(&mut r, stop) else {
            return;
        };
        if method == "HEAD" || method == "GET" {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            continue;
        }
        if path.starts_with("/v1/responses") {
            let n = {
                let mut s = seen.lock().unwrap();
                s.posts += 1;
                s.responses += 1;
                s.responses
            };
            let reply = match script.lock().unwrap().clone() {
                Script::Say(texts) if !texts.is_empty() => {
                    responses_sse(&texts[(n - 1).min(texts.len() - 1)])
                }
                Script::Status(code) => error_reply(code),
                _ => responses_sse("Nothing to do."),
            };
            if w.write_all(&reply).is_err() {
                return;
            }
            continue;
        }
        if !path.starts_with("/v1/messages") || path.contains("count_tokens") {
            let _ = w.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            );
            continue;
        }
        let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let first_turn = is_first_turn(&req);
        let bash = offers_bash(&req);
        let launch = {
            let mut s = seen.lock().unwrap();
            s.posts += 1;
            if let Some(id) = headers.get("x-claude-code-session-id") {
                s.sessions.insert(id.clone());
            }
            if first_turn && bash {
                s.launches += 1;
            }
            s.launches
        };
        let current = script.lock().unwrap().clone();
        let model = req["model"].as_str().unwrap_or("claude-test").to_string();
        let reply = match current {
            Script::Hang => {
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return;
            }
            Script::Status(code) => error_reply(code),
            _ if !bash || !first_turn => sse(&model, None, "Done."),
            Script::Work {
                prompt,
                complete_on,
            } => {
                let command = if launch >= complete_on {
                    format!("printf '\\nTASK_COMPLETE\\n' >> '{prompt}'")
                } else {
                    format!("echo 'progress {launch}' >> '{prompt}'")
                };
                sse(&model, Some(&command), "")
            }
            Script::Tool(command) => sse(&model, Some(&command), ""),
            Script::Say(_) => sse(&model, None, "Done."),
        };
        if w.write_all(&reply).is_err() {
            return;
        }
    }
}

type Request = (
    String,
    String,
    std::collections::HashMap<String, String>,
    Vec<u8>,
);

fn read_request(r: &mut BufReader<TcpStream>, stop: &AtomicBool) -> Option<Request> {
    let mut line = String::new();
    loop {
        match r.read_line(&mut line) {
            Ok(0) => return None,
            Ok(_) if line.trim().is_empty() => line.clear(),
            Ok(_) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::SeqCst) {
                    return None;
                }
            }
            Err(_) => return None,
        }
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(_) => return None,
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.resize(n, 0);
        read_full(r, &mut body)?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            while r.read_line(&mut size).ok()? == 0 {}
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; n + 2];
            read_full(r, &mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    Some((method, path, headers, body))
}

fn read_full(r: &mut BufReader<TcpStream>, buf: &mut [u8]) -> Option<()> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    Some(())
}

/// The conversation's last message is the user's instruction, not a tool result.
fn is_first_turn(req: &Value) -> bool {
    let Some(last) = req["messages"].as_array().and_then(|m| m.last()) else {
        return false;
    };
    match &last["content"] {
        Value::Array(parts) => !parts.iter().any(|p| p["type"] == "tool_result"),
        _ => true,
    }
}

fn offers_bash(req: &Value) -> bool {
    req["tools"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["name"] == "Bash"))
}

fn event(out: &mut String, kind: &str, data: Value) {
    out.push_str(&format!("event: {kind}\ndata: {data}\n\n"));
}

/// A streamed assistant message: a Bash tool call, or text.
fn sse(model: &str, bash: Option<&str>, text: &str) -> Vec<u8> {
    let mut s = String::new();
    event(
        &mut s,
        "message_start",
        json!({"type":"message_start","message":{"id":"msg_scripted","type":"message","role":"assistant","model":model,"content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":1}}}),
    );
    let stop_reason = match bash {
        Some(command) => {
            event(
                &mut s,
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_scripted","name":"Bash","input":{}}}),
            );
            let input = json!({"command": command, "description": "scripted edit"}).to_string();
            event(
                &mut s,
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":input}}),
            );
            "tool_use"
        }
        None => {
            event(
                &mut s,
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            );
            event(
                &mut s,
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":text}}),
            );
            "end_turn"
        }
    };
    event(
        &mut s,
        "content_block_stop",
        json!({"type":"content_block_stop","index":0}),
    );
    event(
        &mut s,
        "message_delta",
        json!({"type":"message_delta","delta":{"stop_reason":stop_reason,"stop_sequence":null},"usage":{"output_tokens":7}}),
    );
    event(&mut s, "message_stop", json!({"type":"message_stop"}));
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ncontent-length: {}\r\n\r\n",
        s.len()
    )
    .into_bytes();
    out.extend_from_slice(s.as_bytes());
    out
}

/// A streamed Responses API answer: one assistant message.
fn responses_sse(text: &str) -> Vec<u8> {
    let mut s = String::new();
    let mut ev = |d: Value| {
        let kind = d["type"].as_str().unwrap_or_default().to_string();
        s.push_str(&format!("event: {kind}\ndata: {d}\n\n"));
    };
    ev(json!({"type":"response.created","response":{"id":"resp_scripted"}}));
    ev(
        json!({"type":"response.output_item.done","output_index":0,"item":{"type":"message","role":"assistant","id":"msg_scripted","content":[{"type":"output_text","text":text}]}}),
    );
    ev(
        json!({"type":"response.completed","response":{"id":"resp_scripted","usage":{"input_tokens":10,"input_tokens_details":null,"output_tokens":5,"output_tokens_details":null,"total_tokens":15}}}),
    );
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n",
        s.len()
    )
    .into_bytes();
    out.extend_from_slice(s.as_bytes());
    out
}

fn error_reply(code: u16) -> Vec<u8> {
    let (kind, reason) = match code {
        401 => ("authentication_error", "Unauthorized"),
        429 => ("rate_limit_error", "Too Many Requests"),
        529 => ("overloaded_error", "Overloaded"),
        _ => ("api_error", "Error"),
    };
    let body = json!({"type":"error","error":{"type":kind,"message":format!("scripted {code}")}})
        .to_string();
    format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

//! Accounting of one run's output: bytes read, kept and dropped past
//! max_output_size (kept bytes go raw to the transcript), and the text the
//! loop reasons about, read as ANSI-stripped lines: the output completion
//! marker (a whole line, never in the echo of our own instruction), the
//! lines that stop an attempt at once (a device-login prompt), the last
//! lines of each stream for classification and messages, and Claude's
//! machine-readable result.

use super::attempt::{AgentRequest, Usage};
use super::classify::{Class, Said};
use super::profile::OutputMode;
use super::profile::Report;
use super::text::{Lines, MAX_LINE};
use super::transcript::Transcript;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Lines of each stream kept for classification and messages.
const LAST_LINES: usize = 16;
/// Claude's result line carries the whole final message.
const JSON_LINE: usize = 1024 * 1024;

/// Follows an echo of the instruction through the output: a line equal to
/// the instruction's first line starts one, each next line equal to the
/// instruction's next line continues it.
struct Echo {
    lines: Arc<Vec<String>>,
    pos: Option<usize>,
}

impl Echo {
    fn is_echo(&mut self, line: &str) -> bool {
        if let Some(p) = self.pos {
            if self.lines.get(p).is_some_and(|l| l == line) {
                self.pos = Some(p + 1);
                return true;
            }
            self.pos = None;
        }
        if self
            .lines
            .first()
            .is_some_and(|first| line == first || line.ends_with(first.as_str()))
        {
            self.pos = Some(1);
            return true;
        }
        false
    }
}

struct Stream {
    /// Lines as they arrive, only where something must see each one (the
    /// marker, stop rules, Claude's result): most runs need none, and pay
    /// for nothing but the tail below.
    lines: Option<Lines>,
    /// The last raw bytes, read as lines only when the run is over.
    tail: Vec<u8>,
    /// Bytes ever cut from the front of `tail`.
    cut: bool,
    /// Claude's result text, for stdout in stream-json mode.
    result_lines: VecDeque<String>,
    /// Length of the unfinished line when stop rules last saw it.
    checked: usize,
    echo: Echo,
}

/// Raw bytes kept per stream for the last lines (16 lines of 2 KiB at most
/// are read from them).
const TAIL_BYTES: usize = 8192;

pub struct Output {
    pub bytes_read: u64,
    kept: u64,
    pub bytes_dropped: u64,
    marker: Option<String>,
    pub marker_seen: bool,
    streams: [Stream; 2],
    mode: OutputMode,
    stop_rules: bool,
    pub said: Said,
    /// The last lines of stdout and of stderr, once finished.
    last: [Vec<String>; 2],
    pub usage: Usage,
    reports: &'static [Report],
    /// The previous line of that stream was Codex's `tokens used` (the
    /// other stream's lines may come between: they are read as they come).
    tokens_next: [bool; 2],
}

impl Output {
    pub fn new(req: &AgentRequest) -> Output {
        let marker = req
            .output_marker
            .as_ref()
            .map(|m| String::from_utf8_lossy(m).trim().to_string())
            .filter(|m| !m.is_empty());
        let stop_rules = req.rules.list.iter().any(|r| r.stop);
        let json = req.output_mode == OutputMode::ClaudeStreamJson;
        let has_marker = marker.is_some();
        // Kiro's credits and Codex's tokens are lines of stderr.
        let counts = req
            .reports
            .iter()
            .any(|r| matches!(r, Report::Credits | Report::Tokens));
        let stream = |i: usize| {
            let json_here = json && i == 0;
            Stream {
                lines: (has_marker || stop_rules || json_here || (counts && i == 1))
                    .then(|| Lines::with_cap(if json_here { JSON_LINE } else { MAX_LINE })),
                tail: Vec::new(),
                cut: false,
                result_lines: VecDeque::new(),
                checked: 0,
                echo: Echo {
                    lines: req.echo.clone(),
                    pos: None,
                },
            }
        };
        Output {
            bytes_read: 0,
            kept: 0,
            bytes_dropped: 0,
            marker,
            marker_seen: false,
            streams: [stream(0), stream(1)],
            mode: req.output_mode,
            stop_rules,
            said: Said::default(),
            last: [Vec::new(), Vec::new()],
            usage: Usage::default(),
            reports: req.reports,
            tokens_next: [false; 2],
        }
    }

    /// A chunk read from stream 0 (stdout) or 1 (stderr): kept within the
    /// cap (to the transcript, and to our stderr when streaming), remembered
    /// for the last lines, and read line by line where that is needed.
    pub fn take(
        &mut self,
        stream: usize,
        chunk: &[u8],
        req: &AgentRequest,
        transcript: &mut Transcript,
    ) {
        self.bytes_read += chunk.len() as u64;
        req.progress
            .bytes_read
            .store(self.bytes_read, Ordering::Relaxed);
        let room = req.max_output.saturating_sub(self.kept);
        let keep = &chunk[..(chunk.len() as u64).min(room) as usize];
        self.kept += keep.len() as u64;
        self.bytes_dropped += (chunk.len() - keep.len()) as u64;
        if !keep.is_empty() {
            transcript.write(keep);
            if req.stream {
                let mut e = io::stderr().lock();
                let _ = e.write_all(keep);
                let _ = e.flush();
            }
        }
        let s = &mut self.streams[stream];
        if chunk.len() >= TAIL_BYTES {
            s.tail.clear();
            s.tail.extend_from_slice(&chunk[chunk.len() - TAIL_BYTES..]);
            s.cut = true;
        } else {
            s.tail.extend_from_slice(chunk);
            // Amortised: cut only when twice the size.
            if s.tail.len() > 2 * TAIL_BYTES {
                let over = s.tail.len() - TAIL_BYTES;
                s.tail.drain(..over);
                s.cut = true;
            }
        }
        if let Some(mut lines) = self.streams[stream].lines.take() {
            lines.feed(chunk, |l| self.line(stream, l, req));
            // A prompt waits without ending its line: stop rules see it now
            // (once per change: a capped endless line is not looked at again).
            let pending = lines.pending();
            let grown = std::mem::replace(&mut self.streams[stream].checked, pending) != pending;
            if self.stop_rules
                && grown
                && self.said.stopped_by.is_none()
                && let Some(l) = lines.partial()
                && let Some((class, _)) = req.rules.stop_on(&l)
            {
                self.said.stopped_by = Some((class, l));
            }
            self.streams[stream].lines = Some(lines);
        }
    }

    /// The streams are closed: their last lines without a newline count too,
    /// and the last lines of each are read for classification.
    pub fn finish(&mut self, req: &AgentRequest) {
        for stream in 0..2 {
            if let Some(mut lines) = self.streams[stream].lines.take() {
                lines.finish(|l| self.line(stream, l, req));
            }
            let s = &self.streams[stream];
            if self.mode == OutputMode::ClaudeStreamJson && stream == 0 {
                self.last[0] = s.result_lines.iter().cloned().collect();
                continue;
            }
            let mut raw: &[u8] = &s.tail;
            if s.cut {
                // The first line is a piece of one: skip it.
                let at = raw
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(raw.len(), |i| i + 1);
                raw = &raw[at..];
            }
            let mut last: VecDeque<String> = VecDeque::new();
            let mut l = Lines::default();
            // The echo of our instruction is not what the CLI said.
            let mut echo = Echo {
                lines: req.echo.clone(),
                pos: None,
            };
            let mut push = |t: &str| {
                if echo.is_echo(t) {
                    return;
                }
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(t.to_string());
            };
            l.feed(raw, &mut push);
            l.finish(&mut push);
            self.last[stream] = last.into();
        }
        self.said.lines = self.last.concat();
    }

    fn line(&mut self, stream: usize, line: &str, req: &AgentRequest) {
        if stream == 0 && self.mode == OutputMode::ClaudeStreamJson {
            // The conversation itself is not the CLI speaking; only the
            // result is (its text may hold the marker or an API error).
            if line.starts_with('{') {
                if let Some(text) = self.claude_result(line) {
                    for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                        let l: String = l.chars().take(MAX_LINE).collect();
                        self.content(stream, &l, req);
                        let r = &mut self.streams[0].result_lines;
                        if r.len() == LAST_LINES {
                            r.pop_front();
                        }
                        r.push_back(l);
                    }
                }
                return;
            }
            let r = &mut self.streams[0].result_lines;
            if r.len() == LAST_LINES {
                r.pop_front();
            }
            r.push_back(line.to_string());
        }
        self.content(stream, line, req);
    }

    /// A line of what the agent said: the marker, unless it is our echo;
    /// a rule that stops the attempt.
    fn content(&mut self, stream: usize, line: &str, req: &AgentRequest) {
        if !self.reports.is_empty() {
            self.count(stream, line);
        }
        if self.marker.is_some() {
            let echo = self.streams[stream].echo.is_echo(line);
            if !echo && !self.marker_seen && self.marker.as_deref() == Some(line) {
                self.marker_seen = true;
            }
            if echo {
                return;
            }
        }
        if self.stop_rules
            && self.said.stopped_by.is_none()
            && let Some((class, _)) = req.rules.stop_on(line)
        {
            self.said.stopped_by = Some((class, line.to_string()));
        }
    }

    /// Kiro's `▸ Credits: 0.25 • Time: 1s`; Codex's `tokens used` and the
    /// number on the next line.
    fn count(&mut self, stream: usize, line: &str) {
        let t = super::text::rule_text(line);
        if self.tokens_next[stream] {
            self.tokens_next[stream] = false;
            if let Ok(n) = t.replace(',', "").trim().parse::<u64>() {
                self.usage.tokens += n;
                return;
            }
        }
        if self.reports.contains(&Report::Credits)
            && let Some(rest) = t.strip_prefix("Credits:")
            && let Some(n) = rest.split_whitespace().next()
            && let Ok(v) = n.parse::<f64>()
            && v.is_finite()
            && v >= 0.0
        {
            self.usage.credits += v;
        }
        if self.reports.contains(&Report::Tokens) && t == "tokens used" {
            self.tokens_next[stream] = true;
        }
    }

    /// The text of Claude's `result` line, noting its error fields.
    fn claude_result(&mut self, line: &str) -> Option<String> {
        if !line.contains("\"result\"") {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v.get("type")?.as_str()? != "result" {
            return None;
        }
        if v.get("is_error").and_then(|e| e.as_bool()) == Some(true) {
            self.said.reported_error = true;
        }
        if let Some(c) = v.get("total_cost_usd").and_then(|c| c.as_f64())
            && c.is_finite()
            && c >= 0.0
        {
            self.usage.cost_usd += c;
        }
        if let Some(u) = v.get("usage") {
            let n = |k: &str| u.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
            self.usage.tokens += n("input_tokens")
                + n("cache_creation_input_tokens")
                + n("cache_read_input_tokens")
                + n("output_tokens");
        }
        self.said.api_status = v
            .get("api_error_status")
            .and_then(|s| s.as_u64())
            .and_then(|s| u16::try_from(s).ok());
        Some(
            v.get("result")
                .and_then(|r| r.as_str())
                .unwrap_or_default()
                .to_string(),
        )
    }

    /// A rule asked to stop the attempt now.
    pub fn stop_due(&self) -> Option<Class> {
        self.said.stopped_by.as_ref().map(|(c, _)| *c)
    }

    /// The last lines of stderr, or of stdout if stderr was silent (after
    /// `finish`).
    pub fn tail(&self) -> Vec<u8> {
        let pick = if self.last[1].is_empty() {
            &self.last[0]
        } else {
            &self.last[1]
        };
        let mut t = pick.join("\n");
        if t.len() > 2048 {
            let cut = t.len() - 2048;
            let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(0);
            t.drain(..cut);
        }
        t.into_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::classify::{RuleSpec, Rules};
    use crate::agent::{Cancel, Progress};
    use proptest::prelude::*;
    use std::time::Duration;

    pub(crate) fn request(mode: OutputMode, marker: Option<&str>, echo: &[&str]) -> AgentRequest {
        let spec = RuleSpec {
            pattern: r"^Logging in\.\.\.".into(),
            class: "auth".into(),
            stop: true,
        };
        AgentRequest {
            task_id: "t".into(),
            iteration: 1,
            attempt: 1,
            program: "x".into(),
            args: vec![],
            shown: String::new(),
            env: vec![],
            workdir: ".".into(),
            timeout: Duration::from_secs(1),
            timeout_is_runtime: false,
            idle_timeout: None,
            kill_grace: Duration::from_secs(1),
            poll_interval: Duration::from_millis(10),
            buffer_size: 64,
            max_output: 1024,
            max_memory_mb: 0,
            output_marker: marker.map(|m| m.as_bytes().to_vec()),
            echo: Arc::new(echo.iter().map(|s| s.to_string()).collect()),
            rules: Arc::new(Rules::compile([(&spec, "t".to_string())]).unwrap()),
            output_mode: mode,
            reports: &[Report::Credits, Report::CostAndTokens, Report::Tokens],
            watch: None,
            transcript: None,
            keep_transcripts: 0,
            stream: false,
            cancel: Arc::new(Cancel::default()),
            progress: Arc::new(Progress::default()),
        }
    }

    fn feed(req: &AgentRequest, chunks: &[(usize, &[u8])]) -> Output {
        let mut t = Transcript::open(req, Vec::new());
        let mut o = Output::new(req);
        for (s, c) in chunks {
            o.take(*s, c, req, &mut t);
        }
        o.finish(req);
        o
    }

    #[test]
    fn the_marker_counts_as_a_whole_line_outside_the_echo() {
        let echo = ["Do the task.", "DONE", "Print DONE when finished."];
        let req = request(OutputMode::Text, Some("DONE"), &echo);
        let echoed = b"user\nDo the task.\nDONE\nPrint DONE when finished.\ncodex\n";
        assert!(!feed(&req, &[(0, echoed)]).marker_seen);
        assert!(!feed(&req, &[(0, b"not DONE yet\nDONE.\n")]).marker_seen);
        assert!(feed(&req, &[(0, echoed), (0, b"\x1b[32mDONE\x1b[0m\n")]).marker_seen);
        // Split across reads, without a final newline.
        assert!(feed(&req, &[(0, b"work\nDO"), (0, b"NE")]).marker_seen);
    }

    #[test]
    fn credits_cost_and_tokens_are_read_and_summed() {
        let req = request(OutputMode::Text, None, &[]);
        let o = feed(
            &req,
            &[
                (
                    1,
                    "\x1b[38;5;8m▸ Credits: 0.25 • Time: 1s\x1b[0m\n".as_bytes(),
                ),
                (
                    1,
                    "▸ Credits: 0.5 • Time: 3s\ntokens used\n1,234\n".as_bytes(),
                ),
                (0, "I spent Credits: 99 on nothing\n".as_bytes()),
            ],
        );
        assert_eq!(o.usage.credits, 0.75);
        assert_eq!(o.usage.tokens, 1234);
        let req = request(OutputMode::ClaudeStreamJson, None, &[]);
        let line = br#"{"type":"result","is_error":false,"result":"ok","total_cost_usd":0.0035,"usage":{"input_tokens":20,"cache_creation_input_tokens":5,"cache_read_input_tokens":0,"output_tokens":10}}"#;
        let o = feed(&req, &[(0, line)]);
        assert_eq!(o.usage.cost_usd, 0.0035);
        assert_eq!(o.usage.tokens, 35);
    }

    #[test]
    fn codex_tokens_are_read_when_the_other_stream_comes_between() {
        // Codex prints `tokens used` and the number on one stream and its
        // answer on the other; reads interleave them in any order.
        let req = request(OutputMode::Text, None, &[]);
        let o = feed(
            &req,
            &[
                (
                    1,
                    b"tokens used
"
                    .as_slice(),
                ),
                (
                    0,
                    b"Not finished yet.
"
                    .as_slice(),
                ),
                (
                    1,
                    b"15
"
                    .as_slice(),
                ),
            ],
        );
        assert_eq!(o.usage.tokens, 15);
    }

    #[test]
    fn rules_do_not_read_the_echo_of_the_instruction() {
        let echo = ["Fix the handling of:", "401 Unauthorized", "in src/auth.rs"];
        let req = request(OutputMode::Text, None, &echo);
        let o = feed(
            &req,
            &[(
                1,
                b"user\nFix the handling of:\n401 Unauthorized\nin src/auth.rs\ncodex\nFixed.\n",
            )],
        );
        assert_eq!(o.said.lines, vec!["user", "codex", "Fixed."]);
    }

    #[test]
    fn a_waiting_prompt_stops_the_attempt_before_its_line_ends() {
        let req = request(OutputMode::Text, None, &[]);
        let o = feed(
            &req,
            &[(0, b"Code: AB-CD\n\x1b[?25l\xe2\xa0\x8b Logging in...")],
        );
        assert_eq!(o.stop_due(), Some(crate::agent::Class::Auth));
    }

    #[test]
    fn claude_counts_its_result_not_the_conversation() {
        let req = request(OutputMode::ClaudeStreamJson, Some("DONE"), &[]);
        let convo = br#"{"type":"assistant","message":{"content":[{"type":"text","text":"DONE"}]}}
{"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"API Error: 529 overloaded"}
"#;
        let o = feed(&req, &[(0, convo)]);
        assert!(!o.marker_seen, "the marker was only in the conversation");
        assert!(o.said.reported_error);
        assert_eq!(o.said.api_status, Some(529));
        assert_eq!(o.said.lines, vec!["API Error: 529 overloaded".to_string()]);
        let done = br#"{"type":"result","is_error":false,"result":"All finished.\nDONE"}"#;
        assert!(feed(&req, &[(0, done)]).marker_seen);
    }

    proptest! {
        #[test]
        fn any_bytes_in_any_reads_never_panic(
            chunks in proptest::collection::vec((0usize..2, proptest::collection::vec(any::<u8>(), 0..300)), 0..20),
            json in any::<bool>(),
        ) {
            let mode = if json { OutputMode::ClaudeStreamJson } else { OutputMode::Text };
            let req = request(mode, Some("DONE"), &["x"]);
            let c: Vec<(usize, &[u8])> = chunks.iter().map(|(s, b)| (*s, b.as_slice())).collect();
            let o = feed(&req, &c);
            let total: usize = chunks.iter().map(|(_, b)| b.len()).sum();
            prop_assert_eq!(o.bytes_read as usize, total);
            prop_assert!(o.tail().len() <= 2048 + 4);
            prop_assert!(o.said.lines.len() <= 2 * LAST_LINES);
        }
    }
}

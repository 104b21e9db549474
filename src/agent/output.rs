//! Accounting of one run's output: bytes read, kept and dropped past
//! max_output_size (kept bytes go raw to the transcript), and the text the
//! loop reasons about, read as ANSI-stripped lines: the output completion
//! marker (a whole line, never in the echo of our own instruction), the
//! lines that stop an attempt at once (a device-login prompt), the last
//! lines of each stream for classification and messages, and Claude's
//! machine-readable result.

use super::attempt::AgentRequest;
use super::classify::{Class, Said};
use super::profile::OutputMode;
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
    lines: Lines,
    last: VecDeque<String>,
    echo: Echo,
}

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
}

impl Output {
    pub fn new(req: &AgentRequest) -> Output {
        let stream = |cap| Stream {
            lines: Lines::with_cap(cap),
            last: VecDeque::new(),
            echo: Echo {
                lines: req.echo.clone(),
                pos: None,
            },
        };
        let json = req.output_mode == OutputMode::ClaudeStreamJson;
        Output {
            bytes_read: 0,
            kept: 0,
            bytes_dropped: 0,
            marker: req
                .output_marker
                .as_ref()
                .map(|m| String::from_utf8_lossy(m).trim().to_string())
                .filter(|m| !m.is_empty()),
            marker_seen: false,
            streams: [
                stream(if json { JSON_LINE } else { MAX_LINE }),
                stream(MAX_LINE),
            ],
            mode: req.output_mode,
            stop_rules: req.rules.list.iter().any(|r| r.stop),
            said: Said::default(),
        }
    }

    /// A chunk read from stream 0 (stdout) or 1 (stderr): kept within the
    /// cap (to the transcript, and to our stderr when streaming), read as
    /// lines.
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
        let mut got = vec![];
        self.streams[stream]
            .lines
            .feed(chunk, |l| got.push(l.to_string()));
        for l in got {
            self.line(stream, l, req);
        }
        // A prompt waits without ending its line: stop rules see it now.
        if self.stop_rules
            && self.said.stopped_by.is_none()
            && let Some(l) = self.streams[stream].lines.partial()
            && let Some((class, _)) = req.rules.stop_on(&l)
        {
            self.said.stopped_by = Some((class, l));
        }
    }

    /// The streams are closed: their last lines without a newline count too.
    pub fn finish(&mut self, req: &AgentRequest) {
        for stream in 0..2 {
            let mut got = vec![];
            self.streams[stream]
                .lines
                .finish(|l| got.push(l.to_string()));
            for l in got {
                self.line(stream, l, req);
            }
        }
        let mut lines: Vec<String> = vec![];
        for s in &self.streams {
            lines.extend(s.last.iter().cloned());
        }
        self.said.lines = lines;
    }

    fn line(&mut self, stream: usize, line: String, req: &AgentRequest) {
        if stream == 0 && self.mode == OutputMode::ClaudeStreamJson && line.starts_with('{') {
            // The conversation itself is not the CLI speaking; only the
            // result is (its text may hold the marker or an API error).
            if let Some(text) = self.claude_result(&line) {
                for l in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    self.content(stream, l.chars().take(MAX_LINE).collect(), req);
                }
            }
            return;
        }
        self.content(stream, line, req);
    }

    fn content(&mut self, stream: usize, line: String, req: &AgentRequest) {
        let s = &mut self.streams[stream];
        let echo = s.echo.is_echo(&line);
        if !echo && !self.marker_seen && self.marker.as_deref() == Some(line.as_str()) {
            self.marker_seen = true;
        }
        if self.stop_rules
            && !echo
            && self.said.stopped_by.is_none()
            && let Some((class, _)) = req.rules.stop_on(&line)
        {
            self.said.stopped_by = Some((class, line.clone()));
        }
        if !echo {
            if s.last.len() == LAST_LINES {
                s.last.pop_front();
            }
            s.last.push_back(line);
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

    /// The last lines of stderr, or of stdout if stderr was silent.
    pub fn tail(&self) -> Vec<u8> {
        let pick = if self.streams[1].last.is_empty() {
            &self.streams[0].last
        } else {
            &self.streams[1].last
        };
        let mut t = pick.iter().cloned().collect::<Vec<_>>().join("\n");
        if t.len() > 2048 {
            let cut = t.len() - 2048;
            let cut = (cut..t.len()).find(|&i| t.is_char_boundary(i)).unwrap_or(0);
            t.drain(..cut);
        }
        t.into_bytes()
    }
}

//! The iteration's transcript file, written as output arrives: buffered
//! while the agent floods, flushed whenever its pipes run dry, so `tail -f`
//! and `ralph-qchat logs --follow` see everything the agent has paused
//! after. A write error stops the transcript, never the run.
//!
//! Each attempt is a header (two `=== ` lines), the output as recorded, a
//! footer line for people and a `=== record {json}` line for `logs`: the
//! record gives the byte lengths of header, output and footer, so a reader
//! finds the attempt's bounds from the end of the file whatever the agent
//! printed (store/transcripts.rs). An attempt cut off by a kill has no
//! record; its bytes up to the last write are there.

use super::attempt::{AgentOutcome, AgentRequest};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;

/// Output gathered before a write: a flood is written in pieces this big.
const BUFFER: usize = 64 * 1024;

/// How an attempt ended, and where its parts are: the `=== record` line
/// that ends each attempt (read back by store/transcripts.rs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub iteration: u64,
    pub attempt: u32,
    pub started: String,
    pub command: String,
    pub duration: f64,
    pub ending: String,
    pub exit: Option<i32>,
    pub signal: Option<i32>,
    pub class: String,
    pub decided_by: Option<String>,
    pub bytes_read: u64,
    pub bytes_dropped: u64,
    pub header_bytes: u64,
    pub output_bytes: u64,
    pub footer_bytes: u64,
}

impl Record {
    pub fn line(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        format!("=== record {json}\n")
    }
}

pub struct Transcript {
    file: Option<File>,
    /// Written out when full and whenever the pipes run dry. The caller's,
    /// kept from one attempt to the next: a new 64 KiB buffer per attempt
    /// made malloc consolidate its free lists every time (1% of the
    /// daemon's CPU at high rates).
    buf: Vec<u8>,
    task: String,
    iteration: u64,
    attempt: u32,
    started: String,
    command: String,
    header_bytes: u64,
    output_bytes: u64,
}

impl Transcript {
    /// Opens (appends to) the request's transcript and writes the header;
    /// a request without one gets a transcript that writes nothing. `buf`:
    /// the buffer to gather output in (an earlier one's, `into_buffer`).
    pub fn open(req: &AgentRequest, mut buf: Vec<u8>) -> Transcript {
        let started = crate::sys::time::now_rfc3339();
        buf.clear();
        let mut t = Transcript {
            file: None,
            buf,
            task: req.task_id.clone(),
            iteration: req.iteration,
            attempt: req.attempt,
            started,
            command: req.shown.clone(),
            header_bytes: 0,
            output_bytes: 0,
        };
        let Some(path) = &req.transcript else {
            return t;
        };
        recycle(path, req);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        match file {
            Ok(f) => {
                t.file = Some(f);
                t.buf.reserve(BUFFER);
            }
            Err(e) => {
                log::warn!(task = req.task_id.as_str(); "cannot write transcript {}: {e}", path.display());
            }
        }
        let header = format!(
            "=== ralph-qchat iteration {} attempt {} started {}\n=== argv: {}\n",
            req.iteration,
            req.attempt,
            t.started,
            req.shown.replace('\n', " ")
        );
        t.header_bytes = header.len() as u64;
        t.put(header.as_bytes());
        t
    }

    /// Output as recorded.
    pub fn write(&mut self, bytes: &[u8]) {
        self.output_bytes += bytes.len() as u64;
        self.put(bytes);
    }

    fn put(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > BUFFER {
            self.flush();
        }
        match &mut self.file {
            // None asked for, or a write failed.
            None => {}
            Some(f) if bytes.len() >= BUFFER => {
                if let Err(e) = f.write_all(bytes) {
                    self.lost(e);
                }
            }
            Some(_) => self.buf.extend_from_slice(bytes),
        }
    }

    /// A write failed (a full disk): said once, the rest not attempted.
    fn lost(&mut self, e: std::io::Error) {
        self.file = None;
        log::warn!(task = self.task.as_str(), iteration = self.iteration; "cannot write the transcript any more: {e}; the rest of this attempt's output is not recorded");
    }

    pub fn flush(&mut self) {
        if let Some(f) = &mut self.file
            && !self.buf.is_empty()
            && let Err(e) = f.write_all(&self.buf)
        {
            self.lost(e);
        }
        self.buf.clear();
    }

    /// Everything written, the file closed: the buffer, for the next one.
    pub fn into_buffer(mut self) -> Vec<u8> {
        self.flush();
        self.file = None;
        std::mem::take(&mut self.buf)
    }

    pub fn footer(&mut self, o: &AgentOutcome) {
        let line = format!(
            "\n=== end: {} ({}{}) after {:.3} s; {} bytes of output{}{}\n",
            o.ending.describe(),
            o.class.as_str(),
            o.decided_by
                .as_ref()
                .map(|l| format!(": {l}"))
                .unwrap_or_default(),
            o.duration.as_secs_f64(),
            o.bytes_read,
            if o.truncated() {
                format!(
                    ", truncated: {} bytes dropped (limits.max_output_size)",
                    o.bytes_dropped
                )
            } else {
                String::new()
            },
            used(&o.resources)
        )
        .replace('\r', " ");
        // One line: what the footer says may carry an agent's newline.
        let line = format!("\n{}\n", line.trim_matches('\n').replace('\n', " "));
        let (exit, signal) = match o.ending {
            super::attempt::Ending::Exited(c) => (Some(c), None),
            super::attempt::Ending::Signaled(s) => (None, Some(s)),
            _ => (None, None),
        };
        let record = Record {
            iteration: self.iteration,
            attempt: self.attempt,
            started: self.started.clone(),
            command: self.command.clone(),
            duration: o.duration.as_secs_f64(),
            ending: o.ending.describe(),
            exit,
            signal,
            class: o.class.as_str().to_string(),
            decided_by: o.decided_by.clone(),
            bytes_read: o.bytes_read,
            bytes_dropped: o.bytes_dropped,
            header_bytes: self.header_bytes,
            output_bytes: self.output_bytes,
            footer_bytes: line.len() as u64,
        };
        self.put(line.as_bytes());
        self.put(record.line().as_bytes());
        self.flush();
    }
}

impl Drop for Transcript {
    /// What is gathered still goes to the file (an attempt that ended
    /// without a footer: a panic on the way).
    fn drop(&mut self) {
        self.flush();
    }
}

/// A new iteration's file takes the inode of the transcript that falls out
/// of keep_transcripts with it (iteration N − keep), emptied first: a fast
/// loop then allocates and frees no inode per iteration (on ext4 that was
/// the largest cost left). Emptied before renamed, so a crash between the
/// two leaves an empty old transcript (pruned later), never old bytes under
/// a new name; never over an existing file (a retry appends to it: the old
/// one, out of keep_transcripts already, is then left empty for the
/// pruning).
///
/// Emptied through a descriptor of its own, closed at once: ext4 writes out
/// a file truncated to zero when the descriptor that truncated it is closed
/// (auto_da_alloc); closed while empty that costs nothing, while the
/// transcript written through it would have been written out at its close
/// (a block write per iteration, measured: 5% of the daemon's CPU).
fn recycle(path: &std::path::Path, req: &AgentRequest) {
    let keep = req.keep_transcripts as u64;
    let it = req.iteration;
    if keep == 0 || it <= keep || path.file_name() != Some(format!("{it:06}.log").as_ref()) {
        return;
    }
    let Some(dir) = path.parent() else {
        return;
    };
    let old = dir.join(format!("{:06}.log", it - keep));
    let emptied = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&old);
    if emptied.is_ok() {
        let _ = crate::sys::rename::noreplace(&old, path);
    }
}

/// "; used 1.250 s CPU, peak 245 MiB, at most 3 processes, 1 left running (killed)".
fn used(r: &super::contain::Resources) -> String {
    if r.is_empty() {
        return String::new();
    }
    let mut s = format!("; used {:.3} s CPU", r.cpu_seconds);
    if let Some(m) = r.peak_memory {
        s.push_str(&format!(", peak {} MiB", m.div_ceil(1024 * 1024)));
    }
    if let Some(p) = r.processes {
        s.push_str(&format!(", at most {p} processes"));
    }
    if r.oom_kills > 0 {
        s.push_str(&format!(", {} killed at the memory limit", r.oom_kills));
    }
    if r.killed > 0 {
        s.push_str(&format!(", {} left running (killed)", r.killed));
    }
    s
}

//! The iteration's transcript file, written as output arrives: buffered
//! while the agent floods, flushed whenever its pipes run dry, so `tail -f`
//! sees everything the agent has paused after. A write error stops the
//! transcript, never the run.

use super::attempt::{AgentOutcome, AgentRequest};
use std::fs::File;
use std::io::{BufWriter, Write};

pub struct Transcript {
    file: Option<BufWriter<File>>,
}

impl Transcript {
    /// Opens (appends to) the request's transcript and writes the header;
    /// a request without one gets a transcript that writes nothing.
    pub fn open(req: &AgentRequest) -> Transcript {
        let Some(path) = &req.transcript else {
            return Transcript { file: None };
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        let mut t = match file {
            Ok(f) => Transcript {
                file: Some(BufWriter::with_capacity(64 * 1024, f)),
            },
            Err(e) => {
                log::warn!(task = req.task_id.as_str(); "cannot write transcript {}: {e}", path.display());
                Transcript { file: None }
            }
        };
        let header = format!(
            "=== ralph-qchat iteration {} attempt {} started {}\n=== argv: {}\n",
            req.iteration,
            req.attempt,
            crate::sys::time::now_rfc3339(),
            req.shown
        );
        t.write(header.as_bytes());
        t
    }

    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(f) = &mut self.file
            && f.write_all(bytes).is_err()
        {
            self.file = None;
        }
    }

    pub fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            if f.flush().is_err() {
                self.file = None;
            }
        }
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
        );
        self.write(line.as_bytes());
        self.flush();
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

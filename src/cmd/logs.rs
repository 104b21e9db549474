//! `ralph-qchat logs ID`: a task's transcripts from the files alone, with or
//! without a daemon; `--follow` goes on as they are written (inotify) until
//! the task ends. Raw bytes as recorded, headers and footers included; the
//! `=== record` lines are for this reader (store/transcripts.rs) and are
//! left out, as an agent's own line starting with `=== record ` would be.

use crate::agent::text::Strip;
use crate::cli::LogsArgs;
use crate::exit::{self, Failure};
use crate::store::TaskStore;
use crate::store::transcripts::{self, Attempt};
use crate::sys::inotify::{CHANGES, Watch};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

const RECORD: &[u8] = b"=== record ";

pub fn logs(a: LogsArgs) -> Result<i32, Failure> {
    let state_dir = super::setup::reader_state_dir(&a.config, &a.state_dir)?;
    let store = TaskStore::new(&state_dir);
    if !crate::task::valid_id(&a.id) || !crate::store::spool::task_known(&state_dir, &a.id) {
        return Err(Failure::new(
            exit::NO_INPUT,
            format!(
                "no task {:?} in {} (ralph-qchat status lists the tasks there)",
                a.id,
                state_dir.display()
            ),
        ));
    }
    let dir = store.transcript_dir(&a.id);
    let kept = transcripts::files(&dir).map_err(|e| io_failure(&dir, e))?;
    let first = match (a.iteration, a.last) {
        (Some(n), _) => {
            let kept_now = kept.iter().any(|(i, _)| *i == n);
            // Following an iteration still to come is waiting for it.
            let to_come = a.follow && kept.last().is_none_or(|l| l.0 < n);
            if !(kept_now || to_come) {
                let range = match (kept.first(), kept.last()) {
                    (Some(f), Some(l)) => format!("kept: {} to {}", f.0, l.0),
                    _ => "none is kept yet".into(),
                };
                return Err(Failure::new(
                    exit::NO_INPUT,
                    format!(
                        "iteration {n} of task {} has no transcript ({range}; orchestrator.keep_transcripts)",
                        a.id
                    ),
                ));
            }
            n
        }
        (None, Some(k)) => kept.len().checked_sub(k).map_or(0, |i| kept[i].0),
        (None, None) => 0,
    };
    let last = a.iteration.unwrap_or(u64::MAX);
    let mut out = Out::new(&a);
    if !a.follow {
        for (i, path) in kept.iter().filter(|(i, _)| (first..=last).contains(i)) {
            let bytes = std::fs::read(path).map_err(|e| io_failure(path, e))?;
            out.whole(*i, &bytes)?;
        }
        if kept.is_empty() {
            eprintln!("ralph-qchat: task {} has no transcript yet", a.id);
        }
        return Ok(exit::OK);
    }
    follow(&store, &a.id, first, last, &mut out)
}

fn io_failure(path: &Path, e: std::io::Error) -> Failure {
    Failure::new(
        exit::NO_INPUT,
        format!("cannot read {}: {e}", path.display()),
    )
}

/// Streams iterations `first..=last` until the task has ended and every byte
/// of them is printed.
fn follow(
    store: &TaskStore,
    id: &str,
    first: u64,
    last: u64,
    out: &mut Out,
) -> Result<i32, Failure> {
    let watch = Watch::new().map_err(|e| Failure::new(exit::SOFTWARE, format!("inotify: {e}")))?;
    let dir = store.transcript_dir(id);
    let mut at: Option<(u64, u64)> = None; // (iteration, bytes consumed)
    loop {
        // Watched before looking, so that nothing written after the look is missed.
        let _ = watch.add(&store.tasks_dir(), libc::IN_CREATE | libc::IN_MOVED_TO);
        let _ = watch.add(&store.task_dir(id), libc::IN_CREATE | libc::IN_MOVED_TO);
        let _ = watch.add(&dir, CHANGES);
        let ended = store
            .load(id)
            .ok()
            .flatten()
            .is_some_and(|t| t.status.is_finished());
        let files = transcripts::files(&dir).unwrap_or_default();
        for (i, path) in files.iter().filter(|(i, _)| (first..=last).contains(i)) {
            let from = match at {
                Some((cur, _)) if *i < cur => continue,
                Some((cur, n)) if *i == cur => n,
                _ => {
                    if let Some((cur, _)) = at {
                        out.end_of(cur)?;
                    }
                    at = Some((*i, 0));
                    0
                }
            };
            // A file pruned meanwhile has nothing more to give.
            if let Ok(b) = read_from(path, from) {
                out.more(*i, &b)?;
                at = Some((*i, from + b.len() as u64));
            }
        }
        let done_last = at.is_some_and(|(i, _)| i >= last);
        if ended || (done_last && last != u64::MAX && files.iter().any(|(i, _)| *i > last)) {
            if let Some((cur, _)) = at {
                out.end_of(cur)?;
            }
            return Ok(exit::OK);
        }
        watch
            .wait()
            .map_err(|e| Failure::new(exit::SOFTWARE, format!("inotify: {e}")))?;
    }
}

/// What a file holds past `from` (a file replaced meanwhile reads short).
fn read_from(path: &Path, from: u64) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut b = Vec::new();
    f.read_to_end(&mut b)?;
    Ok(b)
}

/// Where the bytes go: raw (record lines left out, escapes stripped on
/// request) or one JSON object per attempt.
struct Out {
    json: bool,
    strip: Option<Strip>,
    lines: Lines,
    /// JSON while following: the file's bytes not yet printed as attempts.
    pending: Vec<u8>,
}

impl Out {
    fn new(a: &LogsArgs) -> Out {
        Out {
            json: a.json,
            strip: a.strip_ansi.then(Strip::default),
            lines: Lines::default(),
            pending: Vec::new(),
        }
    }

    /// A whole file.
    fn whole(&mut self, iteration: u64, bytes: &[u8]) -> Result<(), Failure> {
        if self.json {
            for a in transcripts::parse(bytes, iteration) {
                self.object(&a, bytes)?;
            }
            return Ok(());
        }
        self.raw(bytes)?;
        self.held()
    }

    /// Bytes appended to iteration `iteration`'s file.
    fn more(&mut self, iteration: u64, bytes: &[u8]) -> Result<(), Failure> {
        if !self.json {
            return self.raw(bytes);
        }
        let from = self.pending.len().saturating_sub(RECORD.len());
        self.pending.extend_from_slice(bytes);
        // Attempts that have their record are printed; the rest waits (and
        // without a new record line there is nothing to parse again).
        if !self.pending[from..]
            .windows(RECORD.len())
            .any(|w| w == RECORD)
        {
            return Ok(());
        }
        let attempts = transcripts::parse(&self.pending, iteration);
        let done = attempts
            .iter()
            .rposition(|a| a.record.is_some())
            .map_or(0, |k| k + 1);
        let mut cut = 0;
        let pending = std::mem::take(&mut self.pending);
        for a in &attempts[..done] {
            self.object(a, &pending)?;
            cut = a.shown.end;
        }
        // The record line after the last printed attempt.
        if done > 0 {
            cut = pending[cut..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(pending.len(), |i| cut + i + 1);
        }
        self.pending = pending[cut..].to_vec();
        Ok(())
    }

    /// The iteration's file will not grow any more.
    fn end_of(&mut self, iteration: u64) -> Result<(), Failure> {
        if self.json {
            let pending = std::mem::take(&mut self.pending);
            for a in transcripts::parse(&pending, iteration) {
                self.object(&a, &pending)?;
            }
            return Ok(());
        }
        self.held()
    }

    /// The end of a file: what was held back as a possible record line is
    /// output after all.
    fn held(&mut self) -> Result<(), Failure> {
        let mut tail = Vec::new();
        self.lines.finish(&mut tail);
        self.plain(&tail)
    }

    fn raw(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        let mut kept = Vec::with_capacity(bytes.len());
        self.lines.feed(bytes, &mut kept);
        self.plain(&kept)
    }

    /// Kept bytes, escapes stripped on request.
    fn plain(&mut self, kept: &[u8]) -> Result<(), Failure> {
        match &mut self.strip {
            Some(s) => {
                let mut plain = Vec::with_capacity(kept.len());
                s.feed(kept, &mut plain);
                emit(&plain)
            }
            None => emit(kept),
        }
    }

    fn object(&mut self, a: &Attempt, bytes: &[u8]) -> Result<(), Failure> {
        let raw = &bytes[a.output.clone()];
        let text = match &mut self.strip {
            Some(_) => String::from_utf8_lossy(&crate::agent::text::strip(raw)).into_owned(),
            None => String::from_utf8_lossy(raw).into_owned(),
        };
        let r = a.record.as_ref();
        let v = serde_json::json!({
            "iteration": a.iteration,
            "attempt": a.attempt,
            "started": a.started,
            "command": a.command,
            "complete": r.is_some(),
            "duration": r.map(|r| r.duration),
            "ending": r.map(|r| r.ending.clone()),
            "exit": r.and_then(|r| r.exit),
            "signal": r.and_then(|r| r.signal),
            "class": r.map(|r| r.class.clone()),
            "decided_by": r.and_then(|r| r.decided_by.clone()),
            "bytes_read": r.map(|r| r.bytes_read),
            "bytes_dropped": r.map(|r| r.bytes_dropped),
            "truncated": r.map(|r| r.bytes_dropped > 0),
            "output": text,
        });
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        emit(&line)
    }
}

fn emit(bytes: &[u8]) -> Result<(), Failure> {
    let mut o = std::io::stdout().lock();
    match o.write_all(bytes).and_then(|()| o.flush()) {
        Ok(()) => Ok(()),
        // A reader that went away (| head): done, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(exit::OK),
        Err(e) => Err(Failure::new(exit::SOFTWARE, format!("cannot write: {e}"))),
    }
}

/// Leaves out `=== record ` lines from a byte stream cut anywhere: a line
/// that could still become one is held until it is decided.
#[derive(Default)]
struct Lines {
    mid_line: bool,
    held: Vec<u8>,
    skipping: bool,
}

impl Lines {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        for &b in bytes {
            if self.skipping {
                if b == b'\n' {
                    self.skipping = false;
                    self.mid_line = false;
                }
                continue;
            }
            if !self.held.is_empty() || (!self.mid_line && b == RECORD[0]) {
                self.held.push(b);
                if RECORD.starts_with(&self.held) {
                    if self.held.len() == RECORD.len() {
                        self.held.clear();
                        self.skipping = true;
                    }
                    continue;
                }
                out.append(&mut self.held);
                self.mid_line = b != b'\n';
                continue;
            }
            out.push(b);
            self.mid_line = b != b'\n';
        }
    }

    /// The end of a file: what was held is not a record.
    fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.held);
        self.skipping = false;
        self.mid_line = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_lines_are_left_out_however_the_bytes_are_cut() {
        let text = b"=== head\nout ===x\n=== record {\"a\":1}\n=== re\nlast";
        let want = b"=== head\nout ===x\n=== re\nlast";
        for cut in 0..text.len() {
            let mut l = Lines::default();
            let mut out = Vec::new();
            l.feed(&text[..cut], &mut out);
            l.feed(&text[cut..], &mut out);
            l.finish(&mut out);
            assert_eq!(out, want, "cut at {cut}");
        }
    }
}

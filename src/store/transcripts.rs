//! Transcripts read back: `tasks/<id>/iterations/NNNNNN.log`, one file per
//! iteration holding its attempts (agent, retries, verify command) in turn.
//! Each attempt written by agent/transcript.rs ends in a `=== record` line
//! that gives the byte lengths of its header, output and footer, so its
//! bounds are found from the end of the file whatever the agent printed.
//! What has no record (an attempt cut off by a kill, a cache note, files of
//! versions before the record) is split at our header lines instead.

pub use crate::agent::TranscriptRecord as Record;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

const RECORD: &[u8] = b"=== record ";
const HEADER: &[u8] = b"=== ralph-qchat iteration ";
const NOTE: &[u8] = b"=== iteration ";
const FOOTER: &[u8] = b"\n=== end: ";

/// One attempt found in a transcript file (byte offsets into it).
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub iteration: u64,
    pub attempt: Option<u32>,
    pub started: Option<String>,
    pub command: Option<String>,
    /// Header, output and footer, without the record line.
    pub shown: Range<usize>,
    pub output: Range<usize>,
    /// None: it was cut off, or written before records existed.
    pub record: Option<Record>,
}

/// The transcripts kept of a task, oldest first: (iteration, file).
pub fn files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((n, e.path()));
    }
    out.sort();
    Ok(out)
}

/// The attempts in one file's bytes, in the order they were written.
pub fn parse(bytes: &[u8], file_iteration: u64) -> Vec<Attempt> {
    let mut tail = Vec::new();
    let mut end = bytes.len();
    while let Some((a, start)) = last_recorded(bytes, end) {
        tail.push(a);
        end = start;
    }
    let mut out = unrecorded(bytes, end, file_iteration);
    out.extend(tail.into_iter().rev());
    out
}

/// The attempt whose record is the last line of `bytes[..end]`, and where
/// it starts.
fn last_recorded(bytes: &[u8], end: usize) -> Option<(Attempt, usize)> {
    if end == 0 || bytes[end - 1] != b'\n' {
        return None;
    }
    let line_start = bytes[..end - 1]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let json = bytes[line_start..end - 1].strip_prefix(RECORD)?;
    let r: Record = serde_json::from_slice(json).ok()?;
    let total = r
        .header_bytes
        .checked_add(r.output_bytes)?
        .checked_add(r.footer_bytes)?;
    let start = (line_start as u64).checked_sub(total)? as usize;
    if !bytes[start..].starts_with(HEADER) {
        return None;
    }
    let out_start = start + r.header_bytes as usize;
    let out_end = out_start + r.output_bytes as usize;
    Some((
        Attempt {
            iteration: r.iteration,
            attempt: Some(r.attempt),
            started: Some(r.started.clone()),
            command: Some(r.command.clone()),
            shown: start..line_start,
            output: out_start..out_end,
            record: Some(r),
        },
        start,
    ))
}

/// `bytes[..end]` split at our header and note lines.
fn unrecorded(bytes: &[u8], end: usize, file_iteration: u64) -> Vec<Attempt> {
    let region = &bytes[..end];
    let mut starts: Vec<usize> = Vec::new();
    let mut at = 0;
    while at < region.len() {
        if region[at..].starts_with(HEADER) || region[at..].starts_with(NOTE) {
            starts.push(at);
        }
        match region[at..].iter().position(|&b| b == b'\n') {
            Some(i) => at += i + 1,
            None => break,
        }
    }
    if starts.first() != Some(&0) && !region.is_empty() {
        starts.insert(0, 0);
    }
    let mut out = Vec::new();
    for (k, &s) in starts.iter().enumerate() {
        let e = starts.get(k + 1).copied().unwrap_or(end);
        out.push(unrecorded_one(bytes, s..e, file_iteration));
    }
    out
}

fn unrecorded_one(bytes: &[u8], r: Range<usize>, file_iteration: u64) -> Attempt {
    let part = &bytes[r.clone()];
    let mut a = Attempt {
        iteration: file_iteration,
        attempt: None,
        started: None,
        command: None,
        shown: r.clone(),
        output: r.clone(),
        record: None,
    };
    let Some(first) = part.strip_prefix(HEADER) else {
        return a;
    };
    let line_end = first
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(first.len());
    let words: Vec<&str> = std::str::from_utf8(&first[..line_end])
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // "N attempt M started T"
    if let [n, "attempt", m, "started", t, ..] = words[..] {
        a.iteration = n.parse().unwrap_or(file_iteration);
        a.attempt = m.parse().ok();
        a.started = Some(t.to_string());
    }
    let mut out_start = r.start + HEADER.len() + line_end + 1;
    if let Some(argv) = bytes
        .get(out_start..r.end)
        .and_then(|b| b.strip_prefix(b"=== argv: "))
    {
        let l = argv.iter().position(|&b| b == b'\n').unwrap_or(argv.len());
        a.command = Some(String::from_utf8_lossy(&argv[..l]).into_owned());
        out_start += b"=== argv: ".len() + l + 1;
    }
    let out_start = out_start.min(r.end);
    // A footer of a version before records: the last line, starting with "=== end: ".
    let body = &bytes[out_start..r.end];
    let out_end = body
        .windows(FOOTER.len())
        .rposition(|w| w == FOOTER)
        .filter(|&i| !body[i + 1..body.len().saturating_sub(1)].contains(&b'\n'))
        .map_or(r.end, |i| out_start + i);
    a.output = out_start..out_end;
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(it: u64, n: u32, output: &[u8]) -> Vec<u8> {
        let header = format!(
            "=== ralph-qchat iteration {it} attempt {n} started 2026-12-01T00:00:00.000Z\n=== argv: q chat\n"
        );
        let footer = "\n=== end: exit status 0 (success) after 0.1 s; 3 bytes of output\n";
        let r = Record {
            iteration: it,
            attempt: n,
            started: "2026-12-01T00:00:00.000Z".into(),
            command: "q chat".into(),
            duration: 0.1,
            ending: "exit status 0".into(),
            exit: Some(0),
            signal: None,
            class: "success".into(),
            decided_by: None,
            bytes_read: output.len() as u64,
            bytes_dropped: 0,
            header_bytes: header.len() as u64,
            output_bytes: output.len() as u64,
            footer_bytes: footer.len() as u64,
        };
        let mut b = header.into_bytes();
        b.extend_from_slice(output);
        b.extend_from_slice(footer.as_bytes());
        b.extend_from_slice(r.line().as_bytes());
        b
    }

    #[test]
    fn recorded_attempts_are_found_whatever_the_agent_printed() {
        let evil: &[u8] =
            b"\xff\xfe\n=== ralph-qchat iteration 9 attempt 9 started x\n=== record {\"no\":1}\n=== end: fake\n";
        let mut file = attempt(3, 1, evil);
        file.extend(attempt(3, 2, b"second"));
        let got = parse(&file, 3);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(&file[got[0].output.clone()], evil);
        assert_eq!(&file[got[1].output.clone()], b"second");
        assert_eq!(got[1].attempt, Some(2));
        assert!(got.iter().all(|a| a.record.is_some()));
    }

    #[test]
    fn an_attempt_cut_off_keeps_its_bytes_and_the_next_one_is_whole() {
        let mut file =
            b"=== ralph-qchat iteration 4 attempt 1 started T\n=== argv: q chat\npartial out"
                .to_vec();
        file.extend(attempt(4, 1, b"again"));
        let got = parse(&file, 4);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(&file[got[0].output.clone()], b"partial out");
        assert!(got[0].record.is_none());
        assert_eq!(got[0].attempt, Some(1));
        assert_eq!(&file[got[1].output.clone()], b"again");
        // Still being written: only the header and some output.
        let live = b"=== ralph-qchat iteration 5 attempt 1 started T\n=== argv: q\nhal";
        let got = parse(live, 5);
        assert_eq!(&live[got[0].output.clone()], b"hal");
    }

    #[test]
    fn files_before_records_split_at_headers_and_footers() {
        let old = b"=== ralph-qchat iteration 2 attempt 1 started T\n=== argv: q chat\nout\n=== end: exit status 1 (failed) after 0.1 s; 4 bytes of output\n=== ralph-qchat iteration 2 attempt 2 started U\n=== argv: q chat\nok";
        let got = parse(old, 2);
        assert_eq!(got.len(), 2);
        assert_eq!(&old[got[0].output.clone()], b"out");
        assert_eq!(&old[got[1].output.clone()], b"ok");
        assert_eq!(got[1].started.as_deref(), Some("U"));
    }

    #[test]
    fn no_bytes_panic_the_parser() {
        for b in [
            &b""[..],
            b"\n",
            b"=== record {}\n",
            b"=== record {\"iteration\":1}\n",
            b"=== ralph-qchat iteration\n",
        ] {
            let _ = parse(b, 1);
        }
        let mut r = attempt(1, 1, b"x");
        r.drain(..10); // the header's start gone: the lengths no longer fit
        let _ = parse(&r, 1);
    }
}

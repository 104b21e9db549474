//! Accounting of one run's output: bytes read, kept and dropped past
//! max_output_size, the output completion marker (found across chunk
//! borders), and the last bytes of each stream for messages.

use super::attempt::AgentRequest;
use super::transcript::Transcript;
use std::io::{self, Write};
use std::sync::atomic::Ordering;

const TAIL: usize = 2048;

pub struct Output {
    pub bytes_read: u64,
    kept: u64,
    pub bytes_dropped: u64,
    marker: Option<Vec<u8>>,
    pub marker_seen: bool,
    carry: [Vec<u8>; 2],
    tails: [Vec<u8>; 2],
}

impl Output {
    pub fn new(req: &AgentRequest) -> Output {
        Output {
            bytes_read: 0,
            kept: 0,
            bytes_dropped: 0,
            marker: req.output_marker.clone().filter(|m| !m.is_empty()),
            marker_seen: false,
            carry: [Vec::new(), Vec::new()],
            tails: [Vec::new(), Vec::new()],
        }
    }

    /// A chunk read from stream 0 (stdout) or 1 (stderr): kept within the
    /// cap (to the transcript, and to our stderr when streaming), searched
    /// for the marker, remembered for the tail.
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
        if let Some(m) = &self.marker
            && !self.marker_seen
        {
            let carry = &mut self.carry[stream];
            carry.extend_from_slice(chunk);
            if find(carry, m) {
                self.marker_seen = true;
            }
            let keep_from = carry.len().saturating_sub(m.len() - 1);
            carry.drain(..keep_from);
        }
        let tail = &mut self.tails[stream];
        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(TAIL)..]);
        let over = tail.len().saturating_sub(TAIL);
        tail.drain(..over);
    }

    /// The last bytes of stderr, or of stdout if stderr was silent.
    pub fn tail(&self) -> Vec<u8> {
        if self.tails[1].iter().any(|b| !b.is_ascii_whitespace()) {
            self.tails[1].clone()
        } else {
            self.tails[0].clone()
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_across_chunks() {
        assert!(find(b"abcLOOP_COMPLETEdef", b"LOOP_COMPLETE"));
        assert!(!find(b"LOOP_COMPLET", b"LOOP_COMPLETE"));
    }
}

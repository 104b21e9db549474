//! Agent output as text the loop can reason about: terminal escape
//! sequences removed (Kiro colours its output even with NO_COLOR), bytes cut
//! into lines at `\n` or `\r` (spinners redraw with `\r`), streaming, so a
//! sequence or a line split across two reads is handled like a whole one.
//! Transcripts keep the raw bytes; only classification, markers, messages
//! and logs read this.

/// Longest line kept for matching; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 2048;
/// An OSC or device string longer than this is not one: give its bytes back.
const MAX_STRING: usize = 512;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    #[default]
    Text,
    /// After ESC.
    Esc,
    /// ESC followed by intermediate bytes (0x20–0x2F), waiting for the final.
    EscInter,
    /// ESC [ parameters, waiting for the final byte (0x40–0x7E).
    Csi,
    /// ESC ] or a device/application string, ended by BEL or ESC \.
    Str(usize),
    /// ESC inside a string: `\` ends it.
    StrEsc,
}

/// Removes ANSI/VT escape sequences from a byte stream. The output never
/// holds ESC, and bytes without ESC pass through unchanged, so stripping
/// twice is stripping once.
#[derive(Debug, Default, Clone)]
pub struct Strip {
    state: State,
}

impl Strip {
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        while !rest.is_empty() {
            if self.state == State::Text {
                // Plain text up to the next ESC is copied as it is.
                let n = memchr::memchr(0x1b, rest).unwrap_or(rest.len());
                out.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                if rest.is_empty() {
                    break;
                }
            }
            self.byte(rest[0], out);
            rest = &rest[1..];
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<u8>) {
        const ESC: u8 = 0x1b;
        self.state = match (self.state, b) {
            (_, ESC) if self.state != State::StrEsc && !matches!(self.state, State::Str(_)) => {
                State::Esc
            }
            (State::Text, _) => {
                out.push(b);
                State::Text
            }
            (State::Esc, b'[') => State::Csi,
            (State::Esc, b']' | b'P' | b'X' | b'^' | b'_') => State::Str(0),
            (State::Esc | State::EscInter, 0x20..=0x2f) => State::EscInter,
            (State::Esc | State::EscInter, 0x30..=0x7e) => State::Text,
            (State::Csi, 0x20..=0x3f) => State::Csi,
            (State::Csi, 0x40..=0x7e) => State::Text,
            (State::Str(_), 0x07) => State::Text,
            (State::Str(_), ESC) => State::StrEsc,
            (State::Str(_), b'\n') => {
                out.push(b);
                State::Text
            }
            (State::Str(n), _) if n < MAX_STRING => State::Str(n + 1),
            (State::StrEsc, b'\\') => State::Text,
            (State::StrEsc, ESC) => State::Esc,
            // A broken sequence: the byte that broke it is text again.
            (_, _) => {
                out.push(b);
                State::Text
            }
        };
    }
}

/// One-shot stripping, for text that is whole already.
pub fn strip(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    Strip::default().feed(input, &mut out);
    out
}

/// Cuts stripped bytes into lines; `\r` ends a line like `\n`. Lines are
/// handed out trimmed and lossily decoded; empty ones are skipped.
#[derive(Debug)]
pub struct Lines {
    strip: Strip,
    stripped: Vec<u8>,
    line: Vec<u8>,
    cap: usize,
}

impl Default for Lines {
    fn default() -> Lines {
        Lines::with_cap(MAX_LINE)
    }
}

impl Lines {
    /// Lines kept up to `cap` bytes (JSON results can be long).
    pub fn with_cap(cap: usize) -> Lines {
        Lines {
            strip: Strip::default(),
            stripped: Vec::new(),
            line: Vec::new(),
            cap,
        }
    }

    pub fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(&str)) {
        self.stripped.clear();
        self.strip.feed(chunk, &mut self.stripped);
        let mut rest = &self.stripped[..];
        while !rest.is_empty() {
            let end = memchr::memchr2(b'\n', b'\r', rest);
            let piece = &rest[..end.unwrap_or(rest.len())];
            let room = self.cap.saturating_sub(self.line.len());
            self.line.extend_from_slice(&piece[..piece.len().min(room)]);
            match end {
                Some(i) => {
                    emit(&mut self.line, &mut each);
                    rest = &rest[i + 1..];
                }
                None => break,
            }
        }
    }

    /// Bytes of the line read so far.
    pub fn pending(&self) -> usize {
        self.line.len()
    }

    /// The line read so far, before its end arrived (a prompt that waits).
    pub fn partial(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.line);
        let t = text.trim();
        (!t.is_empty()).then(|| t.to_string())
    }

    /// The last line when the stream ended without a newline (Kiro does).
    pub fn finish(&mut self, mut each: impl FnMut(&str)) {
        emit(&mut self.line, &mut each);
    }
}

fn emit(line: &mut Vec<u8>, each: &mut impl FnMut(&str)) {
    if !line.is_empty() {
        let text = String::from_utf8_lossy(line);
        let t = text.trim();
        if !t.is_empty() {
            each(t);
        }
        line.clear();
    }
}

/// A line as rules see it: without the symbols CLIs put in front of their
/// messages (`⚠️`, `>`, `▸`, bullets, spaces). Quotes and backticks stay, so
/// a quoted message (an agent writing about one) is not the message.
pub fn rule_text(line: &str) -> &str {
    line.trim_start_matches(|c: char| {
        c.is_whitespace() || matches!(c, '>' | '*' | '-') || (!c.is_ascii() && !c.is_alphanumeric())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]]) -> Vec<String> {
        let mut l = Lines::default();
        let mut got = vec![];
        for c in chunks {
            l.feed(c, |s| got.push(s.to_string()));
        }
        l.finish(|s| got.push(s.to_string()));
        got
    }

    #[test]
    fn strips_colours_cursor_moves_and_titles() {
        assert_eq!(strip(b"\x1b[38;5;141m> \x1b[0mPONG"), b"> PONG");
        assert_eq!(strip(b"a\x1b[2K\x1b[1Gb"), b"ab");
        assert_eq!(strip(b"\x1b]0;title\x07x\x1b]8;;http://h\x1b\\y"), b"xy");
        assert_eq!(strip(b"\x1b(Bz\x1b=w"), b"zw");
        assert_eq!(
            strip("⚠️ plain ünïcode".as_bytes()),
            "⚠️ plain ünïcode".as_bytes()
        );
    }

    #[test]
    fn a_broken_sequence_gives_its_text_back() {
        assert_eq!(strip(b"\x1b[12\nnext"), b"\nnext");
        // An unterminated title never swallows the lines after it.
        assert_eq!(strip(b"\x1b]0;never ends\nRate limit"), b"\nRate limit");
    }

    #[test]
    fn lines_across_chunks_and_carriage_returns() {
        assert_eq!(
            lines(&[
                b"\x1b[3",
                b"1mhel",
                b"lo\x1b[0m\r\nwor",
                b"ld\rLogging in..."
            ]),
            vec!["hello", "world", "Logging in..."]
        );
        assert_eq!(lines(&[b"  \n\n x \n"]), vec!["x"]);
    }

    #[test]
    fn long_lines_are_cut() {
        let long = vec![b'a'; MAX_LINE * 3];
        let got = lines(&[&long, b"\nshort\n"]);
        assert_eq!(got[0].len(), MAX_LINE);
        assert_eq!(got[1], "short");
    }

    #[test]
    fn rule_text_drops_leading_symbols() {
        assert_eq!(
            rule_text("⚠️  Amazon Q rate limit reached:"),
            "Amazon Q rate limit reached:"
        );
        assert_eq!(rule_text("▸ Credits: 0.01"), "Credits: 0.01");
        assert_eq!(rule_text("> PONG"), "PONG");
        assert_eq!(rule_text("'Rate limit' quoted"), "'Rate limit' quoted");
        assert_eq!(rule_text("`Logging in...`"), "`Logging in...`");
    }
}

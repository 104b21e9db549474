//! The instruction given to the agent: the prompt file checked, then the
//! template filled in, kept within what one argv element may hold.

/// Linux refuses a single argv string of 128 KiB or more (MAX_ARG_STRLEN,
/// counting the NUL) with E2BIG.
pub const MAX_ARG_LEN: usize = 128 * 1024 - 1;

const BY_REFERENCE: &str = "(The task description is too long to include here. Read the \
file {prompt_file} first: it is the task.)";

#[derive(Debug, PartialEq)]
pub enum Refusal {
    TooLarge { size: u64, max: u64 },
    Blocked(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Only max + 1 bytes are ever read: say "over", not a size.
            Refusal::TooLarge { size, max } if *size > *max + 1 => write!(
                f,
                "prompt file is {size} bytes, over limits.max_prompt_size ({max} bytes)"
            ),
            Refusal::TooLarge { max, .. } => write!(
                f,
                "prompt file is over limits.max_prompt_size ({max} bytes)"
            ),
            Refusal::Blocked(p) => write!(
                f,
                "prompt contains the blocked pattern {p:?} (limits.blocked_patterns)"
            ),
        }
    }
}

#[derive(Debug, PartialEq)]
pub struct Prompt {
    pub text: Vec<u8>,
    pub nul_stripped: usize,
}

/// Size limit, NUL bytes stripped, blocked patterns refused.
pub fn check_prompt(raw: Vec<u8>, max: u64, blocked: &[String]) -> Result<Prompt, Refusal> {
    if raw.len() as u64 > max {
        return Err(Refusal::TooLarge {
            size: raw.len() as u64,
            max,
        });
    }
    let before = raw.len();
    let text: Vec<u8> = raw.into_iter().filter(|&b| b != 0).collect();
    let nul_stripped = before - text.len();
    for p in blocked {
        let needle = p.as_bytes();
        if !needle.is_empty() && text.windows(needle.len()).any(|w| w == needle) {
            return Err(Refusal::Blocked(p.clone()));
        }
    }
    Ok(Prompt { text, nul_stripped })
}

/// Fills in the template. Placeholders in the prompt itself are not expanded.
/// `verify` (a failed verification, or empty) goes where `{verify_output}`
/// is, or at the end when the template has no such place.
pub fn render(
    template: &str,
    prompt_file: &str,
    prompt: &[u8],
    marker: &str,
    iteration: u64,
    verify: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(template.len() + prompt.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.extend_from_slice(&rest.as_bytes()[..i]);
        let tail = &rest[i..];
        let (value, len): (Vec<u8>, usize) = if tail.starts_with("{prompt_file}") {
            (prompt_file.as_bytes().to_vec(), "{prompt_file}".len())
        } else if tail.starts_with("{prompt}") {
            (prompt.to_vec(), "{prompt}".len())
        } else if tail.starts_with("{marker}") {
            (marker.as_bytes().to_vec(), "{marker}".len())
        } else if tail.starts_with("{iteration}") {
            (iteration.to_string().into_bytes(), "{iteration}".len())
        } else if tail.starts_with("{verify_output}") {
            (verify.to_vec(), "{verify_output}".len())
        } else {
            (b"{".to_vec(), 1)
        };
        out.extend_from_slice(&value);
        rest = &tail[len..];
    }
    out.extend_from_slice(rest.as_bytes());
    if !verify.is_empty() && !template.contains("{verify_output}") {
        out.extend_from_slice(b"\n\n");
        out.extend_from_slice(verify);
    }
    out
}

/// The instruction, and whether the prompt had to be passed by reference
/// because it would not fit in one argument.
pub fn instruction(
    template: &str,
    prompt_file: &str,
    prompt: &[u8],
    marker: &str,
    iteration: u64,
    verify: &[u8],
) -> (Vec<u8>, bool) {
    let full = render(template, prompt_file, prompt, marker, iteration, verify);
    if full.len() <= MAX_ARG_LEN {
        return (full, false);
    }
    let note = BY_REFERENCE.replace("{prompt_file}", prompt_file);
    let mut short = render(
        template,
        prompt_file,
        note.as_bytes(),
        marker,
        iteration,
        verify,
    );
    short.truncate(MAX_ARG_LEN);
    (short, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_placeholders() {
        let r = render(
            "{iteration}: {prompt} in {prompt_file}, then {marker} {x}",
            "P.md",
            b"do {marker}",
            "DONE",
            3,
            b"",
        );
        assert_eq!(r, b"3: do {marker} in P.md, then DONE {x}");
        let v = render("a{verify_output}b", "P", b"", "M", 1, b"FAILED");
        assert_eq!(v, b"aFAILEDb");
        let v = render("a", "P", b"", "M", 1, b"FAILED");
        assert_eq!(v, b"a\n\nFAILED");
    }

    #[test]
    fn large_prompt_goes_by_reference() {
        let big = vec![b'a'; 200 * 1024];
        let (i, by_ref) = instruction(
            "task: {prompt}",
            "/w/PROMPT.md",
            &big,
            "TASK_COMPLETE",
            1,
            b"",
        );
        assert!(by_ref);
        assert!(i.len() <= MAX_ARG_LEN);
        assert!(String::from_utf8_lossy(&i).contains("/w/PROMPT.md"));
        let (i, by_ref) = instruction("task: {prompt}", "p", b"small", "M", 1, b"");
        assert!(!by_ref);
        assert_eq!(i, b"task: small");
    }

    #[test]
    fn prompt_checks() {
        assert_eq!(
            check_prompt(b"a\0b\0".to_vec(), 10, &[]),
            Ok(Prompt {
                text: b"ab".to_vec(),
                nul_stripped: 2
            })
        );
        assert!(matches!(
            check_prompt(vec![b'x'; 11], 10, &[]),
            Err(Refusal::TooLarge { size: 11, max: 10 })
        ));
        assert_eq!(
            check_prompt(b"please rm -rf / now".to_vec(), 100, &["rm -rf /".into()]),
            Err(Refusal::Blocked("rm -rf /".into()))
        );
    }
}

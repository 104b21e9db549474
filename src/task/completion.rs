//! When is a task complete: a marker line in the prompt file.

/// True when a line of the prompt is the marker, `**M**`, `- [x] M`, `[x] M`
/// (also `* [x]` and `[X]`), or the text contains `<!-- M -->`.
pub fn prompt_complete(text: &[u8], marker: &str) -> bool {
    let text = String::from_utf8_lossy(text);
    if text.contains(&format!("<!-- {marker} -->")) {
        return true;
    }
    text.lines().any(|line| {
        let l = line.trim();
        let l = l
            .strip_prefix("- ")
            .or_else(|| l.strip_prefix("* "))
            .unwrap_or(l)
            .trim_start();
        let l = l
            .strip_prefix("[x]")
            .or_else(|| l.strip_prefix("[X]"))
            .map(str::trim_start)
            .unwrap_or(l);
        l == marker || l.strip_prefix("**").and_then(|r| r.strip_suffix("**")) == Some(marker)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "TASK_COMPLETE";

    #[test]
    fn marker_forms() {
        for t in [
            "TASK_COMPLETE",
            "  TASK_COMPLETE  ",
            "# Task\n\ndone\n**TASK_COMPLETE**\n",
            "- [x] TASK_COMPLETE",
            "[x] TASK_COMPLETE",
            "* [X] TASK_COMPLETE",
            "text <!-- TASK_COMPLETE --> more",
            "line\r\nTASK_COMPLETE\r\n",
        ] {
            assert!(prompt_complete(t.as_bytes(), M), "{t:?}");
        }
    }

    #[test]
    fn not_complete() {
        for t in [
            "",
            "When done, write TASK_COMPLETE on a line of its own.",
            "- [ ] TASK_COMPLETE",
            "TASK_COMPLETED",
            "`TASK_COMPLETE`",
            "<!--TASK_COMPLETE-->x",
        ] {
            assert!(!prompt_complete(t.as_bytes(), M), "{t:?}");
        }
    }

    #[test]
    fn other_marker_word() {
        assert!(prompt_complete(b"DONE\n", "DONE"));
        assert!(!prompt_complete(b"TASK_COMPLETE\n", "DONE"));
    }

    #[test]
    fn invalid_utf8_is_fine() {
        assert!(prompt_complete(b"\xff\xfe\nTASK_COMPLETE\n", M));
    }
}

//! Keeping directories that only grow within bounds: spool/rejected (each
//! rejected entry with its `.reason`) and a task's prompt archive. The
//! newest `keep` entries stay, and none older than `max_age` seconds
//! (0: no age limit; keep 0: no count limit).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What pruning removed.
#[derive(Debug, Default, PartialEq)]
pub struct Pruned {
    pub removed: usize,
    pub failed: Vec<String>,
}

/// Prunes `dir`. An entry `X` goes together with `X.reason` beside it; a
/// symbolic link is removed, never followed; a directory with what is in it.
pub fn prune(dir: &Path, keep: usize, max_age: f64, now: SystemTime) -> Pruned {
    let mut out = Pruned::default();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut entries: Vec<(SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| {
            !e.file_name().to_string_lossy().ends_with(".reason")
                && !e.file_name().to_string_lossy().starts_with('.')
        })
        .map(|e| {
            let t = e
                .path()
                .symlink_metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    // Newest first; by name among equal times, so the order is stable.
    entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));
    let cutoff = (max_age > 0.0).then(|| now.checked_sub(crate::sys::time::seconds(max_age)));
    for (i, (t, path)) in entries.iter().enumerate() {
        let too_many = keep > 0 && i >= keep;
        let too_old = cutoff.flatten().is_some_and(|c| *t < c);
        if !(too_many || too_old) {
            continue;
        }
        match remove(path) {
            Ok(()) => out.removed += 1,
            Err(e) => out.failed.push(format!("{}: {e}", path.display())),
        }
        let mut reason = path.clone().into_os_string();
        reason.push(".reason");
        let _ = std::fs::remove_file(reason);
    }
    out
}

fn remove(p: &Path) -> std::io::Result<()> {
    match p.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ago(now: SystemTime, secs: u64) -> SystemTime {
        now.checked_sub(Duration::from_secs(secs))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn touch(p: &Path, at: SystemTime) {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(at).unwrap();
    }

    #[test]
    fn keeps_the_newest_and_nothing_too_old_with_their_reasons() {
        let dir = std::env::temp_dir().join(format!("ralph-qchat-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let now = SystemTime::now();
        let outside = dir.with_extension("outside");
        std::fs::write(&outside, "keep me").unwrap();
        for i in 0..6u64 {
            let p = dir.join(format!("e{i}.md"));
            std::fs::write(&p, "x").unwrap();
            std::fs::write(dir.join(format!("e{i}.md.reason")), "why\n").unwrap();
            touch(&p, ago(now, 100 * (6 - i)));
        }
        std::os::unix::fs::symlink(&outside, dir.join("link.md")).unwrap();
        // Newest: e5, e4, e3 (and the link, now); keep 4 by count.
        let r = prune(&dir, 4, 0.0, now);
        assert_eq!(
            r,
            Pruned {
                removed: 3,
                failed: vec![]
            }
        );
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "e3.md",
                "e3.md.reason",
                "e4.md",
                "e4.md.reason",
                "e5.md",
                "e5.md.reason",
                "link.md"
            ]
        );
        // By age: older than 250 s goes (e3 is 300 s old).
        assert_eq!(prune(&dir, 0, 250.0, now).removed, 1);
        assert!(!dir.join("e3.md.reason").exists());
        // The link was removed, not followed.
        assert_eq!(prune(&dir, 1, 0.0, now + Duration::from_secs(1)).removed, 2);
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep me");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&outside).unwrap();
    }
}

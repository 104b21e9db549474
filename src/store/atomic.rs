//! Durable replacement of a file: write a temporary, fsync, rename, fsync the
//! directory. A reader sees the old content or the new, never a mix. And the
//! other orderings a power loss must not undo: a new directory is synced in
//! its parent before anything inside it is relied on, and an entry is
//! claimed by a rename that never replaces another.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync of a directory: the entries made in it (a new file, a rename, a
/// new directory) survive a power loss.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and whatever of its parents is missing, syncing each new
/// entry in its parent: what is then written inside cannot be lost with the
/// directory that holds it.
pub fn create_dirs(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(Path::new("/"));
    create_dirs(parent)?;
    match std::fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

pub use crate::sys::rename::noreplace as rename_noreplace;

/// A temporary of `write_atomic` (`.NAME.tmpPID`) whose process is gone: a
/// kill -9 between its write and its rename left it, and nothing else would
/// ever remove it. A process that exists (ours, or another user's: EPERM)
/// is never taken for gone.
pub fn abandoned_temporary(name: &std::ffi::OsStr) -> bool {
    let Some(pid) = name
        .to_str()
        .and_then(|n| n.strip_prefix('.'))
        .and_then(|n| n.rsplit_once(".tmp"))
        .and_then(|(_, pid)| pid.parse::<i32>().ok())
    else {
        return false;
    };
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only asks whether the process exists.
    let gone = unsafe { libc::kill(pid, 0) } != 0;
    gone && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes the abandoned temporaries in `dir`: how many went.
pub fn sweep_abandoned(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| abandoned_temporary(&e.file_name()))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("ralph-qchat-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_temporaries_of_processes_that_are_gone_are_abandoned() {
        let own = format!(".state.json.tmp{}", std::process::id());
        // Above any pid_max Linux allows (2^22).
        for (name, abandoned) in [
            (".state.json.tmp4194305", true),
            (".metrics.json.tmp4194999", true),
            (own.as_str(), false),
            (".state.json.tmp1", false),
            (".state.json.tmp", false),
            ("state.json", false),
            (".state.json.tmpx4194305", false),
            ("notes.tmp4194305", false),
        ] {
            assert_eq!(
                abandoned_temporary(std::ffi::OsStr::new(name)),
                abandoned,
                "{name}"
            );
        }
    }

    #[test]
    fn a_claim_never_replaces_what_is_there() {
        let dir =
            std::env::temp_dir().join(format!("ralph-qchat-noreplace-{}", std::process::id()));
        create_dirs(&dir.join("a/b")).unwrap();
        std::fs::write(dir.join("one"), "first").unwrap();
        std::fs::write(dir.join("two"), "second").unwrap();
        rename_noreplace(&dir.join("one"), &dir.join("a/b/x")).unwrap();
        let e = rename_noreplace(&dir.join("two"), &dir.join("a/b/x")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(dir.join("a/b/x")).unwrap(), "first");
        assert_eq!(std::fs::read_to_string(dir.join("two")).unwrap(), "second");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

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

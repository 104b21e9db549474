//! Renames that never replace what is there, or swap it.

use std::io;
use std::path::Path;

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), in one
/// step: renameat2(RENAME_NOREPLACE), or where the file system lacks it a
/// hard link (which never replaces either) and an unlink.
pub fn noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        r => r,
    }
}

/// Swaps `from` and `to` in one step (renameat2(RENAME_EXCHANGE)); where
/// `to` does not exist yet, or the file system cannot swap, `from` is
/// renamed over `to`. True when swapped: `from` then holds what `to` held.
pub fn exchange(from: &Path, to: &Path) -> io::Result<bool> {
    match renameat2(from, to, libc::RENAME_EXCHANGE) {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::EINVAL | libc::ENOSYS)
            ) =>
        {
            std::fs::rename(from, to).map(|()| false)
        }
        Err(e) => Err(e),
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in a path"))
    };
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: valid C strings; AT_FDCWD resolves them as paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_swaps_or_renames_where_nothing_is_there() {
        let d = std::env::temp_dir().join(format!("rename-x-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, "new").unwrap();
        assert!(!exchange(&a, &b).unwrap(), "nothing to swap with: a rename");
        assert!(!a.exists());
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "new");
        std::fs::write(&a, "newer").unwrap();
        assert!(exchange(&a, &b).unwrap());
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "newer");
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "new");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

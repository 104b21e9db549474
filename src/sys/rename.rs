//! A rename that never replaces what is there.

use std::io;
use std::path::Path;

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), in one
/// step: renameat2(RENAME_NOREPLACE), or where the file system lacks it a
/// hard link (which never replaces either) and an unlink.
pub fn noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
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
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
        return Err(e);
    }
    std::fs::hard_link(from, to)?;
    std::fs::remove_file(from)
}

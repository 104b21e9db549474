//! Reading a file an agent may have replaced with anything (the prompt):
//! only a regular file is read, never more than the limit allows, and opening it
//! never waits (a FIFO with no writer, a device).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The file's first `max + 1` bytes at most (one more than the limit, so a
/// larger file is seen to be too large without reading it whole). A path
/// that is not a regular file once opened is an error of kind InvalidInput
/// naming what it is.
pub fn read(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = f.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        let what = if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is {what}; a prompt must be a regular file",
                path.display()
            ),
        ));
    }
    let mut out = Vec::with_capacity(meta.len().min(max.saturating_add(1)) as usize);
    File::take(f, max.saturating_add(1)).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_and_huge_files_are_not_read_whole_or_waited_on() {
        let dir = std::env::temp_dir().join(format!("prompt-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo, 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let link = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read(&link, 100).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 10_000]).unwrap();
        assert_eq!(read(&big, 100).unwrap().len(), 101);
        assert_eq!(read(&big, 100_000).unwrap().len(), 10_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! A state directory as a compressed tar, and back. The writer thread holds
//! `records.lock` while it writes a batch; a backup holds it while it reads
//! the records (task records, pauses, counters, the spool and its claimed
//! entries), so they are those of one instant between two batches, taken
//! with the daemon running. Transcripts, prompt archives and workspaces are
//! read after the lock is let go: they are appended to as agents write, and
//! a transcript is as good as after a kill -9 up to the last write.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// The first entry of every backup.
pub const MANIFEST: &str = "ralph-qchat-backup.json";
const LOCK: &str = "records.lock";

/// Never in a backup: the process locks, the port of a running daemon, the
/// cgroups an instance on this machine made (another machine's daemon would
/// kill cgroups of that name), our temporary files (`.NAME.tmpPID`, and the
/// writer's `.state.json.tmp`, an older record or a partial one; a
/// workspace's files are the agent's, whatever their names).
fn excluded(rel: &Path) -> bool {
    let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let top = rel
        .components()
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .unwrap_or("");
    (rel.components().count() == 1 && matches!(name, "lock" | LOCK | "http.port" | "cgroups"))
        || (top != "workspaces" && name.starts_with('.') && name.contains(".tmp"))
        || top.starts_with(".restore")
}

/// Read after the records, outside the lock.
fn bulky(rel: &Path) -> bool {
    let c: Vec<&str> = rel
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .collect();
    match c.as_slice() {
        ["workspaces", ..] | ["diagnostics", ..] => true,
        ["tasks", _, sub, ..] => *sub == "iterations" || *sub == "archive",
        _ => false,
    }
}

fn is_transcript(rel: &Path) -> bool {
    let c: Vec<&str> = rel
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .collect();
    matches!(c.as_slice(), ["tasks", _, "iterations", _, ..])
}

/// The lock the writer takes per batch, taken exclusively; None where the
/// file cannot be made (a read-only state directory: nothing writes then).
pub struct RecordsLock(Option<File>);

impl RecordsLock {
    pub fn open(state_dir: &Path) -> RecordsLock {
        let path = state_dir.join(LOCK);
        // Made once, then held on a read-only descriptor (flock needs no
        // more), so the file system can still be remounted read-only while
        // the daemon runs, as with the state-directory lock.
        let _ = OpenOptions::new().create(true).append(true).open(&path);
        RecordsLock(File::open(&path).ok())
    }

    /// Holds it until the guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        if let Some(f) = &self.0 {
            // SAFETY: a valid descriptor; flock has no memory effects.
            while unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0
                && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
            {}
        }
        Held(self)
    }
}

pub struct Held<'a>(&'a RecordsLock);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(f) = &self.0.0 {
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

#[derive(Debug, Default)]
pub struct Summary {
    pub files: u64,
    pub bytes: u64,
    pub tasks: u64,
    /// Files that changed size while read (transcripts being written).
    pub changed: Vec<String>,
    /// Not regular files, directories or symbolic links (FIFOs, sockets).
    pub skipped: Vec<String>,
    /// Restored: records whose paths were moved to the new directory.
    pub relocated: u64,
}

/// Writes the backup of `state_dir` to `out`.
pub fn write(state_dir: &Path, out: impl Write, transcripts: bool) -> io::Result<Summary> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let mut sum = Summary::default();
    let keep = |rel: &Path| !excluded(rel) && (transcripts || !is_transcript(rel));
    // Not even listed under the lock: a workspace may hold a project's
    // hundred thousand files.
    let mut later: Vec<(PathBuf, bool)> = Vec::new();
    {
        let lock = RecordsLock::open(state_dir);
        let _held = lock.hold();
        let mut files = Vec::new();
        walk(state_dir, Path::new(""), &mut files, Some(&mut later))?;
        // An entry claimed while the spool was listed is in both: the claim wins.
        let claimed: std::collections::HashSet<PathBuf> = files
            .iter()
            .filter_map(|p| p.strip_prefix("spool/.claimed").ok())
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| Path::new("spool").join(p))
            .collect();
        sum.tasks = files
            .iter()
            .filter(|p| {
                p.starts_with("tasks") && p.ends_with("state.json") && p.components().count() == 3
            })
            .count() as u64;
        let manifest = serde_json::json!({
            "format": 1,
            "version": env!("CARGO_PKG_VERSION"),
            "created": crate::sys::time::now_rfc3339(),
            "state_dir": state_dir.display().to_string(),
            "tasks": sum.tasks,
            "transcripts": transcripts,
        });
        let bytes = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        tar.append_data(&mut h, MANIFEST, bytes.as_slice())?;
        for rel in files {
            if keep(&rel) && !claimed.contains(&rel) {
                add(&mut tar, state_dir, &rel, &mut sum)?;
            }
        }
    }
    for (top, is_dir) in later {
        let mut files = vec![top.clone()];
        if is_dir {
            walk(state_dir, &top, &mut files, None)?;
        }
        for rel in files.iter().filter(|r| keep(r)) {
            add(&mut tar, state_dir, rel, &mut sum)?;
        }
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(sum)
}

/// Every path under `root/rel` (directories before what they hold),
/// relative; with `defer`, the bulky ones go there (with whether they are a
/// directory) instead, not entered.
fn walk(
    root: &Path,
    rel: &Path,
    out: &mut Vec<PathBuf>,
    mut defer: Option<&mut Vec<(PathBuf, bool)>>,
) -> io::Result<()> {
    let dir = root.join(rel);
    let mut entries: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(d) => d.flatten().collect(),
        // Removed meanwhile (a task cleaned, a workspace the agent removed).
        Err(e) if e.kind() == io::ErrorKind::NotFound && !rel.as_os_str().is_empty() => {
            return Ok(());
        }
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", dir.display()),
            ));
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let r = rel.join(e.file_name());
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if let Some(d) = defer.as_deref_mut()
            && bulky(&r)
        {
            d.push((r, is_dir));
            continue;
        }
        out.push(r.clone());
        if is_dir {
            walk(root, &r, out, defer.as_deref_mut())?;
        }
    }
    Ok(())
}

fn add<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    rel: &Path,
    sum: &mut Summary,
) -> io::Result<()> {
    let full = root.join(rel);
    let meta = match std::fs::symlink_metadata(&full) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", full.display()),
            ));
        }
    };
    let t = meta.file_type();
    let mut h = tar::Header::new_gnu();
    h.set_metadata(&meta);
    h.set_uid(meta.uid() as u64);
    h.set_gid(meta.gid() as u64);
    if t.is_dir() {
        h.set_size(0);
        tar.append_data(&mut h, rel, io::empty())?;
    } else if t.is_symlink() {
        let target = std::fs::read_link(&full)?;
        h.set_size(0);
        tar.append_link(&mut h, rel, target)?;
    } else if t.is_file() {
        let f = match File::open(&full) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read {}: {e}", full.display()),
                ));
            }
        };
        let size = meta.len();
        h.set_size(size);
        let mut r = Exactly {
            inner: f.take(size),
            left: size,
            short: false,
        };
        tar.append_data(&mut h, rel, &mut r)?;
        if r.short {
            sum.changed.push(rel.display().to_string());
        }
        sum.files += 1;
        sum.bytes += size;
    } else {
        sum.skipped.push(rel.display().to_string());
    }
    Ok(())
}

/// Exactly `left` bytes: what a file holds up to the size it had when it
/// was looked at, zeros for what it lost meanwhile (a tar entry's size is
/// written before its bytes).
struct Exactly<R> {
    inner: R,
    left: u64,
    short: bool,
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left as usize);
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            self.short = true;
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Unpacks a backup into the empty directory `dir` (through a staging
/// directory inside it, so a failure leaves it as empty as it was).
pub fn restore(archive: impl Read, dir: &Path) -> io::Result<Summary> {
    let staging = dir.join(format!(".restore.{}", std::process::id()));
    let result = unpack(archive, &staging);
    let moved = result.and_then(|sum| {
        for e in std::fs::read_dir(&staging)?.flatten() {
            std::fs::rename(e.path(), dir.join(e.file_name()))?;
        }
        Ok(sum)
    });
    let _ = std::fs::remove_dir_all(&staging);
    let sum = moved?;
    // One sync for everything written, before saying it is restored.
    let d = File::open(dir)?;
    // SAFETY: a valid descriptor.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sum)
}

fn unpack(archive: impl Read, into: &Path) -> io::Result<Summary> {
    std::fs::create_dir(into)?;
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(archive));
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(false);
    let mut sum = Summary::default();
    let not_ours = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "not a ralph-qchat backup (it does not begin with ralph-qchat-backup.json)",
        )
    };
    let mut first = true;
    let mut origin = None;
    for entry in a.entries().map_err(|_| not_ours())? {
        let mut e = entry.map_err(|e| if first { not_ours() } else { e })?;
        let path = e.path()?.into_owned();
        if first {
            if path != Path::new(MANIFEST) {
                return Err(not_ours());
            }
            let mut m = String::new();
            e.read_to_string(&mut m)?;
            let v: serde_json::Value = serde_json::from_str(&m).map_err(|_| not_ours())?;
            sum.tasks = v["tasks"].as_u64().unwrap_or(0);
            origin = v["state_dir"].as_str().map(PathBuf::from);
            first = false;
            continue;
        }
        if path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
            || excluded(&path)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the backup holds a path outside a state directory: {}",
                    path.display()
                ),
            ));
        }
        let size = e.size();
        if !e.unpack_in(into)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the backup holds a path outside a state directory: {}",
                    path.display()
                ),
            ));
        }
        sum.files += 1;
        sum.bytes += size;
    }
    if first {
        return Err(not_ours());
    }
    if let Some(o) = origin {
        sum.relocated = relocate(into, &o, into.parent().unwrap_or(into))?;
    }
    Ok(sum)
}

/// Task records and spool entries name their prompt and working directory
/// by absolute path; those inside the directory the backup was taken of
/// (a task's workspace) now lie inside `to`.
fn relocate(staged: &Path, from: &Path, to: &Path) -> io::Result<u64> {
    if from == to {
        return Ok(0);
    }
    let moved = |v: &str| -> Option<String> {
        let rest = Path::new(v).strip_prefix(from).ok()?;
        Some(to.join(rest).display().to_string())
    };
    let mut n = 0;
    let tasks = staged.join("tasks");
    for e in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
        let path = e.path().join("state.json");
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let mut changed = false;
        for key in ["prompt_file", "workdir"] {
            if let Some(new) = v[key].as_str().and_then(moved) {
                v[key] = serde_json::Value::String(new);
                changed = true;
            }
        }
        if changed {
            let json = serde_json::to_vec_pretty(&v).map_err(io::Error::other)?;
            super::atomic::write_atomic(&path, &json)?;
            n += 1;
        }
    }
    for d in [staged.join("spool"), staged.join("spool/.claimed")] {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(mut t) = text.parse::<toml::Table>() else {
                continue;
            };
            let mut changed = false;
            for key in ["prompt_file", "workdir"] {
                if let Some(new) = t.get(key).and_then(|v| v.as_str()).and_then(moved) {
                    t.insert(key.into(), toml::Value::String(new));
                    changed = true;
                }
            }
            if changed {
                let out = toml::to_string(&t).map_err(io::Error::other)?;
                super::atomic::write_atomic(&path, out.as_bytes())?;
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_left_out_and_what_waits_for_the_lock_to_go() {
        for p in [
            "lock",
            "records.lock",
            "http.port",
            "cgroups",
            "tasks/a/.state.json.tmp42",
            "tasks/a/.state.json.tmp",
            ".restore.7/x",
        ] {
            assert!(excluded(Path::new(p)), "{p}");
        }
        for p in [
            "tasks/a/state.json",
            "pauses.json",
            "spool/x.toml",
            "workspaces/a/lock",
            "workspaces/a/.cache.tmp1",
        ] {
            assert!(!excluded(Path::new(p)), "{p}");
        }
        assert!(bulky(Path::new("tasks/a/iterations/000001.log")));
        assert!(bulky(Path::new("workspaces/a/PROMPT.md")));
        assert!(!bulky(Path::new("tasks/a/state.json")));
        assert!(!bulky(Path::new("spool/.claimed/x.toml")));
        assert!(is_transcript(Path::new("tasks/a/iterations/000001.log")));
    }

    #[test]
    fn a_file_that_shrinks_while_read_keeps_its_entry_whole() {
        let mut r = Exactly {
            inner: &b"abc"[..],
            left: 5,
            short: false,
        };
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        assert_eq!(v, b"abc\0\0");
        assert!(r.short);
    }
}

//! The spool: task submissions as files in `<state_dir>/spool/`. Turning an
//! entry into a task record (or a rejection with its reason), and writing an
//! entry atomically for `submit`.

use crate::task::{TaskState, valid_id};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A task spec (`*.toml` in the spool).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub prompt_file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_runtime: Option<f64>,
}

const MAX_SPEC: u64 = 64 * 1024;

pub fn spool_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("spool")
}

/// Where the intake moves an entry it takes (`claim`), until the task it
/// holds is recorded.
pub fn claimed_dir(state_dir: &Path) -> PathBuf {
    spool_dir(state_dir).join(".claimed")
}

/// Takes `entry` out of the spool into `claimed_dir` under its name, never
/// replacing a claimed entry of that name (None then: an earlier file of that
/// name is still being taken; try later). What is claimed is the intake's
/// alone: a later drop under the same name is another entry, never read or
/// removed in its place.
pub fn claim(state_dir: &Path, entry: &Path) -> std::io::Result<Option<PathBuf>> {
    let dir = claimed_dir(state_dir);
    super::atomic::create_dirs(&dir)?;
    let Some(name) = entry.file_name() else {
        return Ok(None);
    };
    let dest = dir.join(name);
    match super::atomic::rename_noreplace(entry, &dest) {
        Ok(()) => Ok(Some(dest)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn workspace_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("workspaces").join(id)
}

/// Where `cancel` leaves its requests: one empty file named after the task.
pub fn cancel_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cancel")
}

/// A task of this id is recorded, or waiting in the spool.
pub fn task_known(state_dir: &Path, id: &str) -> bool {
    state_dir.join("tasks").join(id).exists()
        || [spool_dir(state_dir), claimed_dir(state_dir)]
            .iter()
            .any(|d| d.join(format!("{id}.toml")).exists() || d.join(format!("{id}.md")).exists())
}

/// A task's own copy of its prompt, durable (file, then its directory and
/// any new parent) before anything names it.
pub fn write_workspace_prompt(ws: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    super::atomic::create_dirs(ws)?;
    let prompt = ws.join("PROMPT.md");
    super::atomic::write_atomic(&prompt, bytes)?;
    Ok(prompt)
}

/// A fresh task id for a prompt file: its stem, the time to the second, and
/// 16 bits of salt so two submissions in one second do not collide.
pub fn new_id(prompt: &Path) -> String {
    let stem = crate::task::id_from_file_name(
        &prompt
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let stamp: String = crate::sys::time::now_rfc3339()
        .chars()
        .filter(char::is_ascii_digit)
        .take(14)
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let salt = (nanos ^ (std::process::id() << 16)) & 0xffff;
    format!("{stem}-{stamp}-{salt:04x}")
}

/// Files written as root into a service's state directory must stay usable
/// by the service user: give them the state directory's owner.
pub fn match_owner(state_dir: &Path, paths: &[&Path]) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Ok(meta) = std::fs::metadata(state_dir) else {
        return;
    };
    for p in paths {
        let _ = std::os::unix::fs::chown(p, Some(meta.uid()), Some(meta.gid()));
    }
}

/// What to do with one directory entry.
#[derive(Debug)]
pub enum Entry {
    /// Still being written, or ours (dot files, the rejected folder).
    Skip,
    /// This very entry was taken as task `0` before a restart that kept it:
    /// only the entry is to be removed.
    Taken(String),
    Task(Box<TaskState>),
    Reject(String),
}

/// Names that tools and editors give a file while it is written, before
/// renaming it into place: taking (and rejecting) such a file would make the
/// writer's rename fail and lose the task.
pub fn being_written(name: &str) -> bool {
    [".tmp", ".part", ".swp", "~"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// What is known of a task id when an entry names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// No such task.
    No,
    /// A task taken from this very entry (same name and same file).
    ThisEntry,
    /// Another task, or one from an earlier file of the same name.
    Other,
}

/// What tells one spool file from a later one of the same name: device,
/// inode, modification time, size.
pub fn entry_key(meta: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{}:{}:{}.{:09}:{}",
        meta.dev(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.len()
    )
}

/// Reads a spool entry without following symlinks. A prompt file becomes a
/// task in a fresh workspace; a spec names its prompt and workdir. An entry
/// that names an existing task never touches that task's files.
pub fn examine(
    state_dir: &Path,
    path: &Path,
    max_prompt: u64,
    known: &dyn Fn(&str, &str) -> Known,
) -> Entry {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Entry::Reject("the file name is not valid UTF-8".into());
    };
    if name.starts_with('.') || name == "rejected" || being_written(name) {
        return Entry::Skip;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Entry::Skip,
    };
    if meta.file_type().is_symlink() {
        return Entry::Reject("is a symbolic link; the spool takes regular files only".into());
    }
    if !meta.is_file() {
        return Entry::Reject("is not a regular file".into());
    }
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) => (s, e),
        None => (name, ""),
    };
    let limit = if ext == "toml" { MAX_SPEC } else { max_prompt };
    if meta.len() > limit {
        return Entry::Reject(format!(
            "is {} bytes, over the limit of {limit} bytes",
            meta.len()
        ));
    }
    let bytes = match read_nofollow(path, limit) {
        Ok(b) => b,
        Err(e) => return Entry::Reject(format!("cannot be read: {e}")),
    };
    let key = entry_key(&meta);
    let task_exists = |id: &str| -> Option<Entry> {
        match known(id, &key) {
            Known::No => None,
            Known::ThisEntry => Some(Entry::Taken(id.to_string())),
            Known::Other => Some(Entry::Reject(format!(
                "a task with id {id:?} already exists; drop the prompt under another name (or a spec with another id)"
            ))),
        }
    };
    match ext {
        "md" => {
            if !valid_id(stem) {
                return Entry::Reject(format!(
                    "{stem:?} is not a valid task id (letters, digits, - _ . only)"
                ));
            }
            if let Some(e) = task_exists(stem) {
                return e;
            }
            let ws = workspace_dir(state_dir, stem);
            let prompt = match write_workspace_prompt(&ws, &bytes) {
                Ok(p) => p,
                Err(e) => {
                    return Entry::Reject(format!("cannot create workspace {}: {e}", ws.display()));
                }
            };
            let mut t = TaskState::new(
                stem,
                &prompt.display().to_string(),
                &ws.display().to_string(),
            );
            t.source = Some(name.to_string());
            t.source_key = Some(key);
            Entry::Task(Box::new(t))
        }
        "toml" => {
            let text = match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(_) => return Entry::Reject("is not valid UTF-8".into()),
            };
            let spec: Spec = match toml::from_str(&text) {
                Ok(s) => s,
                Err(e) => {
                    let line = e
                        .span()
                        .map(|s| crate::config::line_of(&text, s.start))
                        .unwrap_or(1);
                    return Entry::Reject(format!("line {line}: {}", e.message().trim()));
                }
            };
            match from_spec(spec, stem, name, max_prompt, &task_exists) {
                Entry::Task(mut t) => {
                    t.source_key = Some(key);
                    Entry::Task(t)
                }
                other => other,
            }
        }
        _ => Entry::Reject(
            "unknown kind of entry: expected a prompt (*.md) or a task spec (*.toml)".into(),
        ),
    }
}

fn from_spec(
    spec: Spec,
    stem: &str,
    name: &str,
    max_prompt: u64,
    task_exists: &dyn Fn(&str) -> Option<Entry>,
) -> Entry {
    let id = spec.id.clone().unwrap_or_else(|| stem.to_string());
    if !valid_id(&id) {
        return Entry::Reject(format!(
            "{id:?} is not a valid task id (letters, digits, - _ . only)"
        ));
    }
    if let Some(e) = task_exists(&id) {
        return e;
    }
    let prompt = PathBuf::from(&spec.prompt_file);
    let workdir = match &spec.workdir {
        Some(w) => PathBuf::from(w),
        None => prompt.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    if !workdir.is_absolute() {
        return Entry::Reject(format!(
            "workdir {} must be an absolute path",
            workdir.display()
        ));
    }
    if !workdir.is_dir() {
        return Entry::Reject(format!("workdir {} does not exist", workdir.display()));
    }
    let prompt = workdir.join(prompt);
    match std::fs::metadata(&prompt) {
        Ok(m) if m.is_file() && m.len() <= max_prompt => {}
        Ok(m) if m.is_file() => {
            return Entry::Reject(format!(
                "prompt file {} is {} bytes, over limits.max_prompt_size ({max_prompt})",
                prompt.display(),
                m.len()
            ));
        }
        Ok(_) => {
            return Entry::Reject(format!(
                "prompt file {} is not a regular file",
                prompt.display()
            ));
        }
        Err(e) => return Entry::Reject(format!("prompt file {}: {e}", prompt.display())),
    }
    if spec.max_iterations == Some(0) {
        return Entry::Reject("max_iterations must be at least 1".into());
    }
    if spec
        .max_runtime
        .is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= crate::config::MAX_SECONDS))
    {
        return Entry::Reject(
            "max_runtime must be a number of seconds greater than 0 and at most ten years".into(),
        );
    }
    let mut t = TaskState::new(
        &id,
        &prompt.display().to_string(),
        &workdir.display().to_string(),
    );
    t.max_iterations = spec.max_iterations;
    t.max_runtime = spec.max_runtime;
    t.source = Some(name.to_string());
    Entry::Task(Box::new(t))
}

fn read_nofollow(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let mut v = Vec::new();
    f.take(limit + 1).read_to_end(&mut v)?;
    Ok(v)
}

/// Moves a bad entry to `spool/rejected/` and writes the reason beside it.
pub fn reject(spool: &Path, path: &Path, reason: &str) -> std::io::Result<PathBuf> {
    let dir = spool.join("rejected");
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut dest = dir.join(&name);
    let mut n = 1;
    while std::fs::symlink_metadata(&dest).is_ok() {
        dest = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    std::fs::rename(path, &dest)?;
    let mut reason_path = dest.clone().into_os_string();
    reason_path.push(".reason");
    std::fs::write(reason_path, format!("{reason}\n"))?;
    Ok(dest)
}

/// Writes a file into `dir` so that it appears whole or not at all.
pub fn publish(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let dest = dir.join(name);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    if std::fs::symlink_metadata(&dest).is_ok() {
        let _ = std::fs::remove_file(&tmp);
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists", dest.display()),
        ));
    }
    std::fs::rename(&tmp, &dest)?;
    File::open(dir)?.sync_all()?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_naming_a_known_task_never_writes_its_workspace() {
        let dir = std::env::temp_dir().join(format!("spool-known-{}", std::process::id()));
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let ws = workspace_dir(&dir, "t1");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("PROMPT.md"), "the agent's work").unwrap();
        let entry = spool.join("t1.md");
        std::fs::write(&entry, "# new\n").unwrap();
        let key = entry_key(&std::fs::metadata(&entry).unwrap());
        // The same file, outliving a restart: only the entry goes.
        let same = |_: &str, k: &str| {
            if k == key {
                Known::ThisEntry
            } else {
                Known::Other
            }
        };
        assert!(matches!(examine(&dir, &entry, 1000, &same), Entry::Taken(id) if id == "t1"));
        // Another file of that name: rejected.
        let other = |_: &str, _: &str| Known::Other;
        assert!(
            matches!(examine(&dir, &entry, 1000, &other), Entry::Reject(r) if r.contains("already exists"))
        );
        assert_eq!(
            std::fs::read_to_string(ws.join("PROMPT.md")).unwrap(),
            "the agent's work"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

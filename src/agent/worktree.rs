//! Did an iteration change anything? A fingerprint of the prompt file and
//! the working tree, taken by the worker before and after an attempt, so
//! the scheduler can tell a loop that goes round without doing anything.
//!
//! In a git work tree: HEAD and `git status` (one process) and the size and
//! mtime of every path it lists (an agent that commits its work each iteration leaves a
//! clean tree and a new HEAD: that is progress). Elsewhere: the size and
//! mtime of every file under the working directory. The state directory is
//! left out either way (its transcripts change every iteration).

use super::contain::Containment;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Files looked at in a tree that is not a git work tree; a larger tree
/// has no fingerprint (and is never called stalled).
const MAX_FILES: usize = 100_000;

#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub prompt_file: PathBuf,
    pub workdir: PathBuf,
    pub state_dir: PathBuf,
    /// Take one before the attempt too (the task has none yet).
    pub baseline: bool,
    /// How long its `git status` may take.
    pub timeout: Duration,
}

/// The fingerprint, or None when it cannot be taken (unreadable tree, git
/// failing, too many files): no fingerprint never counts as a stall.
/// `prompt`: the prompt file's bytes, when the caller has just read them.
pub fn fingerprint(w: &WatchSpec, prompt: Option<&[u8]>, contain: &Containment) -> Option<u64> {
    let mut h = DefaultHasher::new();
    match prompt {
        Some(p) => p.hash(&mut h),
        // Bounded and never blocking: the agent may have made it a FIFO.
        None => crate::sys::regular::read(&w.prompt_file, 64 * 1024 * 1024)
            .ok()?
            .as_slice()
            .hash(&mut h),
    }
    let place = Place::of(w);
    let exclude = place.exclude.as_deref();
    let git = place
        .git_top
        .as_deref()
        .and_then(|top| git_state(top, exclude, w.timeout, contain, &mut h));
    match git {
        Some(()) => {}
        None => walk(&place.work, exclude, &mut h)?,
    }
    Some(h.finish())
}

/// Where a fingerprint looks: the working directory resolved, the state
/// directory to leave out, the git work tree it is in. Finding them takes
/// two path resolutions and a stat per parent directory; the workers keep
/// them for the tasks they ran, taken again when the working directory is
/// another (a different inode), when its `.git` came or went, and every few
/// seconds (a work tree made around it).
struct Place {
    state_dir: PathBuf,
    workdir: PathBuf,
    inode: (u64, u64),
    dot_git: bool,
    taken: Instant,
    work: PathBuf,
    exclude: Option<PathBuf>,
    git_top: Option<PathBuf>,
}

const PLACE_FRESH: Duration = Duration::from_secs(5);
const PLACES_KEPT: usize = 256;

static PLACES: std::sync::Mutex<Vec<Arc<Place>>> = std::sync::Mutex::new(Vec::new());

fn places() -> std::sync::MutexGuard<'static, Vec<Arc<Place>>> {
    PLACES.lock().unwrap_or_else(|e| e.into_inner())
}

impl Place {
    fn of(w: &WatchSpec) -> Arc<Place> {
        let inode = std::fs::metadata(&w.workdir)
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or((0, 0));
        let dot_git = w.workdir.join(".git").exists();
        let now = Instant::now();
        let fresh = |p: &Place| {
            p.workdir == w.workdir
                && p.state_dir == w.state_dir
                && p.inode == inode
                && inode != (0, 0)
                && p.dot_git == dot_git
                && now.duration_since(p.taken) < PLACE_FRESH
        };
        if let Some(p) = places().iter().find(|p| fresh(p)).cloned() {
            return p;
        }
        // Only a state directory inside the working directory (run's
        // WORKDIR/.ralph-qchat) is left out; a daemon's task workspace lies
        // inside the state directory and is looked at whole.
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let (state, work) = (canon(&w.state_dir), canon(&w.workdir));
        let exclude = (state.starts_with(&work) && state != work).then_some(state);
        let place = Arc::new(Place {
            state_dir: w.state_dir.clone(),
            workdir: w.workdir.clone(),
            inode,
            dot_git,
            taken: now,
            git_top: git_top(&work),
            work,
            exclude,
        });
        let mut c = places();
        c.retain(|p| p.workdir != w.workdir || p.state_dir != w.state_dir);
        if c.len() >= PLACES_KEPT {
            c.remove(0);
        }
        c.push(place.clone());
        place
    }
}

/// `git` for a fingerprint: no fsmonitor (an agent may have put a hook
/// there), within `timeout`; a hung one is killed and the iteration simply
/// has no fingerprint.
fn git(dir: &Path, args: &[&str], timeout: Duration, contain: &Containment) -> Option<Vec<u8>> {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(["-c", "core.fsmonitor=false"])
        .args(args)
        // Never take the index lock the agent may need.
        .env("GIT_OPTIONAL_LOCKS", "0")
        .env("GIT_TERMINAL_PROMPT", "0");
    let out = super::bounded::run(
        &cmd,
        Instant::now() + timeout,
        Duration::from_secs(1),
        None,
        contain,
        "fingerprint",
    )
    .ok()?;
    out.status.success().then_some(out.stdout)
}

/// The top of the git work tree `dir` is in, found without running git
/// (a tree that is not one costs no process).
fn git_top(dir: &Path) -> Option<PathBuf> {
    let mut d = Some(dir);
    while let Some(p) = d {
        if p.join(".git").exists() {
            return Some(p.to_path_buf());
        }
        d = p.parent();
    }
    None
}

/// One `git status` (porcelain v2, which names HEAD in its header, paths
/// relative to the top) and the size and mtime of every path it lists.
fn git_state(
    top: &Path,
    exclude: Option<&Path>,
    timeout: Duration,
    contain: &Containment,
    h: &mut DefaultHasher,
) -> Option<()> {
    let status = git(
        top,
        &[
            "status",
            "--porcelain=v2",
            "-z",
            "--branch",
            "--untracked-files=all",
        ],
        timeout,
        contain,
    )?;
    let mut records = status.split(|&b| b == 0).filter(|r| !r.is_empty());
    while let Some(r) = records.next() {
        let text = String::from_utf8_lossy(r);
        // Fields before the path: ordinary 8, rename/copy 9 (its origin is
        // the next record), unmerged 10, untracked/ignored 1.
        let fields = match text.as_bytes().first() {
            Some(b'#') => {
                if !text.starts_with("# branch.ab") {
                    r.hash(h);
                }
                continue;
            }
            Some(b'1') => 8,
            Some(b'2') => 9,
            Some(b'u') => 10,
            Some(b'?') | Some(b'!') => 1,
            _ => continue,
        };
        let Some(path) = text.splitn(fields + 1, ' ').nth(fields) else {
            continue;
        };
        if fields == 9 {
            records.next();
        }
        let full = top.join(path);
        if exclude.is_some_and(|e| full.starts_with(e)) {
            continue;
        }
        r.hash(h);
        if let Ok(m) = std::fs::symlink_metadata(&full) {
            (m.len(), m.mtime(), m.mtime_nsec()).hash(h);
        }
    }
    Some(())
}

fn walk(dir: &Path, exclude: Option<&Path>, h: &mut DefaultHasher) -> Option<()> {
    let mut entries: Vec<(PathBuf, u64, i64, i64)> = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let rd = std::fs::read_dir(&d).ok()?;
        for e in rd.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == ".git")
                || exclude.is_some_and(|e| p.starts_with(e))
            {
                continue;
            }
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                todo.push(p);
            } else {
                entries.push((p, m.len(), m.mtime(), m.mtime_nsec()));
                if entries.len() > MAX_FILES {
                    return None;
                }
            }
        }
    }
    entries.sort();
    entries.hash(h);
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rq-worktree-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("state/tasks")).unwrap();
        std::fs::write(d.join("PROMPT.md"), "task\n").unwrap();
        d
    }

    fn spec(d: &Path) -> WatchSpec {
        WatchSpec {
            prompt_file: d.join("PROMPT.md"),
            workdir: d.to_path_buf(),
            state_dir: d.join("state"),
            baseline: true,
            timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_plain_tree_changes_with_its_files_not_with_the_state_dir() {
        let d = scratch("plain");
        let w = spec(&d);
        let a = fingerprint(&w, None, &Containment::group_only()).unwrap();
        std::fs::write(d.join("state/tasks/log"), "transcript").unwrap();
        assert_eq!(fingerprint(&w, None, &Containment::group_only()), Some(a));
        std::fs::write(d.join("new.rs"), "fn main() {}").unwrap();
        let b = fingerprint(&w, None, &Containment::group_only()).unwrap();
        assert_ne!(a, b);
        std::fs::write(d.join("PROMPT.md"), "task\n- [x] step 1\n").unwrap();
        assert_ne!(fingerprint(&w, None, &Containment::group_only()), Some(b));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_working_directory_pointed_elsewhere_is_looked_at_where_it_now_is() {
        let d = scratch("moved");
        std::fs::create_dir_all(d.join("x")).unwrap();
        std::fs::create_dir_all(d.join("y")).unwrap();
        std::os::unix::fs::symlink(d.join("x"), d.join("w")).unwrap();
        let w = WatchSpec {
            workdir: d.join("w"),
            ..spec(&d)
        };
        let c = Containment::group_only();
        fingerprint(&w, None, &c).unwrap();
        std::fs::remove_file(d.join("w")).unwrap();
        std::os::unix::fs::symlink(d.join("y"), d.join("w")).unwrap();
        let a = fingerprint(&w, None, &c).unwrap();
        // What the worker kept of x must not be what it looks at now.
        std::fs::write(d.join("y/new.rs"), "fn main() {}").unwrap();
        assert_ne!(fingerprint(&w, None, &c), Some(a));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_workspace_inside_the_state_dir_is_looked_at_whole() {
        let d = scratch("workspace");
        let ws = d.join("state/workspaces/a");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(ws.join("PROMPT.md"), "task\n").unwrap();
        let w = WatchSpec {
            prompt_file: ws.join("PROMPT.md"),
            workdir: ws.clone(),
            state_dir: d.join("state"),
            baseline: true,
            timeout: Duration::from_secs(10),
        };
        let a = fingerprint(&w, None, &Containment::group_only()).unwrap();
        std::fs::write(ws.join("work.txt"), "1").unwrap();
        assert_ne!(fingerprint(&w, None, &Containment::group_only()), Some(a));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn in_git_a_commit_is_a_change_and_nothing_is_not() {
        let d = scratch("git");
        let g = |args: &[&str]| {
            let ok = Command::new("git")
                .current_dir(&d)
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@t",
                    "-c",
                    "commit.gpgsign=false",
                ])
                .args(args)
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "git {args:?}");
        };
        g(&["init", "-q"]);
        std::fs::write(d.join(".git/info/exclude"), "state/\n").unwrap();
        let w = spec(&d);
        let a = fingerprint(&w, None, &Containment::group_only()).unwrap();
        assert_eq!(fingerprint(&w, None, &Containment::group_only()), Some(a));
        std::fs::write(d.join("work.txt"), "1").unwrap();
        g(&["add", "-A"]);
        g(&["commit", "-q", "-m", "work"]);
        let b = fingerprint(&w, None, &Containment::group_only()).unwrap();
        assert_ne!(a, b, "a commit with a clean tree is progress");
        assert_eq!(fingerprint(&w, None, &Containment::group_only()), Some(b));
        std::fs::remove_dir_all(&d).unwrap();
    }
}

//! The spool intake: a thread that watches `<state_dir>/spool/` and
//! `<state_dir>/cancel/`, turns entries into messages for the scheduler, and
//! rejects bad entries with their reason. It writes no task state. It sleeps
//! on inotify (so an idle daemon does not poll the disk), with a rescan every
//! few seconds as a safety net, and every poll_interval where inotify is
//! unavailable.

use super::msg::{Control, Event};
use crate::store::spool::{self, Entry};
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// An entry handed over but not yet removed is offered again after this long
/// (the scheduler could not persist it). Entries are claimed first (moved to
/// `spool/.claimed/` by a rename that replaces nothing), so what the
/// scheduler removes is the file it recorded, never a later drop of the same
/// name.
const RESEND: Duration = Duration::from_secs(5);

pub struct Intake {
    pub state_dir: PathBuf,
    pub max_prompt: Arc<AtomicU64>,
    /// How much of spool/rejected is kept (paths.keep_rejected,
    /// paths.rejected_max_age), as the scheduler last configured it.
    pub rejected: Arc<Retention>,
    pub poll: Duration,
    pub events: Sender<Event>,
    pub stop: Arc<Stop>,
}

/// A count and an age, kept current across reloads.
#[derive(Debug, Default)]
pub struct Retention {
    pub keep: AtomicU64,
    /// Milliseconds; 0 = no age limit.
    pub max_age_ms: AtomicU64,
}

impl Retention {
    pub fn set(&self, keep: u32, max_age: f64) {
        self.keep.store(u64::from(keep), Ordering::Relaxed);
        self.max_age_ms
            .store((max_age * 1000.0) as u64, Ordering::Relaxed);
    }
}

/// spool/rejected is pruned this often, and after each rejection.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Tells the intake to finish, waking it at once.
pub struct Stop {
    flag: AtomicBool,
    wake: Option<OwnedFd>,
}

impl Stop {
    pub fn new() -> Arc<Stop> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        let wake = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        Arc::new(Stop {
            flag: AtomicBool::new(false),
            wake,
        })
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        if let Some(fd) = &self.wake {
            let one: u64 = 1;
            // SAFETY: an 8-byte write to our eventfd.
            unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    fn stopped(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

const RESCAN: Duration = Duration::from_secs(5);

/// An inotify descriptor watching the spool and cancel directories.
fn watch(dirs: &[&Path]) -> Option<OwnedFd> {
    // SAFETY: inotify_init1 returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own from here on.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO | libc::IN_CREATE | libc::IN_ATTRIB;
    for d in dirs {
        let c = std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a valid descriptor and C string.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return None;
        }
    }
    Some(fd)
}

/// A file someone is still writing into the spool must not be read half
/// done: an entry is taken once inotify saw it closed after writing or moved
/// in, or once it has not changed for this long (entries found at start-up,
/// or written while events were lost).
const SETTLED: Duration = Duration::from_secs(2);

/// Sleeps until the watched directories change, the stop is signalled, or
/// `limit` passes; returns the names inotify reported closed or moved in.
fn wait(inotify: Option<&OwnedFd>, stop: &Stop, limit: Duration) -> Vec<std::ffi::OsString> {
    let mut ready = Vec::new();
    let mut fds = Vec::new();
    for fd in [inotify, stop.wake.as_ref()].into_iter().flatten() {
        fds.push(libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    if fds.is_empty() {
        std::thread::sleep(limit);
        return ready;
    }
    // SAFETY: a valid array of pollfd.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            limit.as_millis() as i32,
        )
    };
    if let Some(fd) = inotify {
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: reading into our buffer from our non-blocking descriptor.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            let head = std::mem::size_of::<libc::inotify_event>();
            while off + head <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let name = &buf[off + head..(off + head + ev.len as usize).min(n as usize)];
                let name = name.split(|&b| b == 0).next().unwrap_or(&[]);
                if ev.mask & (libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO) != 0
                    && !name.is_empty()
                    && name[0] != b'.'
                {
                    use std::os::unix::ffi::OsStrExt;
                    ready.push(std::ffi::OsStr::from_bytes(name).to_os_string());
                }
                off += head + ev.len as usize;
            }
        }
    }
    ready
}

/// Written completely, as far as we can tell.
fn settled(path: &Path, ready: &std::collections::HashSet<std::ffi::OsString>) -> bool {
    if path.file_name().is_some_and(|n| ready.contains(n)) {
        return true;
    }
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .map(|t| t.elapsed().unwrap_or_default() >= SETTLED)
        .unwrap_or(true)
}

impl Intake {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("intake".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        let spool = spool::spool_dir(&self.state_dir);
        let cancels = spool::cancel_dir(&self.state_dir);
        let claimed = spool::claimed_dir(&self.state_dir);
        for d in [&spool, &cancels, &claimed] {
            if let Err(e) = std::fs::create_dir_all(d) {
                log::error!(
                    "cannot create {}: {e}; submissions there are not taken",
                    d.display()
                );
            }
        }
        let inotify = watch(&[&spool, &cancels]);
        if inotify.is_none() {
            log::warn!(
                "inotify is not available: looking at the spool every {:.2} s",
                self.poll.as_secs_f64()
            );
        }
        let mut sent: HashMap<PathBuf, Instant> = HashMap::new();
        let mut pruned_at: Option<Instant> = None;
        // Names inotify saw closed or moved in, not yet taken.
        let mut ready = std::collections::HashSet::new();
        while !self.stop.stopped() {
            // An entry still being written: look again soon.
            let mut pending_settle = false;
            let now = Instant::now();
            sent.retain(|p, at| {
                std::fs::symlink_metadata(p).is_ok() && now.duration_since(*at) < RESEND
            });
            // Entries claimed before a restart first: they are the oldest.
            for path in entries(&claimed) {
                if sent.contains_key(&path) {
                    continue;
                }
                if !self.spool_entry(&spool, &path) {
                    return;
                }
                sent.insert(path, now);
            }
            for path in entries(&spool) {
                let Some(name) = path.file_name().map(|n| n.to_os_string()) else {
                    continue;
                };
                // Ours, or still being written under a temporary name.
                if name.as_encoded_bytes().starts_with(b".")
                    || spool::being_written(&name.to_string_lossy())
                {
                    continue;
                }
                if !settled(&path, &ready) {
                    pending_settle = true;
                    continue;
                }
                ready.remove(&name);
                let path = match spool::claim(&self.state_dir, &path) {
                    Ok(Some(p)) => p,
                    // The entry of that name taken before is still on its
                    // way (or this one vanished): look again later.
                    Ok(None) => {
                        pending_settle = true;
                        continue;
                    }
                    Err(e) => {
                        log::error!(
                            "cannot take spool entry {}: {e}; it stays where it is",
                            path.display()
                        );
                        continue;
                    }
                };
                if !self.spool_entry(&spool, &path) {
                    return;
                }
                sent.insert(path, now);
            }
            if pruned_at.is_none_or(|t| t.elapsed() >= PRUNE_EVERY) {
                self.prune_rejected(&spool);
                pruned_at = Some(Instant::now());
            }
            for path in entries(&cancels) {
                if sent.contains_key(&path) {
                    continue;
                }
                let id = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if id.starts_with('.') {
                    continue;
                }
                let msg = Control::Cancel {
                    id,
                    request: path.clone(),
                };
                if self.events.send(Event::Control(msg)).is_err() {
                    return;
                }
                sent.insert(path, now);
            }
            let limit = match (inotify.is_some(), pending_settle) {
                (true, false) => RESCAN,
                (true, true) => Duration::from_millis(500),
                (false, _) => self.poll,
            };
            ready.extend(wait(inotify.as_ref(), &self.stop, limit));
            // Names of files gone meanwhile (cancel requests, removed entries).
            ready.retain(|n| spool.join(n).exists() || cancels.join(n).exists());
        }
    }

    /// Keeps spool/rejected within paths.keep_rejected and
    /// paths.rejected_max_age.
    fn prune_rejected(&self, spool: &Path) {
        let keep = self.rejected.keep.load(Ordering::Relaxed) as usize;
        let age = self.rejected.max_age_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let dir = spool.join("rejected");
        let r = crate::sys::prune::prune(&dir, keep, age, std::time::SystemTime::now());
        if r.removed > 0 {
            log::info!(
                "removed {} old entries from {} (paths.keep_rejected = {keep}, paths.rejected_max_age = {age} s)",
                r.removed,
                dir.display()
            );
        }
        for f in r.failed {
            log::warn!("cannot remove old rejected entry {f}");
        }
    }

    /// False when the scheduler is gone.
    fn spool_entry(&self, spool: &Path, path: &Path) -> bool {
        let tasks = self.state_dir.join("tasks");
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // A task from this very file means the entry outlived a restart
        // after the task was recorded; a later file of the same name is
        // another drop, never the same task.
        let known = |id: &str, key: &str| {
            let state = tasks.join(id).join("state.json");
            match crate::store::tasks::read_record(&state) {
                Ok(Some(t))
                    if t.source.as_deref() == Some(name.as_str())
                        && t.source_key.as_deref() == Some(key) =>
                {
                    spool::Known::ThisEntry
                }
                Ok(Some(_)) => spool::Known::Other,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => spool::Known::Other,
                _ => spool::Known::No,
            }
        };
        match spool::examine(
            &self.state_dir,
            path,
            self.max_prompt.load(Ordering::Relaxed),
            &known,
        ) {
            Entry::Skip => true,
            Entry::Taken(id) => {
                match std::fs::remove_file(path) {
                    Ok(()) => log::info!(task = id.as_str();
                        "spool entry {name} had been taken already (before a restart); removed"),
                    Err(e) => log::warn!(task = id.as_str();
                        "spool entry {name} had been taken already, but cannot be removed: {e}"),
                }
                true
            }
            Entry::Reject(reason) => {
                match spool::reject(spool, path, &reason) {
                    Ok(dest) => log::warn!(
                        "spool entry {name} rejected: {reason} (moved to {})",
                        dest.display()
                    ),
                    Err(e) => log::error!(
                        "spool entry {name} rejected ({reason}) but cannot be moved aside: {e}"
                    ),
                }
                self.prune_rejected(spool);
                true
            }
            Entry::Task(state) => {
                let msg = Control::Submit {
                    state,
                    entry: path.to_path_buf(),
                };
                self.events.send(Event::Control(msg)).is_ok()
            }
        }
    }
}

/// Directory entries in arrival order (modification time, then name).
fn entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name() != "rejected")
        .map(|e| {
            let t = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (t, e.path())
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

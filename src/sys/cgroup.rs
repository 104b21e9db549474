//! cgroups: where we are in the hierarchy, a subtree of our own, and one
//! cgroup per attempt — membership, kill and "empty" in the unified (v2)
//! hierarchy; limits in v2 controllers where the subtree has them, else in
//! the v1 memory and pids hierarchies of a hybrid host, as the deployment
//! guide does it. Only file-system operations: what they mean for an
//! attempt is `agent::contain`'s business.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The leaf the daemon moves itself into when its cgroup is delegated to it
/// (no process may sit in a cgroup whose children have controllers).
pub const SUPERVISOR_LEAF: &str = "supervisor";

/// Where a limit goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Controller {
    /// In the attempt's own cgroup v2.
    V2,
    /// In a v1 hierarchy, under this directory of ours.
    V1(PathBuf),
}

/// Our subtree: attempts' cgroups are made directly under `root`.
#[derive(Debug)]
pub struct Tree {
    pub root: PathBuf,
    /// The root, open: a cell's files are reached from it (one path
    /// component to resolve instead of the whole path, per request).
    root_fd: Arc<OwnedFd>,
    /// The root is the cgroup we were started in (delegated to us: a
    /// systemd unit with Delegate=yes, a container): not removed at exit.
    pub delegated: bool,
    pub memory: Option<Controller>,
    pub pids: Option<Controller>,
    /// Why a controller (memory, pids) could not be set up.
    pub notes: Vec<(&'static str, String)>,
}

/// How a child enters an attempt's cgroups: created in the v2 cgroup `dir`
/// (clone3 with CLONE_INTO_CGROUP), or by writing "0" to its cgroup.procs
/// (opened from `dir`) before exec; the v1 companions always by writing to
/// `v1_procs`.
#[derive(Debug, Default)]
pub struct Joins {
    pub dir: Option<RawFd>,
    pub v1_procs: Vec<RawFd>,
}

/// One attempt's cgroup (and its v1 companions).
#[derive(Debug)]
pub struct Cell {
    pub dir: PathBuf,
    name: CString,
    parent: Arc<OwnedFd>,
    dir_fd: OwnedFd,
    memory_v1: Option<PathBuf>,
    pids_v1: Option<PathBuf>,
    /// cgroup.procs of the v1 companions: the child writes "0" to each.
    procs: Vec<OwnedFd>,
    events: OwnedFd,
    /// Kept open: read before and after each attempt.
    cpu_stat: Option<OwnedFd>,
    memory: Option<Controller>,
    pids: Option<Controller>,
    /// cgroup.kill was written: never reused (a child started into a
    /// cgroup by clone3(CLONE_INTO_CGROUP) after its kill is killed at once
    /// on this kernel line: the kill sequence is compared with the parent's
    /// cgroup's).
    killed: std::sync::atomic::AtomicBool,
}

/// What an attempt's cgroup counted.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Counted {
    pub cpu_seconds: f64,
    pub peak_memory: Option<u64>,
    pub peak_processes: Option<u64>,
    pub oom_kills: u64,
}

fn err(path: &Path, what: &str, e: io::Error) -> String {
    format!("cannot {what} {}: {e}", path.display())
}

/// A mount point and the root of the hierarchy mounted there.
type Mount = (PathBuf, String);
/// A v1 controller's name and where its hierarchy is mounted.
type V1Mount = (String, PathBuf, String);

/// The cgroup2 mount and the v1 mounts holding memory or pids, from
/// /proc/self/mountinfo.
fn mounts(info: &str) -> (Option<Mount>, Vec<V1Mount>) {
    let mut v2 = None;
    let mut v1 = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(point), Some(fstype)) = (l.get(3), l.get(4), r.first()) else {
            continue;
        };
        match *fstype {
            "cgroup2" if v2.is_none() => v2 = Some((PathBuf::from(point), root.to_string())),
            "cgroup" => {
                let opts = r.get(2).copied().unwrap_or("");
                for c in opts.split(',') {
                    if c == "memory" || c == "pids" {
                        v1.push((c.to_string(), PathBuf::from(point), root.to_string()));
                    }
                }
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// Our path in the unified hierarchy ("0::/x") and in v1 hierarchy `ctl`.
fn own_path(cgroup: &str, ctl: Option<&str>) -> Option<String> {
    cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, names, path) = (f.next()?, f.next()?, f.next()?);
        let hit = match ctl {
            None => names.is_empty(),
            Some(c) => names.split(',').any(|n| n == c),
        };
        hit.then(|| path.to_string())
    })
}

/// `point` + `path`, `path` taken relative to the mount's own root.
fn join(point: &Path, mount_root: &str, path: &str) -> PathBuf {
    let rel = path.strip_prefix(mount_root).unwrap_or(path);
    point.join(rel.trim_start_matches('/'))
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    fs::write(path, value)
}

fn open(path: &Path, flags: i32) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: a valid C string and flags; the fd is checked.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

impl Tree {
    /// Makes our subtree: in a cgroup we have to ourselves, the cgroup itself
    /// (we move into a leaf of it); otherwise `name` under the cgroup we
    /// were started in. Err says why cgroups cannot be used.
    pub fn setup(name: &str) -> Result<Tree, String> {
        let info = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let cg = fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let (v2, v1) = mounts(&info);
        let (point, mroot) = v2.ok_or("no cgroup2 file system is mounted")?;
        let path =
            own_path(&cg, None).ok_or("this process has no cgroup v2 (/proc/self/cgroup)")?;
        let ours = join(&point, &mroot, &path);
        let me = std::process::id().to_string();
        let procs = fs::read_to_string(ours.join("cgroup.procs"))
            .map_err(|e| err(&ours.join("cgroup.procs"), "read", e))?;
        // Alone in a cgroup: ours (a unit with Delegate=yes, a container's
        // namespace root — the host's real root has no cgroup.kill).
        let delegated = procs.split_whitespace().all(|p| p == me)
            && (path != "/" || point.join("cgroup.kill").exists());
        let root = if delegated {
            let leaf = ours.join(SUPERVISOR_LEAF);
            mkdir(&leaf).map_err(|e| err(&leaf, "create", e))?;
            write(&leaf.join("cgroup.procs"), &me)
                .map_err(|e| err(&leaf.join("cgroup.procs"), "move into", e))?;
            ours
        } else {
            tidy(&ours);
            let root = ours.join(name);
            mkdir(&root).map_err(|e| err(&root, "create", e))?;
            root
        };
        if !root.join("cgroup.kill").exists() && !root.join("cgroup.freeze").exists() {
            return Err(format!(
                "{} has neither cgroup.kill nor cgroup.freeze (kernel older than 5.2)",
                root.display()
            ));
        }
        let root_fd =
            open(&root, libc::O_RDONLY | libc::O_DIRECTORY).map_err(|e| err(&root, "open", e))?;
        let mut tree = Tree {
            root,
            root_fd: Arc::new(root_fd),
            delegated,
            memory: None,
            pids: None,
            notes: Vec::new(),
        };
        let offered = fs::read_to_string(tree.root.join("cgroup.controllers")).unwrap_or_default();
        for ctl in ["memory", "pids"] {
            let ctl: &'static str = ctl;
            let v2_ok = offered.split_whitespace().any(|c| c == ctl)
                && write(
                    &tree.root.join("cgroup.subtree_control"),
                    &format!("+{ctl}"),
                )
                .is_ok();
            let place = if v2_ok {
                Some(Controller::V2)
            } else {
                tree.v1_place(&v1, &cg, ctl, name)
            };
            match ctl {
                "memory" => tree.memory = place,
                _ => tree.pids = place,
            }
        }
        Ok(tree)
    }

    /// Our directory in the v1 hierarchy of `ctl`, made under the cgroup we
    /// are in there.
    fn v1_place(
        &mut self,
        v1: &[V1Mount],
        cg: &str,
        ctl: &'static str,
        name: &str,
    ) -> Option<Controller> {
        let Some((_, point, mroot)) = v1.iter().find(|(c, _, _)| c == ctl) else {
            self.notes.push((
                ctl,
                format!("no {ctl} controller in this cgroup v2 subtree nor in cgroup v1"),
            ));
            return None;
        };
        let path = own_path(cg, Some(ctl))?;
        let parent = join(point, mroot, &path);
        tidy(&parent);
        let dir = parent.join(name);
        match mkdir(&dir) {
            Ok(()) => Some(Controller::V1(dir)),
            Err(e) => {
                self.notes.push((ctl, err(&dir, "create", e)));
                None
            }
        }
    }

    /// A new cgroup for one attempt, with its limits (0 = none) set before
    /// anything joins it.
    pub fn cell(&self, name: &str, max_memory: u64, max_processes: u64) -> io::Result<Cell> {
        let dir = self.root.join(name);
        let ctx = |what: &str, p: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("cannot {what} {}: {e}", p.display()))
        };
        let cname = cstring(name)?;
        let root = self.root_fd.as_raw_fd();
        // SAFETY: a directory fd we own and a C string.
        if unsafe { libc::mkdirat(root, cname.as_ptr(), 0o755) } != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(ctx("create", &dir, e));
            }
            // A leftover of the same name: ended and made anew, not used as
            // it is (a child clone3'd into a killed cgroup is killed too).
            destroy(&dir, Instant::now() + std::time::Duration::from_secs(2));
            // SAFETY: as above.
            if unsafe { libc::mkdirat(root, cname.as_ptr(), 0o755) } != 0 {
                return Err(ctx("create", &dir, io::Error::last_os_error()));
            }
        }
        self.open_cell(name, max_memory, max_processes)
    }

    /// The cell `name` under our root, made earlier and empty (a reused
    /// one), with no limit: what `cell` gives after its mkdir.
    pub fn reopen(&self, name: &str) -> io::Result<Cell> {
        self.open_cell(name, 0, 0)
    }

    /// Removes the empty cell `name` (one kept for reuse, at exit).
    pub fn remove_cell(&self, name: &str) {
        if let Ok(c) = cstring(name) {
            // SAFETY: a directory fd we own and a C string.
            unsafe { libc::unlinkat(self.root_fd.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
        }
    }

    fn open_cell(&self, name: &str, max_memory: u64, max_processes: u64) -> io::Result<Cell> {
        let dir = self.root.join(name);
        let ctx = |what: &str, p: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("cannot {what} {}: {e}", p.display()))
        };
        let cname = cstring(name)?;
        let root = self.root_fd.as_raw_fd();
        let dir_fd = open_at(root, &cname, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| ctx("open", &dir, e))?;
        let events = open_at(dir_fd.as_raw_fd(), c"cgroup.events", libc::O_RDONLY)
            .map_err(|e| ctx("open", &dir.join("cgroup.events"), e))?;
        let cpu_stat = open_at(dir_fd.as_raw_fd(), c"cpu.stat", libc::O_RDONLY).ok();
        let mut cell = Cell {
            procs: Vec::new(),
            events,
            cpu_stat,
            name: cname,
            parent: self.root_fd.clone(),
            dir_fd,
            dir,
            memory_v1: None,
            pids_v1: None,
            memory: self.memory.clone(),
            pids: self.pids.clone(),
            killed: Default::default(),
        };
        // A v1 companion only for a limit: joining one is a migration, which
        // costs every start an RCU grace period (CLONE_INTO_CGROUP spares the
        // v2 cgroup that).
        let v1_dir = |ctl: &Option<Controller>, limit: u64| -> io::Result<Option<PathBuf>> {
            let Some(Controller::V1(base)) = ctl else {
                return Ok(None);
            };
            if limit == 0 {
                return Ok(None);
            }
            let d = base.join(name);
            mkdir(&d).map_err(|e| ctx("create", &d, e))?;
            Ok(Some(d))
        };
        cell.memory_v1 = v1_dir(&self.memory, max_memory)?;
        cell.pids_v1 = v1_dir(&self.pids, max_processes)?;
        if cell.memory_v1.is_none() && matches!(self.memory, Some(Controller::V1(_))) {
            cell.memory = None;
        }
        if cell.pids_v1.is_none() && matches!(self.pids, Some(Controller::V1(_))) {
            cell.pids = None;
        }
        if max_memory > 0 {
            let v = max_memory.to_string();
            match &self.memory {
                Some(Controller::V2) => {
                    let p = cell.dir.join("memory.max");
                    write(&p, &v).map_err(|e| ctx("write", &p, e))?;
                    // The limit is memory, not memory + swap.
                    let _ = write(&cell.dir.join("memory.swap.max"), "0");
                }
                Some(Controller::V1(_)) => {
                    let d = cell.memory_v1.clone().unwrap_or_default();
                    let p = d.join("memory.limit_in_bytes");
                    write(&p, &v).map_err(|e| ctx("write", &p, e))?;
                    let _ = write(&d.join("memory.memsw.limit_in_bytes"), &v);
                }
                None => {}
            }
        }
        if max_processes > 0 {
            let v = max_processes.to_string();
            let p = match &self.pids {
                Some(Controller::V2) => Some(cell.dir.join("pids.max")),
                Some(Controller::V1(_)) => cell.pids_v1.as_ref().map(|d| d.join("pids.max")),
                None => None,
            };
            if let Some(p) = p {
                write(&p, &v).map_err(|e| ctx("write", &p, e))?;
            }
        }
        let dirs: Vec<PathBuf> = cell
            .memory_v1
            .iter()
            .chain(cell.pids_v1.iter())
            .cloned()
            .collect();
        for d in &dirs {
            let p = d.join("cgroup.procs");
            cell.procs
                .push(open(&p, libc::O_WRONLY).map_err(|e| ctx("open", &p, e))?);
        }
        Ok(cell)
    }

    /// Every attempt cgroup under our root: not the supervisor's leaf, nor
    /// a dot-name (systemd runs a delegated unit's ExecReload= in `.control`).
    pub fn cells(root: &Path) -> Vec<PathBuf> {
        let Ok(rd) = fs::read_dir(root) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter(|e| e.file_name() != SUPERVISOR_LEAF)
            .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
            .map(|e| e.path())
            .collect()
    }

    /// The directories to record so that the next start can find what
    /// this one leaves after a kill -9.
    pub fn record(&self) -> Vec<PathBuf> {
        let mut v = vec![self.root.clone()];
        for c in [&self.memory, &self.pids].into_iter().flatten() {
            if let Controller::V1(d) = c {
                v.push(d.clone());
            }
        }
        v
    }

    /// Removes our own (not delegated) directories at exit.
    pub fn remove(&self) {
        for d in self.record().iter().skip(usize::from(self.delegated)) {
            let _ = fs::remove_dir(d);
        }
    }
}

/// Removes the empty subtrees of instances that are gone (`ralph-qchat.PID`
/// of a dead PID, left by a kill -9 whose state directory nobody starts
/// again). rmdir removes only empty cgroups: anything still running stays,
/// for its own state directory's next start.
fn tidy(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ralph-qchat."))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for sub in Tree::cells(&e.path()) {
            let _ = fs::remove_dir(sub);
        }
        let _ = fs::remove_dir(e.path());
    }
}

/// Kills what is in the cgroup at `dir` and everything below it, waits up
/// to `until` for it to empty, and removes it. False when it did not empty.
pub fn destroy(dir: &Path, until: Instant) -> bool {
    for sub in Tree::cells(dir) {
        destroy(&sub, until);
    }
    let kill = write(&dir.join("cgroup.kill"), "1").is_ok();
    let empty = if dir.join("cgroup.events").exists() {
        match open(&dir.join("cgroup.events"), libc::O_RDONLY) {
            Ok(ev) => wait_empty(dir, &ev, until, kill),
            Err(_) => false,
        }
    } else {
        // A v1 directory: its processes are those of the v2 cgroup.
        true
    };
    let _ = fs::remove_dir(dir);
    empty
}

fn populated(events: &OwnedFd) -> Option<bool> {
    let mut buf = [0u8; 256];
    // SAFETY: pread into our buffer from an fd we own.
    let n = unsafe { libc::pread(events.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n <= 0 {
        return None;
    }
    let text = std::str::from_utf8(&buf[..n as usize]).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// Without cgroup.kill (kernels before 5.14): freeze, SIGKILL each member,
/// thaw (a frozen process cannot fork while we read the list).
fn kill_members(dir: &Path) {
    let _ = write(&dir.join("cgroup.freeze"), "1");
    if let Ok(s) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: SIGKILL to a member of a cgroup of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = write(&dir.join("cgroup.freeze"), "0");
}

/// Waits, on cgroup.events' change notifications, until `populated 0`.
fn wait_empty(dir: &Path, events: &OwnedFd, until: Instant, killed: bool) -> bool {
    loop {
        match populated(events) {
            Some(false) => return true,
            None => return false,
            Some(true) => {}
        }
        if !killed {
            kill_members(dir);
        }
        let now = Instant::now();
        if now >= until {
            return false;
        }
        let ms = until.duration_since(now).as_millis().min(i32::MAX as u128) as i32;
        // Without cgroup.kill a member may fork after the list was read:
        // look again at least every 50 ms then.
        let ms = if killed { ms } else { ms.min(50) };
        let mut p = libc::pollfd {
            fd: events.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack.
        unsafe { libc::poll(&mut p, 1, ms) };
    }
}

fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))
}

fn open_at(dir: RawFd, name: &std::ffi::CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: a directory fd and a C string; the fd is checked.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn write_at(dir: &OwnedFd, name: &std::ffi::CStr, value: &str) -> io::Result<()> {
    let f = open_at(dir.as_raw_fd(), name, libc::O_WRONLY)?;
    let mut f = fs::File::from(f);
    std::io::Write::write_all(&mut f, value.as_bytes())
}

fn read_at(dir: &OwnedFd, name: &std::ffi::CStr) -> Option<String> {
    let f = open_at(dir.as_raw_fd(), name, libc::O_RDONLY).ok()?;
    let mut s = String::new();
    std::io::Read::read_to_string(&mut fs::File::from(f), &mut s).ok()?;
    Some(s)
}

/// The start of a small interface file read through a descriptor kept
/// open: one pread, no allocation (cpu.stat is a few hundred bytes; a key
/// past the buffer is simply not found).
fn pread_start<'a>(fd: &OwnedFd, buf: &'a mut [u8]) -> Option<&'a str> {
    // SAFETY: a descriptor we hold and a buffer of buf.len() bytes.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).ok()?;
    std::str::from_utf8(&buf[..n]).ok()
}

fn key_of(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn keyed(path: &Path, key: &str) -> Option<u64> {
    key_of(&fs::read_to_string(path).ok()?, key)
}

impl Cell {
    /// How the child enters this cell.
    pub fn joins(&self) -> Joins {
        Joins {
            dir: Some(self.dir_fd.as_raw_fd()),
            v1_procs: self.procs.iter().map(|f| f.as_raw_fd()).collect(),
        }
    }

    /// Whether any process is in the cell now.
    pub fn populated(&self) -> bool {
        populated(&self.events) != Some(false)
    }

    /// Its name under the tree's root.
    pub fn name(&self) -> String {
        self.name.to_string_lossy().into_owned()
    }

    pub fn limits_memory(&self) -> bool {
        self.memory.is_some()
    }

    /// Whether what it counts can be counted again from a baseline: only
    /// CPU (usage_usec grows; a difference is one attempt's). memory.peak
    /// and pids.peak cannot be reset before Linux 6.12, and limits are
    /// written per cell: such a cell serves one attempt, as one that was
    /// killed does.
    pub fn reusable(&self) -> bool {
        !self.killed.load(std::sync::atomic::Ordering::Relaxed)
            && self.memory.is_none()
            && self.pids.is_none()
            && self.memory_v1.is_none()
            && self.pids_v1.is_none()
    }

    /// Kills every process in the cgroup at once (nothing to do when empty,
    /// the common case once the command has exited).
    pub fn kill(&self) -> bool {
        if !self.populated() {
            return true;
        }
        self.killed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let killed = write_at(&self.dir_fd, c"cgroup.kill", "1").is_ok();
        if !killed {
            kill_members(&self.dir);
        }
        killed
    }

    /// Kills and waits for `populated 0`, until `until`. False when it did not empty.
    pub fn empty(&self, until: Instant) -> bool {
        if !self.populated() {
            return true;
        }
        let killed = self.kill();
        wait_empty(&self.dir, &self.events, until, killed)
    }

    pub fn counted(&self) -> Counted {
        let mut buf = [0u8; 1024];
        let usec = match &self.cpu_stat {
            Some(fd) => pread_start(fd, &mut buf).and_then(|s| key_of(s, "usage_usec")),
            None => read_at(&self.dir_fd, c"cpu.stat").and_then(|s| key_of(&s, "usage_usec")),
        };
        let mut c = Counted {
            cpu_seconds: usec.unwrap_or(0) as f64 / 1e6,
            ..Counted::default()
        };
        match &self.memory {
            Some(Controller::V2) => {
                c.peak_memory = read_u64(&self.dir.join("memory.peak"));
                c.oom_kills = keyed(&self.dir.join("memory.events"), "oom_kill").unwrap_or(0);
            }
            Some(Controller::V1(_)) => {
                if let Some(d) = &self.memory_v1 {
                    c.peak_memory = read_u64(&d.join("memory.max_usage_in_bytes"));
                    c.oom_kills = keyed(&d.join("memory.oom_control"), "oom_kill").unwrap_or(0);
                }
            }
            None => {}
        }
        c.peak_processes = match &self.pids {
            Some(Controller::V2) => read_u64(&self.dir.join("pids.peak")),
            Some(Controller::V1(_)) => self
                .pids_v1
                .as_ref()
                .and_then(|d| read_u64(&d.join("pids.peak"))),
            None => None,
        };
        c
    }

    /// Removes the cgroup (and its v1 companions); it must be empty.
    pub fn remove(&self) -> io::Result<()> {
        // SAFETY: a directory fd we hold and a C string.
        let r = if unsafe {
            libc::unlinkat(
                self.parent.as_raw_fd(),
                self.name.as_ptr(),
                libc::AT_REMOVEDIR,
            )
        } == 0
        {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
        for d in self.memory_v1.iter().chain(self.pids_v1.iter()) {
            let _ = fs::remove_dir(d);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn hybrid_mounts_are_found() {
        let (v2, v1) = mounts(HYBRID);
        assert_eq!(
            v2,
            Some((PathBuf::from("/sys/fs/cgroup/unified"), "/".into()))
        );
        let names: Vec<&str> = v1.iter().map(|(c, _, _)| c.as_str()).collect();
        assert_eq!(names, ["memory", "pids"]);
    }

    #[test]
    fn own_paths_per_hierarchy() {
        let cg = "12:pids:/system.slice/x.service\n4:memory:/m\n2:cpu,cpuacct:/c\n0::/system.slice/x.service\n";
        assert_eq!(
            own_path(cg, None).as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(own_path(cg, Some("memory")).as_deref(), Some("/m"));
        assert_eq!(own_path(cg, Some("cpuacct")).as_deref(), Some("/c"));
        assert_eq!(own_path(cg, Some("blkio")), None);
    }

    #[test]
    fn paths_are_taken_relative_to_the_mount_root() {
        let p = join(
            Path::new("/sys/fs/cgroup"),
            "/docker/abc",
            "/docker/abc/sub",
        );
        assert_eq!(p, PathBuf::from("/sys/fs/cgroup/sub"));
        let p = join(Path::new("/sys/fs/cgroup"), "/", "/a/b");
        assert_eq!(p, PathBuf::from("/sys/fs/cgroup/a/b"));
    }
}

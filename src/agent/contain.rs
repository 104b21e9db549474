//! Containment: every process an attempt starts ends with the attempt.
//!
//! cgroup mode: the attempt's own cgroup, killed as a whole when its leader
//! exits or is stopped; the result waits for `populated 0`. subreaper mode:
//! what left the process group was reparented to us (`sys::reaper`) and is
//! found among our descendants by the attempt's mark. Both count what the
//! attempt used.

use super::group;
use crate::sys::cgroup::{self, Cell, Controller, Joins, Tree};
use crate::sys::proc;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the next start finds what this one leaves after a kill -9.
const RECORD: &str = "cgroups";
/// How long an attempt's end waits for its processes to be gone once killed,
/// beyond kill_grace. A process in uninterruptible sleep (a dead NFS server)
/// can take that long; the result is recorded then anyway, and said.
const SETTLE: Duration = Duration::from_secs(5);
/// Empty cells kept for reuse (one per worker is all a full pool needs):
/// the first MAX_OPEN open, the rest by name.
const MAX_SPARE: usize = 256;
const MAX_OPEN: usize = 64;

/// `[limits] containment`: a cgroup per attempt when this host lets us make
/// one, else the child subreaper and the attempt's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Auto,
    Cgroup,
    Subreaper,
}

use Mode as Asked;

#[derive(Debug)]
pub struct Containment {
    tree: Option<Tree>,
    /// Why this mode, for the start-up log, /health/detailed and the dump.
    pub why: String,
    /// Bytes and processes per attempt (0 = none); a reload changes them.
    max_memory: AtomicU64,
    max_processes: AtomicU64,
    seq: AtomicU64,
    /// The record of our own subtree, removed with it.
    record: Option<PathBuf>,
    /// Empty cells of ended attempts that count only CPU, for the next
    /// attempts: making and removing a cgroup per attempt was a seventh of
    /// the daemon's own CPU at high rates (the kernel creates and removes
    /// its interface files).
    spare: std::sync::Mutex<Spare>,
}

/// Kept open (three descriptors each) while attempts run, with the CPU each
/// had counted when its last attempt ended (nothing runs in it meanwhile):
/// reopening a cell and reading its cpu.stat before each start was 4% of
/// the daemon's CPU. Beyond MAX_OPEN, and once the pool is idle (`rest`),
/// by name, reopened when taken.
#[derive(Debug, Default)]
struct Spare {
    open: Vec<(Cell, f64)>,
    names: Vec<String>,
}

impl Spare {
    /// Keeps an empty cell (open when `open` and there is room), or gives
    /// it back to be removed when there is no room at all.
    fn put(&mut self, cell: Cell, cpu: f64, open: bool) -> Option<Cell> {
        if open && self.open.len() < MAX_OPEN {
            self.open.push((cell, cpu));
        } else if self.open.len() + self.names.len() < MAX_SPARE {
            self.names.push(cell.name());
        } else {
            return Some(cell);
        }
        None
    }
}

/// What an attempt used, as far as the mode can tell.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Resources {
    pub cpu_seconds: f64,
    /// The whole tree's peak (cgroup), or the largest single process's
    /// resident size (subreaper).
    pub peak_memory: Option<u64>,
    /// Most processes alive at once (pids.peak), where a pids controller counts.
    pub processes: Option<u64>,
    /// Processes the kernel killed at the memory limit.
    pub oom_kills: u64,
    /// Processes still there when the leader had exited, killed by us.
    pub killed: u64,
}

impl Resources {
    /// Nothing was started (a spawn failure, a cache hit).
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// One attempt's containment, from before its spawn to its end.
pub struct Jail<'a> {
    contain: &'a Containment,
    cell: Option<Cell>,
    marker: Option<String>,
    pgid: i32,
    /// Processes found running when the attempt was first ended (cgroup).
    left: std::cell::Cell<Option<u64>>,
    /// subreaper mode: the processes carrying the attempt's mark found alive
    /// and killed, by every look (`kill_all`, then `finish`). One look can
    /// miss a process another finds (inside execve), so they are counted
    /// together, not the largest of the looks.
    ended: std::cell::RefCell<Vec<i32>>,
    /// The cell was seen empty after the leader exited: it stays so (no
    /// process of it is left to fork, nothing else starts in it), so the
    /// end needs no second look.
    seen_empty: std::cell::Cell<bool>,
    /// CPU the cell had counted before this attempt (a reused cell).
    cpu_before: f64,
}

impl Containment {
    /// Sets the mode up (the state lock must be held) and ends what an
    /// earlier instance on `state_dir` left. Err: cgroup asked for and unusable.
    pub fn establish(
        asked: Asked,
        max_memory_mb: u64,
        max_processes: u64,
        state_dir: &Path,
    ) -> Result<Containment, String> {
        if let Err(e) = crate::sys::reaper::start() {
            log::warn!(
                "cannot become a child subreaper ({e}): processes that leave an agent's session are reparented to init and found only by their mark"
            );
        }
        let mut c = Containment {
            tree: None,
            why: String::new(),
            max_memory: AtomicU64::new(max_memory_mb.saturating_mul(1024 * 1024)),
            max_processes: AtomicU64::new(max_processes),
            seq: AtomicU64::new(0),
            record: None,
            spare: Default::default(),
        };
        let leftovers = read_record(state_dir);
        match asked {
            Asked::Subreaper => c.why = "[limits] containment = \"subreaper\"".into(),
            Asked::Cgroup | Asked::Auto => {
                match Tree::setup(&format!("ralph-qchat.{}", std::process::id())) {
                    Ok(t) => {
                        c.why = format!(
                            "cgroup v2 {} is {}",
                            t.root.display(),
                            if t.delegated {
                                "delegated to us"
                            } else {
                                "writable"
                            }
                        );
                        c.tree = Some(t);
                    }
                    Err(e) if asked == Asked::Cgroup => {
                        return Err(format!(
                            "[limits] containment = \"cgroup\" but cgroups cannot be used here: {e}; run as root or under the shipped unit (Delegate=yes), or set containment = \"auto\""
                        ));
                    }
                    Err(e) => c.why = format!("no usable cgroup v2 ({e})"),
                }
            }
        }
        c.end_leftover_cgroups(&leftovers);
        // A delegated root is ours whatever the instance: its cells are
        // looked at above at every start, it needs no record.
        let ours: Vec<PathBuf> = c
            .tree
            .as_ref()
            .map(|t| {
                t.record()
                    .into_iter()
                    .skip(usize::from(t.delegated))
                    .collect()
            })
            .unwrap_or_default();
        if !ours.is_empty() {
            let lines: Vec<String> = ours.iter().map(|p| p.display().to_string()).collect();
            c.record = Some(state_dir.join(RECORD));
            if let Err(e) = write_record(state_dir, &lines) {
                log::warn!(
                    "cannot record this instance's cgroups in {}: {e}; after a kill -9 the next start will not find what they hold",
                    state_dir.join(RECORD).display()
                );
            }
        } else {
            let _ = std::fs::remove_file(state_dir.join(RECORD));
        }
        Ok(c)
    }

    /// No containment beyond the process group (unit tests, tools).
    pub fn group_only() -> Containment {
        Containment {
            tree: None,
            why: "process group only".into(),
            max_memory: AtomicU64::new(0),
            max_processes: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            record: None,
            spare: Default::default(),
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.tree.is_some() {
            "cgroup"
        } else {
            "subreaper"
        }
    }

    /// "cgroup (cgroup v2 … is delegated to us; memory: v1 …)".
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({}", self.mode(), self.why);
        if let Some(t) = &self.tree {
            for (name, ctl) in [("memory", &t.memory), ("pids", &t.pids)] {
                let at = match ctl {
                    Some(Controller::V2) => "cgroup v2".to_string(),
                    Some(Controller::V1(d)) => format!("cgroup v1 {}", d.display()),
                    None => "none".to_string(),
                };
                s.push_str(&format!("; {name}: {at}"));
            }
        }
        s.push(')');
        s
    }

    /// The limits of attempts started from now on (a reload); says which
    /// of them this host cannot enforce.
    pub fn set_limits(&self, max_memory_mb: u64, max_processes: u64) {
        self.max_memory
            .store(max_memory_mb.saturating_mul(1024 * 1024), Ordering::Relaxed);
        self.max_processes.store(max_processes, Ordering::Relaxed);
        for u in self.unenforced() {
            log::warn!("containment: {u}");
        }
    }

    /// The configured limits this host does not enforce, and why.
    pub fn unenforced(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (memory, pids) = match &self.tree {
            Some(t) => (t.memory.is_some(), t.pids.is_some()),
            None => (false, false),
        };
        let max_memory = self.max_memory.load(Ordering::Relaxed);
        let max_processes = self.max_processes.load(Ordering::Relaxed);
        if let Some(t) = &self.tree {
            // Why a controller is missing matters only where a limit needs it.
            for (ctl, n) in &t.notes {
                if (*ctl == "memory" && max_memory > 0) || (*ctl == "pids" && max_processes > 0) {
                    out.push(n.clone());
                }
            }
        }
        if max_memory > 0 && !memory {
            out.push(
                "max_memory_mb is the address-space limit (RLIMIT_AS) of each command, not a limit of its whole process tree: no memory controller is usable".into(),
            );
        }
        if max_processes > 0 && !pids {
            out.push(
                "max_processes is not enforced: no pids controller is usable (RLIMIT_NPROC does not bind root)".into(),
            );
        }
        out
    }

    /// Kills and removes the cgroups an earlier instance recorded, and any
    /// attempt cgroup left in a delegated root.
    fn end_leftover_cgroups(&self, recorded: &[PathBuf]) {
        let until = Instant::now() + SETTLE;
        let mine = self.tree.as_ref().map(|t| t.record()).unwrap_or_default();
        let mut dirs: Vec<PathBuf> = Vec::new();
        for p in recorded {
            if mine.contains(p) {
                dirs.extend(Tree::cells(p));
            } else if p.is_dir() {
                dirs.push(p.clone());
            }
        }
        if let Some(t) = &self.tree
            && t.delegated
        {
            for d in Tree::cells(&t.root) {
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
        for d in dirs {
            let n = count_tree(&d);
            let empty = cgroup::destroy(&d, until);
            if n > 0 || !empty {
                log::warn!(
                    "ended {n} process(es) an earlier instance left in cgroup {}{}",
                    d.display(),
                    if empty {
                        String::new()
                    } else {
                        "; it did not empty and is left in place".into()
                    }
                );
            }
        }
    }

    /// No attempt runs: the spare cells' descriptors are closed, the cells
    /// kept by name (reopened when next taken). A daemon at rest holds no
    /// more descriptors after a busy hour than before it.
    pub fn rest(&self) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        for (cell, cpu) in std::mem::take(&mut spare.open) {
            if let Some(c) = spare.put(cell, cpu, false) {
                let _ = c.remove();
            }
        }
    }

    /// An empty cell of an earlier attempt and the CPU it had counted.
    fn take_spare(&self) -> Option<(Cell, f64)> {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = spare.open.pop() {
            drop(spare);
            // One removed by hand meanwhile reads as populated (its files
            // are gone): left, and a new one made.
            return (!c.0.populated()).then_some(c);
        }
        let name = spare.names.pop()?;
        drop(spare);
        // Gone (removed by hand): a new one is made.
        let c = self.tree.as_ref()?.reopen(&name).ok()?;
        let cpu = c.counted().cpu_seconds;
        Some((c, cpu))
    }

    /// Removes our own subtree (at exit, when no attempt runs).
    pub fn close(&self) {
        let spare = std::mem::take(&mut *self.spare.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(t) = &self.tree {
            for (cell, _) in spare.open {
                let _ = cell.remove();
            }
            for name in spare.names {
                t.remove_cell(&name);
            }
            t.remove();
            // Kept while something is left in our subtree (a process in
            // uninterruptible sleep): the next start ends it.
            if let Some(r) = &self.record
                && !t.root.exists()
            {
                let _ = std::fs::remove_file(r);
            }
        }
    }

    /// Containment for one attempt. `label` names its cgroup (the task).
    pub fn enter(&self, label: &str, marker: Option<String>) -> Jail<'_> {
        let (m, p) = (
            self.max_memory.load(Ordering::Relaxed),
            self.max_processes.load(Ordering::Relaxed),
        );
        // An empty cell of an earlier attempt, where nothing but CPU is counted.
        let (reused, cpu_before) = match (m == 0 && p == 0).then(|| self.take_spare()).flatten() {
            Some((c, cpu)) => (Some(c), cpu),
            None => (None, 0.0),
        };
        let cell = reused.or_else(|| {
            let t = self.tree.as_ref()?;
            let name = format!(
                "{}.{}",
                sanitize(label),
                self.seq.fetch_add(1, Ordering::Relaxed)
            );
            match t.cell(&name, m, p) {
                Ok(c) => Some(c),
                Err(e) => {
                    log::error!(task = label;
                        "cannot make this attempt's cgroup ({e}); it runs contained by its process group and mark only");
                    None
                }
            }
        });
        Jail {
            contain: self,
            cell,
            marker,
            pgid: 0,
            left: std::cell::Cell::new(None),
            ended: std::cell::RefCell::new(Vec::new()),
            seen_empty: std::cell::Cell::new(false),
            cpu_before,
        }
    }
}

impl Jail<'_> {
    pub fn joins(&self) -> Joins {
        self.cell.as_ref().map(Cell::joins).unwrap_or_default()
    }

    /// RLIMIT_AS for the command: only where no cgroup limits the memory.
    pub fn rlimit_as(&self) -> u64 {
        match &self.cell {
            Some(c) if c.limits_memory() => 0,
            _ => self.contain.max_memory.load(Ordering::Relaxed),
        }
    }

    pub fn started(&mut self, pid: i32) {
        self.pgid = pid;
    }

    /// Kills everything of the attempt at once (the leader too, if alive).
    pub fn kill_all(&self) {
        let first = self.left.get().is_none();
        match &self.cell {
            Some(c) => {
                let populated = c.populated();
                if first {
                    let n = if populated { count_procs(&c.dir) } else { 0 };
                    self.left.set(Some(n as u64));
                }
                if populated {
                    c.kill();
                } else if self.pgid > 0 {
                    self.seen_empty.set(true);
                }
            }
            None => {
                // The group's members carry the mark too: counted first.
                self.kill_marked();
                if self.pgid > 0 {
                    // SAFETY: SIGKILL to the process group our child leads.
                    unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
                }
            }
        }
    }

    /// After the leader is reaped: nothing of the attempt is alive when this
    /// returns (or `grace` + SETTLE has passed, said in the log). Then what
    /// it used.
    pub fn finish(mut self, grace: Duration, leader: Option<(f64, u64)>, task: &str) -> Resources {
        let until = Instant::now() + grace + SETTLE;
        let mut r = Resources::default();
        match self.cell.take() {
            Some(c) => {
                let left = self
                    .left
                    .get()
                    .unwrap_or_else(|| count_procs(&c.dir) as u64);
                let emptied = self.seen_empty.get() || c.empty(until);
                if !emptied {
                    log::error!(task = task;
                        "processes of cgroup {} did not end within {:.0?} of SIGKILL (uninterruptible sleep?); the cgroup is left in place and ended at the next start",
                        c.dir.display(), grace + SETTLE);
                }
                let counted = c.counted();
                r = Resources {
                    cpu_seconds: (counted.cpu_seconds - self.cpu_before).max(0.0),
                    // Without a memory controller: the largest process's.
                    peak_memory: counted.peak_memory.or(leader.map(|l| l.1)),
                    processes: counted.peak_processes,
                    oom_kills: counted.oom_kills,
                    killed: left,
                };
                let unkept = match emptied && c.reusable() {
                    true => self
                        .contain
                        .spare
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .put(c, counted.cpu_seconds, true),
                    false => Some(c),
                };
                if let Some(c) = unkept {
                    if let Err(e) = c.remove() {
                        log::warn!(task = task; "cannot remove cgroup {}: {e}", c.dir.display());
                    }
                }
            }
            None => {
                self.sweep(until);
                r.killed = self.ended.borrow().len() as u64;
                if let Some((cpu, rss)) = leader {
                    r.cpu_seconds = cpu;
                    r.peak_memory = Some(rss);
                }
            }
        }
        if r.killed > 0 {
            // They have exited: their zombies, orphans of ours, go now, not
            // at the reaper's next look (up to 50 ms away).
            crate::sys::reaper::reap_now();
            log::info!(task = task; "ended {} process(es) the attempt left running", r.killed);
        }
        r
    }

    /// subreaper mode: kills the leader's group and every descendant of
    /// ours carrying the attempt's mark, until none is alive.
    fn sweep(&self, until: Instant) {
        // The marked ones are found before the group is killed: a member
        // killed with the group first (a `nohup cmd &` stays in the agent's
        // group) could be a zombie, or reaped, by the time the scan looked,
        // and went uncounted.
        let mut alive = self.kill_marked();
        if self.pgid > 0 && group::group_alive(self.pgid) {
            // SAFETY: SIGKILL to the process group our child led.
            unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        }
        while !alive.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
            alive = self.kill_marked();
        }
    }

    /// SIGKILL to the live descendants of ours that carry the attempt's
    /// mark; returns them, and adds them to `ended`.
    fn kill_marked(&self) -> Vec<i32> {
        let Some(marker) = &self.marker else {
            return Vec::new();
        };
        let needle = format!("{}={marker}", super::spawn::MARKER_VAR);
        // Called once the leader has exited: what it left was reparented to us.
        let alive: Vec<i32> = proc::adopted()
            .into_iter()
            .filter(|&p| !matches!(proc::state_and_group(p), Some(('Z', _)) | None))
            .filter(|&p| {
                proc::environ(p)
                    .is_some_and(|env| env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()))
            })
            .collect();
        let mut ended = self.ended.borrow_mut();
        for p in &alive {
            // SAFETY: SIGKILL to a descendant of ours carrying the attempt's mark.
            unsafe { libc::kill(*p, libc::SIGKILL) };
            if !ended.contains(p) {
                ended.push(*p);
            }
        }
        alive
    }
}

/// Processes in the cgroup at `dir` and below.
fn count_tree(dir: &Path) -> usize {
    count_procs(dir)
        + Tree::cells(dir)
            .iter()
            .map(|d| count_tree(d))
            .sum::<usize>()
}

fn count_procs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.split_whitespace().count())
        .unwrap_or(0)
}

/// The record, written whole or not at all (temp file, rename).
fn write_record(state_dir: &Path, lines: &[String]) -> std::io::Result<()> {
    let tmp = state_dir.join(format!(".{RECORD}.tmp"));
    std::fs::write(&tmp, format!("{}\n", lines.join("\n")))?;
    std::fs::rename(&tmp, state_dir.join(RECORD))
}

fn read_record(state_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string(state_dir.join(RECORD))
        .map(|s| s.lines().filter_map(recorded).collect())
        .unwrap_or_default()
}

/// A recorded directory, only if it is one of our own subtrees: whatever
/// the file says, nothing else is ever killed and removed.
fn recorded(line: &str) -> Option<PathBuf> {
    let p = PathBuf::from(line.trim());
    let name = p.file_name()?.to_str()?;
    let pid = name.strip_prefix("ralph-qchat.")?;
    let digits = !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit());
    (p.starts_with("/sys/fs/cgroup") && digits && !line.contains("..")).then_some(p)
}

/// A cgroup name from a task id: no '/', no leading dot, bounded.
fn sanitize(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    if s.is_empty() { "attempt".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_own_subtrees_are_taken_from_the_record() {
        assert!(recorded("/sys/fs/cgroup/unified/ralph-qchat.12").is_some());
        assert!(recorded("/sys/fs/cgroup/memory/x/ralph-qchat.12\n").is_some());
        for bad in [
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup/unified/ralph-qc",
            "/sys/fs/cgroup/system.slice/ralph-qchat.service/..",
            "/etc/ralph-qchat.1",
            "/sys/fs/cgroup/system.slice/ralph-qchat.service",
            "",
        ] {
            assert_eq!(recorded(bad), None, "{bad}");
        }
    }

    /// Runs as root (the suite does here): cgroup mode needs a writable cgroup.
    #[test]
    fn a_child_starts_inside_its_cell_by_clone3_and_by_joining_it() {
        let dir = std::env::temp_dir().join(format!("contain-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = Containment::establish(Mode::Cgroup, 0, 0, &dir).unwrap();
        let root = c.tree.as_ref().unwrap().root.clone();
        let mut seen = Vec::new();
        for by_write in [false, true] {
            super::super::spawn::force_join_by_write(by_write);
            let f = super::super::bounded::run(
                std::process::Command::new("cat").arg("/proc/self/cgroup"),
                Instant::now() + Duration::from_secs(10),
                Duration::from_secs(1),
                None,
                &c,
                "unit",
            )
            .unwrap();
            let text = String::from_utf8_lossy(&f.stdout).into_owned();
            let v2 = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("")
                .to_string();
            seen.push(v2);
        }
        super::super::spawn::force_join_by_write(false);
        c.close();
        let _ = std::fs::remove_dir_all(&dir);
        let name = root.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            seen[0].ends_with(&format!("{name}/unit.0")),
            "clone3: {seen:?}"
        );
        // The second attempt takes the first one's cell, empty again.
        assert!(
            seen[1].ends_with(&format!("{name}/unit.0")),
            "joining: {seen:?}"
        );
    }

    #[test]
    fn cgroup_names_are_safe() {
        assert_eq!(sanitize("../etc/x.y"), "___etc_x_y");
        assert_eq!(sanitize(""), "attempt");
        assert_eq!(sanitize(&"a".repeat(100)).len(), 48);
    }
}

//! Every read of /proc (and statvfs): this process's size and age, the
//! machine's memory and CPU, other processes' state, group and environment.
//! Parsed by hand rather than with the procfs crate: the few fields needed
//! here cost less than its five crates, and the process-group scan runs when
//! an agent ends, where procfs would parse all 52 stat fields of every process.

use std::path::Path;
use std::sync::Mutex;

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as u64 } else { 4096 }
}

/// Fields of /proc/<who>/stat after the command name (field 3 is index 0);
/// the name may hold spaces and parentheses, so split after its last `)`.
fn stat_fields(who: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

pub fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// A number (KiB, or a count) from /proc/self/status, e.g. `VmRSS:`.
pub fn status_field(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

pub fn cpu_seconds() -> Option<f64> {
    let f = stat_fields("self")?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

pub fn threads() -> Option<u64> {
    stat_fields("self")?.get(17)?.parse().ok()
}

pub fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// Seconds since the epoch when this process started.
pub fn start_time() -> Option<f64> {
    let start_ticks: f64 = stat_fields("self")?.get(19)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: f64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime + start_ticks / clk_tck())
}

pub fn memory_percent() -> Option<f64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let get = |k: &str| -> Option<f64> {
        m.lines()
            .find_map(|l| l.strip_prefix(k))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let total = get("MemTotal:")?;
    let avail = get("MemAvailable:")?;
    (total > 0.0).then(|| 100.0 * (total - avail) / total)
}

pub fn disk_percent(path: &Path) -> Option<f64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a struct we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let total = s.f_blocks as f64 * s.f_frsize as f64;
    let free = s.f_bfree as f64 * s.f_frsize as f64;
    (total > 0.0).then(|| 100.0 * (total - free) / total)
}

/// CPU use of the machine since the previous call (since boot the first time).
pub struct CpuMeter {
    last: Mutex<Option<(u64, u64)>>,
}

impl CpuMeter {
    pub fn new() -> CpuMeter {
        CpuMeter {
            last: Mutex::new(None),
        }
    }

    pub fn percent(&self) -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let total: u64 = cpu.iter().sum();
        let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
        let mut last = self.last.lock().ok()?;
        let (t0, i0) = last.unwrap_or((0, 0));
        *last = Some((total, idle));
        let dt = total.saturating_sub(t0);
        (dt > 0).then(|| 100.0 * (dt - idle.saturating_sub(i0).min(dt)) as f64 / dt as f64)
    }
}

impl Default for CpuMeter {
    fn default() -> Self {
        Self::new()
    }
}

/// The pids of every process, as /proc lists them now; None when /proc
/// cannot be read.
pub fn pids() -> Option<Vec<i32>> {
    let dir = std::fs::read_dir("/proc").ok()?;
    Some(
        dir.flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect(),
    )
}

/// (state letter, process group) of a process; None when it is gone.
pub fn state_and_group(pid: i32) -> Option<(char, i32)> {
    let f = stat_fields(&pid.to_string())?;
    let state = f.first()?.chars().next()?;
    let pgrp = f.get(2)?.parse().ok()?;
    Some((state, pgrp))
}

/// The processes reparented to this process (a child subreaper) and all
/// their descendants, zombies included. The kernel gives an orphan to the
/// subreaper's first live thread, the main one, whose own children these are
/// (workers start the agents): the cost is the size of what escaped, not of
/// /proc nor of every running agent.
pub fn adopted() -> Vec<i32> {
    let me = std::process::id();
    let Some(roots) = children(format!("/proc/{me}/task/{me}/children")) else {
        return Vec::new();
    };
    let mut found = roots.clone();
    for r in roots {
        for d in descendants(r) {
            if !found.contains(&d) {
                found.push(d);
            }
        }
    }
    found
}

/// The pids of a `children` file, read in one read(2) where they fit in
/// 64 KiB. The kernel lists them from a position at each read: a child
/// reaped between two reads (our reaper reaps what a sweep killed) shifted
/// the rest, and the next read skipped one still alive; std's
/// `read_to_string` reads 32 bytes at a time here, so six pids took two.
pub fn children(path: impl AsRef<std::path::Path>) -> Option<Vec<i32>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0;
    loop {
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if len == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    Some(
        String::from_utf8_lossy(&buf[..len])
            .split_whitespace()
            .filter_map(|c| c.parse().ok())
            .collect(),
    )
}

/// Every descendant of `pid` alive now (zombies included), from the
/// `children` lists of its threads and theirs.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let mut path = t.path();
            path.push("children");
            let Some(list) = children(&path) else {
                continue;
            };
            for c in list {
                if !found.contains(&c) {
                    found.push(c);
                    next.push(c);
                }
            }
        }
        if found.len() > 100_000 {
            break;
        }
    }
    found
}

/// `flags` of /proc/PID/stat: the process is a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The raw `NAME=value` entries of a process's environment.
///
/// A process inside execve reads as having none: between the new program's
/// memory map and its stack being laid out, environ and cmdline are both
/// empty (a shell that re-executes itself read so 17% of the time here).
/// So an empty environ is read again until it is not, for up to 250 ms,
/// and taken for a process without an environment (`env -i`) only after
/// five looks in a row that saw its command line: one look can fall in
/// the next exec of a process that keeps executing (a busy machine
/// preempts us between the reads). A zombie is gone (None); a kernel
/// thread has none, at once. Without this a
/// tool shell caught in its exec looked unmarked and was not ended.
pub fn environ(pid: i32) -> Option<Vec<u8>> {
    let path = format!("/proc/{pid}/environ");
    let cmdline = format!("/proc/{pid}/cmdline");
    let until = std::time::Instant::now() + std::time::Duration::from_millis(250);
    let mut settled = 0;
    loop {
        let env = std::fs::read(&path).ok()?;
        if !env.is_empty() {
            return Some(env);
        }
        if std::fs::read(&cmdline).ok()?.is_empty() {
            settled = 0;
        } else {
            settled += 1;
        }
        // A process that is exiting has let go of its memory too; a kernel
        // thread never had any (the start-up sweep looks at every process,
        // and on a host with hundreds of them waiting here would hold the
        // start for minutes).
        let f = stat_fields(&pid.to_string())?;
        if matches!(
            f.first().and_then(|s| s.chars().next()),
            None | Some('Z' | 'X')
        ) {
            return None;
        }
        let flags: u64 = f.get(6).and_then(|x| x.parse().ok()).unwrap_or(0);
        if flags & PF_KTHREAD != 0 || settled == 5 || std::time::Instant::now() >= until {
            return Some(env);
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// The name of the user this process runs as, from /etc/passwd.
pub fn user_name() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let _ = f.next();
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

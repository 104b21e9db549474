//! Process groups: is anything of a group still alive, and killing leftovers.

use std::time::{Duration, Instant};

/// True while a process of group `pgid` exists that is not a zombie. Zombies
/// count as gone: they hold nothing and their parent (often init) reaps them.
pub fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(-pgid, 0) } != 0 {
        return false;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return true;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            return false;
        };
        matches!(stat_of(pid), Some((state, pg)) if pg == pgid && state != 'Z')
    })
}

/// (state, process group) from /proc/<pid>/stat.
fn stat_of(pid: i32) -> Option<(char, i32)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// Sends SIGTERM to the group, waits up to `grace` for it to go, then SIGKILL.
/// Returns at once when the group is already gone.
pub fn terminate_group(pgid: i32, grace: Duration) {
    if !group_alive(pgid) {
        return;
    }
    // SAFETY: signalling a process group we created.
    unsafe { libc::kill(-pgid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !group_alive(pgid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}

/// Kills processes left by an earlier instance that died without cleaning up
/// (kill -9): they carry a marker starting with `prefix` in their environment.
/// Returns (the rest of the marker, pid) of each process signalled.
///
/// Looks again until a pass finds nothing new: a leftover that was forking
/// while the first pass read /proc may have started a child it did not see.
pub fn kill_leftovers(prefix: &str) -> Vec<(String, i32)> {
    let mut killed: Vec<(String, i32)> = Vec::new();
    for _ in 0..10 {
        let found = marked_processes(prefix);
        let fresh: Vec<_> = found
            .into_iter()
            .filter(|(_, pid)| !killed.iter().any(|(_, k)| k == pid))
            .collect();
        if fresh.is_empty() {
            break;
        }
        for (_, pid) in &fresh {
            // SAFETY: SIGKILL to a process that carries our own marker.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        killed.extend(fresh);
    }
    killed
}

/// Processes (not zombies, not this one) whose marker variable starts with
/// `prefix`, with what follows the prefix.
fn marked_processes(prefix: &str) -> Vec<(String, i32)> {
    let me = std::process::id() as i32;
    let needle = format!("{}={prefix}", crate::agent::spawn::MARKER_VAR);
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || matches!(stat_of(pid), Some(('Z', _)) | None) {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if let Some(kv) = env
            .split(|&b| b == 0)
            .find(|kv| kv.starts_with(needle.as_bytes()))
        {
            let rest = String::from_utf8_lossy(&kv[needle.len()..]).into_owned();
            found.push((rest, pid));
        }
    }
    found
}

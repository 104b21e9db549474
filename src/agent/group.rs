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
/// (kill -9): they carry our marker variable in their environment. Returns the
/// pids signalled.
pub fn kill_leftovers(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let needle = format!("{}={marker}", crate::agent::spawn::MARKER_VAR);
    let mut killed = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
            // SAFETY: SIGKILL to a process that carries our own marker.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    killed
}

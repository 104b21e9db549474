//! Process groups: is anything of a group still alive, and killing leftovers.

use crate::sys::proc;
use std::time::{Duration, Instant};

/// True while a process of group `pgid` exists that is not a zombie. Zombies
/// count as gone: they hold nothing and their parent (often init) reaps them.
pub fn group_alive(pgid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    if unsafe { libc::kill(-pgid, 0) } != 0 {
        return false;
    }
    let Some(pids) = proc::pids() else {
        return true;
    };
    pids.into_iter().any(
        |pid| matches!(proc::state_and_group(pid), Some((state, pg)) if pg == pgid && state != 'Z'),
    )
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

/// Kills the processes that carry exactly `marker`: what an attempt started
/// outside its process group (a tool shell in a session of its own).
/// Returns how many were signalled.
pub fn kill_marked(marker: &str) -> usize {
    let mut n = 0;
    for _ in 0..10 {
        let fresh: Vec<i32> = marked_processes(marker)
            .into_iter()
            .filter(|(rest, _)| rest.is_empty())
            .map(|(_, pid)| pid)
            .collect();
        if fresh.is_empty() {
            break;
        }
        for pid in &fresh {
            // SAFETY: SIGKILL to a process that carries the attempt's marker.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        n += fresh.len();
    }
    n
}

/// Processes (not zombies, not this one) whose marker variable starts with
/// `prefix`, with what follows the prefix.
fn marked_processes(prefix: &str) -> Vec<(String, i32)> {
    let me = std::process::id() as i32;
    let needle = format!("{}={prefix}", super::spawn::MARKER_VAR);
    let mut found = Vec::new();
    for pid in proc::pids().unwrap_or_default() {
        if pid == me || matches!(proc::state_and_group(pid), Some(('Z', _)) | None) {
            continue;
        }
        let Some(env) = proc::environ(pid) else {
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

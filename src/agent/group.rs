//! Process groups and marks: is anything of a group still alive, and
//! ending what an earlier instance left.

use crate::sys::proc;

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

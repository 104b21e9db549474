//! glibc's per-thread malloc caches, switched off for the long-running
//! commands.
//!
//! Every thread keeps up to seven freed chunks of each small size for
//! itself (the tcache). The daemon runs some thirty threads that hand
//! allocations to each other (the scheduler builds a request, a worker frees
//! it; a worker builds an outcome, the scheduler frees it), so those caches
//! fill with each other's memory: about 1.4 MB of a 10 MB daemon, creeping up
//! for tens of thousands of requests as rarer sizes fill (found by the soak
//! test). The daemon allocates too little for the caches to buy any speed.
//!
//! glibc reads its tunables once, at start, from GLIBC_TUNABLES; there is no
//! call to change them later. So `daemon` and `run` re-execute themselves
//! once with the cache size set to 0, and put the operator's GLIBC_TUNABLES
//! back before anything else happens, so agents inherit the environment the
//! daemon was given. An operator who sets `glibc.malloc.tcache_count`
//! themselves is left alone (that is also the way to keep the caches, e.g.
//! under valgrind, which does not follow the re-execution).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, Ordering};

const TUNABLES: &str = "GLIBC_TUNABLES";
/// Carries the operator's GLIBC_TUNABLES across the re-execution:
/// "-" when it was unset, "=" and the value when set.
const CARRIED: &str = "RALPH_QCHAT_OPERATOR_TUNABLES";
const SETTING: &str = "glibc.malloc.tcache_count=0";

/// Set when this process is the re-executed one.
static REEXECUTED: AtomicBool = AtomicBool::new(false);

/// Re-executes this process with the caches off, unless already done or
/// the operator chose a tcache size. Returns only when it does not re-execute
/// (or cannot: then the daemon runs as it is).
pub fn reexec_without_thread_caches() {
    if REEXECUTED.load(Ordering::Relaxed) {
        return;
    }
    let current = std::env::var_os(TUNABLES);
    if current
        .as_ref()
        .is_some_and(|v| v.to_string_lossy().contains("tcache_count"))
    {
        return;
    }
    let (carried, tunables) = match &current {
        None => (OsString::from("-"), OsString::from(SETTING)),
        Some(v) => {
            let mut carried = OsString::from("=");
            carried.push(v);
            let mut t = v.clone();
            t.push(":");
            t.push(SETTING);
            (carried, t)
        }
    };
    let args: Vec<OsString> = std::env::args_os().collect();
    let Some((argv0, rest)) = args.split_first() else {
        return;
    };
    // exec only returns on failure (no /proc, say): carry on as we are.
    let _ = std::process::Command::new("/proc/self/exe")
        .arg0(argv0)
        .args(rest)
        .env(CARRIED, carried)
        .env(TUNABLES, tunables)
        .exec();
}

/// One malloc arena for the whole process. glibc gives threads arenas of
/// their own, up to eight per core, each keeping what was freed in it and
/// some slack at its top, so the daemon's memory followed where its thirty
/// threads had happened to allocate: peak RSS with 1,000 task records
/// varied from 9.7 to 13.3 MB between runs, 10.9 to 11.2 MB with one arena.
/// Its threads allocate little, and on their own paths: the one lock cost
/// nothing measurable (20 tasks x 150 iterations, 5 pairs side by side).
/// An operator's own `glibc.malloc.arena_max` is left alone. Must run
/// before any thread exists.
pub fn one_arena() {
    if std::env::var_os(TUNABLES).is_some_and(|v| v.to_string_lossy().contains("arena_max")) {
        return;
    }
    // SAFETY: mallopt sets one of the allocator's parameters; no other
    // thread exists yet to allocate meanwhile.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Puts the operator's GLIBC_TUNABLES back after a re-execution. Must run
/// first in main, before any thread exists.
pub fn restore_operator_environment() {
    let Some(carried) = std::env::var_os(CARRIED) else {
        return;
    };
    REEXECUTED.store(true, Ordering::Relaxed);
    name_process_after_argv0();
    let bytes = carried.as_bytes();
    // SAFETY: called at the top of main, while the process has one thread.
    unsafe {
        std::env::remove_var(CARRIED);
        match bytes.split_first() {
            Some((b'=', value)) => std::env::set_var(TUNABLES, std::ffi::OsStr::from_bytes(value)),
            _ => std::env::remove_var(TUNABLES),
        }
    }
}

/// Executing /proc/self/exe names the process "exe" (what ps, top, pkill
/// and the journal's _COMM show); give it back the name the first exec gave
/// it, the last part of argv[0], as the kernel does (at most 15 bytes).
fn name_process_after_argv0() {
    let Some(argv0) = std::env::args_os().next() else {
        return;
    };
    let base = argv0
        .as_bytes()
        .rsplit(|&b| b == b'/')
        .next()
        .unwrap_or_default();
    let mut name = [0u8; 16];
    let n = base.len().min(15);
    name[..n].copy_from_slice(&base[..n]);
    if n > 0 {
        // SAFETY: PR_SET_NAME reads a NUL-terminated name of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
}

/// Hands the heap's free pages back to the kernel. glibc keeps what its
/// per-thread arenas freed for reuse; after a busy spell (twenty workers
/// allocating and freeing per request) the pages scattered between live
/// allocations stay resident and RSS creeps up without anything leaking.
/// The scheduler calls this when the last job ends, so an idle daemon shows
/// its real size.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own arenas.
    unsafe { libc::malloc_trim(0) };
}

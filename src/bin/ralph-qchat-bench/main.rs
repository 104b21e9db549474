//! Benchmarks of ralph-qchat against floors measured in the same run (the
//! machines are shared and noisy: the ratios mean something, the absolute
//! numbers only describe this run). Writes BENCHMARKS.md.
//!
//!   cargo build --release && ./target/release/ralph-qchat-bench [--quick] [--only SECTION]
//!
//! Each section starts the real daemon (the release binary next to this one)
//! on a temporary state directory with small fake agents.

mod harness;
mod health;
mod sections;

use std::fmt::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // --only NAME runs one section (its name's first word: throughput, idle, …).
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let bin = harness::sibling("ralph-qchat");
    let mut out = String::new();
    let _ = writeln!(out, "# ralph-qchat benchmarks\n");
    let _ = writeln!(
        out,
        "Machine: {} cores, kernel {}; run {}{}. Ratios compare with a floor measured in the same run.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        harness::kernel(),
        harness::now(),
        if quick {
            " (--quick: shorter windows)"
        } else {
            ""
        }
    );
    type Section = fn(&std::path::Path, bool) -> String;
    let sections: [(&str, Section); 6] = [
        ("throughput", sections::throughput),
        ("idle CPU", sections::idle_cpu),
        ("memory", sections::memory),
        ("output capture", sections::output),
        ("health", health::health),
        ("start and stop", sections::start_stop),
    ];
    for (name, f) in sections {
        if only.as_ref().is_some_and(|o| !name.starts_with(o.as_str())) {
            continue;
        }
        eprintln!("bench: {name}");
        let text = f(&bin, quick);
        println!("{text}\n");
        let _ = writeln!(out, "{text}\n");
    }
    if only.is_some() {
        return;
    }
    out.push_str(LIMITS);
    match std::fs::write("BENCHMARKS.md", &out) {
        Ok(()) => eprintln!("bench: written to BENCHMARKS.md"),
        Err(e) => eprintln!("bench: cannot write BENCHMARKS.md: {e}"),
    }
}

/// What the profile showed about the figures that miss their targets.
const LIMITS: &str = "## What limits the figures that miss their targets

Measured with `perf record -g` on the daemon running 20 tasks of a no-op agent
(2 cores):

- **Throughput at concurrency 20** (target 0.9 of the floor). The daemon is
  CPU-bound together with its agents. Two costs dominate. (1) Starting an agent
  forks the daemon: the `pre_exec` hook that sets `PR_SET_PDEATHSIG` and the
  resource limits makes the standard library fork instead of using
  `posix_spawn`, so every start copies the page tables of a 30-thread process
  and shoots down TLBs on every core (`copy_page_range`,
  `smp_call_function_many_cond` in the profile). Without the hook the ratio
  went from 0.16 to 0.30 in the same run. (2) Durability: the writer thread
  (28 % of the daemon's samples) writes each changed record to a new temporary
  file, syncs it, renames it and syncs the directory; the new inode per write
  shows as `find_get_block_common` and `recently_deleted` in ext4. Batching
  (one batch per scheduler turn, written off the scheduler's path) took the
  scheduler's own wait for the disk away but not this cost.
  Tried: starting agents with `clone(CLONE_VM | CLONE_VFORK)` running only
  the async-signal-safe setup before `execve` (what `posix_spawn` does) took
  the ratio at concurrency 20 from 0.18 to 0.32 in one run, but the soak then
  showed RSS growing by 1.1 to 1.5 MB between request 1,000 and 20,000 (0.6 MB
  with fork), not yet explained, so it was not kept. Next steps: find that
  growth and bring the clone path back; keep durability in an append-only
  journal (one append and one `fdatasync` per batch, records rewritten to
  `state.json` without syncing, the journal replayed on start and truncated
  once the records are synced).
- **Throughput at concurrency 1** (0.7 to 0.8): the same fork cost, plus the
  per-iteration work of re-reading the prompt file and opening the transcript.
  The added latency per request meets its target (p99 added ≤ 2 ms).
- **Output capture** against `cat > /dev/null`: the daemon writes what it
  captures to the transcript on disk, which `cat > /dev/null` does not; against
  `cat > file` it is within the target or close to it, varying with the disk.
";

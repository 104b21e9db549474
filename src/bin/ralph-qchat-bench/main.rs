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

Measured with `perf record -g` and `strace -f -tt` on the daemon running a
no-op agent (2 cores, shared and noisy: ratios of consecutive runs vary by
±0.1).

- **Throughput at concurrency 20** (target 0.9; 0.6 to 0.8 here). The daemon
  and its agents share two cores, so every cycle the daemon spends is a
  request the floor makes instead. What is left is the file system: with the
  state directory on tmpfs the same run reaches about 0.9 (the tmpfs row).
  Per request the daemon durably replaces the task's `state.json` (a new
  temporary file, sync, rename, directory sync — batched, on the writer
  thread) and creates the iteration's transcript; ext4 pays for the inode
  churn (`ext4_create` → `find_inode_bit` → `recently_deleted`, because each
  rename frees the old inode). Skipping only the file sync changed nothing
  measurable; skipping the record writes altogether gave 0.65 to 0.9. The
  next step is an append-only journal (one append and one `fdatasync` per
  batch, `state.json` refreshed at most once a second per task and at every
  status change, the journal replayed on start) — not done: it changes what
  a crash may leave behind and needs its own crash-loop proof. The floor
  writes neither records nor transcripts.
- **Throughput at concurrency 1** (0.75 to 0.94): the same per-request file
  work, on the path between one agent's exit and the next start (two thread
  hand-offs, the transcript created by the worker). The added latency per
  request meets its target (p99 added ≤ 2 ms).
- Fixed in this round, each found by the profile: agents are started with
  `clone(CLONE_VM | CLONE_VFORK)` and only async-signal-safe setup before
  `execve` (std's `Command` forked the 30-thread daemon whenever a `pre_exec`
  hook was set: page-table copies, TLB shootdowns, copy-on-write faults); an
  iteration no longer waits out the 200 ms drain period when the agent's exit
  is seen before its last end of file; counters and transcript pruning moved
  from the scheduler to the writer thread. Together: concurrency 20 went
  from 0.16–0.43 to 0.6–0.8, concurrency 1 from 0.65–0.8 to 0.75–0.94.
- **Memory**: glibc's per-thread malloc caches held about 1.4 MB of the
  daemon and kept growing slowly under load (threads free each other's
  allocations); `daemon` and `run` re-execute themselves once with
  `glibc.malloc.tcache_count=0` (see src/malloc.rs). The price shows in
  /health, whose requests allocate: 0.6 to 0.85 of bare tiny_http instead of
  0.9 to 1.0 with the caches (tried with `GLIBC_TUNABLES` set to the default),
  still eight times its target.
- **Output capture** against `cat > /dev/null`: the daemon writes what it
  captures to the transcript on disk, which `cat > /dev/null` does not; against
  `cat > file` it is within the target or close to it, varying with the disk.
";

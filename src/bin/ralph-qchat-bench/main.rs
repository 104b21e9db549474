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
mod history;
mod sections;

use std::fmt::Write;

const SECTIONS: [&str; 8] = [
    "throughput",
    "containment",
    "idle CPU",
    "memory",
    "history",
    "output capture",
    "health",
    "start and stop",
];

const HELP: &str = "usage: ralph-qchat-bench [--quick] [--only SECTION]

Runs the benchmarks against floors measured in the same run and, without
--only, writes BENCHMARKS.md in the current directory. Build first:
cargo build --release. Takes a few minutes (--quick: shorter windows).

  --quick          shorter windows, fewer rounds
  --only SECTION   one section, by the start of its name: throughput,
                   containment, idle, memory, history, output, health, start
  -h, --help       this text
";

/// (quick, only) from the arguments, or the exit status to leave with.
fn parse(args: &[String]) -> Result<(bool, Option<String>), i32> {
    let mut quick = false;
    let mut only = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Err(0);
            }
            "--quick" => quick = true,
            "--only" => match it.next() {
                Some(s) if SECTIONS.iter().any(|n| n.starts_with(s.as_str())) => {
                    only = Some(s.clone())
                }
                Some(s) => {
                    eprintln!(
                        "ralph-qchat-bench: no section starts with `{s}`; sections: {}",
                        SECTIONS.join(", ")
                    );
                    return Err(64);
                }
                None => {
                    eprintln!("ralph-qchat-bench: --only needs a section name\n\n{HELP}");
                    return Err(64);
                }
            },
            other => {
                eprintln!("ralph-qchat-bench: unknown argument `{other}`\n\n{HELP}");
                return Err(64);
            }
        }
    }
    Ok((quick, only))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (quick, only) = match parse(&args) {
        Ok(v) => v,
        Err(code) => std::process::exit(code),
    };
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
    let run: [Section; 8] = [
        sections::throughput,
        sections::containment,
        sections::idle_cpu,
        sections::memory,
        history::history,
        sections::output,
        health::health,
        sections::start_stop,
    ];
    let sections = SECTIONS.into_iter().zip(run);
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

- **Throughput at concurrency 20** (target 0.9; 0.65 to 0.85 here on ext4,
  about 0.9 with the state directory on tmpfs). The daemon and its agents
  share two cores, so every cycle the daemon spends is a request the floor
  makes instead; the CPU is saturated in both runs. Per 0.2 s of the run the
  floor's samples are ~85% agent and ~10% the floor's own threads; the
  daemon's are ~65% agent, ~23% workers, ~7% writer, ~2% scheduler. What the
  daemon does per request that the floor does not:
  - it creates the iteration's transcript and the writer removes the oldest
    one beyond `keep_transcripts`: on this ext4 (no journal, mounted with
    `discard`) each new inode is found by `find_inode_bit` →
    `recently_deleted`, the largest kernel cost left. Measured by switching
    transcripts off in a scratch build: 10 to 13% more requests a second;
  - it starts the agent in its own process group with rlimits, every signal
    handler reset (64 `rt_sigaction`s) and a death signal, gets a pidfd and
    registers three descriptors with epoll, and passes the instruction as an
    argument and its own variables in the environment (the floor runs the
    bare script): the workers' share above, about twice what the floor's
    threads spend spawning;
  - it durably records the task. This was the largest cost: the writer began
    a new batch the moment the last one ended, so it rewrote each record
    after almost every change (~1,300 a second: a new temporary file, fsync,
    rename, directory fsync) and took a fifth of the machine. Batches now
    start at most every 0.1 s (`TICK` in src/store/writer.rs; a change of
    status is written at once): the writer's
    share fell from ~20% to 4–8% and concurrency 20 from 0.6–0.7 to 0.65–0.85.
  An append-only journal instead of per-task record files would save part of
  what is left of the writer's share, not the transcripts or the spawn; not
  done, it changes what a crash leaves behind for a few percent.
- **Containment** (cgroup mode, the default as root or under the unit): per
  request the daemon makes a cgroup (`mkdirat` under an open root), starts
  the agent inside it with `clone3(CLONE_INTO_CGROUP)`, reads
  `cgroup.events` when the agent exits (no `cgroup.kill` and no wait when it
  is already empty, the common case), reads `cpu.stat` and removes the
  cgroup. The profile puts `cgroup_mkdir` (the kernel creates the cgroup's
  ~15 interface files) at 1.5% of all CPU samples of a concurrency-20 run
  and `cgroup_rmdir` at 0.8%; the daemon's own CPU per request grows by
  4 to 8% at concurrency 20. Two costs were removed on the way: joining by
  writing `cgroup.procs` (a migration: it waits for an RCU grace period,
  serialised under `cgroup_mutex`; 0.1 to 0.2 of the ratio at concurrency
  20) is done only for the v1 memory and pids companions of a hybrid host,
  which are made only when `max_memory_mb` or `max_processes` is set; and
  subreaper mode looks for an attempt's leftovers only among what was
  reparented to the main thread, not among every running agent. The
  throughput difference between the modes is at the noise of this machine
  (the per-round differences range over ±0.1).
- **Throughput at concurrency 1** (0.75 to 1.0): the same per-request work,
  on the path between one agent's exit and the next start (two thread
  hand-offs, the transcript created by the worker). The added latency per
  request meets its target (p99 added ≤ 2 ms).
- Fixed in the rounds before, each found by the profile: agents are started
  with `clone(CLONE_VM | CLONE_VFORK)` and only async-signal-safe setup
  before `execve` (std's `Command` forked the 30-thread daemon whenever a
  `pre_exec` hook was set: page-table copies, TLB shootdowns, copy-on-write
  faults); an iteration no longer waits out the 200 ms drain period when the
  agent's exit is seen before its last end of file; counters and transcript
  pruning moved from the scheduler to the writer thread. Together:
  concurrency 20 went from 0.16–0.43 to 0.6–0.8, concurrency 1 from
  0.65–0.8 to 0.75–0.94.
- **Memory**: glibc's per-thread malloc caches held about 1.4 MB of the
  daemon and kept growing slowly under load (threads free each other's
  allocations); `daemon` and `run` re-execute themselves once with
  `glibc.malloc.tcache_count=0` (see src/malloc.rs). The price showed in
  /health, whose requests allocate, when the port was tiny_http's: 0.6 to 1.1
  of a bare tiny_http between runs, against 0.9 to 1.0 with the caches. With
  the server of our own (src/http/server.rs, whose floor is the same server
  answering a constant) /health is at about 1.0 of its floor and always
  several times its target.
- **Output capture** against `cat > /dev/null`: `cat` only reads there (a
  write to /dev/null returns at once; 0.013 to 0.043 s for 50 MB between
  runs), while the daemon writes what it captures to the transcript on disk.
  The comparable floor is `cat > file`, the same bytes into a file: the
  daemon is at 0.8 to 1.3 of it. A larger `buffer_size` (bytes per read,
  default 4096) changed nothing measurable against this noise.
";

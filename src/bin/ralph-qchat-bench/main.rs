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
    match std::fs::write("BENCHMARKS.md", &out) {
        Ok(()) => eprintln!("bench: written to BENCHMARKS.md"),
        Err(e) => eprintln!("bench: cannot write BENCHMARKS.md: {e}"),
    }
}

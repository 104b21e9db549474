//! Benchmarks of ralph-qchat against floors measured in the same run (the
//! machines are shared and noisy: the ratios mean something, the absolute
//! numbers only describe this run). Writes BENCHMARKS.md.
//!
//!   cargo build --release && ./target/release/ralph-qchat-bench [--quick]
//!
//! Each section starts the real daemon (the release binary next to this one)
//! on a temporary state directory with small fake agents.

mod harness;
mod health;
mod sections;

use std::fmt::Write;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
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
    let sections: Vec<(&str, Box<dyn Fn(&std::path::Path, bool) -> String>)> = vec![
        ("throughput", Box::new(sections::throughput)),
        ("idle CPU", Box::new(sections::idle_cpu)),
        ("memory", Box::new(sections::memory)),
        ("output capture", Box::new(sections::output)),
        ("health", Box::new(|b, q| health::health(b, q))),
        ("start and stop", Box::new(sections::start_stop)),
    ];
    for (name, f) in sections {
        eprintln!("bench: {name}");
        let text = f(&bin, quick);
        println!("{text}\n");
        let _ = writeln!(out, "{text}\n");
    }
    match std::fs::write("BENCHMARKS.md", &out) {
        Ok(()) => eprintln!("bench: written to BENCHMARKS.md"),
        Err(e) => eprintln!("bench: cannot write BENCHMARKS.md: {e}"),
    }
}

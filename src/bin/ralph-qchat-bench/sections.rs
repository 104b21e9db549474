//! The benchmark sections: each returns a Markdown section with its table.

use crate::harness::{self, Temp};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FAST_CFG: &str = "[orchestrator]\niteration_delay = 0.0\ncheckpoint_interval = 0\nshutdown_grace = 0.0\n[adapter]\nkill_grace = 0.5\n";

/// Start times (ns) the fake agent appended to `log`.
fn starts(log: &Path) -> Vec<f64> {
    let mut v: Vec<f64> = std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

/// The floor: `conc` threads spawning and reaping the agent `each` times,
/// output piped and read like the daemon does, each in a directory of its
/// own as each task has its workspace.
fn floor(agent: &Path, conc: usize, each: usize) {
    let base = agent.parent().unwrap_or(Path::new(".")).join("floor");
    let threads: Vec<_> = (0..conc)
        .map(|k| {
            let agent = agent.to_path_buf();
            let dir = base.join(k.to_string());
            let _ = std::fs::create_dir_all(&dir);
            std::thread::spawn(move || {
                for _ in 0..each {
                    let _ = Command::new(&agent)
                        .current_dir(&dir)
                        .stdin(Stdio::null())
                        .output();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A fake agent in `dir` that appends its start time (ns) to
/// `dir/starts.log` and changes a file in its working directory, as an
/// agent that works does (one that changes nothing is stopped as stalled
/// after max_stalled_iterations): (the agent, the log).
fn logging_agent(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let log = dir.join("starts.log");
    let agent = harness::agent(
        dir,
        "agent.sh",
        &format!("date +%s%N >> {}\necho x >> work.txt", log.display()),
    );
    (agent, log)
}

/// The floor's rate for `agent`; its log is emptied for the daemon's run.
fn floor_rate(agent: &Path, log: &Path, conc: usize, each: usize) -> Rate {
    floor(agent, conc, each);
    let r = rate(&starts(log));
    let _ = std::fs::remove_file(log);
    r
}

/// CPU this process has used, its ended threads included.
fn self_cpu_ns() -> u64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    ns(u.ru_utime) + ns(u.ru_stime)
}

struct Rate {
    per_sec: f64,
    gaps_ms: Vec<f64>,
}

fn rate(v: &[f64]) -> Rate {
    if v.len() < 2 {
        return Rate {
            per_sec: 0.0,
            gaps_ms: vec![],
        };
    }
    let span = (v[v.len() - 1] - v[0]) / 1e9;
    Rate {
        per_sec: (v.len() - 1) as f64 / span.max(1e-9),
        gaps_ms: v.windows(2).map(|w| (w[1] - w[0]) / 1e6).collect(),
    }
}

pub fn throughput(bin: &Path, quick: bool) -> String {
    let n = if quick { 200 } else { 2000 };
    let rounds = if quick { 2 } else { 5 };
    let mut rows = String::new();
    let mut latency = String::new();
    // The last row keeps the daemon's state directory on tmpfs: the same
    // work without the file system's cost, to show how much of the gap is
    // the durable record and the transcript written per request.
    let shm = Path::new("/dev/shm");
    let mut runs = vec![(1usize, false), (20, false)];
    if shm.is_dir() {
        runs.push((20, true));
    }
    for (conc, tmpfs) in runs {
        // Concurrency 1 makes a quarter of the requests: about as many seconds.
        let n = if conc == 1 { n / 4 } else { n };
        let (mut floor_rates, mut our_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut floor_gaps, mut our_gaps) = (Vec::new(), Vec::new());
        // Tasks that end early (stalled, failed) make the rate meaningless.
        let mut short = None;
        // Own CPU per request, ms: the floor's spawning threads, the daemon's
        // threads (their agents not counted).
        let (mut floor_cpu, mut our_cpu) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let t = if tmpfs {
                Temp::under(shm, &format!("tp-shm-{round}"))
            } else {
                Temp::new(&format!("tp{conc}-{round}"))
            };
            let (agent, log) = logging_agent(&t.0);
            let ids = harness::tasks(&t.0.join("state"), conc, (n / conc) as u64);
            // Floor and daemon back to back, in turns: the machine's drift
            // falls on both alike.
            let mut ours = None;
            let mut base = None;
            for which in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                if which == 0 {
                    // The floor's threads are this process's (ended when
                    // counted: rusage keeps them); the rest of it idles.
                    let cpu0 = self_cpu_ns();
                    base = Some(floor_rate(&agent, &log, conc, n / conc));
                    floor_cpu.push(self_cpu_ns().saturating_sub(cpu0) as f64 / 1e6 / n as f64);
                } else {
                    let d = harness::daemon(bin, &t.0, FAST_CFG, &agent, conc);
                    harness::wait(Duration::from_secs(300), || d.all_finished(&ids));
                    our_cpu.push(harness::cpu_ns(d.pid()) as f64 / 1e6 / n as f64);
                    d.stop();
                    let made = starts(&log);
                    if made.len() < n / conc * conc {
                        short = Some(made.len());
                    }
                    ours = Some(rate(&made));
                    let _ = std::fs::remove_file(&log);
                }
            }
            let (base, ours) = (base.unwrap_or(rate(&[])), ours.unwrap_or(rate(&[])));
            floor_rates.push(base.per_sec);
            our_rates.push(ours.per_sec);
            ratios.push(ours.per_sec / base.per_sec.max(1e-9));
            floor_gaps.extend(base.gaps_ms);
            our_gaps.extend(ours.gaps_ms);
        }
        let label = if tmpfs {
            format!("{conc}, state on tmpfs")
        } else {
            conc.to_string()
        };
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        if let Some(made) = short {
            rows +=
                &format!("| {label} | only {made} of {n} requests ran: not measured | | | | | |\n");
            continue;
        }
        rows += &format!(
            "| {label} | {n} | {:.0} | {:.0} | {:.2} ({lo:.2} … {hi:.2}) | {:.3} | {:.3} |\n",
            harness::pct(&mut floor_rates, 0.5),
            harness::pct(&mut our_rates, 0.5),
            harness::pct(&mut ratios, 0.5),
            harness::pct(&mut floor_cpu, 0.5),
            harness::pct(&mut our_cpu, 0.5),
        );
        if conc == 1 && !tmpfs {
            let (b50, b99) = (
                harness::pct(&mut floor_gaps, 0.5),
                harness::pct(&mut floor_gaps, 0.99),
            );
            let (o50, o99) = (
                harness::pct(&mut our_gaps, 0.5),
                harness::pct(&mut our_gaps, 0.99),
            );
            latency = format!(
                "| floor | {b50:.3} | {b99:.3} |\n| daemon | {o50:.3} | {o99:.3} |\n| added | {:.3} | {:.3} |\n",
                o50 - b50,
                o99 - b99
            );
        }
    }
    format!(
        "## Throughput\n\n\
         A fake agent that exits at once, iteration_delay 0, state persisted every iteration, the \
         newest 20 transcripts kept; the floor spawns and reaps the same agent with the same \
         concurrency. {rounds} rounds, floor and daemon back to back in turns; medians, and the range \
         of the rounds' ratios. Target: ratio ≥ 0.9. The tmpfs row is not a target: the same run with \
         the state directory in /dev/shm shows what the disk costs. The last two columns are the CPU \
         each spends of its own per request (the floor's spawning threads, the daemon's threads; \
         their agents not counted), ms: steadier than rates on a shared machine.\n\n\
         | concurrency | requests | floor requests/s | daemon requests/s | ratio | floor CPU | daemon CPU |\n|---|---|---|---|---|---|---|\n{rows}\n\
         Time between request starts at concurrency 1 (ms). Target: added p99 ≤ 2 ms.\n\n\
         | | p50 | p99 |\n|---|---|---|\n{latency}"
    )
}

/// What cgroup mode costs: the daemon in subreaper and in cgroup mode,
/// alternating round by round in the same run, each against the floor
/// measured in the same round.
pub fn containment(bin: &Path, quick: bool) -> String {
    let n = if quick { 100 } else { 300 };
    let rounds = if quick { 3 } else { 9 };
    let modes = ["subreaper", "cgroup"];
    let mut rows = String::new();
    let mut cgroup_used = true;
    for conc in [1usize, 20] {
        let mut ratio: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut rate_of: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        // The daemon's own CPU (not its agents') per request: what cgroup
        // mode adds, less disturbed by the machine's other load.
        let mut cpu_ms: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            let t = Temp::new(&format!("ct{conc}-{round}"));
            let (agent, log) = logging_agent(&t.0);
            let base = floor_rate(&agent, &log, conc, n / conc).per_sec;
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for m in order {
                let _ = std::fs::remove_file(&log);
                let dir = t.0.join(modes[m]);
                let _ = std::fs::create_dir_all(&dir);
                let ids = harness::tasks(&dir.join("state"), conc, (n / conc) as u64);
                let d = harness::daemon_env(
                    bin,
                    &dir,
                    FAST_CFG,
                    &agent,
                    conc,
                    &[("QCHAT_CONTAINMENT", modes[m])],
                );
                harness::wait(Duration::from_secs(120), || d.all_finished(&ids));
                // cgroup mode records the subtree it made: proof it ran so.
                if m == 1 && !dir.join("state").join("cgroups").is_file() {
                    cgroup_used = false;
                }
                cpu_ms[m].push(harness::cpu_ns(d.pid()) as f64 / 1e6 / n as f64);
                d.stop();
                let r = rate(&starts(&log)).per_sec;
                rate_of[m].push(r);
                ratio[m].push(r / base.max(1e-9));
            }
        }
        // The pairs of one round ran back to back against one floor: the
        // median of their differences is steadier than a difference of medians.
        let mut diffs: Vec<f64> = ratio[1].iter().zip(&ratio[0]).map(|(c, s)| c - s).collect();
        let med = |v: &mut Vec<f64>| harness::pct(v, 0.5);
        let (lo, hi) = (
            diffs.iter().copied().fold(f64::INFINITY, f64::min),
            diffs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        let (rs, rc) = (med(&mut ratio[0]), med(&mut ratio[1]));
        rows += &format!(
            "| {conc} | {:.0} | {:.0} | {rs:.2} | {rc:.2} | {:+.2} ({lo:+.2} … {hi:+.2}) | {:.3} | {:.3} |\n",
            med(&mut rate_of[0]),
            med(&mut rate_of[1]),
            med(&mut diffs),
            med(&mut cpu_ms[0]),
            med(&mut cpu_ms[1]),
        );
    }
    if !cgroup_used {
        return "## Containment\n\ncgroup mode is not usable on this machine (run the benchmark as root): not measured.\n".into();
    }
    format!(
        "## Containment\n\n\
         The throughput run in subreaper mode and in cgroup mode (a cgroup created, joined by \
         clone3(CLONE_INTO_CGROUP), killed, waited empty, read and removed per request), alternating \
         over {rounds} rounds of {n} requests, each against the floor measured in its round; medians, and \
         the median (range) of the per-round differences. Target: cgroup mode costs at most 0.03 of the ratio.\n\n\
         The last two columns are the daemon's own CPU per request (its agents' not counted), ms.\n\n\
         | concurrency | subreaper requests/s | cgroup requests/s | ratio subreaper | ratio cgroup | cgroup − subreaper | CPU subreaper | CPU cgroup |\n\
         |---|---|---|---|---|---|---|---|\n{rows}"
    )
}

pub fn idle_cpu(bin: &Path, quick: bool) -> String {
    let window = Duration::from_secs(if quick { 10 } else { 60 });
    let t = Temp::new("idle");
    let agent = harness::agent(&t.0, "agent.sh", "exec sleep 600");
    let ids = harness::tasks(&t.0.join("state"), 20, 1);
    let d = harness::daemon(bin, &t.0, FAST_CFG, &agent, 20);
    harness::wait(Duration::from_secs(10), || {
        ids.iter().all(|id| d.task_status(id) == "running")
    });
    let c0 = harness::cpu_seconds(d.pid());
    std::thread::sleep(window);
    let used = harness::cpu_seconds(d.pid()) - c0;
    d.stop();
    format!(
        "## CPU while agents work\n\n\
         20 agents sleeping, {} s window. Target ≤ 0.1 % of one core. Clock-tick resolution: 10 ms.\n\n\
         | CPU seconds | % of one core |\n|---|---|\n| {used:.3} | {:.3} |",
        window.as_secs(),
        100.0 * used / window.as_secs_f64()
    )
}

pub fn memory(bin: &Path, _quick: bool) -> String {
    let t = Temp::new("mem");
    let agent = harness::agent(&t.0, "agent.sh", "exec sleep 600");
    let ids = harness::tasks(&t.0.join("state"), 1000, 1);
    let d = harness::daemon(bin, &t.0, FAST_CFG, &agent, 20);
    let tasks_dir = d.state.join("tasks");
    harness::wait(Duration::from_secs(60), || {
        std::fs::read_dir(&tasks_dir)
            .map(|r| r.count())
            .unwrap_or(0)
            >= ids.len()
    });
    harness::wait(Duration::from_secs(10), || {
        d.task_status(&ids[19]) == "running"
    });
    std::thread::sleep(Duration::from_millis(500));
    let hwm = harness::status_kib(d.pid(), "VmHWM:");
    let rss = harness::status_kib(d.pid(), "VmRSS:");
    d.stop();
    // Floor: the same binary doing nothing but printing its version.
    let floor = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .and_then(|l| l.parse::<u64>().ok())
        });
    format!(
        "## Memory\n\n\
         20 workers running agents, 1,000 task records. Target: peak RSS ≤ 10 MB.\n\n\
         | | KiB |\n|---|---|\n| peak RSS (VmHWM) | {hwm} |\n| RSS at the end | {rss} |\n| `ralph-qchat --version` (floor) | {} |",
        floor.map_or("n/a (no /usr/bin/time)".into(), |f| f.to_string())
    )
}

pub fn output(bin: &Path, _quick: bool) -> String {
    let t = Temp::new("out");
    let bytes = 50 * 1024 * 1024;
    let runs = 3;
    let agent = harness::agent(&t.0, "agent.sh", &format!("head -c {bytes} /dev/zero"));
    let time_sh = |cmd: &str| {
        let mut v: Vec<f64> = (0..runs)
            .map(|_| {
                let s = Instant::now();
                let _ = Command::new("sh").arg("-c").arg(cmd).status();
                s.elapsed().as_secs_f64()
            })
            .collect();
        harness::pct(&mut v, 0.5)
    };
    let to_null = time_sh(&format!("{} | cat > /dev/null", agent.display()));
    let to_file = time_sh(&format!(
        "{} | cat > {}/copy",
        agent.display(),
        t.0.display()
    ));
    let ids = harness::tasks(&t.0.join("state"), runs, 1);
    let cfg = format!(
        "{FAST_CFG}[limits]\nmax_output_size = {}\n[performance]\nmax_concurrent = 1\n",
        bytes * 2
    );
    let d = harness::daemon(bin, &t.0, &cfg, &agent, 1);
    harness::wait(Duration::from_secs(60), || d.all_finished(&ids));
    let mut ours: Vec<f64> = ids
        .iter()
        .filter_map(|id| {
            std::fs::read_to_string(d.state.join("tasks").join(id).join("iterations/000001.log"))
                .ok()?
                .rsplit("after ")
                .next()?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    d.stop();
    let ours = harness::pct(&mut ours, 0.5);
    format!(
        "## Capturing output\n\n\
         50 MB from the agent, captured into the transcript (cap raised); median of {runs} runs. \
         Target: ratio ≥ 0.8.\n\n\
         | | seconds | ratio (floor time / daemon time) |\n|---|---|---|\n\
         | `agent \\| cat > /dev/null` | {to_null:.3} | {:.2} |\n\
         | `agent \\| cat > file` | {to_file:.3} | {:.2} |\n\
         | daemon (request duration) | {ours:.3} | |",
        to_null / ours,
        to_file / ours
    )
}

pub fn start_stop(bin: &Path, _quick: bool) -> String {
    let t = Temp::new("startstop");
    let sock_path = t.0.join("notify.sock");
    let sock = match UnixDatagram::bind(&sock_path) {
        Ok(s) => s,
        Err(e) => return format!("start and stop: cannot bind a notify socket: {e}"),
    };
    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
    let agent = harness::agent(&t.0, "agent.sh", "exec sleep 600");
    let ids = harness::tasks(&t.0.join("state"), 20, 1);
    let cfg = t.0.join("bench.toml");
    let _ = std::fs::write(&cfg, FAST_CFG);
    let started = Instant::now();
    let child = Command::new(bin)
        .args(["daemon", "--health-port", "0"])
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(t.0.join("state"))
        .arg("--agent-command")
        .arg(&agent)
        .env("QCHAT_MAX_CONCURRENT", "20")
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        return "start and stop: cannot start the daemon".into();
    };
    let mut ready = None;
    let mut buf = [0u8; 1024];
    while started.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = sock.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                ready = Some(started.elapsed());
                break;
            }
        }
    }
    let d = harness::Daemon {
        child,
        state: t.0.join("state"),
        port: 0,
    };
    harness::wait(Duration::from_secs(10), || {
        ids.iter().all(|id| d.task_status(id) == "running")
    });
    let stop = d.stop();
    // Floor: starting and reaping the binary that only prints its version.
    let s = Instant::now();
    let _ = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    let floor = s.elapsed();
    format!(
        "## Start and stop\n\n\
         Targets: start to READY ≤ 50 ms; SIGTERM to exit with 20 agents running and shutdown_grace 0 ≤ 1 s.\n\n\
         | | ms |\n|---|---|\n| start to READY=1 (recovering 20 tasks) | {} |\n\
         | SIGTERM to exit, 20 agents running | {:.1} |\n| `ralph-qchat --version` start to exit (floor) | {:.1} |",
        ready.map_or("no READY".into(), |r| format!(
            "{:.1}",
            r.as_secs_f64() * 1000.0
        )),
        stop.as_secs_f64() * 1000.0,
        floor.as_secs_f64() * 1000.0
    )
}

//! supervisord (Debian's package) running the shipped program section,
//! packaging/supervisor/ralph-qchat.conf, with only its paths changed: it
//! starts the daemon, /health answers, a crash is restarted, `supervisorctl
//! stop` ends it with exit 0 and nothing left running, and a broken
//! configuration leaves it FATAL after one try instead of a restart loop.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn supervisord() -> Option<PathBuf> {
    ci_tool("supervisord")
}

/// The shipped section with this sandbox's paths; every other key as shipped.
fn program(sb: &Sandbox, daemon_args: &str) -> String {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/supervisor/ralph-qchat.conf"),
    )
    .unwrap();
    let sd = sb.state_dir().display().to_string();
    shipped
        .lines()
        .filter(|l| !l.starts_with("user="))
        .map(|l| {
            let key = l.split('=').next().unwrap_or("");
            match key {
                "command" => format!("command={BIN} daemon {daemon_args}"),
                "directory" => format!("directory={}", sb.dir.display()),
                "environment" => format!(
                    "environment=HOME=\"{}\",STATE_DIRECTORY=\"{sd}\"",
                    sb.dir.display()
                ),
                "stdout_logfile" => format!("stdout_logfile={}/program.log", sb.dir.display()),
                _ => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Supervisor<'a> {
    sb: &'a Sandbox,
    conf: PathBuf,
    ctl: PathBuf,
    running: Option<Running>,
}

/// supervisord's Python package, when it was unpacked beside the program
/// (as .ci/run does with `apt-get download supervisor` and `dpkg-deb -x`)
/// rather than installed.
fn with_package(c: &mut Command, bin: &Path) {
    let beside = bin
        .parent()
        .and_then(Path::parent)
        .map(|usr| usr.join("lib/python3/dist-packages"));
    if let Some(p) = beside.filter(|p| p.join("supervisor").is_dir()) {
        c.env("PYTHONPATH", p);
    }
}

impl<'a> Supervisor<'a> {
    fn start(sb: &'a Sandbox, bin: &Path, program: &str) -> Supervisor<'a> {
        let d = sb.dir.display();
        sb.write("program.conf", program);
        let conf = sb.write(
            "supervisord.conf",
            format!(
                "[unix_http_server]\nfile={d}/s.sock\n\
                 [supervisord]\nlogfile={d}/supervisord.log\npidfile={d}/supervisord.pid\nnodaemon=true\nchildlogdir={d}\n\
                 [rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\
                 [supervisorctl]\nserverurl=unix://{d}/s.sock\n\
                 [include]\nfiles = {d}/program.conf\n"
            ),
        );
        let mut c = Command::new(bin);
        c.arg("-c").arg(&conf).env("RALPH_TEST_TAG", &sb.tag);
        c.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        with_package(&mut c, bin);
        let running = Some(start(c));
        let ctl = bin.with_file_name("supervisorctl");
        Supervisor {
            sb,
            conf,
            ctl,
            running,
        }
    }

    fn ctl(&self, args: &[&str]) -> String {
        let mut c = Command::new(&self.ctl);
        c.arg("-c").arg(&self.conf).args(args);
        with_package(&mut c, &self.ctl);
        let out = c.output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn state(&self) -> String {
        self.ctl(&["status", "ralph-qchat"])
    }

    fn log(&self) -> String {
        self.sb.read("supervisord.log")
    }

    fn spawns(&self) -> usize {
        self.log().matches("spawned: 'ralph-qchat'").count()
    }
}

impl Drop for Supervisor<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.signal(libc::SIGTERM);
            let _ = r.finish(Duration::from_secs(60));
        }
    }
}

fn daemon_pid(sb: &Sandbox) -> i32 {
    std::fs::read_to_string(sb.state_dir().join("lock"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn supervisord_runs_restarts_after_a_crash_and_stops_it_cleanly() {
    let Some(bin) = supervisord() else { return };
    let sb = Sandbox::new("supervisor");
    let args = format!(
        "--state-dir {} --agent-command {} --health-port 0 --log-level info",
        sb.state_dir().display(),
        Sandbox::agent("complete-after.sh")
    );
    let s = Supervisor::start(&sb, &bin, &program(&sb, &args));
    let port = sb.state_dir().join("http.port");
    assert!(
        wait_until(Duration::from_secs(20), || s.state().contains("RUNNING")
            && port.is_file()),
        "{}\n{}",
        s.state(),
        s.log()
    );
    let health = || {
        let p = std::fs::read_to_string(&port).unwrap_or_default();
        ralph_qchat::http::client::get(
            &format!("http://127.0.0.1:{}/health", p.trim()),
            Duration::from_secs(5),
        )
        .map(|(code, _)| code)
        .unwrap_or(0)
    };
    assert_eq!(health(), 200);
    // A crash (a signal is never an expected exit): started again.
    let first = daemon_pid(&sb);
    unsafe { libc::kill(first, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(20), || {
            s.spawns() == 2
                && s.state().contains("RUNNING")
                && daemon_pid(&sb) != first
                && health() == 200
        }),
        "{}\n{}",
        s.state(),
        s.log()
    );
    let out = s.ctl(&["stop", "ralph-qchat"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        wait_until(Duration::from_secs(5), || s
            .log()
            .contains("stopped: ralph-qchat (exit status 0)")),
        "{}",
        s.log()
    );
    // supervisord itself still runs (it carries the tag): only the daemon's
    // descendants must be gone.
    let left: Vec<(i32, String)> = sb
        .live_commands()
        .into_iter()
        .filter(|(_, c)| !c.contains("supervisord"))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
}

#[test]
fn a_broken_configuration_is_fatal_after_one_try() {
    let Some(bin) = supervisord() else { return };
    let sb = Sandbox::new("supervisor-bad");
    let cfg = sb.write("broken.toml", "[adapter]\ntimeout = \"sixty\"\n");
    let args = format!(
        "--state-dir {} --config {} --health-port 0",
        sb.state_dir().display(),
        cfg.display()
    );
    let s = Supervisor::start(&sb, &bin, &program(&sb, &args));
    assert!(
        wait_until(Duration::from_secs(20), || s.state().contains("FATAL")),
        "{}\n{}",
        s.state(),
        s.log()
    );
    // FATAL: supervisord gave up after the one try and will not retry.
    assert_eq!(s.spawns(), 1, "{}", s.log());
    let out = sb.read("program.log");
    assert!(out.contains("adapter.timeout"), "{out}");
}

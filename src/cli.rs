//! Command-line arguments → a Command: every argument struct and help text.
//! Flags that set configuration keys become overrides for the configuration
//! loader; a usage error is a Failure with exit code 64.

use crate::config::{Override, Source};
use crate::exit::{Failure, USAGE};
use lexopt::prelude::*;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Debug, Default)]
pub struct RunArgs {
    pub config: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub dry_run: bool,
    pub overrides: Vec<Override>,
}

#[derive(Debug)]
pub struct StatusArgs {
    pub config: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub json: bool,
    pub id: Option<String>,
}

#[derive(Debug, Default)]
pub struct SubmitArgs {
    pub prompt: PathBuf,
    pub workdir: Option<PathBuf>,
    pub id: Option<String>,
    pub max_iterations: Option<u64>,
    pub max_runtime: Option<f64>,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct CancelArgs {
    pub id: String,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct CleanArgs {
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    /// Seconds since the task finished.
    pub older_than: Option<f64>,
    /// Only tasks that ended so; empty: every finished status.
    pub statuses: Vec<crate::task::Status>,
    pub dry_run: bool,
}

#[derive(Debug, Default)]
pub struct LogsArgs {
    pub id: String,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub iteration: Option<u64>,
    pub last: Option<usize>,
    pub follow: bool,
    pub json: bool,
    pub strip_ansi: bool,
}

#[derive(Debug, Default)]
pub struct BackupArgs {
    pub archive: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub no_transcripts: bool,
}

#[derive(Debug, Default)]
pub struct RestoreArgs {
    pub archive: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
}

#[derive(Debug, Default)]
pub struct HealthArgs {
    pub url: Option<String>,
    pub config: Option<PathBuf>,
    pub timeout: Option<f64>,
}

#[derive(Debug)]
pub enum Command {
    Run(RunArgs),
    Daemon(RunArgs, bool),
    Submit(SubmitArgs),
    Cancel(CancelArgs),
    Clean(CleanArgs),
    Logs(LogsArgs),
    Backup(BackupArgs),
    Restore(RestoreArgs),
    Health(HealthArgs),
    CheckConfig(RunArgs),
    Status(StatusArgs),
    Help(&'static str),
    Version,
}

/// Flags that set one configuration key from their value.
pub const VALUE_FLAGS: &[(&str, &str)] = &[
    ("agent", "adapter.name"),
    ("agent-command", "adapter.command"),
    ("agent-arg", "adapter.args"),
    ("timeout", "adapter.timeout"),
    ("idle-timeout", "adapter.idle_timeout"),
    ("max-retries", "adapter.max_retries"),
    ("retry-delay", "adapter.retry_delay"),
    ("prompt", "orchestrator.prompt_file"),
    ("max-iterations", "orchestrator.max_iterations"),
    ("max-runtime", "orchestrator.max_runtime"),
    ("checkpoint-interval", "orchestrator.checkpoint_interval"),
    ("iteration-delay", "orchestrator.iteration_delay"),
    ("log-file", "logging.file"),
    ("log-level", "logging.level"),
    ("log-format", "logging.format"),
    ("metrics-interval", "monitoring.metrics_interval"),
    ("state-dir", "paths.state_dir"),
    ("health-port", "monitoring.health_check_port"),
];

/// Switches that set a key to a fixed value.
pub const SWITCHES: &[(&str, &str, &str)] = &[
    ("no-git", "orchestrator.git_checkpoint", "false"),
    ("no-archive", "orchestrator.archive_prompts", "false"),
    ("verbose", "logging.verbose", "true"),
    ("debug", "logging.level", "debug"),
];

pub const MAIN_HELP: &str = "\
ralph-qchat — run an AI coding agent (Amazon Q Developer CLI or Kiro CLI) in a loop
on a task until the task marks itself complete or a limit is reached.

Usage:
  ralph-qchat [run] [OPTIONS]          run one task in the foreground
  ralph-qchat daemon [OPTIONS]         the service: many tasks from the spool, until SIGTERM
  ralph-qchat submit PROMPT_FILE       queue a task for the daemon (prints its id)
  ralph-qchat cancel ID                stop a task of the daemon
  ralph-qchat status [ID] [--json]     list the tasks in a state directory
  ralph-qchat logs ID [--follow]       print a task's transcripts (follow the running one)
  ralph-qchat clean [--older-than D]   remove finished tasks' records and transcripts
  ralph-qchat backup ARCHIVE           the state directory as a .tar.gz, daemon running or not
  ralph-qchat restore ARCHIVE          unpack a backup into an empty state directory
  ralph-qchat check-config [OPTIONS]   validate and print the effective configuration
  ralph-qchat health [--url URL]       probe the daemon's /health (exit 0 healthy, 1 not)
  ralph-qchat --help | --version

`ralph-qchat` with only options means `run`. `ralph-qchat COMMAND --help` shows
the options of a command. The manual is ralph-qchat(8); the configuration file
is described in ralph-qchat.toml(5).
";

pub const RUN_HELP: &str = "\
Usage: ralph-qchat [run] [OPTIONS]

Runs the agent again and again on the task in the prompt file, in the working
directory, until the prompt file contains a TASK_COMPLETE line or a limit is hit.
Re-running the same command after an interruption resumes the task.

Options (each overrides the configuration file and the environment):
  --prompt FILE              prompt file (default PROMPT.md in the working directory)
  --workdir DIR              working directory of the agent (default .)
  --config FILE              TOML configuration file
  --agent NAME               agent profile: qchat (q), kiro, claude, codex, gemini, custom
  --agent-command PATH       agent program instead of the profile's (q, kiro-cli, claude …)
  --agent-arg ARG            an argument instead of the profile's (repeat for each; the
                             instruction is still passed last)
  --max-iterations N         stop after N iterations (limit_reached)
  --max-runtime SECS         stop after SECS seconds of running (limit_reached)
  --checkpoint-interval N    archive the prompt and git-commit every N iterations
  --timeout SECS             wall-clock limit of one agent request (default: the profile's)
  --idle-timeout SECS        stop a request after SECS without output (0 = off)
  --max-retries N            retries of a failed request
  --retry-delay SECS         first retry delay (doubles each retry)
  --iteration-delay SECS     pause between iterations
  --no-git                   no git commits at checkpoints
  --no-archive               no prompt archive at checkpoints
  --state-dir DIR            state directory (default WORKDIR/.ralph-qchat)
  --log-file FILE            also log to FILE (rotated by size)
  --log-level LEVEL          error, warn, info, debug or trace
  --log-format text|json     log line format
  --metrics-interval SECS    seconds between summary lines (0 = off)
  --health-port N            serve /health, /metrics and /tasks on port N (0 = any free port)
  --verbose                  stream the agent's output to stderr
  --debug                    debug logging (includes the prompt text)
  --dry-run                  print the agent command line and limits, run nothing
  -h, --help                 this help

Exit status: 0 completed, 1 failed, 2 limit reached or stalled, 64 usage,
65 prompt refused, 66 prompt file missing, 69 agent unavailable or not logged
in, 73 state directory not writable, 75 state directory in use, 78
configuration error, 130/143 interrupted.
";

pub const DAEMON_HELP: &str = "\
Usage: ralph-qchat daemon [--config FILE] [--state-dir DIR] [--standby] [OPTIONS]

Runs many Ralph loops at once, taking tasks from <state_dir>/spool/ (see
`submit`), until SIGTERM. The configuration defaults to
/etc/ralph-qchat/qchat.toml when it exists; the state directory to
$STATE_DIRECTORY (set by systemd), else [paths] state_dir, else
/var/lib/ralph-qchat for root and ~/.local/state/ralph-qchat otherwise.

  --config FILE        TOML configuration file
  --state-dir DIR      state directory
  --standby            wait for the state directory's lock instead of exiting 75,
                       answering /health with \"standby\", and take over when the
                       running instance stops
  --health-port N      health port instead of [monitoring] health_check_port
                       (0 = any free port, written to <state_dir>/http.port)
  The run options that set configuration keys (--timeout, --max-retries,
  --log-level, --log-file, --log-format, --verbose, --debug, ...) apply too.

Signals: SIGTERM/SIGINT stop (running requests get orchestrator.shutdown_grace),
SIGHUP reloads the configuration and reopens the log file, SIGUSR1 writes a
diagnostics dump to <state_dir>/diagnostics/.
Exit status: 0 stopped, 64 usage, 73 state directory not writable,
75 state directory in use, 78 configuration error.
";

pub const SUBMIT_HELP: &str = "\
Usage: ralph-qchat submit PROMPT_FILE [--workdir DIR] [--id ID] [--max-iterations N]
                          [--max-runtime SECS] [--state-dir DIR] [--config FILE]

Queues a task for the daemon and prints its id. Without --workdir the prompt is
copied into a fresh workspace <state_dir>/workspaces/<id>/PROMPT.md; with it,
the task runs in DIR on PROMPT_FILE itself. Works while the daemon is down: it
takes the task when it starts.
";

pub const CANCEL_HELP: &str = "\
Usage: ralph-qchat cancel ID [--state-dir DIR] [--config FILE]

Asks the daemon to stop task ID: its agent's process group is terminated and
the task is marked cancelled.
";

pub const CLEAN_HELP: &str = "\
Usage: ralph-qchat clean [--older-than DURATION] [--status STATUS]... [--dry-run]
                         [--state-dir DIR] [--config FILE]

Removes finished tasks' records and transcripts (<state_dir>/tasks/ID/) from
the state directory, with or without a daemon running on it. Unfinished tasks,
and tasks whose on_task_end hook is still due, are never touched; neither are
workspaces (<state_dir>/workspaces/ID/: the agent's work).

  --older-than DURATION  only tasks that finished at least this long ago:
                         a number of seconds, or with a unit: 90s, 30m, 12h, 7d, 2w
  --status STATUS        only tasks that ended so (completed, failed,
                         limit_reached, cancelled, stalled); repeat for more
  --dry-run              list what would be removed, remove nothing
";

pub const LOGS_HELP: &str = "\
Usage: ralph-qchat logs ID [--iteration N | --last K] [--follow] [--json]
                        [--strip-ansi] [--state-dir DIR] [--config FILE]

Prints the transcripts kept of task ID (orchestrator.keep_transcripts of them,
<state_dir>/tasks/ID/iterations/), oldest first: each attempt's header
(iteration, attempt, start, command), the agent's output as recorded (raw
bytes), and its footer (how it ended, its class, duration, bytes, truncation).
Reads the files alone, with or without a daemon running.

  --iteration N   only iteration N
  --last K        only the last K iterations
  --follow        then print output as it is written, on to the next
                  iterations, until the task ends (like tail -f)
  --json          one JSON object per attempt (output as text, invalid UTF-8
                  replaced); with --follow, each when it ends
  --strip-ansi    remove terminal escape sequences from the output
";

pub const BACKUP_HELP: &str = "\
Usage: ralph-qchat backup ARCHIVE [--no-transcripts] [--state-dir DIR] [--config FILE]

Writes the state directory (default: the daemon's) to ARCHIVE, a gzip-compressed
tar (- for standard output), while a daemon runs on it or not. Every task
record, the pauses, the counters and the spool are those of one instant (the
daemon's writer waits meanwhile); transcripts, prompt archives and workspaces
are read after, as they are then. Left out: the lock, the port file, the
record of this machine's cgroups. ARCHIVE must not exist; it appears whole or
not at all.

  --no-transcripts   leave out tasks/*/iterations/ (the agents' output)
";

pub const RESTORE_HELP: &str = "\
Usage: ralph-qchat restore ARCHIVE [--state-dir DIR] [--config FILE]

Unpacks a backup into DIR (default: the daemon's state directory), which must
be empty or missing and used by no ralph-qchat. A daemon started on it then
resumes every task that was running, its interrupted iteration counted. As
root into a directory another user owns, the files become that user's.

Exit status: 0 restored, 65 not a backup or a record that cannot be read,
66 ARCHIVE missing, 73 DIR not empty or not writable, 75 DIR in use.
";

pub const HEALTH_HELP: &str = "\
Usage: ralph-qchat health [--url URL] [--config FILE] [--timeout SECS]

Requests /health (by default on the configuration's health_check_bind and
health_check_port), prints the answer, and exits 0 when the daemon is healthy,
degraded or in standby, 1 otherwise (including no answer within --timeout,
default 5 s). Made for Docker HEALTHCHECK and scripts: no curl needed.
";

pub const CHECK_HELP: &str = "\
Usage: ralph-qchat check-config [--config FILE] [RUN OPTIONS]

Validates the configuration (built-in defaults < file < environment < options)
and prints the effective configuration as TOML. Without --config it reads
/etc/ralph-qchat/qchat.toml when that exists, as the daemon does. Values that are not the
built-in default are followed by a comment naming the file and line, the
environment variable or the option they came from.

Exit status: 0 valid, 78 invalid (the message names the key and where it was set).
";

pub const STATUS_HELP: &str = "\
Usage: ralph-qchat status [ID] [--state-dir DIR] [--config FILE] [--json]

Lists the tasks recorded in a state directory (default: [paths] state_dir, else
./.ralph-qchat). Works whether or not a ralph-qchat is running.

  --json    print the task records as a JSON array
";

fn usage(msg: impl std::fmt::Display) -> Failure {
    Failure::new(USAGE, format!("{msg}\nTry `ralph-qchat --help`."))
}

const COMMANDS: &[&str] = &[
    "run",
    "daemon",
    "submit",
    "cancel",
    "clean",
    "logs",
    "backup",
    "restore",
    "status",
    "health",
    "check-config",
    "help",
];

/// A usage error for an argument the command does not take: an unknown
/// option says which known one it is nearest to.
use crate::config::nearest;

fn unexpected(arg: lexopt::Arg, known: &[&str]) -> Failure {
    match arg {
        Long(name) => {
            let hint = nearest(name, known.iter().copied())
                .map(|k| format!("; did you mean --{k}?"))
                .unwrap_or_default();
            usage(format!("unknown option --{name}{hint}"))
        }
        other => usage(other.unexpected()),
    }
}

fn text(v: OsString, flag: &str) -> Result<String, Failure> {
    v.into_string()
        .map_err(|_| usage(format!("the value of --{flag} is not valid UTF-8")))
}

pub fn parse(args: Vec<OsString>) -> Result<Command, Failure> {
    let first = args.first().and_then(|a| a.to_str()).unwrap_or("");
    let (cmd, rest): (&str, Vec<OsString>) = match first {
        "run" | "check-config" | "status" | "daemon" | "submit" | "cancel" | "clean" | "logs"
        | "backup" | "restore" | "health" => (first, args[1..].to_vec()),
        "help" => return Ok(Command::Help(MAIN_HELP)),
        "" if args.is_empty() => ("run", args),
        s if s.starts_with('-') => {
            if args.len() == 1 && (s == "--help" || s == "-h") {
                return Ok(Command::Help(MAIN_HELP));
            }
            if args.len() == 1 && (s == "--version" || s == "-V") {
                return Ok(Command::Version);
            }
            ("run", args)
        }
        other => {
            let hint = nearest(other, COMMANDS.iter().copied())
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            return Err(usage(format!("unknown command `{other}`{hint}")));
        }
    };
    match cmd {
        "status" => parse_status(rest),
        "submit" => parse_submit(rest),
        "cancel" => parse_cancel(rest),
        "clean" => parse_clean(rest),
        "logs" => parse_logs(rest),
        "backup" => parse_backup(rest),
        "restore" => parse_restore(rest),
        "health" => parse_health(rest),
        "daemon" => {
            let standby = rest.iter().any(|a| a == "--standby");
            let rest: Vec<OsString> = rest.into_iter().filter(|a| a != "--standby").collect();
            if let Some(bad) = rest.iter().find(|a| *a == "--workdir" || *a == "--dry-run") {
                return Err(usage(format!(
                    "{} is an option of run, not of daemon",
                    bad.to_string_lossy()
                )));
            }
            parse_run(rest, DAEMON_HELP).map(|c| match c {
                Command::Run(a) => Command::Daemon(a, standby),
                other => other,
            })
        }
        "check-config" => parse_run(rest, CHECK_HELP).map(|c| match c {
            Command::Run(a) => Command::CheckConfig(a),
            other => other,
        }),
        _ => parse_run(rest, RUN_HELP),
    }
}

fn parse_run(args: Vec<OsString>, help: &'static str) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut a = RunArgs::default();
    let mut level_flag = None;
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(help)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Long("workdir") => a.workdir = Some(p.value().map_err(usage)?.into()),
            Long("dry-run") => a.dry_run = true,
            Long(name) => {
                let name = name.to_string();
                if let Some((flag, key)) = VALUE_FLAGS.iter().find(|(f, _)| *f == name) {
                    let raw = text(p.value().map_err(usage)?, flag)?;
                    let o = Override {
                        source: Source::Flag(format!("--{flag}")),
                        key: key.to_string(),
                        raw,
                    };
                    if *flag == "log-level" {
                        level_flag = Some(o);
                    } else {
                        a.overrides.push(o);
                    }
                } else if let Some((flag, key, value)) =
                    SWITCHES.iter().find(|(f, _, _)| *f == name)
                {
                    a.overrides.push(Override {
                        source: Source::Flag(format!("--{flag}")),
                        key: key.to_string(),
                        raw: value.to_string(),
                    });
                } else {
                    let known = VALUE_FLAGS
                        .iter()
                        .map(|(f, _)| *f)
                        .chain(SWITCHES.iter().map(|(f, _, _)| *f))
                        .chain(["config", "workdir", "dry-run", "help", "version"]);
                    let hint = nearest(&name, known)
                        .map(|k| format!("; did you mean --{k}?"))
                        .unwrap_or_default();
                    return Err(usage(format!("unknown option --{name}{hint}")));
                }
            }
            other => return Err(usage(other.unexpected())),
        }
    }
    // An explicit --log-level wins over --debug, whatever their order.
    a.overrides.extend(level_flag);
    Ok(Command::Run(a))
}

fn number<T: std::str::FromStr>(p: &mut lexopt::Parser, flag: &str) -> Result<T, Failure> {
    let v = text(p.value().map_err(usage)?, flag)?;
    v.parse()
        .map_err(|_| usage(format!("--{flag} takes a number, not {v:?}")))
}

fn parse_submit(args: Vec<OsString>) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut a = SubmitArgs::default();
    let mut prompt = None;
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(SUBMIT_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("workdir") => a.workdir = Some(p.value().map_err(usage)?.into()),
            Long("id") => a.id = Some(text(p.value().map_err(usage)?, "id")?),
            Long("max-iterations") => a.max_iterations = Some(number(&mut p, "max-iterations")?),
            Long("max-runtime") => a.max_runtime = Some(number(&mut p, "max-runtime")?),
            Long("state-dir") => a.state_dir = Some(p.value().map_err(usage)?.into()),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Value(v) if prompt.is_none() => prompt = Some(PathBuf::from(v)),
            other => {
                return Err(unexpected(
                    other,
                    &[
                        "workdir",
                        "id",
                        "max-iterations",
                        "max-runtime",
                        "state-dir",
                        "config",
                        "help",
                        "version",
                    ],
                ));
            }
        }
    }
    a.prompt = prompt.ok_or_else(|| usage("submit needs the prompt file to queue"))?;
    if a.max_iterations == Some(0) {
        return Err(usage("--max-iterations must be at least 1"));
    }
    if a.max_runtime
        .is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= crate::config::MAX_SECONDS))
    {
        return Err(usage(
            "--max-runtime must be a number of seconds greater than 0 and at most ten years",
        ));
    }
    Ok(Command::Submit(a))
}

fn parse_cancel(args: Vec<OsString>) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut a = CancelArgs::default();
    let mut id = None;
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(CANCEL_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("state-dir") => a.state_dir = Some(p.value().map_err(usage)?.into()),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Value(v) if id.is_none() => id = Some(text(v, "ID")?),
            other => {
                return Err(unexpected(
                    other,
                    &["state-dir", "config", "help", "version"],
                ));
            }
        }
    }
    a.id = id.ok_or_else(|| usage("cancel needs the id of the task to stop"))?;
    Ok(Command::Cancel(a))
}

/// `90`, `90s`, `30m`, `12h`, `7d`, `2w` as seconds.
fn duration(v: &str) -> Option<f64> {
    let v = v.trim();
    let (n, unit) = match v.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, "s"),
    };
    let per = match unit {
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 7.0 * 86400.0,
        _ => return None,
    };
    let n: f64 = n.trim().parse().ok()?;
    (n.is_finite() && n >= 0.0 && n * per <= crate::config::MAX_SECONDS).then_some(n * per)
}

fn parse_clean(args: Vec<OsString>) -> Result<Command, Failure> {
    use crate::task::Status;
    let mut p = lexopt::Parser::from_args(args);
    let mut a = CleanArgs::default();
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(CLEAN_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("state-dir") => a.state_dir = Some(p.value().map_err(usage)?.into()),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Long("dry-run") => a.dry_run = true,
            Long("older-than") => {
                let v = text(p.value().map_err(usage)?, "older-than")?;
                a.older_than = Some(duration(&v).ok_or_else(|| {
                    usage(format!(
                        "--older-than takes a duration such as 3600, 90s, 30m, 12h, 7d or 2w (at most ten years), not {v:?}"
                    ))
                })?);
            }
            Long("status") => {
                let v = text(p.value().map_err(usage)?, "status")?;
                let finished: Vec<Status> = Status::ALL
                    .into_iter()
                    .filter(|s| s.is_finished())
                    .collect();
                match finished.iter().find(|s| s.as_str() == v) {
                    Some(s) => a.statuses.push(*s),
                    None => {
                        let names: Vec<&str> = finished.iter().map(|s| s.as_str()).collect();
                        let hint = nearest(&v, names.iter().copied())
                            .map(|k| format!("; did you mean {k}?"))
                            .unwrap_or_default();
                        return Err(usage(format!(
                            "--status {v:?} is not a status a finished task has ({}){hint}",
                            names.join(", ")
                        )));
                    }
                }
            }
            other => {
                return Err(unexpected(
                    other,
                    &[
                        "older-than",
                        "status",
                        "dry-run",
                        "state-dir",
                        "config",
                        "help",
                        "version",
                    ],
                ));
            }
        }
    }
    Ok(Command::Clean(a))
}

fn parse_logs(args: Vec<OsString>) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut a = LogsArgs::default();
    let mut id = None;
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(LOGS_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("state-dir") => a.state_dir = Some(p.value().map_err(usage)?.into()),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Long("iteration") => a.iteration = Some(number(&mut p, "iteration")?),
            Long("last") => a.last = Some(number(&mut p, "last")?),
            Short('f') | Long("follow") => a.follow = true,
            Long("json") => a.json = true,
            Long("strip-ansi") => a.strip_ansi = true,
            Value(v) if id.is_none() => id = Some(text(v, "ID")?),
            other => {
                return Err(unexpected(
                    other,
                    &[
                        "iteration",
                        "last",
                        "follow",
                        "json",
                        "strip-ansi",
                        "state-dir",
                        "config",
                        "help",
                        "version",
                    ],
                ));
            }
        }
    }
    a.id =
        id.ok_or_else(|| usage("logs needs the id of a task (ralph-qchat status lists them)"))?;
    if a.iteration.is_some() && a.last.is_some() {
        return Err(usage("--iteration and --last cannot be used together"));
    }
    if a.iteration == Some(0) || a.last == Some(0) {
        return Err(usage("--iteration and --last count from 1"));
    }
    Ok(Command::Logs(a))
}

fn parse_backup(args: Vec<OsString>) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut a = BackupArgs::default();
    let mut archive = None;
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(BACKUP_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("state-dir") => a.state_dir = Some(p.value().map_err(usage)?.into()),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Long("no-transcripts") => a.no_transcripts = true,
            Value(v) if archive.is_none() => archive = Some(PathBuf::from(v)),
            other => {
                return Err(unexpected(
                    other,
                    &["no-transcripts", "state-dir", "config", "help", "version"],
                ));
            }
        }
    }
    a.archive = archive
        .ok_or_else(|| usage("backup needs the archive to write (- for standard output)"))?;
    Ok(Command::Backup(a))
}

fn parse_restore(args: Vec<OsString>) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut a = RestoreArgs::default();
    let mut archive = None;
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(RESTORE_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("state-dir") => a.state_dir = Some(p.value().map_err(usage)?.into()),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Value(v) if archive.is_none() => archive = Some(PathBuf::from(v)),
            other => {
                return Err(unexpected(
                    other,
                    &["state-dir", "config", "help", "version"],
                ));
            }
        }
    }
    a.archive = archive.ok_or_else(|| usage("restore needs the archive to read"))?;
    Ok(Command::Restore(a))
}

fn parse_health(args: Vec<OsString>) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut a = HealthArgs::default();
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(HEALTH_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("url") => a.url = Some(text(p.value().map_err(usage)?, "url")?),
            Long("config") => a.config = Some(p.value().map_err(usage)?.into()),
            Long("timeout") => a.timeout = Some(number(&mut p, "timeout")?),
            other => {
                return Err(unexpected(
                    other,
                    &["url", "config", "timeout", "help", "version"],
                ));
            }
        }
    }
    Ok(Command::Health(a))
}

fn parse_status(args: Vec<OsString>) -> Result<Command, Failure> {
    let mut p = lexopt::Parser::from_args(args);
    let mut s = StatusArgs {
        config: None,
        state_dir: None,
        json: false,
        id: None,
    };
    while let Some(arg) = p.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help(STATUS_HELP)),
            Short('V') | Long("version") => return Ok(Command::Version),
            Long("json") => s.json = true,
            Long("state-dir") => s.state_dir = Some(p.value().map_err(usage)?.into()),
            Long("config") => s.config = Some(p.value().map_err(usage)?.into()),
            Value(v) if s.id.is_none() => s.id = Some(text(v, "ID")?),
            other => {
                return Err(unexpected(
                    other,
                    &["json", "state-dir", "config", "help", "version"],
                ));
            }
        }
    }
    Ok(Command::Status(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, Failure> {
        parse(args.iter().map(OsString::from).collect())
    }

    #[test]
    fn flags_alone_mean_run() {
        let Ok(Command::Run(a)) = p(&[
            "--agent",
            "q",
            "--config",
            "qchat.toml",
            "--max-iterations",
            "1000",
            "--verbose",
            "--debug",
            "--log-level",
            "DEBUG",
        ]) else {
            panic!("not run")
        };
        assert_eq!(a.config, Some(PathBuf::from("qchat.toml")));
        let keys: Vec<&str> = a.overrides.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "adapter.name",
                "orchestrator.max_iterations",
                "logging.verbose",
                "logging.level",
                "logging.level"
            ]
        );
        assert_eq!(a.overrides.last().unwrap().raw, "DEBUG");
    }

    #[test]
    fn typos_get_the_nearest_option_or_command() {
        let msg = |a: &[&str]| p(a).err().map(|f| f.message).unwrap_or_default();
        assert!(
            msg(&["run", "--max-iteration", "3"]).contains("did you mean --max-iterations?"),
            "{}",
            msg(&["run", "--max-iteration", "3"])
        );
        assert!(msg(&["--timout", "3"]).contains("did you mean --timeout?"));
        assert!(msg(&["status", "--jsn"]).contains("did you mean --json?"));
        assert!(msg(&["submit", "x.md", "--stat-dir", "d"]).contains("did you mean --state-dir?"));
        assert!(msg(&["stauts"]).contains("did you mean `status`?"));
        // Nothing near: no guess.
        let m = msg(&["run", "--frobnicate"]);
        assert!(
            m.contains("unknown option --frobnicate") && !m.contains("did you mean"),
            "{m}"
        );
    }

    #[test]
    fn clean_takes_durations_and_finished_statuses() {
        let Ok(Command::Clean(a)) = p(&[
            "clean",
            "--older-than",
            "7d",
            "--status",
            "failed",
            "--status",
            "cancelled",
        ]) else {
            panic!("not clean")
        };
        assert_eq!(a.older_than, Some(7.0 * 86400.0));
        assert_eq!(a.statuses.len(), 2);
        assert_eq!(duration("90"), Some(90.0));
        assert_eq!(duration("30m"), Some(1800.0));
        assert_eq!(duration("2w"), Some(1_209_600.0));
        for bad in ["", "7y", "-1d", "1e20", "d"] {
            assert_eq!(duration(bad), None, "{bad}");
        }
        let msg = |a: &[&str]| p(a).err().map(|f| f.message).unwrap_or_default();
        assert!(
            msg(&["clean", "--status", "running"]).contains("not a status a finished task has")
        );
        assert!(msg(&["clean", "--status", "complete"]).contains("did you mean completed?"));
        assert!(msg(&["clean", "--older-than", "soon"]).contains("--older-than takes a duration"));
    }

    #[test]
    fn usage_errors() {
        assert_eq!(p(&["frobnicate"]).unwrap_err().code, USAGE);
        assert_eq!(p(&["run", "--bogus"]).unwrap_err().code, USAGE);
        assert_eq!(p(&["run", "--timeout"]).unwrap_err().code, USAGE);
        assert!(matches!(p(&["status", "--help"]), Ok(Command::Help(_))));
        assert!(matches!(p(&["--version"]), Ok(Command::Version)));
        assert!(matches!(p(&[]), Ok(Command::Run(_))));
    }
}

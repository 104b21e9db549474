//! Building an agent request from the configuration and a task: argv, the
//! environment, and the deadlines that apply.

use crate::agent::classify::Rules;
use crate::agent::instruction::instruction;
use crate::agent::{AgentRequest, Cancel, Progress};
use crate::config::Config;
use crate::task::TaskState;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Inputs<'a> {
    pub cfg: &'a Config,
    /// The state directory's mark (`owner_prefix`).
    pub owner: &'a str,
    pub task: &'a TaskState,
    pub prompt: &'a [u8],
    pub attempt: u32,
    /// Seconds left of the task's max_runtime.
    pub remaining_runtime: f64,
    pub transcript: Option<PathBuf>,
    pub stream: bool,
    pub cancel: Arc<Cancel>,
    pub progress: Arc<Progress>,
    pub rules: Arc<Rules>,
    pub state_dir: &'a Path,
}

/// The profile's and the operator's rules, compiled once per configuration
/// (validation compiled them already, so this cannot fail on a loaded one).
pub fn rules(cfg: &Config) -> Arc<Rules> {
    let specs = cfg.adapter.rule_specs();
    match Rules::compile(specs.iter().map(|(r, o)| (r, o.clone()))) {
        Ok(mut r) => {
            r.proof = cfg
                .adapter
                .profile()
                .proof
                .and_then(|p| regex::Regex::new(p).ok());
            Arc::new(r)
        }
        Err((origin, e)) => {
            log::error!("{origin}: {e}; outcome rules are off");
            Arc::new(Rules::default())
        }
    }
}

/// The environment of every process the profile runs: the profile's
/// defaults, then the operator's `[adapter] env`, which wins.
pub fn agent_env(cfg: &Config) -> Vec<(OsString, OsString)> {
    let a = &cfg.adapter;
    let prof = a.profile();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut env: Vec<(OsString, OsString)> = vec![];
    let defaults = prof
        .env
        .iter()
        .chain(if root { prof.root_env } else { &[] });
    for (k, v) in defaults {
        if !a.env.contains_key(*k) {
            env.push((k.into(), v.into()));
        }
    }
    env.extend(a.env.iter().map(|(k, v)| (k.into(), v.into())));
    env
}

/// The lines of an instruction as the output's echo of it would read.
fn echo_lines(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.chars().take(crate::agent::text::MAX_LINE).collect())
        .collect()
}

/// What the markers of every task of one state directory start with: the
/// directory's real path, so a daemon started on it through another path (a
/// symlink, `..`) still finds the leftovers of the last one.
pub fn owner_prefix(state_dir: &Path) -> String {
    let real = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    format!("{}#", real.display())
}

/// The request, and whether the prompt went by reference (too big for argv).
pub fn build(i: Inputs) -> (AgentRequest, bool) {
    let a = &i.cfg.adapter;
    let o = &i.cfg.orchestrator;
    let (text, by_reference) = instruction(
        &o.prompt_template,
        &i.task.prompt_file,
        i.prompt,
        &o.completion_marker,
        i.task.iteration,
        i.task.verify_failed.as_deref().unwrap_or("").as_bytes(),
    );
    let fixed_args = a.effective_args();
    let program = a.effective_command();
    let shown = format!(
        "{} {} <instruction, {} bytes{}>",
        program,
        fixed_args.join(" "),
        text.len(),
        if by_reference {
            ", prompt by reference"
        } else {
            ""
        }
    );
    let mut args: Vec<OsString> = fixed_args.into_iter().map(OsString::from).collect();
    args.push(OsString::from_vec(text.clone()));
    let mut env = agent_env(i.cfg);
    env.push((
        crate::agent::MARKER_VAR.into(),
        format!("{}{}", i.owner, i.task.id).into(),
    ));
    env.push(("RALPH_QCHAT_TASK_ID".into(), i.task.id.clone().into()));
    env.push((
        "RALPH_QCHAT_ITERATION".into(),
        i.task.iteration.to_string().into(),
    ));
    env.push((
        "RALPH_QCHAT_PROMPT_FILE".into(),
        i.task.prompt_file.clone().into(),
    ));
    let request_timeout = a.effective_timeout();
    let timeout = request_timeout.min(i.remaining_runtime.max(0.0));
    let output_marker = (!o.output_completion_marker.is_empty())
        .then(|| o.output_completion_marker.as_bytes().to_vec());
    // Also keeps rules from reading the instruction back as the CLI's words.
    let echo = echo_lines(&text);
    let req = AgentRequest {
        task_id: i.task.id.clone(),
        iteration: i.task.iteration,
        attempt: i.attempt,
        program: program.into(),
        args,
        shown,
        env,
        workdir: PathBuf::from(&i.task.workdir),
        timeout: crate::sys::time::seconds(timeout),
        timeout_is_runtime: i.remaining_runtime < request_timeout,
        idle_timeout: (a.idle_timeout > 0.0).then(|| crate::sys::time::seconds(a.idle_timeout)),
        kill_grace: crate::sys::time::seconds(a.kill_grace),
        poll_interval: crate::sys::time::seconds(i.cfg.performance.poll_interval),
        buffer_size: i.cfg.performance.buffer_size as usize,
        max_output: i.cfg.limits.max_output_size,
        max_memory_mb: i.cfg.limits.max_memory_mb,
        output_marker,
        echo: Arc::new(echo),
        rules: i.rules,
        output_mode: a.profile().output,
        reports: a.profile().reports,
        watch: (o.max_stalled_iterations > 0).then(|| crate::agent::worktree::WatchSpec {
            prompt_file: PathBuf::from(&i.task.prompt_file),
            workdir: PathBuf::from(&i.task.workdir),
            state_dir: i.state_dir.to_path_buf(),
            baseline: i.task.tree_fingerprint.is_none(),
            timeout: crate::sys::time::seconds(o.checkpoint_timeout),
        }),
        transcript: i.transcript,
        keep_transcripts: (o.keep_transcripts as usize).max(1),
        stream: i.stream,
        cancel: i.cancel,
        progress: i.progress,
    };
    (req, by_reference)
}

/// A command the engine runs beside the agent (preflight, verification,
/// hook), supervised the same way: its own process group, a timeout, output
/// read without blocking; no rules, marker or accounting of the agent's.
fn command(
    cfg: &Config,
    task_id: &str,
    argv: &[String],
    shown: String,
    env: Vec<(OsString, OsString)>,
    workdir: PathBuf,
    timeout: f64,
) -> AgentRequest {
    AgentRequest {
        task_id: task_id.to_string(),
        iteration: 0,
        attempt: 1,
        program: argv.first().cloned().unwrap_or_default().into(),
        args: argv.iter().skip(1).map(OsString::from).collect(),
        shown,
        env,
        workdir,
        timeout: crate::sys::time::seconds(timeout),
        timeout_is_runtime: false,
        idle_timeout: None,
        kill_grace: crate::sys::time::seconds(cfg.adapter.kill_grace),
        poll_interval: crate::sys::time::seconds(cfg.performance.poll_interval),
        buffer_size: cfg.performance.buffer_size as usize,
        max_output: 1024 * 1024,
        max_memory_mb: 0,
        output_marker: None,
        echo: Arc::new(vec![]),
        rules: Arc::new(Rules::default()),
        output_mode: crate::agent::profile::OutputMode::Text,
        reports: &[],
        watch: None,
        transcript: None,
        keep_transcripts: 0,
        stream: false,
        cancel: Arc::new(Cancel::default()),
        progress: Arc::new(Progress::default()),
    }
}

/// The profile's preflight (`q whoami`): the agent's environment, in the
/// state directory, judged by the profile's rules (a login prompt stops it).
pub fn preflight(
    cfg: &Config,
    argv: &[String],
    state_dir: &Path,
    rules: Arc<Rules>,
) -> AgentRequest {
    let mut req = command(
        cfg,
        "preflight",
        argv,
        argv.join(" "),
        agent_env(cfg),
        state_dir.to_path_buf(),
        cfg.adapter.preflight_timeout,
    );
    req.max_output = 64 * 1024;
    req.max_memory_mb = cfg.limits.max_memory_mb;
    // `whoami` runs no turn: the proof line of a turn does not apply.
    req.rules = Arc::new(Rules {
        proof: None,
        ..(*rules).clone()
    });
    req
}

/// The on_task_end hook of an ended task: its argv with the task's id,
/// status, reason and counters in the environment, in the task's working
/// directory (the state directory when that is gone), its output in `log`.
pub fn hook(
    cfg: &Config,
    owner: &str,
    task: &TaskState,
    state_dir: &Path,
    log: PathBuf,
) -> AgentRequest {
    let argv = &cfg.hooks.on_task_end;
    let workdir = PathBuf::from(&task.workdir);
    let workdir = if workdir.is_dir() {
        workdir
    } else {
        state_dir.to_path_buf()
    };
    let vars: Vec<(&str, String)> = vec![
        ("RALPH_QCHAT_TASK_ID", task.id.clone()),
        ("RALPH_QCHAT_STATUS", task.status.as_str().to_string()),
        (
            "RALPH_QCHAT_REASON",
            task.reason.clone().unwrap_or_default(),
        ),
        ("RALPH_QCHAT_ITERATIONS", task.iteration.to_string()),
        (
            "RALPH_QCHAT_SUCCESSFUL_ITERATIONS",
            task.successful_iterations.to_string(),
        ),
        (
            "RALPH_QCHAT_FAILED_ITERATIONS",
            task.failed_iterations.to_string(),
        ),
        ("RALPH_QCHAT_RETRIES", task.retries.to_string()),
        ("RALPH_QCHAT_THROTTLED", task.throttled.to_string()),
        (
            "RALPH_QCHAT_RUNTIME_SECS",
            format!("{:.0}", task.runtime_secs),
        ),
        ("RALPH_QCHAT_CREDITS", task.credits.to_string()),
        ("RALPH_QCHAT_COST_USD", task.cost_usd.to_string()),
        ("RALPH_QCHAT_TOKENS", task.tokens.to_string()),
        (
            "RALPH_QCHAT_LAST_ERROR",
            task.last_error.clone().unwrap_or_default(),
        ),
        ("RALPH_QCHAT_PROMPT_FILE", task.prompt_file.clone()),
        ("RALPH_QCHAT_WORKDIR", task.workdir.clone()),
        (crate::agent::MARKER_VAR, format!("{owner}{}", task.id)),
    ];
    let env = vars
        .into_iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect();
    let shown = format!("on_task_end hook {}", argv.join(" "));
    let mut req = command(cfg, &task.id, argv, shown, env, workdir, cfg.hooks.timeout);
    req.iteration = task.iteration;
    req.transcript = Some(log);
    req
}

/// The verification of a task that says it is complete: `verify_command`
/// in the task's working directory with the agent's environment, its output
/// appended to the iteration's transcript.
pub fn verify(cfg: &Config, owner: &str, task: &TaskState, transcript: PathBuf) -> AgentRequest {
    let argv = &cfg.orchestrator.verify_command;
    let mut env = agent_env(cfg);
    env.push((
        crate::agent::MARKER_VAR.into(),
        format!("{owner}{}", task.id).into(),
    ));
    env.push(("RALPH_QCHAT_TASK_ID".into(), task.id.clone().into()));
    env.push((
        "RALPH_QCHAT_PROMPT_FILE".into(),
        task.prompt_file.clone().into(),
    ));
    let shown = format!("verify_command {}", argv.join(" "));
    let workdir = PathBuf::from(&task.workdir);
    let mut req = command(
        cfg,
        &task.id,
        argv,
        shown,
        env,
        workdir,
        cfg.orchestrator.verify_timeout,
    );
    req.iteration = task.iteration;
    req.max_output = cfg.limits.max_output_size;
    req.max_memory_mb = cfg.limits.max_memory_mb;
    req.transcript = Some(transcript);
    req
}

/// What the next instruction says of a failed verification.
pub fn verify_failure(cfg: &Config, o: &crate::agent::AgentOutcome) -> String {
    let tail: Vec<&str> = o.lines.iter().map(String::as_str).collect();
    format!(
        "\n\nThe task was marked complete, but the verification command `{}` failed ({}), so it is not done. \
The end of its output:\n\n{}\n\nFix what it reports. Leave the completion marker in place only when the \
verification passes.",
        cfg.orchestrator.verify_command.join(" "),
        o.ending.describe(),
        tail.join("\n")
    )
}

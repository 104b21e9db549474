//! `ralph-qchat run`: one task in the foreground, on the same scheduler the
//! daemon uses, with one worker.

use crate::cli::RunArgs;
use crate::config::{self, Config, Layers};
use crate::engine::notify::Notifier;
use crate::engine::request;
use crate::engine::{Mode, Scheduler, Shared, signals};
use crate::exit::{self, Failure, NO_INPUT};
use crate::store::{LockError, StateLock, TaskStore};
use crate::task::{self, Status, TaskState};
use std::path::PathBuf;
use std::time::Duration;

/// The configuration and the paths a run works with, all absolute.
pub struct Setup {
    pub loaded: config::Loaded,
    pub workdir: PathBuf,
    pub prompt: PathBuf,
    pub state_dir: PathBuf,
}

pub fn setup(args: &RunArgs) -> Result<Setup, Failure> {
    let cwd = std::env::current_dir().map_err(|e| {
        Failure::new(
            exit::USAGE,
            format!("cannot read the current directory: {e}"),
        )
    })?;
    let mut loaded = config::load(&Layers {
        file: args.config.clone(),
        file_required: true,
        env: config::process_env(),
        flags: args.overrides.clone(),
    })?;
    let workdir = cwd.join(args.workdir.clone().unwrap_or_else(|| ".".into()));
    let workdir = workdir.canonicalize().map_err(|e| {
        Failure::new(
            exit::USAGE,
            format!("working directory {} is not usable: {e}", workdir.display()),
        )
    })?;
    let cfg = &mut loaded.config;
    let prompt = workdir.join(&cfg.orchestrator.prompt_file);
    cfg.adapter.anchor_command(&cwd);
    let state_dir = if cfg.paths.state_dir.is_empty() {
        workdir.join(".ralph-qchat")
    } else {
        cwd.join(&cfg.paths.state_dir)
    };
    Ok(Setup {
        loaded,
        workdir,
        prompt,
        state_dir,
    })
}

pub fn run(args: RunArgs) -> Result<i32, Failure> {
    let caught = signals::catch()
        .map_err(|e| Failure::new(exit::CANT_CREATE, format!("cannot handle signals: {e}")))?;
    let s = setup(&args)?;
    let cfg = s.loaded.config.clone();
    crate::logging::init(&cfg.logging).map_err(|e| Failure::new(exit::CANT_CREATE, e))?;
    for w in &s.loaded.warnings {
        log::warn!("{w}");
    }
    if !s.prompt.is_file() {
        return Err(Failure::new(
            NO_INPUT,
            format!(
                "prompt file {} not found: write the task there, or name another file with --prompt",
                s.prompt.display()
            ),
        ));
    }
    if args.dry_run {
        print!("{}", dry_run(&cfg, &s)?);
        return Ok(exit::OK);
    }
    std::fs::create_dir_all(&s.state_dir).map_err(|e| {
        Failure::new(
            exit::CANT_CREATE,
            format!(
                "cannot create state directory {}: {e}",
                s.state_dir.display()
            ),
        )
    })?;
    // Keeps the state out of `git status` when it lives inside the work tree.
    let ignore = s.state_dir.join(".gitignore");
    if !ignore.exists() {
        let _ = std::fs::write(&ignore, "# ralph-qchat state: never commit\n*\n");
    }
    let _lock = StateLock::acquire(&s.state_dir).map_err(|e| match e {
        LockError::Held { .. } => Failure::new(exit::TEMPFAIL, e.to_string()),
        LockError::Io { .. } => Failure::new(exit::CANT_CREATE, e.to_string()),
    })?;
    let store = TaskStore::new(&s.state_dir);
    let id = task::id_from_file_name(
        &s.prompt
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    super::setup::sweep_abandoned(store.clone(), vec![id.clone()]);
    let state = match store.load(&id) {
        Ok(Some(st)) => match reopen(st) {
            Some(st) => st,
            None => {
                log::info!(task = id.as_str(); "task already completed; nothing to do (remove {} to start over)", store.task_dir(&id).display());
                return Ok(exit::OK);
            }
        },
        Ok(None) => TaskState::new(
            &id,
            &s.prompt.display().to_string(),
            &s.workdir.display().to_string(),
        ),
        Err(e) => {
            return Err(Failure::new(
                exit::CANT_CREATE,
                format!("{e}; move it aside to start the task afresh"),
            ));
        }
    };
    store.save(&state).map_err(|e| {
        Failure::new(
            exit::CANT_CREATE,
            format!(
                "cannot write to state directory {}: {e}",
                s.state_dir.display()
            ),
        )
    })?;
    log::info!(task = id.as_str();
        "ralph-qchat {} running {} on {} in {} (state in {})",
        env!("CARGO_PKG_VERSION"),
        cfg.adapter.effective_command(),
        s.prompt.display(),
        s.workdir.display(),
        s.state_dir.display()
    );
    let mut cfg = cfg;
    cfg.performance.max_concurrent = 1;
    let shared = Shared::new(
        cfg.adapter.name.as_str(),
        &cfg.adapter.effective_command(),
        s.state_dir.clone(),
    );
    shared.set_check_every(crate::sys::time::seconds(
        cfg.monitoring.health_check_interval,
    ));
    // A foreground run serves HTTP only when asked to with --health-port.
    let asked = matches!(
        s.loaded.source_of("monitoring.health_check_port"),
        crate::config::Source::Flag(_)
    );
    let mut http_cfg = cfg.clone();
    http_cfg.monitoring.health_check_enabled = true;
    let contain = super::setup::contain(&cfg, &s.state_dir, &shared)?;
    let mut scheduler = Scheduler::new(
        cfg,
        store,
        Mode::Run,
        Notifier::disabled(),
        shared.clone(),
        contain.clone(),
    )
    .map_err(|e| Failure::new(exit::CANT_CREATE, format!("cannot start worker: {e}")))?;
    scheduler.adopt(state);
    // As the daemon: the port opens on a published, restored snapshot.
    scheduler.publish_now();
    let http = if asked {
        super::setup::start_http(&http_cfg, &shared, Some(&s.state_dir))?
    } else {
        None
    };
    let finished = signals::serve(scheduler, Some(Duration::ZERO), None, caught)
        .map_err(|e| Failure::new(exit::CANT_CREATE, format!("cannot run: {e}")))?;
    contain.close();
    if let Some(h) = http {
        h.remove_port_file(&s.state_dir);
        h.stop();
    }
    if let Some(sig) = finished.signal {
        log::info!("interrupted by signal {sig}; run the same command again to resume");
        return Ok(exit::interrupted(sig));
    }
    let Some(t) = finished.tasks.first() else {
        return Ok(exit::TASK_FAILED);
    };
    Ok(match t.status {
        Status::Completed => exit::OK,
        Status::LimitReached | Status::Stalled => exit::LIMIT_REACHED,
        Status::Failed if finished.unavailable => exit::UNAVAILABLE,
        Status::Failed if finished.refused => exit::PROMPT_REFUSED,
        _ => exit::TASK_FAILED,
    })
}

/// A task found on disk, made ready to go on; None when it is completed.
/// A failed or limited task resumes (a raised limit lets it continue; an
/// unchanged one ends it again at once).
fn reopen(mut st: TaskState) -> Option<TaskState> {
    match st.status {
        Status::Completed => return None,
        Status::Failed | Status::LimitReached | Status::Cancelled | Status::Stalled => {
            log::info!(task = st.id.as_str(); "resuming task that ended {} ({})", st.status.as_str(), st.reason.clone().unwrap_or_default());
            st.status = Status::Running;
            st.reason = None;
            st.finished_at = None;
            st.consecutive_failures = 0;
            st.stalled_iterations = 0;
        }
        Status::Queued | Status::Running => {}
    }
    Some(st)
}

fn dry_run(cfg: &Config, s: &Setup) -> Result<String, Failure> {
    use std::fmt::Write;
    let raw = std::fs::read(&s.prompt).map_err(|e| {
        Failure::new(
            NO_INPUT,
            format!("cannot read prompt file {}: {e}", s.prompt.display()),
        )
    })?;
    let prompt = crate::agent::instruction::check_prompt(
        raw,
        cfg.limits.max_prompt_size,
        &cfg.limits.blocked_patterns,
    )
    .map_err(|r| Failure::new(exit::PROMPT_REFUSED, format!("{}: {r}", s.prompt.display())))?;
    let task = TaskState::new(
        "dry-run",
        &s.prompt.display().to_string(),
        &s.workdir.display().to_string(),
    );
    let owner = request::owner_prefix(&s.state_dir);
    let (req, by_ref) = request::build(request::Inputs {
        cfg,
        owner: &owner,
        task: &TaskState {
            iteration: 1,
            ..task
        },
        prompt: &prompt.text,
        attempt: 1,
        remaining_runtime: cfg.orchestrator.max_runtime,
        transcript: None,
        stream: false,
        cancel: Default::default(),
        progress: Default::default(),
        rules: request::rules(cfg),
        state_dir: &s.state_dir,
    });
    let o = &cfg.orchestrator;
    let a = &cfg.adapter;
    let mut out = String::new();
    let _ = writeln!(out, "# dry run: nothing is started");
    let _ = writeln!(out, "workdir: {}", s.workdir.display());
    let _ = writeln!(out, "prompt file: {}", s.prompt.display());
    let _ = writeln!(out, "state dir: {}", s.state_dir.display());
    let _ = writeln!(out, "argv[0]: {}", req.program.to_string_lossy());
    for (i, arg) in req.args.iter().enumerate() {
        let _ = writeln!(out, "argv[{}]: {}", i + 1, arg.to_string_lossy());
    }
    if by_ref {
        let _ = writeln!(
            out,
            "note: the prompt is passed by reference (too large for one argument)"
        );
    }
    let _ = writeln!(
        out,
        "limits: max_iterations={} max_runtime={}s max_consecutive_failures={} timeout={}s idle_timeout={}s max_retries={} retry_delay={}s max_retry_delay={}s kill_grace={}s max_output_size={} max_memory_mb={} checkpoint_interval={} iteration_delay={}s",
        o.max_iterations,
        o.max_runtime,
        o.max_consecutive_failures,
        a.effective_timeout(),
        a.idle_timeout,
        a.max_retries,
        a.retry_delay,
        a.max_retry_delay,
        a.kill_grace,
        cfg.limits.max_output_size,
        cfg.limits.max_memory_mb,
        o.checkpoint_interval,
        o.iteration_delay
    );
    Ok(out)
}

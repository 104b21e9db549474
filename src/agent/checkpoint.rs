//! Checkpoints: the prompt archived beside the task's state, and the work
//! committed to git. Nothing here ever resets or discards work.

use super::attempt::Cancel;
use super::bounded::{self, Failure};
use super::contain::Containment;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct CheckpointJob {
    pub task_id: String,
    pub iteration: u64,
    pub prompt_file: PathBuf,
    pub workdir: PathBuf,
    /// Where to copy the prompt; None when archive_prompts is off.
    pub archive_dir: Option<PathBuf>,
    /// How many archived prompts stay, and for how long (seconds; 0: no
    /// limit of that kind).
    pub keep_archived: usize,
    pub archive_max_age: f64,
    /// limits.max_prompt_size: a larger prompt is not archived.
    pub max_prompt: u64,
    pub git: bool,
    /// Never committed, even when it lies inside the work tree.
    pub state_dir: PathBuf,
    /// For all of the checkpoint's git commands together.
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// Shutdown stops a checkpoint that has not finished.
    pub cancel: Arc<Cancel>,
}

/// What a checkpoint did, for the log.
#[derive(Debug, Default, PartialEq)]
pub struct Done {
    pub archived: Option<PathBuf>,
    pub commit: Option<String>,
    pub notes: Vec<String>,
}

pub fn checkpoint(job: &CheckpointJob, contain: &Containment) -> Done {
    let mut done = Done::default();
    if let Some(dir) = &job.archive_dir {
        let dest = dir.join(format!("prompt-{:06}.md", job.iteration));
        // Read as the scheduler reads it: a prompt the agent replaced by a
        // FIFO must not block this worker.
        let copy = std::fs::create_dir_all(dir)
            .and_then(|_| crate::sys::regular::read(&job.prompt_file, job.max_prompt))
            .and_then(|bytes| {
                if bytes.len() as u64 > job.max_prompt {
                    return Err(std::io::Error::other(format!(
                        "it is over limits.max_prompt_size ({} bytes)",
                        job.max_prompt
                    )));
                }
                std::fs::write(&dest, bytes)
            });
        match copy {
            Ok(_) => done.archived = Some(dest),
            Err(e) => done.notes.push(format!(
                "cannot archive {} to {}: {e}",
                job.prompt_file.display(),
                dest.display()
            )),
        }
        let pruned = crate::sys::prune::prune(
            dir,
            job.keep_archived,
            job.archive_max_age,
            std::time::SystemTime::now(),
        );
        for f in pruned.failed {
            done.notes
                .push(format!("cannot remove an old archived prompt {f}"));
        }
    }
    if job.git {
        let deadline = Instant::now() + job.timeout;
        match git_commit(job, deadline, contain) {
            Ok(c) => done.commit = c,
            Err(e) => done.notes.push(e),
        }
    }
    done
}

fn git(dir: &Path) -> Command {
    let mut c = Command::new("git");
    c.current_dir(dir)
        .stdin(Stdio::null())
        .env("GIT_TERMINAL_PROMPT", "0")
        .args([
            "-c",
            "commit.gpgsign=false",
            "-c",
            "core.hooksPath=/dev/null",
        ]);
    c
}

/// One git command within the checkpoint's deadline.
fn run(
    job: &CheckpointJob,
    contain: &Containment,
    deadline: Instant,
    cmd: &mut Command,
    what: &str,
) -> Result<bounded::Finished, String> {
    bounded::run(
        cmd,
        deadline,
        job.kill_grace,
        Some(&job.cancel),
        contain,
        &job.task_id,
    )
    .map_err(|f| match f {
        Failure::Spawn(e) => format!("git checkpoint: cannot run git ({what}): {e}"),
        Failure::TimedOut => format!(
            "git checkpoint: `git {what}` did not finish within {:.0} s (orchestrator.checkpoint_timeout) and was killed; \
             look for a hook, filter or fsmonitor in {}/.git/config",
            job.timeout.as_secs_f64(),
            job.workdir.display()
        ),
        Failure::Cancelled => format!("git checkpoint: `git {what}` stopped by shutdown"),
    })
}

/// Commits every change in the work tree around `workdir`; Ok(None) when the
/// directory is not in a git work tree or nothing changed.
fn git_commit(
    job: &CheckpointJob,
    deadline: Instant,
    contain: &Containment,
) -> Result<Option<String>, String> {
    let top = match run(
        job,
        contain,
        deadline,
        git(&job.workdir).args(["rev-parse", "--show-toplevel"]),
        "rev-parse",
    ) {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        Ok(_) => return Ok(None),
        Err(e) if e.contains("No such file") => {
            return Err("git checkpoint skipped: git is not installed".into());
        }
        Err(e) => return Err(e),
    };
    let mut add = git(&top);
    add.args(["add", "-A", "--", "."]);
    if let (Ok(t), Ok(s)) = (top.canonicalize(), job.state_dir.canonicalize())
        && let Ok(rel) = s.strip_prefix(&t)
    {
        if rel.as_os_str().is_empty() {
            return Err(
                "git checkpoint skipped: the state directory is the work tree itself".into(),
            );
        }
        add.arg(format!(":(exclude){}", rel.display()));
    }
    let o = run(job, contain, deadline, &mut add, "add")?;
    if !o.status.success() {
        return Err(format!(
            "git checkpoint: `git add -A` failed in {}: {}",
            top.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let staged = run(
        job,
        contain,
        deadline,
        git(&top).args(["diff", "--cached", "--quiet"]),
        "diff",
    )?;
    if staged.status.success() {
        return Ok(None);
    }
    let mut commit = git(&top);
    let has_identity = run(
        job,
        contain,
        deadline,
        git(&top).args(["config", "user.email"]),
        "config",
    )
    .map(|o| o.status.success() && !o.stdout.trim_ascii().is_empty())
    .unwrap_or(false);
    if !has_identity {
        commit
            .env("GIT_AUTHOR_NAME", "ralph-qchat")
            .env("GIT_AUTHOR_EMAIL", "ralph-qchat@localhost")
            .env("GIT_COMMITTER_NAME", "ralph-qchat")
            .env("GIT_COMMITTER_EMAIL", "ralph-qchat@localhost");
    }
    let message = format!(
        "ralph-qchat checkpoint: task {} after iteration {}",
        job.task_id, job.iteration
    );
    let o = run(
        job,
        contain,
        deadline,
        commit.args(["commit", "--no-verify", "-q", "-m", &message]),
        "commit",
    )?;
    if !o.status.success() {
        return Err(format!(
            "git checkpoint: commit failed in {}: {}",
            top.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    let head = run(
        job,
        contain,
        deadline,
        git(&top).args(["rev-parse", "--short", "HEAD"]),
        "rev-parse",
    )?;
    Ok(Some(
        String::from_utf8_lossy(&head.stdout).trim().to_string(),
    ))
}

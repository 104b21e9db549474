//! Starting the agent child: argv (never a shell), stdin from /dev/null, its own
//! process group, death signal tied to us, resource limits.

use super::AgentRequest;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

/// Environment variable that marks every process of an agent run, so leftovers
/// of a killed daemon can be found and ended on the next start.
pub const MARKER_VAR: &str = "RALPH_QCHAT_OWNER";

pub enum SpawnError {
    /// Missing or not executable: the operator must fix the installation.
    Unavailable(String),
    Other(String),
}

pub fn spawn(req: &AgentRequest) -> Result<Child, SpawnError> {
    let mut cmd = Command::new(&req.program);
    cmd.args(&req.args)
        .current_dir(&req.workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in &req.env {
        cmd.env(k, v);
    }
    let parent = std::process::id() as libc::pid_t;
    let max_as = req.max_memory_mb.saturating_mul(1024 * 1024);
    // SAFETY: only async-signal-safe syscalls run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // The death signal follows the thread that forked: workers outlive
            // their children, so this fires only when the daemon itself dies.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            let zero = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &zero);
            if max_as > 0 {
                let lim = libc::rlimit {
                    rlim_cur: max_as,
                    rlim_max: max_as,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        let program = req.program.to_string_lossy();
        match e.raw_os_error() {
            Some(libc::ENOENT) => SpawnError::Unavailable(format!(
                "agent command `{program}` not found (looked in PATH and {}); install it or set adapter.command",
                req.workdir.display()
            )),
            Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) => {
                SpawnError::Unavailable(format!(
                    "agent command `{program}` cannot be executed ({e}); check that it is an executable program"
                ))
            }
            _ => SpawnError::Other(format!("cannot start agent command `{program}`: {e}")),
        }
    })
}

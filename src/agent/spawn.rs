//! Starting a child (an agent, a verify command, a hook, git): argv (never
//! a shell), stdin from /dev/null, its own process group, death signal tied
//! to us, its attempt's cgroups joined and resource limits set before exec.
//!
//! Only the worker that started a child waits for it: it is the child of
//! that worker thread, and the subreaper reaps only the main thread's
//! (`sys::reaper`).
//!
//! Not std::process::Command: the setup the child needs before exec
//! (PDEATHSIG, rlimits) makes std fork(), which copies the page tables of a
//! daemon with thirty threads on every start and then takes copy-on-write
//! faults on them — the largest cost per request the benchmark found. The
//! child is made the way glibc's posix_spawn makes it, with
//! clone(CLONE_VM | CLONE_VFORK): it runs on its own small stack inside our
//! memory, does only async-signal-safe syscalls on data prepared before the
//! clone, and execs; the calling worker resumes once it has.
//!
//! Its exit signals SIGCHLD, which wakes the reaper per request: an exit
//! signal of 0 would not spare that, exec sets it back to SIGCHLD (seen with
//! strace).

use super::attempt::AgentRequest;
use super::plan::{BaseEnv, Plan};
use crate::sys::cgroup::Joins;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};

/// Environment variable that marks every process of an agent run, so leftovers
/// of a killed daemon can be found and ended on the next start.
pub const MARKER_VAR: &str = "RALPH_QCHAT_OWNER";

/// The child's stack: it needs little (a few syscalls), the rest is margin.
const STACK: usize = 64 * 1024;

/// clone3 with CLONE_INTO_CGROUP failed once (a kernel before 5.7, or a
/// seccomp filter): children join by writing cgroup.procs from then on.
static NO_CLONE3: AtomicBool = AtomicBool::new(false);

pub enum SpawnError {
    /// Missing or not executable: the operator must fix the installation.
    Unavailable(String),
    Other(String),
}

/// What to start.
pub struct Spec<'a> {
    /// "agent command", "git": for error messages.
    pub role: &'a str,
    pub program: &'a OsStr,
    pub args: &'a [OsString],
    pub env: &'a [(OsString, OsString)],
    pub workdir: &'a Path,
    /// RLIMIT_AS in bytes, 0 = none.
    pub max_as: u64,
    /// The attempt's cgroups.
    pub joins: &'a Joins,
    /// Our ends of its stdout and stderr pipes are made non-blocking (for
    /// a poller), its own ends stay blocking.
    pub nonblocking: bool,
}

impl<'a> Spec<'a> {
    pub fn agent(req: &'a AgentRequest, joins: &'a Joins, max_as: u64) -> Spec<'a> {
        Spec {
            role: "agent command",
            program: &req.program,
            args: &req.args,
            env: &req.env,
            workdir: &req.workdir,
            max_as,
            joins,
            nonblocking: true,
        }
    }
}

/// A started child: its pid (leader of its own process group) and the read
/// ends of its stdout and stderr.
pub struct Spawned {
    pid: libc::pid_t,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// A pidfd of the child, made by clone3 itself (CLONE_PIDFD) where it
    /// was used: a pidfd_open fewer per start.
    pub pidfd: Option<OwnedFd>,
    /// CPU seconds and peak RSS (bytes) of the child and the descendants it
    /// waited for, once reaped.
    pub rusage: Option<(f64, u64)>,
}

impl Spawned {
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// The exit status once the child has exited; reaps it.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.reap(0)? {
                return Ok(s);
            }
        }
    }

    fn reap(&mut self, flags: i32) -> io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let mut raw = 0;
        // SAFETY: zeroed plain data.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid pointers.
        let r = unsafe { libc::wait4(self.pid, &mut raw, flags | libc::__WALL, &mut ru) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(None);
        }
        self.status = Some(ExitStatus::from_raw(raw));
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        self.rusage = Some((
            secs(ru.ru_utime) + secs(ru.ru_stime),
            (ru.ru_maxrss.max(0) as u64) * 1024,
        ));
        Ok(self.status)
    }
}

/// A worker's means of starting children: the child stack (one per worker,
/// reused: the worker is suspended while its child runs on it) and /dev/null.
pub struct Launcher {
    stack: *mut libc::c_void,
    devnull: OwnedFd,
    env: BaseEnv,
    plan: Plan,
    /// The signals the child sets back to SIG_DFL (`to_reset`).
    resets: Vec<libc::c_int>,
}

// SAFETY: the stack is a private mapping used only by the owning worker.
unsafe impl Send for Launcher {}

impl Launcher {
    pub fn new() -> io::Result<Launcher> {
        // SAFETY: an anonymous private mapping; checked for MAP_FAILED.
        let stack = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STACK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if stack == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // A guard page at the low end: an overflow faults instead of
        // writing over whatever lies below.
        // SAFETY: the first page of the mapping just made.
        unsafe { libc::mprotect(stack, page_size(), libc::PROT_NONE) };
        let devnull = std::fs::File::open("/dev/null")?;
        Ok(Launcher {
            stack,
            devnull: devnull.into(),
            env: BaseEnv::of_process(),
            plan: Plan::default(),
            resets: to_reset(),
        })
    }

    pub fn spawn(&mut self, req: &Spec) -> Result<Spawned, SpawnError> {
        let shown = req.program.to_string_lossy().into_owned();
        let role = req.role;
        let other =
            |what: String| SpawnError::Other(format!("cannot start {role} `{shown}`: {what}"));
        self.plan
            .build(req, &self.env)
            .map_err(|e| other(e.to_string()))?;
        let plan = &self.plan;
        // Made non-blocking by pipe2 for both ends, the child's cleared in
        // the child: two system calls fewer per start than fcntl on ours.
        let flags = if req.nonblocking { libc::O_NONBLOCK } else { 0 };
        let (out_r, out_w) = pipe(flags).map_err(|e| other(format!("pipe: {e}")))?;
        let (err_r, err_w) = pipe(flags).map_err(|e| other(format!("pipe: {e}")))?;
        let args = ChildArgs {
            candidates: plan.candidates(),
            argv: plan.argv(),
            envp: plan.envp(),
            cwd: plan.cwd(),
            fds: [
                self.devnull.as_raw_fd(),
                out_w.as_raw_fd(),
                err_w.as_raw_fd(),
            ],
            blocking_out: req.nonblocking,
            stage: AtomicU8::new(0),
            errno: AtomicI32::new(0),
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
            max_as: req.max_as,
            resets: self.resets.as_ptr(),
            n_resets: self.resets.len(),
            joins: std::ptr::null(),
            n_joins: 0,
            join_dir: -1,
        };
        let mut args = args;
        args.joins = req.joins.v1_procs.as_ptr();
        args.n_joins = req.joins.v1_procs.len();
        // Created inside the attempt's v2 cgroup where the kernel can: a
        // migration (the write to cgroup.procs) waits for an RCU grace period.
        let into = req
            .joins
            .dir
            .filter(|_| cfg!(target_arch = "x86_64") && !NO_CLONE3.load(Ordering::Relaxed));
        args.join_dir = match into {
            Some(_) => -1,
            None => req.joins.dir.unwrap_or(-1),
        };
        // SAFETY: the top of our mapping, 16-byte aligned as the ABI wants.
        let top = unsafe { self.stack.cast::<u8>().add(STACK) }.cast::<libc::c_void>();
        // Every signal stays blocked from before the clone until the child
        // has reset the handlers it inherited, so none of ours runs in it.
        let (pid, pidfd) = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let argp: *mut ChildArgs = &mut args;
            let arg = argp.cast();
            let mut pid = -1;
            let mut pidfd: libc::c_int = -1;
            let mut e = io::Error::from_raw_os_error(libc::ENOSYS);
            if let Some(dir) = into {
                pid = clone_into(dir, self.stack, arg, &mut pidfd);
                if pid < 0 {
                    e = io::Error::from_raw_os_error(-pid);
                    if matches!(
                        -pid,
                        libc::ENOSYS | libc::EINVAL | libc::E2BIG | libc::EPERM
                    ) {
                        NO_CLONE3.store(true, Ordering::Relaxed);
                        log::info!(
                            "clone3 with CLONE_INTO_CGROUP is not available ({e}); children join their cgroup before exec"
                        );
                        (*argp).join_dir = dir;
                    }
                }
            }
            if pid < 0 && (into.is_none() || NO_CLONE3.load(Ordering::Relaxed)) {
                // SAFETY: child_main touches only `args` (alive until we
                // return, and we are suspended until the child execs or
                // exits) and its stack.
                pid = libc::clone(
                    child_main,
                    top,
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                    arg,
                );
                e = io::Error::last_os_error();
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(other(format!("clone: {e}")));
            }
            // SAFETY: a descriptor clone3 made for us, owned by nobody else.
            let pidfd = (pidfd >= 0).then(|| OwnedFd::from_raw_fd(pidfd));
            (pid, pidfd)
        };
        drop((out_w, err_w));
        let mut spawned = Spawned {
            pid,
            stdout: Some(out_r),
            stderr: Some(err_r),
            status: None,
            pidfd,
            rusage: None,
        };
        // We resumed once the child exec'd or exited: a child that failed
        // said where, in our memory, before it exited (as posix_spawn does;
        // a pipe for it cost three system calls and two descriptors).
        let stage = args.stage.load(Ordering::Acquire);
        if stage == 0 {
            return Ok(spawned);
        }
        let _ = spawned.wait();
        let errno = args.errno.load(Ordering::Acquire);
        let e = io::Error::from_raw_os_error(errno);
        Err(match (stage, errno) {
            (STAGE_EXEC, libc::ENOENT) => SpawnError::Unavailable(format!(
                "{role} `{shown}` not found (looked in PATH and {}); install it{}",
                req.workdir.display(),
                if role == "agent command" {
                    " or set adapter.command"
                } else {
                    ""
                }
            )),
            (STAGE_EXEC, libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::ENOTDIR) => {
                SpawnError::Unavailable(format!(
                    "{role} `{shown}` cannot be executed ({e}); check that it is an executable program"
                ))
            }
            (STAGE_CGROUP, _) => other(format!("joining the attempt's cgroup: {e}")),
            (STAGE_CHDIR, libc::ENOENT) => other(format!(
                "working directory {} does not exist",
                req.workdir.display()
            )),
            (STAGE_CHDIR, _) => other(format!(
                "cannot enter working directory {}: {e}",
                req.workdir.display()
            )),
            (STAGE_SETUP, _) => other(format!(
                "setting up the child (process group, death signal, limits): {e}"
            )),
            _ => other(e.to_string()),
        })
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new(), no child can be using it now.
        unsafe { libc::munmap(self.stack, STACK) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 { p as usize } else { 4096 }
}

fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fds we now own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Makes children join their cgroup by writing cgroup.procs, as on kernels
/// without CLONE_INTO_CGROUP (tests of that path).
#[cfg(test)]
pub fn force_join_by_write(on: bool) {
    NO_CLONE3.store(on, Ordering::Relaxed);
}

/// The kernel's struct clone_args (CLONE_ARGS_SIZE_VER2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// clone3(CLONE_VM | CLONE_VFORK | CLONE_INTO_CGROUP | CLONE_PIDFD) running
/// `child_main(arg)` on `stack`: the child starts inside the cgroup of the
/// directory fd `cgroup`, and `pidfd` receives a pidfd of it. Returns the
/// pid, or -errno. In assembly because the child
/// returns from the syscall on the new stack, where no Rust frame exists to
/// return to: it calls child_main straight away, which execs or exits.
#[cfg(target_arch = "x86_64")]
unsafe fn clone_into(
    cgroup: RawFd,
    stack: *mut libc::c_void,
    arg: *mut libc::c_void,
    pidfd: &mut libc::c_int,
) -> i32 {
    let ca = CloneArgs {
        flags: libc::CLONE_VM as u64
            | libc::CLONE_VFORK as u64
            | libc::CLONE_PIDFD as u64
            | CLONE_INTO_CGROUP,
        pidfd: pidfd as *mut libc::c_int as u64,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack as u64,
        stack_size: STACK as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    let entry: extern "C" fn(*mut libc::c_void) -> libc::c_int = child_main;
    let ret: i64;
    // SAFETY: the kernel gives the child rsp = stack + stack_size (16-byte
    // aligned: `call` leaves it as the ABI wants at entry) and copies of
    // every other register, so r12 and r13 hold the argument and the entry
    // point there; the parent continues at label 2 with rax = the pid.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, 60",
            "syscall",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &ca as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry as usize,
            lateout("rcx") _,
            lateout("r11") _,
        );
    }
    ret as i32
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone_into(
    _: RawFd,
    _: *mut libc::c_void,
    _: *mut libc::c_void,
    _: &mut libc::c_int,
) -> i32 {
    -libc::ENOSYS
}

const STAGE_SETUP: u8 = 1;
const STAGE_CHDIR: u8 = 2;
const STAGE_EXEC: u8 = 3;
const STAGE_CGROUP: u8 = 4;

#[repr(C)]
struct ChildArgs {
    candidates: *const *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    /// Becomes the child's stdin, stdout, stderr.
    fds: [libc::c_int; 3],
    /// Its stdout and stderr were made non-blocking: made blocking again.
    blocking_out: bool,
    /// Where the child failed (a STAGE_, 0 = it did not) and errno then:
    /// written by the child in our memory before it exits.
    stage: AtomicU8,
    errno: AtomicI32,
    parent: libc::pid_t,
    max_as: u64,
    resets: *const libc::c_int,
    n_resets: usize,
    joins: *const RawFd,
    n_joins: usize,
    /// The v2 cgroup's directory when the child must join it itself.
    join_dir: RawFd,
}

/// The child, between clone and exec. Only syscalls: no allocation, no
/// locks, no panics; errno lives in the suspended worker's TLS, unused by it
/// meanwhile.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the ChildArgs the suspended parent keeps alive;
    // everything below is a raw syscall on data prepared before the clone.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        // Our handlers are not for the agent (to_reset).
        for i in 0..a.n_resets {
            rt_sigaction(*a.resets.add(i), Some(&KernelSigaction::default()), None);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if libc::setpgid(0, 0) != 0 {
            fail(a, STAGE_SETUP);
        }
        // The death signal follows the thread that cloned us: workers outlive
        // their children, so this fires only when the daemon itself dies.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(a, STAGE_SETUP);
        }
        if libc::getppid() != a.parent {
            libc::_exit(1);
        }
        // Into the attempt's cgroups before anything of the command runs.
        if a.join_dir >= 0 {
            let fd = libc::openat(
                a.join_dir,
                c"cgroup.procs".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(a, STAGE_CGROUP);
            }
            libc::close(fd);
        }
        for i in 0..a.n_joins {
            if libc::write(*a.joins.add(i), b"0".as_ptr().cast(), 1) != 1 {
                fail(a, STAGE_CGROUP);
            }
        }
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
        if a.max_as > 0 {
            let lim = libc::rlimit {
                rlim_cur: a.max_as,
                rlim_max: a.max_as,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                fail(a, STAGE_SETUP);
            }
        }
        for (target, &fd) in a.fds.iter().enumerate() {
            let target = target as libc::c_int;
            let ok = if fd == target {
                // dup2 onto itself would keep close-on-exec.
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                fail(a, STAGE_SETUP);
            }
        }
        if a.blocking_out {
            for fd in [1, 2] {
                if libc::fcntl(fd, libc::F_SETFL, 0) != 0 {
                    fail(a, STAGE_SETUP);
                }
            }
        }
        if libc::chdir(a.cwd) != 0 {
            fail(a, STAGE_CHDIR);
        }
        let mut errno = libc::ENOENT;
        let mut denied = false;
        let mut c = a.candidates;
        while !(*c).is_null() {
            libc::execve(*c, a.argv, a.envp);
            match *libc::__errno_location() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => denied = true,
                e => {
                    errno = e;
                    break;
                }
            }
            c = c.add(1);
        }
        if denied && errno == libc::ENOENT {
            errno = libc::EACCES;
        }
        *libc::__errno_location() = errno;
        fail(a, STAGE_EXEC)
    }
}

/// The signals a child must set back to SIG_DFL before it unblocks them:
/// those with a handler of ours (one would run in the child, on our memory,
/// in the moment before exec resets it), SIGPIPE (Rust ignores it, and an
/// ignored signal stays ignored across exec) and glibc's internal signals
/// (its sigaction refuses to touch those, hence the raw syscall); what the
/// operator ignores stays ignored. Looked up when the launcher is made, not
/// in each child: a query per signal was 64 system calls per start. Our
/// handlers are all installed before the first launcher is made (the
/// signals are caught first thing in `run` and the daemon).
fn to_reset() -> Vec<libc::c_int> {
    (1..=libc::SIGRTMAX())
        .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
        .filter(|&sig| {
            let mut old = KernelSigaction::default();
            if rt_sigaction(sig, None, Some(&mut old)) != 0 {
                return false;
            }
            let internal = sig > libc::SIGSYS && sig < libc::SIGRTMIN();
            sig == libc::SIGPIPE || internal || old.handler > libc::SIG_IGN
        })
        .collect()
}

/// The kernel's struct sigaction (not glibc's): handler SIG_DFL (0), no flags.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: libc::sighandler_t,
    mask: u64,
}

fn rt_sigaction(
    sig: libc::c_int,
    new: Option<&KernelSigaction>,
    old: Option<&mut KernelSigaction>,
) -> libc::c_long {
    let new = new.map_or(std::ptr::null(), |n| n as *const KernelSigaction);
    let old = old.map_or(std::ptr::null_mut(), |o| o as *mut KernelSigaction);
    // SAFETY: both pointers are null or point at a KernelSigaction; 8 is the
    // size of the kernel's signal set.
    unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, new, old, 8) }
}

/// Reports the stage and errno to the parent and exits.
unsafe fn fail(a: &ChildArgs, stage: u8) -> ! {
    // SAFETY: errno of this thread, then a raw exit.
    unsafe {
        a.errno.store(*libc::__errno_location(), Ordering::Release);
        a.stage.store(stage, Ordering::Release);
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_reset_our_handlers_sigpipe_and_glibcs_signals_only() {
        let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _ = signal_hook::flag::register(libc::SIGUSR2, flag);
        let resets = to_reset();
        for sig in [libc::SIGUSR2, libc::SIGPIPE, 32, 33] {
            assert!(resets.contains(&sig), "{sig} not reset: {resets:?}");
        }
        // Signals at their default need no system call in the child.
        for sig in [libc::SIGWINCH, libc::SIGURG, libc::SIGRTMIN()] {
            assert!(!resets.contains(&sig), "{sig} reset: {resets:?}");
        }
    }
}

//! Starting a direct session's command (see [`crate::remote::direct_session`]) without
//! copying the daemon: the child is a `clone(CLONE_VM | CLONE_VFORK)` of the calling thread,
//! as musl's and glibc's `posix_spawn` make theirs, which runs on a stack of its own in the
//! daemon's memory while the calling thread waits, builds the session's mount namespace
//! ([`crate::remote::SessionTmp::enter`]), and execs the command.
//!
//! Why: `fork()` of the multi-threaded daemon copied its page tables (0.3-0.4 ms), then the
//! child's exec tore the copy down again, and the daemon's own threads took copy-on-write
//! faults meanwhile, all on the path of every session's start. `std`'s `posix_spawn` path
//! cannot be used: it takes no pre-exec steps (the namespace, every signal to its default).
//!
//! What the child may do: it shares the daemon's memory (and its thread pointer, so libc's
//! errno is the waiting thread's), so only raw system calls on data prepared here, no
//! allocation, no lock, nothing that can panic. Every signal is blocked in the calling thread
//! around the clone, so no handler of the daemon runs in the child; the child sets every
//! signal to its default before it unblocks them. An exec failure is written to memory the
//! daemon reads after the clone returns.
//!
//! What this module must not do: be used for anything but the direct path's plain pipes
//! (a pty session and `cpud -remote` keep `std`'s spawn).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::process::ExitStatus;

use tokio::io::unix::AsyncFd;

/// The child's stack: what `SessionTmp::enter` and the exec loop need, with a wide margin.
const STACK_SIZE: usize = 128 * 1024;
/// PATH when the session's environment has none (musl's `execvp` default).
const DEFAULT_EXEC_PATH: &str = "/usr/local/bin:/bin:/usr/bin";

/// A command started by [`spawn`]: its pid, its stdio pipes (our ends), and its exit status
/// through a pidfd.
pub struct Spawned {
    pub child: Child,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Why [`spawn`] started nothing.
#[derive(Debug)]
pub enum SpawnFailure {
    /// Before the clone (strings, pipes, the stack, the clone itself).
    Setup(io::Error),
    /// The exec, with its errno; the child is reaped.
    Exec(io::Error),
}

/// The command's process: reaped by [`Child::wait`] (cancel-safe).
pub struct Child {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    status: Option<ExitStatus>,
    /// The session's mount namespace (`/proc/PID/ns/mnt`), if opened before the command
    /// ended: see [`Child::take_namespace`].
    namespace: Option<OwnedFd>,
}

impl Child {
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// A reference to the session's mount namespace, taken right after the exec. While it is
    /// held, the namespace outlives the command: the kernel tears it down (unmounts and an
    /// RCU grace period: 75-117 us on an idle host, 0.2-0.8 ms at load 15) when the reference
    /// is closed, not inside the command's exit, before the pidfd tells us it ended. Close it
    /// after the exit status is sent. None when the command ended first.
    pub fn take_namespace(&mut self) -> Option<OwnedFd> {
        self.namespace.take()
    }

    /// Waits until the process has exited and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        loop {
            let mut ready = self.pidfd.readable().await?;
            let mut raw = 0;
            // SAFETY: waits for our own child without blocking; `raw` is a valid out pointer.
            let got = unsafe { libc::waitpid(self.pid, &mut raw, libc::WNOHANG) };
            if got == self.pid {
                use std::os::unix::process::ExitStatusExt;
                let st = ExitStatus::from_raw(raw);
                self.status = Some(st);
                return Ok(st);
            }
            if got < 0 {
                return Err(io::Error::last_os_error());
            }
            ready.clear_ready();
        }
    }
}

/// Everything the child reads, prepared by the daemon (the child only reads it, and writes
/// `exec_errno`).
struct ChildArgs<'a> {
    /// stdin, stdout, stderr: the child's ends of the pipes.
    stdio: [RawFd; 3],
    namespace: &'a crate::remote::SessionTmp,
    /// Full paths to try, in PATH order (one when the program names a path).
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The errno of the exec that failed (0: the exec succeeded or never ran).
    exec_errno: i32,
}

/// Starts `program` (looked up in the session's PATH the way musl's `execvp` does) with
/// `argv` (argv[0] first) and exactly `env`, in a process group of its own, with every signal
/// at its default, inside the session's mount namespace. An exec that fails is `Err` with its
/// errno, the child reaped; a namespace step that fails is reported by the child on its
/// stderr, and it exits with status 125 (as the fork path).
pub fn spawn(
    program: &OsStr,
    argv: &[&OsStr],
    env: &[(String, String)],
    namespace: &crate::remote::SessionTmp,
) -> Result<Spawned, SpawnFailure> {
    let (pid, stdin, stdout, stderr) = start(program, argv, env, namespace)?;
    let pidfd = match rustix::process::Pid::from_raw(pid)
        .ok_or(rustix::io::Errno::SRCH)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::NONBLOCK))
    {
        Ok(fd) => fd,
        Err(e) => {
            // Without a pidfd the status cannot be awaited: end it rather than leave it.
            // SAFETY: signals and reaps our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(SpawnFailure::Setup(io::Error::from_raw_os_error(e.raw_os_error())));
        }
    };
    let pidfd = register(pidfd).map_err(SpawnFailure::Setup)?;
    // The command has just exec'd: it is very likely still running, in its namespace.
    let namespace = rustix::fs::open(
        format!("/proc/{pid}/ns/mnt").as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok();
    Ok(Spawned { child: Child { pid, pidfd, status: None, namespace }, stdin, stdout, stderr })
}

/// The clone and the exec: the child's pid and our ends of its pipes (stdin, stdout, stderr).
fn start(
    program: &OsStr,
    argv: &[&OsStr],
    env: &[(String, String)],
    namespace: &crate::remote::SessionTmp,
) -> Result<(i32, OwnedFd, OwnedFd, OwnedFd), SpawnFailure> {
    use SpawnFailure::Setup;
    let cstring = |b: &[u8]| CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let argv_c = argv.iter().map(|a| cstring(a.as_bytes())).collect::<io::Result<Vec<_>>>().map_err(Setup)?;
    let env_c = env
        .iter()
        .map(|(n, v)| cstring(format!("{n}={v}").as_bytes()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(Setup)?;
    let path = env.iter().rev().find(|(n, _)| n == "PATH").map(|(_, v)| v.as_str());
    // A name the exec could never find fails as the exec would.
    let candidates =
        exec_candidates(program.as_bytes(), path.unwrap_or(DEFAULT_EXEC_PATH)).map_err(SpawnFailure::Exec)?;
    let (stdin_r, stdin_w) = pipe().map_err(Setup)?;
    let (stdout_r, stdout_w) = pipe().map_err(Setup)?;
    let (stderr_r, stderr_w) = pipe().map_err(Setup)?;
    let mut args = ChildArgs {
        stdio: [stdin_r.as_raw_fd(), stdout_w.as_raw_fd(), stderr_w.as_raw_fd()],
        namespace,
        candidates,
        argv: argv_c.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect(),
        envp: env_c.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect(),
        exec_errno: 0,
    };
    let stack = Stack::new().map_err(Setup)?;
    // SAFETY: every signal is blocked in this thread for the clone (see the module text) and
    // the mask restored after; `child_main` only reads `args` (alive: this thread waits until
    // the child has exec'd or exited, CLONE_VFORK) and writes `exec_errno`; the stack is ours
    // and unused by anything else until `stack` is dropped after the clone returned.
    let pid = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&mut args as *mut ChildArgs<'_>).cast(),
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(Setup(clone_error));
        }
        pid
    };
    drop((stdin_r, stdout_w, stderr_w));
    // Read after the child is done with `args` (it has exec'd or exited).
    // SAFETY: a plain read of a field the child may have written before it ended.
    let exec_errno = unsafe { std::ptr::read_volatile(&args.exec_errno) };
    if exec_errno != 0 {
        let mut raw = 0;
        // SAFETY: reaps the child that just exited after its failed exec.
        unsafe { libc::waitpid(pid, &mut raw, 0) };
        return Err(SpawnFailure::Exec(io::Error::from_raw_os_error(exec_errno)));
    }
    Ok((pid, stdin_w, stdout_r, stderr_r))
}

/// Registers an owned descriptor (the pidfd) for readability.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, which stays open and names the same pidfd
    // until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// The paths `execvp` would try for `file` with `path` (musl's rules: a name with a slash is
/// used as it is; an empty PATH element means the current directory).
fn exec_candidates(file: &[u8], path: &str) -> io::Result<Vec<CString>> {
    let cstring = |b: Vec<u8>| CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    if file.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if file.contains(&b'/') {
        return Ok(vec![cstring(file.to_vec())?]);
    }
    if file.len() > libc::FILENAME_MAX as usize {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    let mut out = Vec::new();
    for dir in path.as_bytes().split(|b| *b == b':') {
        if dir.len() + 1 + file.len() >= libc::PATH_MAX as usize {
            continue;
        }
        let mut full = dir.to_vec();
        if !dir.is_empty() {
            full.push(b'/');
        }
        full.extend_from_slice(file);
        out.push(cstring(full)?);
    }
    Ok(out)
}

/// The child: stdio, process group, signals, namespace, exec. Never returns.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildArgs` of `spawn`, alive while the parent thread waits.
    let args = unsafe { &mut *arg.cast::<ChildArgs<'_>>() };
    // SAFETY (this block): raw system calls on descriptors and NUL-terminated strings the
    // parent prepared; nothing allocates, locks or can panic (see the module text).
    unsafe {
        for (target, fd) in args.stdio.iter().enumerate() {
            if libc::dup2(*fd, target as RawFd) < 0 {
                libc::_exit(crate::error::EXIT_REMOTE_SETUP);
            }
        }
        libc::setpgid(0, 0);
    }
    crate::ssh::session::default_signals_for_exec();
    args.namespace.enter();
    let mut seen_eacces = false;
    let mut last = libc::ENOENT;
    for path in &args.candidates {
        // SAFETY: as above; execve returns only on failure.
        unsafe { libc::execve(path.as_ptr(), args.argv.as_ptr(), args.envp.as_ptr()) };
        last = io::Error::last_os_error().raw_os_error().unwrap_or(libc::ENOENT);
        match last {
            libc::EACCES => seen_eacces = true,
            libc::ENOENT | libc::ENOTDIR => {}
            _ => break,
        }
    }
    let errno = if seen_eacces && matches!(last, libc::ENOENT | libc::ENOTDIR) { libc::EACCES } else { last };
    // SAFETY: a volatile write the parent reads after this child ended; then the child ends
    // without running any of the daemon's exit code.
    unsafe {
        std::ptr::write_volatile(&mut args.exec_errno, errno);
        libc::_exit(127)
    }
}

/// A pipe as (read end, write end), both close-on-exec (the child's dup2 copies are not).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and belong to nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The child's stack, with a guard page below it.
struct Stack {
    base: *mut libc::c_void,
}

impl Stack {
    fn new() -> io::Result<Stack> {
        // SAFETY: a fresh private anonymous mapping; its lowest page becomes the guard.
        unsafe {
            let base = libc::mmap(
                std::ptr::null_mut(),
                STACK_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            );
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            libc::mprotect(base, 4096, libc::PROT_NONE);
            Ok(Stack { base })
        }
    }

    /// The top of the stack (it grows down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our own mapping, which is page-aligned.
        unsafe { self.base.cast::<u8>().add(STACK_SIZE).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`, no longer used (the child has exec'd or
        // exited before `spawn` drops it).
        unsafe { libc::munmap(self.base, STACK_SIZE) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_follow_execvp() {
        let names = |v: Vec<CString>| v.into_iter().map(|c| c.into_string().unwrap()).collect::<Vec<_>>();
        assert_eq!(names(exec_candidates(b"true", "/a:/b/c").unwrap()), ["/a/true", "/b/c/true"]);
        assert_eq!(names(exec_candidates(b"true", ":/bin").unwrap()), ["true", "/bin/true"]);
        assert_eq!(names(exec_candidates(b"./x", "/a").unwrap()), ["./x"]);
        assert_eq!(names(exec_candidates(b"/bin/sh", "/a").unwrap()), ["/bin/sh"]);
        assert_eq!(exec_candidates(b"", "/a").unwrap_err().raw_os_error(), Some(libc::ENOENT));
    }
}

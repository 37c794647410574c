//! `cpud -remote`: the per-session process. Builds the private namespace, mounts the
//! client's files, applies the fstab, and runs the command.
//!
//! The setup itself lives in [`crate::namespace::session`] (testable without root); this
//! module reads the client's environment, removes the session's own variables from it, and
//! execs the command. The command replaces this process, so its exit status or fatal signal
//! is what the daemon sees and reports to the client, exactly.
//!
//! The session's namespace must not be torn down on the way to the exit status: unmounting
//! the 9p mounts clunks every fid the kernel holds (27 of the 98 requests of `cpu VM true`),
//! one round trip each, and the kernel does it inside the exit of the namespace's last
//! process. So when every 9p mount writes through (the command's writes are on the client
//! once it has exited), a keeper process stays in the namespace: it leaves the command's
//! session and process group, holds no stdio, waits for the command to exit (a pidfd), then
//! shuts the back-channel sockets down, so that its own exit tears the namespace down with
//! clunks that fail locally. The command is not its parent: a command that waits for all of
//! its children never sees it.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};
use crate::namespace::session::{prepare_session, SessionSettings, SESSION_VARS};
use crate::namespace::SystemOps;
use crate::options::RemoteOptions;

/// Runs the remote side of one session. Returns only on failure (with the exit status to use);
/// on success the process has become the command. Setup failures are `Err` (exit status
/// [`crate::error::EXIT_REMOTE_SETUP`] for namespace errors).
pub fn run(opts: RemoteOptions) -> Result<i32> {
    let mut command = opts.command;
    if command.is_empty() {
        match std::env::var_os("SHELL").filter(|s| !s.is_empty()) {
            Some(shell) => command.push(shell),
            None => return Err(Error::Usage("no command given and $SHELL is not set".into())),
        }
    }
    let mut settings = SessionSettings::from_env(opts.port9p, |name| std::env::var_os(name));
    settings.kernel_release = Some(rustix::system::uname().release().to_string_lossy().into_owned());
    // The command must not see them (a nested cpu would inherit them), and the nonce is spent.
    for var in SESSION_VARS {
        std::env::remove_var(var);
    }
    let prepared = prepare_session(&mut SystemOps, &settings)?;
    if prepared.pwd_fallback {
        std::env::set_var("PWD", &prepared.working_dir);
    }
    if !prepared.channels.is_empty() {
        if prepared.writes_through {
            if let Err(e) = start_namespace_keeper(&prepared.channels) {
                log::debug!("no namespace keeper ({e}): the 9p teardown happens before the exit status");
            }
        } else {
            log::debug!("a 9p mount caches writes: the teardown flushes them before the exit status");
        }
    }
    Ok(exec_command(&command))
}

/// Starts the keeper (see the module overview) as a grandchild of this process, whose PID the
/// command is about to take over.
fn start_namespace_keeper(channels: &[std::os::fd::OwnedFd]) -> std::io::Result<()> {
    if !single_threaded() {
        return Err(std::io::Error::other("this process has other threads; fork is unsafe"));
    }
    let command_pid = rustix::process::getpid();
    // Opened here, so it names this process even if the keeper only runs after the exec.
    let command = rustix::process::pidfd_open(command_pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))?;
    // SAFETY: the process has a single thread (checked above), so the child's copy of the
    // address space holds no lock another thread was holding; the intermediate child only
    // forks again and calls _exit.
    let middle = unsafe { libc::fork() };
    match middle {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            // SAFETY: as above; this child is single-threaded too.
            if unsafe { libc::fork() } == 0 {
                keep_namespace(&command, channels);
            }
            // SAFETY: _exit ends this intermediate process without running destructors or
            // flushing buffers that belong to the parent.
            unsafe { libc::_exit(0) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waits for the child just forked; `status` is a valid out pointer.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Ok(())
        }
    }
}

/// Whether this process has exactly one thread (fork copies only the calling one). A thread
/// just joined (the mount watchdog) may still be listed for a moment: look again briefly.
fn single_threaded() -> bool {
    for _ in 0..20 {
        match std::fs::read_dir("/proc/self/task").map(Iterator::count) {
            Ok(1) => return true,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            Err(_) => return false,
        }
    }
    false
}

/// The keeper's whole life: detach, wait for the command, cut the 9P connections, exit.
fn keep_namespace(command: &std::os::fd::OwnedFd, channels: &[std::os::fd::OwnedFd]) -> ! {
    use std::os::fd::AsRawFd;
    // Out of the command's session: no terminal signals, no group signals meant for it.
    let _ = rustix::process::setsid();
    for sig in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGPIPE, libc::SIGTSTP] {
        // SAFETY: SIG_IGN installs no handler; this process never execs, so nothing inherits it.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // The session's output ends when the command's does: hold none of its stdio.
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null");
    for fd in 0..3 {
        match &null {
            // SAFETY: dup2 onto the standard descriptors of this process only.
            Ok(null) => unsafe { libc::dup2(null.as_raw_fd(), fd) },
            // SAFETY: closes this process's own standard descriptor (no /dev/null here).
            Err(_) => unsafe { libc::close(fd) },
        };
    }
    let mut wait = libc::pollfd { fd: command.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let exited = loop {
        // SAFETY: one valid pollfd; no timeout: the keeper lives exactly as long as the command.
        let n = unsafe { libc::poll(&mut wait, 1, -1) };
        if n > 0 {
            break wait.revents & libc::POLLIN != 0;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break false;
        }
    };
    // Only once the command has gone: cutting the channels earlier would cut its files.
    if exited {
        for channel in channels {
            let _ = rustix::net::shutdown(channel, rustix::net::Shutdown::Both);
        }
    }
    // SAFETY: ends the keeper without unwinding into code that belongs to the parent.
    unsafe { libc::_exit(0) }
}

/// Replaces this process with the command; returns the shell-convention status if exec fails.
fn exec_command(command: &[OsString]) -> i32 {
    let err = std::process::Command::new(&command[0]).args(&command[1..]).exec();
    let name = command[0].to_string_lossy();
    match err.kind() {
        std::io::ErrorKind::NotFound => {
            match find_program(&command[0]) {
                // The file is there, so what is missing is its ELF interpreter (dynamic loader).
                Some(path) => eprintln!(
                    "cpud: {name}: cannot run {}: its program interpreter (dynamic loader) or a library is missing here; \
                     is the client's /lib64 (or /lib) in the namespace?",
                    path.display()
                ),
                None => eprintln!("cpud: {name}: command not found"),
            }
            EXIT_NOT_FOUND
        }
        _ if err.raw_os_error() == Some(libc::ENOEXEC) => {
            // Typically the client's x86_64 /bin on an arm64 board: say so in one line.
            let path = find_program(&command[0]);
            let here = std::env::consts::ARCH;
            eprintln!("{}", crate::elf_arch::exec_format_message(&name, path.as_deref(), here));
            EXIT_NOT_EXECUTABLE
        }
        _ => {
            eprintln!("cpud: {name}: {err}");
            EXIT_NOT_EXECUTABLE
        }
    }
}

/// Where `program` is: itself if it contains a `/`, else the first match in $PATH.
fn find_program(program: &OsStr) -> Option<PathBuf> {
    let as_path = Path::new(program);
    if program.to_string_lossy().contains('/') {
        return as_path.exists().then(|| as_path.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

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
//!
//! A session that needs no 9P and no fstab (`cpu -9p=false`, or a client that sent no nonce)
//! does not re-execute the daemon at all ([`direct_session`]): the daemon's child (a
//! `clone(CLONE_VM | CLONE_VFORK)` from `ssh::spawn`, or a fork with a pty) builds the same
//! private namespace (private `/`, tmpfs on /tmp, /tmp/cpu, /tmp/local) with
//! raw system calls ([`SessionTmp::enter`]) and execs the command itself, which saves the
//! exec of this binary and its start-up on every such session. Exit statuses and messages are
//! the ones [`exec_failure`] gives either way.

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};
use crate::namespace::fstab::parse_fstab;
use crate::namespace::session::{
    prepare_session, SessionSettings, LOCAL_ROOT, NEED_CAP_SYS_ADMIN, SESSION_TMP, SESSION_VARS,
};
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
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let (message, code) = exec_failure(&command[0], &err, std::env::var_os("PATH").as_deref(), &cwd);
    eprintln!("{message}");
    code
}

/// The message (without a line end) and the shell-convention exit status for a command that
/// could not be executed: 127 when it is missing, 126 otherwise. `path_var` is the command's
/// $PATH and `cwd` its working directory, for naming the file that was found.
pub fn exec_failure(
    program: &OsStr,
    err: &std::io::Error,
    path_var: Option<&OsStr>,
    cwd: &Path,
) -> (String, i32) {
    let name = program.to_string_lossy();
    match err.kind() {
        std::io::ErrorKind::NotFound => match find_program(program, path_var, cwd) {
            // The file is there, so what is missing is its ELF interpreter (dynamic loader).
            Some(path) => (
                format!(
                    "cpud: {name}: cannot run {}: its program interpreter (dynamic loader) or a library is missing here; \
                     is the client's /lib64 (or /lib) in the namespace?",
                    path.display()
                ),
                EXIT_NOT_FOUND,
            ),
            None => (format!("cpud: {name}: command not found"), EXIT_NOT_FOUND),
        },
        _ if err.raw_os_error() == Some(libc::ENOEXEC) => {
            // Typically the client's x86_64 /bin on an arm64 board: say so in one line.
            let path = find_program(program, path_var, cwd);
            let here = std::env::consts::ARCH;
            (crate::elf_arch::exec_format_message(&name, path.as_deref(), here), EXIT_NOT_EXECUTABLE)
        }
        _ => (format!("cpud: {name}: {err}"), EXIT_NOT_EXECUTABLE),
    }
}

/// Where `program` is: itself (relative to `cwd`) if it contains a `/`, else the first match
/// in `path_var`.
fn find_program(program: &OsStr, path_var: Option<&OsStr>, cwd: &Path) -> Option<PathBuf> {
    if program.to_string_lossy().contains('/') {
        let as_path = cwd.join(program);
        return as_path.exists().then(|| Path::new(program).to_path_buf());
    }
    std::env::split_paths(path_var?).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// A cpu-form session the daemon can run without `cpud -remote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectSession {
    /// The command and its arguments (argv[0] as the client gave it).
    pub command: Vec<OsString>,
    /// The command's environment: the client's, without the session variables, with
    /// `PWD=/` when the client sent none (as `cpud -remote` sets it).
    pub env: Vec<(String, String)>,
    /// The client's $PWD, checked to exist here and to lie outside the session's /tmp.
    pub cwd: PathBuf,
}

/// Whether a cpu-form session (`remote_args`: the words after the daemon's name, starting
/// with `-remote`) needs nothing `cpud -remote` alone can do, and how to run it then.
///
/// It does when it brings a nonce (9P), an fstab line that is not a bind of the client's
/// files, or `-d`; when it names no command and has
/// no $SHELL (the usage error); when its $PWD would not be usable in the namespace (so the
/// warning and the fallback to `/` stay where they are written); and when the command or a
/// $PATH entry lies under /tmp.
pub fn direct_session(remote_args: &[OsString], env: &[(String, String)]) -> Option<DirectSession> {
    let lookup = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    if lookup(crate::protocol::ENV_NONCE).is_some() {
        return None;
    }
    // Without 9P, `cpud -remote` skips every fstab line whose source is the client's files
    // (`cpu -9p=false` still sends its default namespace): only other lines need it.
    let fstab = lookup(crate::protocol::ENV_FSTAB).or_else(|| lookup(crate::protocol::ENV_FSTAB_LC));
    if let Some(text) = fstab {
        if !parse_fstab(text).iter().all(|e| Path::new(&e.spec).starts_with(crate::protocol::MOUNT_POINT)) {
            return None;
        }
    }
    let opts = RemoteOptions::from_args(remote_args.iter().cloned()).ok()?;
    if opts.debug {
        return None;
    }
    let mut command = opts.command;
    if command.is_empty() {
        command.push(OsString::from(lookup("SHELL").filter(|s| !s.is_empty())?));
    }
    let mut env: Vec<(String, String)> =
        env.iter().filter(|(n, _)| !SESSION_VARS.contains(&n.as_str())).cloned().collect();
    let cwd = match lookup("PWD").filter(|p| !p.is_empty()) {
        None => {
            env.push(("PWD".into(), "/".into()));
            PathBuf::from("/")
        }
        Some(pwd) => {
            let pwd = PathBuf::from(pwd);
            let real = std::fs::canonicalize(&pwd).ok()?;
            // The session's /tmp is a new tmpfs: a directory under the daemon's /tmp is not there.
            if !pwd.is_absolute() || !real.is_dir() || real.starts_with(SESSION_TMP) {
                return None;
            }
            pwd
        }
    };
    // The messages for a failed exec name the file found; files under /tmp are not in the
    // namespace, and only `cpud -remote` looks from inside it.
    let under_tmp = |p: &Path| p.starts_with(SESSION_TMP);
    let path_var = lookup("PATH").unwrap_or_default();
    let program = Path::new(&command[0]);
    if std::env::split_paths(path_var).any(|dir| under_tmp(&cwd.join(dir)))
        || (program.as_os_str().as_encoded_bytes().contains(&b'/') && under_tmp(&cwd.join(program)))
    {
        return None;
    }
    Some(DirectSession { command, env, cwd })
}

/// The namespace of a session without 9P, built in the daemon's child before it execs the
/// command: what [`prepare_session`] does when there is no nonce and no fstab. Everything is
/// prepared here, in the daemon, so that [`SessionTmp::enter`] makes only raw system calls.
pub struct SessionTmp {
    tmp: std::ffi::CString,
    dirs: [std::ffi::CString; 2],
    root: std::ffi::CString,
    tmpfs: std::ffi::CString,
    source: std::ffi::CString,
    empty: std::ffi::CString,
    cwd: std::ffi::CString,
}

impl SessionTmp {
    pub fn new(cwd: &Path) -> std::io::Result<SessionTmp> {
        use std::os::unix::ffi::OsStrExt;
        let c = |s: &[u8]| std::ffi::CString::new(s).map_err(std::io::Error::other);
        Ok(SessionTmp {
            tmp: c(SESSION_TMP.as_bytes())?,
            dirs: [c(crate::protocol::MOUNT_POINT.as_bytes())?, c(LOCAL_ROOT.as_bytes())?],
            root: c(b"/")?,
            tmpfs: c(b"tmpfs")?,
            source: c(b"cpu")?,
            empty: c(b"")?,
            cwd: c(cwd.as_os_str().as_bytes())?,
        })
    }

    /// Runs in the child of the (multi-threaded) daemon, a fork or a vfork-style clone that
    /// shares the daemon's memory (`ssh::spawn`): only async-signal-safe calls, no allocation,
    /// nothing that can panic. A failure is reported on the child's stderr as `cpud -remote`
    /// words it, and the child exits with [`crate::error::EXIT_REMOTE_SETUP`].
    pub fn enter(&self) {
        // SAFETY: unshare, mount, mkdir and chdir are plain system calls on NUL-terminated
        // strings owned by `self`, which outlives the call; nothing here takes a lock.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                if errno() == libc::EPERM {
                    fail(NEED_CAP_SYS_ADMIN.as_bytes(), None);
                }
                fail(b"cannot create a private mount namespace", Some(errno()));
            }
            let private = libc::MS_REC | libc::MS_PRIVATE;
            if libc::mount(std::ptr::null(), self.root.as_ptr(), std::ptr::null(), private, std::ptr::null())
                != 0
            {
                fail(
                    b"cannot make / private in the session's mount namespace; refusing to mount anything",
                    Some(errno()),
                );
            }
            if libc::mkdir(self.tmp.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
                fail(b"cannot create /tmp", Some(errno()));
            }
            let data = self.empty.as_ptr().cast();
            if libc::mount(self.source.as_ptr(), self.tmp.as_ptr(), self.tmpfs.as_ptr(), 0, data) != 0 {
                fail(b"cannot mount a tmpfs on /tmp", Some(errno()));
            }
            for dir in &self.dirs {
                if libc::mkdir(dir.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
                    fail(b"cannot create a directory in /tmp", Some(errno()));
                }
            }
            if libc::mount(
                self.root.as_ptr(),
                self.dirs[1].as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                say(b"warning: cannot bind / onto /tmp/local", Some(errno()));
            }
            if libc::chdir(self.cwd.as_ptr()) != 0 {
                fail(b"cannot enter the working directory", Some(errno()));
            }
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes `cpud: WHAT[: os error N]` and a newline to stderr with one write(2), from a stack
/// buffer (async-signal-safe).
fn say(what: &[u8], errno: Option<i32>) {
    let mut line = [0u8; 256];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - 1 - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"cpud: ");
    put(what);
    if let Some(code) = errno {
        put(b": os error ");
        let mut digits = [0u8; 12];
        let mut at = digits.len();
        let mut v = code.unsigned_abs();
        loop {
            at -= 1;
            digits[at] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        put(&digits[at..]);
    }
    line[len] = b'\n';
    // SAFETY: write(2) of a stack buffer to this process's stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), len + 1) };
}

/// [`say`], then end the child as a failed setup ends `cpud -remote`.
fn fail(what: &[u8], errno: Option<i32>) -> ! {
    say(what, errno);
    // SAFETY: ends the child without running the daemon's destructors or atexit code.
    unsafe { libc::_exit(crate::error::EXIT_REMOTE_SETUP) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn words(w: &[&str]) -> Vec<OsString> {
        w.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_session_without_9p_runs_directly_without_the_session_variables() {
        let e = env(&[("PWD", "/"), ("PATH", "/usr/bin:/bin"), ("CPU_MSIZE", "1"), ("A", "b")]);
        let d = direct_session(&words(&["-remote", "-port9p=5", "ls", "-l"]), &e).expect("direct");
        assert_eq!(d.command, words(&["ls", "-l"]));
        assert_eq!(d.env, env(&[("PWD", "/"), ("PATH", "/usr/bin:/bin"), ("A", "b")]));
        assert_eq!(d.cwd, Path::new("/"));
        // The default namespace of `cpu -9p=false`: binds of the client's files only.
        let fstab = "/tmp/cpu/usr /usr none defaults,bind 0 0\n/tmp/cpu/home /home none bind 0 0\n";
        let e = env(&[("PWD", "/"), (crate::protocol::ENV_FSTAB, fstab)]);
        assert!(direct_session(&words(&["-remote", "true"]), &e).is_some());
    }

    #[test]
    fn what_only_cpud_remote_does_keeps_it() {
        let remote =
            |args: &[&str], pairs: &[(&str, &str)]| direct_session(&words(args), &env(pairs)).is_none();
        assert!(remote(&["-remote", "true"], &[("PWD", "/"), ("CPUNONCE", "ab")]));
        assert!(remote(
            &["-remote", "true"],
            &[("PWD", "/"), ("CPU_FSTAB", "cpu /mnt tmpfs defaults 0 0\n")]
        ));
        assert!(remote(
            &["-remote", "true"],
            &[("PWD", "/"), ("LC_GLENDA_CPU_FSTAB", "/a /b none bind 0 0\n")]
        ));
        assert!(remote(&["-remote", "-d", "true"], &[("PWD", "/")]));
        // No command and no $SHELL: the usage error is cpud -remote's.
        assert!(remote(&["-remote"], &[("PWD", "/")]));
        // $PWD missing here, relative, or in the session's fresh /tmp: the warning is its.
        assert!(remote(&["-remote", "true"], &[("PWD", "/no/such/dir/here")]));
        assert!(remote(&["-remote", "true"], &[("PWD", "usr")]));
        assert!(remote(&["-remote", "true"], &[("PWD", "/tmp")]));
        // A command or $PATH under /tmp: the exec failure message looks inside the namespace.
        assert!(remote(&["-remote", "/tmp/x"], &[("PWD", "/")]));
        assert!(remote(&["-remote", "x"], &[("PWD", "/"), ("PATH", "/bin:/tmp/bin")]));
    }

    #[test]
    fn no_command_means_the_shell_and_no_pwd_means_root() {
        let d = direct_session(&words(&["-remote"]), &env(&[("SHELL", "/bin/sh")])).expect("direct");
        assert_eq!(d.command, words(&["/bin/sh"]));
        assert_eq!(d.cwd, Path::new("/"));
        assert_eq!(d.env, env(&[("SHELL", "/bin/sh"), ("PWD", "/")]));
    }

    #[test]
    fn exec_failures_name_the_cause() {
        let not_found = std::io::Error::from_raw_os_error(libc::ENOENT);
        let (m, code) =
            exec_failure(OsStr::new("nope-x"), &not_found, Some(OsStr::new("/bin")), Path::new("/"));
        assert_eq!((m.as_str(), code), ("cpud: nope-x: command not found", 127));
        // Found in $PATH but ENOENT: the program interpreter is what is missing.
        let (m, code) = exec_failure(OsStr::new("sh"), &not_found, Some(OsStr::new("/bin")), Path::new("/"));
        assert!(m.contains("cannot run /bin/sh: its program interpreter"), "{m}");
        assert_eq!(code, 127);
        let denied = std::io::Error::from_raw_os_error(libc::EACCES);
        let (m, code) = exec_failure(OsStr::new("./f"), &denied, None, Path::new("/"));
        assert_eq!((m.as_str(), code), ("cpud: ./f: Permission denied (os error 13)", 126));
    }
}

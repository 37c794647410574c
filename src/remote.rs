//! `cpud -remote`: the per-session process. Builds the private namespace, mounts the
//! client's files, applies the fstab, and runs the command.
//!
//! The setup itself lives in [`crate::namespace::session`] (testable without root); this
//! module reads the client's environment, removes the session's own variables from it, and
//! execs the command. The command replaces this process, so its exit status or fatal signal
//! is what the daemon sees and reports to the client, exactly.

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
    Ok(exec_command(&command))
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

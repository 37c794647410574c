//! `cpud -remote`: the per-session process. Builds the private namespace, mounts the
//! client's files, applies the fstab, and runs the command.
//!
//! The command replaces this process (exec), so its exit status or fatal signal is what
//! the daemon sees and reports to the client, exactly.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use crate::error::{Error, Result, EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND};
use crate::options::RemoteOptions;

/// Runs the remote side of one session. Returns only on failure (with the exit status to use);
/// on success the process has become the command.
pub fn run(opts: RemoteOptions) -> Result<i32> {
    // (The namespace and 9P mount come here; without CPUNONCE there is nothing to mount.)
    let mut command = opts.command;
    if command.is_empty() {
        match std::env::var_os("SHELL").filter(|s| !s.is_empty()) {
            Some(shell) => command.push(shell),
            None => return Err(Error::Usage("no command given and $SHELL is not set".into())),
        }
    }
    enter_working_directory();
    Ok(exec_command(&command))
}

/// chdir to $PWD when it exists; otherwise warn and use / (the Go cpud fails instead).
fn enter_working_directory() {
    let pwd = std::env::var_os("PWD").unwrap_or_default();
    if !pwd.is_empty() && std::env::set_current_dir(&pwd).is_ok() {
        return;
    }
    log::warn!("your $PWD {:?} is not in the remote namespace; running in /", pwd);
    let _ = std::env::set_current_dir("/");
    std::env::set_var("PWD", "/");
}

/// Replaces this process with the command; returns the shell-convention status if exec fails.
fn exec_command(command: &[OsString]) -> i32 {
    let err = std::process::Command::new(&command[0]).args(&command[1..]).exec();
    let name = command[0].to_string_lossy();
    eprintln!("cpud: {name}: {err}");
    match err.kind() {
        std::io::ErrorKind::NotFound => EXIT_NOT_FOUND,
        _ => EXIT_NOT_EXECUTABLE,
    }
}

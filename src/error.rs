//! The crate's error type and the one place that maps errors to exit statuses.
//!
//! Library code returns [`Error`]; applets print it with [`report`] and exit with
//! [`Error::exit_code`]. The statuses follow ssh where a user would compare: 255 for a
//! connection, host-key or authentication failure, 2 for a usage error, 1 for a daemon that
//! cannot start. A remote command's own status is not an error: it is returned as a value.

use std::fmt;
use std::io;

use crate::flags::FlagError;

/// Exit status for usage errors (Go's flag package uses 2 too).
pub const EXIT_USAGE: i32 = 2;
/// Exit status for connection, host-key and authentication failures (as ssh).
pub const EXIT_CONNECTION: i32 = 255;
/// Exit status when our stdout's reader went away and the session was ended for it: what a
/// local program killed by SIGPIPE gives (128 + 13), as the Go `cpu` does.
pub const EXIT_STDOUT_GONE: i32 = 141;
/// Exit status of `cpud -remote` when setting up the session failed before the command ran.
pub const EXIT_REMOTE_SETUP: i32 = 125;
/// Command found but not executable (shell convention).
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Command not found (shell convention).
pub const EXIT_NOT_FOUND: i32 = 127;

/// Every failure the library reports, grouped by what the user has to do about it.
#[derive(Debug)]
pub enum Error {
    /// Bad flags or arguments; the text says which.
    Usage(String),
    /// A flag parse error (its Display names the flag).
    Flag(FlagError),
    /// Could not reach the server (dial, transport, DNS-SD found nothing usable).
    Connect(String),
    /// The server's host key is unknown-and-refused or changed.
    HostKey(String),
    /// The server refused every key we offered, or no key could be loaded.
    Auth(String),
    /// The SSH conversation failed after connecting.
    Ssh(String),
    /// A configuration file (ssh_config, authorized_keys, fstab, keys) is unusable.
    Config(String),
    /// The daemon could not start (listen, host key, authorized keys).
    Daemon(String),
    /// The remote side could not build the session's namespace or mount.
    Namespace(String),
    /// 9P protocol or server failure.
    NineP(String),
    /// A plain I/O error with what we were doing.
    Io { context: String, source: io::Error },
}

impl Error {
    /// Wraps an I/O error with a short description of what failed.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The exit status an applet returns for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Flag(_) => EXIT_USAGE,
            Error::Connect(_) | Error::HostKey(_) | Error::Auth(_) | Error::Ssh(_) => EXIT_CONNECTION,
            Error::Config(_) => EXIT_CONNECTION,
            Error::Namespace(_) => EXIT_REMOTE_SETUP,
            Error::Daemon(_) | Error::NineP(_) | Error::Io { .. } => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "{m}"),
            Error::Flag(e) => write!(f, "{e}"),
            Error::Connect(m) => write!(f, "{m}"),
            Error::HostKey(m) => write!(f, "host key verification failed: {m}"),
            Error::Auth(m) => write!(f, "authentication failed: {m}"),
            Error::Ssh(m) => write!(f, "ssh: {m}"),
            Error::Config(m) => write!(f, "{m}"),
            Error::Daemon(m) => write!(f, "{m}"),
            Error::Namespace(m) => write!(f, "{m}"),
            Error::NineP(m) => write!(f, "9p: {m}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Flag(e) => Some(e),
            _ => None,
        }
    }
}

impl From<FlagError> for Error {
    fn from(e: FlagError) -> Self {
        Error::Flag(e)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Prints `applet: message` on stderr; the one format every applet uses for errors.
pub fn report(applet: &str, err: &Error) {
    eprintln!("{applet}: {err}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        assert_eq!(Error::Flag(FlagError::Unknown("x".into())).exit_code(), 2);
        assert_eq!(Error::Connect("x".into()).exit_code(), 255);
        assert_eq!(Error::Auth("x".into()).exit_code(), 255);
        assert_eq!(Error::HostKey("x".into()).exit_code(), 255);
        assert_eq!(Error::Daemon("x".into()).exit_code(), 1);
        assert_eq!(Error::Namespace("x".into()).exit_code(), 125);
    }
}

//! Unix sockets for `-net unix` (dial and listen) and `-net unix-vsock` (dial only).
//!
//! A path starting with `@` is a Linux abstract socket (no file; it lives in the network
//! namespace). A listener on a file path removes a stale socket left by a dead server, never
//! anything else, sets the permissions asked for, and removes its own socket when dropped.
//!
//! unix-vsock is the host end of a Firecracker-style hybrid vsock device (Firecracker,
//! rust-vmm's vhost-device-vsock): connect to the device's Unix socket, send
//! `CONNECT <port>\n`, read the `OK <n>\n` line one byte at a time (what follows belongs to
//! SSH), and the socket is now the guest's vsock connection.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

use super::vsock::parse_vsock_port;
use super::BoxStream;
use crate::error::{Error, Result};

/// Permissions of cpud's socket file: owner only. SSH authenticates every client anyway;
/// this keeps other local users from even reaching the SSH handshake. `chmod` it (or use
/// [`super::Listener::bind_unix`]) to share it.
pub const UNIX_SOCKET_MODE: u32 = 0o600;

/// How long a unix-vsock device may take to answer `CONNECT` when the dial has no deadline.
pub const VSOCK_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest reply line to `CONNECT` we read (Firecracker sends `OK <port>\n`, ~16 bytes).
const MAX_REPLY: usize = 128;

/// The longest path a sockaddr_un holds (108 bytes with the terminating NUL).
const MAX_PATH: usize = 107;

/// How long the stale-socket probe waits for a live server to accept.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The name tokio takes: `@name` becomes `\0name` (abstract).
fn socket_name(path: &str) -> Result<String> {
    if path.is_empty() {
        return Err(Error::Usage("no unix socket path given".into()));
    }
    if path == "@" {
        return Err(Error::Usage("empty abstract unix socket name \"@\"".into()));
    }
    if path.len() > MAX_PATH {
        return Err(Error::Usage(format!(
            "unix socket path {path:?} is too long ({} bytes; the limit is {MAX_PATH})",
            path.len()
        )));
    }
    Ok(match path.strip_prefix('@') {
        Some(name) => format!("\0{name}"),
        None => path.to_string(),
    })
}

pub(super) async fn dial(path: &str) -> Result<BoxStream> {
    Ok(Box::new(connect(path, false).await?))
}

/// Connects to a Unix socket; `device` says it should be a hybrid vsock device's socket
/// (for the hint when it is missing).
async fn connect(path: &str, device: bool) -> Result<UnixStream> {
    let name = socket_name(path)?;
    UnixStream::connect(&name).await.map_err(|e| {
        let why = match e.kind() {
            io::ErrorKind::NotFound if device => {
                "no such socket (is the VM running, with its hybrid vsock device's socket here?)".into()
            }
            io::ErrorKind::NotFound => format!("no such socket (is `cpud -net unix -sp {path}` running?)"),
            io::ErrorKind::ConnectionRefused => {
                "connection refused: nothing listens there (a stale socket, or not a socket)".into()
            }
            io::ErrorKind::PermissionDenied => "permission denied".into(),
            _ => e.to_string(),
        };
        Error::Connect(format!("cannot connect to unix socket {path}: {why}"))
    })
}

pub(super) async fn dial_hybrid_vsock(
    path: &str,
    port: &str,
    deadline: Option<Instant>,
) -> Result<BoxStream> {
    let port = parse_vsock_port(port)?;
    let mut stream = connect(path, true).await?;
    let limit = deadline.unwrap_or_else(|| Instant::now() + VSOCK_HANDSHAKE_TIMEOUT);
    let started = Instant::now();
    match tokio::time::timeout_at(limit, connect_handshake(&mut stream, path, port)).await {
        Ok(Ok(())) => Ok(Box::new(stream)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Error::Connect(format!(
            "no reply to CONNECT {port} from {path} within {:?} (is the VM running and its vsock \
             device up, and is cpud listening on guest vsock port {port}?)",
            started.elapsed()
        ))),
    }
}

/// Sends `CONNECT <port>\n` and checks the `OK ...\n` reply, reading no byte past it.
async fn connect_handshake(stream: &mut UnixStream, path: &str, port: u32) -> Result<()> {
    let io_err = |e: io::Error| Error::Connect(format!("unix-vsock {path}: CONNECT {port}: {e}"));
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(io_err)?;
    let mut line = Vec::with_capacity(32);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(io_err)?;
        if n == 0 {
            return Err(Error::Connect(if line.is_empty() {
                format!(
                    "{path} closed the connection without answering CONNECT {port}: nothing listens \
                     on guest vsock port {port} (is cpud running in the guest with -net vsock -sp {port}?)"
                )
            } else {
                format!(
                    "bad reply to CONNECT {port} from {path}: {} (then the connection closed)",
                    quote(&line)
                )
            }));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() >= MAX_REPLY {
            return Err(Error::Connect(format!(
                "bad reply to CONNECT {port} from {path}: {}... (no end of line in {MAX_REPLY} bytes)",
                quote(&line)
            )));
        }
    }
    if line.starts_with(b"OK") {
        Ok(())
    } else {
        Err(Error::Connect(format!("bad reply to CONNECT {port} from {path}: {}", quote(&line))))
    }
}

fn quote(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// A listening Unix socket that cleans up its file.
pub(super) struct UnixSocketListener {
    listener: UnixListener,
    /// As given: a path or `@name`.
    path: String,
    /// The socket file we created (device, inode), removed on drop if still ours.
    file: Option<(PathBuf, u64, u64)>,
}

impl UnixSocketListener {
    pub(super) async fn bind(path: &str, mode: u32) -> Result<Self> {
        let name = socket_name(path).map_err(|e| Error::Daemon(format!("cannot listen: {e}")))?;
        let fail = |why: String| Error::Daemon(format!("cannot listen on unix socket {path}: {why}"));
        let abstract_name = path.starts_with('@');
        if !abstract_name {
            remove_stale_socket(path).await.map_err(fail)?;
        }
        let listener = UnixListener::bind(&name).map_err(|e| fail(e.to_string()))?;
        let mut file = None;
        if !abstract_name {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| fail(format!("cannot set permissions {mode:o}: {e}")))?;
            if let Ok(m) = std::fs::symlink_metadata(path) {
                file = Some((PathBuf::from(path), m.dev(), m.ino()));
            }
        }
        Ok(UnixSocketListener { listener, path: path.to_string(), file })
    }

    pub(super) fn path(&self) -> &str {
        &self.path
    }

    pub(super) async fn accept(&self) -> io::Result<(tokio::net::UnixStream, String)> {
        let (s, _) = self.listener.accept().await?;
        let peer = match s.peer_cred() {
            Ok(c) => match c.pid() {
                Some(pid) => format!("unix peer pid {pid} uid {}", c.uid()),
                None => format!("unix peer uid {}", c.uid()),
            },
            Err(_) => format!("unix peer on {}", self.path),
        };
        Ok((s, peer))
    }
}

impl Drop for UnixSocketListener {
    fn drop(&mut self) {
        // Only our own socket: another server may have replaced it since.
        if let Some((path, dev, ino)) = &self.file {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.dev() == *dev && m.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// Removes `path` if it is a socket nobody listens on. A live socket or any other kind of
/// file is left alone and reported.
async fn remove_stale_socket(path: &str) -> std::result::Result<(), String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.file_type().is_socket() {
        return Err("it exists and is not a socket; refusing to remove it".into());
    }
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(_)) => Err("another server is listening on it".into()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket: {e}"))
        }
        Ok(Err(e)) => Err(format!("cannot tell whether the existing socket is in use: {e}")),
        Err(_) => Err("another server holds it (connecting to it did not complete within 1 s)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(socket_name("@cpud").unwrap(), "\0cpud");
        assert_eq!(socket_name("/run/cpud.sock").unwrap(), "/run/cpud.sock");
        assert!(socket_name("").is_err());
        assert!(socket_name("@").is_err());
        let long = format!("/{}", "x".repeat(200));
        assert!(socket_name(&long).unwrap_err().to_string().contains("too long"));
    }

    #[test]
    fn quoting() {
        assert_eq!(quote(b"NO\tway"), "\"NO\\tway\"");
        assert_eq!(quote(b"\xff"), "\"\u{fffd}\"");
    }
}

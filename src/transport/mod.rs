//! Streams and listeners for every transport: tcp, vsock, unix and unix-vsock (spec 2.1).
//!
//! The SSH layer only sees a [`BoxStream`] and a [`Listener`]; which kind of socket is behind
//! them is decided here from the `-net` value. This module owns address parsing (CIDs, ports,
//! socket paths), dialing with a deadline, listening, and turning socket errors into messages
//! that say what to do. It knows nothing about SSH or 9P: the 9P back-channel rides inside the
//! SSH connection, so it needs no transport of its own.
//!
//! Addresses per kind:
//! - tcp, tcp4, tcp6: `host` and a numeric `port`. tcp4/tcp6 only use addresses of their
//!   family; dial tries every resolved address in order until one connects.
//! - vsock: dial `host` = CID, `port` = vsock port, both unsigned 32-bit with Go's base
//!   prefixes (`42`, `0x2a`, `0o52`, `052`, `0b101010`). Listening uses `port` the same way
//!   (Go takes only 16 bits there; we take any 32-bit vsock port, a superset) on
//!   VMADDR_CID_ANY, or on the CID given as `addr`.
//! - unix: the socket path (`host` when dialing, `port` = the `-sp` value when listening);
//!   `@name` is a Linux abstract socket.
//! - unix-vsock (dial only): `host` is the Unix socket of a Firecracker or vhost-device-vsock
//!   hybrid vsock device; `CONNECT <port>\n` is sent and `OK ...\n` expected.
//!
//! A command instead of a socket (ssh_config ProxyCommand, ProxyJump): [`proxy`].

pub mod proxy;
mod tcp;
mod unix;
mod vsock;

use std::fmt;
use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};

pub use unix::{UNIX_SOCKET_MODE, VSOCK_HANDSHAKE_TIMEOUT};
pub use vsock::{parse_vsock_cid, parse_vsock_port, VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_LOCAL};

/// A connected byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A boxed stream, what the SSH client and server run over.
pub type BoxStream = Box<dyn Stream>;

/// An accepted connection not yet tied to a runtime, so that the runtime that serves it also
/// waits for its readiness ([`Listener::accept_detached`]). A tokio socket belongs to the
/// runtime whose reactor registered it: served from another thread's runtime, every readiness
/// event would first wake the accepting thread, which then wakes the serving one.
pub enum Detached {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
    /// Kinds that stay where they were accepted.
    Stream(BoxStream),
}

impl Detached {
    /// The stream, registered with the current runtime (call it inside the one that serves it).
    pub fn attach(self) -> io::Result<BoxStream> {
        Ok(match self {
            Detached::Tcp(s) => Box::new(tokio::net::TcpStream::from_std(s)?),
            Detached::Unix(s) => Box::new(tokio::net::UnixStream::from_std(s)?),
            Detached::Stream(s) => s,
        })
    }
}

/// The transport kinds of `-net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Tcp,
    Tcp4,
    Tcp6,
    Vsock,
    Unix,
    /// Client only: a Unix socket speaking Firecracker's `CONNECT <port>` handshake.
    UnixVsock,
}

impl Net {
    /// Parses a `-net` value; `""` is tcp. `client` allows unix-vsock.
    pub fn parse(s: &str, client: bool) -> Result<Net> {
        Ok(match s {
            "" | "tcp" => Net::Tcp,
            "tcp4" => Net::Tcp4,
            "tcp6" => Net::Tcp6,
            "vsock" => Net::Vsock,
            "unix" => Net::Unix,
            "unix-vsock" if client => Net::UnixVsock,
            "unix-vsock" => {
                return Err(Error::Usage(
                    "-net unix-vsock is for the client only; cpud listens with -net vsock in the guest"
                        .into(),
                ))
            }
            other => {
                let kinds = if client {
                    "tcp, tcp4, tcp6, vsock, unix, unix-vsock"
                } else {
                    "tcp, tcp4, tcp6, vsock, unix"
                };
                return Err(Error::Usage(format!("unknown network {other:?} (-net takes {kinds})")));
            }
        })
    }

    /// The `-net` spelling of this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Net::Tcp => "tcp",
            Net::Tcp4 => "tcp4",
            Net::Tcp6 => "tcp6",
            Net::Vsock => "vsock",
            Net::Unix => "unix",
            Net::UnixVsock => "unix-vsock",
        }
    }

    /// True for the kinds whose host is a socket path (so `@` starts an abstract name, not
    /// a user name; spec P28).
    pub fn is_unix(self) -> bool {
        matches!(self, Net::Unix | Net::UnixVsock)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Connects to `host`/`port` over `net`, giving up after `timeout` (zero: no limit, as Go).
///
/// The deadline covers everything: name resolution, every address tried, and the
/// unix-vsock `CONNECT` handshake.
pub async fn dial(net: Net, host: &str, port: &str, timeout: Duration) -> Result<BoxStream> {
    let deadline = if timeout.is_zero() { None } else { Some(tokio::time::Instant::now() + timeout) };
    let fut = async {
        match net {
            Net::Tcp | Net::Tcp4 | Net::Tcp6 => tcp::dial(net, host, port, deadline).await,
            Net::Vsock => vsock::dial(host, port, deadline).await,
            Net::Unix => unix::dial(host).await,
            Net::UnixVsock => unix::dial_hybrid_vsock(host, port, deadline).await,
        }
    };
    let Some(deadline) = deadline else { return fut.await };
    match tokio::time::timeout_at(deadline, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Connect(timeout_message(net, host, port, timeout))),
    }
}

fn timeout_message(net: Net, host: &str, port: &str, timeout: Duration) -> String {
    let what = describe(net, host, port);
    match net {
        Net::Vsock => match (parse_vsock_cid(host), parse_vsock_port(port)) {
            (Ok(cid), Ok(p)) => {
                format!("connecting to {what} timed out after {timeout:?}: {}", vsock::timeout_hint(cid, p))
            }
            _ => format!("connecting to {what} timed out after {timeout:?}"),
        },
        Net::UnixVsock => format!(
            "connecting to {what} timed out after {timeout:?}: no reply to CONNECT {port} (is the \
             VM running and its vsock device up, and is cpud listening on guest vsock port {port}?)"
        ),
        _ => format!("connecting to {what} timed out after {timeout:?}"),
    }
}

/// A one-line description of a dial target for messages and logs, e.g.
/// `127.0.0.1:17010`, `vsock CID 3 port 17010`, `unix socket /run/cpud.sock`,
/// `unix-vsock /tmp/v.sock port 17010`.
pub fn describe(net: Net, host: &str, port: &str) -> String {
    match net {
        Net::Tcp | Net::Tcp4 | Net::Tcp6 => join_host_port(host, port),
        Net::Vsock => format!("vsock CID {host} port {port}"),
        Net::Unix => format!("unix socket {host}"),
        Net::UnixVsock => format!("unix-vsock {host} port {port}"),
    }
}

/// The address string Go gives its SSH library (spec 2.1): `host:port` for tcp,
/// `0x<cid-hex>:<port>` for vsock, the path for unix. Useful where host keys are keyed
/// by address. Unparsable vsock values are returned as given.
pub fn ssh_address(net: Net, host: &str, port: &str) -> String {
    match net {
        Net::Tcp | Net::Tcp4 | Net::Tcp6 => join_host_port(host, port),
        Net::Vsock => match (parse_vsock_cid(host), parse_vsock_port(port)) {
            (Ok(cid), Ok(p)) => format!("{cid:#x}:{p}"),
            _ => format!("{host}:{port}"),
        },
        Net::Unix | Net::UnixVsock => host.to_string(),
    }
}

/// Splits a `[user@]host` argument. For tcp and vsock the split is at the last `@` (as
/// ssh). For unix kinds the host is a socket path that may itself start with `@` (abstract)
/// or contain `@` (Go bug P28): a target starting with `@`, `/` or `.` is all path;
/// otherwise a user name ends at the first `@`.
pub fn split_user_host(net: Net, target: &str) -> (Option<&str>, &str) {
    if net.is_unix() {
        if target.starts_with(['@', '/', '.']) {
            return (None, target);
        }
        return match target.split_once('@') {
            Some((user, host)) if !user.is_empty() => (Some(user), host),
            _ => (None, target),
        };
    }
    match target.rsplit_once('@') {
        Some((user, host)) if !user.is_empty() => (Some(user), host),
        _ => (None, target),
    }
}

/// `host:port`, with brackets around an IPv6 literal.
pub fn join_host_port(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A listening socket of any server transport.
pub struct Listener {
    inner: ListenerKind,
}

enum ListenerKind {
    Tcp(tokio::net::TcpListener),
    Vsock(tokio_vsock::VsockListener),
    Unix(unix::UnixSocketListener),
}

impl Listener {
    /// Listens for `net`:
    /// - tcp kinds: on `addr` (empty: all addresses of the family) and numeric `port`;
    /// - vsock: on vsock `port` (32-bit, base prefixes) and CID `addr` (empty: any CID);
    /// - unix: on the socket path `port` (the `-sp` value; `addr` is used if `port` is
    ///   empty), see [`Listener::bind_unix`].
    pub async fn bind(net: Net, addr: &str, port: &str) -> Result<Listener> {
        let inner = match net {
            Net::Tcp | Net::Tcp4 | Net::Tcp6 => ListenerKind::Tcp(tcp::bind(net, addr, port).await?),
            Net::Vsock => ListenerKind::Vsock(vsock::bind(addr, port)?),
            Net::Unix => {
                let path = if port.is_empty() { addr } else { port };
                return Listener::bind_unix(path, UNIX_SOCKET_MODE).await;
            }
            Net::UnixVsock => {
                return Err(Error::Daemon(
                    "cannot listen on unix-vsock: it is a client transport (listen with -net vsock \
                     in the guest)"
                        .into(),
                ))
            }
        };
        Ok(Listener { inner })
    }

    /// Listens on the Unix socket `path` (`@name`: abstract). A stale socket file left by a
    /// dead server is removed first; a live one, or a path that is not a socket, is an error.
    /// A path socket gets permissions `mode` (cpud uses [`UNIX_SOCKET_MODE`]) and is
    /// removed again when the listener is dropped.
    pub async fn bind_unix(path: &str, mode: u32) -> Result<Listener> {
        Ok(Listener { inner: ListenerKind::Unix(unix::UnixSocketListener::bind(path, mode).await?) })
    }

    /// The transport kind of this listener: vsock, unix, or for TCP `Tcp4` when bound to an
    /// IPv4 address and `Tcp` otherwise.
    pub fn net(&self) -> Net {
        match &self.inner {
            ListenerKind::Tcp(l) => match l.local_addr() {
                Ok(a) if a.is_ipv4() => Net::Tcp4,
                _ => Net::Tcp,
            },
            ListenerKind::Vsock(_) => Net::Vsock,
            ListenerKind::Unix(_) => Net::Unix,
        }
    }

    /// Waits for the next connection; returns it with a printable peer description
    /// (`192.0.2.1:5555`, `vsock CID 2 port 1025`, `unix peer pid 42 uid 0`).
    pub async fn accept(&self) -> io::Result<(BoxStream, String)> {
        let (stream, peer) = self.accept_detached().await?;
        Ok((stream.attach()?, peer))
    }

    /// [`Listener::accept`] for a stream another runtime will serve (see [`Detached`]).
    pub async fn accept_detached(&self) -> io::Result<(Detached, String)> {
        match &self.inner {
            ListenerKind::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Detached::Tcp(s.into_std()?), peer.to_string()))
            }
            ListenerKind::Unix(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Detached::Unix(s.into_std()?), peer))
            }
            ListenerKind::Vsock(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Detached::Stream(Box::new(s)), format!("vsock CID {} port {}", peer.cid(), peer.port())))
            }
        }
    }

    /// The bound address, printable: `[::]:17010`, `vsock CID any port 17010`,
    /// `unix socket /run/cpud.sock` or `unix socket @name`.
    pub fn local_addr(&self) -> String {
        match &self.inner {
            ListenerKind::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            ListenerKind::Vsock(l) => match l.local_addr() {
                Ok(a) if a.cid() == VMADDR_CID_ANY => format!("vsock CID any port {}", a.port()),
                Ok(a) => format!("vsock CID {} port {}", a.cid(), a.port()),
                Err(_) => "vsock".into(),
            },
            ListenerKind::Unix(l) => format!("unix socket {}", l.path()),
        }
    }

    /// The bound TCP port, if this is a TCP listener (tests bind port 0).
    pub fn tcp_port(&self) -> Option<u16> {
        match &self.inner {
            ListenerKind::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }

    /// The bound vsock port, if this is a vsock listener.
    pub fn vsock_port(&self) -> Option<u32> {
        match &self.inner {
            ListenerKind::Vsock(l) => l.local_addr().ok().map(|a| a.port()),
            _ => None,
        }
    }

    /// The socket path (`@name` for abstract), if this is a Unix listener.
    pub fn unix_path(&self) -> Option<&str> {
        match &self.inner {
            ListenerKind::Unix(l) => Some(l.path()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_parse() {
        assert_eq!(Net::parse("", true).unwrap(), Net::Tcp);
        assert_eq!(Net::parse("tcp6", false).unwrap(), Net::Tcp6);
        assert_eq!(Net::parse("unix-vsock", true).unwrap(), Net::UnixVsock);
        assert!(Net::parse("unix-vsock", false).unwrap_err().to_string().contains("client only"));
        let e = Net::parse("udp", true).unwrap_err().to_string();
        assert_eq!(e, "unknown network \"udp\" (-net takes tcp, tcp4, tcp6, vsock, unix, unix-vsock)");
        for n in [Net::Tcp, Net::Tcp4, Net::Tcp6, Net::Vsock, Net::Unix, Net::UnixVsock] {
            assert_eq!(Net::parse(n.as_str(), true).unwrap(), n);
        }
    }

    #[test]
    fn user_host_split() {
        assert_eq!(split_user_host(Net::Tcp, "root@host"), (Some("root"), "host"));
        assert_eq!(split_user_host(Net::Tcp, "a@b@host"), (Some("a@b"), "host"));
        assert_eq!(split_user_host(Net::Tcp, "host"), (None, "host"));
        assert_eq!(split_user_host(Net::Unix, "@abstract"), (None, "@abstract"));
        assert_eq!(split_user_host(Net::Unix, "/run/a@b.sock"), (None, "/run/a@b.sock"));
        assert_eq!(split_user_host(Net::Unix, "root@@abstract"), (Some("root"), "@abstract"));
        assert_eq!(split_user_host(Net::UnixVsock, "root@/tmp/v.sock"), (Some("root"), "/tmp/v.sock"));
    }

    #[test]
    fn addresses() {
        assert_eq!(join_host_port("::1", "22"), "[::1]:22");
        assert_eq!(join_host_port("[::1]", "22"), "[::1]:22");
        assert_eq!(ssh_address(Net::Vsock, "42", "0x4272"), "0x2a:17010");
        assert_eq!(ssh_address(Net::Unix, "@x", "17010"), "@x");
        assert_eq!(describe(Net::Vsock, "3", "17010"), "vsock CID 3 port 17010");
    }
}

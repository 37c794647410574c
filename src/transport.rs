//! Streams and listeners for every transport: tcp, vsock, unix and unix-vsock (spec 2.1).
//!
//! The SSH layer only sees a [`BoxStream`] and a [`Listener`]; which kind of socket is behind
//! them is decided here from the `-net` value.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};

/// A connected byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A boxed stream, what the SSH client and server run over.
pub type BoxStream = Box<dyn Stream>;

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
}

/// Connects to `host`/`port` over `net`, giving up after `timeout`.
pub async fn dial(net: Net, host: &str, port: &str, timeout: Duration) -> Result<BoxStream> {
    let fut = async {
        match net {
            Net::Tcp | Net::Tcp4 | Net::Tcp6 => {
                let addr = join_host_port(host, port);
                let s = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|e| Error::Connect(format!("cannot connect to {addr}: {e}")))?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s) as BoxStream)
            }
            other => Err(Error::Connect(format!("transport {other:?} is not supported yet"))),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => {
            Err(Error::Connect(format!("connecting to {host} port {port} timed out after {timeout:?}")))
        }
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
}

impl Listener {
    /// Listens on `addr` (empty: all addresses) and `port` for tcp kinds.
    pub async fn bind(net: Net, addr: &str, port: &str) -> Result<Listener> {
        match net {
            Net::Tcp | Net::Tcp4 | Net::Tcp6 => {
                let host = if addr.is_empty() {
                    if net == Net::Tcp4 {
                        "0.0.0.0"
                    } else {
                        "::"
                    }
                } else {
                    addr
                };
                let a = join_host_port(host, port);
                let l = match tokio::net::TcpListener::bind(&a).await {
                    Ok(l) => l,
                    // A kernel without IPv6: fall back to all IPv4 addresses.
                    Err(_) if addr.is_empty() && net == Net::Tcp => {
                        let a4 = join_host_port("0.0.0.0", port);
                        tokio::net::TcpListener::bind(&a4)
                            .await
                            .map_err(|e| Error::Daemon(format!("cannot listen on {a4}: {e}")))?
                    }
                    Err(e) => return Err(Error::Daemon(format!("cannot listen on {a}: {e}"))),
                };
                Ok(Listener { inner: ListenerKind::Tcp(l) })
            }
            other => Err(Error::Daemon(format!("transport {other:?} is not supported yet"))),
        }
    }

    /// Waits for the next connection; returns it with a printable peer address.
    pub async fn accept(&self) -> std::io::Result<(BoxStream, String)> {
        match &self.inner {
            ListenerKind::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Box::new(s), peer.to_string()))
            }
        }
    }

    /// The bound address, printable (e.g. `[::]:17010`).
    pub fn local_addr(&self) -> String {
        match &self.inner {
            ListenerKind::Tcp(l) => l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        }
    }

    /// The bound TCP port, if this is a TCP listener (tests bind port 0).
    pub fn tcp_port(&self) -> Option<u16> {
        match &self.inner {
            ListenerKind::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
        }
    }
}

//! TCP dial and listen for `-net tcp|tcp4|tcp6`.
//!
//! tcp4 and tcp6 really restrict the address family: names are resolved and filtered, and
//! literals of the other family are refused. Dial tries every address in resolver order; as
//! Go's dialer, each attempt gets an even share of the time left (at least 2 s), so one
//! black-holed address does not eat the whole deadline.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::{join_host_port, BoxStream, Net};
use crate::error::{Error, Result};

/// The least time one address gets when several share a deadline (as Go).
const MIN_ATTEMPT: Duration = Duration::from_secs(2);

fn parse_port(port: &str) -> Result<u16> {
    port.parse::<u16>()
        .map_err(|_| Error::Usage(format!("bad TCP port {port:?}: want a number from 0 to 65535")))
}

fn family_ok(net: Net, ip: IpAddr) -> bool {
    match net {
        Net::Tcp4 => ip.is_ipv4(),
        Net::Tcp6 => ip.is_ipv6(),
        _ => true,
    }
}

fn family_name(net: Net) -> &'static str {
    if net == Net::Tcp4 {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Resolves `host` and keeps the addresses of `net`'s family, in resolver order.
async fn resolve(net: Net, host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if bare.is_empty() {
        return Err(Error::Usage("no host to connect to".into()));
    }
    let all: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
        .await
        .map_err(|e| Error::Connect(format!("cannot resolve {bare}: {e}")))?
        .collect();
    let kept: Vec<SocketAddr> = all.iter().copied().filter(|a| family_ok(net, a.ip())).collect();
    if kept.is_empty() {
        return Err(Error::Connect(if all.is_empty() {
            format!("cannot resolve {bare}: no addresses")
        } else {
            format!("{bare} has no {} address (-net {net})", family_name(net))
        }));
    }
    Ok(kept)
}

pub(super) async fn dial(net: Net, host: &str, port: &str, deadline: Option<Instant>) -> Result<BoxStream> {
    let port_num = parse_port(port)?;
    let addrs = resolve(net, host, port_num).await?;
    let s = dial_addrs(&addrs, deadline).await.map_err(|errors| {
        let target = join_host_port(host, port);
        Error::Connect(if errors.len() == 1 && errors[0].starts_with(&target) {
            format!("cannot connect to {}", errors[0])
        } else {
            format!("cannot connect to {target}: {}", errors.join("; "))
        })
    })?;
    Ok(Box::new(s))
}

/// Tries `addrs` in order; the first that connects wins. On failure, one `addr: error`
/// per address.
async fn dial_addrs(
    addrs: &[SocketAddr],
    deadline: Option<Instant>,
) -> std::result::Result<TcpStream, Vec<String>> {
    let mut errors = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let attempt = async {
            let s = TcpStream::connect(addr).await?;
            let _ = s.set_nodelay(true);
            Ok::<_, io::Error>(s)
        };
        let result = match deadline {
            None => attempt.await,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                let share = (left / (addrs.len() - i) as u32).max(MIN_ATTEMPT).min(left);
                match tokio::time::timeout(share, attempt).await {
                    Ok(r) => r,
                    Err(_) => {
                        Err(io::Error::new(io::ErrorKind::TimedOut, format!("timed out after {share:?}")))
                    }
                }
            }
        };
        match result {
            Ok(s) => return Ok(s),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(errors)
}

pub(super) async fn bind(net: Net, addr: &str, port: &str) -> Result<TcpListener> {
    let port_num = parse_port(port)?;
    if addr.is_empty() {
        if net == Net::Tcp6 {
            return bind_v6_only(port_num).map_err(|e| listen_error(&join_host_port("::", port), e));
        }
        let any: IpAddr =
            if net == Net::Tcp4 { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        return match TcpListener::bind((any, port_num)).await {
            Ok(l) => Ok(l),
            // A kernel without IPv6: plain tcp falls back to all IPv4 addresses.
            Err(_) if net == Net::Tcp => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port_num))
                .await
                .map_err(|e| listen_error(&join_host_port("0.0.0.0", port), e)),
            Err(e) => Err(listen_error(&join_host_port(&any.to_string(), port), e)),
        };
    }
    let addrs = resolve(net, addr, port_num).await.map_err(|e| Error::Daemon(e.to_string()))?;
    let mut last = None;
    for a in &addrs {
        match TcpListener::bind(a).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(listen_error(&a.to_string(), e)),
        }
    }
    Err(last.unwrap_or_else(|| Error::Daemon(format!("cannot listen on {}", join_host_port(addr, port)))))
}

/// All IPv6 addresses and no IPv4 ones: `[::]` is dual-stack unless IPV6_V6ONLY is set.
fn bind_v6_only(port: u16) -> io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v6()?;
    rustix::net::sockopt::set_ipv6_v6only(&socket, true)?;
    socket.set_reuseaddr(true)?;
    socket.bind((Ipv6Addr::UNSPECIFIED, port).into())?;
    socket.listen(1024)
}

fn listen_error(addr: &str, e: io::Error) -> Error {
    Error::Daemon(format!("cannot listen on {addr}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        assert!(family_ok(Net::Tcp4, "127.0.0.1".parse().unwrap()));
        assert!(!family_ok(Net::Tcp4, "::1".parse().unwrap()));
        assert!(family_ok(Net::Tcp6, "::1".parse().unwrap()));
        assert!(!family_ok(Net::Tcp6, "127.0.0.1".parse().unwrap()));
        assert!(family_ok(Net::Tcp, "::1".parse().unwrap()));
        assert!(parse_port("x").is_err());
        assert!(parse_port("65536").is_err());
        assert_eq!(parse_port("17010").unwrap(), 17010);
    }

    /// A refused first address does not stop the dial; every failure is reported.
    #[tokio::test]
    async fn every_address_is_tried() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let open = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open_addr = open.local_addr().unwrap();
        let deadline = Some(Instant::now() + Duration::from_secs(10));
        let s = dial_addrs(&[closed, open_addr], deadline).await.unwrap();
        assert_eq!(s.peer_addr().unwrap(), open_addr);
        let errors = dial_addrs(&[closed, closed], deadline).await.unwrap_err();
        assert_eq!(errors.len(), 2);
        assert!(errors[0].starts_with(&format!("{closed}: ")) && errors[0].contains("refused"), "{errors:?}");
    }
}

//! TCP transport on loopback: tcp4/tcp6 really restrict the family, dial walks every
//! resolved address, and bad ports are usage errors.

mod transport_support;

#[path = "common/skip.rs"]
mod skip;

use std::net::TcpListener as StdTcpListener;

use cpu_all::transport::{dial, Listener, Net};
use transport_support::{echo_round_trip, spawn_echo_once, STEP};

fn ipv6_loopback_works() -> bool {
    StdTcpListener::bind("[::1]:0").is_ok()
}

#[tokio::test]
async fn tcp4_round_trip_on_127_0_0_1() {
    let l = Listener::bind(Net::Tcp4, "127.0.0.1", "0").await.unwrap();
    let port = l.tcp_port().unwrap();
    assert_eq!(l.local_addr(), format!("127.0.0.1:{port}"));
    let server = spawn_echo_once(l);
    let mut s = dial(Net::Tcp4, "127.0.0.1", &port.to_string(), STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"v4").await, b"v4");
    drop(s);
    let peer = server.await.unwrap();
    assert!(peer.starts_with("127.0.0.1:"), "{peer}");
}

#[tokio::test]
async fn tcp6_round_trip_on_ipv6_loopback() {
    if !ipv6_loopback_works() {
        skip::here("no IPv6 on this host (cannot bind [::1])");
        return;
    }
    let l = Listener::bind(Net::Tcp6, "::1", "0").await.unwrap();
    let port = l.tcp_port().unwrap();
    assert_eq!(l.local_addr(), format!("[::1]:{port}"));
    let server = spawn_echo_once(l);
    let mut s = dial(Net::Tcp6, "::1", &port.to_string(), STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"v6").await, b"v6");
    drop(s);
    assert!(server.await.unwrap().starts_with("[::1]:"));
    // Bracketed literals work too.
    let l = Listener::bind(Net::Tcp, "[::1]", "0").await.unwrap();
    let port = l.tcp_port().unwrap();
    let server = spawn_echo_once(l);
    let mut s = dial(Net::Tcp, "[::1]", &port.to_string(), STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"[v6]").await, b"[v6]");
    drop(s);
    server.await.unwrap();
}

#[tokio::test]
async fn families_are_enforced() {
    let e = dial(Net::Tcp4, "::1", "17010", STEP).await.err().unwrap();
    assert_eq!(e.to_string(), "::1 has no IPv4 address (-net tcp4)");
    let e = dial(Net::Tcp6, "127.0.0.1", "17010", STEP).await.err().unwrap();
    assert_eq!(e.to_string(), "127.0.0.1 has no IPv6 address (-net tcp6)");
    let e = Listener::bind(Net::Tcp4, "::1", "0").await.err().unwrap();
    assert_eq!(e.to_string(), "::1 has no IPv4 address (-net tcp4)");
    assert_eq!(e.exit_code(), 1);
}

/// `localhost` usually resolves to ::1 and 127.0.0.1; with the server on 127.0.0.1 only,
/// whichever comes first, dial must end up connected.
#[tokio::test]
async fn dial_tries_every_address() {
    let l = Listener::bind(Net::Tcp4, "127.0.0.1", "0").await.unwrap();
    let port = l.tcp_port().unwrap().to_string();
    let addrs: Vec<_> =
        tokio::net::lookup_host(("localhost", 1)).await.map(|a| a.collect()).unwrap_or_default();
    if !addrs.iter().any(|a: &std::net::SocketAddr| a.is_ipv4()) {
        skip::here(&format!("localhost has no IPv4 address here ({addrs:?})"));
        return;
    }
    eprintln!("localhost resolves to {addrs:?}");
    let server = spawn_echo_once(l);
    let mut s = dial(Net::Tcp, "localhost", &port, STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"any").await, b"any");
    drop(s);
    server.await.unwrap();
}

#[tokio::test]
async fn refused_lists_what_was_tried() {
    // A port that was free a moment ago: bind, note, close.
    let port = StdTcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = dial(Net::Tcp4, "127.0.0.1", &port.to_string(), STEP).await.err().unwrap();
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")), "{msg}");
    assert!(msg.contains("refused"), "{msg}");
    assert_eq!(e.exit_code(), 255);
}

#[tokio::test]
async fn bad_ports() {
    let e = dial(Net::Tcp, "127.0.0.1", "ssh", STEP).await.err().unwrap();
    assert_eq!(e.to_string(), "bad TCP port \"ssh\": want a number from 0 to 65535");
    assert_eq!(e.exit_code(), 2);
    assert!(Listener::bind(Net::Tcp4, "127.0.0.1", "70000").await.is_err());
}

/// Runs `f` on a thread of its own inside a fresh network namespace with only `lo` (up), so
/// listening on all addresses touches no real network. None: not possible here (not root,
/// no `nsenter`/`ip`), with the reason printed.
fn in_private_netns<T: Send + 'static>(test: &str, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let handle = std::thread::spawn(move || {
        // SAFETY: CLONE_NEWNET only moves this thread, which we own and which holds no
        // sockets yet, into a new network namespace; no memory or descriptor is shared state.
        if let Err(e) = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) } {
            return Err(format!("unshare(CLONE_NEWNET): {e}"));
        }
        let ns = format!(
            "--net=/proc/{}/task/{}/ns/net",
            std::process::id(),
            rustix::thread::gettid().as_raw_nonzero()
        );
        let mut child = std::process::Command::new("nsenter")
            .args([ns.as_str(), "ip", "link", "set", "lo", "up"])
            .spawn()
            .map_err(|e| format!("nsenter: {e}"))?;
        // Bounded wait for the child.
        for _ in 0..100 {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(f()),
                Ok(Some(st)) => return Err(format!("nsenter ip link set lo up: {st}")),
                Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
                Err(e) => return Err(e.to_string()),
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Err("nsenter ip link set lo up did not finish in 5 s".into())
    });
    match handle.join().expect("netns thread") {
        Ok(v) => Some(v),
        Err(why) => {
            skip::skip(&format!("transport_tcp::{test}"), &format!("no private network namespace: {why}"));
            None
        }
    }
}

/// With no address, tcp6 listens on IPv6 only, tcp4 on IPv4 only, and tcp on both.
#[test]
fn wildcard_listeners_keep_to_their_family() {
    let result = in_private_netns("wildcard_listeners_keep_to_their_family", || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            if StdTcpListener::bind("[::1]:0").is_err() {
                skip::skip("transport_tcp::wildcard_listeners_keep_to_their_family", "no IPv6");
                return;
            }
            let v6 = Listener::bind(Net::Tcp6, "", "0").await.unwrap();
            let port = v6.tcp_port().unwrap().to_string();
            assert_eq!(v6.local_addr(), format!("[::]:{port}"));
            let e = dial(Net::Tcp4, "127.0.0.1", &port, STEP).await.err().unwrap().to_string();
            assert!(e.contains("refused"), "tcp6 listener answered IPv4: {e}");
            let server = spawn_echo_once(v6);
            let mut s = dial(Net::Tcp6, "::1", &port, STEP).await.unwrap();
            assert_eq!(echo_round_trip(&mut s, b"6").await, b"6");
            drop(s);
            server.await.unwrap();

            let v4 = Listener::bind(Net::Tcp4, "", "0").await.unwrap();
            let port = v4.tcp_port().unwrap().to_string();
            assert_eq!(v4.local_addr(), format!("0.0.0.0:{port}"));
            let e = dial(Net::Tcp6, "::1", &port, STEP).await.err().unwrap().to_string();
            assert!(e.contains("refused"), "tcp4 listener answered IPv6: {e}");

            let both = Listener::bind(Net::Tcp, "", "0").await.unwrap();
            let port = both.tcp_port().unwrap().to_string();
            let server = spawn_echo_once(both);
            let mut s = dial(Net::Tcp4, "127.0.0.1", &port, STEP).await.unwrap();
            assert_eq!(echo_round_trip(&mut s, b"4").await, b"4");
            drop(s);
            server.await.unwrap();
        })
    });
    let _ = result;
}

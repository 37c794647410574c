//! Unix socket transport on the host: dial/listen round trips on paths and abstract names,
//! permissions, stale-socket removal, and refusing to touch what is not ours.

mod transport_support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use cpu_all::transport::{dial, Listener, Net, UNIX_SOCKET_MODE};
use transport_support::{abstract_name, echo_round_trip, socket_path, spawn_echo_once, TempDir, STEP};

#[tokio::test]
async fn path_round_trip_permissions_and_cleanup() {
    let dir = TempDir::new("unix");
    let path = socket_path(&dir, "cpud.sock");
    // cpud passes -sp as the port and an empty listen address.
    let listener = Listener::bind(Net::Unix, "", &path).await.unwrap();
    assert_eq!(listener.local_addr(), format!("unix socket {path}"));
    assert_eq!(listener.unix_path(), Some(path.as_str()));
    assert_eq!(listener.tcp_port(), None);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, UNIX_SOCKET_MODE);
    assert_eq!(UNIX_SOCKET_MODE, 0o600);

    let server = spawn_echo_once(listener);
    let mut s = dial(Net::Unix, &path, "17010", STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"hello over unix").await, b"hello over unix");
    drop(s);
    let peer = server.await.unwrap();
    assert_eq!(
        peer,
        format!("unix peer pid {} uid {}", std::process::id(), rustix::process::getuid().as_raw())
    );
    // The listener was dropped by the echo task: its socket file is gone.
    assert!(std::fs::symlink_metadata(&path).is_err(), "socket file left behind");
}

#[tokio::test]
async fn addr_is_the_path_when_port_is_empty() {
    let dir = TempDir::new("unix");
    let path = socket_path(&dir, "a.sock");
    let listener = Listener::bind(Net::Unix, &path, "").await.unwrap();
    let server = spawn_echo_once(listener);
    let mut s = dial(Net::Unix, &path, "", STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"x").await, b"x");
    drop(s);
    server.await.unwrap();
}

#[tokio::test]
async fn bind_unix_with_mode() {
    let dir = TempDir::new("unix");
    let path = socket_path(&dir, "shared.sock");
    let _l = Listener::bind_unix(&path, 0o666).await.unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o666);
}

#[tokio::test]
async fn abstract_round_trip() {
    let name = abstract_name("rt");
    let listener = Listener::bind(Net::Unix, "", &name).await.unwrap();
    assert_eq!(listener.local_addr(), format!("unix socket {name}"));
    // No file named like it appears anywhere relative to the cwd.
    assert!(std::fs::symlink_metadata(&name).is_err());
    let server = spawn_echo_once(listener);
    let mut s = dial(Net::Unix, &name, "", STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"abstract").await, b"abstract");
    drop(s);
    server.await.unwrap();
    // Gone with its listener.
    let err = dial(Net::Unix, &name, "", STEP).await.err().unwrap().to_string();
    assert_eq!(err, format!("cannot connect to unix socket {name}: connection refused: nothing listens there (a stale socket, or not a socket)"));
}

#[tokio::test]
async fn abstract_name_in_use() {
    let name = abstract_name("busy");
    let _l = Listener::bind(Net::Unix, "", &name).await.unwrap();
    let err = Listener::bind(Net::Unix, "", &name).await.err().unwrap();
    assert!(err.to_string().starts_with(&format!("cannot listen on unix socket {name}: ")), "{err}");
    assert_eq!(err.exit_code(), 1);
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = TempDir::new("unix");
    let path = socket_path(&dir, "stale.sock");
    // A dead server: std's listener leaves its socket file behind when dropped.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    let listener = Listener::bind(Net::Unix, "", &path).await.unwrap();
    let server = spawn_echo_once(listener);
    let mut s = dial(Net::Unix, &path, "", STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"fresh").await, b"fresh");
    drop(s);
    server.await.unwrap();
}

#[tokio::test]
async fn live_socket_is_not_stolen() {
    let dir = TempDir::new("unix");
    let path = socket_path(&dir, "live.sock");
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let err = Listener::bind(Net::Unix, "", &path).await.err().unwrap().to_string();
    assert_eq!(err, format!("cannot listen on unix socket {path}: another server is listening on it"));
    // Still the same, still working socket.
    live.set_nonblocking(true).unwrap();
    let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
    assert!(live.accept().is_ok());
}

#[tokio::test]
async fn regular_file_is_never_removed() {
    let dir = TempDir::new("unix");
    let path = socket_path(&dir, "precious");
    std::fs::write(&path, b"do not delete").unwrap();
    let err = Listener::bind(Net::Unix, "", &path).await.err().unwrap().to_string();
    assert_eq!(
        err,
        format!("cannot listen on unix socket {path}: it exists and is not a socket; refusing to remove it")
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"do not delete");
}

#[tokio::test]
async fn dial_errors() {
    let dir = TempDir::new("unix");
    let missing = socket_path(&dir, "missing.sock");
    let e = dial(Net::Unix, &missing, "", STEP).await.err().unwrap();
    assert_eq!(
        e.to_string(),
        format!("cannot connect to unix socket {missing}: no such socket (is `cpud -net unix -sp {missing}` running?)")
    );
    assert_eq!(e.exit_code(), 255);
    let e = dial(Net::Unix, "", "", STEP).await.err().unwrap();
    assert_eq!(e.to_string(), "no unix socket path given");
    let long = format!("/tmp/{}", "x".repeat(120));
    let e = dial(Net::Unix, &long, "", Duration::from_secs(1)).await.err().unwrap();
    assert!(e.to_string().contains("is too long (125 bytes; the limit is 107)"), "{e}");
}

#[tokio::test]
async fn unix_vsock_cannot_listen() {
    let e = Listener::bind(Net::UnixVsock, "", "x").await.err().unwrap();
    assert!(e.to_string().starts_with("cannot listen on unix-vsock: it is a client transport"), "{e}");
}

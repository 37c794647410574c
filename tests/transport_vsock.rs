//! vsock and unix-vsock on the host. unix-vsock runs against a fake Firecracker-style
//! device socket; real AF_VSOCK traffic needs a loopback transport or a VM (see
//! tests/vm/transport-vsock.sh), so here vsock is exercised as far as this kernel allows.

mod transport_support;

#[path = "common/skip.rs"]
mod skip;

use std::time::Duration;

use cpu_all::transport::{dial, parse_vsock_cid, parse_vsock_port, Listener, Net};
use tokio::io::AsyncReadExt;
use transport_support::{echo_round_trip, socket_path, spawn_fake_hybrid, Reply, TempDir, GREETING, STEP};

#[tokio::test]
async fn unix_vsock_ok_then_data_flows() {
    let dir = TempDir::new("uv");
    let path = socket_path(&dir, "v.sock");
    let device = spawn_fake_hybrid(&path, Reply::Ok);
    // The port goes out in decimal whatever base it was given in.
    let mut s = dial(Net::UnixVsock, &path, "0x4272", STEP).await.unwrap();
    // The greeting came in the same segment as the OK line: it must not have been eaten.
    let mut greeting = vec![0u8; GREETING.len()];
    tokio::time::timeout(STEP, s.read_exact(&mut greeting)).await.unwrap().unwrap();
    assert_eq!(greeting, GREETING);
    assert_eq!(echo_round_trip(&mut s, b"through the device").await, b"through the device");
    drop(s);
    assert_eq!(device.await.unwrap(), "CONNECT 17010\n");
}

#[tokio::test]
async fn unix_vsock_bad_reply_is_quoted() {
    let dir = TempDir::new("uv");
    let path = socket_path(&dir, "v.sock");
    let device = spawn_fake_hybrid(&path, Reply::Line("ERR no such port\n"));
    let e = dial(Net::UnixVsock, &path, "17010", STEP).await.err().unwrap();
    assert_eq!(e.to_string(), format!("bad reply to CONNECT 17010 from {path}: \"ERR no such port\""));
    assert_eq!(e.exit_code(), 255);
    device.await.unwrap();
}

#[tokio::test]
async fn unix_vsock_partial_reply_then_close() {
    let dir = TempDir::new("uv");
    let path = socket_path(&dir, "v.sock");
    let device = spawn_fake_hybrid(&path, Reply::Line("O"));
    let e = dial(Net::UnixVsock, &path, "5", STEP).await.err().unwrap();
    assert_eq!(
        e.to_string(),
        format!("bad reply to CONNECT 5 from {path}: \"O\" (then the connection closed)")
    );
    device.await.unwrap();
}

#[tokio::test]
async fn unix_vsock_closed_without_reply() {
    let dir = TempDir::new("uv");
    let path = socket_path(&dir, "v.sock");
    let device = spawn_fake_hybrid(&path, Reply::Close);
    let e = dial(Net::UnixVsock, &path, "17010", STEP).await.err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{path} closed the connection without answering CONNECT 17010: nothing listens on guest \
             vsock port 17010 (is cpud running in the guest with -net vsock -sp 17010?)"
        )
    );
    device.await.unwrap();
}

#[tokio::test]
async fn unix_vsock_endless_reply_is_bounded() {
    let dir = TempDir::new("uv");
    let path = socket_path(&dir, "v.sock");
    let device = spawn_fake_hybrid(&path, Reply::Endless);
    let e = dial(Net::UnixVsock, &path, "17010", STEP).await.err().unwrap().to_string();
    assert!(e.starts_with(&format!("bad reply to CONNECT 17010 from {path}: \"xxxx")), "{e}");
    assert!(e.ends_with(&format!("{}\"... (no end of line in 128 bytes)", "x".repeat(128))), "{e}");
    device.await.unwrap();
}

#[tokio::test]
async fn unix_vsock_silent_device_times_out() {
    let dir = TempDir::new("uv");
    let path = socket_path(&dir, "v.sock");
    let device = spawn_fake_hybrid(&path, Reply::Silent);
    // The outer bound only guards the test; the dial must give up on its own after 300 ms.
    let r =
        tokio::time::timeout(STEP, dial(Net::UnixVsock, &path, "17010", Duration::from_millis(300))).await;
    let e = r.expect("dial gave up by itself").err().unwrap().to_string();
    assert!(e.contains("no reply to CONNECT 17010"), "{e}");
    assert!(e.contains("is cpud listening on guest vsock port 17010?"), "{e}");
    device.abort();
}

#[tokio::test]
async fn unix_vsock_no_device() {
    let dir = TempDir::new("uv");
    let path = socket_path(&dir, "none.sock");
    let e = dial(Net::UnixVsock, &path, "17010", STEP).await.err().unwrap().to_string();
    assert_eq!(
        e,
        format!(
            "cannot connect to unix socket {path}: no such socket (is the VM running, with its hybrid \
             vsock device's socket here?)"
        )
    );
}

#[tokio::test]
async fn unix_vsock_bad_port() {
    let e = dial(Net::UnixVsock, "/nonexistent", "port", STEP).await.err().unwrap();
    assert_eq!(
        e.to_string(),
        "bad vsock port \"port\": want an unsigned 32-bit number (42, 0x2a, 0o52 or 0b101010)"
    );
    assert_eq!(e.exit_code(), 2);
}

#[test]
fn cid_and_port_prefixes() {
    assert_eq!(parse_vsock_cid("3").unwrap(), 3);
    assert_eq!(parse_vsock_cid("0x2a").unwrap(), 42);
    assert_eq!(parse_vsock_cid("0o52").unwrap(), 42);
    assert_eq!(parse_vsock_cid("0b101010").unwrap(), 42);
    assert_eq!(parse_vsock_port("0x4272").unwrap(), 17010);
    assert_eq!(parse_vsock_port("4294967295").unwrap(), u32::MAX);
    assert!(parse_vsock_port("4294967296").is_err());
    assert!(parse_vsock_cid("-3").is_err());
}

#[tokio::test]
async fn vsock_dial_refuses_cid_any_and_bad_numbers() {
    let e = dial(Net::Vsock, "0xffffffff", "17010", STEP).await.err().unwrap();
    assert_eq!(
        e.to_string(),
        "vsock CID 0xffffffff is VMADDR_CID_ANY, which is only for listening; give the peer's CID"
    );
    let e = dial(Net::Vsock, "guest", "17010", STEP).await.err().unwrap();
    assert!(e.to_string().starts_with("bad vsock CID \"guest\""), "{e}");
    let e = Listener::bind(Net::Vsock, "", "0x1_0000_0000").await.err().unwrap();
    assert!(e.to_string().starts_with("bad vsock port"), "{e}");
}

/// True if this kernel can carry vsock traffic to itself (CID 1). Without vsock_loopback a
/// guest kernel hands CID 1 to its virtio transport, i.e. to the hypervisor, so we never
/// dial it then.
fn has_vsock_loopback() -> bool {
    std::path::Path::new("/sys/module/vsock_loopback").exists()
        || std::fs::read_to_string("/proc/kallsyms").map(|s| s.contains("vsock_loopback")).unwrap_or(false)
}

#[tokio::test]
async fn vsock_on_this_host() {
    let listener = match Listener::bind(Net::Vsock, "", "0o41213").await {
        Ok(l) => l,
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("this kernel has no vsock support") {
                assert_eq!(
                    msg,
                    "cannot listen on vsock port 17035: this kernel has no vsock support (modules \
                     vsock, vmw_vsock_virtio_transport; vhost_vsock on a VM host)"
                );
                skip::here(&msg);
                return;
            }
            if msg.contains("the port is in use") {
                skip::here("vsock port 17035 is taken on this host");
                return;
            }
            panic!("unexpected vsock listen error: {msg}");
        }
    };
    assert_eq!(listener.local_addr(), "vsock CID any port 17035");
    assert_eq!(listener.vsock_port(), Some(17035));
    assert_eq!(listener.net(), Net::Vsock);
    if !has_vsock_loopback() {
        skip::here("no vsock_loopback in this kernel (real vsock is tested in the VM)");
        return;
    }
    let server = transport_support::spawn_echo_once(listener);
    let mut s = dial(Net::Vsock, "1", "17035", STEP).await.unwrap();
    assert_eq!(echo_round_trip(&mut s, b"vsock loopback").await, b"vsock loopback");
    drop(s);
    assert!(server.await.unwrap().starts_with("vsock CID 1 port "));
}

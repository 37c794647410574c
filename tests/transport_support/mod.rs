//! Helpers for the transport tests: unique socket paths and names, an echo server on any
//! [`Listener`], and a fake Firecracker-style hybrid vsock device for unix-vsock.
#![allow(dead_code)] // each test file uses a different subset

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use cpu_all::transport::{BoxStream, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;

#[path = "../common/temp_dir.rs"]
mod temp_dir;

pub use temp_dir::TempDir;

/// Bound on every wait in these tests.
pub const STEP: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `name` inside `dir` as a string, the form a unix socket address takes.
pub fn socket_path(dir: &TempDir, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// A unique abstract socket name (`@...`).
pub fn abstract_name(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("@cpu-all-transport-{tag}-{}-{n}", std::process::id())
}

/// Accepts one connection and echoes it until EOF; returns the peer description.
pub fn spawn_echo_once(listener: Listener) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let (mut s, peer) =
            tokio::time::timeout(STEP, listener.accept()).await.expect("accept in time").expect("accept");
        let mut buf = [0u8; 4096];
        loop {
            let n = match tokio::time::timeout(STEP, s.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => break,
            };
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        peer
    })
}

/// Writes `msg`, half-closes nothing, and reads back exactly `msg.len()` bytes.
pub async fn echo_round_trip(s: &mut BoxStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.expect("write");
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(STEP, s.read_exact(&mut got)).await.expect("echo in time").expect("read echo");
    got
}

/// How the fake hybrid vsock device answers `CONNECT`.
#[derive(Clone, Copy, Debug)]
pub enum Reply {
    /// `OK 1073741824\n` plus `greeting` in the same write, then echo.
    Ok,
    /// This exact line.
    Line(&'static str),
    /// Never answer (hold the connection open).
    Silent,
    /// Close right after reading the request.
    Close,
    /// 300 bytes and no newline.
    Endless,
}

/// What a connected guest says first (sent glued to the OK line, so a client that reads
/// past the newline would lose it).
pub const GREETING: &[u8] = b"SSH-2.0-fake-guest\r\n";

/// A fake Firecracker-style device socket at `path`: accepts one connection, reads the
/// request line (returned by the task), answers as told.
pub fn spawn_fake_hybrid(path: &str, reply: Reply) -> tokio::task::JoinHandle<String> {
    let listener = UnixListener::bind(path).expect("bind fake hybrid vsock socket");
    tokio::spawn(async move {
        let (mut s, _) =
            tokio::time::timeout(STEP, listener.accept()).await.expect("accept in time").expect("accept");
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while request.len() < 64 {
            match tokio::time::timeout(STEP, s.read(&mut byte)).await {
                Ok(Ok(1)) => {
                    request.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                _ => break,
            }
        }
        let request = String::from_utf8_lossy(&request).into_owned();
        match reply {
            Reply::Ok => {
                let mut first = b"OK 1073741824\n".to_vec();
                first.extend_from_slice(GREETING);
                let _ = s.write_all(&first).await;
                let mut buf = [0u8; 4096];
                while let Ok(Ok(n)) = tokio::time::timeout(STEP, s.read(&mut buf)).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
            Reply::Line(l) => {
                let _ = s.write_all(l.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Reply::Silent => tokio::time::sleep(STEP).await,
            Reply::Close => {}
            Reply::Endless => {
                let _ = s.write_all(&[b'x'; 300]).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        request
    })
}

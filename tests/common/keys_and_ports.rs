//! Two things every peer a test starts needs: a key pair made by OpenSSH's ssh-keygen (no
//! passphrase, a given comment, RSA at 2048 bits: enough for a test, quick to make; running the
//! command with its timeout stays with the caller) and a free TCP port on 127.0.0.1.
//! Include it from a support module with `#[path = "../common/keys_and_ports.rs"] mod keys_and_ports;`.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// `ssh-keygen` making a `kind` (ed25519, ecdsa, rsa) key pair at `path` and `path.pub`.
pub fn keygen_command(path: &Path, kind: &str, comment: &str) -> Command {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", "", "-C", comment, "-f"]).arg(path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    cmd
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the caller retries if it is taken by
/// the time it binds).
pub fn free_loopback_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

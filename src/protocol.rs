//! Names and values both ends of a cpu session agree on (spec 3.6, 3.9, 5.3).
//!
//! The nonce that guards the 9P back-channel, the environment variables that carry the
//! session's settings, and the fixed paths. Client and server both import these so the two
//! sides cannot drift apart.

use crate::error::{Error, Result};

/// The nonce that the remote writes first on the 9P back-channel.
pub const ENV_NONCE: &str = "CPUNONCE";
/// The fstab (bind list and extra mounts) the remote applies.
pub const ENV_FSTAB: &str = "CPU_FSTAB";
/// The same fstab under an `LC_` name, which OpenSSH's default AcceptEnv lets through.
pub const ENV_FSTAB_LC: &str = "LC_GLENDA_CPU_FSTAB";
/// Extension: the largest 9P msize the client offers (a Go cpud ignores it).
pub const ENV_MSIZE: &str = "CPU_MSIZE";
/// Extension: extra 9P mount options (a Go cpud ignores it).
pub const ENV_MOUNTOPTS: &str = "CPU_MOUNTOPTS";
/// Extension: "1" when the client serves a second back-channel connection, which a cpu-all
/// cpud mounts with cached metadata for the system directories (a Go cpud ignores it).
pub const ENV_SYSTEM_MOUNT: &str = "CPU_SYSTEM_MOUNT";
/// Where the client's files are mounted on the remote side.
pub const MOUNT_POINT: &str = "/tmp/cpu";
/// Length of the nonce in bytes on the wire (32 lowercase hex characters).
pub const NONCE_LEN: usize = 32;

/// A fresh nonce: 16 bytes from the OS random source as 32 lowercase hex characters.
pub fn new_nonce() -> Result<String> {
    let mut raw = [0u8; NONCE_LEN / 2];
    let mut filled = 0;
    while filled < raw.len() {
        let n = rustix::rand::getrandom(&mut raw[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::io("reading the OS random source", e.into()))?;
        filled += n;
    }
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares two nonces in constant time (for equal lengths).
pub fn nonce_matches(expected: &[u8], got: &[u8]) -> bool {
    if expected.len() != got.len() {
        return false;
    }
    expected.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_is_32_lowercase_hex_and_fresh() {
        let a = new_nonce().unwrap();
        let b = new_nonce().unwrap();
        assert_eq!(a.len(), NONCE_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_ne!(a, b);
        assert!(nonce_matches(a.as_bytes(), a.as_bytes()));
        assert!(!nonce_matches(a.as_bytes(), b.as_bytes()));
        assert!(!nonce_matches(a.as_bytes(), &a.as_bytes()[1..]));
    }
}

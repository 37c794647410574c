//! The client's user keys: private key files (asking for a passphrase on the terminal when a
//! key is encrypted) and the keys held by ssh-agent.
//!
//! Which files to try is decided by the caller (`-key`, ssh_config, defaults); this module loads
//! one file at a time so that a bad or encrypted key never stops the next one from being tried.
//!
//! It also owns the text forms of keys shared by the client and the daemon: the PEM armour of
//! private key files (OpenSSH, PKCS#1 RSA, legacy-encrypted PKCS#1, PKCS#8, SEC1 EC) and the
//! base64 blob of public keys. These replace russh's `decode_secret_key`,
//! `parse_public_key_base64` and `public_key_base64`, which cost the static binary ~85 KB
//! (README "Size"): PuTTY key files and their Argon2 (no OpenSSH or Go tool reads them), and a
//! second base64 crate. The key formats themselves are still decoded by russh and ssh-key.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use base64ct::{Base64, Encoding};
use russh::keys::agent::client::AgentClient;
use russh::keys::{PrivateKey, PublicKey};

use crate::error::{Error, Result};

/// Loads a private key file; an encrypted key asks for its passphrase on /dev/tty (up to
/// three times) and fails clearly when there is no terminal.
pub fn load_private_key(path: &Path) -> Result<PrivateKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Auth(format!("unable to read private key {}: {e}", path.display())))?;
    match decode_secret_key(&text, None) {
        Ok(k) => return Ok(k),
        Err(russh::keys::Error::KeyIsEncrypted) => {}
        Err(e) => return Err(Error::Auth(format!("unable to parse private key {}: {e}", path.display()))),
    }
    for _ in 0..3 {
        let pass =
            read_passphrase(&format!("Enter passphrase for key '{}': ", path.display())).map_err(|e| {
                Error::Auth(format!(
                    "private key {} is encrypted and its passphrase cannot be asked: {e}",
                    path.display()
                ))
            })?;
        if pass.is_empty() {
            break;
        }
        match decode_secret_key(&text, Some(&pass)) {
            Ok(k) => return Ok(k),
            Err(e) => log::warn!("wrong passphrase for {}: {e}", path.display()),
        }
    }
    Err(Error::Auth(format!("could not decrypt private key {}", path.display())))
}

/// Reads one line from the controlling terminal with echo off.
pub fn read_passphrase(prompt: &str) -> std::io::Result<String> {
    let mut tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty")?;
    let saved = rustix::termios::tcgetattr(tty.as_fd())?;
    let mut quiet = saved.clone();
    quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
    rustix::termios::tcsetattr(tty.as_fd(), rustix::termios::OptionalActions::Flush, &quiet)?;
    let result = (|| {
        tty.write_all(prompt.as_bytes())?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while tty.read(&mut byte)? == 1 && byte[0] != b'\n' && byte[0] != b'\r' {
            line.push(byte[0]);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    })();
    let _ = rustix::termios::tcsetattr(tty.as_fd(), rustix::termios::OptionalActions::Flush, &saved);
    let _ = tty.write_all(b"\n");
    result
}

/// A connection to ssh-agent and the plain public keys it holds.
pub struct Agent {
    pub client: AgentClient<tokio::net::UnixStream>,
    pub keys: Vec<PublicKey>,
}

/// Connects to the agent named by SSH_AUTH_SOCK, if any; failures are logged and give None.
pub async fn connect_agent() -> Option<Agent> {
    let sock = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty())?;
    let mut client = match AgentClient::connect_uds(&sock).await {
        Ok(c) => c,
        Err(e) => {
            log::debug!("ssh-agent at {}: {e}", Path::new(&sock).display());
            return None;
        }
    };
    match client.request_identities().await {
        Ok(ids) => {
            let keys: Vec<PublicKey> = ids
                .into_iter()
                .filter_map(|id| match id {
                    russh::keys::agent::AgentIdentity::PublicKey { key, .. } => Some(key),
                    _ => None,
                })
                .collect();
            log::debug!("ssh-agent holds {} key(s)", keys.len());
            Some(Agent { client, keys })
        }
        Err(e) => {
            log::debug!("ssh-agent identities: {e}");
            None
        }
    }
}

/// The armour a private key file starts with, and how its body is decoded.
enum KeyArmour {
    Openssh,
    /// `RSA PRIVATE KEY`: PKCS#1, possibly with a legacy `DEK-Info: AES-128-CBC,IV` header.
    Pkcs1 {
        aes128_cbc_iv: Option<[u8; 16]>,
    },
    /// `PRIVATE KEY`, `ENCRYPTED PRIVATE KEY` (PKCS#8) and `EC PRIVATE KEY` (SEC1).
    Pkcs8,
}

/// Decodes a private key file's text, with `password` for an encrypted one; an encrypted key
/// without one gives `Error::KeyIsEncrypted`. The formats OpenSSH and the Go cpu read.
pub fn decode_secret_key(
    text: &str,
    password: Option<&str>,
) -> std::result::Result<PrivateKey, russh::keys::Error> {
    use russh::keys::Error as KeyError;
    if text.trim_start().starts_with("PuTTY-User-Key-File-") {
        return Err(KeyError::UnsupportedKeyType {
            key_type_string: "PuTTY key file (convert it: puttygen KEY -O private-openssh -o KEY.openssh)"
                .into(),
            key_type_raw: Vec::new(),
        });
    }
    let mut armour = None;
    let mut body = String::new();
    let mut lines = text.lines();
    for line in lines.by_ref() {
        armour = match line.trim_end() {
            "-----BEGIN OPENSSH PRIVATE KEY-----" => Some(KeyArmour::Openssh),
            "-----BEGIN RSA PRIVATE KEY-----" => Some(KeyArmour::Pkcs1 { aes128_cbc_iv: None }),
            "-----BEGIN PRIVATE KEY-----" | "-----BEGIN EC PRIVATE KEY-----" => Some(KeyArmour::Pkcs8),
            // Said up front: russh would only fail to parse it, and the caller asks for a
            // passphrase on KeyIsEncrypted.
            "-----BEGIN ENCRYPTED PRIVATE KEY-----" if password.is_none() => {
                return Err(KeyError::KeyIsEncrypted)
            }
            "-----BEGIN ENCRYPTED PRIVATE KEY-----" => Some(KeyArmour::Pkcs8),
            _ => continue,
        };
        break;
    }
    let Some(mut armour) = armour else { return Err(KeyError::CouldNotReadKey) };
    for line in lines {
        let line = line.trim_end();
        if line.starts_with("-----END ") {
            break;
        }
        if let Some(iv) = line.strip_prefix("DEK-Info: AES-128-CBC,") {
            let iv = hex_16(iv).ok_or(KeyError::CouldNotReadKey)?;
            armour = KeyArmour::Pkcs1 { aes128_cbc_iv: Some(iv) };
        } else if line.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) {
            body.push_str(line);
        }
        // Other header lines (Proc-Type: ...) carry nothing we need.
    }
    let der = Base64::decode_vec(&body).map_err(|_| KeyError::CouldNotReadKey)?;
    match armour {
        KeyArmour::Openssh => russh::keys::decode_openssh(&der, password),
        KeyArmour::Pkcs1 { aes128_cbc_iv: Some(iv) } => {
            russh::keys::decode_pkcs5(&der, password, russh::keys::Encryption::Aes128Cbc(iv))
        }
        // russh decodes PKCS#1 inside PKCS#8: wrapping it costs a few bytes of DER and keeps
        // one RSA path in the binary.
        KeyArmour::Pkcs1 { aes128_cbc_iv: None } => {
            russh::keys::pkcs8::decode_pkcs8(&pkcs1_in_pkcs8(&der), None)
        }
        KeyArmour::Pkcs8 => russh::keys::pkcs8::decode_pkcs8(&der, password.map(str::as_bytes)),
    }
}

/// 32 hex digits (a `DEK-Info` IV) as bytes.
fn hex_16(text: &str) -> Option<[u8; 16]> {
    let text = text.trim().as_bytes();
    if text.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(text.chunks(2)) {
        let digit = |c: u8| (c as char).to_digit(16);
        *byte = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Some(out)
}

/// A PKCS#1 RSAPrivateKey as a PKCS#8 PrivateKeyInfo (RFC 5208): version 0, the
/// rsaEncryption algorithm with NULL parameters, the key as an OCTET STRING.
fn pkcs1_in_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    // AlgorithmIdentifier { 1.2.840.113549.1.1.1, NULL }, preceded by INTEGER 0.
    const VERSION_AND_ALGORITHM: [u8; 18] = [
        0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05,
        0x00,
    ];
    let mut key = vec![0x04];
    der_length(&mut key, pkcs1.len());
    key.extend_from_slice(pkcs1);
    let mut out = vec![0x30];
    der_length(&mut out, VERSION_AND_ALGORITHM.len() + key.len());
    out.extend_from_slice(&VERSION_AND_ALGORITHM);
    out.extend_from_slice(&key);
    out
}

/// Appends a DER length: short form below 128, else the big-endian bytes after 0x80|count.
fn der_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes = len.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    out.push(0x80 | (bytes.len() - skip) as u8);
    out.extend_from_slice(&bytes[skip..]);
}

/// The public key in an OpenSSH key line's base64 field (`AAAAC3Nz...`).
pub fn parse_public_key_base64(blob: &str) -> std::result::Result<PublicKey, russh::keys::Error> {
    let bytes = Base64::decode_vec(blob.trim()).map_err(|_| russh::keys::Error::CouldNotReadKey)?;
    russh::keys::key::parse_public_key(&bytes)
}

/// The base64 field of the OpenSSH key line for `key`.
pub fn public_key_base64(key: &PublicKey) -> String {
    Base64::encode_string(&key.to_bytes().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs ssh-keygen into a temp dir; None (and a note) when it is not installed.
    fn keygen(dir: &Path, name: &str, args: &[&str]) -> Option<String> {
        let path = dir.join(name);
        let status = std::process::Command::new("ssh-keygen")
            .args(args)
            .args(["-q", "-C", "", "-f"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .status()
            .ok()?;
        assert!(status.success(), "ssh-keygen {args:?} failed: {status}");
        Some(std::fs::read_to_string(&path).expect("key written"))
    }

    fn public_line(dir: &Path, name: &str) -> PublicKey {
        let line = std::fs::read_to_string(dir.join(format!("{name}.pub"))).expect("public key written");
        let blob = line.split_whitespace().nth(1).expect("base64 field");
        let key = parse_public_key_base64(blob).expect("public key parses");
        assert_eq!(public_key_base64(&key), blob, "base64 round trip");
        key
    }

    #[test]
    fn every_private_key_format_ssh_keygen_writes() {
        if std::process::Command::new("ssh-keygen").arg("-?").output().is_err() {
            eprintln!("SKIP: private key formats: ssh-keygen is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("cpu-all-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            ("ed25519", &["-t", "ed25519", "-N", ""], None),
            ("ed25519-enc", &["-t", "ed25519", "-N", "secret1", "-a", "2"], Some("secret1")),
            ("rsa-openssh", &["-t", "rsa", "-b", "1024", "-N", ""], None),
            ("rsa-pem", &["-t", "rsa", "-b", "1024", "-N", "", "-m", "PEM"], None),
            ("rsa-pem-enc", &["-t", "rsa", "-b", "1024", "-N", "secret1", "-m", "PEM"], Some("secret1")),
            ("rsa-pkcs8", &["-t", "rsa", "-b", "1024", "-N", "", "-m", "PKCS8"], None),
            ("ecdsa256-pem", &["-t", "ecdsa", "-b", "256", "-N", "", "-m", "PEM"], None),
            ("ecdsa384-pkcs8", &["-t", "ecdsa", "-b", "384", "-N", "", "-m", "PKCS8"], None),
            ("ecdsa521", &["-t", "ecdsa", "-b", "521", "-N", ""], None),
            (
                "ecdsa256-pkcs8-enc",
                &["-t", "ecdsa", "-b", "256", "-N", "secret1", "-m", "PKCS8"],
                Some("secret1"),
            ),
        ];
        for (name, args, password) in cases {
            let Some(text) = keygen(&dir, name, args) else {
                eprintln!("SKIP: private key formats: ssh-keygen did not run");
                return;
            };
            if password.is_some() {
                assert!(
                    matches!(decode_secret_key(&text, None), Err(russh::keys::Error::KeyIsEncrypted)),
                    "{name}: an encrypted key without a password must say so"
                );
            }
            let key = decode_secret_key(&text, *password).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                key.public_key().key_data(),
                public_line(&dir, name).key_data(),
                "{name}: public half"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn putty_and_garbage_are_refused_clearly() {
        let putty = "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n";
        let err = decode_secret_key(putty, None).expect_err("refused").to_string();
        assert!(err.contains("PuTTY key file") && err.contains("puttygen"), "{err}");
        assert!(matches!(decode_secret_key("hello\n", None), Err(russh::keys::Error::CouldNotReadKey)));
        let bad = "-----BEGIN OPENSSH PRIVATE KEY-----\n!!!!\n-----END OPENSSH PRIVATE KEY-----\n";
        assert!(decode_secret_key(bad, None).is_err());
        assert!(parse_public_key_base64("AAAA-not-base64").is_err());
    }

    #[test]
    fn der_lengths() {
        for (len, want) in
            [(5usize, vec![5u8]), (127, vec![127]), (128, vec![0x81, 128]), (600, vec![0x82, 2, 0x58])]
        {
            let mut out = Vec::new();
            der_length(&mut out, len);
            assert_eq!(out, want, "length {len}");
        }
        assert_eq!(
            hex_16("000102030405060708090a0b0c0d0eFF"),
            Some([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 255])
        );
        assert_eq!(hex_16("0001"), None);
        assert_eq!(hex_16("zz0102030405060708090a0b0c0d0e0f"), None);
    }
}

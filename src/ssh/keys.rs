//! The client's user keys: private key files (asking for a passphrase on the terminal when a
//! key is encrypted) and the keys held by ssh-agent.
//!
//! Which files to try is decided by the caller (`-key`, ssh_config, defaults); this module loads
//! one file at a time so that a bad or encrypted key never stops the next one from being tried.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::Path;

use russh::keys::agent::client::AgentClient;
use russh::keys::{PrivateKey, PublicKey};

use crate::error::{Error, Result};

/// Loads a private key file; an encrypted key asks for its passphrase on /dev/tty (up to
/// three times) and fails clearly when there is no terminal.
pub fn load_private_key(path: &Path) -> Result<PrivateKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Auth(format!("unable to read private key {}: {e}", path.display())))?;
    match russh::keys::decode_secret_key(&text, None) {
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
        match russh::keys::decode_secret_key(&text, Some(&pass)) {
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

//! cpud's host key: loaded from `-hk`, kept in `-statedir`, or generated for this run.
//!
//! Unlike the Go cpud (which ignores a bad `-hk` and makes a new RSA key on every start), a
//! key file that cannot be used stops the daemon with a message naming the file. A generated
//! key is ed25519; with a state directory it is written there (mode 0600) and reused on the
//! next start, so clients' known_hosts entries stay valid across reboots.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{HashAlg, PrivateKey, PublicKey};

use crate::error::{Error, Result};

/// File name of the generated key inside the state directory (as OpenSSH names it).
pub const STATE_KEY_NAME: &str = "ssh_host_ed25519_key";

/// Where the host key came from, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeySource {
    /// Read from the `-hk` file.
    File(PathBuf),
    /// Read from the state directory.
    StateLoaded(PathBuf),
    /// Generated now and saved in the state directory.
    StateCreated(PathBuf),
    /// Generated now, kept in memory only: it changes on every start.
    Ephemeral,
}

/// Picks the host key as the flags say: `-hk FILE`, else `-statedir DIR`'s key (created on
/// first use), else a fresh ephemeral ed25519 key.
pub fn load_or_create(host_key_file: &str, state_dir: &str) -> Result<(PrivateKey, HostKeySource)> {
    if !host_key_file.is_empty() {
        let path = PathBuf::from(host_key_file);
        let key = load_private_key(&path)?;
        return Ok((key, HostKeySource::File(path)));
    }
    if !state_dir.is_empty() {
        let path = Path::new(state_dir).join(STATE_KEY_NAME);
        if path.exists() {
            let key = load_private_key(&path)?;
            return Ok((key, HostKeySource::StateLoaded(path)));
        }
        let key = generate_ed25519()?;
        save_private_key(&key, &path)?;
        return Ok((key, HostKeySource::StateCreated(path)));
    }
    Ok((generate_ed25519()?, HostKeySource::Ephemeral))
}

/// Reads an OpenSSH or PEM private key (ed25519, ecdsa, RSA). Encrypted keys are refused:
/// a daemon has nobody to ask for the passphrase.
pub fn load_private_key(path: &Path) -> Result<PrivateKey> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Daemon(format!("cannot read host key {}: {e}", path.display())))?;
    crate::ssh::keys::decode_secret_key(&text, None)
        .map_err(|e| Error::Daemon(format!("cannot use host key {}: {e}", path.display())))
}

/// A new ed25519 key from the OS random source.
pub fn generate_ed25519() -> Result<PrivateKey> {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        let n = rustix::rand::getrandom(&mut seed[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::Daemon(format!("cannot read the OS random source: {e}")))?;
        filled += n;
    }
    let pair = Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    Ok(PrivateKey::from(pair))
}

/// Writes `key` in OpenSSH format to `path`, created with mode 0600 (never world-readable,
/// not even for a moment), and creates the directory (0700) if needed.
pub fn save_private_key(key: &PrivateKey, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::Daemon(format!("cannot create state directory {}: {e}", dir.display())))?;
    }
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| Error::Daemon(format!("cannot encode the host key: {e}")))?;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| Error::Daemon(format!("cannot save host key {}: {e}", path.display())))
}

/// `SHA256:...`, as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cpu-all-hostkey-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn state_dir_key_is_created_once_and_reused() {
        let dir = temp_dir("state");
        let (k1, src1) = load_or_create("", dir.to_str().unwrap()).unwrap();
        let path = dir.join(STATE_KEY_NAME);
        assert_eq!(src1, HostKeySource::StateCreated(path.clone()));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, src2) = load_or_create("", dir.to_str().unwrap()).unwrap();
        assert_eq!(src2, HostKeySource::StateLoaded(path.clone()));
        assert_eq!(fingerprint(k1.public_key()), fingerprint(k2.public_key()));
        // -hk wins over the state directory.
        let (k3, src3) = load_or_create(path.to_str().unwrap(), "/nonexistent").unwrap();
        assert_eq!(src3, HostKeySource::File(path));
        assert_eq!(k3.public_key(), k1.public_key());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ephemeral_keys_differ_and_fingerprints_look_like_openssh() {
        let (a, src) = load_or_create("", "").unwrap();
        assert_eq!(src, HostKeySource::Ephemeral);
        let (b, _) = load_or_create("", "").unwrap();
        let fa = fingerprint(a.public_key());
        assert!(fa.starts_with("SHA256:"), "{fa}");
        assert_ne!(fa, fingerprint(b.public_key()));
    }

    #[test]
    fn unreadable_or_bad_key_file_is_a_clear_error() {
        let err = load_or_create("/nonexistent/key", "").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/key"), "{err}");
        assert_eq!(err.exit_code(), 1);
        let dir = temp_dir("bad");
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("bad");
        std::fs::write(&bad, "not a key\n").unwrap();
        let err = load_or_create(bad.to_str().unwrap(), "").unwrap_err();
        assert!(err.to_string().contains("cannot use host key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

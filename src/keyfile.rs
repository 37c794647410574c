//! What kind of key a file holds, judged from its first line, so that a public key given where
//! a private one is needed (`cpu -key`, `cpud -hk`), or a private key given where public ones
//! are needed (`cpud -pk`, `cpu -hk`), stops the applet at start with one line that says so.
//!
//! This module only sniffs and words the error; parsing keys stays in [`crate::ssh`]. A file
//! it cannot judge (missing, unreadable, unknown format) passes: the real loader reports it.

use std::path::Path;

/// The kind of key text a file starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// `-----BEGIN ... PRIVATE KEY-----` (OpenSSH, PEM, PKCS#8).
    Private,
    /// An OpenSSH public key line (`ssh-ed25519 AAAA...`), possibly with authorized_keys
    /// options in front, or an RFC 4716 `---- BEGIN SSH2 PUBLIC KEY ----` block.
    Public,
    Unknown,
}

/// Judges key text from its first non-blank, non-comment line.
pub fn kind_of_text(text: &str) -> KeyKind {
    let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')) else {
        return KeyKind::Unknown;
    };
    if line.starts_with("-----BEGIN") && line.contains("PRIVATE KEY") {
        return KeyKind::Private;
    }
    if line.starts_with("---- BEGIN SSH2 PUBLIC KEY") {
        return KeyKind::Public;
    }
    // An algorithm name followed by base64, anywhere on the line (options may come first).
    let words: Vec<&str> = line.split_whitespace().collect();
    let is_public = words.windows(2).any(|w| {
        let alg = w[0];
        (alg.starts_with("ssh-") || alg.starts_with("ecdsa-sha2-") || alg.starts_with("sk-"))
            && w[1].starts_with("AAAA")
    });
    if is_public {
        KeyKind::Public
    } else {
        KeyKind::Unknown
    }
}

/// Judges a file; Unknown when it cannot be read (the loader then says why).
pub fn kind_of_file(path: &Path) -> KeyKind {
    // Key files are small; do not read a huge file named by mistake.
    use std::io::Read;
    let Ok(file) = std::fs::File::open(path) else { return KeyKind::Unknown };
    let mut head = Vec::new();
    if file.take(16 * 1024).read_to_end(&mut head).is_err() {
        return KeyKind::Unknown;
    }
    kind_of_text(&String::from_utf8_lossy(&head))
}

/// Fails when `path` (given with `flag`) holds a public key where a private key is
/// needed; the error is the line to show (the caller picks the error kind).
pub fn expect_private(flag: &str, path: &Path) -> Result<(), String> {
    if kind_of_file(path) != KeyKind::Public {
        return Ok(());
    }
    let shown = path.display();
    let private = path.to_string_lossy();
    let hint = match private.strip_suffix(".pub") {
        Some(stem) => format!(" (the private key is probably {stem})"),
        None => String::new(),
    };
    Err(format!("{flag} {shown} is a public key; {flag} needs a private key{hint}"))
}

/// Fails when `path` (given with `flag`) holds a private key where public keys are
/// needed; the error is the line to show.
pub fn expect_public(flag: &str, path: &Path) -> Result<(), String> {
    if kind_of_file(path) != KeyKind::Private {
        return Ok(());
    }
    Err(format!(
        "{flag} {} is a private key; {flag} needs public keys (a .pub file, one key per line)",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(
            kind_of_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Blbn\n-----END OPENSSH PRIVATE KEY-----\n"),
            KeyKind::Private
        );
        assert_eq!(kind_of_text("-----BEGIN RSA PRIVATE KEY-----\n"), KeyKind::Private);
        assert_eq!(kind_of_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI me@host\n"), KeyKind::Public);
        assert_eq!(
            kind_of_text("# keys\n\nfrom=\"10.0.0.1\",no-pty ecdsa-sha2-nistp256 AAAAE2Vj x\n"),
            KeyKind::Public
        );
        assert_eq!(kind_of_text("---- BEGIN SSH2 PUBLIC KEY ----\n"), KeyKind::Public);
        assert_eq!(kind_of_text("hello world\n"), KeyKind::Unknown);
        assert_eq!(kind_of_text(""), KeyKind::Unknown);
    }

    #[test]
    fn messages_name_the_flag_and_the_fix() {
        let dir = std::env::temp_dir().join(format!("cpu-all-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let public = dir.join("id.pub");
        std::fs::write(&public, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI me\n").unwrap();
        let private = dir.join("id");
        std::fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        let e = expect_private("-key", &public).unwrap_err();
        assert_eq!(
            e,
            format!(
                "-key {} is a public key; -key needs a private key (the private key is probably {})",
                public.display(),
                private.display()
            )
        );
        assert!(expect_private("-key", &private).is_ok());
        assert!(expect_private("-key", &dir.join("missing")).is_ok());
        let e = expect_public("-pk", &private).unwrap_err();
        assert!(e.starts_with(&format!("-pk {} is a private key; -pk needs public keys", private.display())));
        assert!(expect_public("-pk", &public).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! OpenSSH known_hosts files: checking a server's host key and recording a new one, plus the
//! pinned-key file of `cpu -hk`.
//!
//! Lines are `[marker] patterns keytype base64 [comment]`. Patterns are comma-separated host
//! names or wildcards (`*`, `?`, `!negation`) or hashed entries `|1|salt|hmac` where hmac is
//! HMAC-SHA1 keyed with the salt over the host field. The host field is `host` for port 22 and
//! `[host]:port` otherwise. `@cert-authority` and `@revoked` lines are skipped. This module only
//! reads and appends files; the policy (accept-new, strict, off) lives in the SSH client.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64ct::{Base64, Encoding};
use russh::keys::PublicKey;

use crate::error::{Error, Result};
use crate::ssh::config::wildcard_match;

/// What the known_hosts files say about a host and the key it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host holds exactly this key.
    Known,
    /// No line names this host.
    Unknown,
    /// The host is listed, but with another key: the first such line.
    Changed { file: PathBuf, line: usize },
}

/// The host field ssh writes for `host` and `port`: `host` for 22, else `[host]:port`.
pub fn host_field(host: &str, port: u16) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Checks `key` for `host`/`port` against every file in order. A matching line anywhere wins
/// over a conflicting one (ssh accepts a host listed with several keys).
pub fn check(files: &[PathBuf], host: &str, port: u16, key: &PublicKey) -> Verdict {
    let field = host_field(host, port);
    let mut changed: Option<Verdict> = None;
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for (i, line) in text.lines().enumerate() {
            let Some(entry) = parse_line(line) else { continue };
            if !patterns_match(entry.patterns, &field) {
                continue;
            }
            match entry.key {
                Some(k) if k.key_data() == key.key_data() => return Verdict::Known,
                Some(_) => {
                    if changed.is_none() {
                        changed = Some(Verdict::Changed { file: file.clone(), line: i + 1 });
                    }
                }
                None => log::debug!("{}:{}: unreadable key, ignored", file.display(), i + 1),
            }
        }
    }
    changed.unwrap_or(Verdict::Unknown)
}

/// The algorithms of the keys the files hold for `host`/`port`, so the client can ask the
/// server for a key it can check (as ssh orders HostKeyAlgorithms).
pub fn known_algorithms(files: &[PathBuf], host: &str, port: u16) -> Vec<russh::keys::Algorithm> {
    let field = host_field(host, port);
    let mut algs = Vec::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        for line in text.lines() {
            if let Some(Entry { patterns, key: Some(k) }) = parse_line(line) {
                if patterns_match(patterns, &field) && !algs.contains(&k.algorithm()) {
                    algs.push(k.algorithm());
                }
            }
        }
    }
    algs
}

struct Entry<'a> {
    patterns: &'a str,
    key: Option<PublicKey>,
}

fn parse_line(line: &str) -> Option<Entry<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let patterns = fields.next()?;
    if patterns.starts_with('@') {
        // @cert-authority and @revoked: certificates are not supported; skipped.
        return None;
    }
    let _key_type = fields.next()?;
    let blob = fields.next()?;
    Some(Entry { patterns, key: crate::ssh::keys::parse_public_key_base64(blob).ok() })
}

/// Whether a comma-separated pattern list selects `field` (negations veto).
fn patterns_match(patterns: &str, field: &str) -> bool {
    let mut matched = false;
    for p in patterns.split(',') {
        if let Some(hashed) = p.strip_prefix("|1|") {
            if hashed_matches(hashed, field) {
                matched = true;
            }
        } else if let Some(neg) = p.strip_prefix('!') {
            if wildcard_match(&neg.to_ascii_lowercase(), &field.to_ascii_lowercase()) {
                return false;
            }
        } else if wildcard_match(&p.to_ascii_lowercase(), &field.to_ascii_lowercase()) {
            matched = true;
        }
    }
    matched
}

/// `salt|hash` (both base64) against a host field.
fn hashed_matches(salt_and_hash: &str, field: &str) -> bool {
    let Some((salt, hash)) = salt_and_hash.split_once('|') else { return false };
    let (Ok(salt), Ok(hash)) = (Base64::decode_vec(salt), Base64::decode_vec(hash)) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    ring::hmac::verify(&key, field.as_bytes(), &hash).is_ok()
}

/// A hashed host field `|1|salt|hash` with a fresh 20-byte salt.
pub fn hash_host_field(field: &str) -> Result<String> {
    let mut salt = [0u8; 20];
    let mut filled = 0;
    while filled < salt.len() {
        filled += rustix::rand::getrandom(&mut salt[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| Error::io("reading the OS random source", e.into()))?;
    }
    Ok(hash_with_salt(field, &salt))
}

fn hash_with_salt(field: &str, salt: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
    let tag = ring::hmac::sign(&key, field.as_bytes());
    format!("|1|{}|{}", Base64::encode_string(salt), Base64::encode_string(tag.as_ref()))
}

/// The known_hosts line for `host`/`port` and `key` (without newline).
pub fn entry_line(host: &str, port: u16, key: &PublicKey, hashed: bool) -> Result<String> {
    let field = host_field(host, port);
    let field = if hashed { hash_host_field(&field)? } else { field };
    Ok(format!("{field} {} {}", key.algorithm().as_str(), crate::ssh::keys::public_key_base64(key)))
}

/// Appends the line for `host`/`port`/`key` to `file`, creating it (and its directory, mode
/// 0700) if needed.
pub fn append(file: &Path, host: &str, port: u16, key: &PublicKey, hashed: bool) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = file.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
    }
    let line = entry_line(host, port, key, hashed)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| Error::io(format!("opening {}", file.display()), e))?;
    // Start on a fresh line if the file does not end in one.
    let needs_newline = std::fs::read(file).map(|b| !b.is_empty() && !b.ends_with(b"\n")).unwrap_or(false);
    let text = if needs_newline { format!("\n{line}\n") } else { format!("{line}\n") };
    f.write_all(text.as_bytes()).map_err(|e| Error::io(format!("writing {}", file.display()), e))
}

/// The keys in a `-hk` file: `.pub` lines (`type base64 [comment]`) or known_hosts-like lines
/// (`hosts type base64 [comment]`). At least one key is required.
pub fn parse_pinned(text: &str, what: &str) -> Result<Vec<PublicKey>> {
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let key = (0..fields.len().saturating_sub(1))
            .filter(|&i| looks_like_key_type(fields[i]))
            .find_map(|i| crate::ssh::keys::parse_public_key_base64(fields[i + 1]).ok());
        match key {
            Some(k) => keys.push(k),
            None => return Err(Error::Config(format!("{what}: not a public key line: {line:?}"))),
        }
    }
    if keys.is_empty() {
        return Err(Error::Config(format!("{what}: no public key in the file")));
    }
    Ok(keys)
}

fn looks_like_key_type(s: &str) -> bool {
    s.starts_with("ssh-") || s.starts_with("ecdsa-") || s.starts_with("sk-") || s.starts_with("rsa-")
}

/// SHA-256 fingerprint in OpenSSH's form (`SHA256:base64-without-padding`).
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED1: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILjJc6GiSV9UoBwkkhooZwb+QuNoGm6FBgij+8AWqfOJ";
    const ED2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK36i4vPSwMDeZHX1UzTPxDzvZuMdDAZxeQX+/LzKzdY";

    fn key(s: &str) -> PublicKey {
        crate::ssh::keys::parse_public_key_base64(s.split_whitespace().nth(1).unwrap()).unwrap()
    }

    fn tmp(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cpu-kh-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn host_fields() {
        assert_eq!(host_field("h", 22), "h");
        assert_eq!(host_field("h", 17010), "[h]:17010");
        assert_eq!(host_field("::1", 17010), "[::1]:17010");
        assert_eq!(host_field("[::1]", 22), "::1");
    }

    #[test]
    fn plain_lists_ports_and_changes() {
        let f = tmp(
            "plain",
            &format!("# c\n@revoked * {ED2}\nother,[board]:17010 {ED1}\n[board]:2222 {ED2} comment\n"),
        );
        let files = vec![f.clone()];
        assert_eq!(check(&files, "board", 17010, &key(ED1)), Verdict::Known);
        assert_eq!(check(&files, "other", 22, &key(ED1)), Verdict::Known);
        assert_eq!(check(&files, "board", 22, &key(ED1)), Verdict::Unknown);
        assert_eq!(check(&files, "board", 2222, &key(ED1)), Verdict::Changed { file: f.clone(), line: 4 });
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn hashed_entries_match_and_round_trip() {
        // Produced by `ssh-keygen -H` style hashing with a fixed salt.
        let line = hash_with_salt("[10.1.2.3]:17010", &[7u8; 20]);
        assert!(line.starts_with("|1|BwcHBwcHBwcHBwcHBwcHBwcHBwc=|"));
        let f = tmp("hashed", &format!("{line} {ED1}\n"));
        assert_eq!(check(std::slice::from_ref(&f), "10.1.2.3", 17010, &key(ED1)), Verdict::Known);
        assert_eq!(check(std::slice::from_ref(&f), "10.1.2.4", 17010, &key(ED1)), Verdict::Unknown);
        std::fs::remove_file(&f).unwrap();
        append(&f, "h", 17010, &key(ED2), true).unwrap();
        assert_eq!(check(std::slice::from_ref(&f), "h", 17010, &key(ED2)), Verdict::Known);
        assert!(std::fs::read_to_string(&f).unwrap().starts_with("|1|"));
        std::fs::remove_file(&f).unwrap();
    }

    #[test]
    fn append_plain_line() {
        let f = tmp("append", "x ssh-ed25519 AAAA");
        append(&f, "h", 17010, &key(ED1), false).unwrap();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), format!("x ssh-ed25519 AAAA\n[h]:17010 {ED1}\n"));
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn negation_vetoes() {
        let f = tmp("neg", &format!("*,!bad {ED1}\n"));
        assert_eq!(check(std::slice::from_ref(&f), "good", 22, &key(ED1)), Verdict::Known);
        assert_eq!(check(std::slice::from_ref(&f), "bad", 22, &key(ED1)), Verdict::Unknown);
        std::fs::remove_file(f).unwrap();
    }

    #[test]
    fn pinned_formats() {
        assert_eq!(parse_pinned(&format!("{ED1} me@host\n"), "f").unwrap(), vec![key(ED1)]);
        assert_eq!(parse_pinned(&format!("[h]:1 {ED2}\n"), "f").unwrap(), vec![key(ED2)]);
        assert!(parse_pinned("", "f").is_err());
        assert!(parse_pinned("garbage here", "f").is_err());
    }
}

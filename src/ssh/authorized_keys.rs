//! The `-pk` file: OpenSSH authorized_keys format, every key in it (the Go cpud reads only
//! the first).
//!
//! Each line is `[options] keytype base64 [comment]`; blank lines and `#` comments are
//! skipped, and a line that does not parse is skipped with a warning naming its number, so one
//! bad line never locks everybody out. Options, as sshd(8) documents them:
//! - honoured: `from="pattern-list"` (IP patterns with `*`/`?`, CIDR, `!` negation; host names
//!   are not resolved, so a name pattern never matches), `expiry-time="YYYYMMDD[HHMM[SS]]"`
//!   (UTC), `no-pty`, `no-port-forwarding`, `restrict` (no pty, no forwarding) with `pty` and
//!   `port-forwarding` turning them back on;
//! - refusing: a key with `command=` (forced commands are not implemented) or `cert-authority`
//!   (certificates are not accepted) is not accepted at all, rather than accepted with more
//!   rights than the file grants;
//! - ignored (nothing here to restrict): `agent-forwarding`, `no-agent-forwarding`,
//!   `x11-forwarding`, `no-X11-forwarding`, `user-rc`, `no-user-rc`, `environment=`,
//!   `principals=`, `permitopen=`, `permitlisten=`, `tunnel=`, `no-touch-required`,
//!   `verify-required`.
//!
//! This module only parses and matches; the server re-reads the file on every attempt.

use std::net::IpAddr;
use std::path::Path;

use russh::keys::PublicKey;

use crate::error::{Error, Result};

/// What a matching key may do in its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    pub pty: bool,
    pub port_forwarding: bool,
}

impl Default for Permissions {
    fn default() -> Self {
        Permissions { pty: true, port_forwarding: true }
    }
}

/// One usable line of the file.
#[derive(Debug, Clone)]
pub struct AuthorizedKey {
    pub key: PublicKey,
    /// 1-based line number, for messages.
    pub line: usize,
    pub comment: String,
    /// `from=` patterns; None: any address.
    pub from: Option<Vec<String>>,
    /// `expiry-time=` as seconds since the epoch (UTC).
    pub expires: Option<u64>,
    pub permissions: Permissions,
    /// Why this key is never accepted (forced command, cert-authority); None if usable.
    pub refused: Option<String>,
}

/// The parsed file: its usable keys and a warning for each line that was skipped.
#[derive(Debug, Default)]
pub struct AuthorizedKeys {
    pub keys: Vec<AuthorizedKey>,
    pub warnings: Vec<String>,
}

/// The decision for one offered key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted {
        line: usize,
        permissions: Permissions,
    },
    /// Not in the file at all.
    Unknown,
    /// In the file but not usable from here or now; the text says why.
    Denied(String),
}

impl AuthorizedKeys {
    /// Reads and parses `path`. A missing or unreadable file is an error; a file with no
    /// usable key is not (every key is then rejected).
    pub fn load(path: &Path) -> Result<AuthorizedKeys> {
        let text = std::fs::read(path).map_err(|e| {
            Error::Daemon(format!("cannot read authorized keys file {}: {e}", path.display()))
        })?;
        Ok(Self::parse(&String::from_utf8_lossy(&text)))
    }

    /// Parses the text of an authorized_keys file.
    pub fn parse(text: &str) -> AuthorizedKeys {
        let mut out = AuthorizedKeys::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match parse_line(line, i + 1) {
                Ok(k) => out.keys.push(k),
                Err(why) => out.warnings.push(format!("line {}: {why}", i + 1)),
            }
        }
        out
    }

    /// Decides whether `key`, offered from `peer` (None for non-IP transports) at `now`
    /// (seconds since the epoch), may log in. The first usable matching line wins.
    pub fn check(&self, key: &PublicKey, peer: Option<IpAddr>, now: u64) -> Verdict {
        let mut denied = None;
        for k in self.keys.iter().filter(|k| k.key.key_data() == key.key_data()) {
            if let Some(why) = &k.refused {
                denied.get_or_insert_with(|| format!("line {}: {why}", k.line));
                continue;
            }
            if let Some(exp) = k.expires {
                if now >= exp {
                    denied.get_or_insert_with(|| format!("line {}: key expired (expiry-time)", k.line));
                    continue;
                }
            }
            if let Some(patterns) = &k.from {
                let ok = peer.is_some_and(|ip| from_allows(patterns, ip));
                if !ok {
                    let who = peer.map(|p| p.to_string()).unwrap_or_else(|| "a non-IP transport".into());
                    denied.get_or_insert_with(|| format!("line {}: from= does not allow {who}", k.line));
                    continue;
                }
            }
            return Verdict::Accepted { line: k.line, permissions: k.permissions };
        }
        match denied {
            Some(why) => Verdict::Denied(why),
            None => Verdict::Unknown,
        }
    }
}

fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-sha2-") || word.starts_with("sk-")
}

fn parse_line(line: &str, number: usize) -> std::result::Result<AuthorizedKey, String> {
    let first = line.split_ascii_whitespace().next().unwrap_or_default();
    let (options, rest) = if is_key_type(first) { ("", line) } else { split_options(line)? };
    let mut words = rest.split_ascii_whitespace();
    let key_type = words.next().ok_or("no key after the options")?;
    let b64 = words.next().ok_or("no key data after the key type")?;
    let comment = words.collect::<Vec<_>>().join(" ");
    if key_type.contains("-cert-v01@openssh.com") {
        return Err(format!("certificate keys ({key_type}) are not supported"));
    }
    let key = russh::keys::parse_public_key_base64(b64).map_err(|e| format!("bad {key_type} key: {e}"))?;
    if key.algorithm().as_str() != key_type {
        return Err(format!(
            "key type {key_type} does not match the key data ({})",
            key.algorithm().as_str()
        ));
    }
    let mut k = AuthorizedKey {
        key,
        line: number,
        comment,
        from: None,
        expires: None,
        permissions: Permissions::default(),
        refused: None,
    };
    apply_options(&mut k, options)?;
    Ok(k)
}

/// Splits `opts rest` where `opts` ends at the first whitespace outside double quotes.
fn split_options(line: &str) -> std::result::Result<(&str, &str), String> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_ascii_whitespace() && !quoted => return Ok((&line[..i], line[i..].trim_start())),
            _ => {}
        }
    }
    Err(if quoted { "unterminated quote in the options".into() } else { "no key after the options".into() })
}

/// Splits the option list on commas outside quotes; values lose their quotes and escapes.
fn option_list(options: &str) -> std::result::Result<Vec<(String, Option<String>)>, String> {
    let mut out = Vec::new();
    let mut chars = options.chars().peekable();
    while chars.peek().is_some() {
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let mut value = None;
        if chars.peek() == Some(&'=') {
            chars.next();
            let mut v = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                if n != '"' {
                                    v.push('\\');
                                }
                                v.push(n);
                            }
                        }
                        '"' => {
                            closed = true;
                            break;
                        }
                        c => v.push(c),
                    }
                }
                if !closed {
                    return Err(format!("unterminated quote in option {name}"));
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    v.push(c);
                    chars.next();
                }
            }
            value = Some(v);
        }
        match chars.next() {
            None | Some(',') => {}
            Some(c) => return Err(format!("unexpected {c:?} after option {name}")),
        }
        if name.is_empty() {
            return Err("empty option".into());
        }
        out.push((name, value));
    }
    Ok(out)
}

fn apply_options(k: &mut AuthorizedKey, options: &str) -> std::result::Result<(), String> {
    if options.is_empty() {
        return Ok(());
    }
    let mut restrict = false;
    let (mut pty, mut no_pty, mut fwd, mut no_fwd) = (false, false, false, false);
    for (name, value) in option_list(options)? {
        let need = |v: &Option<String>| v.clone().ok_or_else(|| format!("option {name} needs a value"));
        match name.to_ascii_lowercase().as_str() {
            "from" => {
                let v = need(&value)?;
                k.from = Some(v.split(',').map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect());
            }
            "expiry-time" => k.expires = Some(parse_expiry(&need(&value)?)?),
            "restrict" => restrict = true,
            "pty" => pty = true,
            "no-pty" => no_pty = true,
            "port-forwarding" => fwd = true,
            "no-port-forwarding" => no_fwd = true,
            "command" => k.refused = Some("forced commands (command=) are not supported".into()),
            "cert-authority" => k.refused = Some("cert-authority keys are not supported".into()),
            "agent-forwarding"
            | "no-agent-forwarding"
            | "x11-forwarding"
            | "no-x11-forwarding"
            | "user-rc"
            | "no-user-rc"
            | "environment"
            | "principals"
            | "permitopen"
            | "permitlisten"
            | "tunnel"
            | "no-touch-required"
            | "verify-required" => {}
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    k.permissions.pty = !(no_pty || (restrict && !pty));
    k.permissions.port_forwarding = !(no_fwd || (restrict && !fwd));
    Ok(())
}

/// `YYYYMMDD[HHMM[SS]]` in UTC to seconds since the epoch.
fn parse_expiry(v: &str) -> std::result::Result<u64, String> {
    let bad = || format!("bad expiry-time {v:?} (want YYYYMMDD[HHMM[SS]])");
    if !(v.len() == 8 || v.len() == 12 || v.len() == 14) || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| v.get(r).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    let (y, m, d) = (num(0..4), num(4..6), num(6..8));
    let (hh, mm, ss) = (num(8..10), num(10..12), num(12..14));
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || hh > 23
        || mm > 59
        || ss > 60
    {
        return Err(bad());
    }
    Ok(days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// sshd's rule for a pattern list: a matching negated pattern denies, otherwise any
/// matching positive pattern allows.
fn from_allows(patterns: &[String], ip: IpAddr) -> bool {
    let text = ip.to_string();
    let mut allowed = false;
    for p in patterns {
        let (negated, pat) = match p.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        let hit =
            if pat.contains('/') { cidr_contains(pat, ip) } else { glob(pat.as_bytes(), text.as_bytes()) };
        if hit && negated {
            return false;
        }
        allowed |= hit;
    }
    allowed
}

fn cidr_contains(cidr: &str, ip: IpAddr) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else { return false };
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else { return false };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if bits <= 32 => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if bits <= 128 => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// `*` and `?` wildcards, case-insensitive, as OpenSSH's match_pattern.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p].eq_ignore_ascii_case(&s[i])) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test-only public keys (generated with ssh-keygen for these tests; no private half kept).
    const ED1: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const ED2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAILA36Davj75B3PgAJZQvcg1w0zqfFJJMRR8vb0c2K5m9";

    fn key(b64: &str) -> PublicKey {
        russh::keys::parse_public_key_base64(b64).unwrap()
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn every_key_comments_blank_lines_and_bad_lines() {
        let text = format!(
            "# my keys\n\n   \nssh-ed25519 {ED1} first@host\ngarbage line here\nssh-ed25519 {ED2} second key with spaces\n"
        );
        let ak = AuthorizedKeys::parse(&text);
        assert_eq!(ak.keys.len(), 2);
        assert_eq!(ak.keys[1].comment, "second key with spaces");
        assert_eq!(ak.warnings.len(), 1);
        assert!(ak.warnings[0].starts_with("line 5:"), "{:?}", ak.warnings);
        assert!(matches!(ak.check(&key(ED1), ip("10.0.0.1"), 0), Verdict::Accepted { line: 4, .. }));
        assert!(matches!(ak.check(&key(ED2), None, 0), Verdict::Accepted { line: 6, .. }));
    }

    #[test]
    fn unknown_key_and_type_mismatch() {
        let ak = AuthorizedKeys::parse(&format!("ssh-ed25519 {ED1}\n"));
        assert_eq!(ak.check(&key(ED2), ip("127.0.0.1"), 0), Verdict::Unknown);
        let ak = AuthorizedKeys::parse(&format!("ssh-rsa {ED1}\n"));
        assert!(ak.keys.is_empty());
        assert!(ak.warnings[0].contains("does not match"), "{:?}", ak.warnings);
    }

    #[test]
    fn options_from_and_restrictions() {
        let text = format!(
            "from=\"127.0.0.1,!10.1.2.3,10.0.0.0/8,192.168.*\",no-pty ssh-ed25519 {ED1} a\n\
             restrict,port-forwarding,environment=\"A=b c\" ssh-ed25519 {ED2} b\n"
        );
        let ak = AuthorizedKeys::parse(&text);
        assert!(ak.warnings.is_empty(), "{:?}", ak.warnings);
        let k1 = key(ED1);
        let no_pty = Permissions { pty: false, port_forwarding: true };
        assert_eq!(ak.check(&k1, ip("127.0.0.1"), 0), Verdict::Accepted { line: 1, permissions: no_pty });
        assert!(matches!(ak.check(&k1, ip("10.9.9.9"), 0), Verdict::Accepted { .. }));
        assert!(matches!(ak.check(&k1, ip("192.168.7.1"), 0), Verdict::Accepted { .. }));
        assert!(matches!(ak.check(&k1, ip("10.1.2.3"), 0), Verdict::Denied(_)));
        assert!(matches!(ak.check(&k1, ip("8.8.8.8"), 0), Verdict::Denied(_)));
        assert!(matches!(ak.check(&k1, None, 0), Verdict::Denied(_)));
        let restricted = Permissions { pty: false, port_forwarding: true };
        assert_eq!(ak.check(&key(ED2), None, 0), Verdict::Accepted { line: 2, permissions: restricted });
    }

    #[test]
    fn forced_command_and_expiry_are_not_accepted() {
        let text = format!(
            "command=\"echo hi, there\" ssh-ed25519 {ED1}\nexpiry-time=\"20200101\" ssh-ed25519 {ED2}\n"
        );
        let ak = AuthorizedKeys::parse(&text);
        assert!(ak.warnings.is_empty(), "{:?}", ak.warnings);
        assert!(matches!(ak.check(&key(ED1), None, 0), Verdict::Denied(w) if w.contains("command=")));
        let y2020 = 1_577_836_800;
        assert_eq!(parse_expiry("20200101").unwrap(), y2020);
        assert!(matches!(ak.check(&key(ED2), None, y2020 - 1), Verdict::Accepted { .. }));
        assert!(matches!(ak.check(&key(ED2), None, y2020), Verdict::Denied(_)));
    }

    #[test]
    fn bad_options_skip_only_their_line() {
        let text = format!(
            "bogus-option ssh-ed25519 {ED1}\nfrom=\"unterminated ssh-ed25519 {ED1}\nssh-ed25519 {ED2}\n"
        );
        let ak = AuthorizedKeys::parse(&text);
        assert_eq!(ak.keys.len(), 1);
        assert_eq!(ak.warnings.len(), 2, "{:?}", ak.warnings);
    }

    #[test]
    fn globs_and_cidr() {
        assert!(glob(b"127.*", b"127.0.0.1"));
        assert!(glob(b"1?7.0.0.1", b"127.0.0.1"));
        assert!(!glob(b"127.*.2", b"127.0.0.1"));
        assert!(cidr_contains("::1/128", "::1".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/8", "::1".parse().unwrap()));
        assert!(cidr_contains("0.0.0.0/0", "1.2.3.4".parse().unwrap()));
    }
}

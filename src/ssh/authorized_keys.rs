//! The `-pk` file: OpenSSH authorized_keys format, every key in it (the Go cpud reads only
//! the first).
//!
//! Each line is `[options] keytype base64 [comment]`; blank lines and `#` comments are
//! skipped, and a line that does not parse is skipped with a warning naming its number, so one
//! bad line never locks everybody out. Options are parsed as sshd(8)'s AUTHORIZED_KEYS FILE
//! FORMAT says and OpenSSH's auth-options.c does: option names are case-insensitive, values
//! must be double-quoted (`\"` is the only escape), no spaces outside quotes, a second
//! `from=`, `command=` or `principals=` makes the line unusable, the earliest `expiry-time`
//! wins, and flags apply in order (`restrict,pty` allows a pty, `pty,restrict` does not).
//! - honoured: `from="pattern-list"` (IP patterns with `*`/`?`, CIDR, `!` negation; host names
//!   are not resolved, so a name pattern never matches; patterns are taken literally, so
//!   `from="a, b"` has the pattern " b", which matches nothing, as in sshd),
//!   `expiry-time="YYYYMMDD[HHMM[SS]][Z]"` (local time, UTC with `Z`), `no-pty`,
//!   `no-port-forwarding`, `restrict` (no pty, no forwarding) with `pty` and `port-forwarding`
//!   turning them back on;
//! - refusing: a key with `command=` (forced commands are not implemented) or `cert-authority`
//!   (certificates are not accepted) is not accepted at all, rather than accepted with more
//!   rights than the file grants; so is an RSA key under 1024 bits (sshd's minimum);
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
    let key =
        crate::ssh::keys::parse_public_key_base64(b64).map_err(|e| format!("bad {key_type} key: {e}"))?;
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
    if let Some(bits) = rsa_bits(&k.key).filter(|b| *b < MIN_RSA_BITS) {
        k.refused = Some(format!("RSA key of {bits} bits (at least {MIN_RSA_BITS} needed)"));
    }
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

/// sshd's minimum RSA modulus.
pub const MIN_RSA_BITS: usize = 1024;

/// The modulus size of an RSA key; None for other key types.
pub fn rsa_bits(key: &PublicKey) -> Option<usize> {
    let rsa = key.key_data().rsa()?;
    let n = rsa.n().as_bytes();
    let n = &n[n.iter().position(|&b| b != 0).unwrap_or(n.len())..];
    Some(n.first().map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize))
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
            if chars.next() != Some('"') {
                return Err(format!("option {name}: the value must be in double quotes"));
            }
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    // sshd's only escape: \" is a quote; any other backslash stays.
                    '\\' if chars.peek() == Some(&'"') => {
                        chars.next();
                        v.push('"');
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
    let (mut pty, mut fwd) = (true, true);
    let (mut command, mut principals) = (false, false);
    for (name, value) in option_list(options)? {
        let need = |v: &Option<String>| v.clone().ok_or_else(|| format!("option {name} needs a value"));
        let twice = || format!("option {name} given twice (sshd refuses such a line)");
        let lower = name.to_ascii_lowercase();
        let takes_value = matches!(
            lower.as_str(),
            "from"
                | "expiry-time"
                | "command"
                | "environment"
                | "principals"
                | "permitopen"
                | "permitlisten"
                | "tunnel"
        );
        if value.is_some() && !takes_value {
            return Err(format!("option {name} takes no value"));
        }
        match lower.as_str() {
            "from" => {
                let v = need(&value)?;
                if k.from.is_some() {
                    return Err(twice());
                }
                k.from = Some(v.split(',').map(str::to_string).collect());
            }
            "expiry-time" => {
                let t = parse_expiry(&need(&value)?)?;
                k.expires = Some(k.expires.map_or(t, |earlier| earlier.min(t)));
            }
            "restrict" => (pty, fwd) = (false, false),
            "pty" => pty = true,
            "no-pty" => pty = false,
            "port-forwarding" => fwd = true,
            "no-port-forwarding" => fwd = false,
            "command" => {
                need(&value)?;
                if std::mem::replace(&mut command, true) {
                    return Err(twice());
                }
                k.refused = Some("forced commands (command=) are not supported".into());
            }
            "principals" => {
                need(&value)?;
                if std::mem::replace(&mut principals, true) {
                    return Err(twice());
                }
            }
            "cert-authority" => k.refused = Some("cert-authority keys are not supported".into()),
            "agent-forwarding"
            | "no-agent-forwarding"
            | "x11-forwarding"
            | "no-x11-forwarding"
            | "user-rc"
            | "no-user-rc"
            | "environment"
            | "permitopen"
            | "permitlisten"
            | "tunnel"
            | "no-touch-required"
            | "verify-required" => {}
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    k.permissions = Permissions { pty, port_forwarding: fwd };
    Ok(())
}

/// `YYYYMMDD[HHMM[SS]][Z]` to seconds since the epoch: local time, or UTC with `Z`.
fn parse_expiry(text: &str) -> std::result::Result<u64, String> {
    let bad = || format!("bad expiry-time {text:?} (want YYYYMMDD[HHMM[SS]][Z])");
    let (v, utc) = match text.strip_suffix(['Z', 'z']) {
        Some(v) => (v, true),
        None => (text, false),
    };
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
    if utc {
        Ok(days_from_civil(y, m, d) * 86400 + hh * 3600 + mm * 60 + ss)
    } else {
        local_time(y, m, d, hh, mm, ss).ok_or_else(bad)
    }
}

/// Seconds since the epoch of a local (system time zone) time, as sshd reads expiry-time.
fn local_time(y: u64, m: u64, d: u64, hh: u64, mm: u64, ss: u64) -> Option<u64> {
    // SAFETY: an all-zero `tm` is a valid value (integers and a null tm_zone pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = i32::try_from(y).ok()? - 1900;
    tm.tm_mon = i32::try_from(m).ok()? - 1;
    tm.tm_mday = i32::try_from(d).ok()?;
    tm.tm_hour = i32::try_from(hh).ok()?;
    tm.tm_min = i32::try_from(mm).ok()?;
    tm.tm_sec = i32::try_from(ss).ok()?;
    tm.tm_isdst = -1;
    // SAFETY: `tm` is a valid, exclusively borrowed struct tm; mktime only reads and
    // normalises it.
    let t = unsafe { libc::mktime(&mut tm) };
    u64::try_from(t).ok()
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
        crate::ssh::keys::parse_public_key_base64(b64).unwrap()
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
            "command=\"echo hi, there\" ssh-ed25519 {ED1}\nexpiry-time=\"20200101Z\" ssh-ed25519 {ED2}\n"
        );
        let ak = AuthorizedKeys::parse(&text);
        assert!(ak.warnings.is_empty(), "{:?}", ak.warnings);
        assert!(matches!(ak.check(&key(ED1), None, 0), Verdict::Denied(w) if w.contains("command=")));
        let y2020 = 1_577_836_800;
        assert_eq!(parse_expiry("20200101Z").unwrap(), y2020);
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

    // From sshd(8), AUTHORIZED_KEYS FILE FORMAT, and what OpenSSH's auth-options.c does.

    #[test]
    fn man_page_example_file() {
        // The example file of sshd(8), with real keys for "...".
        let text = format!(
            "# Comments are allowed at start of line. Blank lines are allowed.\n\
             # Plain key, no restrictions\n\
             ssh-ed25519 {ED1}\n\
             # Forced command, disable PTY and all forwarding\n\
             restrict,command=\"dump /home\" ssh-ed25519 {ED2}\n\
             # Restriction of ssh -L forwarding destinations\n\
             permitopen=\"192.0.2.1:80\",permitopen=\"192.0.2.2:25\" ssh-ed25519 {ED2}\n\
             # Restriction of ssh -R forwarding listeners\n\
             permitlisten=\"localhost:8080\",permitlisten=\"[::1]:22000\" ssh-ed25519 {ED2}\n\
             # Configuration for tunnel forwarding\n\
             tunnel=\"0\",command=\"sh /etc/netstart tun0\" ssh-ed25519 {ED2}\n\
             # Override of restriction to allow PTY allocation\n\
             restrict,pty,command=\"nethack\" ssh-ed25519 {ED2}\n\
             # Trust CA key, allow touch-less FIDO if requested in certificate\n\
             cert-authority,no-touch-required,principals=\"user_a\" ssh-ed25519 {ED2}\n"
        );
        let ak = AuthorizedKeys::parse(&text);
        assert!(ak.warnings.is_empty(), "{:?}", ak.warnings);
        assert_eq!(ak.keys.iter().map(|k| k.line).collect::<Vec<_>>(), [3, 5, 7, 9, 11, 13, 15]);
        assert_eq!(
            ak.check(&key(ED1), None, 0),
            Verdict::Accepted { line: 3, permissions: Permissions::default() }
        );
        // The forced-command lines are refused, the first usable ED2 line is permitopen's.
        assert_eq!(
            ak.check(&key(ED2), None, 0),
            Verdict::Accepted { line: 7, permissions: Permissions::default() }
        );
        let refused: Vec<usize> = ak.keys.iter().filter(|k| k.refused.is_some()).map(|k| k.line).collect();
        assert_eq!(refused, [5, 11, 13, 15]);
    }

    fn only_line(options: &str) -> std::result::Result<AuthorizedKey, Vec<String>> {
        let mut ak = AuthorizedKeys::parse(&format!("{options} ssh-ed25519 {ED1}\n"));
        match ak.keys.pop() {
            Some(k) => Ok(k),
            None => Err(ak.warnings),
        }
    }

    #[test]
    fn a_second_from_refuses_the_line() {
        assert!(only_line("from=\"10.9.9.9\",from=\"127.0.0.1\"").is_err());
        assert!(only_line("FROM=\"10.9.9.9\",from=\"127.0.0.1\"").is_err(), "names are case-insensitive");
        let ak = AuthorizedKeys::parse(&format!("from=\"10.9.9.9\",from=\"127.0.0.1\" ssh-ed25519 {ED1}\n"));
        assert_eq!(ak.check(&key(ED1), ip("127.0.0.1"), 0), Verdict::Unknown);
        assert!(ak.warnings[0].contains("twice"), "{:?}", ak.warnings);
        assert!(only_line("command=\"a\",command=\"b\"").is_err());
        assert!(only_line("principals=\"a\",principals=\"b\"").is_err());
        // Options that may repeat.
        only_line("permitopen=\"a:1\",permitopen=\"b:2\",environment=\"A=1\",environment=\"B=2\"")
            .expect("repeatable");
    }

    #[test]
    fn the_earliest_expiry_time_wins() {
        for opts in [
            "expiry-time=\"20200101Z\",expiry-time=\"20990101Z\"",
            "expiry-time=\"20990101Z\",expiry-time=\"20200101Z\"",
        ] {
            let k = only_line(opts).expect("parses");
            assert_eq!(k.expires, Some(1_577_836_800), "{opts}");
        }
        let ak = AuthorizedKeys::parse(&format!(
            "expiry-time=\"20200101Z\",expiry-time=\"20990101Z\" ssh-ed25519 {ED1}\n"
        ));
        assert!(
            matches!(ak.check(&key(ED1), None, 1_600_000_000), Verdict::Denied(w) if w.contains("expired"))
        );
    }

    #[test]
    fn expiry_time_forms() {
        assert_eq!(parse_expiry("20200101Z"), Ok(1_577_836_800));
        assert_eq!(parse_expiry("202001010102Z"), Ok(1_577_836_800 + 3720));
        assert_eq!(parse_expiry("20200101010203Z"), Ok(1_577_836_800 + 3723));
        // Without Z: the system time zone, within a day of UTC.
        let local = parse_expiry("20200101").expect("local");
        assert!(local.abs_diff(1_577_836_800) <= 14 * 3600, "{local}");
        for bad in ["2020010", "202001011", "20201301Z", "20200101ZZ", "2020-01-01", ""] {
            assert!(parse_expiry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_space_in_a_from_list_is_a_pattern_that_matches_nothing() {
        let ak = AuthorizedKeys::parse(&format!("from=\"10.9.9.9, 127.0.0.1\" ssh-ed25519 {ED1}\n"));
        assert!(matches!(ak.check(&key(ED1), ip("127.0.0.1"), 0), Verdict::Denied(_)));
        assert!(matches!(ak.check(&key(ED1), ip("10.9.9.9"), 0), Verdict::Accepted { .. }));
        // "No spaces are permitted, except within double quotes."
        assert!(only_line("from=\"10.9.9.9\", no-pty").is_err());
        let ak = AuthorizedKeys::parse(&format!("no-pty, no-port-forwarding ssh-ed25519 {ED1}\n"));
        assert!(ak.keys.is_empty(), "{:?}", ak.keys);
    }

    #[test]
    fn values_must_be_quoted_and_only_a_quote_is_escaped() {
        assert!(only_line("from=127.0.0.1").is_err());
        assert!(only_line("expiry-time=20990101").is_err());
        assert!(only_line("no-pty=\"yes\"").is_err());
        let k = only_line(r#"environment="A=\"quoted\" and \\n",from="127.0.0.1""#).expect("escapes");
        assert_eq!(k.from, Some(vec!["127.0.0.1".to_string()]));
        let k = only_line(r#"from="127.0.0.1,\"10.0.0.1""#).expect("escaped quote");
        assert_eq!(k.from, Some(vec!["127.0.0.1".to_string(), "\"10.0.0.1".to_string()]));
        assert!(only_line(r#"from="127.0.0.1\""#).is_err(), "the closing quote was escaped");
    }

    #[test]
    fn flags_apply_in_order() {
        let perms = |opts: &str| only_line(opts).expect("parses").permissions;
        let none = Permissions { pty: false, port_forwarding: false };
        assert_eq!(perms("restrict"), none);
        assert_eq!(perms("restrict,pty"), Permissions { pty: true, port_forwarding: false });
        assert_eq!(perms("pty,restrict"), none);
        assert_eq!(perms("no-pty,pty"), Permissions::default());
        assert_eq!(perms("pty,no-pty"), Permissions { pty: false, port_forwarding: true });
        assert_eq!(perms("RESTRICT,Port-Forwarding"), Permissions { pty: false, port_forwarding: true });
    }

    #[test]
    fn short_rsa_keys_are_refused() {
        // A 768-bit modulus (not a real key: sshd refuses it before any arithmetic), and a
        // 1024-bit key made with ssh-keygen -t rsa -b 1024 (public half only).
        const RSA768: &str = "AAAAB3NzaC1yc2EAAAADAQABAAAAYQCNEW7OFzj32T2cFyQR4guPaw1Um28DZ1oWAKNaCZlQ2Db2dcyB50716OJdlA7ZBHWVMZhdXZ3J+BgY6BGJL5Ar0j8IJBKLLzMMXH/QpqOkUGUTJw4mng038qdN5FLmtDk=";
        const RSA1024: &str = "AAAAB3NzaC1yc2EAAAADAQABAAAAgQC0iLV7bYG1RWogBjUpsB+hnPgi1lrC09g3jRfMaS7h/4XvTLKj0QMNsTU6lvkNolGr8dq4RxHXfxa1TRlYllwOXuNCn3g/CraV2gEq5hdyHil1GxNDZE5J/BS+htUCrWvzsT+X30mBm/RE9aCFxv1ffIA8N2064CZmJU6avToHgQ==";
        let ak = AuthorizedKeys::parse(&format!("ssh-rsa {RSA768}\nssh-rsa {RSA1024}\n"));
        assert!(ak.warnings.is_empty(), "{:?}", ak.warnings);
        assert_eq!(rsa_bits(&key(RSA768)), Some(768));
        assert_eq!(rsa_bits(&key(RSA1024)), Some(1024));
        assert_eq!(rsa_bits(&key(ED1)), None);
        assert!(matches!(ak.check(&key(RSA768), None, 0), Verdict::Denied(w) if w.contains("768 bits")));
        assert!(matches!(ak.check(&key(RSA1024), None, 0), Verdict::Accepted { line: 2, .. }));
    }
}

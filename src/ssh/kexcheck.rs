//! A look at the client's clear-text bytes before the first NEWKEYS, for the checks russh
//! does not make: a diffie-hellman public value must have at least two bits set (OpenSSH's
//! `dh_pub_is_valid`; russh only checks 1 < e < p-1, so it accepts e = 2, 4, 8...) and must
//! not be a negative mpint.
//!
//! [`ClearTextInspector`] is fed every byte read from a connection; it follows the
//! identification line and the unencrypted binary packets (RFC 4253 section 6, no MAC yet),
//! learns the negotiated exchange from the client's KEXINIT (the client's first algorithm
//! that cpud offers), checks SSH_MSG_KEXDH_INIT, and goes quiet after the client's NEWKEYS:
//! everything after that is encrypted and russh's business. It does no I/O and never panics
//! on input. What it cannot follow it refuses: a clear-text packet over 35000 bytes (RFC
//! 4253's minimum; no client's key exchange comes near it, but russh takes up to 256 KiB, so
//! a KEXINIT padded with made-up names would otherwise end the inspection and with it the DH
//! check and the modp gate), a malformed one, or an identification line past 1024 bytes.

use std::fmt;

const MSG_KEXINIT: u8 = 20;
const MSG_NEWKEYS: u8 = 21;
const MSG_KEXDH_INIT: u8 = 30;
/// RFC 4253: implementations must handle 35000-byte packets; russh refuses longer ones.
const MAX_CLEAR_PACKET: usize = 35_000;
/// Longest identification line we follow (RFC 4253: 255 with CR LF).
const MAX_LINE: usize = 1024;

/// Why the client's key exchange was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadKex(pub &'static str);

impl fmt::Display for BadKex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

enum Phase {
    /// Skipping lines until the identification line has ended.
    Banner { line: usize, ssh_line: bool },
    /// Collecting one packet: its 4-byte length, then that many bytes.
    Packet,
    /// After NEWKEYS, or when following is no longer possible.
    Done,
}

/// Follows a client's clear-text traffic; see the module documentation.
pub struct ClearTextInspector {
    phase: Phase,
    buf: Vec<u8>,
    /// Names of the classic (modp) diffie-hellman exchanges cpud offers.
    modp: &'static [&'static str],
    /// Every exchange cpud offers, to find the negotiated one.
    offered: Vec<String>,
    negotiated_modp: bool,
    /// Set when a modp KEXDH_INIT went by; see [`ClearTextInspector::take_modp_exchange`].
    modp_exchange: bool,
}

impl ClearTextInspector {
    /// `offered`: the server's key exchange names; `modp`: which of them are modp groups.
    pub fn new(offered: &[&str], modp: &'static [&'static str]) -> ClearTextInspector {
        ClearTextInspector {
            phase: Phase::Banner { line: 0, ssh_line: false },
            buf: Vec::new(),
            modp,
            offered: offered.iter().map(|s| s.to_string()).collect(),
            negotiated_modp: false,
            modp_exchange: false,
        }
    }

    /// Whether a valid modp KEXDH_INIT was among the bytes fed since the last call: the
    /// server is about to spend tens of milliseconds on modular exponentiation.
    pub fn take_modp_exchange(&mut self) -> bool {
        std::mem::take(&mut self.modp_exchange)
    }

    /// Whether there is nothing more to look at.
    pub fn done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Feeds bytes read from the client, in order.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), BadKex> {
        while !data.is_empty() {
            match &mut self.phase {
                Phase::Done => return Ok(()),
                Phase::Banner { line, ssh_line } => {
                    let Some((&b, rest)) = data.split_first() else { return Ok(()) };
                    data = rest;
                    if *line < 4 {
                        *ssh_line = (*line == 0 || *ssh_line) && b == b"SSH-"[*line];
                    }
                    *line += 1;
                    if b == b'\n' {
                        self.phase = if *ssh_line {
                            Phase::Packet
                        } else {
                            Phase::Banner { line: 0, ssh_line: false }
                        };
                    } else if *line > MAX_LINE {
                        self.phase = Phase::Done;
                        return Err(BadKex("identification line too long"));
                    }
                }
                Phase::Packet => {
                    let want = match self.packet_length() {
                        None => 4 - self.buf.len(),
                        Some(len) => 4 + len - self.buf.len(),
                    };
                    let take = want.min(data.len());
                    self.buf.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    match self.packet_length() {
                        Some(len) if !(2..=MAX_CLEAR_PACKET).contains(&len) => {
                            self.phase = Phase::Done;
                            return Err(BadKex("clear-text packet length out of range (2 to 35000 bytes)"));
                        }
                        Some(len) if self.buf.len() == 4 + len => {
                            let packet = std::mem::take(&mut self.buf);
                            self.packet(&packet)?;
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// The length field of the packet being collected, once its 4 bytes are in.
    fn packet_length(&self) -> Option<usize> {
        let b = self.buf.get(..4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    /// One whole packet: length, padding length, payload, padding.
    fn packet(&mut self, packet: &[u8]) -> Result<(), BadKex> {
        let Some(&pad) = packet.get(4) else { return Ok(()) };
        let Some(payload) = packet.len().checked_sub(pad as usize).and_then(|end| packet.get(5..end)) else {
            self.phase = Phase::Done;
            return Err(BadKex("clear-text packet with more padding than data"));
        };
        match payload.first() {
            Some(&MSG_KEXINIT) => {
                // cookie (16 bytes), then the first name-list: kex_algorithms.
                let names = payload.get(17..).and_then(|r| read_string(r)).map(|(s, _)| s);
                let client_kex = names.map(|n| String::from_utf8_lossy(n).into_owned()).unwrap_or_default();
                // As russh chooses: the client's first real exchange that cpud offers. The
                // pseudo-algorithms (ext-info-s, kex-strict-s-...) are in cpud's list but are no
                // exchange: one named first must not pass for the negotiated one.
                let chosen = client_kex
                    .split(',')
                    .filter(|n| !is_pseudo_kex(n))
                    .find(|n| self.offered.iter().any(|o| o == n));
                self.negotiated_modp = chosen.is_some_and(|c| self.modp.contains(&c));
            }
            Some(&MSG_KEXDH_INIT) if self.negotiated_modp => {
                let e = payload.get(1..).and_then(read_string).map(|(s, _)| s).unwrap_or_default();
                check_dh_public(e)?;
                self.modp_exchange = true;
            }
            Some(&MSG_NEWKEYS) => self.phase = Phase::Done,
            _ => {}
        }
        Ok(())
    }
}

/// Names in a kex list that signal extensions instead of naming an exchange.
fn is_pseudo_kex(name: &str) -> bool {
    name.starts_with("ext-info-") || name.starts_with("kex-strict-")
}

/// An SSH `string` (or `mpint`) at the start of `data`, and what follows it.
fn read_string(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let body = data.get(4..4 + len)?;
    Some((body, &data[4 + len..]))
}

/// OpenSSH's rule for a peer's DH public value, beyond the range check russh makes: not
/// negative, and at least two bits set (rules out 0, 1 and every power of two).
pub fn check_dh_public(mpint: &[u8]) -> Result<(), BadKex> {
    if mpint.first().is_some_and(|b| b & 0x80 != 0) {
        return Err(BadKex("invalid public DH value: negative"));
    }
    let bits: u32 = mpint.iter().map(|b| b.count_ones()).sum();
    if bits < 2 {
        return Err(BadKex("invalid public DH value: fewer than two bits set"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFERED: &[&str] =
        &["curve25519-sha256", "diffie-hellman-group14-sha256", "ext-info-s", "kex-strict-s-v00@openssh.com"];
    const MODP: &[&str] = &["diffie-hellman-group14-sha256"];

    fn string(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    fn packet(payload: &[u8]) -> Vec<u8> {
        let pad = 8 - (payload.len() + 5) % 8 + 8;
        let mut v = ((payload.len() + pad + 1) as u32).to_be_bytes().to_vec();
        v.push(pad as u8);
        v.extend_from_slice(payload);
        v.resize(v.len() + pad, 0);
        v
    }

    fn kexinit(kex: &str) -> Vec<u8> {
        let mut p = vec![MSG_KEXINIT];
        p.extend_from_slice(&[7; 16]);
        p.extend(string(kex.as_bytes()));
        for _ in 0..9 {
            p.extend(string(b"x"));
        }
        p.extend_from_slice(&[0, 0, 0, 0, 0]);
        packet(&p)
    }

    fn kexdh_init(e: &[u8]) -> Vec<u8> {
        let mut p = vec![MSG_KEXDH_INIT];
        p.extend(string(e));
        packet(&p)
    }

    fn run(chunks: &[Vec<u8>], chunk_size: usize) -> Result<(), BadKex> {
        let all: Vec<u8> = chunks.concat();
        let mut i = ClearTextInspector::new(OFFERED, MODP);
        for c in all.chunks(chunk_size) {
            i.feed(c)?;
        }
        Ok(())
    }

    fn stream(kex: &str, e: &[u8]) -> Vec<Vec<u8>> {
        vec![b"hello\r\nSSH-2.0-attacker\r\n".to_vec(), kexinit(kex), kexdh_init(e)]
    }

    #[test]
    fn dh_values_with_fewer_than_two_bits_are_refused_in_any_chunking() {
        for chunk in [1, 3, 7, 1000] {
            for bad in [&[2u8][..], &[0, 0x80, 0, 0], &[1], &[], &[0x80, 1]] {
                let r = run(&stream("diffie-hellman-group14-sha256", bad), chunk);
                assert!(r.is_err(), "{bad:?} in chunks of {chunk}");
            }
            run(&stream("diffie-hellman-group14-sha256", &[3]), chunk).expect("3 has two bits");
            run(&stream("diffie-hellman-group14-sha256", &[0, 0xff, 0xff]), chunk).expect("a real value");
        }
        let mut i = ClearTextInspector::new(OFFERED, MODP);
        let all = stream("diffie-hellman-group14-sha256", &[3]).concat();
        let (head, tail) = all.split_at(all.len() - 3);
        i.feed(head).expect("head");
        assert!(!i.take_modp_exchange(), "not yet: the packet is incomplete");
        i.feed(tail).expect("tail");
        assert!(i.take_modp_exchange());
        assert!(!i.take_modp_exchange(), "reported once");
    }

    #[test]
    fn only_a_negotiated_modp_exchange_is_checked() {
        // curve25519 first in the client's list: message 30 is ECDH_INIT, a 32-byte string.
        run(&stream("curve25519-sha256,diffie-hellman-group14-sha256", &[2]), 5).expect("not DH");
        // An exchange cpud does not offer is skipped when choosing.
        assert!(run(&stream("diffie-hellman-group18-sha512,diffie-hellman-group14-sha256", &[2]), 5).is_err());
        // So are the pseudo-algorithms, which cpud's list holds but which name no exchange.
        for first in ["ext-info-s", "kex-strict-s-v00@openssh.com", "ext-info-c"] {
            let kex = format!("{first},diffie-hellman-group14-sha256");
            assert!(run(&stream(&kex, &[2]), 5).is_err(), "{first} first");
        }
    }

    #[test]
    fn inspection_stops_at_newkeys_and_refuses_what_it_cannot_follow() {
        let mut s = vec![b"SSH-2.0-x\r\n".to_vec(), kexinit("diffie-hellman-group14-sha256")];
        s.push(packet(&[MSG_NEWKEYS]));
        s.push(kexdh_init(&[2])); // encrypted in real life: not looked at
        run(&s, 4).expect("after NEWKEYS");
        let mut i = ClearTextInspector::new(OFFERED, MODP);
        assert!(i.feed(b"SSH-2.0-x\r\n\xff\xff\xff\xff").is_err(), "huge length");
        assert!(i.done());
        let mut i = ClearTextInspector::new(OFFERED, MODP);
        assert!(i.feed(&[b'a'; 2000]).is_err(), "endless line");
        // Just over RFC 4253's 35000 bytes: refused, whatever it holds.
        let mut big = vec![0u8; 5];
        big[..4].copy_from_slice(&35_001u32.to_be_bytes());
        let mut i = ClearTextInspector::new(OFFERED, MODP);
        assert!(i.feed(&[b"SSH-2.0-x\r\n".as_slice(), &big].concat()).is_err(), "35001 bytes");
        // A packet whose padding claims more than it holds.
        let mut i = ClearTextInspector::new(OFFERED, MODP);
        let bad = [0, 0, 0, 8, 200, 20, 0, 0, 0, 0, 0, 0];
        assert!(i.feed(&[b"SSH-2.0-x\r\n".as_slice(), &bad].concat()).is_err(), "padding");
        // 35000 bytes is fine.
        let payload = [&[MSG_KEXINIT][..], &vec![0u8; 35_000 - 1 - 8 - 1][..]].concat();
        let mut p = 35_000u32.to_be_bytes().to_vec();
        p.push(8);
        p.extend_from_slice(&payload);
        p.extend_from_slice(&[0; 8]);
        let mut i = ClearTextInspector::new(OFFERED, MODP);
        i.feed(&[b"SSH-2.0-x\r\n".as_slice(), &p].concat()).expect("35000 bytes");
        assert!(!i.done());
    }
}

//! Browsing for decpud announcements: ask mDNS for `<type>.<domain>.` for a bounded time and
//! turn each resolved instance into a [`Candidate`] (addresses, SRV port, TXT map).
//!
//! Announcements come from other machines: a malformed TXT entry (empty or non-ASCII key,
//! value that is not UTF-8, non-numeric value for a key decpud computes as a number) is
//! dropped with a warning, never a failure. IPv6 link-local addresses are skipped because
//! mDNS answers carry no zone, and an address without one cannot be dialed (Go's decpu
//! dials it anyway: pitfall P24).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::error::{Error, Result};

/// How long decpu listens for answers (Go: exactly 1 s; the extra half second lets a lost
/// first query be retried once).
pub const DEFAULT_BROWSE_TIME: Duration = Duration::from_millis(1500);

/// TXT keys decpud fills with numbers; anything else in them is a malformed record.
const NUMERIC_KEYS: [&str; 5] = ["cores", "cpu.pcnt", "mem.avail", "mem.total", "tenants"];

/// One announced server.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// `<instance>.<type>.<domain>.`
    pub fullname: String,
    /// SRV target host name.
    pub host: String,
    /// SRV port.
    pub port: u16,
    /// Addresses to dial, best first: IPv4, then routable IPv6.
    pub addresses: Vec<IpAddr>,
    /// Addresses that cannot be dialed (IPv6 link-local without a zone).
    pub skipped_addresses: Vec<IpAddr>,
    /// The TXT record, malformed entries removed.
    pub txt: BTreeMap<String, String>,
}

impl Candidate {
    /// Builds a candidate from a resolved mDNS service, logging what was dropped.
    pub fn from_service(info: &ServiceInfo) -> Candidate {
        let fullname = info.get_fullname().to_string();
        let entries = info.get_properties().iter().map(|p| (p.key(), p.val()));
        let (txt, warnings) = clean_txt(entries);
        for w in warnings {
            log::warn!("dnssd: {fullname}: ignoring malformed TXT entry: {w}");
        }
        let (addresses, skipped_addresses) = usable_addresses(info.get_addresses().iter().copied());
        Candidate {
            fullname,
            host: info.get_hostname().to_string(),
            port: info.get_port(),
            addresses,
            skipped_addresses,
            txt,
        }
    }

    /// A short name for messages: the instance, without the type and domain.
    pub fn instance(&self) -> &str {
        self.fullname.split("._").next().unwrap_or(&self.fullname)
    }
}

/// Keeps the well-formed TXT entries; returns the reasons for the others.
///
/// A key without `=` (an RFC 6763 boolean attribute) is kept with an empty value.
pub fn clean_txt<'a>(
    entries: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut txt = BTreeMap::new();
    let mut warnings = Vec::new();
    for (key, value) in entries {
        if key.is_empty() {
            warnings.push("empty key".to_string());
            continue;
        }
        if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            warnings.push(format!("key {key:?} is not printable ASCII"));
            continue;
        }
        let value = match value.map(std::str::from_utf8) {
            None => String::new(),
            Some(Ok(v)) => v.to_string(),
            Some(Err(_)) => {
                warnings.push(format!("{key}: value is not UTF-8"));
                continue;
            }
        };
        if NUMERIC_KEYS.contains(&key) && value.parse::<f64>().map_or(true, f64::is_nan) {
            warnings.push(format!("{key}={value:?} is not a number"));
            continue;
        }
        if txt.contains_key(key) {
            warnings.push(format!("{key} appears more than once; the first one counts"));
            continue;
        }
        txt.insert(key.to_string(), value);
    }
    (txt, warnings)
}

/// Splits addresses into dialable ones (IPv4 first, then IPv6, each sorted) and skipped ones.
pub fn usable_addresses(addrs: impl Iterator<Item = IpAddr>) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let (mut good, mut skipped): (Vec<IpAddr>, Vec<IpAddr>) = addrs.partition(|a| match a {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_multicast() && !v4.is_broadcast(),
        // fe80::/10: link-local, needs a zone that mDNS does not carry.
        IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_multicast() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    });
    good.sort_by_key(|a| (a.is_ipv6(), *a));
    skipped.sort();
    (good, skipped)
}

/// Browses `browse_name` (e.g. `_ncpu._tcp.local.`) for `duration` and returns every resolved
/// instance in the order first seen. With `stop_at` (a full instance name), returns as soon
/// as that instance has been resolved to an address that can be dialed.
pub fn browse(browse_name: &str, duration: Duration, stop_at: Option<&str>) -> Result<Vec<Candidate>> {
    let daemon =
        ServiceDaemon::new().map_err(|e| Error::Connect(format!("dnssd: cannot start mDNS: {e}")))?;
    let result = collect(&daemon, browse_name, duration, stop_at);
    if let Ok(done) = daemon.shutdown() {
        let _ = done.recv_timeout(Duration::from_secs(1));
    }
    result
}

fn collect(
    daemon: &ServiceDaemon,
    browse_name: &str,
    duration: Duration,
    stop_at: Option<&str>,
) -> Result<Vec<Candidate>> {
    let events = daemon
        .browse(browse_name)
        .map_err(|e| Error::Usage(format!("dnssd: cannot browse {browse_name:?}: {e}")))?;
    let deadline = Instant::now() + duration;
    let mut found: Vec<Candidate> = Vec::new();
    let mut removed: HashSet<String> = HashSet::new();
    while let Ok(event) = events.recv_deadline(deadline) {
        match event {
            ServiceEvent::ServiceResolved(info) => {
                let candidate = Candidate::from_service(&info);
                let key = candidate.fullname.to_ascii_lowercase();
                removed.remove(&key);
                // Stop early only once it can be dialed: the A record may come after the AAAA.
                let done = !candidate.addresses.is_empty()
                    && stop_at.is_some_and(|s| s.eq_ignore_ascii_case(&candidate.fullname));
                match found.iter_mut().find(|c| c.fullname.eq_ignore_ascii_case(&candidate.fullname)) {
                    Some(old) => *old = candidate,
                    None => found.push(candidate),
                }
                if done {
                    break;
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                removed.insert(fullname.to_ascii_lowercase());
            }
            _ => {}
        }
    }
    let _ = daemon.stop_browse(browse_name);
    found.retain(|c| !removed.contains(&c.fullname.to_ascii_lowercase()));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn malformed_txt_entries_are_dropped_with_reasons() {
        let bad_utf8: &[u8] = &[0xff, 0xfe];
        let entries: Vec<(&str, Option<&[u8]>)> = vec![
            ("arch", Some(b"amd64")),
            ("", Some(b"x")),
            ("k\u{e9}y", Some(b"x")),
            ("near", Some(bad_utf8)),
            ("tenants", Some(b"lots")),
            ("cores", Some(b"8")),
            ("flag", None),
            ("arch", Some(b"arm64")),
        ];
        let (txt, warnings) = clean_txt(entries.into_iter());
        assert_eq!(
            txt,
            [("arch", "amd64"), ("cores", "8"), ("flag", "")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        );
        assert_eq!(
            warnings,
            vec![
                "empty key".to_string(),
                "key \"k\u{e9}y\" is not printable ASCII".to_string(),
                "near: value is not UTF-8".to_string(),
                "tenants=\"lots\" is not a number".to_string(),
                "arch appears more than once; the first one counts".to_string(),
            ]
        );
    }

    #[test]
    fn link_local_ipv6_is_skipped_and_ipv4_comes_first() {
        let v6 = IpAddr::V6("2001:db8::5".parse::<Ipv6Addr>().unwrap());
        let ll = IpAddr::V6("fe80::1".parse::<Ipv6Addr>().unwrap());
        let a = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 3));
        let b = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2));
        let (good, skipped) = usable_addresses([ll, v6, a, b].into_iter());
        assert_eq!(good, vec![b, a, v6]);
        assert_eq!(skipped, vec![ll]);
    }
}

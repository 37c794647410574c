//! Browsing for decpud announcements: ask mDNS for `<type>.<domain>.` for a bounded time and
//! turn each resolved instance into a [`Candidate`] (addresses, SRV port, TXT map).
//!
//! Announcements come from other machines: a malformed TXT entry (empty or non-ASCII key,
//! value that is not UTF-8, non-numeric value for a key decpud computes as a number) is
//! dropped with a warning, never a failure.
//!
//! Addresses are dialed IPv4 first, then routable IPv6, then IPv6 link-local. A link-local
//! address needs a zone (the interface) that mDNS answers do not carry (Go's decpu dials it
//! without one and fails: pitfall P24); the mDNS library we use does not say which interface
//! an answer came in on either, so a link-local address is tried through each browsed
//! interface that has a link-local address of its own (usually exactly one). decpud
//! announces link-local addresses only where it has nothing else.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

use crate::discovery::interfaces;
use crate::error::{Error, Result};

/// How long decpu listens for answers (Go: exactly 1 s; the extra half second lets a lost
/// first query be retried once).
pub const DEFAULT_BROWSE_TIME: Duration = Duration::from_millis(1500);

/// When nothing usable has turned up within the browse time, decpu listens until this long
/// after the start before giving up: the mDNS library queries at 0 s, 1 s and 3 s, so this
/// covers one more query and its answers. Costs nothing when a server answers in time.
pub const EXTENDED_BROWSE_TIME: Duration = Duration::from_millis(3500);

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
    /// Addresses that can be dialed as they are, best first: IPv4, then routable IPv6.
    pub addresses: Vec<IpAddr>,
    /// IPv6 link-local addresses: dialable only with a zone from `zones`.
    pub link_local: Vec<Ipv6Addr>,
    /// Interfaces a link-local address may be reached through (the browsed interfaces with a
    /// link-local address of their own), best guess first.
    pub zones: Vec<String>,
    /// The TXT record, malformed entries removed.
    pub txt: BTreeMap<String, String>,
}

impl Candidate {
    /// Builds a candidate from a resolved mDNS service, logging what was dropped.
    pub fn from_service(info: &ServiceInfo, zones: &[String]) -> Candidate {
        let fullname = info.get_fullname().to_string();
        let entries = info.get_properties().iter().map(|p| (p.key(), p.val()));
        let (txt, warnings) = clean_txt(entries);
        for w in warnings {
            log::warn!("dnssd: {fullname}: ignoring malformed TXT entry: {w}");
        }
        let (addresses, link_local) = usable_addresses(info.get_addresses().iter().copied());
        Candidate {
            fullname,
            host: info.get_hostname().to_string(),
            port: info.get_port(),
            addresses,
            link_local,
            zones: zones.to_vec(),
            txt,
        }
    }

    /// What to dial, in order: the addresses, then each link-local address through each zone
    /// (`fe80::1%eth0`, which the resolver turns into a scope id).
    pub fn dial_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        for ll in &self.link_local {
            hosts.extend(self.zones.iter().map(|zone| format!("{ll}%{zone}")));
        }
        hosts
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
        if NUMERIC_KEYS.contains(&key) && crate::flags::parse_decimal(&value).is_none() {
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

/// Splits addresses into ones dialable as they are (IPv4 first, then IPv6, each sorted) and
/// IPv6 link-local ones (sorted); unspecified, multicast and broadcast addresses are dropped.
pub fn usable_addresses(addrs: impl Iterator<Item = IpAddr>) -> (Vec<IpAddr>, Vec<Ipv6Addr>) {
    let mut good = Vec::new();
    let mut link_local = Vec::new();
    for a in addrs {
        match a {
            IpAddr::V4(v4) if !v4.is_unspecified() && !v4.is_multicast() && !v4.is_broadcast() => {
                good.push(a)
            }
            IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => {}
            IpAddr::V6(v6) if interfaces::is_link_local(&v6) => link_local.push(v6),
            IpAddr::V6(_) => good.push(a),
            IpAddr::V4(_) => {}
        }
    }
    good.sort_by_key(|a| (a.is_ipv6(), *a));
    good.dedup();
    link_local.sort();
    link_local.dedup();
    (good, link_local)
}

/// Browses `browse_name` (e.g. `_ncpu._tcp.local.`) for `duration` and returns every resolved
/// instance in the order first seen. With `stop_at` (a full instance name), returns as soon
/// as that instance has been resolved to an address that can be dialed. If no instance that
/// `usable` accepts has been seen by the end of `duration`, listens on until
/// [`EXTENDED_BROWSE_TIME`] (or returns as soon as one turns up then).
///
/// `interface` restricts browsing to one interface (`-dsInterface`); empty: every interface
/// that is up and multicast-capable, loopback included.
pub fn browse(
    browse_name: &str,
    duration: Duration,
    stop_at: Option<&str>,
    interface: &str,
    usable: &dyn Fn(&Candidate) -> bool,
) -> Result<Vec<Candidate>> {
    let chosen = interfaces::choose(interface)?;
    let zones: Vec<String> = chosen
        .iter()
        .filter(|i| !i.loopback && i.link_local().next().is_some())
        .map(|i| i.name.clone())
        .collect();
    let daemon =
        ServiceDaemon::new().map_err(|e| Error::Connect(format!("dnssd: cannot start mDNS: {e}")))?;
    let result = interfaces::apply(&daemon, &interfaces::browse_plan(&chosen))
        .and_then(|()| collect(&daemon, browse_name, (duration, stop_at), &zones, usable));
    if let Ok(done) = daemon.shutdown() {
        let _ = done.recv_timeout(Duration::from_secs(1));
    }
    result
}

fn collect(
    daemon: &ServiceDaemon,
    browse_name: &str,
    (duration, stop_at): (Duration, Option<&str>),
    zones: &[String],
    usable: &dyn Fn(&Candidate) -> bool,
) -> Result<Vec<Candidate>> {
    let events = daemon
        .browse(browse_name)
        .map_err(|e| Error::Usage(format!("dnssd: cannot browse {browse_name:?}: {e}")))?;
    let start = Instant::now();
    let first_deadline = start + duration;
    let last_deadline = start + duration.max(EXTENDED_BROWSE_TIME);
    let mut deadline = first_deadline;
    let mut found: Vec<Candidate> = Vec::new();
    let mut removed: HashSet<String> = HashSet::new();
    let any_usable = |found: &[Candidate], removed: &HashSet<String>| {
        found.iter().any(|c| !removed.contains(&c.fullname.to_ascii_lowercase()) && usable(c))
    };
    loop {
        let Ok(event) = events.recv_deadline(deadline) else {
            if deadline == first_deadline && last_deadline > first_deadline && !any_usable(&found, &removed) {
                log::debug!(
                    "dnssd: no usable server after {duration:?}; listening up to {EXTENDED_BROWSE_TIME:?} in all"
                );
                deadline = last_deadline;
                continue;
            }
            break;
        };
        match event {
            ServiceEvent::ServiceResolved(info) => {
                let candidate = Candidate::from_service(&info, zones);
                let key = candidate.fullname.to_ascii_lowercase();
                removed.remove(&key);
                // Stop early only once it can be dialed: the A record may come after the AAAA.
                let done = !candidate.dial_hosts().is_empty()
                    && stop_at.is_some_and(|s| s.eq_ignore_ascii_case(&candidate.fullname));
                match found.iter_mut().find(|c| c.fullname.eq_ignore_ascii_case(&candidate.fullname)) {
                    Some(old) => *old = candidate,
                    None => found.push(candidate),
                }
                // In the extra time, the first usable server ends the wait.
                if done || (deadline != first_deadline && any_usable(&found, &removed)) {
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
    if deadline != first_deadline {
        log::debug!("dnssd: browsed for {:?}", start.elapsed());
    }
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
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let a = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 3));
        let b = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2));
        let multicast = IpAddr::V4(Ipv4Addr::new(224, 0, 0, 251));
        let (good, link_local) = usable_addresses([IpAddr::V6(ll), v6, a, b, multicast, a].into_iter());
        assert_eq!(good, vec![b, a, v6]);
        assert_eq!(link_local, vec![ll]);
    }

    #[test]
    fn dial_order_is_ipv4_global_ipv6_then_link_local_through_each_zone() {
        let c = Candidate {
            fullname: "x._ncpu._tcp.local.".into(),
            host: "x.local.".into(),
            port: 17010,
            addresses: vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            link_local: vec!["fe80::1".parse().unwrap()],
            zones: vec!["eth0".into(), "usb0".into()],
            txt: BTreeMap::new(),
        };
        assert_eq!(c.dial_hosts(), ["10.0.0.1", "2001:db8::1", "fe80::1%eth0", "fe80::1%usb0"]);
        let alone = Candidate { addresses: Vec::new(), zones: Vec::new(), ..c };
        assert!(alone.dial_hosts().is_empty(), "a link-local address without a zone is not dialed");
    }
}

//! The network interfaces DNS-SD runs on, as the calling process's network namespace sees
//! them, and how they are handed to the mDNS library.
//!
//! Interfaces are listed with getifaddrs(3) and names resolved with if_nametoindex(3): both
//! ask the kernel about the caller's own network namespace. /sys/class/net is never used: it
//! shows the namespace sysfs was mounted in, which is the wrong one under `nsenter -n`.
//!
//! By default every interface that is up and multicast-capable is used, loopback included
//! (as Go's DNS-SD library does: `ip link set lo multicast on` makes lo one of them); the
//! mDNS library leaves loopback out unless asked, so it is always told. `-dsInterface` names
//! the one interface to use. decpu browses what is there now ([`choose`], [`browse_plan`]);
//! decpud also announces on what comes up later ([`announce_plan`]).

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use mdns_sd::{IfKind, ServiceDaemon};

use crate::error::{Error, Result};

/// One network interface and its IP addresses.
#[derive(Debug, Clone, PartialEq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub up: bool,
    pub multicast: bool,
    pub loopback: bool,
    /// In the kernel's order.
    pub addresses: Vec<IpAddr>,
}

impl Interface {
    /// IPv6 link-local addresses (fe80::/10): usable only with this interface as their zone.
    pub fn link_local(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.addresses.iter().filter_map(|a| match a {
            IpAddr::V6(v6) if is_link_local(v6) => Some(*v6),
            _ => None,
        })
    }

    /// Whether the interface has an address a peer can dial without knowing the interface.
    pub fn has_routable(&self) -> bool {
        self.addresses.iter().any(|a| match a {
            IpAddr::V4(_) => true,
            IpAddr::V6(v6) => !is_link_local(v6),
        })
    }
}

/// fe80::/10.
pub fn is_link_local(v6: &Ipv6Addr) -> bool {
    (v6.segments()[0] & 0xffc0) == 0xfe80
}

/// Every interface of this network namespace that has at least one IP address, in the
/// kernel's order.
pub fn list() -> Result<Vec<Interface>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we own into `head`; freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::io("dnssd: listing network interfaces", std::io::Error::last_os_error()));
    }
    let mut found: Vec<Interface> = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: ifa_addr is null or points to a sockaddr of the family it names.
        let Some(address) = (unsafe { ip_of(entry.ifa_addr) }) else { continue };
        let flags = entry.ifa_flags;
        match found.iter_mut().find(|i| i.name == name) {
            Some(known) => known.addresses.push(address),
            None => found.push(Interface {
                index: name_to_index(&name).unwrap_or(0),
                name,
                up: flags & libc::IFF_UP as u32 != 0,
                multicast: flags & libc::IFF_MULTICAST as u32 != 0,
                loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
                addresses: vec![address],
            }),
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

/// The IP address in a sockaddr, if it is one.
///
/// # Safety
/// `sa` must be null or point to a valid sockaddr whose length fits its family.
unsafe fn ip_of(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    match i32::from((*sa).sa_family) {
        libc::AF_INET => {
            let v4 = &*(sa as *const libc::sockaddr_in);
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
        }
        libc::AF_INET6 => {
            let v6 = &*(sa as *const libc::sockaddr_in6);
            Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}

/// The index of interface `name` in this network namespace (if_nametoindex), None if absent.
pub fn name_to_index(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interfaces decpu browses: `wanted` alone (`-dsInterface`), or, when empty, every
/// interface that is up, multicast-capable and has an address. Anything else is an error
/// that says what to do.
pub fn choose(wanted: &str) -> Result<Vec<Interface>> {
    choose_from(wanted, list()?, name_to_index(wanted).is_some())
}

/// [`choose`] over a given list; `exists` says whether if_nametoindex knows `wanted`.
pub fn choose_from(wanted: &str, all: Vec<Interface>, exists: bool) -> Result<Vec<Interface>> {
    if wanted.is_empty() {
        let chosen: Vec<Interface> = all.into_iter().filter(|i| i.up && i.multicast).collect();
        if chosen.is_empty() {
            return Err(Error::Connect(
                "dnssd: no network interface is up and multicast-capable (for loopback only: \
                 ip link set lo multicast on)"
                    .into(),
            ));
        }
        return Ok(chosen);
    }
    let Some(found) = all.into_iter().find(|i| i.name == wanted) else {
        return Err(Error::Usage(if exists {
            format!("dnssd: network interface {wanted:?} has no IP address")
        } else {
            format!("dnssd: no network interface {wanted:?} in this network namespace")
        }));
    };
    if !found.up {
        return Err(Error::Usage(format!("dnssd: network interface {wanted:?} is down")));
    }
    if !found.multicast {
        return Err(Error::Usage(format!(
            "dnssd: network interface {wanted:?} is not multicast-capable (ip link set {wanted} multicast on)"
        )));
    }
    Ok(vec![found])
}

/// Interface selections for the mDNS library, applied in order (a later one wins where both
/// match), and what to warn about.
#[derive(Debug, Default)]
pub struct Plan {
    /// (enable, kind) steps.
    pub steps: Vec<(bool, IfKind)>,
    pub warnings: Vec<String>,
    /// For `-d`: which interfaces, in words.
    pub summary: String,
}

/// Browsing: exactly the `chosen` interfaces (loopback included), every address of theirs.
pub fn browse_plan(chosen: &[Interface]) -> Plan {
    let mut steps = vec![(false, IfKind::All)];
    steps.extend(chosen.iter().map(|i| (true, IfKind::Name(i.name.clone()))));
    let names: Vec<&str> = chosen.iter().map(|i| i.name.as_str()).collect();
    Plan { steps, warnings: Vec::new(), summary: names.join(", ") }
}

/// Announcing (decpud) on `wanted`, or on every interface when it is empty, given this
/// namespace's interfaces `all` and whether if_nametoindex knows `wanted`.
///
/// decpud may start before its network is configured (PID 1 on a board, DHCP later), so
/// only a name that does not exist is an error: an interface that is down or has no address
/// yet is announced on once it is ready (the library rescans addresses), with a warning. By
/// default every interface is used, including ones that appear later (the library's own
/// default), plus the loopback interfaces that are up and multicast-capable, which the
/// library leaves out unless asked.
///
/// IPv6 link-local addresses are left out on interfaces that have another address: a peer
/// that gets a link-local address cannot tell its zone (Go's decpu dials it and fails).
pub fn announce_plan(wanted: &str, all: &[Interface], exists: bool) -> Result<Plan> {
    let mut plan = Plan::default();
    let considered: Vec<&Interface> = if wanted.is_empty() {
        let loopbacks: Vec<&Interface> = all.iter().filter(|i| i.loopback && i.up && i.multicast).collect();
        plan.steps.extend(loopbacks.iter().map(|i| (true, IfKind::Name(i.name.clone()))));
        let mut names = vec!["all".to_string()];
        names.extend(loopbacks.iter().map(|i| i.name.clone()));
        plan.summary = names.join(", ");
        all.iter().collect()
    } else {
        if !exists {
            return Err(Error::Usage(format!(
                "dnssd: no network interface {wanted:?} in this network namespace"
            )));
        }
        plan.steps.push((false, IfKind::All));
        plan.steps.push((true, IfKind::Name(wanted.to_string())));
        plan.summary = wanted.to_string();
        let found = all.iter().find(|i| i.name == wanted);
        let not_ready = match found {
            None => Some("has no IP address yet"),
            Some(i) if !i.up => Some("is down"),
            Some(i) if !i.multicast => Some("is not multicast-capable (ip link set IF multicast on)"),
            Some(_) => None,
        };
        if let Some(why) = not_ready {
            plan.warnings.push(format!(
                "dnssd: network interface {wanted:?} {}; announcing once it is ready",
                why.replace("IF", wanted)
            ));
        }
        found.into_iter().collect()
    };
    let drop: BTreeSet<Ipv6Addr> = considered
        .iter()
        .filter(|i| i.has_routable())
        .flat_map(|i| i.link_local().collect::<Vec<_>>())
        .collect();
    plan.steps.extend(drop.into_iter().map(|a| (false, IfKind::Addr(IpAddr::V6(a)))));
    Ok(plan)
}

/// Hands `plan` to `daemon` (consecutive steps of one kind in one call), logging its
/// warnings.
pub fn apply(daemon: &ServiceDaemon, plan: &Plan) -> Result<()> {
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    let mut rest = plan.steps.as_slice();
    while let Some((enable, _)) = rest.first() {
        let run = rest.iter().take_while(|(e, _)| e == enable).count();
        let kinds: Vec<IfKind> = rest[..run].iter().map(|(_, k)| k.clone()).collect();
        let done = if *enable { daemon.enable_interface(kinds) } else { daemon.disable_interface(kinds) };
        done.map_err(|e| Error::Daemon(format!("dnssd: cannot select interfaces {}: {e}", plan.summary)))?;
        rest = &rest[run..];
    }
    log::debug!("dnssd: interfaces {}", plan.summary);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(name: &str, up: bool, multicast: bool, addrs: &[&str]) -> Interface {
        Interface {
            name: name.into(),
            index: 1,
            up,
            multicast,
            loopback: name == "lo",
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn default_choice_is_every_up_multicast_interface_loopback_included() {
        let all = vec![
            iface("lo", true, true, &["127.0.0.1", "::1"]),
            iface("eth0", true, true, &["10.0.0.2", "fe80::1"]),
            iface("eth1", false, true, &["10.1.0.2"]),
            iface("tun0", true, false, &["10.2.0.2"]),
        ];
        let names: Vec<String> =
            choose_from("", all.clone(), false).unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["lo", "eth0"]);
        let e = choose_from("", vec![iface("lo", true, false, &["127.0.0.1"])], false).unwrap_err();
        assert!(e.to_string().contains("ip link set lo multicast on"), "{e}");
    }

    #[test]
    fn a_named_interface_must_exist_be_up_and_multicast() {
        let all = vec![
            iface("lo", true, false, &["127.0.0.1"]),
            iface("eth0", true, true, &["10.0.0.2"]),
            iface("eth1", false, true, &["10.1.0.2"]),
        ];
        assert_eq!(choose_from("eth0", all.clone(), true).unwrap()[0].name, "eth0");
        let err = |name: &str, exists: bool| choose_from(name, all.clone(), exists).unwrap_err().to_string();
        assert_eq!(err("vref0", false), "dnssd: no network interface \"vref0\" in this network namespace");
        assert_eq!(err("vref0", true), "dnssd: network interface \"vref0\" has no IP address");
        assert_eq!(err("eth1", true), "dnssd: network interface \"eth1\" is down");
        assert_eq!(
            err("lo", true),
            "dnssd: network interface \"lo\" is not multicast-capable (ip link set lo multicast on)"
        );
    }

    fn show(plan: &Plan) -> Vec<String> {
        plan.steps.iter().map(|(on, k)| format!("{}{k:?}", if *on { "+" } else { "-" })).collect()
    }

    #[test]
    fn browsing_uses_exactly_the_chosen_interfaces() {
        let chosen = vec![iface("lo", true, true, &["127.0.0.1"]), iface("eth0", true, true, &["fe80::1"])];
        let plan = browse_plan(&chosen);
        assert_eq!(show(&plan), ["-All", "+Name(\"lo\")", "+Name(\"eth0\")"]);
        assert_eq!(plan.summary, "lo, eth0");
    }

    #[test]
    fn announcing_leaves_out_link_local_only_where_another_address_exists() {
        let all = vec![
            iface("lo", true, true, &["127.0.0.1", "::1"]),
            iface("eth0", true, true, &["10.0.0.2", "fe80::1"]),
            iface("usb0", true, true, &["fe80::2"]),
            iface("eth1", true, true, &["2001:db8::3", "fe80::3"]),
        ];
        let plan = announce_plan("", &all, false).unwrap();
        assert_eq!(show(&plan), ["+Name(\"lo\")", "-Addr(fe80::1)", "-Addr(fe80::3)"]);
        assert_eq!(plan.summary, "all, lo");
        assert!(plan.warnings.is_empty());
        let plan = announce_plan("usb0", &all, true).unwrap();
        assert_eq!(show(&plan), ["-All", "+Name(\"usb0\")"]);
        let plan = announce_plan("eth0", &all, true).unwrap();
        assert_eq!(show(&plan), ["-All", "+Name(\"eth0\")", "-Addr(fe80::1)"]);
        // A loopback without multicast stays out, as the library has it.
        let quiet_lo = vec![iface("lo", true, false, &["127.0.0.1"])];
        assert!(show(&announce_plan("", &quiet_lo, false).unwrap()).is_empty());
    }

    #[test]
    fn announcing_on_an_interface_that_is_not_ready_warns_and_waits() {
        let all = vec![iface("eth0", false, true, &["10.0.0.2"]), iface("lo", true, false, &["127.0.0.1"])];
        let warning = |name: &str, exists: bool| announce_plan(name, &all, exists).unwrap().warnings.join("");
        assert_eq!(
            warning("eth0", true),
            "dnssd: network interface \"eth0\" is down; announcing once it is ready"
        );
        assert_eq!(
            warning("wlan0", true),
            "dnssd: network interface \"wlan0\" has no IP address yet; announcing once it is ready"
        );
        assert_eq!(
            warning("lo", true),
            "dnssd: network interface \"lo\" is not multicast-capable (ip link set lo multicast on); \
             announcing once it is ready"
        );
        let e = announce_plan("vref0", &all, false).unwrap_err();
        assert_eq!(e.to_string(), "dnssd: no network interface \"vref0\" in this network namespace");
    }

    #[test]
    fn this_namespace_lists_its_loopback_by_kernel_calls() {
        let all = list().unwrap();
        let lo = all.iter().find(|i| i.loopback);
        // Every Linux network namespace has lo; it has 127.0.0.1 once it is up.
        if let Some(lo) = lo {
            assert_eq!(Some(lo.index), name_to_index(&lo.name));
        }
        assert_eq!(name_to_index("no-such-if0"), None);
    }
}

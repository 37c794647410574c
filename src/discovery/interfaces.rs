//! The network interfaces DNS-SD runs on, as the calling process's network namespace sees
//! them, and how they are handed to the mDNS library.
//!
//! Interfaces are listed with getifaddrs(3) and names resolved with if_nametoindex(3): both
//! ask the kernel about the caller's own network namespace. /sys/class/net is never used: it
//! shows the namespace sysfs was mounted in, which is the wrong one under `nsenter -n`.
//!
//! By default every interface that is up and multicast-capable is used, loopback included
//! (as Go's DNS-SD library does: `ip link set lo multicast on` makes lo one of them); the
//! mDNS library leaves loopback out unless asked, so the choice is always spelled out to it.

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

/// The interfaces DNS-SD uses: `wanted` alone (`-dsInterface`), or, when empty, every
/// interface that is up, multicast-capable and has an address.
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

/// Which addresses an mDNS daemon binds to (and, announcing, announces).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkLocal {
    /// Every address of the chosen interfaces (browsing).
    Keep,
    /// Leave out IPv6 link-local addresses of interfaces that have another address: a peer
    /// that gets a link-local address cannot tell its zone (Go's decpu dials it and fails).
    OnlyWhenAlone,
}

/// The mDNS library's interface selections for `chosen`, in the order to apply them (later
/// ones win): everything off, the chosen interfaces on by name (loopback included), then,
/// with [`LinkLocal::OnlyWhenAlone`], the link-local addresses that are not needed off.
pub fn selections(chosen: &[Interface], link_local: LinkLocal) -> (Vec<IfKind>, Vec<IfKind>) {
    let enable: Vec<IfKind> = chosen.iter().map(|i| IfKind::Name(i.name.clone())).collect();
    let mut disable = vec![IfKind::All];
    if link_local == LinkLocal::OnlyWhenAlone {
        let drop: BTreeSet<Ipv6Addr> = chosen
            .iter()
            .filter(|i| i.has_routable())
            .flat_map(|i| i.link_local().collect::<Vec<_>>())
            .collect();
        disable.extend(drop.into_iter().map(|a| IfKind::Addr(IpAddr::V6(a))));
    }
    (enable, disable)
}

/// Applies [`selections`] to `daemon`.
pub fn apply(daemon: &ServiceDaemon, chosen: &[Interface], link_local: LinkLocal) -> Result<()> {
    let (enable, mut disable) = selections(chosen, link_local);
    let rest = disable.split_off(1);
    let names: Vec<&str> = chosen.iter().map(|i| i.name.as_str()).collect();
    daemon
        .disable_interface(disable)
        .and_then(|()| daemon.enable_interface(enable))
        .and_then(|()| if rest.is_empty() { Ok(()) } else { daemon.disable_interface(rest) })
        .map_err(|e| Error::Daemon(format!("dnssd: cannot select interfaces {}: {e}", names.join(", "))))?;
    log::debug!("dnssd: interfaces {}", names.join(", "));
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

    #[test]
    fn link_local_is_left_out_only_where_another_address_exists() {
        let chosen = vec![
            iface("eth0", true, true, &["10.0.0.2", "fe80::1"]),
            iface("usb0", true, true, &["fe80::2"]),
            iface("eth1", true, true, &["2001:db8::3", "fe80::3"]),
        ];
        let show = |kinds: Vec<IfKind>| kinds.iter().map(|k| format!("{k:?}")).collect::<Vec<_>>();
        let (enable, disable) = selections(&chosen, LinkLocal::OnlyWhenAlone);
        assert_eq!(show(enable), ["Name(\"eth0\")", "Name(\"usb0\")", "Name(\"eth1\")"]);
        assert_eq!(show(disable), ["All", "Addr(fe80::1)", "Addr(fe80::3)"]);
        let (_, disable) = selections(&chosen, LinkLocal::Keep);
        assert_eq!(show(disable), ["All"]);
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

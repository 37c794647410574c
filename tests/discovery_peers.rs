//! DNS-SD against independent peers, with the real `decpud` applet as the announcer: in a
//! lo-only network namespace (`ip link set lo multicast on`) and over a veth pair, with
//! Debian's avahi (avahi-publish as another announcer, avahi-browse as another browser,
//! each with a private avahi-daemon and D-Bus started inside the namespace), `-dsInterface`
//! naming an interface that exists only inside a namespace entered with `nsenter --net`
//! (no sysfs remount), and a server whose only address is IPv6 link-local.
//!
//! decpu's choice is checked with the `decpu` helper (the real selection code, with a runner
//! that records or really dials the chosen address) and with the real applet.

mod discovery_support;
#[path = "common/skip.rs"]
mod skip;

use std::time::Duration;

use cpu_all::discovery::sysinfo::{go_arch, go_os};
use discovery_support::{
    avahi_script, avahi_unavailable, decpu_helper, lab_unavailable, Enter, Helper, Netns, HELPER_ENV,
};

const READY: Duration = Duration::from_secs(20);
const BROWSE_MS: &str = "2500";
/// How long one decpu helper may take (its browse is at most a few seconds).
const DECPU_LIMIT: Duration = Duration::from_secs(40);

/// Helper entry: does nothing unless `DISCOVERY_HELPER` names a mode.
#[test]
fn helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else { return };
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    match mode.as_str() {
        "decpu" => decpu_helper(&env("DECPU_ARGS"), &env("DS_CONNECT")),
        other => panic!("unknown helper mode {other}"),
    }
}

fn netns_or_skip(tag: &str, make: impl FnOnce() -> Result<Netns, String>) -> Option<Netns> {
    if let Some(why) = lab_unavailable() {
        skip::skip(&format!("discovery {tag}"), &why);
        return None;
    }
    match make() {
        Ok(ns) => Some(ns),
        Err(e) => {
            skip::skip(&format!("discovery {tag}"), &format!("cannot make network namespaces: {e}"));
            None
        }
    }
}

/// The real decpud applet in namespace `n`, once it says it announced.
fn decpud(ns: &Netns, n: usize, enter: Enter, args: &[&str]) -> Helper {
    let mut all = vec!["decpud", "-d", "-pk", "", "-sp", "17010"];
    all.extend_from_slice(args);
    let mut h = ns.spawn(n, enter, env!("CARGO_BIN_EXE_cpu-all"), &all, &[]);
    let announced = h.wait_err_line("dnssd: announced", READY);
    assert!(announced.is_some(), "decpud did not announce:\n{}", h.stderr_seen(Duration::from_secs(1)));
    h
}

/// decpu's selection in namespace `n`; returns (its result lines, its stderr).
fn decpu(ns: &Netns, n: usize, enter: Enter, args: &[&str], connect: &str) -> (Vec<String>, String) {
    decpu_browsing(ns, n, enter, args, connect, BROWSE_MS)
}

/// [`decpu`] with the browse time given in milliseconds.
fn decpu_browsing(
    ns: &Netns,
    n: usize,
    enter: Enter,
    args: &[&str],
    connect: &str,
    browse_ms: &str,
) -> (Vec<String>, String) {
    start_decpu(ns, n, enter, args, connect, browse_ms).decpu_result(DECPU_LIMIT)
}

/// Starts the `decpu` helper (see [`decpu`]); its result comes from `decpu_result(DECPU_LIMIT)`,
/// so that something else (avahi starting) can happen while it browses.
fn start_decpu(ns: &Netns, n: usize, enter: Enter, args: &[&str], connect: &str, browse_ms: &str) -> Helper {
    let mut all = vec!["-d"];
    all.extend_from_slice(args);
    let joined = all.join("\n");
    ns.helper(
        n,
        enter,
        "decpu",
        &[("DECPU_ARGS", &joined), ("DS_CONNECT", connect), ("DECPU_BROWSE_MS", browse_ms)],
    )
}

/// avahi-daemon inside namespace `n`, up; removed (with its scratch dir) when dropped.
struct Avahi {
    helper: Helper,
    dir: std::path::PathBuf,
}

impl Avahi {
    fn start(ns: &Netns, n: usize, iface: &str, ipv6: bool) -> Avahi {
        let dir = std::env::temp_dir().join(format!("dnssd-avahi-{}-{}", std::process::id(), ns.name(n)));
        let _ = std::fs::remove_dir_all(&dir);
        let script = avahi_script(&dir, iface, ipv6);
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", ns.name(n), "unshare", "--uts", "sh", "-c"])
            .arg(format!("hostname avahi{n} && {script}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut helper = Helper::spawn(cmd, &format!("avahi@{}", ns.name(n)));
        let up = helper.wait_line("avahi-up", READY);
        assert!(up.is_some(), "avahi did not start: {}", helper.stderr_text(Duration::from_secs(1)));
        Avahi { helper, dir }
    }

    /// Publishes `_ncpu._tcp` instance `name` on `port` with our arch and os plus `txt`.
    fn publish(&mut self, name: &str, port: u16, txt: &str) {
        self.helper.send(&format!(
            "publish {name} _ncpu._tcp {port} arch={} os={} {txt}",
            go_arch(),
            go_os()
        ));
        let established = self.helper.wait_line("Established under name", READY);
        assert!(established.is_some(), "avahi-publish failed: {}", self.helper.stdout_text(Duration::ZERO));
    }

    /// One resolving avahi-browse: its `=` lines for `instance`.
    fn resolve(&mut self, instance: &str) -> Vec<String> {
        self.helper.send("browse");
        let mut found = Vec::new();
        while let Some(line) = self.helper.wait_line("", Duration::from_secs(15)) {
            if line == "browse-done" {
                break;
            }
            if line.starts_with("=;") && line.split(';').nth(3) == Some(instance) {
                found.push(line);
            }
        }
        found
    }
}

impl Drop for Avahi {
    fn drop(&mut self) {
        self.helper.close_stdin();
        let _ = self.helper.wait(Duration::from_secs(15));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// avahi-browse's resolved lines for `instance`, trying up to three browses (avahi's
/// own answer to one lost packet), or a failure showing what it printed.
fn avahi_resolves(avahi: &mut Avahi, instance: &str) -> Vec<String> {
    for _ in 0..3 {
        let lines = avahi.resolve(instance);
        if !lines.is_empty() {
            return lines;
        }
    }
    panic!("avahi-browse never resolved {instance}:\n{}", avahi.helper.stdout_text(Duration::ZERO));
}

#[test]
fn discovery_lo_only_namespace_both_ways_with_avahi() {
    let Some(ns) = netns_or_skip("lo-only", || Netns::lo_only("lo")) else { return };
    // decpud announces on lo without being told to (lo is up and multicast-capable).
    let _server = decpud(&ns, 1, Enter::IpNetnsExec, &["-dsInstance", "lo-cpud", "-dsTxt", "role=lo"]);
    let mut browsing =
        start_decpu(&ns, 1, Enter::IpNetnsExec, &["dnssd://?role=lo", "date"], "tcp", BROWSE_MS);
    // avahi (not announcing anything yet) starts while decpu browses.
    let avahi = match avahi_unavailable() {
        Some(why) => Err(why),
        None => Ok(Avahi::start(&ns, 1, "lo", true)),
    };
    let (lines, err) = browsing.decpu_result(DECPU_LIMIT);
    assert_eq!(lines, ["connect 127.0.0.1 17010", "status 0"], "{err}");
    assert!(err.contains("dnssd: interfaces lo"), "{err}");

    let mut avahi = match avahi {
        Ok(avahi) => avahi,
        Err(why) => {
            skip::skip("discovery lo-only avahi part", &why);
            return;
        }
    };
    // avahi-browse (another implementation) finds decpud on lo.
    let seen = avahi_resolves(&mut avahi, "lo-cpud");
    assert!(seen.iter().any(|l| l.contains(";127.0.0.1;17010;") && l.contains("\"role=lo\"")), "{seen:#?}");
    // And decpu finds what avahi-publish announces.
    avahi.publish("lo-avahi", 17011, "role=avahi");
    let (lines, err) = decpu(&ns, 1, Enter::IpNetnsExec, &["dnssd://?role=avahi", "date"], "record");
    assert_eq!(lines, ["connect 127.0.0.1 17011", "status 0"], "{err}");
}

#[test]
fn discovery_veth_pair_no_link_local_announced_and_avahi_both_ways() {
    let Some(ns) = netns_or_skip("veth", || Netns::pair("veth", "eth0", true)) else { return };
    let _server = decpud(&ns, 1, Enter::IpNetnsExec, &["-dsInstance", "veth-cpud", "-dsTxt", "role=veth"]);
    let mut browsing =
        start_decpu(&ns, 2, Enter::IpNetnsExec, &["dnssd://?role=veth", "date"], "tcp", BROWSE_MS);
    // avahi (not announcing anything yet) starts while decpu browses.
    let avahi = match avahi_unavailable() {
        Some(why) => Err(why),
        None => Ok(Avahi::start(&ns, 2, "eth0", true)),
    };
    let (lines, err) = browsing.decpu_result(DECPU_LIMIT);
    assert_eq!(lines, [format!("connect {} 17010", Netns::addr(1)), "status 0".into()], "{err}");
    // Only the IPv4 address was announced: the kernel's link-local one stays out.
    assert!(err.contains(&format!("port 17010 addresses [{}] txt", Netns::addr(1))), "{err}");

    let mut avahi = match avahi {
        Ok(avahi) => avahi,
        Err(why) => {
            skip::skip("discovery veth avahi part", &why);
            return;
        }
    };
    // avahi browsing over IPv4 and IPv6 gets decpud's IPv4 address and no link-local one.
    let seen = avahi_resolves(&mut avahi, "veth-cpud");
    assert!(seen.iter().any(|l| l.contains(&format!(";{};17010;", Netns::addr(1)))), "{seen:#?}");
    assert!(!seen.iter().any(|l| l.contains(";fe80")), "a link-local address was announced: {seen:#?}");
    // decpu in the other namespace finds avahi-publish's record and dials IPv4 first,
    // although avahi announces its link-local address too.
    avahi.publish("veth-avahi", 17011, "role=avahi");
    let (lines, err) = decpu(&ns, 1, Enter::IpNetnsExec, &["dnssd://?role=avahi", "date"], "record");
    assert_eq!(lines, [format!("connect {} 17011", Netns::addr(2)), "status 0".into()], "{err}");
}

#[test]
fn discovery_ds_interface_is_resolved_in_the_callers_namespace() {
    if std::process::Command::new("nsenter").arg("-V").output().is_err() {
        skip::skip("discovery dsInterface", "nsenter (util-linux) is missing");
        return;
    }
    let ifname = format!("dsv{}", std::process::id() % 100_000);
    let Some(ns) = netns_or_skip("dsif", || Netns::pair("dsif", &ifname, true)) else { return };
    // The test's own /sys is the host's: the interface is not there, so a /sys lookup fails.
    assert!(!std::path::Path::new("/sys/class/net").join(&ifname).exists());
    let mut server = decpud(&ns, 1, Enter::NsenterNet, &["-dsInterface", &ifname, "-dsTxt", "role=dsif"]);
    let args = ["-dsInterface", ifname.as_str(), "dnssd://?role=dsif", "date"];
    let (lines, err) = decpu(&ns, 2, Enter::NsenterNet, &args, "tcp");
    assert_eq!(lines, [format!("connect {} 17010", Netns::addr(1)), "status 0".into()], "{err}");
    assert!(err.contains(&format!("dnssd: interfaces {ifname}\n")), "{err}");
    let server_err = server.stderr_seen(Duration::from_millis(200));
    assert!(!server_err.contains("without DNS-SD"), "{server_err}");

    // The real applet: a name that is nowhere is a usage error naming it.
    let mut cli = ns.spawn(
        2,
        Enter::NsenterNet,
        env!("CARGO_BIN_EXE_cpu-all"),
        &["decpu", "-dsInterface", "nosuch0", ".", "date"],
        &[],
    );
    assert_eq!(cli.wait(Duration::from_secs(30)), Some(2));
    let err = cli.stderr_text(Duration::from_secs(1));
    assert_eq!(err, "decpu: dnssd: no network interface \"nosuch0\" in this network namespace");
}

#[test]
fn discovery_link_local_only_server_is_dialed_with_its_zone() {
    let Some(ns) = netns_or_skip("ll", || Netns::pair("ll", "eth0", false)) else { return };
    let _server = decpud(&ns, 1, Enter::IpNetnsExec, &["-dsInstance", "ll-cpud", "-dsTxt", "role=ll"]);
    let (lines, err) = decpu(&ns, 2, Enter::IpNetnsExec, &["dnssd://?role=ll", "date"], "tcp");
    assert_eq!(lines, ["connect fe80::1%eth0 17010", "status 0"], "{err}");
}

#[test]
fn discovery_decpud_announces_once_its_interface_comes_up() {
    let Some(ns) = netns_or_skip("late", || Netns::pair("late", "eth0", true)) else { return };
    // A board whose network is not up yet when decpud starts (PID 1, DHCP later).
    let down =
        std::process::Command::new("ip").args(["-n", ns.name(1), "link", "set", "eth0", "down"]).status();
    assert!(down.as_ref().is_ok_and(|s| s.success()), "ip link set eth0 down: {down:?}");
    let mut server = decpud(&ns, 1, Enter::IpNetnsExec, &["-dsInterface", "eth0", "-dsTxt", "role=late"]);
    let err = server.stderr_seen(Duration::from_millis(200));
    assert!(
        err.contains("warning: dnssd: network interface \"eth0\" is down; announcing once it is ready"),
        "{err}"
    );
    let up = std::process::Command::new("ip").args(["-n", ns.name(1), "link", "set", "eth0", "up"]).status();
    assert!(up.as_ref().is_ok_and(|s| s.success()), "ip link set eth0 up: {up:?}");
    // The library rescans addresses every 5 s; a few browses cover that on a slow machine.
    let mut last = (Vec::new(), String::new());
    for _ in 0..8 {
        last = decpu(&ns, 2, Enter::IpNetnsExec, &["dnssd://?role=late", "date"], "record");
        if last.0 == [format!("connect {} 17010", Netns::addr(1)), "status 0".into()] {
            return;
        }
    }
    panic!("decpud never announced after eth0 came up: {:?}\n{}", last.0, last.1);
}

#[test]
fn discovery_decpu_listens_on_when_nothing_answered_in_the_browse_time() {
    let Some(ns) = netns_or_skip("extend", || Netns::lo_only("extend")) else { return };
    let _server = decpud(&ns, 1, Enter::IpNetnsExec, &["-dsTxt", "role=extend"]);
    // A browse time too short for any answer: decpu listens on for one more query round
    // instead of giving up.
    let (lines, err) =
        decpu_browsing(&ns, 1, Enter::IpNetnsExec, &["dnssd://?role=extend", "date"], "record", "0");
    assert_eq!(lines, ["connect 127.0.0.1 17010", "status 0"], "{err}");
    assert!(err.contains("dnssd: no usable server after 0ns; listening up to 3.5s in all"), "{err}");
}

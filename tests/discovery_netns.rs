//! decpud announcements and decpu selection over real multicast DNS, between network
//! namespaces joined by a bridge (10.200.0.0/24 inside our own namespaces only).
//!
//! Each test builds its own lab and removes it (by name) when it ends, pass or fail.
//! Announcers and browsers are this binary re-run in a namespace (`helper` below).

mod discovery_support;

#[path = "common/skip.rs"]
mod skip;

use std::io::BufRead;
use std::net::TcpListener;
use std::time::Duration;

use cpu_all::discovery::announce::Announcer;
use cpu_all::discovery::sysinfo::{go_arch, go_os};
use cpu_all::options::DnssdOptions;
use discovery_support::{decpu_helper, lab_unavailable, Helper, Lab, HELPER_ENV};

const READY: Duration = Duration::from_secs(15);
/// Browse time in the tests: generous, as several labs may run at once on a busy machine.
const BROWSE_MS: &str = "2500";

/// Helper entry: does nothing unless `DISCOVERY_HELPER` names a mode.
#[test]
fn helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else { return };
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    match mode.as_str() {
        "announce" => {
            announce_helper(&env("DS_INSTANCE"), &env("DS_TXT"), &env("DS_PORT"), env("DS_LISTEN") == "1")
        }
        "odd" => odd_helper(&env("DS_ADDR")),
        "decpu" => decpu_helper(&env("DECPU_ARGS"), &env("DS_CONNECT")),
        "decpud" => decpud_helper(),
        "refresh" => refresh_helper(),
        other => panic!("unknown helper mode {other}"),
    }
}

/// Announces until stdin closes; `tenants N` lines change the session count.
fn announce_helper(instance: &str, txt: &str, port: &str, listen: bool) {
    let port: u16 = port.parse().unwrap_or(17010);
    let _listener = listen.then(|| {
        let l = TcpListener::bind(("0.0.0.0", port)).expect("bind test listener");
        let accepting = l.try_clone().expect("clone listener");
        std::thread::spawn(move || for _ in accepting.incoming() {});
        l
    });
    let opts = DnssdOptions {
        enabled: true,
        instance: instance.to_string(),
        domain: "local".into(),
        service: "_ncpu._tcp".into(),
        interface: "eth0".into(),
        txt: txt.to_string(),
    };
    let announcer = Announcer::start(&opts, port).expect("announce");
    println!("ready {} {:?}", announcer.fullname(), announcer.txt());
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("tenants ").and_then(|n| n.parse().ok()) {
            announcer.set_tenants(n);
            // The refresh thread announces it; wait (bounded) until it has.
            let want = n.to_string();
            for _ in 0..200 {
                if announcer.txt().get("tenants") == Some(&want) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            println!("tenants-set {n} {:?}", announcer.txt());
        }
    }
    announcer.stop();
    println!("stopped");
}

/// Announces with a 100 ms refresh; reports once three refreshes have happened.
fn refresh_helper() {
    let opts = DnssdOptions {
        enabled: true,
        instance: "refresh-cpud".into(),
        domain: "local".into(),
        service: "_ncpu._tcp".into(),
        interface: String::new(),
        txt: String::new(),
    };
    let announcer =
        Announcer::start_with_interval(&opts, 17010, Duration::from_millis(100)).expect("announce");
    let first = announcer.announcements();
    for _ in 0..200 {
        if announcer.announcements() >= first + 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("refreshed {} {}", first, announcer.announcements());
    announcer.stop();
    let after = announcer.announcements();
    announcer.set_tenants(5);
    println!("after-stop {}", announcer.announcements() - after);
}

/// Another responder publishing a TXT record with malformed entries, until stdin closes.
fn odd_helper(addr: &str) {
    use mdns_sd::{ServiceDaemon, ServiceInfo, TxtProperty};
    let daemon = ServiceDaemon::new().expect("mdns daemon");
    let properties = vec![
        TxtProperty::from(("arch", go_arch())),
        TxtProperty::from(("os", go_os())),
        TxtProperty::from(("", "empty-key")),
        TxtProperty::from(("near", &[0xffu8, 0xfe][..])),
        TxtProperty::from(("tenants", "lots")),
        TxtProperty::from(("cores", "4")),
    ];
    let info = ServiceInfo::new("_ncpu._tcp.local.", "odd-cpud", "oddhost.local.", addr, 17010, properties)
        .expect("odd service");
    daemon.register(info).expect("register odd");
    println!("ready odd");
    for _ in std::io::stdin().lock().lines() {}
    if let Ok(r) = daemon.unregister("odd-cpud._ncpu._tcp.local.") {
        let _ = r.recv_timeout(Duration::from_secs(2));
    }
    let _ = daemon.shutdown();
}

/// Runs one decpu in node `n`; returns (its stdout lines of interest, its stderr).
fn decpu(lab: &Lab, n: usize, args: &[&str], connect: &str) -> (Vec<String>, String) {
    let joined = args.join("\n");
    let mut h: Helper = lab.helper(
        n,
        "decpu",
        &[("DECPU_ARGS", &joined), ("DS_CONNECT", connect), ("DECPU_BROWSE_MS", BROWSE_MS)],
    );
    h.decpu_result(Duration::from_secs(30))
}

/// Starts one decpu -d with a recording runner in node `n` (see [`decpu`]).
fn start_decpu(lab: &Lab, n: usize, args: &[&str]) -> Helper {
    let mut with_debug = vec!["-d"];
    with_debug.extend_from_slice(args);
    let joined = with_debug.join("\n");
    lab.helper(
        n,
        "decpu",
        &[("DECPU_ARGS", &joined), ("DS_CONNECT", "record"), ("DECPU_BROWSE_MS", BROWSE_MS)],
    )
}

/// Runs decpu -d with a recording runner and checks what it chose (stderr shown on failure).
fn expect(lab: &Lab, n: usize, args: &[&str], want: Vec<String>) {
    expect_all(lab, n, &[(args, want)]);
}

/// [`expect`] for several queries while nothing changes: their decpus browse side by side
/// (each its own process with its own full browse time), then each choice is checked.
fn expect_all(lab: &Lab, n: usize, cases: &[(&[&str], Vec<String>)]) {
    let mut running: Vec<Helper> = cases.iter().map(|(args, _)| start_decpu(lab, n, args)).collect();
    for ((args, want), h) in cases.iter().zip(running.iter_mut()) {
        let (lines, err) = h.decpu_result(Duration::from_secs(30));
        assert_eq!(&lines, want, "decpu {args:?}:\n{err}");
    }
}

fn lab_or_skip(tag: &str, nodes: usize) -> Option<Lab> {
    if let Some(why) = lab_unavailable() {
        skip::here(&why);
        return None;
    }
    match Lab::new(tag, nodes) {
        Ok(lab) => Some(lab),
        Err(e) => {
            skip::here(&format!("cannot build the namespace lab ({tag}): {e}"));
            None
        }
    }
}

fn announce(lab: &Lab, n: usize, instance: &str, txt: &str, listen: bool) -> Helper {
    let mut h = lab.helper(
        n,
        "announce",
        &[
            ("DS_INSTANCE", instance),
            ("DS_TXT", txt),
            ("DS_PORT", "17010"),
            ("DS_LISTEN", if listen { "1" } else { "0" }),
        ],
    );
    let ready = h.wait_line("ready ", READY);
    assert!(ready.is_some(), "announcer {instance} not ready: {}", h.stderr_text(Duration::from_secs(1)));
    h
}

fn connected(n: usize) -> String {
    format!("connect {} 17010", Lab::addr(n))
}

#[test]
fn discovery_selects_by_arch_number_and_sort_key() {
    let Some(lab) = lab_or_skip("sel", 4) else { return };
    let _alpha = announce(&lab, 1, "alpha-cpud", "arch=riscv64,cores=2", false);
    let mut bravo = announce(&lab, 2, "bravo-cpud", "cores=16,near=gpu", false);
    let mut charlie = announce(&lab, 3, "charlie-cpud", "cores=8", false);
    let ok = |n: usize| vec![connected(n), "status 0".to_string()];

    expect_all(
        &lab,
        4,
        &[
            // By architecture: only alpha claims riscv64.
            (&["dnssd://?arch=riscv64", "date"], ok(1)),
            // By number: cores >= 10 among our own arch.
            (&["dnssd://?cores=>10", "date"], ok(2)),
            (&["dnssd://?cores=<8", "date"], ok(3)),
            // By sort key.
            (&["dnssd://?sort=>cores", "date"], ok(2)),
            (&["dnssd://?sort=cores", "date"], ok(3)),
            (&["dnssd://?arch=*&sort=cores", "date"], ok(1)),
            // An instance by name.
            (&["dnssd://bravo-cpud._ncpu._tcp.local", "date"], ok(2)),
        ],
    );
    // The default query sorts by tenants, which follow the sessions.
    bravo.send("tenants 0");
    charlie.send("tenants 2");
    assert!(charlie.wait_line("tenants-set 2", READY).is_some());
    assert!(bravo.wait_line("tenants-set 0", READY).is_some());
    expect(&lab, 4, &[".", "date"], ok(2));
    bravo.send("tenants 3");
    assert!(bravo.wait_line("tenants-set 3", READY).is_some());
    // Nothing qualifies: a connection error, with -d saying why each was dropped (checked
    // below; it browses beside the next two).
    let mut nothing = start_decpu(&lab, 4, &["dnssd://?near=tpu", "date"]);
    expect_all(
        &lab,
        4,
        &[
            // No host argument at all: the default query too (and no command: the shell).
            (&[], ok(3)),
            // -n 2: both of our architecture, best first.
            (
                &["-n", "2", "dnssd://?sort=>cores", "date"],
                vec![connected(2), connected(3), "status 0".into()],
            ),
        ],
    );
    let (lines, err) = nothing.decpu_result(Duration::from_secs(30));
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("error 255 dnssd: no server for \"_ncpu._tcp.local.\""), "{lines:?}");
    assert!(
        err.contains("dnssd: candidate bravo-cpud._ncpu._tcp.local. port 17010 addresses [10.200.0.2"),
        "{err}"
    );
    assert!(err.contains("dropped: near=tpu: has gpu"), "{err}");
    assert!(
        err.contains(&format!("dropped: near=tpu: key missing; arch={}: has riscv64", go_arch())),
        "{err}"
    );
    // After a goodbye the server is gone.
    drop(charlie);
    drop(bravo);
    let (lines, _) = decpu(&lab, 4, &["dnssd://?arch=*", "date"], "record");
    assert_eq!(lines, ok(1));
}

#[test]
fn discovery_falls_back_when_the_best_server_refuses() {
    let Some(lab) = lab_or_skip("fall", 3) else { return };
    // The better server (fewer tenants) has nobody listening on its port.
    let _dead = announce(&lab, 1, "dead-cpud", "", false);
    let mut live = announce(&lab, 2, "live-cpud", "", true);
    live.send("tenants 1");
    assert!(live.wait_line("tenants-set 1", READY).is_some());
    let (lines, err) = decpu(&lab, 3, &["-d", ".", "date"], "tcp");
    assert_eq!(
        lines,
        vec![format!("refused {} 17010", Lab::addr(1)), connected(2), "status 0".to_string()],
        "{err}"
    );
    assert!(err.contains("warning: dnssd: dead-cpud: 10.200.0.1: "), "{err}");
    assert!(err.contains("trying the next server"), "{err}");
}

#[test]
fn discovery_ignores_malformed_txt_from_another_responder() {
    let Some(lab) = lab_or_skip("odd", 3) else { return };
    let mut odd = lab.helper(1, "odd", &[("DS_ADDR", &Lab::addr(1))]);
    assert!(odd.wait_line("ready", READY).is_some(), "{}", odd.stderr_text(Duration::from_secs(1)));
    let _good = announce(&lab, 2, "good-cpud", "", false);
    let (lines, err) = decpu(&lab, 3, &["-d", ".", "date"], "record");
    // The odd server stays a candidate (its good entries count) but its unusable tenants
    // sorts it after the good one.
    assert_eq!(lines, vec![connected(2), "status 0".to_string()], "{err}");
    for warning in [
        "warning: dnssd: odd-cpud._ncpu._tcp.local.: ignoring malformed TXT entry: empty key",
        "warning: dnssd: odd-cpud._ncpu._tcp.local.: ignoring malformed TXT entry: near: value is not UTF-8",
        "warning: dnssd: odd-cpud._ncpu._tcp.local.: ignoring malformed TXT entry: tenants=\"lots\" is not a number",
    ] {
        assert!(err.contains(warning), "missing {warning:?} in:\n{err}");
    }
    assert!(err.contains("dnssd: order after sorting: good-cpud, odd-cpud"), "{err}");
    // Asked for by name, the odd one is still usable.
    let (lines, _) = decpu(&lab, 3, &["dnssd://odd-cpud._ncpu._tcp", "date"], "record");
    assert_eq!(lines, vec![connected(1), "status 0".to_string()]);
}

/// Checks one `avahi-browse -p -r` resolved line for node 1's announcement.
fn check_avahi_line(line: &str, tenants: &str) {
    let fields: Vec<&str> = line.splitn(10, ';').collect();
    assert_eq!(fields.len(), 10, "{line}");
    assert_eq!(fields[6], "node1.local");
    assert_eq!(fields[7], Lab::addr(1));
    assert_eq!(fields[8], "17010");
    let txt = fields[9];
    for pair in [
        format!("\"arch={}\"", go_arch()),
        format!("\"os={}\"", go_os()),
        "\"near=gpu\"".to_string(),
        "\"secure=true\"".to_string(),
        format!("\"tenants={tenants}\""),
    ] {
        assert!(txt.contains(&pair), "{pair} missing from {txt}");
    }
    for key in ["cores=", "mem.avail=", "mem.total=", "cpu.pcnt="] {
        assert!(txt.contains(&format!("\"{key}")), "{key} missing from {txt}");
    }
}

#[test]
fn discovery_announcement_is_seen_by_avahi_browse() {
    let missing: Vec<&str> = ["avahi-browse", "avahi-daemon", "dbus-daemon"]
        .into_iter()
        .filter(|p| {
            !std::path::Path::new("/usr/bin").join(p).exists()
                && !std::path::Path::new("/usr/sbin").join(p).exists()
        })
        .collect();
    if !missing.is_empty() {
        skip::here(&format!("not installed: {missing:?} (apt-get install avahi-utils avahi-daemon dbus)"));
        return;
    }
    let Some(lab) = lab_or_skip("avahi", 2) else { return };
    let mut announcer = announce(&lab, 1, "", "near=gpu,secure", false);
    let dir = std::env::temp_dir().join(format!("discovery-avahi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bus = dir.join("bus");
    std::fs::write(
        dir.join("bus.conf"),
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
            bus.display()
        ),
    )
    .expect("bus.conf");
    std::fs::write(
        dir.join("avahi.conf"),
        "[server]\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces=eth0\nenable-dbus=yes\n[publish]\ndisable-publishing=yes\n",
    )
    .expect("avahi.conf");
    // `ip netns exec` gives the script its own mount namespace, so the tmpfs over avahi's
    // runtime directory stays private. A background avahi-browse reports additions and
    // removals; each `browse` line on stdin runs a resolving avahi-browse once. When stdin
    // closes, the script kills and reaps exactly the processes it started.
    let d = dir.display();
    let script = format!(
        "set -e
mkdir -p /run/avahi-daemon && mount -t tmpfs tmpfs /run/avahi-daemon
BROWSE= AVAHI= DBUS=
trap 'kill $BROWSE $AVAHI $DBUS 2>/dev/null; wait' EXIT
dbus-daemon --config-file={d}/bus.conf --nofork &
DBUS=$!
export DBUS_SYSTEM_BUS_ADDRESS=unix:path={bus}
i=0; while [ $i -lt 100 ] && [ ! -S {bus} ]; do i=$((i+1)); sleep 0.1; done
avahi-daemon --no-drop-root --no-chroot --no-rlimits -f {d}/avahi.conf > {d}/avahi.log 2>&1 &
AVAHI=$!
i=0; while [ $i -lt 100 ] && ! avahi-browse -at -p >/dev/null 2>&1; do i=$((i+1)); sleep 0.1; done
echo avahi-up
avahi-browse -p _ncpu._tcp &
BROWSE=$!
while read cmd; do timeout 10 avahi-browse -r -p -t _ncpu._tcp || true; echo browse-done; done",
        bus = bus.display()
    );
    let mut avahi = lab.sh(2, &script);
    let up = avahi.wait_line("avahi-up", Duration::from_secs(20));
    assert!(up.is_some(), "avahi did not start: {}", avahi.stderr_text(Duration::from_secs(1)));
    let resolved_prefix = "=;eth0;IPv4;node1-cpud;_ncpu._tcp;local;";
    // One resolving browse; the resolved line for node1, if any.
    let browse_once = |avahi: &mut Helper| -> Option<String> {
        avahi.send("browse");
        let mut found = None;
        while let Some(line) = avahi.wait_line("", Duration::from_secs(15)) {
            if line == "browse-done" {
                break;
            }
            if line.starts_with(resolved_prefix) {
                found = Some(line);
            }
        }
        found
    };
    let resolved = (0..3).find_map(|_| browse_once(&mut avahi));
    let Some(resolved) = resolved else {
        panic!("avahi-browse did not resolve node1-cpud:\n{}", avahi.stdout_text(Duration::from_secs(1)))
    };
    check_avahi_line(&resolved, "0");
    // A session count change is re-announced and updates avahi's cache.
    announcer.send("tenants 1");
    assert!(announcer.wait_line("tenants-set 1", READY).is_some());
    let updated = (0..5).find_map(|_| {
        std::thread::sleep(Duration::from_millis(500));
        browse_once(&mut avahi).filter(|l| l.contains("\"tenants=1\""))
    });
    let updated =
        updated.unwrap_or_else(|| panic!("no update with tenants=1:\n{}", avahi.stdout_text(Duration::ZERO)));
    check_avahi_line(&updated, "1");
    // Stopping the announcer sends a goodbye: avahi drops the service at once.
    announcer.close_stdin();
    assert!(announcer.wait_line("stopped", Duration::from_secs(10)).is_some());
    let removed = avahi.wait_line("-;eth0;IPv4;node1-cpud;_ncpu._tcp;local", Duration::from_secs(10));
    assert!(removed.is_some(), "no removal seen:\n{}", avahi.stdout_text(Duration::ZERO));
    avahi.close_stdin();
    let status = avahi.wait(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(status, Some(0), "{}", avahi.stderr_text(Duration::from_secs(1)));
}

/// decpud glue: announce while `serve` runs, follow the tenants hook, withdraw afterwards.
fn decpud_helper() {
    let opts = cpu_all::options::CpudOptions::from_args(["-sp", "17010", "-dsTxt", "role=glue"], true)
        .expect("decpud options");
    let result = cpu_all::discovery::run_decpud(opts, |_, hook| {
        let hook = hook.expect("an announcing decpud passes a tenants hook");
        hook(1);
        hook(2);
        println!("serving");
        for _ in std::io::stdin().lock().lines() {}
        Ok(())
    });
    println!("served {}", result.is_ok());
}

#[test]
fn discovery_decpud_announces_while_serving() {
    let Some(lab) = lab_or_skip("glue", 2) else { return };
    let mut server = lab.helper(1, "decpud", &[]);
    assert!(server.wait_line("serving", READY).is_some(), "{}", server.stderr_text(Duration::from_secs(1)));
    // The real applet in the same lab, browsing beside the helper below: a query nobody meets
    // is a connection error (255).
    let mut cli =
        lab.sh(2, &format!("exec {} decpu -d 'dnssd://?role=nothing' date", env!("CARGO_BIN_EXE_cpu-all")));
    let (lines, err) = decpu(&lab, 2, &["-d", "dnssd://?role=glue", "date"], "record");
    assert_eq!(lines, vec![connected(1), "status 0".to_string()], "{err}");
    assert!(err.contains("node1-cpud._ncpu._tcp.local. port 17010"), "{err}");
    assert!(err.contains(" tenants=2]"), "{err}");
    assert_eq!(cli.wait(Duration::from_secs(30)), Some(255));
    let err = cli.stderr_text(Duration::from_secs(1));
    assert!(err.contains("decpu: dnssd:   dropped: role=nothing: has glue"), "{err}");
    assert!(
        err.ends_with(
            "decpu: dnssd: no server for \"_ncpu._tcp.local.\" meets the query (decpu -d shows why)"
        ),
        "{err}"
    );
    server.close_stdin();
    assert_eq!(server.wait_line("served", READY).as_deref(), Some("served true"));
    let (lines, _) = decpu(&lab, 2, &["dnssd://?role=glue", "date"], "record");
    assert_eq!(lines.len(), 1);
    assert!(lines[0].starts_with("error 255 dnssd: no server"), "{lines:?}");
}

#[test]
fn discovery_refreshes_on_its_interval_and_not_after_stop() {
    let Some(lab) = lab_or_skip("refresh", 1) else { return };
    let mut h = lab.helper(1, "refresh", &[]);
    let line = h.wait_line("refreshed ", Duration::from_secs(20)).unwrap_or_default();
    let counts: Vec<u64> = line.split_whitespace().skip(1).filter_map(|n| n.parse().ok()).collect();
    assert_eq!(counts.len(), 2, "{line:?} {}", h.stderr_text(Duration::from_secs(1)));
    assert_eq!(counts[0], 1, "one announcement at start");
    assert!(counts[1] >= 4, "{line}");
    assert_eq!(h.wait_line("after-stop ", Duration::from_secs(10)).as_deref(), Some("after-stop 0"));
}

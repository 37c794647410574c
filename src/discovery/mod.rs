//! DNS-SD: decpud's announcement with TXT metadata and decpu's browsing and selection
//! (spec section 7).
//!
//! - [`sysinfo`]: the TXT keys (arch, os, cores, memory, CPU busy, tenants, `-dsTxt`).
//! - [`announce`]: the decpud side; [`run_decpud`] wraps the cpud server with it.
//! - [`query`]: the `dnssd://` URI, requirements and sort order.
//! - [`browse`]: mDNS browsing into [`browse::Candidate`]s.
//! - [`interfaces`]: which network interfaces both sides use (the caller's namespace).
//! - [`run_decpu`]: choose servers, then run the session through [`crate::client::run`].
//!
//! This module never speaks SSH: it only picks `host`/`port` and hands over to the client.

pub mod announce;
pub mod browse;
pub mod interfaces;
pub mod query;
pub mod sysinfo;

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result, EXIT_CONNECTION};
use crate::options::{CpuOptions, CpudOptions};

use announce::{announce_port, Announcer};
use browse::{browse, Candidate, DEFAULT_BROWSE_TIME};
use query::{parse_target, Query, Target};

/// Called by the server with the number of sessions whenever it changes.
pub type TenantHook = Arc<dyn Fn(usize) + Send + Sync>;

/// Runs `decpu`: picks the server(s) by DNS-SD, then runs the session like `cpu`
/// (by setting `host`/`port` and calling [`crate::client::run`]).
pub fn run_decpu(opts: CpuOptions) -> Result<i32> {
    run_decpu_with(opts, DEFAULT_BROWSE_TIME, crate::client::run)
}

/// [`run_decpu`] with the browse time and the session runner given (tests pass a runner
/// that records where it was sent).
///
/// A plain host name goes straight to `connect`. Otherwise the servers meeting the query
/// are tried best first; a server whose connection fails ([`Error::Connect`]) is replaced
/// by the next one. With `-n N` the command runs on N servers one after the other (each
/// session owns the terminal and stdin, so they cannot share them concurrently), and the
/// worst (highest) exit status is returned; a server that could not be used counts as 255.
pub fn run_decpu_with(
    opts: CpuOptions,
    browse_time: Duration,
    mut connect: impl FnMut(CpuOptions) -> Result<i32>,
) -> Result<i32> {
    let query = match parse_target(opts.host.as_deref())? {
        Target::Host(_) if opts.servers > 1 => {
            return Err(Error::Usage(format!(
                "-n {} needs server discovery: give no host, '.' or a dnssd:// URI",
                opts.servers
            )))
        }
        Target::Host(_) => return connect(opts),
        Target::Discover(q) => q,
    };
    if opts.servers > 1 && opts.command.is_empty() {
        return Err(Error::Usage(
            "Interactive access with more than one CPU is not supported (yet): give a command to run".into(),
        ));
    }
    let browse_name = query.browse_name()?;
    log::debug!("dnssd: browsing {browse_name} for {browse_time:?}");
    let usable =
        |c: &Candidate| c.port != 0 && !c.dial_hosts().is_empty() && query.check(&c.fullname, &c.txt).kept;
    let found =
        browse(&browse_name, browse_time, query.instance_fullname().as_deref(), &opts.ds_interface, &usable)?;
    let candidates = select(&query, found);
    if candidates.is_empty() {
        return Err(Error::Connect(format!(
            "dnssd: no server for {browse_name:?} meets the query (decpu -d shows why)"
        )));
    }
    run_on_servers(&opts, candidates, &mut connect)
}

/// Keeps the candidates that meet the query, best first, logging each decision (`-d`).
pub fn select(query: &Query, found: Vec<Candidate>) -> Vec<Candidate> {
    let mut kept = Vec::new();
    for c in found {
        let verdict = query.check(&c.fullname, &c.txt);
        let hosts = c.dial_hosts();
        let unusable = hosts.is_empty() || c.port == 0;
        let unzoned: Vec<String> = if c.zones.is_empty() {
            c.link_local.iter().map(|a| format!("{a} (link-local, no interface to reach it)")).collect()
        } else {
            Vec::new()
        };
        let txt: Vec<String> = c.txt.iter().map(|(k, v)| format!("{k}={v}")).collect();
        log::debug!(
            "dnssd: candidate {} port {} addresses [{}] txt [{}]",
            c.fullname,
            c.port,
            hosts.iter().chain(&unzoned).cloned().collect::<Vec<_>>().join(", "),
            txt.join(" ")
        );
        if !verdict.kept {
            log::debug!("dnssd:   dropped: {}", verdict.reasons.join("; "));
        } else if unusable {
            log::debug!("dnssd:   dropped: no address or port that can be dialed");
        } else {
            log::debug!("dnssd:   kept: {}", verdict.reasons.join("; "));
            kept.push(c);
        }
    }
    query.sort_by_keys(&mut kept, |c| &c.txt);
    if !query.sort.is_empty() {
        let order: Vec<&str> = kept.iter().map(Candidate::instance).collect();
        log::debug!("dnssd: order after sorting: {}", order.join(", "));
    }
    kept
}

/// The outcome of trying one server.
enum Attempt {
    /// The session ran; its exit status.
    Ran(i32),
    /// No address could be connected to: try the next server.
    Unreachable(String),
    /// Connected, then failed (auth, host key, ...): not retried elsewhere.
    Failed(Error),
}

fn run_on_servers(
    opts: &CpuOptions,
    candidates: Vec<Candidate>,
    connect: &mut impl FnMut(CpuOptions) -> Result<i32>,
) -> Result<i32> {
    let wanted = opts.servers.max(1) as usize;
    let mut statuses = Vec::new();
    let mut unreachable = Vec::new();
    let mut remaining = candidates.into_iter();
    while statuses.len() < wanted {
        let Some(c) = remaining.next() else { break };
        match attempt(opts, &c, connect) {
            Attempt::Ran(status) => statuses.push(status),
            Attempt::Unreachable(why) => {
                log::warn!("dnssd: {}: {why}; trying the next server", c.instance());
                unreachable.push(format!("{}: {why}", c.instance()));
            }
            Attempt::Failed(e) if wanted == 1 => return Err(e),
            Attempt::Failed(e) => {
                log::error!("{}: {e}", c.instance());
                statuses.push(e.exit_code());
            }
        }
    }
    if statuses.is_empty() {
        return Err(Error::Connect(format!(
            "dnssd: no server could be reached ({})",
            unreachable.join("; ")
        )));
    }
    if statuses.len() < wanted {
        log::warn!("dnssd: the command ran on {} of {wanted} servers", statuses.len());
        statuses.push(EXIT_CONNECTION);
    }
    Ok(statuses.into_iter().max().unwrap_or(EXIT_CONNECTION))
}

/// Runs the session on one server, trying its addresses in order.
fn attempt(opts: &CpuOptions, c: &Candidate, connect: &mut impl FnMut(CpuOptions) -> Result<i32>) -> Attempt {
    let mut errors = Vec::new();
    for addr in c.dial_hosts() {
        let mut one = opts.clone();
        one.host = Some(addr.clone());
        one.port = c.port.to_string();
        one.servers = 1;
        log::debug!("dnssd: using {} at {addr} port {}", c.instance(), c.port);
        match connect(one) {
            Ok(status) => return Attempt::Ran(status),
            Err(Error::Connect(why)) => errors.push(format!("{addr}: {why}")),
            Err(e) => return Attempt::Failed(e),
        }
    }
    if errors.is_empty() {
        errors.push("no address that can be dialed".into());
    }
    Attempt::Unreachable(errors.join(", "))
}

/// Runs `decpud`: announces the server (unless `-dnssd=false`), runs `serve` with a hook
/// that re-announces on every session count change, and withdraws the announcement when
/// `serve` returns. If announcing fails (e.g. `-sp` is a unix socket path) it says why and
/// serves anyway, as Go does.
///
/// `serve` is the cpud server entry, `crate::server::run_with_tenants` once it exists.
pub fn run_decpud<F>(opts: CpudOptions, serve: F) -> Result<()>
where
    F: FnOnce(CpudOptions, Option<TenantHook>) -> Result<()>,
{
    if !opts.dnssd.enabled {
        return serve(opts, None);
    }
    let announcer =
        match announce_port(&opts.net, &opts.port).and_then(|port| Announcer::start(&opts.dnssd, port)) {
            Ok(a) => Arc::new(a),
            Err(e) => {
                log::warn!("{e}; serving without DNS-SD");
                return serve(opts, None);
            }
        };
    let target = Arc::clone(&announcer);
    let hook: TenantHook = Arc::new(move |tenants| target.set_tenants(tenants));
    let result = serve(opts, Some(hook));
    announcer.stop();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::net::IpAddr;

    fn opts(args: &[&str]) -> CpuOptions {
        CpuOptions::from_decpu_args(args.iter().copied()).unwrap()
    }

    fn candidate(name: &str, addrs: &[&str], txt: &[(&str, &str)]) -> Candidate {
        Candidate {
            fullname: format!("{name}._ncpu._tcp.local."),
            host: format!("{name}.local."),
            port: 17010,
            addresses: addrs.iter().map(|a| a.parse::<IpAddr>().unwrap()).collect(),
            link_local: Vec::new(),
            zones: Vec::new(),
            txt: txt.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn plain_host_goes_straight_to_the_client() {
        let seen = RefCell::new(Vec::new());
        let status = run_decpu_with(opts(&["board", "date"]), Duration::ZERO, |o| {
            seen.borrow_mut().push((o.host.clone(), o.port.clone()));
            Ok(7)
        })
        .unwrap();
        assert_eq!(status, 7);
        assert_eq!(seen.into_inner(), vec![(Some("board".to_string()), String::new())]);
    }

    #[test]
    fn usage_errors_before_browsing() {
        let never = |_: CpuOptions| -> Result<i32> { panic!("must not connect") };
        let e = run_decpu_with(opts(&["-n", "2", "."]), Duration::ZERO, never).unwrap_err();
        assert!(e.to_string().starts_with("Interactive access with more than one CPU"), "{e}");
        assert_eq!(e.exit_code(), 2);
        let e = run_decpu_with(opts(&["-n", "2", "board", "date"]), Duration::ZERO, never).unwrap_err();
        assert!(matches!(e, Error::Usage(_)));
        let e = run_decpu_with(opts(&["dnssd://?arch=", "date"]), Duration::ZERO, never).unwrap_err();
        assert!(matches!(e, Error::Usage(_)));
        let e = run_decpu_with(opts(&["dnssd://_x.example.com", "date"]), Duration::ZERO, never).unwrap_err();
        assert!(matches!(e, Error::Usage(_)));
    }

    #[test]
    fn falls_back_to_the_next_address_and_server_on_connection_failure() {
        let list = vec![
            candidate("a", &["10.0.0.1", "2001:db8::1"], &[]),
            candidate("b", &["10.0.0.2"], &[]),
            candidate("c", &["10.0.0.3"], &[]),
        ];
        let tried = RefCell::new(Vec::new());
        let status = run_on_servers(&opts(&[".", "date"]), list.clone(), &mut |o: CpuOptions| {
            let host = o.host.clone().unwrap();
            tried.borrow_mut().push(format!("{host} {}", o.port));
            if host == "10.0.0.2" {
                Ok(3)
            } else {
                Err(Error::Connect("refused".into()))
            }
        })
        .unwrap();
        assert_eq!(status, 3);
        assert_eq!(tried.take(), vec!["10.0.0.1 17010", "2001:db8::1 17010", "10.0.0.2 17010"]);

        // An authentication failure is not a reason to go elsewhere.
        let e = run_on_servers(&opts(&[".", "date"]), list.clone(), &mut |_| Err(Error::Auth("no".into())))
            .unwrap_err();
        assert!(matches!(e, Error::Auth(_)));

        // Nobody reachable: a connection error naming them.
        let e = run_on_servers(&opts(&[".", "date"]), list.clone(), &mut |_| {
            Err(Error::Connect("refused".into()))
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 255);
        assert!(e.to_string().contains("a: 10.0.0.1: refused"), "{e}");

        // -n 2: two servers, worst status; -n 4 with three servers: the missing one is 255.
        let mut next = [0, 5, 1].into_iter();
        let status = run_on_servers(&opts(&["-n", "2", ".", "date"]), list.clone(), &mut |_| {
            Ok(next.next().unwrap_or(0))
        })
        .unwrap();
        assert_eq!(status, 5);
        let status = run_on_servers(&opts(&["-n", "4", ".", "date"]), list, &mut |_| Ok(0)).unwrap();
        assert_eq!(status, 255);
    }

    #[test]
    fn selection_drops_and_orders() {
        let q = Query::parse("dnssd://?arch=*&os=*&cores=>4&sort=tenants").unwrap();
        let found = vec![
            candidate("small", &["10.0.0.1"], &[("cores", "2"), ("tenants", "0")]),
            candidate("busy", &["10.0.0.2"], &[("cores", "8"), ("tenants", "3")]),
            candidate("idle", &["10.0.0.3"], &[("cores", "8"), ("tenants", "1")]),
            candidate("nowhere", &[], &[("cores", "8"), ("tenants", "0")]),
        ];
        let names: Vec<String> = select(&q, found).iter().map(|c| c.instance().to_string()).collect();
        assert_eq!(names, ["idle", "busy"]);
    }

    #[test]
    fn decpud_serves_without_announcing_when_it_cannot() {
        let mut o = CpudOptions::from_args(["-sp", "/tmp/cpud.sock", "-net", "unix"], true).unwrap();
        let hooked = run_decpud(o.clone(), |_, hook| Ok(hook.is_some()).map(|h| assert!(!h)));
        assert!(hooked.is_ok());
        o.dnssd.enabled = false;
        let r = run_decpud(
            o,
            |_, hook| if hook.is_none() { Err(Error::Daemon("served".into())) } else { Ok(()) },
        );
        assert_eq!(r.unwrap_err().to_string(), "served");
    }
}

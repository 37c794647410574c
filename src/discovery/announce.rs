//! decpud's announcement: registers `<host>-cpud._ncpu._tcp.local.` with the TXT metadata of
//! [`sysinfo`](super::sysinfo), re-announces it every minute and whenever the number of
//! sessions changes, and says goodbye (unregisters) when dropped.
//!
//! It owns one mDNS responder thread (mdns-sd) and one refresh thread; it does not know
//! about SSH: the server reports sessions through [`Announcer::set_tenants`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceInfo};

use crate::discovery::interfaces;
use crate::discovery::query::Query;
use crate::discovery::sysinfo::Metadata;
use crate::error::{Error, Result};
use crate::options::DnssdOptions;

/// How often the TXT record is recomputed and announced again (as Go).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// The port to announce from decpud's `-sp`: only a TCP port number can be announced.
pub fn announce_port(net: &str, sp: &str) -> Result<u16> {
    if !matches!(net, "" | "tcp" | "tcp4" | "tcp6") {
        return Err(Error::Usage(format!(
            "dnssd: not announcing: -net {net} is not reachable over IP (only tcp is announced)"
        )));
    }
    match sp.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(Error::Usage(format!("dnssd: not announcing: -sp {sp:?} is not a TCP port number"))),
    }
}

/// A live announcement. Dropping it unregisters the service.
pub struct Announcer {
    shared: Arc<Shared>,
    control: Mutex<Control>,
}

/// What [`Announcer::stop`] has to end; both None once stopped.
struct Control {
    /// Wakes the refresh thread to announce now; dropping it ends the thread.
    kick: Option<mpsc::Sender<()>>,
    refresher: Option<JoinHandle<()>>,
}

struct Shared {
    daemon: ServiceDaemon,
    service_type: String,
    instance: String,
    host: String,
    port: u16,
    state: Mutex<State>,
    /// Set by [`Announcer::stop`]: no more (re-)registrations.
    stopped: AtomicBool,
    /// Successful (re-)registrations so far.
    announcements: AtomicU64,
}

struct State {
    metadata: Metadata,
    tenants: usize,
    txt: BTreeMap<String, String>,
}

impl Announcer {
    /// Registers the service on the interfaces [`interfaces::announce_plan`] picks for
    /// `opts.interface` and starts refreshing.
    pub fn start(opts: &DnssdOptions, port: u16) -> Result<Announcer> {
        Self::start_with_interval(opts, port, REFRESH_INTERVAL)
    }

    /// As [`Announcer::start`] with another refresh interval (tests).
    pub fn start_with_interval(opts: &DnssdOptions, port: u16, refresh: Duration) -> Result<Announcer> {
        let service = if opts.service.is_empty() { "_ncpu._tcp" } else { &opts.service };
        let domain = if opts.domain.is_empty() { "local" } else { &opts.domain };
        let probe = Query {
            instance: String::new(),
            service: service.to_string(),
            domain: domain.to_string(),
            requirements: Vec::new(),
            sort: Vec::new(),
        };
        let service_type = probe.browse_name()?;
        let host_label = host_label();
        let instance =
            if opts.instance.is_empty() { format!("{host_label}-cpud") } else { opts.instance.clone() };
        if instance.contains('.') || instance.is_empty() || instance.len() > 63 {
            return Err(Error::Usage(format!(
                "dnssd: instance name {instance:?} must be 1 to 63 bytes without '.'"
            )));
        }
        let metadata = Metadata::new(&opts.txt)?;
        let plan = interfaces::announce_plan(
            &opts.interface,
            &interfaces::list()?,
            interfaces::name_to_index(&opts.interface).is_some(),
        )?;
        let daemon =
            ServiceDaemon::new().map_err(|e| Error::Daemon(format!("dnssd: cannot start mDNS: {e}")))?;
        if let Err(e) = interfaces::apply(&daemon, &plan) {
            let _ = daemon.shutdown();
            return Err(e);
        }
        let shared = Arc::new(Shared {
            daemon,
            service_type,
            instance,
            host: format!("{host_label}.local."),
            port,
            state: Mutex::new(State { metadata, tenants: 0, txt: BTreeMap::new() }),
            stopped: AtomicBool::new(false),
            announcements: AtomicU64::new(0),
        });
        if let Err(e) = shared.announce() {
            let _ = shared.daemon.shutdown();
            return Err(e);
        }
        let (kick, kicks) = mpsc::channel::<()>();
        let for_thread = Arc::clone(&shared);
        let refresher = std::thread::Builder::new()
            .name("dnssd-refresh".into())
            .spawn(move || loop {
                match kicks.recv_timeout(refresh) {
                    // A burst of session changes becomes one announcement.
                    Ok(()) => while kicks.try_recv().is_ok() {},
                    Err(RecvTimeoutError::Timeout) => {}
                    // stop() dropped the sender.
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                if let Err(e) = for_thread.announce() {
                    log::warn!("{e}");
                }
            })
            .map_err(|e| Error::io("dnssd: starting the refresh thread", e))?;
        log::debug!("dnssd: announced {} on port {port}", shared.fullname());
        Ok(Announcer {
            shared,
            control: Mutex::new(Control { kick: Some(kick), refresher: Some(refresher) }),
        })
    }

    /// Records the number of sessions; the refresh thread announces the new TXT record at
    /// once. Never blocks on I/O, so the server may call it from async code.
    pub fn set_tenants(&self, tenants: usize) {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner).tenants = tenants;
        let control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(kick) = &control.kick {
            let _ = kick.send(());
        }
    }

    /// `<instance>.<type>.<domain>.`
    pub fn fullname(&self) -> String {
        self.shared.fullname()
    }

    /// How many times the record has been (re-)announced: start, refreshes, tenant changes.
    pub fn announcements(&self) -> u64 {
        self.shared.announcements.load(Ordering::SeqCst)
    }

    /// The TXT record last announced.
    pub fn txt(&self) -> BTreeMap<String, String> {
        self.shared.state.lock().unwrap_or_else(PoisonError::into_inner).txt.clone()
    }

    /// Unregisters (sends goodbye packets) and stops the responder. Later calls, and
    /// [`Announcer::set_tenants`] after it, do nothing.
    pub fn stop(&self) {
        let (kick, refresher) = {
            let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
            (control.kick.take(), control.refresher.take())
        };
        let Some(kick) = kick else { return };
        self.shared.stopped.store(true, Ordering::SeqCst);
        drop(kick);
        if let Some(t) = refresher {
            let _ = t.join();
        }
        // Hold the state lock so no registration races the goodbye.
        let _state = self.shared.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Ok(status) = self.shared.daemon.unregister(&self.shared.fullname()) {
            let _ = status.recv_timeout(Duration::from_secs(2));
        }
        if let Ok(done) = self.shared.daemon.shutdown() {
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
        log::debug!("dnssd: withdrew {}", self.shared.fullname());
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Shared {
    fn fullname(&self) -> String {
        format!("{}.{}", self.instance, self.service_type)
    }

    /// Recomputes the TXT record and (re-)registers the service, which announces it.
    fn announce(&self) -> Result<()> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        let tenants = state.tenants;
        let txt = state.metadata.txt(tenants);
        let properties: Vec<(String, String)> = txt.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let info =
            ServiceInfo::new(&self.service_type, &self.instance, &self.host, (), self.port, &properties[..])
                .map_err(|e| Error::Daemon(format!("dnssd: bad service record: {e}")))?
                .enable_addr_auto();
        self.daemon
            .register(info)
            .map_err(|e| Error::Daemon(format!("dnssd: cannot announce {}: {e}", self.fullname())))?;
        state.txt = txt;
        self.announcements.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The first label of the host name, spaces made `-` (the SRV target, as Go).
fn host_label() -> String {
    let uname = rustix::system::uname();
    let name = uname.nodename().to_string_lossy();
    let label = name.split('.').next().unwrap_or("").trim().replace(' ', "-");
    if label.is_empty() {
        "cpu".to_string()
    } else {
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tcp_ports_are_announced() {
        assert_eq!(announce_port("tcp", "17010").unwrap(), 17010);
        assert_eq!(announce_port("", "22").unwrap(), 22);
        let e = announce_port("unix", "/run/cpud.sock").unwrap_err();
        assert!(e.to_string().contains("-net unix"), "{e}");
        let e = announce_port("tcp", "/run/cpud.sock").unwrap_err();
        assert!(e.to_string().contains("not a TCP port number"), "{e}");
        assert!(announce_port("vsock", "17010").is_err());
        assert!(announce_port("tcp", "0").is_err());
        assert!(announce_port("tcp", "70000").is_err());
    }

    #[test]
    fn bad_settings_are_errors_before_anything_is_sent() {
        let base = DnssdOptions {
            enabled: true,
            instance: String::new(),
            domain: "local".into(),
            service: "_ncpu._tcp".into(),
            interface: String::new(),
            txt: String::new(),
        };
        let with = |f: &dyn Fn(&mut DnssdOptions)| {
            let mut o = base.clone();
            f(&mut o);
            Announcer::start(&o, 17010).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert!(with(&|o| o.domain = "example.com".into()).contains("only the multicast DNS domain"));
        assert!(with(&|o| o.service = "ncpu".into()).contains("service type"));
        assert!(with(&|o| o.instance = "a.b".into()).contains("without '.'"));
        assert!(with(&|o| o.interface = "no-such-if0".into()).contains("no network interface"));
        assert!(with(&|o| o.txt = "=x".into()).contains("empty key"));
    }
}

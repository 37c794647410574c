//! cpud's SSH server: accept connections, authenticate keys, and serve session channels and
//! loopback remote forwards.
//!
//! [`serve`] takes the listener and a shutdown future (mini-redis style), so tests bind
//! 127.0.0.1:0 and drive the real server in-process. Once the shutdown future completes, no
//! connection is accepted and no channel opened; a connection with no command running (an
//! idle ControlMaster, a handshake) is closed at once, the others when their last command
//! ends, so a stopped daemon exits instead of waiting for a master that persists forever.
//!
//! Per connection, a russh [`Handler`] answers authentication (every key of the
//! authorized_keys file, re-read on each attempt), channel requests (the replies; the work
//! happens in `ssh::session`), and the global
//! `tcpip-forward` / `cancel-tcpip-forward` requests (loopback only, port 0 allowed, the
//! allocated port returned, the bind address echoed verbatim in `forwarded-tcpip`).
//!
//! Robustness against unauthenticated peers: admission control on accept
//! ([`crate::ssh::admission`]: MaxStartups random early drop, a per-source limit with a
//! bounded waiting line, eviction of the busiest source's oldest handshake); a short grace for
//! the client's identification line, a bounded time to authenticate and a bounded amount of
//! CPU spent on the connection before it authenticates beyond its first key exchange (a
//! client may re-exchange keys at any time, and a group14 re-exchange costs cpud tens of
//! milliseconds and the client nothing); a connection past any of these is cut: its stream
//! starts failing, which ends russh's loop; key exchange limited to
//! algorithms whose cost a peer cannot inflate ([`SERVER_KEX`]), DH values checked as OpenSSH
//! does and one modp exponentiation at a time daemon-wide ([`crate::ssh::kexcheck`]); and each
//! connection runs on a thread of its own with its own current-thread runtime, so one peer's
//! handshake crypto never stalls another connection's sessions. Against authenticated ones:
//! per-session env caps, channel and forward caps, and forwarded connections pumped so that a
//! local end that stops reading never stalls the connection. Nothing read from the network
//! can panic this module.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, SshId};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Error, Result};
use crate::ssh::admission::{self, Admission, AdmissionConfig, Source, Ticket};
use crate::ssh::authorized_keys::{AuthorizedKeys, Permissions, Verdict};
use crate::ssh::backlog::Backlog;
use crate::ssh::hostkey::fingerprint;
use crate::ssh::kexcheck::ClearTextInspector;
use crate::ssh::session::{self, OnEnd, SessionContext, Tenants};
use crate::task;
use crate::transport::{BoxStream, Detached, Listener};

/// The key exchanges offered: fixed cost per attempt whatever the peer sends (no group16/18,
/// no group exchange, no SHA-1 groups). mlkem768x25519 is curve25519 plus a fixed-size
/// ML-KEM; OpenSSH 9.9+ prefers it (10.1 warns without a post-quantum exchange).
pub const SERVER_KEX: &[russh::kex::Name] = &[
    russh::kex::MLKEM768X25519_SHA256,
    russh::kex::CURVE25519,
    russh::kex::CURVE25519_PRE_RFC_8731,
    russh::kex::ECDH_SHA2_NISTP256,
    russh::kex::DH_G14_SHA256,
    russh::kex::EXTENSION_SUPPORT_AS_SERVER,
    russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];
/// The modp groups among [`SERVER_KEX`] (their public values get OpenSSH's extra check).
const MODP_KEX: &[&str] = &["diffie-hellman-group14-sha256"];
/// Host-key and user-signature algorithms (also sent as server-sig-algs): russh's defaults
/// without `ssh-rsa`, whose signatures use SHA-1 (OpenSSH 8.8+ refuses them by default).
fn signature_algorithms() -> Vec<russh::keys::Algorithm> {
    russh::Preferred::DEFAULT.key.iter().filter(|a| !is_sha1_rsa(a)).cloned().collect()
}

fn is_sha1_rsa(algorithm: &russh::keys::Algorithm) -> bool {
    matches!(algorithm, russh::keys::Algorithm::Rsa { hash: None })
}

/// Stack of a connection's thread (its futures live on the heap; crypto needs little stack).
const CONNECTION_STACK: usize = 1 << 20;
/// How long a finished connection's runtime waits for stray tasks before cancelling them.
const CONNECTION_SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Session channels open at once on one connection.
const MAX_CHANNELS_PER_CONNECTION: usize = 64;
/// Remote forwards at once on one connection (cpu uses one).
const MAX_FORWARDS_PER_CONNECTION: usize = 16;
/// CPU an unauthenticated connection may use after its first key exchange, beyond
/// [`ServerConfig::preauth_cpu_floor`], in multiples of what that exchange cost: an
/// elliptic-curve exchange is cheap (so ten signature checks on a slow board still fit),
/// a group14 one is itself about a hundred of them (so one more at most).
const PREAUTH_CPU_PER_EC_KEX: u32 = 16;
const PREAUTH_CPU_PER_MODP_KEX: u32 = 1;
/// Lines about peers that have not authenticated, at most this many per
/// [`PREAUTH_LOG_WINDOW`] (the rest at debug level): see [`PreauthLog`].
const PREAUTH_LOG_BURST: u32 = 20;
const PREAUTH_LOG_WINDOW: Duration = Duration::from_secs(10);
/// While the daemon stops: how often a connection looks whether its last command has ended.
const STOPPING_POLL: Duration = Duration::from_millis(100);

/// Everything the server needs; build with [`ServerConfig::new`] and adjust fields.
#[derive(Clone)]
pub struct ServerConfig {
    pub host_key: PrivateKey,
    /// The authorized_keys file, re-read on every attempt; None: no authentication at all
    /// (`-pk ""`, Go compatibility).
    pub authorized_keys: Option<PathBuf>,
    /// A connection must finish key exchange and authentication within this time (sshd's
    /// LoginGraceTime).
    pub handshake_timeout: Duration,
    /// A connection must send its SSH identification line within this time.
    pub banner_grace: Duration,
    /// CPU a connection may use before it authenticates, after its first key exchange, on
    /// top of a multiple of that exchange's own cost (see [`preauth_cpu_budget`]).
    pub preauth_cpu_floor: Duration,
    /// Limits on connections that have not authenticated yet.
    pub admission: AdmissionConfig,
    /// Between SIGHUP and SIGKILL for the command of a client that went away.
    pub hangup_grace: Duration,
    /// The program run for cpu-form exec strings as `cpud -remote ...`.
    pub remote_program: PathBuf,
    /// The SSH identification string (without `\r\n`).
    pub server_id: String,
    /// Keepalive probe interval for established connections (dead clients are dropped after
    /// three unanswered probes).
    pub keepalive_interval: Duration,
    /// Called with the number of running sessions whenever it changes (decpud's tenants).
    pub on_tenants: Option<Arc<dyn Fn(usize) + Send + Sync>>,
}

impl ServerConfig {
    pub fn new(host_key: PrivateKey, authorized_keys: Option<PathBuf>) -> ServerConfig {
        ServerConfig {
            host_key,
            authorized_keys,
            handshake_timeout: Duration::from_secs(30),
            banner_grace: Duration::from_secs(5),
            preauth_cpu_floor: Duration::from_millis(20),
            admission: AdmissionConfig::default(),
            hangup_grace: Duration::from_secs(2),
            remote_program: PathBuf::from("/proc/self/exe"),
            server_id: format!("SSH-2.0-cpu-all_{}", env!("CARGO_PKG_VERSION")),
            keepalive_interval: Duration::from_secs(30),
            on_tenants: None,
        }
    }
}

/// What every connection shares.
struct Shared {
    russh: Arc<russh::server::Config>,
    authorized_keys: Option<PathBuf>,
    handshake_timeout: Duration,
    banner_grace: Duration,
    preauth_cpu_floor: Duration,
    hangup_grace: Duration,
    remote_program: PathBuf,
    tenants: Arc<Tenants>,
    admission: Arc<Admission>,
    /// One modp (group14) exponentiation at a time in the whole daemon: a flood of them
    /// occupies one core at most, and the cheap elliptic-curve exchanges of real clients
    /// run beside it.
    modp_gate: Arc<Semaphore>,
    /// True once the daemon stops: connections end when no command runs on them.
    stopping: tokio::sync::watch::Sender<bool>,
    preauth_log: Arc<PreauthLog>,
}

/// How many log lines peers that have not authenticated may cause. A peer decides how many
/// there are (ten rejected keys per connection, dropped handshakes), and a cpud on a board
/// often logs to a serial console (about 11 KB/s at 115200 baud) whose writes block once it
/// is full: every thread that logs then waits, the accept loop and legitimate logins
/// included. So at most [`PREAUTH_LOG_BURST`] such lines per [`PREAUTH_LOG_WINDOW`] go out
/// at their level, the rest at debug, counted in the next line that goes out.
#[derive(Default)]
pub struct PreauthLog {
    window: Mutex<LogWindow>,
}

#[derive(Default)]
struct LogWindow {
    start: Option<std::time::Instant>,
    shown: u32,
    held_back: u64,
}

impl PreauthLog {
    /// Whether a line may go out at its level at `now`, and how many were held back before
    /// it (None: log it at debug level).
    pub fn admit_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.start.is_none_or(|s| now.saturating_duration_since(s) >= PREAUTH_LOG_WINDOW) {
            w.start = Some(now);
            w.shown = 0;
        }
        if w.shown < PREAUTH_LOG_BURST {
            w.shown += 1;
            Some(std::mem::take(&mut w.held_back))
        } else {
            w.held_back += 1;
            None
        }
    }

    /// Logs `line` at `level`, or at debug level past the budget.
    fn log(&self, level: log::Level, line: std::fmt::Arguments<'_>) {
        match self.admit_at(std::time::Instant::now()) {
            Some(0) => log::log!(level, "{line}"),
            Some(n) => log::log!(level, "{line} ({n} more lines about unauthenticated peers not shown)"),
            None => log::debug!("{line}"),
        }
    }
}

impl Shared {
    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }
}

/// Completes once the daemon stops (see [`Shared::stopping`]).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    // An Err means the sender is gone, which the connection's own Arc<Shared> prevents.
    if rx.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Serves connections from `listener` until `shutdown` completes; then stops accepting and
/// waits for the open connections to end (sessions in progress are not cut).
pub async fn serve(
    listener: Listener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let mut methods = MethodSet::empty();
    if config.authorized_keys.is_some() {
        methods.push(MethodKind::PublicKey);
    } else {
        methods.push(MethodKind::None);
    }
    if !config.server_id.starts_with("SSH-2.0-") || config.server_id.contains(['\r', '\n']) {
        return Err(Error::Daemon(format!("bad SSH identification string {:?}", config.server_id)));
    }
    let russh_config = russh::server::Config {
        server_id: SshId::Standard(Cow::Owned(config.server_id.clone())),
        methods,
        // Keys are public and the user name is ignored: a slow rejection protects nothing,
        // and OpenSSH's first "none" probe would cost every login a second.
        auth_rejection_time: Duration::from_millis(50),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![config.host_key.clone()],
        inactivity_timeout: Some(Duration::from_secs(15 * 60)),
        keepalive_interval: Some(config.keepalive_interval),
        keepalive_max: 3,
        nodelay: true,
        preferred: russh::Preferred {
            kex: Cow::Borrowed(SERVER_KEX),
            key: Cow::Owned(signature_algorithms()),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    };
    let shared = Arc::new(Shared {
        russh: Arc::new(russh_config),
        authorized_keys: config.authorized_keys.clone(),
        handshake_timeout: config.handshake_timeout,
        banner_grace: config.banner_grace.min(config.handshake_timeout),
        preauth_cpu_floor: config.preauth_cpu_floor,
        hangup_grace: config.hangup_grace,
        remote_program: config.remote_program.clone(),
        tenants: Tenants::new(config.on_tenants.clone()),
        admission: Admission::new(config.admission),
        modp_gate: Arc::new(Semaphore::new(1)),
        stopping: tokio::sync::watch::channel(false).0,
        preauth_log: Arc::default(),
    });
    let mut connections = JoinSet::new();
    let mut drops = DropLog::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept_detached() => match accepted {
                Ok((stream, peer)) => match shared.admission.admit(Source::of_peer(&peer)) {
                    admission::Verdict::Refused(admission::Refusal::PerSource { limit }) => {
                        let source = Source::of_peer(&peer);
                        match shared.admission.queue(&source) {
                            Some(place) => {
                                connections.spawn(wait_for_turn(stream, peer, source, shared.clone(), place));
                            }
                            None => drops.note(&peer, &admission::Refusal::PerSource { limit }),
                        }
                    }
                    admission::Verdict::Refused(why) => drops.note(&peer, &why),
                    admission::Verdict::Admitted { ticket, evicted } => {
                        match spawn_connection(stream, peer.clone(), shared.clone(), ticket, evicted) {
                            Ok(done) => {
                                connections.spawn(async move {
                                    let _ = done.await;
                                });
                            }
                            Err(e) => log::warn!("dropping connection from {peer}: no thread for it: {e}"),
                        }
                    }
                },
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    shared.stopping.send_replace(true);
    log::info!(
        "no longer accepting connections; of {} open, those with no command running close now, \
         the others when their commands end",
        connections.len()
    );
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Logs refused connections without letting a flood fill the log: the first of a burst in
/// full, then one summary line per [`DROP_LOG_INTERVAL`] (every drop is logged at debug).
#[derive(Default)]
struct DropLog {
    since_summary: u64,
    last_summary: Option<std::time::Instant>,
}

const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl DropLog {
    fn note(&mut self, peer: &str, why: &admission::Refusal) {
        log::debug!("dropping connection from {peer}: {why}");
        let now = std::time::Instant::now();
        match self.last_summary {
            Some(t) if now.duration_since(t) < DROP_LOG_INTERVAL => self.since_summary += 1,
            Some(_) => {
                log::info!(
                    "dropped {} connections in the last {DROP_LOG_INTERVAL:?}; now {peer}: {why}",
                    self.since_summary + 1
                );
                self.since_summary = 0;
                self.last_summary = Some(now);
            }
            None => {
                log::info!("dropping connection from {peer}: {why}");
                self.last_summary = Some(now);
            }
        }
    }
}

/// A connection over its source's limit: waits (without a thread) for one of the source's
/// handshakes to end, for at most [`AdmissionConfig::queue_wait`]; then runs like any other.
async fn wait_for_turn(
    stream: Detached,
    peer: String,
    source: Source,
    shared: Arc<Shared>,
    place: admission::QueuePlace,
) {
    let wait = shared.admission.config().queue_wait;
    let verdict = shared.admission.admit_when_possible(source, wait).await;
    drop(place);
    match verdict {
        admission::Verdict::Admitted { ticket, evicted } => {
            match spawn_connection(stream, peer.clone(), shared, ticket, evicted) {
                Ok(done) => {
                    let _ = done.await;
                }
                Err(e) => log::warn!("dropping connection from {peer}: no thread for it: {e}"),
            }
        }
        admission::Verdict::Refused(why) => {
            log::debug!("dropping connection from {peer} after waiting: {why}")
        }
    }
}

/// Runs one connection on a thread of its own (with its own current-thread runtime, so its
/// key exchange cannot stall other connections); the receiver completes when it is over.
fn spawn_connection(
    stream: Detached,
    peer: String,
    shared: Arc<Shared>,
    ticket: Ticket,
    evicted: oneshot::Receiver<()>,
) -> std::io::Result<oneshot::Receiver<()>> {
    let (done_tx, done_rx) = oneshot::channel();
    let builder = std::thread::Builder::new().name("cpud-conn".into()).stack_size(CONNECTION_STACK);
    task::thread(builder, move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => {
                // Registered with this thread's runtime: its readiness wakes this thread only.
                runtime.block_on(async {
                    match stream.attach() {
                        Ok(stream) => connection(stream, peer, shared, ticket, evicted).await,
                        Err(e) => log::warn!("{peer}: dropped: cannot register its socket: {e}"),
                    }
                });
                runtime.shutdown_timeout(CONNECTION_SHUTDOWN_GRACE);
            }
            Err(e) => log::warn!("{peer}: dropped: no runtime for it: {e}"),
        }
        let _ = done_tx.send(());
    })?;
    Ok(done_rx)
}

async fn connection(
    stream: BoxStream,
    peer: String,
    shared: Arc<Shared>,
    mut ticket: Ticket,
    mut evicted: oneshot::Receiver<()>,
) {
    let (kill_tx, kill_rx) = oneshot::channel::<()>();
    let authenticated = Arc::new(AtomicBool::new(false));
    let inspector =
        ClearTextInspector::new(&SERVER_KEX.iter().map(|n| n.as_ref()).collect::<Vec<_>>(), MODP_KEX);
    let stream = Killable {
        inner: crate::ssh::coalesce::Coalesced::without_deferral(stream),
        kill: kill_rx,
        dead: false,
        disarmed: false,
        inspector: Some(inspector),
        modp_gate: shared.modp_gate.clone(),
        gated: None,
        held: None,
        unread: Vec::new(),
        cpu: PreauthCpu::new(shared.preauth_cpu_floor, authenticated.clone()),
        peer: peer.clone(),
        log: shared.preauth_log.clone(),
    };
    let (auth_tx, auth_rx) = oneshot::channel::<()>();
    // Every session task holds a clone of the sender: recv() ends when the last one is done.
    let (tasks_tx, mut tasks_rx) = mpsc::channel::<()>(1);
    let handler = ConnHandler::new(peer.clone(), shared.clone(), auth_tx, authenticated, tasks_tx);
    let channels = handler.channels.clone();
    let mut stopping = shared.stopping.subscribe();
    let deadline = tokio::time::sleep(shared.handshake_timeout);
    tokio::pin!(deadline);
    let banner_deadline = tokio::time::sleep(shared.banner_grace);
    let start = russh::server::run_stream(shared.russh.clone(), stream, handler);
    let running = tokio::select! {
        r = start => match r {
            Ok(s) => s,
            Err(e) => {
                log::debug!("{peer}: no SSH session: {e}");
                return;
            }
        },
        () = banner_deadline => {
            let grace = shared.banner_grace;
            shared.preauth_log.log(log::Level::Info, format_args!("{peer}: dropped, no SSH identification within {grace:?}"));
            return;
        }
        Ok(()) = &mut evicted => {
            shared.preauth_log.log(
                log::Level::Info,
                format_args!("{peer}: dropped before its identification: a less busy source needed the slot"),
            );
            return;
        }
        () = stopped(&mut stopping) => {
            log::debug!("{peer}: dropped before its identification: cpud is stopping");
            return;
        }
    };
    let handle = running.handle();
    tokio::pin!(running);
    let mut stop_requested = false;
    let mut closing = false;
    let mut stop_poll = tokio::time::interval(STOPPING_POLL);
    stop_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut auth_rx = Some(auth_rx);
    let mut kill_tx = Some(kill_tx);
    let result = loop {
        tokio::select! {
            r = &mut running => break r,
            ok = async { match auth_rx.as_mut() { Some(rx) => rx.await.is_ok(), None => std::future::pending().await } } => {
                auth_rx = None;
                if ok {
                    ticket.release();
                }
            }
            () = &mut deadline, if !ticket.is_released() => {
                let limit = shared.handshake_timeout;
                shared.preauth_log.log(log::Level::Info, format_args!("{peer}: dropped, handshake not finished within {limit:?}"));
                if let Some(k) = kill_tx.take() {
                    let _ = k.send(());
                }
                ticket.release();
            }
            Ok(()) = &mut evicted, if !ticket.is_released() => {
                shared.preauth_log.log(
                    log::Level::Info,
                    format_args!("{peer}: dropped during its handshake: a less busy source needed the slot"),
                );
                if let Some(k) = kill_tx.take() {
                    let _ = k.send(());
                }
                ticket.release();
            }
            () = stopped(&mut stopping), if !stop_requested => stop_requested = true,
            _ = stop_poll.tick(), if stop_requested && !closing => {
                let running_command =
                    channels.lock().unwrap_or_else(|p| p.into_inner()).values().any(|c| c.started);
                if !running_command {
                    closing = true;
                    log::debug!("{peer}: cpud is stopping and no command runs here: closing the connection");
                    if !ticket.is_released() {
                        // Still in its handshake: no goodbye to say, cut it.
                        if let Some(k) = kill_tx.take() {
                            let _ = k.send(());
                        }
                    } else {
                        let _ = handle
                            .disconnect(russh::Disconnect::ByApplication, "cpud is stopping".into(), String::new())
                            .await;
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        log::debug!("{peer}: connection ended: {e}");
    }
    drop(kill_tx);
    // Sessions outlive the connection by their hang-up grace (SIGHUP, then SIGKILL).
    while tasks_rx.recv().await.is_some() {}
}

type PermitFuture = Pin<
    Box<dyn Future<Output = std::result::Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>,
>;

/// A stream that can be made to fail from outside, which ends russh's session loop (the
/// running session has no other off switch). It also shows the client's clear-text key
/// exchange to a [`ClearTextInspector`], fails when that refuses it, and holds back a modp
/// KEXDH_INIT until the daemon-wide modp permit is free (kept until russh writes its reply,
/// i.e. until the exponentiations are done).
struct Killable {
    /// Reads buffered and written packets held until russh waits for input (see
    /// [`crate::ssh::coalesce`]): a cpu client's ~35 pipelined env requests were ~100
    /// recvfrom calls, and their replies ~35 sends and as many wake-ups of the client.
    inner: crate::ssh::coalesce::Coalesced<BoxStream>,
    kill: oneshot::Receiver<()>,
    dead: bool,
    disarmed: bool,
    inspector: Option<ClearTextInspector>,
    modp_gate: Arc<Semaphore>,
    /// Waiting for the modp permit.
    gated: Option<PermitFuture>,
    held: Option<OwnedSemaphorePermit>,
    /// Bytes read but not yet handed to russh (held back for the permit).
    unread: Vec<u8>,
    /// What the connection's thread has computed before authentication.
    cpu: PreauthCpu,
    peer: String,
    log: Arc<PreauthLog>,
}

/// The CPU clock of the calling thread (each connection has a thread of its own).
fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, exclusively borrowed timespec, which clock_gettime only writes.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    (r == 0).then(|| Duration::new(secs, nanos.min(999_999_999)))
}

/// What an unauthenticated connection may compute after its first key exchange that cost
/// `first_kex`: the floor, plus a multiple of that cost (which also scales the budget to
/// the machine and the build: a debug build or a slow board is slower at both).
pub fn preauth_cpu_budget(floor: Duration, first_kex: Duration, modp: bool) -> Duration {
    let per = if modp { PREAUTH_CPU_PER_MODP_KEX } else { PREAUTH_CPU_PER_EC_KEX };
    floor.saturating_add(first_kex.saturating_mul(per))
}

/// The CPU bookkeeping of a connection before it authenticates. Measured on the
/// connection's own thread, where russh does all of its work.
struct PreauthCpu {
    floor: Duration,
    authenticated: Arc<AtomicBool>,
    /// The thread's CPU clock when the connection started (None: no clock, no limit).
    start: Option<Duration>,
    /// Whether the first exchange was a modp one.
    modp: bool,
    /// Once the first exchange is over: the clock then and what may be spent after it.
    limit: Option<(Duration, Duration)>,
}

impl PreauthCpu {
    fn new(floor: Duration, authenticated: Arc<AtomicBool>) -> PreauthCpu {
        PreauthCpu { floor, authenticated, start: thread_cpu_time(), modp: false, limit: None }
    }

    /// The client's first NEWKEYS went by: russh has done the exchange's work.
    fn first_kex_done(&mut self) {
        if let (Some(start), Some(now), None) = (self.start, thread_cpu_time(), self.limit) {
            let cost = now.saturating_sub(start);
            self.limit = Some((now, preauth_cpu_budget(self.floor, cost, self.modp)));
        }
    }

    /// (spent, allowed) when the connection, still unauthenticated, has gone past its budget.
    fn exceeded(&self) -> Option<(Duration, Duration)> {
        let (since, allowed) = self.limit?;
        if self.authenticated.load(Ordering::Relaxed) {
            return None;
        }
        let spent = thread_cpu_time()?.saturating_sub(since);
        (spent > allowed).then_some((spent, allowed))
    }
}

impl Killable {
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if !self.dead && !self.disarmed {
            match Pin::new(&mut self.kill).poll(cx) {
                Poll::Ready(Ok(())) => self.dead = true,
                // The switch's owner is gone: nothing can fire it any more.
                Poll::Ready(Err(_)) => self.disarmed = true,
                Poll::Pending => {}
            }
        }
        if self.dead {
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "handshake timeout"))
        } else {
            Ok(())
        }
    }
}

impl AsyncRead for Killable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let read = self.as_mut().poll_read_now(cx, buf);
        // russh waits for input now: what it wrote goes out (also while the modp gate keeps
        // the socket unread). If the socket is full, its writability wakes this task, which
        // polls the read again.
        if read.is_pending() {
            if let Poll::Ready(Err(e)) = self.inner.poll_send_unsent(cx) {
                return Poll::Ready(Err(e));
            }
        }
        read
    }
}

impl Killable {
    /// The read itself (held-back bytes, the key exchange checks, the modp gate).
    fn poll_read_now(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.check(cx)?;
        if let Some((spent, allowed)) = self.cpu.exceeded() {
            self.log.log(
                log::Level::Info,
                format_args!(
                    "{}: dropped: {} ms of CPU before authenticating, after its key exchange (allowed {} ms): \
                     key re-exchanges before login are not served",
                    self.peer,
                    spent.as_millis(),
                    allowed.as_millis()
                ),
            );
            self.dead = true;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "too much CPU before authentication",
            )));
        }
        if let Some(gated) = self.gated.as_mut() {
            match gated.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(permit) => {
                    self.held = permit.ok();
                    self.gated = None;
                }
            }
        }
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.drain(..n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(inspector)) = (&r, self.inspector.as_mut()) {
            if let Err(bad) = inspector.feed(&buf.filled()[before..]) {
                self.log.log(log::Level::Info, format_args!("{}: refused key exchange: {bad}", self.peer));
                self.dead = true;
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    bad.to_string(),
                )));
            }
            let modp = inspector.take_modp_exchange();
            let first_kex_over = inspector.done();
            self.cpu.modp |= modp;
            if first_kex_over {
                self.inspector = None;
                self.cpu.first_kex_done();
            }
            if modp && self.held.is_none() {
                // Hold the bytes back until this connection may exponentiate.
                self.unread = buf.filled()[before..].to_vec();
                buf.set_filled(before);
                self.gated = Some(Box::pin(self.modp_gate.clone().acquire_owned()));
                return self.poll_read_now(cx, buf);
            }
        }
        r
    }
}

impl AsyncWrite for Killable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.check(cx)?;
        // russh answers a KEXDH_INIT only after both exponentiations: the permit can go.
        self.held = None;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    /// Leaves the bytes held (see [`Killable::inner`]): russh flushes after every packet.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Per-channel request state, for the replies (see `ssh::session` for the same rules).
#[derive(Default)]
struct ChannelState {
    started: bool,
    pty: bool,
    env: session::EnvBudget,
}

/// One connection's russh handler.
struct ConnHandler {
    shared: Arc<Shared>,
    peer: String,
    peer_ip: Option<IpAddr>,
    authenticated: Option<oneshot::Sender<()>>,
    /// Set on success; ends the connection's pre-authentication CPU limit.
    authenticated_flag: Arc<AtomicBool>,
    /// Cloned into every session task; see [`connection`].
    tasks: mpsc::Sender<()>,
    permissions: Permissions,
    channels: Arc<Mutex<HashMap<ChannelId, ChannelState>>>,
    forwards: HashMap<(String, u32), JoinHandle<()>>,
}

impl ConnHandler {
    fn new(
        peer: String,
        shared: Arc<Shared>,
        authenticated: oneshot::Sender<()>,
        authenticated_flag: Arc<AtomicBool>,
        tasks: mpsc::Sender<()>,
    ) -> ConnHandler {
        let peer_ip = peer.parse::<SocketAddr>().ok().map(|a| a.ip().to_canonical());
        ConnHandler {
            shared,
            peer,
            peer_ip,
            authenticated: Some(authenticated),
            authenticated_flag,
            tasks,
            permissions: Permissions::default(),
            channels: Arc::new(Mutex::new(HashMap::new())),
            forwards: HashMap::new(),
        }
    }

    /// Re-reads the authorized keys and judges `key`; logs rejections when `log_reject`.
    fn judge(&self, key: &PublicKey, log_reject: bool) -> Option<Permissions> {
        let Some(path) = &self.shared.authorized_keys else { return Some(Permissions::default()) };
        let keys = match AuthorizedKeys::load(path) {
            Ok(k) => k,
            Err(e) => {
                self.shared.preauth_log.log(log::Level::Error, format_args!("{e}; rejecting every key"));
                return None;
            }
        };
        for w in &keys.warnings {
            log::debug!("{}: {w}", path.display());
        }
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let describe = || format!("{} key {}", key.algorithm().as_str(), fingerprint(key));
        match keys.check(key, self.peer_ip, now) {
            Verdict::Accepted { permissions, .. } => Some(permissions),
            Verdict::Unknown => {
                if log_reject {
                    let line =
                        format_args!("{}: rejected {}: not in {}", self.peer, describe(), path.display());
                    self.shared.preauth_log.log(log::Level::Info, line);
                }
                None
            }
            Verdict::Denied(why) => {
                if log_reject {
                    let line =
                        format_args!("{}: rejected {}: {}: {why}", self.peer, describe(), path.display());
                    self.shared.preauth_log.log(log::Level::Info, line);
                }
                None
            }
        }
    }

    /// Reads or updates the request state of `channel`.
    fn with_state<T>(&self, channel: ChannelId, f: impl FnOnce(&mut ChannelState) -> T) -> T {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(channel).or_default())
    }
}

impl Drop for ConnHandler {
    fn drop(&mut self) {
        for (_, f) in self.forwards.drain() {
            f.abort();
        }
    }
}

/// The address a `tcpip-forward` may bind: loopback only (127.0.0.0/8, ::1, localhost).
pub fn loopback_bind_address(requested: &str) -> Option<IpAddr> {
    if requested.eq_ignore_ascii_case("localhost") {
        return Some(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let bare = requested.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(requested);
    bare.parse::<IpAddr>().ok().filter(|ip| ip.is_loopback())
}

impl Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
        if self.shared.authorized_keys.is_none() {
            return Ok(Auth::Accept);
        }
        Ok(Auth::Reject { proceed_with_methods: None, partial_success: false })
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if is_sha1_rsa(offer.algorithm) {
            let line =
                format_args!("{}: refused an ssh-rsa (SHA-1) signature; rsa-sha2-256/512 work", self.peer);
            self.shared.preauth_log.log(log::Level::Info, line);
            return Ok(Auth::reject());
        }
        Ok(match self.judge(offer.public_key, true) {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        if is_sha1_rsa(key.algorithm) {
            let line =
                format_args!("{}: refused an ssh-rsa (SHA-1) signature; rsa-sha2-256/512 work", self.peer);
            self.shared.preauth_log.log(log::Level::Info, line);
            return Ok(Auth::reject());
        }
        match self.judge(key.public_key, false) {
            Some(p) => {
                self.permissions = p;
                log::info!(
                    "{}: accepted {} key {} (user {user:?})",
                    self.peer,
                    key.public_key.algorithm().as_str(),
                    fingerprint(key.public_key)
                );
                Ok(Auth::Accept)
            }
            None => Ok(Auth::reject()),
        }
    }

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated_flag.store(true, Ordering::Relaxed);
        if let Some(tx) = self.authenticated.take() {
            let _ = tx.send(());
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let id = channel.id();
        if self.shared.is_stopping() {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        let admitted = {
            let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            let room = map.len() < MAX_CHANNELS_PER_CONNECTION;
            if room {
                map.insert(id, ChannelState::default());
            }
            room
        };
        if !admitted {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        reply.accept().await;
        let channels = self.channels.clone();
        let ctx = SessionContext {
            remote_program: self.shared.remote_program.clone(),
            hangup_grace: self.shared.hangup_grace,
            allow_pty: self.permissions.pty,
            handle: session.handle(),
            tenants: self.shared.tenants.clone(),
            on_end: OnEnd::new(move || {
                channels.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            }),
        };
        let task_guard = self.tasks.clone();
        task::spawn(async move {
            session::run(channel, ctx).await;
            drop(task_guard);
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        log::info!("{}: refused direct-tcpip to {host}:{port} (local forwarding is not offered)", self.peer);
        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _w: u32,
        _h: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let allow = self.permissions.pty;
        let granted = self.with_state(channel, |st| {
            let ok = allow && !st.started && !st.pty;
            st.pty |= ok;
            ok
        });
        if granted {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Refused on its own: after exec, past the caps, or unusable. (A name or value that is
        // not UTF-8 never gets here: russh 0.65 ends the connection while decoding it.)
        if self.with_state(channel, |st| !st.started && st.env.admit(name, value)) {
            session.channel_success(channel)
        } else {
            log::debug!("{}: refused env request {name:?} ({} bytes)", self.peer, value.len());
            session.channel_failure(channel)
        }
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, session)
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        log::info!("{}: refused subsystem {name:?}", self.peer);
        session.channel_failure(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        Ok(false)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _cols: u32,
        _rows: u32,
        _w: u32,
        _h: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.with_state(channel, |st| st.pty) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if !self.permissions.port_forwarding {
            log::info!("{}: refused tcpip-forward {address}:{port}: no-port-forwarding key", self.peer);
            return Ok(false);
        }
        let Some(ip) = loopback_bind_address(address) else {
            log::warn!("{}: refused tcpip-forward to non-loopback address {address:?}", self.peer);
            return Ok(false);
        };
        let Ok(requested) = u16::try_from(*port) else {
            return Ok(false);
        };
        if self.forwards.len() >= MAX_FORWARDS_PER_CONNECTION {
            log::warn!("{}: refused tcpip-forward: {MAX_FORWARDS_PER_CONNECTION} already open", self.peer);
            return Ok(false);
        }
        let listener = match tokio::net::TcpListener::bind(SocketAddr::new(ip, requested)).await {
            Ok(l) => l,
            Err(e) => {
                log::info!("{}: tcpip-forward {address}:{requested}: {e}", self.peer);
                return Ok(false);
            }
        };
        let actual = match listener.local_addr() {
            Ok(a) => u32::from(a.port()),
            Err(_) => return Ok(false),
        };
        *port = actual;
        log::debug!("{}: forwarding {address}:{actual}", self.peer);
        let task = task::spawn(forward_accept_loop(listener, session.handle(), address.to_string(), actual));
        if let Some(old) = self.forwards.insert((address.to_string(), actual), task) {
            old.abort();
        }
        Ok(true)
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.forwards.remove(&(address.to_string(), port)) {
            Some(task) => {
                // Wait for the task to be gone so the port is closed before the reply.
                task.abort();
                let _ = task.await;
                log::debug!("{}: cancelled forward {address}:{port}", self.peer);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

impl ConnHandler {
    fn start(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), russh::Error> {
        let first = self.with_state(channel, |st| !std::mem::replace(&mut st.started, true));
        if first {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }
}

/// Accepts connections on a forwarded port and opens a `forwarded-tcpip` channel for each,
/// naming the bind address exactly as the client sent it and the real peer as originator.
async fn forward_accept_loop(
    listener: tokio::net::TcpListener,
    handle: russh::server::Handle,
    address: String,
    port: u32,
) {
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                log::debug!("forward {address}:{port}: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let handle = handle.clone();
        let address = address.clone();
        task::spawn(async move {
            let origin = peer.ip().to_canonical().to_string();
            match handle.channel_open_forwarded_tcpip(address, port, origin, u32::from(peer.port())).await {
                Ok(channel) => pump_forwarded(socket, channel).await,
                Err(e) => log::debug!("forwarded-tcpip from {peer}: {e}"),
            }
        });
    }
}

/// Copies bytes between a forwarded TCP connection and its channel. The client's EOF becomes
/// a TCP half-close; the client's CLOSE (e.g. it refused a wrong nonce) or the end of the
/// SSH connection tears the TCP connection down at once, so the dialer on this side sees the
/// refusal instead of a connection that silently swallows what it writes.
///
/// Messages are taken off the channel as they arrive and queued for the socket, so a local
/// program that stops reading its end never makes russh's connection loop wait (which would
/// stall every session on the connection, exit statuses included); when the local end has
/// left more unread than [`Backlog`] tolerates (not reading for a while, or a hard cap), the
/// forwarded connection is closed.
async fn pump_forwarded(socket: tokio::net::TcpStream, channel: russh::Channel<russh::server::Msg>) {
    use tokio::io::AsyncWriteExt;

    let (mut from_client, to_client) = channel.split();
    let (mut socket_read, mut socket_write) = socket.into_split();
    let backlog = Arc::new(Backlog::default());
    let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<Option<Vec<u8>>>();
    let written = backlog.clone();
    // Dropping the write half (here, or by aborting this task) closes the TCP connection.
    let mut to_socket = task::spawn(async move {
        while let Some(item) = queue_rx.recv().await {
            match item {
                Some(data) => {
                    written.writer_waits();
                    let sent = socket_write.write_all(&data).await;
                    written.writer_done();
                    if sent.is_err() {
                        return;
                    }
                    written.sub(data.len());
                }
                None => {
                    let _ = socket_write.shutdown().await;
                }
            }
        }
    });
    let writer = to_client.make_writer();
    let from_socket = async move {
        let mut writer = writer;
        let _ = tokio::io::copy(&mut socket_read, &mut writer).await;
        let _ = writer.shutdown().await; // EOF to the client
    };
    tokio::pin!(from_socket);
    let mut socket_done = false;
    loop {
        tokio::select! {
            msg = from_client.wait() => match msg {
                Some(russh::ChannelMsg::Data { data }) => {
                    let pending = backlog.add(data.len());
                    if backlog.too_much(pending) {
                        log::warn!("forwarded connection: its local end left {pending} bytes unread; closed");
                        break;
                    }
                    let _ = queue_tx.send(Some(data.to_vec()));
                }
                Some(russh::ChannelMsg::Eof) => {
                    let _ = queue_tx.send(None);
                }
                Some(russh::ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
            _ = &mut to_socket => break,
            _ = &mut from_socket, if !socket_done => socket_done = true,
        }
    }
    to_socket.abort();
    let _ = to_client.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preauth_budget_allows_signature_checks_but_not_repeated_modp_exchanges() {
        let floor = Duration::from_millis(20);
        let ec = Duration::from_micros(300);
        assert_eq!(preauth_cpu_budget(floor, ec, false), Duration::from_micros(24_800));
        // After a 25 ms group14 exchange, one more fits (with the floor), a second does not.
        let modp = Duration::from_millis(25);
        let budget = preauth_cpu_budget(floor, modp, true);
        assert_eq!(budget, Duration::from_millis(45));
        assert!(budget >= modp && budget < 2 * modp);
        assert_eq!(preauth_cpu_budget(Duration::MAX, Duration::MAX, false), Duration::MAX);
    }

    #[test]
    fn preauth_log_lines_are_limited_per_window_and_the_held_back_counted() {
        let log = PreauthLog::default();
        let t0 = std::time::Instant::now();
        for _ in 0..PREAUTH_LOG_BURST {
            assert_eq!(log.admit_at(t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(log.admit_at(t0 + Duration::from_secs(9)), None);
        }
        // A new window: the first line says how many were held back, once.
        assert_eq!(log.admit_at(t0 + PREAUTH_LOG_WINDOW), Some(5));
        assert_eq!(log.admit_at(t0 + PREAUTH_LOG_WINDOW), Some(0));
    }

    #[test]
    fn the_thread_cpu_clock_moves_with_work() {
        let before = thread_cpu_time().expect("CLOCK_THREAD_CPUTIME_ID");
        let mut x = 1u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time().expect("clock") > before);
    }

    #[test]
    fn only_loopback_binds() {
        assert_eq!(loopback_bind_address("127.0.0.1"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(loopback_bind_address("::1"), Some("::1".parse().unwrap()));
        assert_eq!(loopback_bind_address("[::1]"), Some("::1".parse().unwrap()));
        assert_eq!(loopback_bind_address("LocalHost"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(loopback_bind_address("127.1.2.3"), Some("127.1.2.3".parse().unwrap()));
        for bad in ["0.0.0.0", "", "::", "10.0.0.1", "example.com", "localhost.evil"] {
            assert_eq!(loopback_bind_address(bad), None, "{bad}");
        }
    }
}

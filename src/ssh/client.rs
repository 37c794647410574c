//! The SSH client connection of `cpu`: handshake with host-key checking, user authentication
//! (key files, ssh-agent, or `none`), the 9P remote forward, and the hand-off of forwarded
//! channels to the back-channel acceptor.
//!
//! The session itself (pty, env, exec, I/O) is driven by [`crate::client`]; this module owns
//! everything about the connection that comes before and around it.
//!
//! The server is trusted only so far: every channel it opens is refused except a
//! `forwarded-tcpip` to the forward we asked for, and that one reaches the 9P server through a
//! [`Backchannel`] pump that never makes russh wait: a remote that floods requests without
//! reading replies loses its 9P channel instead of stalling the connection (and with it the
//! session's exit status).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use russh::client::{self, Handle, Msg};
use russh::keys::{PrivateKeyWithHashAlg, PublicKey};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::ssh::backlog::Backlog;
use crate::ssh::known_hosts::{self, Verdict};
use crate::transport::BoxStream;

/// How the server's host key is checked.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// No check and no recording (ssh_config `StrictHostKeyChecking no`).
    Off,
    /// Only these keys are accepted (`cpu -hk FILE`).
    Pinned { keys: Vec<PublicKey>, source: PathBuf },
    /// known_hosts files. An unknown host is recorded in `record_to` with a notice (like
    /// `accept-new`), or refused when `strict`.
    KnownHosts { files: Vec<PathBuf>, record_to: PathBuf, strict: bool, hash: bool },
}

/// A host-key policy applied to one host and port.
#[derive(Debug, Clone)]
pub struct HostKeyCheck {
    pub policy: HostKeyPolicy,
    /// The host name as it is written in known_hosts (after ssh_config HostName).
    pub host: String,
    pub port: u16,
}

impl HostKeyCheck {
    /// Decides on `key`; records an unknown host when the policy says so.
    pub fn verify(&self, key: &PublicKey) -> Result<()> {
        let fp = known_hosts::fingerprint(key);
        match &self.policy {
            HostKeyPolicy::Off => {
                log::debug!("host key {fp} not checked (StrictHostKeyChecking no)");
                Ok(())
            }
            HostKeyPolicy::Pinned { keys, source } => {
                if keys.iter().any(|k| k.key_data() == key.key_data()) {
                    log::debug!("host key {fp} matches the pinned key in {}", source.display());
                    Ok(())
                } else {
                    Err(Error::HostKey(format!(
                        "{}: the server's {} key {fp} is not the key pinned in {}",
                        self.host,
                        key.algorithm().as_str(),
                        source.display()
                    )))
                }
            }
            HostKeyPolicy::KnownHosts { files, record_to, strict, hash } => {
                match known_hosts::check(files, &self.host, self.port, key) {
                    Verdict::Known => {
                        log::debug!("host key {fp} found in known_hosts");
                        Ok(())
                    }
                    Verdict::Changed { file, line } => Err(Error::HostKey(format!(
                        "the host key of {} has CHANGED (now {} {fp}); the old key is at {}:{line}. \
                         Someone may be intercepting the connection, or the server was reinstalled; \
                         if you trust the new key, remove that line.",
                        known_hosts::host_field(&self.host, self.port),
                        key.algorithm().as_str(),
                        file.display()
                    ))),
                    Verdict::Unknown if *strict => Err(Error::HostKey(format!(
                        "no host key is known for {} and StrictHostKeyChecking is yes (its {} key is {fp})",
                        known_hosts::host_field(&self.host, self.port),
                        key.algorithm().as_str()
                    ))),
                    Verdict::Unknown => {
                        if let Err(e) = known_hosts::append(record_to, &self.host, self.port, key, *hash) {
                            // As ssh: the connection goes on, the host is just not remembered.
                            eprintln!(
                                "cpu: could not add {} ({fp}) to the known hosts: {e}",
                                known_hosts::host_field(&self.host, self.port)
                            );
                            return Ok(());
                        }
                        eprintln!(
                            "cpu: permanently added {} ({} {fp}) to {}{}",
                            known_hosts::host_field(&self.host, self.port),
                            key.algorithm().as_str(),
                            record_to.display(),
                            if *hash { " (hashed)" } else { "" }
                        );
                        Ok(())
                    }
                }
            }
        }
    }
}

/// The remote forward we asked for: the address string as sent, the allocated port, where
/// its forwarded connections go, and how many of them are alive.
struct Forward {
    address: String,
    port: u32,
    to: mpsc::UnboundedSender<Backchannel>,
    live: Arc<LiveCount>,
}

/// Forwarded connections of one forward alive at once. A session uses two (the mount and the
/// system-directory mount), each the moment it connects; any other (a wrong or missing nonce)
/// lives at most until its nonce is refused or times out. Each costs three tasks and 64 KiB
/// of buffers at once, so a remote (or any local user on the remote machine, who can connect
/// to the forwarded loopback port) that opens thousands must be refused beyond a few.
pub const MAX_LIVE_BACKCHANNELS: usize = 16;

/// The live forwarded connections of one forward, and whether a refusal was reported.
#[derive(Default)]
struct LiveCount {
    live: std::sync::atomic::AtomicUsize,
    refusal_reported: std::sync::atomic::AtomicBool,
}

/// One live forwarded connection; it stops counting when dropped (its pump ended).
struct LiveGuard(Arc<LiveCount>);

impl LiveCount {
    fn admit(self: &Arc<Self>) -> Option<LiveGuard> {
        use std::sync::atomic::Ordering::SeqCst;
        let admitted =
            self.live.fetch_update(SeqCst, SeqCst, |n| (n < MAX_LIVE_BACKCHANNELS).then_some(n + 1));
        admitted.is_ok().then(|| LiveGuard(self.clone()))
    }
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A forwarded connection as the 9P server sees it: one end of an in-memory pipe, pumped to
/// and from the SSH channel by [`pump_backchannel`].
pub type Backchannel = DuplexStream;

/// The in-memory pipe between the pump and the 9P server, each way.
const BACKCHANNEL_PIPE: usize = 256 << 10;

/// Connects `channel` to a new in-memory pipe and returns the 9P server's end. Three tasks:
/// one takes every message off the channel as it arrives (so russh's connection loop never
/// waits for the 9P server) and queues the data; one feeds the queue to the 9P server; one
/// carries replies back, waiting for the remote's window when it must (only it waits). Past
/// what [`Backlog`] tolerates (the remote not reading its replies for a while, or a hard cap),
/// the channel is closed.
fn pump_backchannel(channel: Channel<Msg>, live: LiveGuard) -> Backchannel {
    let (ours, theirs) = tokio::io::duplex(BACKCHANNEL_PIPE);
    let (mut from_9p, mut to_9p) = tokio::io::split(ours);
    let (mut from_remote, to_remote) = channel.split();
    let backlog = Arc::new(Backlog::default());
    let (queue_tx, mut queue_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let fed = backlog.clone();
    let feeder = crate::task::spawn(async move {
        while let Some(data) = queue_rx.recv().await {
            if to_9p.write_all(&data).await.is_err() {
                return;
            }
            fed.sub(data.len());
        }
        let _ = to_9p.shutdown().await;
    });
    let mut writer = to_remote.make_writer();
    // When the 9P side is done (served connection over, or a wrong nonce refused), EOF then
    // close: the dialer on the remote sees the end instead of a channel that swallows data.
    let watch = backlog.clone();
    let mut replies = crate::task::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from_9p.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Waits for the remote's window: only this task waits, never russh.
            watch.writer_waits();
            let sent = writer.write_all(&buf[..n]).await;
            watch.writer_done();
            if sent.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    crate::task::spawn(async move {
        let _live = live;
        let mut queue_tx = Some(queue_tx);
        loop {
            let msg = tokio::select! {
                msg = from_remote.wait() => msg,
                _ = &mut replies => break,
            };
            let Some(msg) = msg else { break };
            match msg {
                ChannelMsg::Data { data } => {
                    let pending = backlog.add(data.len());
                    if backlog.too_much(pending) {
                        log::warn!(
                            "9p back-channel: the remote sent {pending} bytes of requests without reading the replies; closing it"
                        );
                        break;
                    }
                    if let Some(q) = &queue_tx {
                        let _ = q.send(data.to_vec());
                    }
                }
                // The feeder shuts the pipe down once it has passed everything on.
                ChannelMsg::Eof => queue_tx = None,
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        feeder.abort();
        replies.abort();
        let _ = to_remote.close().await;
    });
    theirs
}

impl HostKeyCheck {
    /// The algorithms of the keys this check would accept, when it knows any.
    pub fn known_algorithms(&self) -> Vec<russh::keys::Algorithm> {
        match &self.policy {
            HostKeyPolicy::Off => Vec::new(),
            HostKeyPolicy::Pinned { keys, .. } => keys.iter().map(|k| k.algorithm()).collect(),
            HostKeyPolicy::KnownHosts { files, .. } => {
                known_hosts::known_algorithms(files, &self.host, self.port)
            }
        }
    }
}

/// The host-key algorithms to offer: russh's order, with the kinds we hold a key for first, so
/// a server with several host keys presents one we can check.
fn host_key_order(known: &[russh::keys::Algorithm]) -> Vec<russh::keys::Algorithm> {
    let mut order = russh::Preferred::default().key.to_vec();
    let same_kind =
        |a: &russh::keys::Algorithm, b: &russh::keys::Algorithm| a == b || (is_rsa(a) && is_rsa(b));
    order.sort_by_key(|a| !known.iter().any(|k| same_kind(k, a)));
    order
}

fn is_rsa(a: &russh::keys::Algorithm) -> bool {
    matches!(a, russh::keys::Algorithm::Rsa { .. })
}

/// What the handler shares with the connection's owner.
#[derive(Default)]
struct Shared {
    host_key_error: Mutex<Option<Error>>,
    /// One remote forward per running session (a control master runs several at once).
    forward: Mutex<Vec<Forward>>,
    /// A forwarded connection for no forward of ours was refused with a warning already: the
    /// server decides how many come, and the later ones are logged at debug level only.
    unknown_forward_reported: std::sync::atomic::AtomicBool,
}

/// The russh event handler of `cpu`.
pub struct CpuHandler {
    check: HostKeyCheck,
    shared: Arc<Shared>,
}

impl client::Handler for CpuHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            self.set_error(Error::HostKey(
                "the server presented a certificate; only plain host keys are supported".into(),
            ));
            return Ok(false);
        };
        match self.check.verify(key) {
            Ok(()) => Ok(true),
            Err(e) => {
                self.set_error(e);
                Ok(false)
            }
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let target = {
            let forward = self.shared.forward.lock().unwrap_or_else(|p| p.into_inner());
            forward
                .iter()
                .find(|f| f.address == connected_address && f.port == connected_port)
                .map(|f| (f.to.clone(), f.live.clone()))
        };
        let target = target.map(|(tx, live)| (tx, live.admit(), live));
        match target {
            Some((_, None, live)) => {
                let first = !live.refusal_reported.swap(true, std::sync::atomic::Ordering::SeqCst);
                let why = format!(
                    "refused a forwarded connection for {}:{connected_port} from {}:{originator_port}: \
                     {MAX_LIVE_BACKCHANNELS} already open",
                    connected_address.escape_debug(),
                    originator_address.escape_debug()
                );
                if first {
                    log::warn!("{why} (further refusals are logged with -d)");
                } else {
                    log::debug!("{why}");
                }
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
            }
            Some((tx, Some(guard), _)) => {
                log::debug!(
                    "forwarded connection to {connected_address}:{connected_port} from {originator_address}:{originator_port}"
                );
                reply.accept().await;
                if tx.send(pump_backchannel(channel, guard)).is_err() {
                    log::debug!("the 9p back-channel is no longer accepted; connection dropped");
                }
            }
            None => {
                // The server's strings go to the user's terminal: no control characters.
                let why = format!(
                    "refused a forwarded connection for {}:{connected_port} (no such forward, or the session ended)",
                    connected_address.escape_debug()
                );
                if !self.shared.unknown_forward_reported.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    log::warn!("{why} (further ones are logged with -d)");
                } else {
                    log::debug!("{why}");
                }
                reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            }
        }
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("session", reply).await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("auth-agent@openssh.com", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host_to_connect: &str,
        _port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("direct-tcpip", reply).await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("x11", reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("forwarded-streamlocal@openssh.com", reply).await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse_channel("direct-streamlocal@openssh.com", reply).await;
        Ok(())
    }
}

/// Refuses a channel the server opened (cpu asks for none but its forward).
async fn refuse_channel(kind: &str, reply: client::ChannelOpenHandle) {
    log::warn!("refused a {kind} channel the server tried to open");
    reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
}

impl CpuHandler {
    fn set_error(&self, e: Error) {
        *self.shared.host_key_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }
}

/// An established, not yet authenticated SSH connection.
pub struct Connection {
    pub handle: Handle<CpuHandler>,
    shared: Arc<Shared>,
}

/// The russh client configuration `cpu` uses.
fn config() -> client::Config {
    client::Config {
        client_id: russh::SshId::Standard(format!("SSH-2.0-cpu-all_{}", env!("CARGO_PKG_VERSION")).into()),
        nodelay: true,
        // A server that vanished (board powered off, cable pulled) ends the session after about
        // three minutes instead of hanging cpu forever; every SSH server answers keepalives.
        keepalive_interval: Some(std::time::Duration::from_secs(60)),
        keepalive_max: 3,
        ..Default::default()
    }
}

/// Runs the SSH handshake on `stream`, checking the host key with `check`.
pub async fn connect(stream: BoxStream, check: HostKeyCheck) -> Result<Connection> {
    let shared = Arc::new(Shared::default());
    let mut cfg = config();
    let known = check.known_algorithms();
    if !known.is_empty() {
        cfg.preferred.key = host_key_order(&known).into();
    }
    let handler = CpuHandler { check, shared: shared.clone() };
    let stream = crate::ssh::coalesce::Coalesced::new(stream);
    match client::connect_stream(Arc::new(cfg), stream, handler).await {
        Ok(handle) => Ok(Connection { handle, shared }),
        Err(e) => {
            if let Some(err) = shared.host_key_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(err);
            }
            Err(Error::Ssh(format!("handshake failed: {e}")))
        }
    }
}

/// Where user keys come from, in the order they are offered.
#[derive(Debug, Clone, Default)]
pub struct AuthMethods {
    /// Private key files tried first (`-key`).
    pub first_files: Vec<PathBuf>,
    /// Offer the keys held by ssh-agent.
    pub agent: bool,
    /// Private key files tried after the agent (ssh_config, defaults).
    pub files: Vec<PathBuf>,
    /// `-useKey=false`: only the `none` method.
    pub none_only: bool,
}

impl Connection {
    /// Authenticates as `user`, trying every key in turn until one is accepted.
    pub async fn authenticate(&mut self, user: &str, methods: &AuthMethods) -> Result<()> {
        if methods.none_only {
            return match self.handle.authenticate_none(user).await {
                Ok(r) if r.success() => Ok(()),
                Ok(_) => Err(Error::Auth(format!(
                    "the server wants a key for user {user:?}, and -useKey=false offers none"
                ))),
                Err(e) => Err(Error::Ssh(format!("authentication: {e}"))),
            };
        }
        let mut tried: Vec<String> = Vec::new();
        let mut rsa_hash: Option<Option<russh::keys::HashAlg>> = None;
        for path in &methods.first_files {
            // A key named on the command line must load: its error is the one worth showing.
            let key = crate::ssh::keys::load_private_key(path)?;
            if self.offer_key(user, path, key, &mut rsa_hash, &mut tried).await? {
                return Ok(());
            }
        }
        if methods.agent {
            if let Some(mut agent) = crate::ssh::keys::connect_agent().await {
                for key in agent.keys.clone() {
                    let hash =
                        if key.algorithm().is_rsa() { self.rsa_hash(&mut rsa_hash).await } else { None };
                    tried.push(format!("agent key {}", known_hosts::fingerprint(&key)));
                    match self.handle.authenticate_publickey_with(user, key, hash, &mut agent.client).await {
                        Ok(r) if r.success() => return Ok(()),
                        Ok(_) => {}
                        Err(e) => log::debug!("ssh-agent signing failed: {e:?}"),
                    }
                }
            }
        }
        for path in &methods.files {
            if self.try_file(user, path, &mut rsa_hash, &mut tried).await? {
                return Ok(());
            }
        }
        if tried.is_empty() {
            return Err(Error::Auth(
                "no key to offer: give -key, an IdentityFile in ~/.ssh/config, ~/.ssh/cpu_rsa or ~/.ssh/id_ed25519, or keys in ssh-agent".into(),
            ));
        }
        Err(Error::Auth(format!(
            "the server refused user {user:?} with every key offered ({})",
            tried.join(", ")
        )))
    }

    async fn rsa_hash(
        &self,
        cache: &mut Option<Option<russh::keys::HashAlg>>,
    ) -> Option<russh::keys::HashAlg> {
        if let Some(h) = cache {
            return *h;
        }
        // No ext-info from the server: SHA-256 is what every server of the last decade takes.
        let h = match self.handle.best_supported_rsa_hash().await {
            Ok(Some(h)) => h,
            _ => Some(russh::keys::HashAlg::Sha256),
        };
        *cache = Some(h);
        h
    }

    async fn try_file(
        &mut self,
        user: &str,
        path: &std::path::Path,
        rsa_hash: &mut Option<Option<russh::keys::HashAlg>>,
        tried: &mut Vec<String>,
    ) -> Result<bool> {
        let key = match crate::ssh::keys::load_private_key(path) {
            Ok(k) => k,
            Err(e) => {
                log::warn!("{e}");
                return Ok(false);
            }
        };
        self.offer_key(user, path, key, rsa_hash, tried).await
    }

    async fn offer_key(
        &mut self,
        user: &str,
        path: &std::path::Path,
        key: russh::keys::PrivateKey,
        rsa_hash: &mut Option<Option<russh::keys::HashAlg>>,
        tried: &mut Vec<String>,
    ) -> Result<bool> {
        let hash = if key.algorithm().is_rsa() { self.rsa_hash(rsa_hash).await } else { None };
        tried.push(path.display().to_string());
        log::debug!("offering key {} ({})", path.display(), key.algorithm().as_str());
        match self.handle.authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash)).await
        {
            Ok(r) => Ok(r.success()),
            Err(e) => Err(Error::Ssh(format!("authentication: {e}"))),
        }
    }

    /// Asks the server to listen on loopback port 0 for us (127.0.0.1, else ::1) and returns the
    /// address string sent, the allocated port, and the receiver of its forwarded channels.
    pub async fn forward_loopback(&self) -> Result<(String, u16, mpsc::UnboundedReceiver<Backchannel>)> {
        let mut last_error = String::new();
        for addr in ["127.0.0.1", "::1"] {
            // Register first: the remote may connect as soon as the reply is on its way.
            match self.handle.tcpip_forward(addr, 0).await {
                Ok(port) if (1..=65535).contains(&port) => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.shared.forward.lock().unwrap_or_else(|p| p.into_inner()).push(Forward {
                        address: addr.to_string(),
                        port,
                        to: tx,
                        live: Arc::default(),
                    });
                    log::debug!("the server listens on {addr} port {port} for the 9p back-channel");
                    return Ok((addr.to_string(), port as u16, rx));
                }
                Ok(port) => last_error = format!("the server allocated no usable port ({port})"),
                Err(e) => last_error = format!("{e}"),
            }
        }
        Err(Error::Ssh(format!(
            "the server refused to listen on a loopback port for the 9p back-channel ({last_error}); try -9p=false"
        )))
    }

    /// Stops handing connections of the forward `addr`:`port` to its acceptor; later ones
    /// are refused.
    pub fn stop_forwarding(&self, addr: &str, port: u16) {
        self.shared
            .forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|f| !(f.address == addr && f.port == u32::from(port)));
    }

    /// Asks the server to stop listening for the forward `addr`:`port` (a control master's
    /// sessions come and go on one connection; a direct session just disconnects).
    pub async fn cancel_forward(&self, addr: &str, port: u16) {
        if let Err(e) = self.handle.cancel_tcpip_forward(addr, u32::from(port)).await {
            log::debug!("cancel-tcpip-forward {addr}:{port}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::{Algorithm, HashAlg};

    #[test]
    fn known_key_kinds_come_first() {
        let order = host_key_order(&[Algorithm::Rsa { hash: None }]);
        assert!(is_rsa(&order[0]), "{order:?}");
        let n = order.iter().filter(|a| is_rsa(a)).count();
        assert!(order[..n].iter().all(is_rsa));
        assert!(order.contains(&Algorithm::Ed25519));
        let order = host_key_order(&[Algorithm::Ed25519]);
        assert_eq!(order[0], Algorithm::Ed25519);
        assert!(order.contains(&Algorithm::Rsa { hash: Some(HashAlg::Sha512) }));
    }
}

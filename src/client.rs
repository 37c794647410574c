//! The `cpu` session: resolve the host, connect, start the 9P back-channel, run the command
//! and return its exit status.
//!
//! Order on the wire (spec 3.6, 3.7, appendix A): handshake and authentication; with 9P a
//! `tcpip-forward` for 127.0.0.1 (or ::1) port 0; the session channel; `pty-req` when stdin is a
//! terminal; one `env` per variable of our environment (TMPDIR=/tmp), then CPUNONCE, CPU_FSTAB,
//! LC_GLENDA_CPU_FSTAB, CPU_MSIZE, CPU_MOUNTOPTS; then `exec`. The requests are pipelined and
//! their replies matched in order; refused `env` requests are fine (OpenSSH refuses most).
//!
//! Signals: without a terminal SIGINT, SIGTERM and SIGHUP are forwarded as `signal` requests;
//! the third SIGINT or second SIGTERM ends cpu locally (a server may ignore signal requests:
//! OpenSSH's sshd does for root sessions). With a terminal ^C is just a byte, and SIGTERM or
//! SIGHUP are forwarded and end the session after restoring the terminal.
//!
//! Exit status: the remote `exit-status`; 128+N for `exit-signal` N; 255 with a message for
//! connection, host-key and authentication failures, and when the session ends with neither
//! status nor signal (as ssh does; the Go client uses 1 there) or by the `~.` escape.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::Sig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::{Error, Result, EXIT_CONNECTION, EXIT_STDOUT_GONE};
use crate::options::{CpuOptions, DEFAULT_PORT};
use crate::protocol;
use crate::ssh::client::{AuthMethods, Connection, HostKeyCheck, HostKeyPolicy};
use crate::ssh::config::{self, HostConfig, Tokens};
use crate::terminal::{self, EscapeAction, EscapeFilter};
use crate::transport::{self, Net};

/// How long dialing and the SSH handshake may take, unless ssh_config says ConnectTimeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a forwarded connection may take to send its 32-byte nonce.
const NONCE_TIMEOUT: Duration = Duration::from_secs(30);
/// 9P connections served per session: the main mount and the system-directory mount that a
/// cpu-all cpud makes when offered (CPU_SYSTEM_MOUNT=1).
const BACKCHANNEL_CONNECTIONS: usize = 2;
/// Default key files, tried in this order when neither -key nor IdentityFile names one.
pub const DEFAULT_KEY_FILES: &[&str] = &["cpu_rsa", "id_ed25519", "id_ecdsa", "id_rsa"];

/// Runs `cpu` with parsed options and returns the remote command's exit status.
pub fn run(opts: CpuOptions) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))?;
    let result = match crate::control::master_request() {
        Some((path, persist)) => rt.block_on(crate::control::run_master(opts, path, persist)),
        None => rt.block_on(session(opts)),
    };
    // The stdin reader thread may still be blocked in read(); do not wait for it.
    rt.shutdown_background();
    result
}

/// The local facts resolution depends on.
#[derive(Debug, Clone)]
pub struct LocalEnv {
    pub home: PathBuf,
    /// The local user name ($USER, else the uid's name).
    pub user: String,
}

impl LocalEnv {
    /// From the process environment.
    pub fn from_process() -> LocalEnv {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| "/".into());
        let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(uid_name);
        LocalEnv { home, user }
    }
}

/// The name of our uid from /etc/passwd, else the number.
fn uid_name() -> String {
    let uid = rustix::process::getuid().as_raw();
    if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 2 && f[2] == uid.to_string() {
                return f[0].to_string();
            }
        }
    }
    uid.to_string()
}

/// Where and as whom to connect, and how to check and authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    /// What is dialed (ssh_config HostName, else the alias; a path for unix sockets).
    pub host: String,
    pub port: String,
    /// `-key` (tried first, alone with the agent) or empty.
    pub explicit_keys: Vec<PathBuf>,
    /// ssh_config IdentityFiles and the default files that exist.
    pub other_keys: Vec<PathBuf>,
    pub known_hosts_files: Vec<PathBuf>,
    /// StrictHostKeyChecking as written (lowercase), if any.
    pub strict: Option<String>,
    pub hash_known_hosts: bool,
    /// Offer the keys in ssh-agent too (not with ssh_config `IdentitiesOnly yes`).
    pub use_agent: bool,
    /// The name checked and recorded in known_hosts (HostKeyAlias, else `host`).
    pub host_key_name: String,
    /// How long dialing and the handshake may take (ConnectTimeout, else 30 s).
    pub connect_timeout: Duration,
    /// Connection reuse (ControlMaster, ControlPath, ControlPersist and their flags).
    pub control: crate::control::ControlSettings,
    /// The command whose input and output carry the connection (ssh_config ProxyCommand or
    /// ProxyJump, tokens expanded), instead of dialing `host`.
    pub proxy: Option<String>,
}

/// The ssh_config files read, in order.
pub fn config_files(local: &LocalEnv) -> Vec<PathBuf> {
    vec![local.home.join(".ssh/config"), PathBuf::from("/etc/ssh/ssh_config")]
}

/// Resolves user, host, port, keys and known_hosts files as ssh does (spec 3.3, without the Go
/// bugs P1-P3): `user@` first, then ssh_config for the alias, then $USER; `-sp`, then Port,
/// then 17010.
pub fn resolve(opts: &CpuOptions, net: Net, local: &LocalEnv, cfg_files: &[PathBuf]) -> Result<Target> {
    let raw = opts.host.clone().ok_or_else(|| Error::Usage("missing host".into()))?;
    let path_like = matches!(net, Net::Unix | Net::UnixVsock);
    let (at_user, alias) = match raw.split_once('@') {
        Some((u, h)) if !path_like && !u.is_empty() && !h.is_empty() => (Some(u.to_string()), h.to_string()),
        _ => (None, raw.clone()),
    };
    if !path_like {
        reject_port_in_host(&alias)?;
    }
    let cfg = if path_like { HostConfig::default() } else { config::lookup(&alias, cfg_files, &local.home) };
    let user = at_user.or(cfg.user.clone()).unwrap_or_else(|| local.user.clone());
    let host = match &cfg.host_name {
        Some(h) => config::expand_path(
            h,
            &Tokens {
                home: &local.home,
                local_user: &local.user,
                host: &alias,
                remote_user: &user,
                port: "",
            },
        ),
        None => alias.clone(),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = if !opts.port.is_empty() {
        opts.port.clone()
    } else {
        cfg.port.clone().unwrap_or_else(|| DEFAULT_PORT.to_string())
    };
    let tokens =
        Tokens { home: &local.home, local_user: &local.user, host: &host, remote_user: &user, port: &port };
    let mut explicit_keys = Vec::new();
    let mut other_keys: Vec<PathBuf> = Vec::new();
    if !opts.key.is_empty() {
        explicit_keys.push(PathBuf::from(config::expand_tilde(&opts.key, &local.home)));
    } else {
        for f in &cfg.identity_files {
            let p = PathBuf::from(config::expand_path(f, &tokens));
            if p.exists() && !other_keys.contains(&p) {
                other_keys.push(p);
            } else if !p.exists() {
                log::debug!("IdentityFile {} does not exist", p.display());
            }
        }
        for name in DEFAULT_KEY_FILES {
            let p = local.home.join(".ssh").join(name);
            if p.exists() && !other_keys.contains(&p) {
                other_keys.push(p);
            }
        }
    }
    let known_hosts_files = if cfg.user_known_hosts_files.is_empty() {
        vec![local.home.join(".ssh/known_hosts")]
    } else {
        cfg.user_known_hosts_files.iter().map(|f| PathBuf::from(config::expand_path(f, &tokens))).collect()
    };
    let host_key_name = cfg.host_key_alias.clone().unwrap_or_else(|| host.clone());
    let local_host = crate::control::local_host_name();
    let control = crate::control::settings(
        opts,
        &cfg,
        &crate::control::PathTokens {
            home: &local.home,
            local_user: &local.user,
            uid: rustix::process::getuid().as_raw(),
            local_host: &local_host,
            host: &host,
            port: &port,
            remote_user: &user,
            alias: &alias,
        },
    )?;
    let proxy = crate::transport::proxy::proxy_command(
        cfg.proxy_command.as_deref(),
        cfg.proxy_jump.as_deref(),
        &crate::transport::proxy::ProxyTokens { host: &host, port: &port, remote_user: &user, alias: &alias },
    );
    Ok(Target {
        proxy,
        user,
        host,
        port,
        explicit_keys,
        other_keys,
        known_hosts_files,
        strict: cfg.strict_host_key_checking.clone(),
        hash_known_hosts: cfg.hash_known_hosts.unwrap_or(false),
        use_agent: cfg.identities_only != Some(true),
        host_key_name,
        connect_timeout: cfg
            .connect_timeout
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .unwrap_or(CONNECT_TIMEOUT),
        control,
    })
}

/// `host:PORT` (one colon, digits after it) is a port in the wrong place: say so before a
/// name lookup that can only fail, slowly. IPv6 literals have several colons and pass.
fn reject_port_in_host(alias: &str) -> Result<()> {
    let Some((host, port)) = alias.split_once(':') else { return Ok(()) };
    if host.is_empty() || host.contains(':') || port.contains(':') {
        return Ok(());
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "{alias:?} is not a host name: give the port with -sp, as in: cpu -sp {port} {host} ..."
    )))
}

/// Fails at start, with one line, when -key names a public key or -hk a private one.
fn check_key_flags(opts: &CpuOptions, target: &Target) -> Result<()> {
    for key in &target.explicit_keys {
        crate::keyfile::expect_private("-key", key).map_err(Error::Usage)?;
    }
    if !opts.host_key.is_empty() {
        crate::keyfile::expect_public("-hk", std::path::Path::new(&opts.host_key)).map_err(Error::Usage)?;
    }
    Ok(())
}

/// The host-key policy for a target: `-hk` pins; StrictHostKeyChecking no/off disables; yes
/// refuses unknown hosts; anything else records them (accept-new).
pub fn host_key_check(opts: &CpuOptions, target: &Target) -> Result<HostKeyCheck> {
    let port = target.port.parse::<u16>().unwrap_or(22);
    let policy = if !opts.host_key.is_empty() {
        let text = std::fs::read_to_string(&opts.host_key)
            .map_err(|e| Error::Config(format!("cannot read the pinned host key {}: {e}", opts.host_key)))?;
        let keys = crate::ssh::known_hosts::parse_pinned(&text, &opts.host_key)?;
        HostKeyPolicy::Pinned { keys, source: PathBuf::from(&opts.host_key) }
    } else {
        match target.strict.as_deref() {
            Some("no") | Some("off") => HostKeyPolicy::Off,
            strict => {
                let mut files = target.known_hosts_files.clone();
                files.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
                HostKeyPolicy::KnownHosts {
                    record_to: target.known_hosts_files[0].clone(),
                    files,
                    strict: strict == Some("yes"),
                    hash: target.hash_known_hosts,
                }
            }
        }
    };
    Ok(HostKeyCheck { policy, host: target.host_key_name.clone(), port })
}

/// The `env` requests of a session, in order (spec 3.7 step 3): the whole local environment
/// with TMPDIR=/tmp (in place, else appended), then the cpu variables. Variables whose name
/// or value is not UTF-8 cannot travel in an SSH string and are left out.
pub fn session_env(
    environ: Vec<(OsString, OsString)>,
    nonce: Option<&str>,
    fstab: Option<&str>,
    msize: u32,
    mount_opts: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut tmpdir_seen = false;
    for (k, v) in environ {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            log::debug!("not sending non-UTF-8 variable {}", k.to_string_lossy());
            continue;
        };
        if k == "TMPDIR" {
            tmpdir_seen = true;
            env.push((k.to_string(), "/tmp".to_string()));
        } else {
            env.push((k.to_string(), v.to_string()));
        }
    }
    if !tmpdir_seen {
        env.push(("TMPDIR".into(), "/tmp".into()));
    }
    if let Some(n) = nonce {
        env.push((protocol::ENV_NONCE.into(), n.into()));
    }
    if let Some(f) = fstab {
        env.push((protocol::ENV_FSTAB.into(), f.into()));
        env.push((protocol::ENV_FSTAB_LC.into(), f.into()));
    }
    if nonce.is_some() {
        env.push((protocol::ENV_MSIZE.into(), msize.to_string()));
        env.push((protocol::ENV_SYSTEM_MOUNT.into(), "1".into()));
        if !mount_opts.is_empty() {
            env.push((protocol::ENV_MOUNTOPTS.into(), mount_opts.into()));
        }
    }
    env
}

/// Makes PWD name the directory cpu really runs in: the remote side changes to $PWD (a Go
/// cpud fails without it, pitfall P13), and a program that started cpu in another directory
/// without updating PWD would otherwise send the wrong one. A PWD that is the same directory
/// (e.g. a path through a symlink) is kept as the user's shell spelled it.
pub fn with_current_pwd(
    mut environ: Vec<(OsString, OsString)>,
    cwd: &std::path::Path,
) -> Vec<(OsString, OsString)> {
    use std::os::unix::fs::MetadataExt;
    let same_dir = |p: &std::path::Path| match (std::fs::metadata(p), std::fs::metadata(cwd)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    match environ.iter_mut().find(|(k, _)| k == "PWD") {
        Some((_, v)) => {
            if !same_dir(std::path::Path::new(v)) {
                *v = cwd.as_os_str().to_owned();
            }
        }
        None => environ.push((OsString::from("PWD"), cwd.as_os_str().to_owned())),
    }
    environ
}

/// The remote command: the arguments, else $SHELL, else /bin/sh.
pub fn remote_command(args: &[OsString]) -> Vec<OsString> {
    if !args.is_empty() {
        return args.to_vec();
    }
    match std::env::var_os("SHELL").filter(|s| !s.is_empty()) {
        Some(s) => vec![s],
        None => vec![OsString::from("/bin/sh")],
    }
}

/// Waits for forwarded connections and serves 9P on the first `max_served` that start with
/// `nonce` (spec 3.6.1; a cpu-all cpud makes a second one for the system directories when
/// offered [`protocol::ENV_SYSTEM_MOUNT`]). A connection with a wrong or short nonce, or one
/// too many, is logged and closed, and the wait goes on; candidates are checked concurrently
/// so a silent one cannot block the real one. Returns when `incoming` closes, or when
/// `max_served` served connections have ended.
pub async fn accept_backchannel<S, F, Fut>(
    mut incoming: mpsc::UnboundedReceiver<S>,
    nonce: String,
    max_served: usize,
    serve: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(S) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let claimed = Arc::new(AtomicUsize::new(0));
    let serve = Arc::new(serve);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(max_served.max(1));
    let mut ended = 0;
    loop {
        let mut stream = tokio::select! {
            s = incoming.recv() => match s { Some(s) => s, None => break },
            _ = done_rx.recv() => {
                ended += 1;
                if ended >= max_served { break }
                continue;
            }
        };
        let nonce = nonce.clone();
        let claimed = claimed.clone();
        let serve = serve.clone();
        let done_tx = done_tx.clone();
        crate::task::spawn(async move {
            let mut got = [0u8; protocol::NONCE_LEN];
            match tokio::time::timeout(NONCE_TIMEOUT, stream.read_exact(&mut got)).await {
                Ok(Ok(_)) if protocol::nonce_matches(nonce.as_bytes(), &got) => {
                    if claimed.fetch_add(1, Ordering::SeqCst) >= max_served {
                        log::warn!(
                            "9p back-channel: one more connection with the right nonce than the {max_served} offered, closed"
                        );
                        return;
                    }
                    log::debug!("9p back-channel: nonce verified, serving 9P");
                    if let Err(e) = serve(stream).await {
                        log::error!("{e}");
                    }
                    log::debug!("9p back-channel: served connection ended");
                    let _ = done_tx.send(()).await;
                }
                Ok(Ok(_)) => {
                    log::warn!(
                        "9p back-channel: wrong nonce on a forwarded connection; closed it, still waiting"
                    );
                    // EOF first, then the drop closes the channel: the dialer sees the refusal.
                    let _ = stream.shutdown().await;
                }
                Ok(Err(e)) => {
                    log::warn!("9p back-channel: connection closed before its nonce ({e}); still waiting")
                }
                Err(_) => log::warn!("9p back-channel: no nonce within {NONCE_TIMEOUT:?}; closed it"),
            }
        });
    }
}

/// Why the local side of a session ended.
enum Ending {
    Closed(Outcome),
    Escape,
    LocalSignal(i32),
    /// Our stdout's reader went away (`cpu host yes | head -1`).
    StdoutGone,
}

/// A request that starts the session. pty-req and exec want a reply (a refusal ends the
/// session); env does not, as OpenSSH's ssh sends it: a server that refuses a variable (sshd's
/// AcceptEnv) drops it silently, and the session costs no reply message per variable (about 40
/// for a usual environment, each one a wake-up of the client on a busy host).
enum Request {
    Pty { term: String, ws: terminal::WindowSize },
    Env(String, String),
    Exec(Vec<u8>),
}

impl Request {
    /// The reply this request waits for, if it asks for one.
    fn pending(&self) -> Option<Pending> {
        match self {
            Request::Pty { .. } => Some(Pending::Pty),
            Request::Env(..) => None,
            Request::Exec(_) => Some(Pending::Exec),
        }
    }

    async fn send(
        self,
        w: &russh::ChannelWriteHalf<russh::client::Msg>,
    ) -> std::result::Result<(), russh::Error> {
        match self {
            Request::Pty { term, ws } => {
                // Modes as the Go NEW client sends them.
                let modes = [
                    (russh::Pty::ECHO, 1),
                    (russh::Pty::TTY_OP_ISPEED, 14400),
                    (russh::Pty::TTY_OP_OSPEED, 14400),
                ];
                let (wpx, hpx) = pixels(ws);
                w.request_pty(true, &term, ws.cols, ws.rows, wpx, hpx, &modes).await
            }
            Request::Env(k, v) => w.set_env(false, k, v).await,
            Request::Exec(cmd) => w.exec(true, cmd).await,
        }
    }
}

/// One outstanding want-reply request on the session channel.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Pending {
    Pty,
    Exec,
}

async fn session(opts: CpuOptions) -> Result<i32> {
    let net = Net::parse(&opts.net, true)?;
    let local = LocalEnv::from_process();
    let target = resolve(&opts, net, &local, &config_files(&local))?;
    if !opts.control_cmd.is_empty() {
        return crate::control::command(&target.control, &opts.control_cmd).await;
    }
    check_key_flags(&opts, &target)?;
    // Build the fstab before connecting: a syntax error must not cost a connection.
    let spec = SessionSpec::from_process(&opts)?;
    match crate::control::route(&opts, &target).await? {
        // A live master carries the session: no dial, no handshake, no authentication.
        crate::control::Route::Mux(stream) => {
            let stdin_at_eof = crate::control::stdin_at_eof(&spec);
            if let Some(stream) = crate::control::open(stream, &spec, stdin_at_eof).await {
                return crate::control::run_mux(stream, &spec, &target.host, stdin_at_eof).await;
            }
        }
        crate::control::Route::Exit(status) => return Ok(status),
        crate::control::Route::Direct => {}
    }
    let check = host_key_check(&opts, &target)?;
    let conn = connect(net, &opts, &target, check).await?;
    let (io, ends) = session_io();
    let tty = spec.tty.as_ref().map(|(_, ws)| *ws);
    let result = local_session(tty, &target.host, ends, Box::pin(run_channel(&conn, &spec, io, None))).await;
    // Bounded: a server that stopped reading must not keep cpu from exiting.
    let bye = conn.handle.disconnect(russh::Disconnect::ByApplication, "", "en");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bye).await;
    result
}

/// Dials the target, runs the SSH handshake and authenticates.
pub async fn connect(
    net: Net,
    opts: &CpuOptions,
    target: &Target,
    check: HostKeyCheck,
) -> Result<Connection> {
    log::debug!("connecting to {} port {} as {}", target.host, target.port, target.user);
    let through = match &target.proxy {
        Some(command) => format!(" through the proxy command `{command}`"),
        None => String::new(),
    };
    let mut conn = tokio::time::timeout(target.connect_timeout, async {
        let stream = match &target.proxy {
            Some(command) => transport::proxy::dial_command(command).await?,
            None => transport::dial(net, &target.host, &target.port, target.connect_timeout).await?,
        };
        crate::ssh::client::connect(stream, check).await.map_err(|e| match (&target.proxy, e) {
            // The command ended or never spoke SSH: say which command.
            (Some(_), Error::Connect(m)) => Error::Connect(format!("{m}{through}")),
            (Some(_), Error::Ssh(m)) => Error::Ssh(format!("{m}{through}")),
            (_, e) => e,
        })
    })
    .await
    .map_err(|_| {
        Error::Connect(format!("connecting to {} port {}{through}: timed out", target.host, target.port))
    })??;

    let methods = AuthMethods {
        first_files: target.explicit_keys.clone(),
        agent: target.use_agent,
        files: target.other_keys.clone(),
        none_only: !opts.use_key,
    };
    conn.authenticate(&target.user, &methods).await?;
    log::debug!("authenticated as {}", target.user);
    Ok(conn)
}

/// Everything one session needs that comes from the user's side: what a direct `cpu` takes
/// from its own process, and what a mux client sends its master (crate::control).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSpec {
    /// The environment to send, PWD naming the directory cpu runs in.
    pub environ: Vec<(OsString, OsString)>,
    /// The remote command (already defaulted to the shell).
    pub command: Vec<OsString>,
    /// TERM and the window size when stdin is a terminal: a pty is asked for.
    pub tty: Option<(String, terminal::WindowSize)>,
    /// Serve 9P on a back-channel of this session (`-9p` and a `-root`).
    pub ninep: bool,
    /// The exported directory, absolute.
    pub root: String,
    pub read_only: bool,
    pub msize: u32,
    pub mount_opts: String,
    pub debug_9p: bool,
    /// The fstab sent as CPU_FSTAB, if any.
    pub fstab: Option<String>,
}

impl SessionSpec {
    /// From the options and this process's environment, directory and terminal.
    pub fn from_process(opts: &CpuOptions) -> Result<SessionSpec> {
        let mut environ: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        let cwd = std::env::current_dir().ok();
        if let Some(cwd) = &cwd {
            environ = with_current_pwd(environ, cwd);
        }
        // A relative -root means the same directory wherever the session is served from.
        let root = match (&cwd, std::path::Path::new(&opts.root).is_relative() && !opts.root.is_empty()) {
            (Some(cwd), true) => cwd.join(&opts.root).to_string_lossy().into_owned(),
            _ => opts.root.clone(),
        };
        let fstab = if opts.root.is_empty() {
            None
        } else {
            let file = if opts.fstab.is_empty() {
                None
            } else {
                Some(
                    std::fs::read_to_string(&opts.fstab)
                        .map_err(|e| Error::Config(format!("cannot read -fstab {}: {e}", opts.fstab)))?,
                )
            };
            // Bind sources with the client's symlinks resolved inside the export (/lib ->
            // /usr/lib): the remote binds them without reading links over 9P. Built even
            // without 9P, so that a namespace syntax error never costs a connection.
            let with_binds = crate::namespace::client_fstab_resolved(
                &opts.namespace,
                file.as_deref(),
                std::path::Path::new(&root),
            )?;
            without_binds_unless_9p(opts.ninep, with_binds, file.as_deref())
        };
        let tty = terminal::window_size(std::io::stdin().as_fd()).map(|ws| {
            let term = std::env::var("TERM").ok().filter(|t| !t.is_empty()).unwrap_or_else(|| "dumb".into());
            (term, ws)
        });
        Ok(SessionSpec {
            environ,
            command: remote_command(&opts.command),
            tty,
            ninep: opts.ninep && !opts.root.is_empty(),
            root,
            read_only: opts.read_only,
            msize: opts.msize,
            mount_opts: opts.mount_opts.clone(),
            debug_9p: opts.debug_9p,
            fstab,
        })
    }
}

/// The CPU_FSTAB to send. Without 9P nothing is mounted at /tmp/cpu, so the namespace's bind
/// lines could only fail on the server (the Go cpud of 2025 prints "fstab mount failure" for
/// each, spec P16; the Go client sends them anyway): only the -fstab file's lines go, if any.
fn without_binds_unless_9p(ninep: bool, with_binds: String, fstab_file: Option<&str>) -> Option<String> {
    match (ninep, fstab_file) {
        (true, _) => Some(with_binds),
        (false, Some(file)) if !file.trim_matches('\n').is_empty() => {
            Some(format!("{}\n", file.trim_matches('\n')))
        }
        (false, _) => None,
    }
}

/// How a session ended on the server: what [`exit_code`] turns into cpu's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub exit_status: Option<u32>,
    pub exit_signal: Option<String>,
    /// The session's remote forward (address, port), which a control master cancels.
    pub forward: Option<(String, u16)>,
}

/// What the user's side asks of a running session besides stdin.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    Signal(Sig),
    WindowChange(terminal::WindowSize),
    /// The user's side is gone (a mux client that went away): end the session.
    Hangup,
}

/// The session's side of its I/O: stdin chunks (closed: EOF), stdout/stderr chunks
/// (`true`: stderr) and events.
pub struct SessionIo {
    pub stdin: mpsc::Receiver<Vec<u8>>,
    pub output: OutputSender,
    pub events: mpsc::UnboundedReceiver<SessionEvent>,
}

/// The user's side of a [`SessionIo`].
pub struct SessionEnds {
    pub stdin: mpsc::Sender<Vec<u8>>,
    pub output: OutputReceiver,
    pub events: mpsc::UnboundedSender<SessionEvent>,
}

/// Bytes of a session's output that may wait for the user's side before the session stops
/// taking more. It is large on purpose: russh hands every channel's data to the one loop that
/// reads the connection, refills a channel's window when data arrives (not when it is
/// consumed), and stops reading for ALL channels while one channel's consumer is full. So a
/// session whose reader stalls (`cpu board dmesg | less`, waiting on the user) froze every
/// other session of a control master and its own 9P back-channel after a few hundred KB;
/// now only after this much more.
pub const OUTPUT_BUDGET: usize = 8 << 20;

/// The session's end of its output queue (see [`OUTPUT_BUDGET`]).
pub struct OutputSender {
    chunks: mpsc::UnboundedSender<(bool, Vec<u8>)>,
    budget: Arc<tokio::sync::Semaphore>,
}

/// The user's end of a session's output queue: stdout (`false`) and stderr (`true`) chunks in
/// order. Dropping it lets a sender waiting for room go on (and fail).
pub struct OutputReceiver {
    chunks: mpsc::UnboundedReceiver<(bool, Vec<u8>)>,
    budget: Arc<tokio::sync::Semaphore>,
}

/// A chunk's share of the budget (a chunk bigger than all of it takes all of it).
fn output_cost(bytes: &[u8]) -> u32 {
    bytes.len().min(OUTPUT_BUDGET) as u32
}

impl OutputSender {
    /// Queues a chunk, waiting only while [`OUTPUT_BUDGET`] bytes are queued already.
    /// `Err` when the user's side is gone.
    pub async fn send(&self, to_stderr: bool, bytes: Vec<u8>) -> std::result::Result<(), ()> {
        let permit = self.budget.acquire_many(output_cost(&bytes)).await.map_err(|_| ())?;
        permit.forget();
        self.chunks.send((to_stderr, bytes)).map_err(|_| ())
    }
}

impl OutputReceiver {
    pub async fn recv(&mut self) -> Option<(bool, Vec<u8>)> {
        let chunk = self.chunks.recv().await?;
        self.budget.add_permits(output_cost(&chunk.1) as usize);
        Some(chunk)
    }

    /// [`OutputReceiver::recv`] for a plain thread.
    pub fn blocking_recv(&mut self) -> Option<(bool, Vec<u8>)> {
        let chunk = self.chunks.blocking_recv()?;
        self.budget.add_permits(output_cost(&chunk.1) as usize);
        Some(chunk)
    }
}

impl Drop for OutputReceiver {
    fn drop(&mut self) {
        self.budget.close();
    }
}

/// A session's output queue.
pub fn output_queue() -> (OutputSender, OutputReceiver) {
    let (chunks_tx, chunks_rx) = mpsc::unbounded_channel();
    let budget = Arc::new(tokio::sync::Semaphore::new(OUTPUT_BUDGET));
    (OutputSender { chunks: chunks_tx, budget: budget.clone() }, OutputReceiver { chunks: chunks_rx, budget })
}

/// A connected pair of session I/O ends.
pub fn session_io() -> (SessionIo, SessionEnds) {
    let (stdin_tx, stdin_rx) = mpsc::channel(4);
    let (out_tx, out_rx) = output_queue();
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    (
        SessionIo { stdin: stdin_rx, output: out_tx, events: ev_rx },
        SessionEnds { stdin: stdin_tx, output: out_rx, events: ev_tx },
    )
}

/// Aborts a task when dropped: a session cancelled half-way leaves nothing running.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The local side of a session, direct or through a master: this process's stdin (with the
/// `~.` escape on a terminal), stdout and stderr, raw mode, and signals, around `runner`,
/// which carries the session and returns how it ended.
pub async fn local_session(
    tty: Option<terminal::WindowSize>,
    host: &str,
    ends: SessionEnds,
    // Boxed: one copy of this function serves direct and mux sessions.
    mut runner: std::pin::Pin<Box<dyn std::future::Future<Output = Result<Outcome>> + '_>>,
) -> Result<i32> {
    let SessionEnds { stdin: stdin_tx, output: out_rx, events } = ends;
    let stdin = std::io::stdin();
    // Raw mode from here on; the guard restores the terminal on every way out of this function.
    let _raw = match tty {
        Some(_) => match terminal::RawMode::enter(stdin.as_fd()) {
            Ok(g) => Some(g),
            Err(e) => {
                log::warn!("cannot put the terminal in raw mode: {e}");
                None
            }
        },
        None => None,
    };

    // Local stdin to the session, in its own task so that a slow keyboard never stops the
    // loop below; with a terminal it filters the `~.` escape and reports it here. The session
    // holds stdin back until its command is started.
    let (escape_tx, mut escape_rx) = mpsc::channel::<()>(1);
    let is_tty = tty.is_some();
    // /dev/null has nothing to read: no reader thread, and the session sees EOF at once (no
    // hand-off from that thread before the EOF can follow the exec).
    let mut lent = LentStdin(if stdin_is_null() { None } else { Some(take_stdin()) });
    let stdin_task = AbortOnDrop(crate::task::spawn(async move {
        let Some(rx) = lent.0.as_mut() else { return };
        let mut escape = EscapeFilter::new();
        while let Some(bytes) = rx.recv().await {
            let (out, action) = if is_tty {
                let mut out = Vec::with_capacity(bytes.len());
                let action = escape.feed(&bytes, &mut out);
                (out, action)
            } else {
                (bytes, EscapeAction::Forward)
            };
            if !out.is_empty() && stdin_tx.send(out).await.is_err() {
                return;
            }
            if action == EscapeAction::Disconnect {
                let _ = escape_tx.send(()).await;
                return;
            }
        }
        // Batch mode: the session sends EOF when this sender is dropped. With a terminal,
        // EOF is a key (^D): keep the sender until the session ends.
        if is_tty {
            std::future::pending::<()>().await;
        }
    }));

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| Error::io("SIGINT handler", e))?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| Error::io("SIGTERM handler", e))?;
    let mut sighup = signal(SignalKind::hangup()).map_err(|e| Error::io("SIGHUP handler", e))?;
    let mut sigwinch = signal(SignalKind::window_change()).map_err(|e| Error::io("SIGWINCH handler", e))?;

    // stdout and stderr: written by one plain thread, in order, so a slow reader only slows
    // us down; joined before we return so nothing is lost (pitfall P19). The thread starts
    // with the first output: a session that prints nothing (`cpu host true`) makes none, and
    // its end waits for no hand-off to a thread and back (two wake-ups, each a wait for a
    // core on a busy host).
    let mut unstarted_output = Some(out_rx);
    let mut output: Option<OutputThread> = None;
    // The output thread says when our stdout's reader is gone (EPIPE): then the session ends,
    // as a local `yes | head -1` ends (ssh closes the channel; Go's cpu dies of SIGPIPE).
    let (stdout_gone_tx, mut stdout_gone) = mpsc::channel::<()>(1);
    let mut stdout_gone_tx = Some(stdout_gone_tx);
    let (mut interrupts, mut terminations) = (0u32, 0u32);
    let ending = loop {
        tokio::select! {
            r = &mut runner => break r.map(Ending::Closed),
            first = next_output(&mut unstarted_output), if unstarted_output.is_some() => {
                if let (Some(chunk), Some(rx), Some(gone)) = (first, unstarted_output.take(), stdout_gone_tx.take()) {
                    output = Some(OutputThread::start(chunk, rx, gone));
                }
            }
            Some(()) = stdout_gone.recv() => break Ok(Ending::StdoutGone),
            Some(()) = escape_rx.recv() => break Ok(Ending::Escape),
            // Signals are forwarded (the session sends them once its command started); but a
            // server that ignores them must not make cpu unkillable.
            _ = sigint.recv() => {
                interrupts += 1;
                let _ = events.send(SessionEvent::Signal(Sig::INT));
                if interrupts >= 3 { break Ok(Ending::LocalSignal(2)); }
            }
            _ = sigterm.recv() => {
                terminations += 1;
                let _ = events.send(SessionEvent::Signal(Sig::TERM));
                if tty.is_some() || terminations >= 2 { break Ok(Ending::LocalSignal(15)); }
            }
            _ = sighup.recv() => {
                let _ = events.send(SessionEvent::Signal(Sig::HUP));
                if tty.is_some() { break Ok(Ending::LocalSignal(1)); }
            }
            _ = sigwinch.recv(), if tty.is_some() => {
                if let Some(ws) = terminal::window_size(std::io::stdin().as_fd()) {
                    let _ = events.send(SessionEvent::WindowChange(ws));
                }
            }
        }
    };
    drop(stdin_task);
    // Ends the session if it still runs, which closes the output channel.
    drop(runner);
    match (output, unstarted_output) {
        (Some(thread), _) => thread.finish().await,
        // Output that came with the end: the session is over, nothing else waits for this thread.
        (None, Some(mut rx)) => {
            while let Some((to_stderr, bytes)) = rx.recv().await {
                let _ = write_chunk(to_stderr, &bytes);
            }
        }
        (None, None) => {}
    }
    drop(_raw);
    match ending? {
        Ending::Escape => {
            eprintln!("cpu: connection to {host} closed (~.)");
            Ok(EXIT_CONNECTION)
        }
        Ending::StdoutGone => {
            log::debug!("stdout's reader went away: session closed");
            Ok(EXIT_STDOUT_GONE)
        }
        Ending::LocalSignal(n) => {
            eprintln!("cpu: stopped by signal {n}; the remote command may still run");
            Ok(128 + n)
        }
        Ending::Closed(o) => Ok(exit_code(o.exit_status, o.exit_signal.as_deref(), host)),
    }
}

/// Runs one session on an authenticated connection: the 9P back-channel when asked, the
/// session channel and its requests, then the I/O until the server closes the channel.
/// `opened` is a session channel already open on `conn` (a control master's spare), else one
/// is opened here.
pub async fn run_channel(
    conn: &Connection,
    spec: &SessionSpec,
    io: SessionIo,
    opened: Option<russh::Channel<russh::client::Msg>>,
) -> Result<Outcome> {
    let SessionIo { stdin: mut local_stdin, output: out_tx, mut events } = io;
    // tcpip-forward and the session channel's open are independent: one round trip for both
    // (only the exec string needs the forwarded port, and it is sent after both replies).
    let forward = async {
        match spec.ninep {
            true => conn.forward_loopback().await.map(Some),
            false => Ok(None),
        }
    };
    let open = async {
        match opened {
            Some(channel) => Ok(channel),
            None => conn.handle.channel_open_session().await,
        }
    };
    let (forward, channel) = tokio::join!(forward, open);
    let mut backchannel = None;
    let nonce = match forward? {
        Some((addr, port, rx)) => {
            backchannel = Some((addr, port, rx));
            Some(protocol::new_nonce()?)
        }
        None => None,
    };
    let forward = backchannel.as_ref().map(|(a, p, _)| (a.clone(), *p));
    let channel = channel.map_err(|e| Error::Ssh(format!("opening the session channel: {e}")))?;
    let (mut reader, writer) = channel.split();

    // pty-req, env and exec: sent by their own task while the loop below already reads what
    // the server says (a large environment would otherwise fill russh's outgoing queue while
    // nobody reads, and stall the connection). Only pty-req and exec ask for a reply.
    let mut requests: Vec<Request> = Vec::new();
    if let Some((term, ws)) = &spec.tty {
        requests.push(Request::Pty { term: term.clone(), ws: *ws });
    }
    for (k, v) in session_env(
        spec.environ.clone(),
        nonce.as_deref(),
        spec.fstab.as_deref(),
        spec.msize,
        &spec.mount_opts,
    ) {
        requests.push(Request::Env(k, v));
    }
    let command = &spec.command;
    let exec = crate::cmdline::build_exec(backchannel.as_ref().map(|(_, p, _)| *p), command);
    log::debug!("exec {:?}", String::from_utf8_lossy(&exec));
    requests.push(Request::Exec(exec));
    let mut pending: VecDeque<Pending> = requests.iter().filter_map(Request::pending).collect();
    let writer = Arc::new(writer);
    let (sent_tx, mut sent_rx) = tokio::sync::oneshot::channel::<std::result::Result<(), russh::Error>>();
    // The same task then carries the user's stdin to the remote: it starts the moment exec is
    // sent, and an input already at its end (`</dev/null`) sends EOF right behind the exec, in
    // the same write. Its own task, so that neither a full remote window nor a slow keyboard
    // ever stops the loop below from reading the remote's output (which is what lets russh
    // process the window adjustments).
    let request_writer = writer.clone();
    let is_tty = spec.tty.is_some();
    let mut remote_stdin = writer.make_writer();
    let stdin_task = AbortOnDrop(crate::task::spawn(async move {
        let mut result = Ok(());
        for r in requests {
            result = r.send(&request_writer).await;
            if result.is_err() {
                break;
            }
        }
        let started = result.is_ok();
        let _ = sent_tx.send(result);
        if !started {
            return;
        }
        while let Some(bytes) = local_stdin.recv().await {
            if remote_stdin.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // Batch mode: EOF to the remote. With a terminal, EOF is a key (^D).
        if !is_tty {
            let _ = remote_stdin.shutdown().await;
        }
    }));
    let mut requests_sent = false;

    // For the `-d` summary (make bench reads it): round trips decide speed on a real link.
    let request_counts = Arc::new(crate::wirecount::RequestCounts::default());
    let acceptor = match (backchannel, nonce) {
        (Some((_addr, _port, rx)), Some(nonce)) => {
            let serve_opts = crate::ninep::ServeOptions {
                root: PathBuf::from(&spec.root),
                read_only: spec.read_only,
                max_msize: spec.msize,
                trace: spec.debug_9p,
            };
            let counts = request_counts.clone();
            Some(AbortOnDrop(crate::task::spawn(accept_backchannel(
                rx,
                nonce,
                BACKCHANNEL_CONNECTIONS,
                move |stream| {
                    crate::ninep::serve(
                        crate::wirecount::Counted::new(stream, counts.clone()),
                        serve_opts.clone(),
                    )
                },
            ))))
        }
        _ => None,
    };

    let mut outcome = Outcome::default();
    let mut events_open = true;
    let ended: Result<()> = loop {
        tokio::select! {
            msg = reader.wait() => match msg {
                Some(russh::ChannelMsg::Data { data }) => {
                    let _ = out_tx.send(false, data.to_vec()).await;
                }
                Some(russh::ChannelMsg::ExtendedData { data, ext }) => {
                    if ext == 1 {
                        let _ = out_tx.send(true, data.to_vec()).await;
                    }
                }
                Some(russh::ChannelMsg::ExitStatus { exit_status: s }) => outcome.exit_status = Some(s),
                Some(russh::ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, .. }) => {
                    let name = crate::ssh::session::signal_text(&signal_name);
                    log::debug!("remote command killed by SIG{name}{} {error_message}", if core_dumped { " (core dumped)" } else { "" });
                    outcome.exit_signal = Some(name);
                }
                Some(russh::ChannelMsg::Success) => { pending.pop_front(); }
                Some(russh::ChannelMsg::Failure) => match pending.pop_front() {
                    Some(Pending::Pty) => break Err(Error::Ssh("the server refused a pseudo-terminal".into())),
                    Some(Pending::Exec) => break Err(Error::Ssh(format!(
                        "the server refused to run the command {:?}",
                        String::from_utf8_lossy(&crate::cmdline::build_exec(None, command)).trim_start()
                    ))),
                    None => {}
                },
                Some(russh::ChannelMsg::Eof) => log::debug!("remote EOF"),
                Some(russh::ChannelMsg::Close) | None => break Ok(()),
                Some(_) => {}
            },
            sent = &mut sent_rx, if !requests_sent => {
                requests_sent = true;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break Err(Error::Ssh(format!("starting the session: {e}"))),
                    Err(_) => break Err(Error::Ssh("starting the session: request task ended".into())),
                }
            }
            // Events wait until exec is sent (Go cpud crashes on an early signal, P10). They
            // are sent from tasks so that a busy connection never blocks this loop.
            ev = events.recv(), if requests_sent && events_open => match ev {
                Some(SessionEvent::Signal(sig)) => send_signal(&writer, sig),
                Some(SessionEvent::WindowChange(ws)) => {
                    let (wpx, hpx) = pixels(ws);
                    let w = writer.clone();
                    crate::task::spawn(async move { let _ = w.window_change(ws.cols, ws.rows, wpx, hpx).await; });
                }
                Some(SessionEvent::Hangup) => {
                    // As sshd does when its client vanishes: the channel closes, the remote
                    // command gets SIGHUP from its terminal (or EOF).
                    let bye = async { let _ = writer.eof().await; let _ = writer.close().await; };
                    let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
                    break Ok(());
                }
                None => events_open = false,
            },
        }
    };
    drop(stdin_task);
    if let Some((addr, port)) = &forward {
        conn.stop_forwarding(addr, *port);
    }
    outcome.forward = forward;
    if acceptor.is_some() {
        log::debug!("{}", request_counts.summary());
    }
    ended.map(|()| outcome)
}

/// Sends a `signal` request without waiting in the caller.
fn send_signal(writer: &Arc<russh::ChannelWriteHalf<russh::client::Msg>>, sig: Sig) {
    let w = writer.clone();
    crate::task::spawn(async move {
        let _ = w.signal(sig).await;
    });
}

/// Local stdin as chunks from one reader thread for the whole process (a blocking read of a
/// terminal or pipe cannot be cancelled, so the thread is started once and its receiver is lent
/// to each session in turn: decpu may run several sessions one after another).
static STDIN: std::sync::OnceLock<std::sync::Mutex<Option<mpsc::Receiver<Vec<u8>>>>> =
    std::sync::OnceLock::new();

fn take_stdin() -> mpsc::Receiver<Vec<u8>> {
    let slot = STDIN.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
        crate::task::spawn_thread(move || {
            use std::io::Read;
            let mut input = std::io::stdin().lock();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
        });
        std::sync::Mutex::new(Some(rx))
    });
    let taken = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    // Only one session runs at a time; if none is lent back, stdin is treated as closed.
    taken.unwrap_or_else(|| mpsc::channel(1).1)
}

/// Whether this process's stdin is /dev/null (character device 1:3), which reads as EOF at
/// once (`cpu host cmd </dev/null`, scripts, cron, the benches).
pub fn stdin_is_null() -> bool {
    match rustix::fs::fstat(rustix::stdio::stdin()) {
        Ok(st) => {
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice
                && rustix::fs::major(st.st_rdev) == 1
                && rustix::fs::minor(st.st_rdev) == 3
        }
        Err(_) => false,
    }
}

/// Lends the stdin receiver to one session and gives it back however the session ends.
struct LentStdin(Option<mpsc::Receiver<Vec<u8>>>);

impl Drop for LentStdin {
    fn drop(&mut self) {
        if let (Some(slot), Some(rx)) = (STDIN.get(), self.0.take()) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(rx);
        }
    }
}

/// The next output chunk of a session whose writer thread has not started (None: closed).
async fn next_output(rx: &mut Option<OutputReceiver>) -> Option<(bool, Vec<u8>)> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The thread that writes a session's stdout and stderr.
struct OutputThread {
    handle: std::thread::JoinHandle<()>,
    /// Says when it is done, so joining it needs no blocking-pool thread of its own.
    written: tokio::sync::oneshot::Receiver<()>,
}

impl OutputThread {
    /// Writes `first`, then every chunk of `rx` until it closes. When stdout's reader is gone
    /// it says so on `stdout_gone` once and drops stdout's chunks from then on (stderr's are
    /// still written), so that the session can end.
    fn start(first: (bool, Vec<u8>), mut rx: OutputReceiver, stdout_gone: mpsc::Sender<()>) -> OutputThread {
        let (written_tx, written) = tokio::sync::oneshot::channel::<()>();
        let handle = crate::task::spawn_thread(move || {
            let mut stdout_open = true;
            let mut chunk = Some(first);
            while let Some((to_stderr, bytes)) = chunk.take().or_else(|| rx.blocking_recv()) {
                if (to_stderr || stdout_open) && write_chunk(to_stderr, &bytes) == Written::ReaderGone {
                    stdout_open = false;
                    let _ = stdout_gone.try_send(());
                }
            }
            let _ = written_tx.send(());
        });
        OutputThread { handle, written }
    }

    /// Waits until everything is written (the channel's senders are gone).
    async fn finish(self) {
        let _ = self.written.await;
        let _ = self.handle.join();
    }
}

/// What became of a chunk written to stdout or stderr.
#[derive(Debug, PartialEq, Eq)]
enum Written {
    /// Written, or lost to an error the session goes on after.
    Done,
    /// stdout's reader is gone (EPIPE: `| head` has read what it wanted).
    ReaderGone,
}

/// Writes one chunk to fd 2 or fd 1 (Rust ignores SIGPIPE: a closed pipe is EPIPE here).
fn write_chunk(to_stderr: bool, bytes: &[u8]) -> Written {
    use std::io::Write;
    let result = if to_stderr {
        let mut err = std::io::stderr();
        err.write_all(bytes).and_then(|_| err.flush())
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).and_then(|_| out.flush())
    };
    match result {
        Err(e) if !to_stderr && e.kind() == std::io::ErrorKind::BrokenPipe => Written::ReaderGone,
        _ => Written::Done,
    }
}

/// The exit status for what the server reported.
pub fn exit_code(status: Option<u32>, signal: Option<&str>, host: &str) -> i32 {
    match (status, signal) {
        (Some(s), _) => (s & 0xff) as i32,
        (None, Some(name)) => match crate::ssh::session::signal_from_name(name).map(|s| s.as_raw()) {
            Some(n) => 128 + n,
            None => {
                eprintln!("cpu: the remote command was killed by unknown signal {name:?}");
                EXIT_CONNECTION
            }
        },
        (None, None) => {
            eprintln!("cpu: the session on {host} ended without an exit status");
            EXIT_CONNECTION
        }
    }
}

/// Pixel sizes for pty-req and window-change: the terminal's own, else 8 per cell as Go does.
fn pixels(ws: terminal::WindowSize) -> (u32, u32) {
    if ws.width_px > 0 && ws.height_px > 0 {
        (ws.width_px, ws.height_px)
    } else {
        (ws.cols * 8, ws.rows * 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn opts(args: &[&str]) -> CpuOptions {
        CpuOptions::from_cpu_args(args.iter().map(OsString::from)).unwrap()
    }

    fn local(home: &Path) -> LocalEnv {
        LocalEnv { home: home.to_path_buf(), user: "localme".into() }
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cpu-client-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join(".ssh")).unwrap();
        d
    }

    #[test]
    fn resolution_user_host_port_keys() {
        let home = tmpdir("resolve");
        std::fs::write(
            home.join(".ssh/config"),
            "Host board\n  HostName 10.9.8.7\n  Port 2222\n  User pi\n  IdentityFile ~/.ssh/board\n  IdentityFile ~/.ssh/missing\n\
             Host *\n  IdentityFile %d/.ssh/id_%r\n",
        )
        .unwrap();
        for f in ["board", "id_pi", "id_ed25519", "id_rsa"] {
            std::fs::write(home.join(".ssh").join(f), "x").unwrap();
        }
        let files = vec![home.join(".ssh/config")];
        let t = resolve(&opts(&["board"]), Net::Tcp, &local(&home), &files).unwrap();
        assert_eq!((t.user.as_str(), t.host.as_str(), t.port.as_str()), ("pi", "10.9.8.7", "2222"));
        assert_eq!(t.host_key_name, "10.9.8.7");
        assert_eq!(t.connect_timeout, CONNECT_TIMEOUT);
        assert_eq!(
            t.other_keys,
            vec![
                home.join(".ssh/board"),
                home.join(".ssh/id_pi"),
                home.join(".ssh/id_ed25519"),
                home.join(".ssh/id_rsa")
            ]
        );
        assert!(t.explicit_keys.is_empty());
        assert_eq!(t.known_hosts_files, vec![home.join(".ssh/known_hosts")]);

        let t = resolve(&opts(&["-sp", "17", "-key", "~/k", "bob@board"]), Net::Tcp, &local(&home), &files)
            .unwrap();
        assert_eq!((t.user.as_str(), t.host.as_str(), t.port.as_str()), ("bob", "10.9.8.7", "17"));
        assert_eq!(t.explicit_keys, vec![home.join("k")]);
        assert!(t.other_keys.is_empty());

        // No config entry: never port 22 (pitfall P1), local user.
        let t = resolve(&opts(&["other"]), Net::Tcp, &local(&home), &files).unwrap();
        assert_eq!((t.user.as_str(), t.host.as_str(), t.port.as_str()), ("localme", "other", "17010"));

        // decpu passes IP literals.
        let t = resolve(&opts(&["-sp", "9", "::1"]), Net::Tcp, &local(&home), &files).unwrap();
        assert_eq!((t.host.as_str(), t.port.as_str()), ("::1", "9"));
        let t = resolve(&opts(&["u@[fe80::1]"]), Net::Tcp, &local(&home), &files).unwrap();
        assert_eq!((t.user.as_str(), t.host.as_str()), ("u", "fe80::1"));

        // A port in the host is refused with the -sp hint; IPv6 literals are not ports.
        let e = resolve(&opts(&["u@localhost:17011"]), Net::Tcp, &local(&home), &files).unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"localhost:17011\" is not a host name: give the port with -sp, as in: cpu -sp 17011 localhost ..."
        );
        assert!(resolve(&opts(&["fe80::1"]), Net::Tcp, &local(&home), &files).is_ok());
        assert!(resolve(&opts(&["-net", "unix", "/run/x:1"]), Net::Unix, &local(&home), &files).is_ok());

        // unix socket paths are not split at '@'.
        let t = resolve(&opts(&["-net", "unix", "@abstract"]), Net::Unix, &local(&home), &files).unwrap();
        assert_eq!(t.host, "@abstract");
        std::fs::remove_dir_all(&home).unwrap();
    }

    #[test]
    fn env_sequence_matches_go_new() {
        let environ = vec![
            (OsString::from("HOME"), OsString::from("/h")),
            (OsString::from("TMPDIR"), OsString::from("/var/folders/x")),
            (OsString::from("PWD"), OsString::from("/h/src")),
        ];
        let env = session_env(environ.clone(), Some("n0"), Some("\nF\n"), 65536, "");
        let want: Vec<(String, String)> = [
            ("HOME", "/h"),
            ("TMPDIR", "/tmp"),
            ("PWD", "/h/src"),
            ("CPUNONCE", "n0"),
            ("CPU_FSTAB", "\nF\n"),
            ("LC_GLENDA_CPU_FSTAB", "\nF\n"),
            ("CPU_MSIZE", "65536"),
            ("CPU_SYSTEM_MOUNT", "1"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        assert_eq!(env, want);

        let env = session_env(environ[..1].to_vec(), None, None, 65536, "cache=loose");
        assert_eq!(env, vec![("HOME".into(), "/h".into()), ("TMPDIR".into(), "/tmp".into())]);
        let env = session_env(vec![], Some("n"), None, 8192, "cache=loose");
        assert_eq!(env.last().unwrap(), &("CPU_MOUNTOPTS".to_string(), "cache=loose".to_string()));
    }

    #[test]
    fn no_bind_lines_without_9p() {
        let binds = "\n/tmp/cpu/lib /lib none defaults,bind 0 0\n".to_string();
        assert_eq!(without_binds_unless_9p(true, binds.clone(), None), Some(binds.clone()));
        assert_eq!(without_binds_unless_9p(false, binds.clone(), None), None);
        assert_eq!(without_binds_unless_9p(false, binds.clone(), Some("\n\n")), None);
        let file = "\nnone /mnt tmpfs defaults 0 0\n\n";
        assert_eq!(
            without_binds_unless_9p(false, binds, Some(file)),
            Some("none /mnt tmpfs defaults 0 0\n".into())
        );
    }

    #[test]
    fn pwd_names_the_real_directory() {
        let dir = tmpdir("pwd");
        let e = |v: &[(&str, &str)]| -> Vec<(OsString, OsString)> {
            v.iter().map(|(a, b)| (OsString::from(a), OsString::from(b))).collect()
        };
        let d = dir.to_str().unwrap();
        let link = dir.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let l = link.to_str().unwrap();
        assert_eq!(with_current_pwd(e(&[("A", "1"), ("PWD", "/")]), &dir), e(&[("A", "1"), ("PWD", d)]));
        assert_eq!(with_current_pwd(e(&[("A", "1")]), &dir), e(&[("A", "1"), ("PWD", d)]));
        assert_eq!(with_current_pwd(e(&[("PWD", l)]), &dir), e(&[("PWD", l)]), "same dir through a symlink");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(Some(7), None, "h"), 7);
        assert_eq!(exit_code(Some(0), Some("TERM"), "h"), 0);
        assert_eq!(exit_code(None, Some("TERM"), "h"), 143);
        assert_eq!(exit_code(None, Some("KILL"), "h"), 137);
        assert_eq!(exit_code(None, None, "h"), 255);
    }

    /// env asks for no reply, so a server's success or failure lines up with pty-req and exec
    /// only: a refused exec after forty env requests is still reported as a refused exec.
    #[test]
    fn only_pty_and_exec_wait_for_a_reply() {
        let ws = terminal::WindowSize { cols: 80, rows: 24, width_px: 0, height_px: 0 };
        let requests = [
            Request::Pty { term: "xterm".into(), ws },
            Request::Env("A".into(), "1".into()),
            Request::Env("B".into(), "2".into()),
            Request::Exec(b"true".to_vec()),
        ];
        let pending: Vec<Pending> = requests.iter().filter_map(Request::pending).collect();
        assert_eq!(pending, vec![Pending::Pty, Pending::Exec]);
    }

    /// A back-channel acceptor offering `offered` connections whose served streams (the bytes
    /// after the nonce) are sent to the returned receiver.
    fn recording_acceptor(
        offered: usize,
    ) -> (
        String,
        mpsc::UnboundedSender<tokio::io::DuplexStream>,
        mpsc::UnboundedReceiver<Vec<u8>>,
        tokio::task::JoinHandle<()>,
    ) {
        let nonce = "0123456789abcdef0123456789abcdef".to_string();
        let (tx, rx) = mpsc::unbounded_channel();
        let (served_tx, served_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let acceptor = crate::task::spawn(accept_backchannel(
            rx,
            nonce.clone(),
            offered,
            move |mut s: tokio::io::DuplexStream| {
                let served_tx = served_tx.clone();
                async move {
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await.map_err(|e| Error::io("read", e))?;
                    let _ = served_tx.send(rest);
                    Ok(())
                }
            },
        ));
        (nonce, tx, served_rx, acceptor)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn backchannel_rejects_wrong_nonce_and_serves_the_right_one() {
        let (nonce, tx, mut served_rx, acceptor) = recording_acceptor(1);
        // A wrong nonce: the acceptor closes the connection.
        let (mut bad, bad_remote) = tokio::io::duplex(1024);
        tx.send(bad_remote).unwrap();
        bad.write_all(b"ffffffffffffffffffffffffffffffff").await.unwrap();
        let mut buf = Vec::new();
        let n =
            tokio::time::timeout(Duration::from_secs(5), bad.read_to_end(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 0, "the wrong-nonce connection is closed");
        // A short one: closed too.
        let (mut short, short_remote) = tokio::io::duplex(1024);
        tx.send(short_remote).unwrap();
        short.write_all(b"0123").await.unwrap();
        short.shutdown().await.unwrap();
        // The right one is served with the bytes after the nonce.
        let (mut good, good_remote) = tokio::io::duplex(1024);
        tx.send(good_remote).unwrap();
        good.write_all(format!("{nonce}Tversion").as_bytes()).await.unwrap();
        good.shutdown().await.unwrap();
        let rest = tokio::time::timeout(Duration::from_secs(5), served_rx.recv()).await.unwrap().unwrap();
        assert_eq!(rest, b"Tversion");
        // After the served connection ends, the acceptor returns.
        tokio::time::timeout(Duration::from_secs(5), acceptor).await.unwrap().unwrap();
        assert!(served_rx.try_recv().is_err(), "served exactly once");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn backchannel_serves_as_many_connections_as_offered_and_refuses_more() {
        let (nonce, tx, mut served_rx, acceptor) = recording_acceptor(2);
        let mut ends = Vec::new();
        for name in ["main", "system"] {
            let (mut end, remote) = tokio::io::duplex(1024);
            tx.send(remote).unwrap();
            end.write_all(format!("{nonce}{name}").as_bytes()).await.unwrap();
            ends.push(end);
        }
        // A third with the right nonce is closed unserved.
        let (mut extra, extra_remote) = tokio::io::duplex(1024);
        tx.send(extra_remote).unwrap();
        extra.write_all(nonce.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let n =
            tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 0, "the connection beyond the offer is closed");
        for mut end in ends {
            end.shutdown().await.unwrap();
        }
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(tokio::time::timeout(Duration::from_secs(5), served_rx.recv()).await.unwrap().unwrap());
        }
        got.sort();
        assert_eq!(got, [b"main".to_vec(), b"system".to_vec()]);
        // Both served connections ended: the acceptor returns.
        tokio::time::timeout(Duration::from_secs(5), acceptor).await.unwrap().unwrap();
    }
}

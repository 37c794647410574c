//! Connection reuse as OpenSSH does it: ControlMaster, ControlPath and ControlPersist (from
//! ssh_config or the `-control*` flags), a master that keeps one SSH connection, and mux
//! clients that run their sessions over it through a unix socket, with no dial, no key
//! exchange and no authentication.
//!
//! The master is a background process of its own (a re-execution of this binary, told by
//! [`SERVE_ENV`] where to listen): it connects and authenticates with the user's options,
//! binds the control socket (mode 0600 by umask, linked into place so two masters cannot both
//! win), says "ready" on its stdout pipe, leaves the terminal (setsid, stdio on /dev/null
//! unless -d) and serves. The `cpu` that started it then runs its own session as a mux client,
//! like every later one. So the user's shell never waits for the master, and the master never
//! touches a terminal. (OpenSSH does the same with ControlPersist; without it OpenSSH keeps the
//! first ssh in the foreground as master until every session ended. Here the master exits when
//! its last session ends instead, and the first `cpu` returns with its own session.)
//!
//! A mux client relays its stdio over the socket rather than passing its descriptors with
//! SCM_RIGHTS: raw mode and its restore, the `~.` escape, signal counting and the ordering of
//! stdout and stderr then stay in the process the user started, exactly as in a direct session
//! (it is the same code: [`crate::client::local_session`]), and a master that dies cannot
//! leave the user's terminal raw. The cost is one copy through a local socket.
//!
//! The master runs each session with [`crate::client::run_channel`], the code of a direct
//! session, with the mux client's environment, directory, command, terminal and 9P options
//! (-root, -namespace, -ro, -msize, -mountopts): each session gets its own remote forward and
//! nonce. When a session has ended, the master opens the next session's channel
//! ([`SpareChannel`]): the server confirms it while nobody waits, and the next mux session
//! costs one round trip less (the channel open), as long as the server has not closed the
//! spare meanwhile (then one is opened as before). It serves only peers of its own uid (SO_PEERCRED) and refuses others with a log line
//! and a message to them. Nothing here parses ssh_config: [`crate::ssh::config`] reads the keys.
//!
//! Socket protocol (ours, not OpenSSH's): frames of a 4-byte big-endian length, a type byte and
//! a payload. The client sends OPEN (the session), CHECK or EXIT first; then STDIN, STDIN_EOF,
//! SIGNAL and WINDOW. The master answers ACCEPTED at once (a client that gets no ACCEPTED, from
//! a master on its way out, connects directly instead), then STDOUT, STDERR and finally OUTCOME
//! or ERROR; ALIVE to CHECK, BYE to EXIT.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::Sig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::client::{self, Outcome, SessionEvent, SessionIo, SessionSpec, Target};
use crate::error::{Error, Result};
use crate::options::CpuOptions;
use crate::ssh::client::Connection;
use crate::ssh::config::HostConfig;
use crate::terminal::WindowSize;

/// Set (to the control path) in the environment of the background master `cpu` starts.
pub const SERVE_ENV: &str = "CPU_CONTROL_SERVE";
/// The master's ControlPersist, as [`persist_text`] writes it.
pub const PERSIST_ENV: &str = "CPU_CONTROL_PERSIST";
/// How long a new master waits for its first session (the `cpu` that started it).
const FIRST_SESSION_GRACE: Duration = Duration::from_secs(30);
/// Largest frame accepted (an environment can be large, but not this large).
const MAX_FRAME: usize = 8 << 20;
/// How long a peer may take to say what it wants.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

// Client to master.
const OPEN: u8 = 1;
const STDIN: u8 = 2;
const STDIN_EOF: u8 = 3;
const SIGNAL: u8 = 4;
const WINDOW: u8 = 5;
const CHECK: u8 = 6;
const EXIT: u8 = 7;
// Master to client.
const STDOUT: u8 = 16;
const STDERR: u8 = 17;
const OUTCOME: u8 = 18;
const ERROR: u8 = 19;
const ALIVE: u8 = 20;
const BYE: u8 = 21;
const ACCEPTED: u8 = 22;

/// ControlMaster: `ask` counts as `yes` and `autoask` as `auto` (there is no askpass here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterMode {
    No,
    Yes,
    Auto,
}

/// ControlPersist: how long an idle master stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Exit when the last session ends.
    No,
    /// Stay until `-controlcmd=exit` or the connection ends (`yes`, `0`).
    Forever,
    /// Stay this long without sessions.
    Idle(Duration),
}

/// What connection reuse to do for one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlSettings {
    pub master: MasterMode,
    /// The expanded ControlPath; None: no reuse (`none` or unset).
    pub path: Option<PathBuf>,
    pub persist: Persist,
}

impl Default for ControlSettings {
    fn default() -> Self {
        ControlSettings { master: MasterMode::No, path: None, persist: Persist::No }
    }
}

/// Parses a ControlMaster value.
pub fn parse_master(s: &str) -> std::result::Result<MasterMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "no" | "false" => Ok(MasterMode::No),
        "yes" | "true" | "ask" => Ok(MasterMode::Yes),
        "auto" | "autoask" => Ok(MasterMode::Auto),
        _ => Err(format!("ControlMaster {s:?}: want yes, no, auto, ask or autoask")),
    }
}

/// Parses a ControlPersist value: yes, no, or an OpenSSH time (`600`, `10m`, `1h30m`; units
/// s m h d w, any case); 0 means forever, as in OpenSSH.
pub fn parse_persist(s: &str) -> std::result::Result<Persist, String> {
    let bad = || format!("ControlPersist {s:?}: want yes, no, seconds, or a time such as 10m or 1h30m");
    match s.to_ascii_lowercase().as_str() {
        "yes" | "true" => return Ok(Persist::Forever),
        "no" | "false" => return Ok(Persist::No),
        _ => {}
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            number = Some(
                number
                    .unwrap_or(0)
                    .checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or_else(bad)?,
            );
            continue;
        }
        let unit = match c.to_ascii_lowercase() {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 604800,
            _ => return Err(bad()),
        };
        let n = number.take().ok_or_else(bad)?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
    }
    if let Some(n) = number {
        total = total.checked_add(n).ok_or_else(bad)?;
    } else if s.is_empty() {
        return Err(bad());
    }
    Ok(if total == 0 { Persist::Forever } else { Persist::Idle(Duration::from_secs(total)) })
}

/// How a persist setting travels to the background master in [`PERSIST_ENV`].
pub fn persist_text(p: Persist) -> String {
    match p {
        Persist::No => "no".into(),
        Persist::Forever => "yes".into(),
        Persist::Idle(d) => d.as_secs().to_string(),
    }
}

/// What ControlPath's `%` tokens stand for.
#[derive(Debug, Clone)]
pub struct PathTokens<'a> {
    /// `%d`
    pub home: &'a Path,
    /// `%u`
    pub local_user: &'a str,
    /// `%i`
    pub uid: u32,
    /// `%l` (`%L` is its first component)
    pub local_host: &'a str,
    /// `%h`: the host dialed (after HostName)
    pub host: &'a str,
    /// `%p`
    pub port: &'a str,
    /// `%r`
    pub remote_user: &'a str,
    /// `%n`: the host as given on the command line
    pub alias: &'a str,
}

/// `%C`: the SHA-1 of `%l%h%p%r` in hex, as OpenSSH computes it (so a ControlPath written for
/// ssh names the same socket for the same connection).
pub fn connection_hash(t: &PathTokens<'_>) -> String {
    let text = format!("{}{}{}{}", t.local_host, t.host, t.port, t.remote_user);
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Expands `~` and the tokens `%C %d %h %i %L %l %n %p %r %u %%` of a ControlPath; an unknown
/// token is an error, as in ssh.
pub fn expand_path(template: &str, t: &PathTokens<'_>) -> std::result::Result<String, String> {
    let text = crate::ssh::config::expand_tilde(template, t.home);
    crate::ssh::config::expand_percent(&text, |c| match c {
        'C' => Some(connection_hash(t)),
        'd' => Some(t.home.to_string_lossy().into_owned()),
        'h' => Some(t.host.to_string()),
        'i' => Some(t.uid.to_string()),
        'L' => Some(t.local_host.split('.').next().unwrap_or("").to_string()),
        'l' => Some(t.local_host.to_string()),
        'n' => Some(t.alias.to_string()),
        'p' => Some(t.port.to_string()),
        'r' => Some(t.remote_user.to_string()),
        'u' => Some(t.local_user.to_string()),
        _ => None,
    })
    .map_err(|bad| match bad {
        Some(other) => format!("ControlPath {template:?}: unknown token %{other}"),
        None => format!("ControlPath {template:?}: a lone % at the end"),
    })
}

/// The local host name (uname's nodename), for `%l`, `%L` and `%C`.
pub fn local_host_name() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

/// The settings for one target: each flag, else its ssh_config keyword, else off.
pub fn settings(opts: &CpuOptions, cfg: &HostConfig, t: &PathTokens<'_>) -> Result<ControlSettings> {
    let pick = |flag: &str, key: &Option<String>| -> Option<(String, bool)> {
        if !flag.is_empty() {
            Some((flag.to_string(), true))
        } else {
            key.clone().map(|k| (k, false))
        }
    };
    let fail = |from_flag: bool, msg: String| if from_flag { Error::Usage(msg) } else { Error::Config(msg) };
    let master = match pick(&opts.control_master, &cfg.control_master) {
        Some((v, flag)) => parse_master(&v).map_err(|m| fail(flag, m))?,
        None => MasterMode::No,
    };
    let persist = match pick(&opts.control_persist, &cfg.control_persist) {
        Some((v, flag)) => parse_persist(&v).map_err(|m| fail(flag, m))?,
        None => Persist::No,
    };
    let path = match pick(&opts.control_path, &cfg.control_path) {
        Some((v, _)) if v.eq_ignore_ascii_case("none") => None,
        Some((v, flag)) => Some(PathBuf::from(expand_path(&v, t).map_err(|m| fail(flag, m))?)),
        None => None,
    };
    Ok(ControlSettings { master, path, persist })
}

/// Where a session goes.
pub enum Route {
    /// Dial and authenticate as usual.
    Direct,
    /// Through the master on this socket.
    Mux(UnixStream),
    /// Starting a master failed and it said why; cpu exits with this status.
    Exit(i32),
}

/// Decides, for the settings of `target`, between a live master, becoming one, and a direct
/// connection (and says why on -d).
pub async fn route(opts: &CpuOptions, target: &Target) -> Result<Route> {
    let s = &target.control;
    let Some(path) = &s.path else { return Ok(Route::Direct) };
    if s.master != MasterMode::Yes {
        match UnixStream::connect(path).await {
            Ok(stream) => {
                log::debug!("using the control master at {}", path.display());
                return Ok(Route::Mux(stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if s.master == MasterMode::Auto {
                    log::debug!("stale control socket {} (its master is gone): removed it", path.display());
                    let _ = std::fs::remove_file(path);
                } else {
                    log::debug!(
                        "stale control socket {} (its master is gone); connecting directly",
                        path.display()
                    );
                    return Ok(Route::Direct);
                }
            }
            Err(e) => {
                if s.master == MasterMode::No {
                    log::debug!("no control master at {} ({e}); connecting directly", path.display());
                    return Ok(Route::Direct);
                }
                log::debug!("no control master at {} ({e}); starting one", path.display());
            }
        }
    }
    if s.master == MasterMode::No {
        return Ok(Route::Direct);
    }
    start_master(opts, path, s.persist).await
}

/// Starts the background master for `path` and connects to it.
async fn start_master(opts: &CpuOptions, path: &Path, persist: Persist) -> Result<Route> {
    use std::os::unix::process::CommandExt;
    let mut args: Vec<OsString> = vec!["-d=".to_string() + if opts.debug { "true" } else { "false" }]
        .into_iter()
        .map(OsString::from)
        .collect();
    for (flag, value) in
        [("-hk", &opts.host_key), ("-key", &opts.key), ("-net", &opts.net), ("-sp", &opts.port)]
    {
        if !value.is_empty() {
            args.push(flag.into());
            args.push(value.into());
        }
    }
    if !opts.use_key {
        args.push("-useKey=false".into());
    }
    args.push("--".into());
    args.push(opts.host.clone().unwrap_or_default().into());
    let mut child = std::process::Command::new("/proc/self/exe")
        .arg0("cpu")
        .args(&args)
        .env(SERVE_ENV, path)
        .env(PERSIST_ENV, persist_text(persist))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("starting the control master", e))?;
    let mut said = String::new();
    if let Some(mut out) = child.stdout.take() {
        // Bounded by the master's own connect timeout; it closes the pipe when ready or gone.
        let read = tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        said = read.await.unwrap_or_default();
    }
    let said = said.trim().to_string();
    if said == "ready" {
        // Reaped by this thread, so it never lingers as a zombie while this cpu runs.
        std::thread::spawn(move || child.wait());
        log::debug!("started a control master at {}", path.display());
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| Error::Connect(format!("the new control master at {}: {e}", path.display())))?;
        return Ok(Route::Mux(stream));
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(|e| Error::Ssh(format!("waiting for the control master: {e}")))?
        .map_err(|e| Error::io("waiting for the control master", e))?;
    if let Some(why) = said.strip_prefix("direct ") {
        log::debug!("{why}; connecting directly");
        return Ok(Route::Direct);
    }
    // It printed its error (connect, host key, authentication) on our stderr.
    Ok(Route::Exit(status.code().unwrap_or(crate::error::EXIT_CONNECTION)))
}

/// `-controlcmd=check|exit`: asks the master at the settings' path.
pub async fn command(settings: &ControlSettings, cmd: &str) -> Result<i32> {
    let Some(path) = &settings.path else {
        return Err(Error::Usage(
            "-controlcmd needs a control socket: give -controlpath or ssh_config ControlPath".into(),
        ));
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|e| Error::Connect(format!("no control master at {}: {e}", path.display())))?;
    // A master that refuses us writes why and closes without reading, so a failed write
    // still leaves its answer to read.
    let sent = write_frame(&mut stream, if cmd == "exit" { EXIT } else { CHECK }, &[]).await;
    let reply = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| Error::Connect(format!("the control master at {} did not answer", path.display())));
    let reply = match (reply, sent) {
        (Ok(Ok(reply @ Some(_))), _) => reply,
        (Ok(Ok(None)), Ok(())) => None,
        (Ok(Ok(None)) | Ok(Err(_)) | Err(_), Err(e)) => {
            return Err(Error::Connect(format!("control master at {}: {e}", path.display())))
        }
        (Ok(Err(e)) | Err(e), Ok(())) => return Err(e),
    };
    match reply {
        Some((ALIVE, p)) => {
            eprintln!("Master running (pid={})", Decoder::new(&p).u32()?);
            Ok(0)
        }
        Some((BYE, _)) => {
            eprintln!("Exit request sent.");
            Ok(0)
        }
        Some((ERROR, p)) => Err(Error::Connect(String::from_utf8_lossy(&p).into_owned())),
        _ => Err(Error::Connect(format!("the control master at {} closed the connection", path.display()))),
    }
}

/// Offers the session to the master on `stream`; None (and why, on -d) if the master did not
/// take it, so the caller connects directly. `stdin_at_eof` ([`stdin_at_eof`]): STDIN_EOF
/// goes in the same write as OPEN, so the master sends the EOF with the exec, and
/// [`run_mux`] is told so.
pub async fn open(mut stream: UnixStream, spec: &SessionSpec, stdin_at_eof: bool) -> Option<UnixStream> {
    let mut hello = frame(OPEN, &encode_spec(spec));
    if stdin_at_eof {
        hello.extend_from_slice(&frame(STDIN_EOF, &[]));
    }
    let reply = async {
        // As in `command`: a refusal is read even when the write failed. A master that
        // refuses reads no further frame: the STDIN_EOF is dropped with the connection.
        let sent = stream.write_all(&hello).await.map_err(|e| Error::io("control socket", e));
        match read_frame(&mut stream).await {
            Ok(None) => sent.map(|()| None),
            other => other,
        }
    };
    match tokio::time::timeout(HELLO_TIMEOUT, reply).await {
        Ok(Ok(Some((ACCEPTED, _)))) => Some(stream),
        Ok(Ok(Some((ERROR, p)))) => {
            log::warn!("the control master refused the session: {}", String::from_utf8_lossy(&p));
            None
        }
        Ok(Ok(other)) => {
            log::debug!(
                "the control master did not take the session ({:?}); connecting directly",
                other.map(|f| f.0)
            );
            None
        }
        Ok(Err(e)) => {
            log::debug!("the control master did not take the session ({e}); connecting directly");
            None
        }
        Err(_) => {
            log::warn!("the control master did not answer within {HELLO_TIMEOUT:?}; connecting directly");
            None
        }
    }
}

/// Runs a session the master accepted ([`open`]), with this process's stdio and signals.
/// `eof_sent`: [`open`] sent STDIN_EOF with OPEN.
pub async fn run_mux(stream: UnixStream, spec: &SessionSpec, host: &str, eof_sent: bool) -> Result<i32> {
    let (io, ends) = client::session_io();
    let tty = spec.tty.as_ref().map(|(_, ws)| *ws);
    client::local_session(tty, host, ends, Box::pin(relay(stream, io, eof_sent))).await
}

/// Whether the session's stdin is at its end before it starts (/dev/null, no terminal).
pub fn stdin_at_eof(spec: &SessionSpec) -> bool {
    spec.tty.is_none() && client::stdin_is_null()
}

/// The mux client's side of one accepted session: stdin and events to the master, and its
/// output and outcome back. `eof_sent`: [`open`] sent STDIN_EOF already.
async fn relay(stream: UnixStream, io: SessionIo, eof_sent: bool) -> Result<Outcome> {
    let SessionIo { mut stdin, output, mut events } = io;
    let (mut rd, mut wr) = stream.into_split();
    // Its own task: a master slow to take stdin must never stop us reading its output.
    let _writer = client::AbortOnDrop(crate::task::spawn(async move {
        let mut stdin_open = !eof_sent;
        loop {
            let sent = tokio::select! {
                chunk = stdin.recv(), if stdin_open => match chunk {
                    Some(bytes) => write_frame(&mut wr, STDIN, &bytes).await,
                    None => {
                        stdin_open = false;
                        write_frame(&mut wr, STDIN_EOF, &[]).await
                    }
                },
                ev = events.recv() => match ev {
                    Some(SessionEvent::Signal(sig)) => write_frame(&mut wr, SIGNAL, &[signal_code(&sig)]).await,
                    Some(SessionEvent::WindowChange(ws)) => {
                        let mut e = Encoder::default();
                        for v in [ws.cols, ws.rows, ws.width_px, ws.height_px] {
                            e.u32(v);
                        }
                        write_frame(&mut wr, WINDOW, &e.0).await
                    }
                    Some(SessionEvent::Hangup) | None => return,
                },
            };
            if sent.is_err() {
                return;
            }
        }
    }));
    loop {
        match read_frame(&mut rd).await? {
            Some((STDOUT, bytes)) => {
                let _ = output.send(false, bytes).await;
            }
            Some((STDERR, bytes)) => {
                let _ = output.send(true, bytes).await;
            }
            Some((OUTCOME, p)) => return decode_outcome(&p),
            Some((ERROR, p)) => return Err(Error::Ssh(String::from_utf8_lossy(&p).into_owned())),
            Some(_) => {}
            None => return Err(Error::Ssh("the control master went away before the session ended".into())),
        }
    }
}

/// Whether this process is a background master started by [`route`]: its socket path and
/// persist setting.
pub fn master_request() -> Option<(PathBuf, Persist)> {
    let path = std::env::var_os(SERVE_ENV)?;
    let persist = std::env::var(PERSIST_ENV).ok().and_then(|p| parse_persist(&p).ok()).unwrap_or(Persist::No);
    // Not for the sessions it runs, which send the mux client's environment anyway.
    std::env::remove_var(SERVE_ENV);
    std::env::remove_var(PERSIST_ENV);
    Some((PathBuf::from(path), persist))
}

/// The background master: connect and authenticate, bind the socket, say "ready" on stdout,
/// leave the terminal, serve until idle for the persist time, told to exit, or disconnected.
pub async fn run_master(opts: CpuOptions, path: PathBuf, persist: Persist) -> Result<i32> {
    let net = crate::transport::Net::parse(&opts.net, true)?;
    let local = client::LocalEnv::from_process();
    let target = client::resolve(&opts, net, &local, &client::config_files(&local))?;
    let check = client::host_key_check(&opts, &target)?;
    let conn = Arc::new(client::connect(net, &opts, &target, check).await?);
    let (listener, identity) = match bind(&path) {
        Ok(l) => l,
        Err(why) => {
            println!("direct {why}");
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                conn.handle.disconnect(russh::Disconnect::ByApplication, "", "en"),
            )
            .await;
            return Ok(0);
        }
    };
    println!("ready");
    detach(opts.debug);
    log::debug!("control master for {} listening on {}", target.host, path.display());
    serve(conn.clone(), listener, &path, persist).await;
    if same_file(&path, identity) {
        let _ = std::fs::remove_file(&path);
    }
    let bye = conn.handle.disconnect(russh::Disconnect::ByApplication, "", "en");
    let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
    log::debug!("control master for {} exits", target.host);
    Ok(0)
}

/// Binds the control socket with mode 0600 at a temporary name and links it into place, which
/// fails if another master got there first (as OpenSSH does). Returns the listener and the
/// socket file's identity, so that only our own socket is removed at exit.
fn bind(path: &Path) -> std::result::Result<(tokio::net::UnixListener, (u64, u64)), String> {
    use std::os::unix::fs::MetadataExt;
    let suffix = crate::protocol::new_nonce().map_err(|e| e.to_string())?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", &suffix[..16]));
    let tmp = PathBuf::from(tmp);
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = std::os::unix::net::UnixListener::bind(&tmp);
    rustix::process::umask(old);
    let listener = bound.map_err(|e| format!("cannot listen on control socket {}: {e}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(format!("control socket {} already exists, not starting a master", path.display()))
        }
        Err(e) => return Err(format!("cannot create control socket {}: {e}", path.display())),
    }
    let meta = std::fs::metadata(path).map_err(|e| format!("control socket {}: {e}", path.display()))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
    Ok((listener, (meta.dev(), meta.ino())))
}

fn same_file(path: &Path, identity: (u64, u64)) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| (m.dev(), m.ino()) == identity).unwrap_or(false)
}

/// Leaves the user's terminal: a new session (no SIGINT or SIGHUP from it), the root directory,
/// and stdin/stdout on /dev/null, stderr too unless -d, so no shell or pipe waits for the
/// master.
fn detach(debug: bool) {
    let _ = rustix::process::setsid();
    // Keep no directory busy (every path a session uses is absolute by now).
    let _ = std::env::set_current_dir("/");
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = rustix::stdio::dup2_stdin(&null);
        let _ = rustix::stdio::dup2_stdout(&null);
        if !debug {
            let _ = rustix::stdio::dup2_stderr(&null);
        }
    }
}

/// What a connection handler tells the master's loop.
enum MasterEvent {
    Started,
    Ended,
    /// `-controlcmd=exit`: answer BYE on this socket once the control socket is gone.
    Exit(tokio::net::unix::OwnedWriteHalf),
}

async fn serve(conn: Arc<Connection>, listener: tokio::net::UnixListener, path: &Path, persist: Persist) {
    let my_uid = rustix::process::getuid().as_raw();
    let spare = Arc::new(SpareChannel::default());
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<MasterEvent>();
    let mut active = 0usize;
    let grace = |d: Duration| Some(tokio::time::Instant::now() + d);
    let mut deadline = match persist {
        Persist::Forever => None,
        Persist::No => grace(FIRST_SESSION_GRACE),
        Persist::Idle(d) => grace(d.max(FIRST_SESSION_GRACE)),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Killed politely, the master still removes its socket.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).ok();
    let mut sighup = signal(SignalKind::hangup()).ok();
    let mut sigint = signal(SignalKind::interrupt()).ok();
    async fn received(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    }
    loop {
        let idle = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == my_uid => {
                        crate::task::spawn(serve_client(conn.clone(), stream, ev_tx.clone(), spare.clone()));
                    }
                    Ok(cred) => {
                        let msg = format!(
                            "control master at {}: refused a client with uid {} (pid {}): only uid {my_uid} may use it",
                            path.display(),
                            cred.uid(),
                            cred.pid().map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                        );
                        log::warn!("{msg}");
                        let mut stream = stream;
                        crate::task::spawn(async move {
                            let _ = tokio::time::timeout(HELLO_TIMEOUT, write_frame(&mut stream, ERROR, msg.as_bytes())).await;
                        });
                    }
                    Err(e) => log::warn!("control socket {}: cannot tell who connected ({e}); refused", path.display()),
                },
                Err(e) => {
                    log::warn!("control socket {}: accept: {e}", path.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            ev = ev_rx.recv() => match ev {
                Some(MasterEvent::Started) => {
                    active += 1;
                    deadline = None;
                }
                Some(MasterEvent::Ended) => {
                    active = active.saturating_sub(1);
                    if active == 0 {
                        deadline = match persist {
                            Persist::Forever => None,
                            Persist::No => grace(Duration::ZERO),
                            Persist::Idle(d) => grace(d),
                        };
                        log::debug!("control master: no sessions left ({persist:?})");
                    }
                }
                Some(MasterEvent::Exit(mut wr)) => {
                    log::debug!("control master: exit requested");
                    let _ = std::fs::remove_file(path);
                    let _ = write_frame(&mut wr, BYE, &[]).await;
                    return;
                }
                None => {}
            },
            _ = idle => {
                // A session that arrived just now keeps the master.
                match ev_rx.try_recv() {
                    Ok(MasterEvent::Started) => {
                        active += 1;
                        deadline = None;
                        continue;
                    }
                    Ok(MasterEvent::Exit(mut wr)) => {
                        let _ = std::fs::remove_file(path);
                        let _ = write_frame(&mut wr, BYE, &[]).await;
                        return;
                    }
                    Ok(MasterEvent::Ended) | Err(_) => {}
                }
                log::debug!("control master: idle for its persist time ({persist:?}), exiting");
                return;
            }
            _ = received(&mut sigterm) => return log::debug!("control master: SIGTERM, exiting"),
            _ = received(&mut sighup) => return log::debug!("control master: SIGHUP, exiting"),
            _ = received(&mut sigint) => return log::debug!("control master: SIGINT, exiting"),
            _ = tick.tick() => if conn.handle.is_closed() {
                log::warn!("control master: the connection to the server is closed, exiting");
                return;
            }
        }
    }
}

/// One peer of the master: a check, an exit request, or a session.
async fn serve_client(
    conn: Arc<Connection>,
    stream: UnixStream,
    events: mpsc::UnboundedSender<MasterEvent>,
    spare: Arc<SpareChannel>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut rd)).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return log::debug!("control client: {e}"),
        Err(_) => return log::debug!("control client said nothing within {HELLO_TIMEOUT:?}"),
    };
    match hello {
        (CHECK, _) => {
            let mut e = Encoder::default();
            e.u32(std::process::id());
            let _ = write_frame(&mut wr, ALIVE, &e.0).await;
        }
        (EXIT, _) => {
            let _ = events.send(MasterEvent::Exit(wr));
        }
        (OPEN, _) if conn.handle.is_closed() => {
            // The client connects directly instead; this master leaves at its next tick.
            let _ = write_frame(&mut wr, ERROR, b"the master's connection to the server is closed").await;
        }
        (OPEN, payload) => match decode_spec(&payload) {
            Ok(spec) => {
                let _ = events.send(MasterEvent::Started);
                if write_frame(&mut wr, ACCEPTED, &[]).await.is_ok() {
                    serve_session(conn, spec, rd, wr, &spare).await;
                }
                let _ = events.send(MasterEvent::Ended);
            }
            Err(e) => {
                let _ = write_frame(&mut wr, ERROR, e.to_string().as_bytes()).await;
            }
        },
        (other, _) => log::debug!("control client: unexpected first frame type {other}"),
    }
}

/// Runs one mux client's session on the master's connection.
async fn serve_session(
    conn: Arc<Connection>,
    spec: SessionSpec,
    mut rd: tokio::net::unix::OwnedReadHalf,
    mut wr: tokio::net::unix::OwnedWriteHalf,
    spare: &SpareChannel,
) {
    let opened = spare.take().await;
    let pwd = spec.environ.iter().find(|(k, _)| k == "PWD").map(|(_, v)| v.to_string_lossy().into_owned());
    log::debug!(
        "control master: session {:?} in {pwd:?}, 9p {} root {:?}, fstab {:?}",
        spec.command,
        spec.ninep,
        spec.root,
        spec.fstab
    );
    let (io, ends) = client::session_io();
    let client::SessionEnds { stdin, output: mut out_rx, events } = ends;
    let _reader = client::AbortOnDrop(crate::task::spawn(async move {
        let mut stdin = Some(stdin);
        loop {
            match read_frame(&mut rd).await {
                Ok(Some((STDIN, bytes))) => {
                    if let Some(tx) = &stdin {
                        if tx.send(bytes).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Ok(Some((STDIN_EOF, _))) => stdin = None,
                Ok(Some((SIGNAL, p))) => {
                    if let Some(sig) = p.first().and_then(|c| signal_from_code(*c)) {
                        let _ = events.send(SessionEvent::Signal(sig));
                    }
                }
                Ok(Some((WINDOW, p))) => {
                    let mut d = Decoder::new(&p);
                    if let (Ok(cols), Ok(rows), Ok(w), Ok(h)) = (d.u32(), d.u32(), d.u32(), d.u32()) {
                        let _ = events.send(SessionEvent::WindowChange(WindowSize {
                            cols,
                            rows,
                            width_px: w,
                            height_px: h,
                        }));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    let _ = events.send(SessionEvent::Hangup);
                    return;
                }
            }
        }
    }));
    let run_conn = conn.clone();
    let run = tokio::spawn(async move { client::run_channel(&run_conn, &spec, io, opened).await });
    let mut client_gone = false;
    while let Some((to_stderr, bytes)) = out_rx.recv().await {
        // A client that went away: keep draining so the session can end.
        if !client_gone
            && write_frame(&mut wr, if to_stderr { STDERR } else { STDOUT }, &bytes).await.is_err()
        {
            client_gone = true;
        }
    }
    let result = match run.await {
        Ok(r) => r,
        Err(e) => Err(Error::Ssh(format!("the session task failed: {e}"))),
    };
    match result {
        Ok(outcome) => {
            if let Some((addr, port)) = &outcome.forward {
                conn.cancel_forward(addr, *port).await;
            }
            let _ = write_frame(&mut wr, OUTCOME, &encode_outcome(&outcome)).await;
        }
        Err(e) => {
            let _ = write_frame(&mut wr, ERROR, e.to_string().as_bytes()).await;
        }
    }
    spare.refill(&conn);
}

/// The session channel a master opens ahead of its next session (see the module text).
#[derive(Default)]
struct SpareChannel {
    opening: std::sync::Mutex<Option<tokio::task::JoinHandle<Option<russh::Channel<russh::client::Msg>>>>>,
}

impl SpareChannel {
    /// The spare, if there is one and the server has said nothing on it since (a channel it
    /// closed is dropped).
    async fn take(&self) -> Option<russh::Channel<russh::client::Msg>> {
        let opening = self.opening.lock().unwrap_or_else(|p| p.into_inner()).take();
        let mut channel = opening?.await.ok().flatten()?;
        // A spare holds no message unless the server closed (or used) it.
        match poll_once(channel.wait()) {
            None => {
                log::debug!("control master: the session runs on the spare channel");
                Some(channel)
            }
            Some(said) => {
                log::debug!("control master: the spare channel is not usable ({said:?}); opening one");
                None
            }
        }
    }

    /// Opens the next session's channel, unless one is open or on its way. Called when a
    /// session has ended and its client has its outcome: off every session's critical path.
    fn refill(&self, conn: &Arc<Connection>) {
        let mut slot = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() && !conn.handle.is_closed() {
            let conn = conn.clone();
            *slot = Some(tokio::spawn(async move { conn.handle.channel_open_session().await.ok() }));
        }
    }
}

/// Polls `future` once and drops it: its output if it was ready, else None. No timer and no
/// wake-up is armed (`tokio::time::timeout(Duration::ZERO, ..)` armed a timer and cost the
/// master a ~1 ms sleep in epoll before every mux session); tokio's cooperative budget is
/// lifted for the poll, so a ready future is never reported as pending for want of budget.
/// For cancel-safe futures only (russh's `Channel::wait` is a tokio mpsc `recv`).
fn poll_once<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(tokio::task::unconstrained(future));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::future::Future::poll(future.as_mut(), &mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

fn signal_code(sig: &Sig) -> u8 {
    match sig {
        Sig::INT => 1,
        Sig::TERM => 2,
        Sig::HUP => 3,
        _ => 0,
    }
}

fn signal_from_code(c: u8) -> Option<Sig> {
    match c {
        1 => Some(Sig::INT),
        2 => Some(Sig::TERM),
        3 => Some(Sig::HUP),
        _ => None,
    }
}

/// One frame's bytes.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
    frame.push(kind);
    frame.extend_from_slice(payload);
    frame
}

/// Writes one frame.
async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, payload: &[u8]) -> Result<()> {
    w.write_all(&frame(kind, payload)).await.map_err(|e| Error::io("control socket", e))
}

/// Reads one frame; None at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(Error::io("control socket", e)),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(Error::Ssh(format!("control socket: a frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| Error::io("control socket", e))?;
    let kind = buf.remove(0);
    Ok(Some((kind, buf)))
}

/// Length-prefixed fields, big-endian.
#[derive(Default)]
struct Encoder(Vec<u8>);

impl Encoder {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn flag(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }
}

struct Decoder<'a> {
    buf: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Decoder { buf }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Ssh("control socket: a truncated message".into()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?.to_vec())
            .map_err(|_| Error::Ssh("control socket: text that is not UTF-8".into()))
    }
    fn flag(&mut self) -> Result<bool> {
        Ok(self.take(1)?[0] != 0)
    }
}

fn encode_spec(s: &SessionSpec) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u32(s.environ.len() as u32);
    for (k, v) in &s.environ {
        e.bytes(k.as_bytes());
        e.bytes(v.as_bytes());
    }
    e.u32(s.command.len() as u32);
    for w in &s.command {
        e.bytes(w.as_bytes());
    }
    e.flag(s.tty.is_some());
    if let Some((term, ws)) = &s.tty {
        e.bytes(term.as_bytes());
        for v in [ws.cols, ws.rows, ws.width_px, ws.height_px] {
            e.u32(v);
        }
    }
    e.flag(s.ninep);
    e.bytes(s.root.as_bytes());
    e.flag(s.read_only);
    e.u32(s.msize);
    e.bytes(s.mount_opts.as_bytes());
    e.flag(s.debug_9p);
    e.flag(s.fstab.is_some());
    e.bytes(s.fstab.as_deref().unwrap_or("").as_bytes());
    e.0
}

fn decode_spec(p: &[u8]) -> Result<SessionSpec> {
    let mut d = Decoder::new(p);
    let n = d.u32()? as usize;
    let mut environ = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let k = OsString::from_vec(d.bytes()?.to_vec());
        let v = OsString::from_vec(d.bytes()?.to_vec());
        environ.push((k, v));
    }
    let n = d.u32()? as usize;
    let mut command = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        command.push(OsString::from_vec(d.bytes()?.to_vec()));
    }
    let tty = if d.flag()? {
        let term = d.string()?;
        let ws = WindowSize { cols: d.u32()?, rows: d.u32()?, width_px: d.u32()?, height_px: d.u32()? };
        Some((term, ws))
    } else {
        None
    };
    let ninep = d.flag()?;
    let root = d.string()?;
    let read_only = d.flag()?;
    let msize = d.u32()?;
    let mount_opts = d.string()?;
    let debug_9p = d.flag()?;
    let has_fstab = d.flag()?;
    let fstab = d.string()?;
    Ok(SessionSpec {
        environ,
        command,
        tty,
        ninep,
        root,
        read_only,
        msize,
        mount_opts,
        debug_9p,
        fstab: has_fstab.then_some(fstab),
    })
}

fn encode_outcome(o: &Outcome) -> Vec<u8> {
    let mut e = Encoder::default();
    e.flag(o.exit_status.is_some());
    e.u32(o.exit_status.unwrap_or(0));
    e.bytes(o.exit_signal.as_deref().unwrap_or("").as_bytes());
    e.0
}

fn decode_outcome(p: &[u8]) -> Result<Outcome> {
    let mut d = Decoder::new(p);
    let has_status = d.flag()?;
    let status = d.u32()?;
    let signal = d.string()?;
    Ok(Outcome {
        exit_status: has_status.then_some(status),
        exit_signal: (!signal.is_empty()).then_some(signal),
        forward: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> PathTokens<'static> {
        PathTokens {
            home: Path::new("/home/me"),
            local_user: "me",
            uid: 1000,
            local_host: "laptop.example.org",
            host: "10.0.0.7",
            port: "17010",
            remote_user: "pi",
            alias: "board",
        }
    }

    #[test]
    fn control_path_tokens() {
        let t = tokens();
        assert_eq!(expand_path("~/.ssh/cm-%r@%h:%p", &t).unwrap(), "/home/me/.ssh/cm-pi@10.0.0.7:17010");
        assert_eq!(
            expand_path("%d/%u.%i/%L/%l/%n/%%", &t).unwrap(),
            "/home/me/me.1000/laptop/laptop.example.org/board/%"
        );
        // %C is OpenSSH's: sha1("%l%h%p%r"); this value is what `ssh -G` prints for it.
        let c = expand_path("/tmp/%C", &t).unwrap();
        let want = ring::digest::digest(
            &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            b"laptop.example.org10.0.0.717010pi",
        );
        let want: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(c, format!("/tmp/{want}"));
        assert_eq!(c.len(), "/tmp/".len() + 40);
        assert!(expand_path("/tmp/%x", &t).unwrap_err().contains("unknown token %x"));
        assert!(expand_path("/tmp/%", &t).is_err());
    }

    #[test]
    fn persist_values() {
        assert_eq!(parse_persist("yes"), Ok(Persist::Forever));
        assert_eq!(parse_persist("0"), Ok(Persist::Forever));
        assert_eq!(parse_persist("no"), Ok(Persist::No));
        assert_eq!(parse_persist("30"), Ok(Persist::Idle(Duration::from_secs(30))));
        assert_eq!(parse_persist("10m"), Ok(Persist::Idle(Duration::from_secs(600))));
        assert_eq!(parse_persist("1h30m"), Ok(Persist::Idle(Duration::from_secs(5400))));
        assert_eq!(parse_persist("1H5S"), Ok(Persist::Idle(Duration::from_secs(3605))));
        assert_eq!(parse_persist("1w1d"), Ok(Persist::Idle(Duration::from_secs(691200))));
        for bad in ["", "m", "10x", "-5", "1.5h", "99999999999999999999"] {
            assert!(parse_persist(bad).is_err(), "{bad:?}");
        }
        for p in [Persist::No, Persist::Forever, Persist::Idle(Duration::from_secs(7))] {
            assert_eq!(parse_persist(&persist_text(p)), Ok(p));
        }
    }

    #[test]
    fn master_values() {
        assert_eq!(parse_master("ask"), Ok(MasterMode::Yes));
        assert_eq!(parse_master("AUTOASK"), Ok(MasterMode::Auto));
        assert_eq!(parse_master("no"), Ok(MasterMode::No));
        assert!(parse_master("maybe").is_err());
    }

    #[test]
    fn settings_flags_win_over_config_and_none_disables() {
        let t = tokens();
        let opts = |args: &[&str]| CpuOptions::from_cpu_args(args.iter().copied()).unwrap();
        let cfg = HostConfig {
            control_master: Some("auto".into()),
            control_path: Some("/run/cm-%n".into()),
            control_persist: Some("10m".into()),
            ..Default::default()
        };
        let s = settings(&opts(&["h"]), &cfg, &t).unwrap();
        assert_eq!(
            s,
            ControlSettings {
                master: MasterMode::Auto,
                path: Some("/run/cm-board".into()),
                persist: Persist::Idle(Duration::from_secs(600))
            }
        );
        let s = settings(
            &opts(&["-controlmaster=no", "-controlpath=none", "-controlpersist=yes", "h"]),
            &cfg,
            &t,
        )
        .unwrap();
        assert_eq!(s, ControlSettings { master: MasterMode::No, path: None, persist: Persist::Forever });
        assert_eq!(settings(&opts(&["h"]), &HostConfig::default(), &t).unwrap(), ControlSettings::default());
        assert!(matches!(settings(&opts(&["-controlpersist=soon", "h"]), &cfg, &t), Err(Error::Usage(_))));
        let bad_cfg = HostConfig { control_master: Some("maybe".into()), ..Default::default() };
        assert!(matches!(settings(&opts(&["h"]), &bad_cfg, &t), Err(Error::Config(_))));
    }

    #[test]
    fn spec_and_outcome_round_trip() {
        let spec = SessionSpec {
            environ: vec![
                (OsString::from("A"), OsString::from_vec(vec![0xff, b'x'])),
                ("PWD".into(), "/w".into()),
            ],
            command: vec!["sh".into(), "-c".into(), "exit 3".into()],
            tty: Some(("xterm".into(), WindowSize { cols: 80, rows: 24, width_px: 1, height_px: 2 })),
            ninep: true,
            root: "/r".into(),
            read_only: true,
            msize: 65536,
            mount_opts: "cache=mmap".into(),
            debug_9p: false,
            fstab: Some("\nF\n".into()),
        };
        assert_eq!(decode_spec(&encode_spec(&spec)).unwrap(), spec);
        let plain = SessionSpec { tty: None, fstab: None, ..spec.clone() };
        assert_eq!(decode_spec(&encode_spec(&plain)).unwrap(), plain);
        let enc = encode_spec(&spec);
        for cut in [0, 3, enc.len() / 2, enc.len() - 1] {
            assert!(decode_spec(&enc[..cut]).is_err(), "cut at {cut}");
        }
        for o in [
            Outcome { exit_status: Some(255), exit_signal: None, forward: None },
            Outcome { exit_status: None, exit_signal: Some("KILL".into()), forward: None },
            Outcome::default(),
        ] {
            assert_eq!(decode_outcome(&encode_outcome(&o)).unwrap(), o);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn poll_once_tells_a_waiting_message_from_none_and_loses_nothing() {
        let (tx, mut rx) = mpsc::channel::<u8>(4);
        // Empty: pending, and the message sent afterwards is still received.
        assert_eq!(poll_once(rx.recv()), None);
        tx.send(7).await.unwrap();
        assert_eq!(poll_once(rx.recv()), Some(Some(7)));
        assert_eq!(poll_once(rx.recv()), None);
        tx.send(8).await.unwrap();
        assert_eq!(rx.recv().await, Some(8));
        // Closed: ready with None (a spare the server closed is not used).
        drop(tx);
        assert_eq!(poll_once(rx.recv()), Some(None));
        // Past tokio's cooperative budget (128 ready polls in one task poll): a waiting
        // message is still seen, not taken for an empty channel.
        let (tx, mut rx) = mpsc::channel::<u8>(300);
        for i in 0..300 {
            tx.try_send((i % 256) as u8).unwrap();
        }
        for i in 0..300 {
            assert_eq!(poll_once(rx.recv()), Some(Some((i % 256) as u8)), "message {i}");
        }
    }

    /// With stdin at its end, STDIN_EOF is on the socket with OPEN, before the master answers.
    #[tokio::test(flavor = "current_thread")]
    async fn open_sends_stdin_eof_with_the_session_when_stdin_is_at_its_end() {
        let spec = SessionSpec {
            environ: vec![("PWD".into(), "/".into())],
            command: vec!["true".into()],
            tty: None,
            ninep: false,
            root: String::new(),
            read_only: false,
            msize: 8192,
            mount_opts: String::new(),
            debug_9p: false,
            fstab: None,
        };
        for at_eof in [true, false] {
            let (ours, mut master) = UnixStream::pair().unwrap();
            let opening = tokio::spawn({
                let spec = spec.clone();
                async move { open(ours, &spec, at_eof).await.is_some() }
            });
            let (kind, payload) = read_frame(&mut master).await.unwrap().unwrap();
            assert_eq!((kind, decode_spec(&payload).unwrap()), (OPEN, spec.clone()));
            // What else is on the socket before ACCEPTED (open wrote all it sends before it
            // waits for the answer, so this need not wait).
            let mut more = [0u8; 16];
            match (at_eof, master.try_read(&mut more)) {
                (true, Ok(n)) => assert_eq!(&more[..n], &frame(STDIN_EOF, &[])[..]),
                (false, Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                (_, other) => panic!("stdin at its end {at_eof}: after OPEN {other:?}"),
            }
            write_frame(&mut master, ACCEPTED, &[]).await.unwrap();
            assert!(opening.await.unwrap(), "accepted");
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_round_trip_and_caps() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, STDOUT, b"hello").await.unwrap();
        write_frame(&mut a, STDIN_EOF, &[]).await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), Some((STDOUT, b"hello".to_vec())));
        assert_eq!(read_frame(&mut b).await.unwrap(), Some((STDIN_EOF, vec![])));
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes()).await.unwrap();
        assert!(read_frame(&mut b).await.is_err());
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }
}

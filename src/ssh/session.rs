//! One `session` channel of cpud: gather its requests, run its command, pump its I/O, and
//! report how the command ended.
//!
//! Requests before `exec`/`shell` are recorded: `pty-req` (one), `env` (every variable, last
//! duplicate wins), `window-change`, and `signal` (buffered until the child exists; the Go
//! cpud crashes there). The exec string decides what runs ([`plan`]): the cpu form re-executes
//! the daemon as `cpud -remote WORDS...` (or, when the session builds nothing from the client,
//! runs the command itself in the same namespace: [`crate::remote::direct_session`]), anything
//! else (OpenSSH `ssh host cmd`) goes to the user's shell with `-c`, and `shell` starts a login
//! shell. The child gets its own session
//! (pty, with the terminal as controlling tty) or process group (pipes), and signals go to
//! that group.
//!
//! When the child exits, its output is drained, `exit-status` (or `exit-signal` for a
//! signal death) is sent, then EOF and close; stdin is not waited for (pitfall P33). When the
//! client goes away first, the terminal is hung up, the group gets SIGHUP and, after a grace
//! period, SIGKILL, and the child is reaped: nothing is left behind.
//!
//! Input flow control: russh re-opens the SSH window as data arrives, not as it is consumed,
//! and the only brake left is to stop reading the channel, which stops russh's whole
//! connection loop: the command's output and the 9P replies of the same connection wait too.
//! A command that is itself waiting for one of those (`cat` with its stdout full, `tar x`
//! writing into /tmp/cpu) would never read its input again: a deadlock. So the input queue is
//! counted in bytes ([`InputMeter`]): past [`STDIN_SOFT_LIMIT`] this task stops reading the
//! channel, but when the command consumes nothing for [`STDIN_STALL`] it reads on, another
//! [`STDIN_SOFT_LIMIT`] at a time up to [`STDIN_HARD_LIMIT`]. A slow reader (`dd` to a slow
//! disk) keeps the queue near the soft limit; a blocked one gets what it waits for.
//! Terminal modes in `pty-req` are applied to the new terminal (Go ignores them).
//!
//! The stdio pipes of a command are read and written on threads of their own, never on the
//! runtime thread (which only watches them with epoll until the first output): Linux holds a
//! pipe's mutex while `sendfile`/`splice` fills it from a file, and when that file is on the
//! 9P mount served through this process, a read of the pipe on the runtime thread would wait
//! for a reply only the runtime can deliver (see `pipe_io`).
//!
//! The server's request replies (success/failure) are given by the connection handler in
//! `ssh::server`, which applies the same rules as this task (first pty only, env only before
//! exec, one exec); this task sees every request in the same order through the channel.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use russh::server::Msg;
use russh::{Channel, ChannelMsg, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::ssh::pty::{self, PtyIo, PtyMaster, WindowSize};
use crate::task;

/// A piece of client input on its way to the child.
type Chunk = Vec<u8>;

/// PATH of a session that brought no environment (and the default for plain ssh).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Signals buffered before the child exists (Go queues 128 too).
const MAX_EARLY_SIGNALS: usize = 128;
/// Input that arrives before exec is kept up to this much.
const MAX_EARLY_INPUT: usize = 1 << 20;
/// Input bytes queued for the child's stdin before this task stops reading the channel (see
/// the module overview).
const STDIN_SOFT_LIMIT: usize = 4 << 20;
/// What the queue may grow to while the command consumes nothing.
const STDIN_HARD_LIMIT: usize = 64 << 20;
/// How long the command may consume nothing, with the channel not read, before it is read on.
const STDIN_STALL: Duration = Duration::from_millis(50);

/// Bytes of client input queued for the child's stdin, and written to it so far.
#[derive(Default)]
struct InputMeter {
    queued: AtomicUsize,
    written: std::sync::atomic::AtomicU64,
}

impl InputMeter {
    fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }
}

/// The feeder's end of the input queue: it reports every chunk it has written.
struct InputRx {
    rx: mpsc::UnboundedReceiver<Chunk>,
    meter: Arc<InputMeter>,
}

impl InputRx {
    async fn recv(&mut self) -> Option<Chunk> {
        self.rx.recv().await
    }

    fn blocking_recv(&mut self) -> Option<Chunk> {
        self.rx.blocking_recv()
    }

    /// `n` bytes of a received chunk are in the child's stdin (or dropped with it).
    fn done(&self, n: usize) {
        self.meter.queued.fetch_sub(n, Ordering::AcqRel);
        self.meter.written.fetch_add(n as u64, Ordering::AcqRel);
    }
}
/// After the child exits, output still arriving is forwarded until it pauses this long (a
/// background process may keep the pipe or terminal open forever).
const DRAIN_IDLE_PIPES: Duration = Duration::from_millis(500);
const DRAIN_IDLE_PTY: Duration = Duration::from_millis(100);

/// What a session needs from its connection.
pub struct SessionContext {
    /// The binary run as `cpud -remote` (normally /proc/self/exe).
    pub remote_program: PathBuf,
    /// How long a hung-up command gets between SIGHUP and SIGKILL.
    pub hangup_grace: Duration,
    /// Whether this key may have a pty (authorized_keys `no-pty`/`restrict`).
    pub allow_pty: bool,
    /// For `exit-signal`, which the channel half cannot send.
    pub handle: russh::server::Handle,
    /// The live-session count (decpud's tenants), entered while the command runs.
    pub tenants: Arc<Tenants>,
    /// Dropped when the session ends (the connection forgets the channel).
    pub on_end: OnEnd,
}

/// Runs a closure once, when dropped.
pub struct OnEnd(Option<Box<dyn FnOnce() + Send + Sync>>);

impl OnEnd {
    pub fn new(f: impl FnOnce() + Send + Sync + 'static) -> OnEnd {
        OnEnd(Some(Box::new(f)))
    }
}

impl Drop for OnEnd {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Counts sessions whose command is running and reports every change.
pub struct Tenants {
    live: AtomicUsize,
    notify: Option<Arc<dyn Fn(usize) + Send + Sync>>,
}

impl Tenants {
    pub fn new(notify: Option<Arc<dyn Fn(usize) + Send + Sync>>) -> Arc<Tenants> {
        Arc::new(Tenants { live: AtomicUsize::new(0), notify })
    }

    /// Sessions running a command now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Counts one session until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> TenantGuard {
        let n = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(f) = &self.notify {
            f(n);
        }
        TenantGuard(self.clone())
    }
}

/// One counted session; see [`Tenants::enter`].
pub struct TenantGuard(Arc<Tenants>);

impl Drop for TenantGuard {
    fn drop(&mut self) {
        let n = self.0.live.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        if let Some(f) = &self.0.notify {
            f(n);
        }
    }
}

/// A `pty-req` as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyRequest {
    pub term: String,
    pub size: WindowSize,
    /// Terminal modes (RFC 4254 section 8), applied to the new terminal.
    pub modes: Vec<(russh::Pty, u32)>,
}

/// What the client asked to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    Exec(Vec<u8>),
    Shell,
}

/// The process to start for a session, decided from the requests alone (unit-tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub program: PathBuf,
    pub arg0: OsString,
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
}

/// Env requests a session may make, not counting the cpu protocol's own variables
/// ([`PROTOCOL_ENV`]). OpenSSH's sshd allows 128, but every cpu client sends its whole
/// environment and the Go client of 2024 ends the session at the first refusal, so the cap
/// is set where no real environment reaches it; [`MAX_ENV_BYTES`] is what bounds memory.
pub const MAX_ENV_VARS: usize = 1024;
/// Total bytes of names and values a session's env requests may carry, likewise (Linux's
/// execve takes far more, but a real environment is a few KiB).
pub const MAX_ENV_BYTES: usize = 256 * 1024;
/// The cpu protocol's variables: always admitted (each is bounded by the packet size, and a
/// repeat replaces the value), so a large client environment cannot crowd out the nonce.
pub const PROTOCOL_ENV: &[&str] = &[
    crate::protocol::ENV_NONCE,
    crate::protocol::ENV_FSTAB,
    crate::protocol::ENV_FSTAB_LC,
    crate::protocol::ENV_MSIZE,
    crate::protocol::ENV_MOUNTOPTS,
];

/// What a session's env requests have used of [`MAX_ENV_VARS`] and [`MAX_ENV_BYTES`]. The
/// connection's reply and the session's record each keep one and decide alike.
#[derive(Debug, Default, Clone)]
pub struct EnvBudget {
    vars: usize,
    bytes: usize,
}

impl EnvBudget {
    /// Whether the request `name=value` is admitted (and then counts it). Unusable names and
    /// values (empty name, `=` or NUL) are refused too.
    pub fn admit(&mut self, name: &str, value: &str) -> bool {
        if !usable_env(name, value) {
            return false;
        }
        if PROTOCOL_ENV.contains(&name) {
            return true;
        }
        let bytes = self.bytes + name.len() + value.len();
        if self.vars >= MAX_ENV_VARS || bytes > MAX_ENV_BYTES {
            return false;
        }
        self.vars += 1;
        self.bytes = bytes;
        true
    }
}

/// Whether the kernel's environ can carry `name=value`.
fn usable_env(name: &str, value: &str) -> bool {
    !(name.is_empty() || name.contains(['=', '\0']) || value.contains('\0'))
}

/// Records an `env` request: every name accepted, the last value of a duplicate wins (in
/// the place of the first).
pub fn set_env(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    // A name the kernel's environ cannot carry is dropped rather than failing the command.
    if !usable_env(name, value) {
        log::debug!("ignoring unusable environment variable {name:?}");
        return;
    }
    match env.iter_mut().find(|(n, _)| n == name) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((name.to_string(), value.to_string())),
    }
}

fn home_dir() -> String {
    if rustix::process::getuid().is_root() {
        return "/root".into();
    }
    std::env::var("HOME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "/".into())
}

/// Decides the program, arguments, environment and directory of a session.
///
/// - cpu form (`-port9p...` or a leading space): `remote_program` with argv[0] `cpud` and
///   `-remote` followed by the exec string's words; the environment is exactly what the
///   client sent (plus TERM from the pty request), or PATH/HOME/SHELL if it sent nothing.
/// - other exec strings: `$SHELL -c STRING` (SHELL from the client's environment, else
///   /bin/sh), in $HOME; PATH, HOME and SHELL default when the client did not send them.
/// - shell (or an empty exec string): a login shell (argv[0] `-sh`), same environment.
pub fn plan(
    launch: &Launch,
    received_env: &[(String, String)],
    pty: Option<&PtyRequest>,
    remote_program: &Path,
) -> Plan {
    let defaults =
        [("PATH", DEFAULT_PATH.to_string()), ("HOME", home_dir()), ("SHELL", "/bin/sh".to_string())];
    let cpu_command = match launch {
        Launch::Exec(cmd) if crate::cmdline::is_cpu_form(cmd) => Some(cmd),
        _ => None,
    };
    let cpu_form = cpu_command.is_some();
    let mut env: Vec<(String, String)> = Vec::new();
    if !cpu_form || received_env.is_empty() {
        for (n, v) in &defaults {
            env.push((n.to_string(), v.clone()));
        }
    }
    for (n, v) in received_env {
        set_env(&mut env, n, v);
    }
    if let Some(p) = pty {
        set_env(&mut env, "TERM", &p.term);
    }
    let lookup = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    if let Some(cmd) = cpu_command {
        let mut args = vec![OsString::from("-remote")];
        args.extend(crate::cmdline::split_words(cmd));
        return Plan {
            program: remote_program.to_path_buf(),
            arg0: OsString::from("cpud"),
            args,
            env,
            cwd: PathBuf::from("/"),
        };
    }
    let shell = lookup("SHELL").filter(|s| !s.is_empty()).unwrap_or_else(|| "/bin/sh".into());
    let home = lookup("HOME").unwrap_or_default();
    let cwd =
        if !home.is_empty() && Path::new(&home).is_dir() { PathBuf::from(home) } else { PathBuf::from("/") };
    let (arg0, args) = match launch {
        Launch::Exec(cmd) if !cmd.is_empty() => {
            (OsString::from(&shell), vec![OsString::from("-c"), OsString::from_vec(cmd.clone())])
        }
        _ => {
            let base = Path::new(&shell).file_name().map(|b| b.as_bytes().to_vec()).unwrap_or_default();
            let mut login = b"-".to_vec();
            login.extend_from_slice(&base);
            (OsString::from_vec(login), Vec::new())
        }
    };
    Plan { program: PathBuf::from(shell), arg0, args, env, cwd }
}

/// The SSH name (without `SIG`) of a signal number, as exit-signal carries it.
pub fn signal_name(sig: i32) -> Option<&'static str> {
    use rustix::process::Signal as S;
    let table = [
        (S::ABORT, "ABRT"),
        (S::ALARM, "ALRM"),
        (S::FPE, "FPE"),
        (S::HUP, "HUP"),
        (S::ILL, "ILL"),
        (S::INT, "INT"),
        (S::KILL, "KILL"),
        (S::PIPE, "PIPE"),
        (S::QUIT, "QUIT"),
        (S::SEGV, "SEGV"),
        (S::TERM, "TERM"),
        (S::USR1, "USR1"),
        (S::USR2, "USR2"),
        (S::BUS, "BUS"),
        (S::TRAP, "TRAP"),
        (S::SYS, "SYS"),
        (S::XCPU, "XCPU"),
        (S::XFSZ, "XFSZ"),
        (S::VTALARM, "VTALRM"),
        (S::PROF, "PROF"),
        (S::CHILD, "CHLD"),
        (S::CONT, "CONT"),
        (S::STOP, "STOP"),
        (S::TSTP, "TSTP"),
        (S::TTIN, "TTIN"),
        (S::TTOU, "TTOU"),
        (S::URG, "URG"),
        (S::WINCH, "WINCH"),
        (S::IO, "IO"),
        (S::POWER, "PWR"),
        (S::STKFLT, "STKFLT"),
    ];
    table.iter().find(|(s, _)| s.as_raw() == sig).map(|(_, n)| *n)
}

/// The signal a `signal` request names (with or without `SIG`), if we know it.
pub fn signal_from_name(name: &str) -> Option<rustix::process::Signal> {
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    (1..=31).find_map(|n| {
        (signal_name(n) == Some(bare)).then(|| rustix::process::Signal::from_named_raw(n)).flatten()
    })
}

/// The name of a russh signal as the wire carries it, without `SIG` (RFC 4254).
pub fn signal_text(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(s) => s.trim_start_matches("SIG").to_string(),
    }
}

/// How a command ended, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Status(u32),
    Signal { name: String, core_dumped: bool },
}

pub fn ending(status: ExitStatus) -> Ending {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return Ending::Status(code as u32);
    }
    match status.signal() {
        Some(sig) => match signal_name(sig) {
            Some(name) => Ending::Signal { name: name.into(), core_dumped: status.core_dumped() },
            None => Ending::Status(128 + sig as u32),
        },
        None => Ending::Status(1),
    }
}

/// Requests gathered before exec.
#[derive(Default)]
struct Setup {
    env: Vec<(String, String)>,
    env_budget: EnvBudget,
    pty: Option<PtyRequest>,
    signals: Vec<String>,
    input: Vec<u8>,
    input_eof: bool,
}

/// Runs one session channel to its end. Never fails: problems are reported to the client
/// (stderr text and exit status 126/127) or logged.
pub async fn run(channel: Channel<Msg>, ctx: SessionContext) {
    let id = channel.id();
    let (mut rx, tx) = channel.split();
    let SessionContext { remote_program, hangup_grace, allow_pty, handle, tenants, on_end } = ctx;
    let _on_end = on_end;
    let mut setup = Setup::default();
    let launch = loop {
        match rx.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            }) => {
                if setup.pty.is_none() && allow_pty {
                    let size = WindowSize {
                        cols: col_width,
                        rows: row_height,
                        width_px: pix_width,
                        height_px: pix_height,
                    };
                    setup.pty = Some(PtyRequest { term, size, modes: terminal_modes });
                }
            }
            Some(ChannelMsg::SetEnv { variable_name, variable_value, .. }) => {
                // The connection refused what the budget does not admit (same rule there).
                if setup.env_budget.admit(&variable_name, &variable_value) {
                    set_env(&mut setup.env, &variable_name, &variable_value)
                }
            }
            Some(ChannelMsg::WindowChange { col_width, row_height, pix_width, pix_height }) => {
                if let Some(p) = setup.pty.as_mut() {
                    p.size = WindowSize {
                        cols: col_width,
                        rows: row_height,
                        width_px: pix_width,
                        height_px: pix_height,
                    };
                }
            }
            Some(ChannelMsg::Signal { signal }) => {
                if setup.signals.len() < MAX_EARLY_SIGNALS {
                    setup.signals.push(signal_text(&signal));
                }
            }
            Some(ChannelMsg::Data { data }) => {
                let room = MAX_EARLY_INPUT.saturating_sub(setup.input.len());
                setup.input.extend_from_slice(&data[..data.len().min(room)]);
            }
            Some(ChannelMsg::Eof) => setup.input_eof = true,
            Some(ChannelMsg::Exec { command, .. }) => break Launch::Exec(command),
            Some(ChannelMsg::RequestShell { .. }) => break Launch::Shell,
            Some(_) => {}
        }
    };
    let plan = plan(&launch, &setup.env, setup.pty.as_ref(), &remote_program);
    // A cpu-form session without 9P or fstab needs no `cpud -remote`: run its command here.
    let direct = match &launch {
        Launch::Exec(cmd) if crate::cmdline::is_cpu_form(cmd) => {
            crate::remote::direct_session(&plan.args, &plan.env)
        }
        _ => None,
    };
    let (plan, namespace) = match direct {
        Some(d) => match crate::remote::SessionTmp::new(&d.cwd) {
            Ok(tmp) => (direct_plan(d), Some(tmp)),
            Err(_) => (plan, None),
        },
        None => (plan, None),
    };
    log::debug!(
        "session {id}: running {:?} {:?} (pty: {}, {})",
        plan.program,
        plan.args,
        setup.pty.is_some(),
        if namespace.is_some() { "directly" } else { "as planned" }
    );
    let direct = namespace.is_some();
    let (child, io) = match spawn(&plan, setup.pty.as_ref(), namespace) {
        Ok(x) => x,
        Err(SpawnError::Exec(e)) if direct => {
            // What `cpud -remote` would have printed on its stderr and exited with.
            let path_var = plan.env.iter().find(|(n, _)| n == "PATH").map(|(_, v)| OsString::from(v));
            let (message, code) = crate::remote::exec_failure(&plan.arg0, &e, path_var.as_deref(), &plan.cwd);
            log::debug!("session {id}: {message}");
            let (mut out, end) = match setup.pty {
                Some(_) => (tx.make_writer_ext(None), "\r\n"),
                None => (tx.make_writer_ext(Some(1)), "\n"),
            };
            let _ = out.write_all(format!("{message}{end}").as_bytes()).await;
            drop(out);
            let _ = tx.exit_status(code as u32).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
            return;
        }
        Err(SpawnError::Exec(e) | SpawnError::Setup(e)) => {
            let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            let what = format!("cannot run {}: {e}", plan.program.display());
            log::warn!("session {id}: {what}");
            let mut err = tx.make_writer_ext(Some(1));
            let _ = err.write_all(format!("cpud: {what}\r\n").as_bytes()).await;
            drop(err);
            let _ = tx.exit_status(code).await;
            let _ = tx.eof().await;
            let _ = tx.close().await;
            return;
        }
    };
    let _tenant = tenants.enter();
    let mut child = child;
    // Held until the exit status is sent (see `ssh::spawn::Child::take_namespace`).
    let namespace_ref = match &mut child {
        ChildProcess::Vforked(c) => c.take_namespace(),
        ChildProcess::Forked(_) => None,
    };
    let mut running = Running::new(&child, io, &tx, setup.input, setup.input_eof);
    for s in &setup.signals {
        running.signal(s);
    }
    // The command runs: forward input, signals and resizes until it exits or the client goes.
    let mut input_limit = STDIN_SOFT_LIMIT;
    let mut written_before = running.meter.written();
    let status = loop {
        let queued = running.meter.queued();
        if queued < STDIN_SOFT_LIMIT {
            input_limit = STDIN_SOFT_LIMIT;
        }
        let paused = running.stdin.is_some() && queued > input_limit;
        let step = tokio::select! {
            st = child.wait() => Step::Exited(st),
            () = tokio::time::sleep(STDIN_STALL), if paused => Step::InputStalled,
            msg = rx.wait(), if !paused => Step::Message(msg),
        };
        match step {
            Step::Exited(st) => break st,
            Step::InputStalled => {
                let written = running.meter.written();
                if written == written_before {
                    // Nothing consumed: the command may wait for what only this connection
                    // brings (see the module overview). Read on.
                    input_limit = (input_limit + STDIN_SOFT_LIMIT).min(STDIN_HARD_LIMIT);
                    log::debug!("session {id}: input not consumed for {STDIN_STALL:?}; queueing up to {input_limit} bytes");
                }
                written_before = written;
            }
            Step::Message(Some(ChannelMsg::Data { data })) => {
                if running.stdin.is_some() {
                    running.input_arrived();
                }
                if let Some(q) = &running.stdin {
                    running.meter.queued.fetch_add(data.len(), Ordering::AcqRel);
                    if q.send(data.to_vec()).is_err() {
                        running.meter.queued.fetch_sub(data.len(), Ordering::AcqRel);
                        running.stdin = None;
                    }
                }
            }
            Step::Message(Some(ChannelMsg::Eof)) => running.end_input(),
            Step::Message(Some(ChannelMsg::Signal { signal })) => running.signal(&signal_text(&signal)),
            Step::Message(Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            })) => running.resize(WindowSize {
                cols: col_width,
                rows: row_height,
                width_px: pix_width,
                height_px: pix_height,
            }),
            Step::Message(None | Some(ChannelMsg::Close)) => {
                running.hang_up(&mut child, hangup_grace).await;
                log::info!("session {id}: client went away; command stopped");
                return;
            }
            Step::Message(Some(_)) => {}
        }
    };
    crate::init::forget_session_child(running.pid);
    // Stop forwarding input at once (P33), drain the output, then report.
    running.stdin = None;
    let _ = running.exited.send(true);
    let pumps = std::mem::take(&mut running.pumps);
    let drain = async {
        for p in pumps {
            let _ = p.await;
        }
    };
    tokio::pin!(drain);
    let mut client_gone = false;
    loop {
        tokio::select! {
            () = &mut drain => break,
            msg = rx.wait(), if !client_gone => {
                // Keep reading so russh's loop never blocks on this channel while we drain.
                if matches!(msg, None | Some(ChannelMsg::Close)) {
                    client_gone = true;
                }
            }
        }
    }
    running.abort_input();
    let end = match status {
        Ok(st) => ending(st),
        Err(e) => {
            log::warn!("session {id}: waiting for the command failed: {e}");
            Ending::Status(1)
        }
    };
    log::debug!("session {id}: command ended: {end:?}");
    if client_gone {
        return;
    }
    match end {
        Ending::Status(code) => {
            let _ = tx.exit_status(code).await;
        }
        Ending::Signal { name, core_dumped } => {
            let _ = handle
                .exit_signal_request(id, Sig::Custom(name), core_dumped, String::new(), String::new())
                .await;
        }
    }
    let _ = tx.eof().await;
    let _ = tx.close().await;
    if let Some(fd) = namespace_ref {
        // The teardown happens in this close: off the runtime, which serves the connection.
        tokio::task::spawn_blocking(move || drop(fd));
    }
}

/// One thing that happened while the command runs.
enum Step {
    Exited(std::io::Result<ExitStatus>),
    /// The input queue is over its limit and the channel is not being read.
    InputStalled,
    Message(Option<ChannelMsg>),
}

enum ChildIo {
    Pipes {
        stdin: std::io::Result<std::os::fd::OwnedFd>,
        stdout: std::io::Result<std::os::fd::OwnedFd>,
        stderr: std::io::Result<std::os::fd::OwnedFd>,
    },
    Pty(Arc<PtyMaster>),
}

/// The plan of a session run without `cpud -remote`: the command itself, in the client's
/// directory (entered by [`crate::remote::SessionTmp::enter`] in the child).
fn direct_plan(d: crate::remote::DirectSession) -> Plan {
    let mut words = d.command.into_iter();
    let arg0 = words.next().unwrap_or_default();
    Plan { program: PathBuf::from(&arg0), arg0, args: words.collect(), env: d.env, cwd: d.cwd }
}

/// Why a session's process did not start.
enum SpawnError {
    /// Before the fork (terminal, pipes).
    Setup(std::io::Error),
    /// The fork or the exec (a direct session's namespace steps report their own failures
    /// from the child, which then exits with status 125).
    Exec(std::io::Error),
}

impl From<std::io::Error> for SpawnError {
    fn from(e: std::io::Error) -> SpawnError {
        SpawnError::Setup(e)
    }
}

/// Starts the plan's process. With `namespace`, the child first builds the session's mount
/// namespace and enters the working directory itself (the directory may be one only the
/// namespace has, so the spawn does not chdir).
fn spawn(
    plan: &Plan,
    pty: Option<&PtyRequest>,
    namespace: Option<crate::remote::SessionTmp>,
) -> Result<(ChildProcess, ChildIo), SpawnError> {
    // The direct path with pipes (every `cpu -9p=false host cmd` without a terminal): no copy
    // of the daemon (see `ssh::spawn`).
    if let (Some(tmp), None) = (&namespace, pty) {
        let mut argv: Vec<&std::ffi::OsStr> = vec![plan.arg0.as_os_str()];
        argv.extend(plan.args.iter().map(|a| a.as_os_str()));
        let spawned = crate::ssh::spawn::spawn(plan.program.as_os_str(), &argv, &plan.env, tmp).map_err(
            |e| match e {
                crate::ssh::spawn::SpawnFailure::Setup(e) => SpawnError::Setup(e),
                crate::ssh::spawn::SpawnFailure::Exec(e) => SpawnError::Exec(e),
            },
        )?;
        let io = ChildIo::Pipes {
            stdin: Ok(spawned.stdin),
            stdout: Ok(spawned.stdout),
            stderr: Ok(spawned.stderr),
        };
        return Ok((ChildProcess::Vforked(spawned.child), io));
    }
    let mut cmd = tokio::process::Command::new(&plan.program);
    cmd.arg0(&plan.arg0).args(&plan.args).env_clear().kill_on_drop(false);
    for (n, v) in &plan.env {
        cmd.env(n, v);
    }
    // SAFETY: runs in the forked child before exec; sigaction and sigprocmask are
    // async-signal-safe and the closure touches no heap or lock.
    unsafe {
        cmd.pre_exec(|| {
            default_signals_for_exec();
            Ok(())
        });
    }
    match namespace {
        // SAFETY: the closure runs in the forked child before exec; `SessionTmp::enter` makes
        // only async-signal-safe system calls on strings prepared here, and takes no lock.
        Some(tmp) => unsafe {
            cmd.pre_exec(move || {
                tmp.enter();
                Ok(())
            });
        },
        None => {
            cmd.current_dir(&plan.cwd);
        }
    }
    match pty {
        Some(p) => {
            let pair = pty::open(p.size)
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot allocate a terminal: {e}")))?;
            if let Err(e) = pty::apply_modes(&pair.slave, &p.modes) {
                log::debug!("pty-req modes not applied: {e}");
            }
            cmd.stdin(Stdio::from(pair.slave.try_clone()?))
                .stdout(Stdio::from(pair.slave.try_clone()?))
                .stderr(Stdio::from(pair.slave));
            // SAFETY: the closure runs in the forked child before exec and only makes two
            // async-signal-safe system calls (setsid, ioctl); it touches no locks or heap.
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::setsid()?;
                    rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                    Ok(())
                });
            }
            let child = cmd.spawn().map_err(SpawnError::Exec)?;
            drop(cmd); // closes our copies of the slave
            Ok((ChildProcess::Forked(child), ChildIo::Pty(Arc::new(PtyMaster::new(pair.master)?))))
        }
        None => {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
            let mut child = cmd.spawn().map_err(SpawnError::Exec)?;
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                return Err(SpawnError::Setup(std::io::Error::other("child stdio missing")));
            };
            let io = ChildIo::Pipes {
                stdin: stdin.into_owned_fd(),
                stdout: stdout.into_owned_fd(),
                stderr: stderr.into_owned_fd(),
            };
            Ok((ChildProcess::Forked(child), io))
        }
    }
}

/// Gives the command the signal state a login gets, as sshd does: every signal at its
/// default action and none blocked. An ignored disposition survives exec, so a cpud started
/// with SIGINT ignored (a background job of a script, `nohup`-like wrappers) would otherwise
/// pass it on, and the client's Ctrl-C (a `signal` request) would not stop the command.
/// Handlers are reset by exec anyway, so every signal is simply set to its default here,
/// with the raw system call: libc's `sigaction` refuses the real-time signals it keeps for
/// itself (32-34), which a parent may still have left ignored. Called between fork and exec:
/// only async-signal-safe calls.
pub(crate) fn default_signals_for_exec() {
    // The kernel's struct sigaction, all zero: SIG_DFL, no flags, an empty mask (large
    // enough for every architecture's layout).
    let default_action = [0u64; 4];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads `default_action` (a valid, zeroed kernel sigaction) and
        // writes nothing back (null old action); 8 is the kernel's sigset size. A number the
        // kernel refuses changes nothing.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default_action.as_ptr(),
                std::ptr::null_mut::<u8>(),
                8usize,
            );
        }
    }
    // SAFETY: an empty set, initialised by sigemptyset before use.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

/// The command's process: started by `std` (fork) or by `ssh::spawn` (the direct path).
enum ChildProcess {
    Forked(tokio::process::Child),
    Vforked(crate::ssh::spawn::Child),
}

impl ChildProcess {
    fn id(&self) -> Option<u32> {
        match self {
            ChildProcess::Forked(c) => c.id(),
            ChildProcess::Vforked(c) => Some(c.id()),
        }
    }

    /// Waits for the exit and reaps (cancel-safe).
    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            ChildProcess::Forked(c) => c.wait().await,
            ChildProcess::Vforked(c) => c.wait().await,
        }
    }
}

/// What writes the client's input to the child.
enum InputTask {
    /// A pty: an async task on the runtime.
    Task(JoinHandle<()>),
    /// A stdin pipe: a thread (see `pipe_io`), told to stop through this flag.
    Thread(Arc<AtomicBool>),
    /// A stdin pipe nothing was written to yet: its thread starts with the first input (most
    /// sessions get none, only EOF, and then the empty pipe is closed from here: with nothing
    /// in it, the child cannot be holding its lock across a 9P round trip).
    Idle(std::os::fd::OwnedFd, InputRx),
}

impl InputTask {
    fn stop(self) {
        match self {
            InputTask::Task(t) => t.abort(),
            InputTask::Thread(stop) => stop.store(true, Ordering::SeqCst),
            InputTask::Idle(..) => {}
        }
    }
}

/// A started command and the tasks that move its bytes.
struct Running {
    pid: i32,
    pty: Option<Arc<PtyMaster>>,
    stdin: Option<mpsc::UnboundedSender<Chunk>>,
    meter: Arc<InputMeter>,
    input_task: Option<InputTask>,
    pumps: Vec<JoinHandle<()>>,
    exited: watch::Sender<bool>,
}

impl Running {
    fn new(
        child: &ChildProcess,
        io: ChildIo,
        tx: &russh::ChannelWriteHalf<Msg>,
        early_input: Vec<u8>,
        early_eof: bool,
    ) -> Running {
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        crate::init::note_session_child(pid);
        let (exited, exited_rx) = watch::channel(false);
        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel::<Chunk>();
        let meter = Arc::new(InputMeter::default());
        let stdin_rx = InputRx { rx: stdin_rx, meter: meter.clone() };
        let early = (!early_input.is_empty()).then_some(early_input);
        let (pty, input_task, pumps) = match io {
            ChildIo::Pipes { stdin, stdout, stderr } => {
                // The pipes are read and written on threads of their own (see `pipe_io`).
                let (stdout, stderr) = pipe_io::Output::start_pair(stdout, stderr);
                let out = task::spawn(pump(stdout, tx.make_writer(), exited_rx.clone(), DRAIN_IDLE_PIPES));
                let err = task::spawn(pump(stderr, tx.make_writer_ext(Some(1)), exited_rx, DRAIN_IDLE_PIPES));
                let input = match (stdin, early) {
                    // EOF before exec and no input: closing the pipe is all there is to do.
                    (Ok(_pipe), None) if early_eof => None,
                    (Ok(pipe), None) => Some(InputTask::Idle(pipe, stdin_rx)),
                    (pipe, early) => Some(InputTask::Thread(pipe_io::feed(pipe, early, stdin_rx))),
                };
                (None, input, vec![out, err])
            }
            ChildIo::Pty(master) => {
                let io = PtyIo(master.clone());
                let out = task::spawn(pump(io.clone(), tx.make_writer(), exited_rx, DRAIN_IDLE_PTY));
                (Some(master), Some(InputTask::Task(task::spawn(feed(io, early, stdin_rx)))), vec![out])
            }
        };
        Running { pid, pty, stdin: (!early_eof).then_some(stdin_tx), meter, input_task, pumps, exited }
    }

    /// Delivers a `signal` request: to the terminal's foreground group with a pty (where ^C
    /// would go), else to the command's process group.
    fn signal(&self, name: &str) {
        let Some(sig) = signal_from_name(name) else {
            log::info!("ignoring unknown signal {name:?}");
            return;
        };
        let group = self.pty.as_ref().and_then(|m| m.foreground_group()).unwrap_or(self.pid);
        if let Some(g) = rustix::process::Pid::from_raw(group) {
            if let Err(e) = rustix::process::kill_process_group(g, sig) {
                log::debug!("signal {name} to group {group}: {e}");
            }
        }
    }

    fn resize(&self, size: WindowSize) {
        if let Some(m) = &self.pty {
            if let Err(e) = m.set_size(size) {
                log::debug!("window-change: {e}");
            }
        }
    }

    /// Input is about to be queued: a stdin pipe's thread must be running.
    fn input_arrived(&mut self) {
        if let Some(InputTask::Idle(..)) = &self.input_task {
            if let Some(InputTask::Idle(pipe, queue)) = self.input_task.take() {
                self.input_task = Some(InputTask::Thread(pipe_io::feed(Ok(pipe), None, queue)));
            }
        }
    }

    /// The client's input ended: the queue closes (its thread closes the pipe after the last
    /// chunk), or an idle pipe is closed now.
    fn end_input(&mut self) {
        self.stdin = None;
        if let Some(InputTask::Idle(..)) = &self.input_task {
            self.input_task = None;
        }
    }

    fn abort_input(&mut self) {
        self.stdin = None;
        if let Some(t) = self.input_task.take() {
            t.stop();
        }
    }

    /// The client is gone: close the terminal and stdin, SIGHUP the group, SIGKILL it after
    /// `grace`, and reap the child.
    async fn hang_up(&mut self, child: &mut ChildProcess, grace: Duration) {
        self.abort_input();
        for p in self.pumps.drain(..) {
            p.abort();
            let _ = p.await;
        }
        self.pty = None; // last reference: the master closes and the kernel hangs up the tty
        let group = rustix::process::Pid::from_raw(self.pid);
        if let Some(g) = group {
            let _ = rustix::process::kill_process_group(g, rustix::process::Signal::HUP);
            let _ = rustix::process::kill_process_group(g, rustix::process::Signal::CONT);
        }
        let status = match tokio::time::timeout(grace, child.wait()).await {
            Ok(st) => st,
            Err(_) => {
                // Not reaped yet, so the group id cannot have been reused.
                if let Some(g) = group {
                    let _ = rustix::process::kill_process_group(g, rustix::process::Signal::KILL);
                }
                child.wait().await
            }
        };
        crate::init::forget_session_child(self.pid);
        log::debug!("hung-up command {} ended: {status:?}", self.pid);
    }
}

/// Copies the child's output to the channel. Once the child has exited, a read that waits
/// longer than `idle` ends the copy (a background process may hold the pipe or tty).
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    mut to: W,
    mut exited: watch::Receiver<bool>,
    idle: Duration,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = if *exited.borrow() {
            match tokio::time::timeout(idle, from.read(&mut buf)).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = from.read(&mut buf) => r,
                _ = exited.changed() => continue,
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Writes the client's input to the child: first what came before exec, then the queue.
/// Dropping the writer at the end closes a stdin pipe (the child sees EOF).
async fn feed<W: AsyncWrite + Unpin>(mut to: W, early: Option<Chunk>, mut queue: InputRx) {
    if let Some(d) = early {
        if to.write_all(&d).await.is_err() {
            return;
        }
    }
    while let Some(d) = queue.recv().await {
        let written = to.write_all(&d).await;
        queue.done(d.len());
        if written.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// The command's stdio pipes, moved on threads of their own instead of the runtime.
///
/// Why: a command may fill its stdout pipe with `sendfile`/`splice` from a file on the 9P
/// mount (busybox `cat` does). Linux holds the pipe's mutex while it reads the source file,
/// i.e. across the 9P round trip, and every `read(2)` of the pipe (O_NONBLOCK or not) first
/// sleeps uninterruptibly on that mutex. The 9P reply travels through this very process (the
/// forwarded-tcpip pump), so a read of the pipe on the runtime thread froze the whole daemon:
/// the reply was never delivered, and no connection was served any more. The same holds for
/// a command that splices from its stdin pipe into a 9P file while we write the pipe. On a
/// thread, such a read or write just waits until the runtime has delivered the reply.
mod pipe_io {
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, ReadBuf};
    use tokio::sync::mpsc;

    use super::{Chunk, InputRx};

    /// How long a thread waits for its pipes before checking whether they are still wanted.
    const POLL_MS: libc::c_int = 250;
    const CHUNK: usize = 16 * 1024;
    /// Chunks read ahead of the channel writer.
    const READ_AHEAD: usize = 4;

    /// Waits up to [`POLL_MS`] for `events` on `fd`; true when something happened (readiness,
    /// hang-up or error: the next read or write tells which).
    fn wait(fd: BorrowedFd<'_>, events: libc::c_short) -> bool {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
        // SAFETY: one valid pollfd, alive for the duration of the call.
        unsafe { libc::poll(&mut p, 1, POLL_MS) > 0 }
    }

    fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
        if let Err(e) = crate::task::thread(std::thread::Builder::new().name(name.into()), f) {
            log::error!("cannot start a thread for the command's {name}: {e}");
        }
    }

    /// The read end of a stdout/stderr pipe, read by a thread; EOF when the pipe ends (or the
    /// thread could not be started).
    pub struct Output {
        chunks: mpsc::Receiver<Chunk>,
        current: Chunk,
        at: usize,
    }

    impl Output {
        fn new(chunks: mpsc::Receiver<Chunk>) -> Output {
            Output { chunks, current: Vec::new(), at: 0 }
        }

        /// The command's stdout and stderr, both read by one thread (a session start costs
        /// one thread less than a thread each), which starts with the first output: a command
        /// that prints nothing (`cpu host true`) ends without a thread (see [`start_on_output`]).
        pub fn start_pair(stdout: io::Result<OwnedFd>, stderr: io::Result<OwnedFd>) -> (Output, Output) {
            let (out_tx, out_rx) = mpsc::channel(READ_AHEAD);
            let (err_tx, err_rx) = mpsc::channel(READ_AHEAD);
            let mut ends = Vec::new();
            for (pipe, tx, name) in [(stdout, out_tx, "stdout"), (stderr, err_tx, "stderr")] {
                match pipe {
                    Ok(fd) => ends.push((File::from(fd), tx)),
                    Err(e) => log::error!("the command's {name}: {e}"),
                }
            }
            crate::task::spawn(start_on_output(ends));
            (Output::new(out_rx), Output::new(err_rx))
        }
    }

    /// Waits on the runtime until a pipe has something, then hands both to the reader thread.
    /// Safe on the runtime, unlike a read: poll(2) (and so epoll) on a pipe takes no lock,
    /// it reads the pipe's counters; the pipes are watched, never read here. A pipe whose
    /// writers are all gone with nothing in it (POLLHUP without POLLIN: it can never have data
    /// again) ends here, so a command that printed nothing ends without a thread start and
    /// its hand-offs, each of which waits for a core on a busy host. Gives up when every
    /// [`Output`] is dropped.
    async fn start_on_output(ends: Vec<(File, mpsc::Sender<Chunk>)>) {
        let mut watched = Vec::new();
        let mut unwatched = Vec::new();
        for (file, tx) in ends {
            // SAFETY: the AsyncFd owns the File, so the descriptor stays open and names the
            // same pipe until the AsyncFd is dropped or `into_inner` gives the File back.
            match unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(file, tokio::io::Interest::READABLE)
            } {
                Ok(fd) => watched.push((fd, tx)),
                Err(e) => unwatched.push((e.into_parts().0, tx)),
            }
        }
        if !unwatched.is_empty() {
            // Cannot watch: read from the start, as the thread always can.
            unwatched.extend(watched.into_iter().map(|(fd, tx)| (fd.into_inner(), tx)));
            return spawn("output", move || read_loop(unwatched));
        }
        loop {
            if watched.is_empty() {
                return;
            }
            let readiness = std::future::poll_fn(|cx| {
                for (fd, _) in &watched {
                    if let Poll::Ready(guard) = fd.poll_read_ready(cx) {
                        if let Ok(mut guard) = guard {
                            guard.clear_ready();
                        }
                        return Poll::Ready(());
                    }
                }
                Poll::Pending
            });
            let dropped = async {
                for (_, tx) in &watched {
                    tx.closed().await;
                }
            };
            tokio::select! {
                () = readiness => {}
                () = dropped => return,
            }
            let mut polls: Vec<libc::pollfd> = watched
                .iter()
                .map(|(fd, _)| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: one valid pollfd per open pipe, alive across the call; no timeout.
            unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) };
            if polls.iter().any(|p| p.revents & !libc::POLLHUP != 0) {
                // Output (or anything but a plain end): the thread reads from here on. The
                // watches end first, so the runtime is not woken by every write.
                let ends = watched.into_iter().map(|(fd, tx)| (fd.into_inner(), tx)).collect();
                return spawn("output", move || read_loop(ends));
            }
            let mut i = 0;
            watched.retain(|_| {
                i += 1;
                polls[i - 1].revents & libc::POLLHUP == 0
            });
        }
    }

    /// Copies each pipe to its queue until the pipe ends or its [`Output`] is dropped (checked
    /// every [`POLL_MS`], so a background process holding a pipe open cannot keep the thread
    /// forever). A full queue holds the other pipe back too; both go to the same SSH channel,
    /// whose window limits them alike.
    fn read_loop(mut ends: Vec<(File, mpsc::Sender<Chunk>)>) {
        for (file, _) in &ends {
            let _ = set_nonblocking(file.as_fd());
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            ends.retain(|(_, tx)| !tx.is_closed());
            if ends.is_empty() {
                return;
            }
            let mut polls: Vec<libc::pollfd> = ends
                .iter()
                .map(|(f, _)| libc::pollfd { fd: f.as_raw_fd(), events: libc::POLLIN, revents: 0 })
                .collect();
            // SAFETY: `polls` holds one valid pollfd per open pipe, alive across the call.
            let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, POLL_MS) };
            if ready <= 0 {
                continue;
            }
            let mut ended = vec![false; ends.len()];
            for (i, p) in polls.iter().enumerate() {
                if p.revents == 0 {
                    continue;
                }
                let (file, tx) = &mut ends[i];
                match file.read(&mut buf) {
                    Ok(0) => ended[i] = true,
                    Ok(n) => {
                        if tx.blocking_send(buf[..n].to_vec()).is_err() {
                            ended[i] = true;
                        }
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                    Err(_) => ended[i] = true,
                }
            }
            let mut i = 0;
            ends.retain(|_| {
                i += 1;
                !ended[i - 1]
            });
        }
    }

    impl AsyncRead for Output {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            if me.at >= me.current.len() {
                match me.chunks.poll_recv(cx) {
                    Poll::Ready(Some(c)) => {
                        me.current = c;
                        me.at = 0;
                    }
                    Poll::Ready(None) => return Poll::Ready(Ok(())),
                    Poll::Pending => return Poll::Pending,
                }
            }
            let n = (me.current.len() - me.at).min(buf.remaining());
            buf.put_slice(&me.current[me.at..me.at + n]);
            me.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// Writes the client's input to the stdin pipe on a thread: first what came before exec,
    /// then the queue until it closes. The pipe closes (the child sees EOF) when the queue's
    /// senders are gone, or soon after the returned flag is set.
    pub fn feed(pipe: io::Result<OwnedFd>, early: Option<Chunk>, queue: InputRx) -> Arc<AtomicBool> {
        let stop = Arc::new(AtomicBool::new(false));
        match pipe {
            Ok(fd) => {
                let stop = stop.clone();
                spawn("stdin", move || write_loop(fd, early, queue, &stop));
            }
            Err(e) => log::error!("the command's stdin: {e}"),
        }
        stop
    }

    fn write_loop(fd: OwnedFd, early: Option<Chunk>, mut queue: InputRx, stop: &AtomicBool) {
        let _ = set_nonblocking(fd.as_fd());
        let mut file = File::from(fd);
        if let Some(d) = early {
            if !write_all(&mut file, &d, stop) {
                return;
            }
        }
        while let Some(d) = queue.blocking_recv() {
            let written = write_all(&mut file, &d, stop);
            queue.done(d.len());
            if !written {
                return;
            }
        }
    }

    fn write_all(file: &mut File, mut data: &[u8], stop: &AtomicBool) -> bool {
        while !data.is_empty() {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            match file.write(data) {
                Ok(0) => return false,
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(file.as_fd(), libc::POLLOUT);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipe as (read end, write end).
    fn pipe() -> (std::os::fd::OwnedFd, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned by nobody else.
        unsafe {
            use std::os::fd::FromRawFd;
            (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1]))
        }
    }

    /// The reader thread starts with the first output; pipes that end empty end without it.
    #[tokio::test(flavor = "current_thread")]
    async fn output_pipes_end_empty_or_deliver_what_comes_late() {
        use std::io::Write;
        // Nothing written: both end.
        let ((out_r, out_w), (err_r, err_w)) = (pipe(), pipe());
        let (mut out, mut err) = pipe_io::Output::start_pair(Ok(out_r), Ok(err_r));
        drop((out_w, err_w));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        out.read_to_end(&mut a).await.unwrap();
        err.read_to_end(&mut b).await.unwrap();
        assert_eq!((a, b), (Vec::new(), Vec::new()));
        // stdout ends empty first; stderr gets bytes after the watch began, then more
        // after the thread took over.
        let ((out_r, out_w), (err_r, mut err_w)) = (pipe(), pipe());
        let (mut out, mut err) = pipe_io::Output::start_pair(Ok(out_r), Ok(err_r));
        tokio::task::yield_now().await;
        drop(out_w);
        let mut a = Vec::new();
        out.read_to_end(&mut a).await.unwrap();
        assert!(a.is_empty());
        err_w.write_all(b"late ").unwrap();
        let mut first = [0u8; 5];
        err.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"late ");
        err_w.write_all(b"and more").unwrap();
        drop(err_w);
        let mut rest = Vec::new();
        err.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"and more");
        // Written and closed before the watch looks: the data is read, not lost.
        let ((out_r, mut out_w), (err_r, err_w)) = (pipe(), pipe());
        out_w.write_all(b"early").unwrap();
        drop((out_w, err_w));
        let (mut out, mut err) = pipe_io::Output::start_pair(Ok(out_r), Ok(err_r));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        out.read_to_end(&mut a).await.unwrap();
        err.read_to_end(&mut b).await.unwrap();
        assert_eq!((a.as_slice(), b.as_slice()), (&b"early"[..], &b""[..]));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn env_last_duplicate_wins() {
        let mut e = Vec::new();
        set_env(&mut e, "A", "1");
        set_env(&mut e, "B", "2");
        set_env(&mut e, "A", "3");
        set_env(&mut e, "C=D", "x");
        set_env(&mut e, "", "x");
        set_env(&mut e, "E", "nul\0");
        assert_eq!(e, env(&[("A", "3"), ("B", "2")]));
    }

    #[test]
    fn cpu_form_reexecs_the_daemon_with_exactly_the_client_env() {
        let exe = Path::new("/proc/self/exe");
        let received = env(&[("PWD", "/home/u"), ("TERM", "xterm"), ("CPUNONCE", "abc")]);
        let pty = PtyRequest { term: "ansi".into(), size: WindowSize::default(), modes: Vec::new() };
        let p = plan(&Launch::Exec(b"-port9p=40123 'ls' '-l' ''".to_vec()), &received, Some(&pty), exe);
        assert_eq!(p.program, exe);
        assert_eq!(p.arg0, "cpud");
        assert_eq!(p.args, os(&["-remote", "-port9p=40123", "ls", "-l", ""]));
        // pty-req's TERM wins over the env value (Go appends it last).
        assert_eq!(p.env, env(&[("PWD", "/home/u"), ("TERM", "ansi"), ("CPUNONCE", "abc")]));
        let p = plan(&Launch::Exec(b" 'sh' '-c' 'exit 7'".to_vec()), &[], None, exe);
        assert_eq!(p.args, os(&["-remote", "sh", "-c", "exit 7"]));
        let names: Vec<&str> = p.env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["PATH", "HOME", "SHELL"]);
    }

    #[test]
    fn plain_ssh_exec_and_shell_use_the_users_shell() {
        let exe = Path::new("/proc/self/exe");
        let p = plan(&Launch::Exec(b"echo $HOME; exit 3".to_vec()), &env(&[("LANG", "C.UTF-8")]), None, exe);
        assert_eq!(p.program, Path::new("/bin/sh"));
        assert_eq!(p.args, os(&["-c", "echo $HOME; exit 3"]));
        assert!(p.env.contains(&("LANG".into(), "C.UTF-8".into())));
        assert!(p.env.contains(&("PATH".into(), DEFAULT_PATH.into())));
        let p = plan(&Launch::Shell, &env(&[("SHELL", "/bin/bash")]), None, exe);
        assert_eq!(p.program, Path::new("/bin/bash"));
        assert_eq!(p.arg0, "-bash");
        assert!(p.args.is_empty());
        let p = plan(&Launch::Exec(Vec::new()), &[], None, exe);
        assert_eq!(p.arg0, "-sh");
    }

    #[test]
    fn signal_names_round_trip() {
        assert_eq!(signal_name(15), Some("TERM"));
        assert_eq!(signal_name(9), Some("KILL"));
        assert_eq!(signal_from_name("INT").map(|s| s.as_raw()), Some(2));
        assert_eq!(signal_from_name("SIGUSR2").map(|s| s.as_raw()), Some(12));
        assert!(signal_from_name("NOPE").is_none());
    }

    #[test]
    fn endings() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(ending(ExitStatus::from_raw(7 << 8)), Ending::Status(7));
        assert_eq!(
            ending(ExitStatus::from_raw(15)),
            Ending::Signal { name: "TERM".into(), core_dumped: false }
        );
        assert_eq!(
            ending(ExitStatus::from_raw(11 | 0x80)),
            Ending::Signal { name: "SEGV".into(), core_dumped: true }
        );
    }
}

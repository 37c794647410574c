//! The setup sequence of one `cpud -remote` session (spec 5.2-5.4, with the fixes of
//! pitfalls P6, P7, P12-P16, P21, P23, P31): private mount namespace, tmpfs on /tmp, the 9P
//! mount of the client's files, the fstab, and the working directory.
//!
//! Everything goes through [`MountOps`], so the order and the decisions are unit-tested with
//! the recording double. It must never mount anything before the namespace is private:
//! mounts would otherwise leak into the daemon's namespace.

use std::ffi::OsString;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use super::fstab::{ms, parse_fstab, translate_options, FstabEntry, MsFlags};
use super::ops::{BindSource, MountOps, PathKind, PendingMount};
use crate::error::{Error, Result};
use crate::options::MAX_MSIZE;
use crate::protocol::{
    ENV_FSTAB, ENV_FSTAB_LC, ENV_MOUNTOPTS, ENV_MSIZE, ENV_NONCE, ENV_SYSTEM_MOUNT, MOUNT_POINT,
};

/// Always /tmp, never $TMPDIR: that comes from the client and may not exist here (P14).
pub const SESSION_TMP: &str = "/tmp";
/// Where the server's own root stays reachable inside the session.
pub const LOCAL_ROOT: &str = "/tmp/local";
/// The message for a kernel without 9p (instead of "no such device").
pub const NO_9P_SUPPORT: &str =
    "the remote kernel has no 9p support (CONFIG_9P_FS, module 9p); run cpu with -9p=false";
/// The message for an unshare refused for lack of privilege.
pub const NEED_CAP_SYS_ADMIN: &str =
    "cannot create a private mount namespace: need CAP_SYS_ADMIN (is cpud running as root?)";
/// msize values tried, largest first, after the requested one fails with EINVAL.
pub const MSIZE_FALLBACKS: [u32; 4] = [512 * 1024, 256 * 1024, 128 * 1024, 64 * 1024];
/// How long the client's 9P server may take to answer the mount's version request.
pub const NINEP_MOUNT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// Environment variables that configure the session and are not passed to the command.
pub const SESSION_VARS: [&str; 6] =
    [ENV_NONCE, ENV_FSTAB, ENV_FSTAB_LC, ENV_MSIZE, ENV_MOUNTOPTS, ENV_SYSTEM_MOUNT];
/// Where the second mount of the client's files, the one with cached metadata for the system
/// directories, goes (only when the client offers it: see [`SYSTEM_DIRS`]).
pub const SYSTEM_MOUNT_POINT: &str = "/tmp/.cpu-system";
/// Client directories that hold programs and libraries: rarely changed while a session runs,
/// and read at every program start. Binds of these come from the system mount, whose
/// `cache=loose` keeps their lookups and attributes (a python3 start: 873 requests with
/// `cache=mmap` alone, figures in bench/baseline.txt). The user's data (/home, /etc, the
/// working directory) stays on the coherent `cache=mmap` mount.
pub const SYSTEM_DIRS: [&str; 7] = ["bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr"];
/// Flags of the system mount: writes through (see [`start_system_mount`]).
pub const SYSTEM_MOUNT_FLAGS: MsFlags = ms::NODEV | ms::NOSUID | ms::SYNCHRONOUS;
/// Mount options the client may not override through CPU_MOUNTOPTS: they carry the channel.
const RESERVED_OPTIONS: [&str; 5] = ["trans", "rfdno", "wfdno", "msize", "version"];

const EPERM: i32 = 1;
const ENODEV: i32 = 19;
const EINVAL: i32 = 22;

/// What the session asked for, read from the client's environment and the exec string.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionSettings {
    /// CPUNONCE: present means "mount the client's files".
    pub nonce: Option<String>,
    /// `-port9p`: the forwarded back-channel port on this machine's loopback.
    pub port9p: Option<u16>,
    /// $USER, as the client sent it.
    pub user: String,
    /// CPU_FSTAB (or LC_GLENDA_CPU_FSTAB).
    pub fstab: Option<String>,
    /// CPU_MSIZE, unparsed.
    pub msize: Option<String>,
    /// CPU_MOUNTOPTS, unparsed.
    pub mount_opts: Option<String>,
    /// $PWD, as the client sent it.
    pub pwd: Option<OsString>,
    /// This machine's kernel release (uname -r): picks the default 9p cache mode.
    pub kernel_release: Option<String>,
    /// CPU_SYSTEM_MOUNT=1: the client (cpu-all) serves a second back-channel connection.
    pub system_mount: bool,
}

impl SessionSettings {
    /// Reads the settings through `var` (e.g. `std::env::var_os`).
    pub fn from_env(port9p: Option<u16>, var: impl Fn(&str) -> Option<OsString>) -> Self {
        let text = |name: &str| var(name).map(|v| v.to_string_lossy().into_owned());
        SessionSettings {
            nonce: text(ENV_NONCE),
            port9p,
            user: text("USER").unwrap_or_default(),
            fstab: text(ENV_FSTAB).or_else(|| text(ENV_FSTAB_LC)),
            msize: text(ENV_MSIZE),
            mount_opts: text(ENV_MOUNTOPTS),
            pwd: var("PWD"),
            kernel_release: None,
            system_mount: text(ENV_SYSTEM_MOUNT).as_deref() == Some("1"),
        }
    }
}

/// What the setup did.
#[derive(Debug)]
pub struct Prepared {
    /// The msize the 9p mount was made with (None: no 9p mount).
    pub msize: Option<u32>,
    /// The directory the command starts in.
    pub working_dir: PathBuf,
    /// True when $PWD was unusable and `/` was chosen instead.
    pub pwd_fallback: bool,
    /// Every warning printed (for tests and the debug log).
    pub warnings: Vec<String>,
    /// This process's ends of the 9P back-channel connections (the kernel holds its own
    /// references): shutting them down makes the kernel's clunks at unmount fail at once
    /// instead of each costing a round trip to the client.
    pub channels: Vec<OwnedFd>,
    /// Whether every 9p mount writes through: a `write` (and the writeback of a shared mmap
    /// when it is unmapped) has reached the client when it returns, so the command's writes are
    /// on the client once it has exited, before the namespace is torn down.
    pub writes_through: bool,
}

/// Runs the whole setup sequence. On `Err` the session must not run the command.
pub fn prepare_session(ops: &mut dyn MountOps, settings: &SessionSettings) -> Result<Prepared> {
    let mut warnings = Vec::new();
    let mut channels = Vec::new();
    enter_private_namespace(ops)?;
    mount_session_tmp(ops, &mut warnings)?;
    // The system mount, when there is one, goes on beside the main mount; it is waited for
    // whatever the main mount's outcome (its thread names a descriptor this process holds).
    let mut system = None;
    let main = settings
        .nonce
        .as_ref()
        .map(|nonce| mount_client_files(ops, settings, nonce, &mut channels, &mut system));
    let system_mount = finish_system_mount(system, &mut channels);
    let msize = main.transpose()?;
    let writes_through = msize.is_some() && main_mount_writes_through(settings);
    if let Some(text) = &settings.fstab {
        let mut entries = parse_fstab(text);
        if system_mount {
            route_system_binds(&mut entries);
        }
        apply_fstab(ops, &entries, msize.is_some(), &mut warnings);
    }
    let (working_dir, pwd_fallback) = enter_working_directory(ops, settings.pwd.as_deref(), &mut warnings)?;
    Ok(Prepared { msize, working_dir, pwd_fallback, warnings, channels, writes_through })
}

fn warn(warnings: &mut Vec<String>, message: String) {
    log::warn!("{message}");
    warnings.push(message);
}

/// unshare(CLONE_NEWNS), then `/` recursively private. Both must work (P31).
pub fn enter_private_namespace(ops: &mut dyn MountOps) -> Result<()> {
    ops.unshare_mount_namespace().map_err(|e| {
        if e.raw_os_error() == Some(EPERM) {
            Error::Namespace(NEED_CAP_SYS_ADMIN.into())
        } else {
            Error::Namespace(format!("cannot create a private mount namespace: {e}"))
        }
    })?;
    ops.make_private(Path::new("/")).map_err(|e| {
        Error::Namespace(format!(
            "cannot make / private in the session's mount namespace ({e}); refusing to mount anything, \
             it would show up in the daemon's namespace"
        ))
    })
}

/// tmpfs on /tmp, then /tmp/cpu and /tmp/local, with the server's / bound on /tmp/local.
fn mount_session_tmp(ops: &mut dyn MountOps, warnings: &mut Vec<String>) -> Result<()> {
    let tmp = Path::new(SESSION_TMP);
    if ops.path_kind(tmp) == PathKind::Missing {
        if let Err(e) = ops.mkdir_all(tmp) {
            return Err(Error::Namespace(format!("cannot create {SESSION_TMP}: {e}")));
        }
    }
    ops.mount("cpu", tmp, "tmpfs", 0, "")
        .map_err(|e| Error::Namespace(format!("cannot mount a tmpfs on {SESSION_TMP}: {e}")))?;
    for dir in [MOUNT_POINT, LOCAL_ROOT] {
        ops.mkdir_all(Path::new(dir)).map_err(|e| Error::Namespace(format!("cannot create {dir}: {e}")))?;
    }
    if let Err(e) = ops.mount("/", Path::new(LOCAL_ROOT), "", ms::BIND, "") {
        warn(warnings, format!("cannot bind / onto {LOCAL_ROOT}: {e}"));
    }
    Ok(())
}

/// USER goes into the mount option string: a comma would inject options (P12).
pub fn sanitize_uname(user: &str) -> String {
    if user.is_empty() {
        return "nouser".into();
    }
    let clean: String =
        user.chars().map(|c| if c == ',' || c.is_whitespace() || c.is_control() { '_' } else { c }).collect();
    if clean != user {
        log::warn!("$USER {user:?} contains characters a mount option cannot carry; using uname {clean:?}");
    }
    clean
}

/// The msize to try first: CPU_MSIZE when it is a sane number, else the largest we support.
pub fn requested_msize(raw: Option<&str>) -> u32 {
    let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else { return MAX_MSIZE };
    match raw.parse::<u32>() {
        Ok(n) if (4096..=MAX_MSIZE).contains(&n) => n,
        Ok(n) => {
            let clamped = n.clamp(4096, MAX_MSIZE);
            log::warn!("{ENV_MSIZE}={n} is outside 4096..={MAX_MSIZE}; using {clamped}");
            clamped
        }
        Err(_) => {
            log::warn!("{ENV_MSIZE}={raw:?} is not a number; using {MAX_MSIZE}");
            MAX_MSIZE
        }
    }
}

/// The requested msize, then every smaller fallback.
pub fn msize_candidates(requested: u32) -> Vec<u32> {
    let mut list = vec![requested];
    list.extend(MSIZE_FALLBACKS.iter().copied().filter(|&m| m < requested));
    list
}

/// CPU_MOUNTOPTS, checked: the options that carry the channel cannot be overridden.
pub fn validate_mount_opts(raw: &str) -> Result<String> {
    let words: Vec<&str> = raw.split(',').map(str::trim).filter(|w| !w.is_empty()).collect();
    for word in &words {
        let key = word.split('=').next().unwrap_or(word);
        if RESERVED_OPTIONS.contains(&key) {
            return Err(Error::Namespace(format!(
                "{ENV_MOUNTOPTS} may not set {key}= (the session sets trans, rfdno, wfdno, version and msize; use cpu -msize for msize)"
            )));
        }
    }
    Ok(words.join(","))
}

/// The 9p cache mode used when the client's CPU_MOUNTOPTS names none, by kernel release.
///
/// `mmap` (measured on 6.1 against `none`, Go's choice, and `loose`; figures in
/// bench/baseline.txt, 2026-11-25): program loading goes through the page cache with
/// read-ahead (the big win: ELF segments are mapped, so `none` reads them 4 KiB per request),
/// writable shared mmap works (with `none` it fails), `read`/`write` stay synchronous on 6.1 so
/// a write is on the client's disk when the command's exit status is sent, and each session
/// mounts afresh, so a file changed on the client between sessions is always seen changed.
/// `loose` caches metadata too but on 6.1 writes back 4 KiB at a time (a 64 MiB write went
/// from 19 s to minutes) and never revalidates within a session. Since 6.6 `mmap` is the
/// bitmask 0b101 (read-ahead + writeback); its dirty pages are written back at the latest when
/// the session's mount namespace is torn down, which the kernel does before the command's
/// exit is reported. Kernels before 4.0 (older than anything we test) keep the kernel default.
pub fn default_cache_mode(kernel_release: Option<&str>) -> Option<&'static str> {
    let (major, minor) = kernel_version(kernel_release?)?;
    ((major, minor) >= (4, 0)).then_some("mmap")
}

/// `(major, minor)` of a release string such as `6.1.0-56-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Seconds the remote kernel sleeps before it asks again for a lock the server answered
/// BLOCKED (F_SETLKW): 6.1's 9p client waits `locktimeout=` seconds, 30 by default
/// (P9_LOCK_TIMEOUT). Two remote processes wait on each other in the remote's own lock layer
/// and wake at once, but the session's locks are also held on the client machine
/// (`ninep::locks`), so a remote process waiting on a client process's lock would
/// otherwise sleep up to 30 s after that lock is gone. One retry a second costs one small
/// request per waiting process. Kernels without the option ignore it, as every unknown 9p
/// option.
pub const LOCK_RETRY_SECONDS: u32 = 1;

/// The client's extra options with our defaults added where they name none: the cache mode
/// by kernel release, and `locktimeout=` ([`LOCK_RETRY_SECONDS`]) on the same kernels.
pub fn with_default_cache(extra: &str, kernel_release: Option<&str>) -> String {
    let Some(mode) = default_cache_mode(kernel_release) else { return extra.to_string() };
    let mut words: Vec<String> = Vec::new();
    if !names_cache(extra) {
        words.push(format!("cache={mode}"));
    }
    if !names_option(extra, "locktimeout") {
        words.push(format!("locktimeout={LOCK_RETRY_SECONDS}"));
    }
    if !extra.is_empty() {
        words.push(extra.to_string());
    }
    words.join(",")
}

/// The 9p mount data string (spec 5.3, with noxattr as the newer Go cpud).
pub fn ninep_mount_data(fd: i32, uname: &str, msize: u32, extra: &str) -> String {
    let mut data =
        format!("version=9p2000.L,trans=fd,rfdno={fd},wfdno={fd},uname={uname},noxattr,msize={msize}");
    if !extra.is_empty() {
        data.push(',');
        data.push_str(extra);
    }
    data
}

/// Whether the main mount (`/tmp/cpu`) writes through, from the cache mode in effect:
/// `none` always (direct I/O); `mmap` before 6.6 (`write` goes to the server, and a shared
/// mapping's dirty pages are written back when it is unmapped, which the command's exit
/// does); `loose`, `fscache` and 6.6's cache bitmasks keep dirty pages until writeback or
/// unmount, so for them the teardown must stay before the exit status.
pub fn main_mount_writes_through(settings: &SessionSettings) -> bool {
    let release = settings.kernel_release.as_deref();
    let client = settings.mount_opts.as_deref().unwrap_or("");
    let options = with_default_cache(client, release);
    let mode =
        options.split(',').filter_map(|w| w.trim().strip_prefix("cache=")).next_back().unwrap_or("none");
    let before_6_6 = release.and_then(kernel_version).is_some_and(|v| v < (6, 6));
    match mode {
        "none" | "0" => true,
        "mmap" => before_6_6,
        _ => false,
    }
}

/// Whether mount options name a cache mode.
fn names_cache(options: &str) -> bool {
    names_option(options, "cache")
}

/// Whether mount options set `key` (as `key` or `key=value`).
fn names_option(options: &str, key: &str) -> bool {
    options.split(',').any(|w| w.trim().split('=').next() == Some(key))
}

/// The system mount while it is being made: its connection, and the mount.
#[derive(Debug)]
pub struct StartedSystemMount {
    channel: OwnedFd,
    pending: PendingMount,
}

/// Waits for the system mount; whether the system directories come from it.
fn finish_system_mount(started: Option<StartedSystemMount>, channels: &mut Vec<OwnedFd>) -> bool {
    let Some(StartedSystemMount { channel, pending }) = started else { return false };
    match pending.wait() {
        Ok(()) => {
            log::debug!("9p: system directories from {SYSTEM_MOUNT_POINT} (cache=loose, sync)");
            channels.push(channel);
            true
        }
        Err(e) => {
            log::debug!(
                "9p: mounting {SYSTEM_MOUNT_POINT} failed ({e}); system directories stay on {MOUNT_POINT}"
            );
            false
        }
    }
}

/// Starts the second mount, for the system directories, with `cache=loose`: only when the
/// client offered it (CPU_SYSTEM_MOUNT=1, sent by cpu-all; a Go client never does), named no
/// cache mode itself (an explicit choice is applied to everything), and the kernel is one we
/// chose a cached default for. It runs beside the main mount (their round trips overlap), so
/// it asks for the requested msize, not the one the main mount ends up with. Any failure
/// leaves the binds on the main mount; never fatal.
fn start_system_mount(
    ops: &mut dyn MountOps,
    settings: &SessionSettings,
    nonce: &str,
) -> Option<StartedSystemMount> {
    let client_opts = settings.mount_opts.as_deref().unwrap_or("");
    if !settings.system_mount
        || names_cache(client_opts)
        || default_cache_mode(settings.kernel_release.as_deref()).is_none()
    {
        return None;
    }
    let port = settings.port9p?;
    let channel = match dial_backchannel(ops, port, nonce) {
        Ok(fd) => fd,
        Err(e) => {
            log::debug!("9p: no second connection for the system directories: {e}");
            return None;
        }
    };
    let target = Path::new(SYSTEM_MOUNT_POINT);
    if let Err(e) = ops.mkdir_all(target) {
        log::debug!("9p: cannot create {SYSTEM_MOUNT_POINT}: {e}");
        return None;
    }
    let msize = requested_msize(settings.msize.as_deref());
    // validate_mount_opts already accepted these for the main mount.
    let extra = match client_opts.trim() {
        "" => format!("cache=loose,locktimeout={LOCK_RETRY_SECONDS}"),
        opts if names_option(opts, "locktimeout") => format!("cache=loose,{opts}"),
        opts => format!("cache=loose,locktimeout={LOCK_RETRY_SECONDS},{opts}"),
    };
    let data = ninep_mount_data(channel.as_raw_fd(), &sanitize_uname(&settings.user), msize, &extra);
    // MS_SYNCHRONOUS: cache=loose buffers writes, and a write into the client's /usr must be
    // on the client when the command's exit status is sent (the namespace is torn down after
    // that). Reads, lookups and attributes stay cached; writes there are rare.
    let pending = ops.start_mount_9p(&channel, target, SYSTEM_MOUNT_FLAGS, &data, NINEP_MOUNT_DEADLINE);
    Some(StartedSystemMount { channel, pending })
}

/// Bind lines whose source is a system directory of the client take it from the system mount.
pub fn route_system_binds(entries: &mut [FstabEntry]) {
    for entry in entries.iter_mut() {
        if !translate_options(&entry.options).is_bind() {
            continue;
        }
        let Ok(rest) = Path::new(&entry.spec).strip_prefix(MOUNT_POINT) else { continue };
        let top = rest.components().next().map(|c| c.as_os_str().to_string_lossy().into_owned());
        if top.is_some_and(|t| SYSTEM_DIRS.contains(&t.as_str())) {
            entry.spec = Path::new(SYSTEM_MOUNT_POINT).join(rest).display().to_string();
        }
    }
}

/// Dials the back-channel (127.0.0.1 first, as the client asks for it first; then ::1) and
/// sends the nonce.
fn dial_backchannel(ops: &mut dyn MountOps, port: u16, nonce: &str) -> Result<std::os::fd::OwnedFd> {
    let addrs =
        [SocketAddr::from((Ipv4Addr::LOCALHOST, port)), SocketAddr::from((Ipv6Addr::LOCALHOST, port))];
    let mut last_error = None;
    let mut channel = None;
    for addr in addrs {
        match ops.dial(addr, nonce.as_bytes()) {
            Ok(fd) => {
                channel = Some(fd);
                break;
            }
            Err(e) => {
                log::debug!("9p back-channel {addr}: {e}");
                last_error = Some(e);
            }
        }
    }
    channel.ok_or_else(|| {
        let e = last_error.map(|e| e.to_string()).unwrap_or_default();
        Error::Namespace(format!(
            "cannot reach the client's 9p server on 127.0.0.1:{port} or [::1]:{port}: {e}"
        ))
    })
}

/// Dials the back-channel and mounts the client's files on /tmp/cpu; once the first
/// connection is up, starts the system mount into `system` (see [`start_system_mount`]).
/// Returns the msize used.
fn mount_client_files(
    ops: &mut dyn MountOps,
    settings: &SessionSettings,
    nonce: &str,
    channels: &mut Vec<OwnedFd>,
    system: &mut Option<StartedSystemMount>,
) -> Result<u32> {
    let extra = with_default_cache(
        &validate_mount_opts(settings.mount_opts.as_deref().unwrap_or(""))?,
        settings.kernel_release.as_deref(),
    );
    let port = settings.port9p.ok_or_else(|| {
        Error::Namespace(format!(
            "{ENV_NONCE} is set but no -port9p was given: cannot reach the client's files"
        ))
    })?;
    // Check before dialing, so a kernel without 9p costs the client nothing.
    let supported =
        ops.filesystem_supported("9p") || (ops.load_module("9p") && ops.filesystem_supported("9p"));
    if !supported {
        return Err(Error::Namespace(NO_9P_SUPPORT.into()));
    }
    let channel = dial_backchannel(ops, port, nonce)?;
    *system = start_system_mount(ops, settings, nonce);
    let uname = sanitize_uname(&settings.user);
    let target = Path::new(MOUNT_POINT);
    let mut last_error: Option<(io::Error, String)> = None;
    for msize in msize_candidates(requested_msize(settings.msize.as_deref())) {
        let data = ninep_mount_data(channel.as_raw_fd(), &uname, msize, &extra);
        match ops.mount_9p(&channel, target, ms::NODEV | ms::NOSUID, &data, NINEP_MOUNT_DEADLINE) {
            Ok(()) => {
                let negotiated = ops.mounted_msize(target);
                log::debug!(
                    "9p: mounted the client's files on {MOUNT_POINT} with msize={msize} (kernel reports {})",
                    negotiated.map(|n| n.to_string()).unwrap_or_else(|| "nothing".into())
                );
                channels.push(channel);
                return Ok(negotiated.unwrap_or(msize));
            }
            Err(e) if e.raw_os_error() == Some(ENODEV) => return Err(Error::Namespace(NO_9P_SUPPORT.into())),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Error::Namespace(format!(
                    "cannot mount the client's files on {MOUNT_POINT}: {e}"
                )))
            }
            Err(e) if e.raw_os_error() == Some(EINVAL) => {
                log::debug!("9p mount with msize={msize}: {e}; trying a smaller msize");
                last_error = Some((e, data));
            }
            Err(e) => last_error = Some((e, data)),
        }
        if last_error.as_ref().is_some_and(|(e, _)| e.raw_os_error() != Some(EINVAL)) {
            break;
        }
    }
    let (e, data) = last_error.unwrap_or_else(|| (io::Error::from_raw_os_error(EINVAL), String::new()));
    Err(Error::Namespace(format!("cannot mount the client's files on {MOUNT_POINT}: {e} (options {data})")))
}

/// What a missing mount target means for the user.
fn missing_target_consequence(target: &str) -> String {
    match target {
        "/lib64" | "/lib" | "/lib32" | "/libx32" => format!(
            "dynamically linked host programs will fail with \"no such file or directory\" \
             (their loader or libraries live in {target})"
        ),
        _ => format!("programs that need the client's {target} will not find it"),
    }
}

/// Makes sure `target` exists as a mount point. Creates it only where that changes no disk
/// (an in-memory root such as an initramfs, or the session's own /tmp).
fn ensure_mount_point(
    ops: &mut dyn MountOps,
    target: &Path,
    file_source: bool,
    warnings: &mut Vec<String>,
) -> bool {
    if ops.path_kind(target) != PathKind::Missing {
        return true;
    }
    let shown = target.display().to_string();
    if !ops.in_memory_filesystem(target) && !target.starts_with(SESSION_TMP) {
        warn(
            warnings,
            format!(
                "{shown} does not exist on this machine and its root filesystem is on disk, so it is not created: {}",
                missing_target_consequence(&shown)
            ),
        );
        return false;
    }
    let created = if file_source {
        match target.parent() {
            Some(parent) => ops.mkdir_all(parent).and_then(|()| ops.create_file(target)),
            None => Ok(()),
        }
    } else {
        ops.mkdir_all(target)
    };
    match created {
        Ok(()) => {
            log::debug!("created the mount point {shown}");
            true
        }
        Err(e) => {
            warn(
                warnings,
                format!(
                    "cannot create the mount point {shown} ({e}): {}",
                    missing_target_consequence(&shown)
                ),
            );
            false
        }
    }
}

/// An absolute spec with its symlinks resolved (so the mount names the real directory).
fn resolved_spec(ops: &dyn MountOps, spec: &str) -> String {
    if !spec.starts_with('/') {
        return spec.to_string();
    }
    ops.resolve(Path::new(spec)).map(|p| p.display().to_string()).unwrap_or_else(|| spec.to_string())
}

/// Applies the fstab in order; every failure is a warning and the next line is tried.
pub fn apply_fstab(
    ops: &mut dyn MountOps,
    entries: &[FstabEntry],
    ninep_mounted: bool,
    warnings: &mut Vec<String>,
) {
    let mut skipped_client_paths = 0;
    let mut opened_together = open_client_sources_together(ops, entries, ninep_mounted);
    for (index, entry) in entries.iter().enumerate() {
        let options = translate_options(&entry.options);
        let from_client = Path::new(&entry.spec).starts_with(MOUNT_POINT);
        if from_client && !ninep_mounted {
            skipped_client_paths += 1;
            continue;
        }
        // A bind source held open is checked and bound with one lookup (see open_bind_source).
        let held = match opened_together.get_mut(index).and_then(Option::take) {
            Some(source) => Some(Ok(source)),
            None if options.is_bind() && entry.spec.starts_with('/') => {
                ops.open_bind_source(Path::new(&entry.spec))
            }
            None => None,
        };
        let (spec, source_kind, _held) = match held {
            Some(Ok(source)) => (source.mount_path(), Some(source.kind), Some(source)),
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => {
                (entry.spec.clone(), Some(PathKind::Missing), None)
            }
            Some(Err(e)) => {
                log::debug!("fstab line {}: cannot open {} ({e}); binding by path", entry.line, entry.spec);
                (resolved_spec(ops, &entry.spec), None, None)
            }
            None => (resolved_spec(ops, &entry.spec), None, None),
        };
        let target = ops.resolve(Path::new(&entry.file)).unwrap_or_else(|| PathBuf::from(&entry.file));
        let mut file_source = false;
        if options.is_bind() {
            match source_kind.unwrap_or_else(|| ops.path_kind(Path::new(&spec))) {
                PathKind::Missing => {
                    let what = match Path::new(&entry.spec).strip_prefix(MOUNT_POINT) {
                        Ok(rest) if from_client => format!("the client has no /{}", rest.display()),
                        _ => format!("{} does not exist", entry.spec),
                    };
                    warn(
                        warnings,
                        format!("fstab line {}: {what}; {} is left as it is", entry.line, entry.file),
                    );
                    continue;
                }
                PathKind::File | PathKind::Other => file_source = true,
                PathKind::Directory => {}
            }
        }
        if !ensure_mount_point(ops, &target, file_source, warnings) {
            continue;
        }
        mount_entry(ops, entry, &spec, &target, options.flags, &options.data, warnings);
    }
    if skipped_client_paths > 0 {
        log::debug!(
            "no 9p mount: skipped {skipped_client_paths} fstab lines with sources under {MOUNT_POINT}"
        );
    }
}

/// The fstab lines whose bind source is on one of the client's mounts and that no earlier
/// line can shadow (its target is the source or an ancestor of it): their lookups do not
/// depend on the binds before them, so they are opened together before the fstab is applied
/// ([`MountOps::open_bind_sources_together`]): on a link with latency, a session's binds
/// (/usr, /usr/lib, /etc, /home, ...) cost the round trips of the deepest path instead of
/// two per line. Indexed like `entries`; `None` where the line opens its source at its turn.
pub fn open_client_sources_together(
    ops: &mut dyn MountOps,
    entries: &[FstabEntry],
    ninep_mounted: bool,
) -> Vec<Option<BindSource>> {
    let mut chosen = Vec::new();
    if ninep_mounted {
        let mut earlier_targets: Vec<PathBuf> = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let spec = Path::new(&entry.spec);
            let on_client = spec.starts_with(MOUNT_POINT) || spec.starts_with(SYSTEM_MOUNT_POINT);
            if on_client
                && translate_options(&entry.options).is_bind()
                && !earlier_targets.iter().any(|t| spec.starts_with(t))
            {
                chosen.push(index);
            }
            earlier_targets.push(PathBuf::from(&entry.file));
            earlier_targets.extend(ops.resolve(Path::new(&entry.file)));
        }
    }
    let mut opened: Vec<Option<BindSource>> = entries.iter().map(|_| None).collect();
    if chosen.len() < 2 {
        return opened;
    }
    let paths: Vec<PathBuf> = chosen.iter().map(|&i| PathBuf::from(&entries[i].spec)).collect();
    for (index, source) in chosen.into_iter().zip(ops.open_bind_sources_together(&paths)) {
        opened[index] = source;
    }
    opened
}

fn mount_entry(
    ops: &mut dyn MountOps,
    entry: &FstabEntry,
    spec: &str,
    target: &Path,
    flags: MsFlags,
    data: &str,
    warnings: &mut Vec<String>,
) {
    if let Err(e) = ops.mount(spec, target, &entry.vfstype, flags, data) {
        let shown = if spec.starts_with("/proc/self/fd/") { entry.spec.as_str() } else { spec };
        warn(
            warnings,
            format!(
                "fstab line {}: mount {} on {} ({}, {}) failed: {e}",
                entry.line,
                shown,
                target.display(),
                entry.vfstype,
                entry.options
            ),
        );
        return;
    }
    // A bind ignores MS_RDONLY; a read-only bind needs a remount.
    if flags & ms::BIND != 0 && flags & ms::RDONLY != 0 {
        let remount = ms::REMOUNT | ms::BIND | ms::RDONLY | (flags & (ms::NOSUID | ms::NODEV | ms::NOEXEC));
        if let Err(e) = ops.mount("none", target, "", remount, "") {
            warn(
                warnings,
                format!("fstab line {}: cannot make {} read-only: {e}", entry.line, target.display()),
            );
        }
    }
}

/// chdir to $PWD when it exists in the new namespace, else warn and use / (Go fails: P13).
fn enter_working_directory(
    ops: &mut dyn MountOps,
    pwd: Option<&std::ffi::OsStr>,
    warnings: &mut Vec<String>,
) -> Result<(PathBuf, bool)> {
    match pwd.filter(|p| !p.is_empty()) {
        Some(pwd) => match ops.change_dir(Path::new(pwd)) {
            Ok(()) => return Ok((PathBuf::from(pwd), false)),
            Err(e) => warn(
                warnings,
                format!("your $PWD {pwd:?} is not in the remote namespace ({e}); running in /"),
            ),
        },
        None => log::debug!("no $PWD from the client; running in /"),
    }
    ops.change_dir(Path::new("/")).map_err(|e| Error::Namespace(format!("cannot chdir to /: {e}")))?;
    Ok((PathBuf::from("/"), true))
}

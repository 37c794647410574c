//! PID 1 duties for `cpud -init` (and any cpud that finds itself PID 1): the basic mounts,
//! the console, a sane environment, kernel modules (/etc/cpud/modules), the loopback
//! interface, a static `ip=` the kernel could not apply, and a supervisor that reaps every
//! orphan and keeps the SSH server running.
//!
//! Design: the supervisor (PID 1, or a child subreaper when `-init` is given to a cpud that is
//! not PID 1) stays single-threaded and never runs the server itself. It forks a child that
//! calls `serve` (normally [`crate::server::run`]); when that child fails, exits or even
//! crashes (panic=abort, a signal), the supervisor logs it and forks a new one after a pause
//! that backs off from 1 s to 10 s. PID 1 therefore never exits (which would panic the
//! kernel). Signals are blocked and taken with `sigtimedwait`, so there is no busy loop and no
//! async-signal-safety problem. Orphans (double-forked commands) are re-parented to the
//! supervisor and reaped there; the session children of the server are the server process's
//! own children, so their statuses cannot be stolen. [`reap_children`] still honours the
//! session-child registry for code that reaps inside a process that also runs sessions.
//!
//! Signals to the supervisor: SIGTERM/SIGINT end every process cleanly (TERM, a grace period,
//! KILL), sync, then power off (`-poweroff`) or reboot (`-reboot`); without either flag PID 1
//! restarts the server and a non-PID-1 supervisor returns. SIGUSR2 powers off and SIGUSR1
//! halts (what busybox `poweroff`/`halt` send to init). SIGHUP is passed to the server, which
//! is restarted at once when it exits.
//!
//! This module must not run the SSH server, and must not exit the process as PID 1.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::mount::MountFlags;
use rustix::process::{Pid, Signal};

use crate::error::{Error, Result};
use crate::options::CpudOptions;

static SESSION_CHILDREN: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Marks `pid` as a session child whose status its session waits for (never reaped here).
pub fn note_session_child(pid: i32) {
    if let Ok(mut g) = SESSION_CHILDREN.lock() {
        g.get_or_insert_with(HashSet::new).insert(pid);
    }
}

/// Forgets `pid` once its session has collected its status.
pub fn forget_session_child(pid: i32) {
    if let Ok(mut g) = SESSION_CHILDREN.lock() {
        if let Some(set) = g.as_mut() {
            set.remove(&pid);
        }
    }
}

/// Whether `pid` is a registered session child.
pub fn is_session_child(pid: i32) -> bool {
    SESSION_CHILDREN.lock().map(|g| g.as_ref().is_some_and(|s| s.contains(&pid))).unwrap_or(false)
}

/// Authorized keys of an initramfs built by `make initramfs`.
pub const BOOT_AUTHORIZED_KEYS: &str = "/etc/cpud/authorized_keys";
/// Host key of an initramfs built by `make initramfs` (generated once at build time).
pub const BOOT_HOST_KEY: &str = "/etc/cpud/ssh_host_ed25519_key";
/// Extra cpud flags for `/init`, one per line (`#` starts a comment line).
pub const BOOT_FLAGS_FILE: &str = "/etc/cpud/flags";
/// Kernel modules loaded at boot, one per line: `path [parameters]`, in load order. A
/// relative path is looked up under /lib/modules/$(uname -r)/, then under /lib/modules/.
pub const BOOT_MODULES_FILE: &str = "/etc/cpud/modules";
/// As PID 1, the supervisor writes the current server process's pid here.
pub const SERVER_PID_FILE: &str = "/run/cpud-server.pid";

/// First pause before restarting a failed server; doubled after each failure.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause before restarting a failed server.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A server that ran at least this long before failing restarts after [`FIRST_BACKOFF`].
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How long the server may take to end its sessions after SIGTERM.
const SERVER_GRACE: Duration = Duration::from_secs(5);
/// How long every other process may take to exit after SIGTERM, before SIGKILL.
const PROCESS_GRACE: Duration = Duration::from_secs(3);
/// Longest single sleep of the supervisor (it wakes earlier on any signal).
const IDLE_WAKE: Duration = Duration::from_secs(60);

/// Whether this process is PID 1 (of the machine or of its pid namespace).
pub fn is_pid1() -> bool {
    rustix::process::getpid().is_init()
}

/// The words `/init` runs cpud with: `-init`, the boot key files, then the lines of
/// [`BOOT_FLAGS_FILE`] (if it exists). Words the kernel passes to init are ignored (a stray
/// boot argument must not stop the board from coming up).
pub fn boot_args(flags_file: &Path) -> Vec<OsString> {
    let mut args: Vec<OsString> =
        ["-init", "-pk", BOOT_AUTHORIZED_KEYS, "-hk", BOOT_HOST_KEY].iter().map(OsString::from).collect();
    if let Ok(text) = std::fs::read_to_string(flags_file) {
        args.extend(parse_flags_file(&text).into_iter().map(OsString::from));
    }
    args
}

/// One flag word per non-empty line; lines starting with `#` are comments. Surrounding blanks
/// are trimmed, inner ones kept (`-sp 17010` on one line is one word: write `-sp=17010`).
pub fn parse_flags_file(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect()
}

/// The options of `/init`: [`boot_args`] parsed; if the flags file is unusable, the error is
/// printed and the defaults without it are used, so the board still comes up. Fails only if
/// the built-in defaults do not parse (a bug the unit tests catch).
pub fn boot_options(flags_file: &Path) -> Result<CpudOptions> {
    match CpudOptions::from_args(boot_args(flags_file), false) {
        Ok(o) => Ok(o),
        Err(e) => {
            eprintln!("cpud: init: ignoring {}: {e}", flags_file.display());
            fallback_options()
        }
    }
}

/// `-init` with the boot key files: what PID 1 runs when its own flags are unusable.
pub fn fallback_options() -> Result<CpudOptions> {
    Ok(CpudOptions::from_args(["-init", "-pk", BOOT_AUTHORIZED_KEYS, "-hk", BOOT_HOST_KEY], false)?)
}

/// What PID 1 does when it cannot even start supervising: sleep forever (exiting would panic
/// the kernel), in bounded naps.
pub fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Runs cpud as init: [`setup_pid1`], then [`supervise`]. As PID 1 it never returns; otherwise
/// it returns `Ok(())` after SIGTERM/SIGINT has ended every process it supervised.
pub fn run_as_init(opts: CpudOptions, serve: impl Fn(CpudOptions) -> Result<()>) -> Result<()> {
    setup_pid1(&opts);
    if !opts.sleep_before_serving.is_zero() {
        std::thread::sleep(opts.sleep_before_serving);
    }
    supervise(opts, serve)
}

// ---------------------------------------------------------------------------------------
// Set-up: mounts, console, environment, hostname, modules, loopback
// ---------------------------------------------------------------------------------------

/// One file system of the basic root.
struct BasicMount {
    fstype: &'static str,
    target: &'static str,
    flags: MountFlags,
    data: &'static str,
    /// Mounted when not PID 1 too (pseudo file systems a distribution always has).
    also_without_pid1: bool,
}

fn basic_mounts() -> [BasicMount; 7] {
    let nse = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    [
        BasicMount { fstype: "proc", target: "/proc", flags: nse, data: "", also_without_pid1: true },
        BasicMount { fstype: "sysfs", target: "/sys", flags: nse, data: "", also_without_pid1: true },
        BasicMount {
            fstype: "devtmpfs",
            target: "/dev",
            flags: MountFlags::NOSUID,
            data: "mode=0755",
            also_without_pid1: true,
        },
        BasicMount {
            fstype: "devpts",
            target: "/dev/pts",
            flags: MountFlags::NOSUID | MountFlags::NOEXEC,
            data: "newinstance,ptmxmode=0666,gid=5,mode=620",
            also_without_pid1: true,
        },
        BasicMount {
            fstype: "tmpfs",
            target: "/dev/shm",
            flags: MountFlags::NOSUID | MountFlags::NODEV,
            data: "mode=1777",
            also_without_pid1: false,
        },
        BasicMount {
            fstype: "tmpfs",
            target: "/tmp",
            flags: MountFlags::NOSUID | MountFlags::NODEV,
            data: "mode=1777",
            also_without_pid1: false,
        },
        BasicMount {
            fstype: "tmpfs",
            target: "/run",
            flags: MountFlags::NOSUID | MountFlags::NODEV,
            data: "mode=0755",
            also_without_pid1: false,
        },
    ]
}

/// The set-up PID 1 needs before serving. Nothing here is fatal: each failure is logged and
/// the next step runs. Mounts already present (per /proc/self/mountinfo) are left alone; the
/// tmpfs mounts (/dev/shm, /tmp, /run) are made only as PID 1, so `-init` on a running
/// distribution never hides its directories.
pub fn setup_pid1(opts: &CpudOptions) {
    let pid1 = is_pid1();
    log::info!("init: cpud {} as {}", env!("CARGO_PKG_VERSION"), if pid1 { "PID 1" } else { "a subreaper" });
    mount_basic_filesystems(pid1);
    ensure_console();
    ensure_dev_links();
    set_default_env();
    if pid1 {
        set_hostname_from_file(Path::new("/etc/hostname"));
        // Ctrl-Alt-Del then sends SIGINT to PID 1 (a clean shutdown) instead of an instant reboot.
        let _ = rustix::system::reboot(rustix::system::RebootCommand::CadOff);
    }
    load_modules(Path::new(BOOT_MODULES_FILE));
    match set_interface_up("lo") {
        Ok(true) => log::info!("init: lo is up"),
        Ok(false) => log::debug!("init: lo was already up"),
        Err(e) => log::warn!("init: cannot bring lo up: {e}"),
    }
    if pid1 {
        configure_ip_from_cmdline();
    }
    if opts.klog && pid1 {
        // Lines written to /dev/kmsg are rate-limited by default (10 per 5 s): lift that.
        if std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n").is_err() {
            log::debug!("init: cannot set kernel.printk_devkmsg=on");
        }
    }
}

fn mount_basic_filesystems(pid1: bool) {
    for m in basic_mounts() {
        if !pid1 && !m.also_without_pid1 {
            continue;
        }
        let present = if m.target == "/proc" {
            // PID 1 of a new pid namespace may see its parent's /proc: its pids are not ours.
            if pid1 {
                proc_is_ours()
            } else {
                Path::new("/proc/self").exists()
            }
        } else {
            // Without a mount table only PID 1 (whose root is its own) mounts blindly.
            read_mount_points().map_or(!pid1, |set| set.contains(m.target))
        };
        if present {
            log::debug!("init: {} already mounted", m.target);
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(m.target) {
            log::warn!("init: cannot create {}: {e}", m.target);
        }
        let data = CString::new(m.data).unwrap_or_default();
        match rustix::mount::mount(m.fstype, m.target, m.fstype, m.flags, data.as_c_str()) {
            Ok(()) => log::info!("init: mounted {} on {}", m.fstype, m.target),
            Err(e) => log::warn!("init: cannot mount {} on {}: {e}", m.fstype, m.target),
        }
    }
}

fn read_mount_points() -> Option<HashSet<String>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    Some(parse_mountinfo(&text).into_iter().collect())
}

/// The mount points (field 5) of /proc/self/mountinfo text, with `\040`-style escapes decoded.
pub fn parse_mountinfo(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(unescape_octal).collect()
}

/// Decodes the kernel's `\ooo` escapes (space, tab, newline, backslash) in mount table fields.
fn unescape_octal(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Gives the process stdin/stdout/stderr on /dev/console when the kernel could not (an
/// initramfs without a /dev/console node starts init with no open descriptors).
fn ensure_console() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on a small integer only asks whether it is an open descriptor.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let Ok(console) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/console") else {
            return;
        };
        use std::os::fd::IntoRawFd;
        let raw = console.into_raw_fd();
        for target in 0..3 {
            // SAFETY: F_GETFD as above; dup2 onto a descriptor number that is not open.
            if unsafe { libc::fcntl(target, libc::F_GETFD) } == -1 {
                // SAFETY: raw is an open descriptor we own; target is a free descriptor number.
                unsafe { libc::dup2(raw, target) };
            }
        }
        if raw > 2 {
            // SAFETY: raw is ours and no longer used (its copies live on 0..2).
            unsafe { libc::close(raw) };
        }
        return;
    }
}

/// /dev/ptmx, /dev/fd and /dev/std{in,out,err}, where devtmpfs did not provide them.
fn ensure_dev_links() {
    let links = [
        ("/dev/ptmx", "pts/ptmx"),
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ];
    if !Path::new("/dev/pts/ptmx").exists() {
        return; // no devpts: nothing sensible to point at
    }
    for (link, target) in links {
        if std::fs::symlink_metadata(link).is_err() {
            if let Err(e) = std::os::unix::fs::symlink(target, link) {
                log::debug!("init: cannot create {link}: {e}");
            }
        }
    }
}

/// PATH, HOME, USER and LOGNAME for the server and the sessions, where the kernel left them
/// unset or empty. Called while the process is still single-threaded.
fn set_default_env() {
    let root = rustix::process::getuid().is_root();
    let home = if root && Path::new("/root").is_dir() { "/root" } else { "/" };
    let defaults = [
        ("PATH", "/bin:/sbin:/usr/bin:/usr/sbin:/usr/local/bin:/usr/local/sbin:/bbin"),
        ("HOME", home),
        ("USER", if root { "root" } else { "" }),
        ("LOGNAME", if root { "root" } else { "" }),
    ];
    for (name, value) in defaults {
        if !value.is_empty() && std::env::var_os(name).is_none_or(|v| v.is_empty()) {
            std::env::set_var(name, value);
        }
    }
}

fn set_hostname_from_file(file: &Path) {
    let Ok(text) = std::fs::read_to_string(file) else { return };
    let name = text.trim();
    let current = rustix::system::uname();
    let current = current.nodename().to_string_lossy();
    if name.is_empty() || !(current.is_empty() || current == "(none)" || current == "localhost") {
        return;
    }
    match rustix::system::sethostname(name.as_bytes()) {
        Ok(()) => log::info!("init: hostname {name}"),
        Err(e) => log::warn!("init: cannot set hostname {name:?}: {e}"),
    }
}

/// One line of [`BOOT_MODULES_FILE`]: a module file and its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleLine {
    pub path: String,
    pub params: String,
}

/// Parses [`BOOT_MODULES_FILE`]: `path [param=value ...]` per line, `#` comments.
pub fn parse_modules_file(text: &str) -> Vec<ModuleLine> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.split_once(char::is_whitespace) {
            Some((p, rest)) => ModuleLine { path: p.to_string(), params: rest.trim().to_string() },
            None => ModuleLine { path: l.to_string(), params: String::new() },
        })
        .collect()
}

/// Where a module line's file is: absolute as given, else under /lib/modules/RELEASE/ or
/// /lib/modules/.
fn module_file(path: &str, release: &str) -> PathBuf {
    if path.starts_with('/') {
        return PathBuf::from(path);
    }
    let versioned = Path::new("/lib/modules").join(release).join(path);
    if versioned.exists() {
        versioned
    } else {
        Path::new("/lib/modules").join(path)
    }
}

/// Loads the modules listed in `list` in order with finit_module(2). Returns (loaded, failed).
pub fn load_modules(list: &Path) -> (usize, usize) {
    let Ok(text) = std::fs::read_to_string(list) else { return (0, 0) };
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let (mut loaded, mut failed) = (0, 0);
    for line in parse_modules_file(&text) {
        let file = module_file(&line.path, &release);
        let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let result =
            std::fs::File::open(&file).map_err(|e| rustix::io::Errno::from_io_error(&e)).and_then(|f| {
                let params = CString::new(line.params.clone()).unwrap_or_default();
                rustix::system::finit_module(&f, &params, 0).map_err(Some)
            });
        match result {
            Ok(()) => {
                loaded += 1;
                log::info!("init: loaded module {name}");
            }
            Err(Some(rustix::io::Errno::EXIST)) => log::debug!("init: module {name} already loaded"),
            Err(e) => {
                failed += 1;
                let why = e.map(|e| e.to_string()).unwrap_or_else(|| "cannot open".into());
                log::warn!("init: cannot load module {} ({}): {why}", line.path, file.display());
            }
        }
    }
    if loaded + failed > 0 {
        log::info!("init: {loaded} modules loaded, {failed} failed");
    }
    (loaded, failed)
}

/// Sets IFF_UP on interface `name`. Returns whether it was down before.
pub fn set_interface_up(name: &str) -> std::io::Result<bool> {
    let sock = IoctlSocket::new()?;
    let mut req = IoctlSocket::request(name)?;
    sock.call(libc::SIOCGIFFLAGS as _, &mut req)?;
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(false);
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    sock.call(libc::SIOCSIFFLAGS as _, &mut req)?;
    Ok(true)
}

/// A static `ip=` kernel argument: `client:server:gateway:netmask:hostname:device:autoconf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    pub address: std::net::Ipv4Addr,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub netmask: std::net::Ipv4Addr,
    pub hostname: String,
    /// Empty: the first interface other than lo.
    pub device: String,
}

/// The static configuration of an `ip=` word on the kernel command line, if there is one.
/// Only the static form is taken (autoconf empty, `off`, `none` or `static`); `ip=dhcp` and
/// friends need the kernel's own IP autoconfiguration or a DHCP client in the image. An
/// empty netmask means /24.
pub fn parse_ip_arg(cmdline: &str) -> Option<StaticIp> {
    let value = cmdline.split_whitespace().filter_map(|w| w.strip_prefix("ip=")).next_back()?;
    let f: Vec<&str> = value.split(':').collect();
    let address = f.first()?.parse().ok()?;
    let field = |i: usize| f.get(i).copied().unwrap_or("");
    if !matches!(field(6), "" | "off" | "none" | "static") {
        return None;
    }
    Some(StaticIp {
        address,
        gateway: field(2).parse().ok(),
        netmask: field(3).parse().unwrap_or(std::net::Ipv4Addr::new(255, 255, 255, 0)),
        hostname: field(4).to_string(),
        device: field(5).to_string(),
    })
}

/// Applies a static `ip=` that the kernel did not (Debian-style kernels have no
/// CONFIG_IP_PNP, and a NIC driver that is a module loads only now).
fn configure_ip_from_cmdline() {
    let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") else { return };
    if !cmdline.split_whitespace().any(|w| w.starts_with("ip=")) {
        return;
    }
    let Some(ip) = parse_ip_arg(&cmdline) else {
        log::info!("init: ip= is not a static address: left to the kernel or the image");
        return;
    };
    // The NIC may appear a little after its driver module loaded: wait up to 3 s.
    let mut device = ip.device.clone();
    for _ in 0..60 {
        if device.is_empty() {
            device = first_network_interface().unwrap_or_default();
        }
        if !device.is_empty() && Path::new("/sys/class/net").join(&device).exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if device.is_empty() || !Path::new("/sys/class/net").join(&device).exists() {
        log::warn!("init: ip=: no network interface {device:?} found");
        return;
    }
    if !ip.hostname.is_empty() {
        let _ = rustix::system::sethostname(ip.hostname.as_bytes());
    }
    match configure_ipv4(&device, &ip) {
        Ok(AddressState::AlreadySet) => log::debug!("init: {device} already has an address"),
        Ok(AddressState::Configured) => log::info!(
            "init: {device} is {}/{} via {}",
            ip.address,
            u32::from(ip.netmask).count_ones(),
            ip.gateway.map(|g| g.to_string()).unwrap_or_else(|| "no gateway".into())
        ),
        Err(e) => log::warn!("init: cannot configure {device}: {e}"),
    }
}

fn first_network_interface() -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().next()
}

enum AddressState {
    AlreadySet,
    Configured,
}

/// A socket for interface ioctls, closed on drop.
struct IoctlSocket(i32);

impl IoctlSocket {
    fn new() -> std::io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(IoctlSocket(fd))
    }

    /// An ifreq naming `name` (all other fields zero).
    fn request(name: &str) -> std::io::Result<libc::ifreq> {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= req.ifr_name.len() {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        Ok(req)
    }

    /// ioctl(2) on the socket with a pointer argument.
    fn call<T>(&self, request: libc::c_ulong, arg: &mut T) -> std::io::Result<()> {
        // SAFETY: every caller passes the structure type that `request` reads or writes.
        if unsafe { libc::ioctl(self.0, request as _, arg as *mut T) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for IoctlSocket {
    fn drop(&mut self) {
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(self.0) };
    }
}

fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    // SAFETY: sockaddr_in is plain old data; all zeroes is valid.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) on Linux.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn configure_ipv4(device: &str, ip: &StaticIp) -> std::io::Result<AddressState> {
    let sock = IoctlSocket::new()?;
    let mut req = IoctlSocket::request(device)?;
    if sock.call(libc::SIOCGIFADDR as _, &mut req).is_ok() {
        return Ok(AddressState::AlreadySet);
    }
    let mut req = IoctlSocket::request(device)?;
    req.ifr_ifru.ifru_addr = sockaddr_v4(ip.address);
    sock.call(libc::SIOCSIFADDR as _, &mut req)?;
    let mut req = IoctlSocket::request(device)?;
    req.ifr_ifru.ifru_netmask = sockaddr_v4(ip.netmask);
    sock.call(libc::SIOCSIFNETMASK as _, &mut req)?;
    set_interface_up(device)?;
    if let Some(gw) = ip.gateway {
        // SAFETY: rtentry is plain old data; all zeroes is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_v4(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        sock.call(libc::SIOCADDRT as _, &mut rt)?;
    }
    Ok(AddressState::Configured)
}

// ---------------------------------------------------------------------------------------
// Reaping
// ---------------------------------------------------------------------------------------

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Exited(i32),
    Signaled(i32),
}

impl ChildExit {
    fn from_status(s: rustix::process::WaitStatus) -> Self {
        match (s.exit_status(), s.terminating_signal()) {
            (Some(code), _) => ChildExit::Exited(code),
            (None, Some(sig)) => ChildExit::Signaled(sig),
            _ => ChildExit::Exited(-1),
        }
    }

    pub fn success(self) -> bool {
        self == ChildExit::Exited(0)
    }
}

impl std::fmt::Display for ChildExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChildExit::Exited(c) => write!(f, "exit status {c}"),
            ChildExit::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// Reaps every exited child of this process for which `keep(pid)` is false, without
/// blocking, and returns them. A kept child (a session child whose status its session task
/// collects) stays a zombie for its owner: the next waitable child is peeked with
/// `waitid(P_ALL, WEXITED|WNOHANG|WNOWAIT)`, and only when that one is kept are the other
/// zombie children found through /proc and reaped one by one.
pub fn reap_children(keep: impl Fn(i32) -> bool) -> Vec<(i32, ChildExit)> {
    let mut reaped = Vec::new();
    // Bounded: each round reaps one child, or ends.
    for _ in 0..100_000 {
        let Some(pid) = peek_exited_child() else { break };
        if keep(pid) {
            for zombie in zombie_children(rustix::process::getpid().as_raw_nonzero().get()) {
                if !keep(zombie) {
                    if let Some(r) = reap_pid(zombie) {
                        reaped.push(r);
                    }
                }
            }
            break;
        }
        match reap_pid(pid) {
            Some(r) => reaped.push(r),
            None => break,
        }
    }
    reaped
}

/// The pid of an exited child that could be reaped now, leaving it waitable.
fn peek_exited_child() -> Option<i32> {
    // SAFETY: siginfo_t is plain old data; all zeroes is valid and means "no child" below.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid with a valid siginfo_t pointer; WNOWAIT leaves the child waitable.
    let rc =
        unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after a successful waitid the pid field is set (0 when no child was waitable).
    let pid = unsafe { info.si_pid() };
    (pid > 0).then_some(pid)
}

fn reap_pid(pid: i32) -> Option<(i32, ChildExit)> {
    let p = Pid::from_raw(pid)?;
    match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
        Ok(Some((_, status))) => Some((pid, ChildExit::from_status(status))),
        _ => None,
    }
}

/// One line of /proc/PID/stat: the fields the supervisor needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
}

/// Parses `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
pub fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let open = line.find(" (")?;
    let close = line.rfind(") ")?;
    let pid = line[..open].trim().parse().ok()?;
    let mut rest = line.get(close + 2..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid })
}

/// Whether /proc is mounted and shows this process's pid namespace.
fn proc_is_ours() -> bool {
    let me = rustix::process::getpid().as_raw_nonzero().get().to_string();
    std::fs::read_link("/proc/self").is_ok_and(|l| l.as_os_str() == me.as_str())
}

/// Every process in /proc; empty when /proc is not this pid namespace's (its pids would
/// name other processes here).
fn process_table() -> Vec<ProcStat> {
    if !proc_is_ours() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_proc_stat(&s))
        .collect()
}

fn zombie_children(me: i32) -> Vec<i32> {
    process_table().into_iter().filter(|p| p.ppid == me && p.state == 'Z').map(|p| p.pid).collect()
}

/// Every descendant of `root` in `table` that is not yet a zombie (children first).
pub fn live_descendants(table: &[ProcStat], root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
    for p in table {
        if p.pid != root {
            children.entry(p.ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut queue = vec![root];
    let mut seen = HashSet::new();
    while let Some(parent) = queue.pop() {
        for child in children.get(&parent).map(Vec::as_slice).unwrap_or(&[]) {
            if seen.insert(child.pid) {
                if child.state != 'Z' {
                    out.push(child.pid);
                }
                queue.push(child.pid);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Supervisor
// ---------------------------------------------------------------------------------------

/// What happens once every process has been stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    /// PID 1: start the server again; otherwise: return.
    Restart,
    PowerOff,
    Reboot,
    Halt,
}

/// The signals the supervisor takes with sigtimedwait (blocked everywhere else in it).
fn supervisor_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain old data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
            libc::sigaddset(&mut set, sig);
        }
    }
    set
}

/// Waits at most `timeout` for one of the supervisor's signals; None on timeout.
fn wait_signal(set: &libc::sigset_t, timeout: Duration) -> Option<i32> {
    // SAFETY: timespec is plain old data; all zeroes is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    ts.tv_sec = timeout.as_secs().min(i32::MAX as u64) as _;
    ts.tv_nsec = timeout.subsec_nanos() as _;
    // SAFETY: valid set and timespec pointers; a null siginfo is allowed.
    let sig = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (sig > 0).then_some(sig)
}

struct Supervisor<F> {
    opts: CpudOptions,
    serve: F,
    pid1: bool,
    me: i32,
    sigset: libc::sigset_t,
    server: Option<(i32, Instant)>,
    restart_at: Option<Instant>,
    backoff: Duration,
    restart_now: bool,
}

/// Keeps `serve(opts)` running in a child process, reaps every orphan, and handles the init
/// signals (see the module documentation). Must be called while the process has a single
/// thread (it blocks signals and forks). As PID 1 it never returns; otherwise it returns
/// `Ok(())` after SIGTERM/SIGINT (or a power request) has stopped every descendant.
pub fn supervise(opts: CpudOptions, serve: impl Fn(CpudOptions) -> Result<()>) -> Result<()> {
    let pid1 = is_pid1();
    if !pid1 {
        rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
            .map_err(|e| Error::Daemon(format!("init: cannot become a child subreaper: {e}")))?;
    }
    let sigset = supervisor_sigset();
    // SAFETY: blocks the supervisor's signals in this (single) thread; sigtimedwait takes them.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &sigset, std::ptr::null_mut()) } != 0 {
        return Err(Error::Daemon(format!("init: sigprocmask: {}", std::io::Error::last_os_error())));
    }
    let mut s = Supervisor {
        opts,
        serve,
        pid1,
        me: rustix::process::getpid().as_raw_nonzero().get(),
        sigset,
        server: None,
        restart_at: Some(Instant::now()),
        backoff: FIRST_BACKOFF,
        restart_now: false,
    };
    s.run()
}

impl<F: Fn(CpudOptions) -> Result<()>> Supervisor<F> {
    fn run(&mut self) -> Result<()> {
        loop {
            if self.server.is_none() && self.restart_at.is_some_and(|t| Instant::now() >= t) {
                self.start_server();
            }
            let timeout = match (self.server, self.restart_at) {
                (None, Some(t)) => t.saturating_duration_since(Instant::now()),
                _ => IDLE_WAKE,
            };
            let sig = wait_signal(&self.sigset, timeout);
            let server_finished = self.reap();
            let finish = server_finished.or(match sig {
                Some(libc::SIGTERM) | Some(libc::SIGINT) => {
                    log::info!("init: {} received: stopping", signal_name(sig.unwrap_or(0)));
                    Some(self.requested_finish())
                }
                Some(libc::SIGUSR2) => Some(Finish::PowerOff),
                Some(libc::SIGUSR1) => Some(Finish::Halt),
                Some(libc::SIGHUP) => {
                    if let Some((pid, _)) = self.server {
                        log::info!("init: SIGHUP: restarting the server");
                        self.restart_now = true;
                        kill(pid, Signal::HUP);
                    }
                    None
                }
                _ => None,
            });
            if let Some(finish) = finish {
                if self.shutdown(finish) {
                    return Ok(());
                }
            }
        }
    }

    /// What the flags ask for on SIGTERM/SIGINT or when the server ends by itself.
    fn requested_finish(&self) -> Finish {
        if self.opts.poweroff {
            Finish::PowerOff
        } else if self.opts.reboot {
            Finish::Reboot
        } else {
            Finish::Restart
        }
    }

    fn start_server(&mut self) {
        self.restart_at = None;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: the supervisor is single-threaded (documented precondition of supervise), so
        // the child may keep running Rust code after fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            self.schedule_restart(&format!("cannot fork the server: {e}"));
            return;
        }
        if pid == 0 {
            self.server_child();
        }
        log::info!("init: server started (pid {pid})");
        if self.pid1 {
            let _ = std::fs::write(SERVER_PID_FILE, format!("{pid}\n"));
        }
        self.server = Some((pid, Instant::now()));
    }

    /// In the forked child: undo the supervisor's signal set-up and run the server.
    fn server_child(&self) -> ! {
        // SAFETY: unblocks every signal in this thread; empty is a valid set.
        unsafe {
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        }
        if !self.pid1 {
            // A supervisor killed outright takes its server along.
            let _ = rustix::process::set_parent_process_death_signal(Some(Signal::TERM));
            if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(self.me) {
                std::process::exit(1);
            }
        }
        let code = match (self.serve)(self.opts.clone()) {
            Ok(()) => 0,
            Err(e) => {
                log::error!("{e}");
                e.exit_code()
            }
        };
        std::process::exit(code)
    }

    fn schedule_restart(&mut self, why: &str) {
        let pause = if self.restart_now { Duration::ZERO } else { self.backoff };
        if self.restart_now {
            log::info!("init: {why}; restarting it now (SIGHUP)");
        } else {
            log::error!("init: {why}; restarting it in {}s", pause.as_secs());
        }
        self.restart_now = false;
        self.restart_at = Some(Instant::now() + pause);
        if !pause.is_zero() {
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Reaps every exited child; notices the server's end. Returns what to do when the server
    /// stopped for good (status 0) and `-poweroff`/`-reboot` says what follows.
    fn reap(&mut self) -> Option<Finish> {
        let mut finish = None;
        for (pid, exit) in reap_children(is_session_child) {
            match self.server {
                Some((server, started)) if server == pid => {
                    self.server = None;
                    let ran = started.elapsed();
                    if ran >= HEALTHY_RUN {
                        self.backoff = FIRST_BACKOFF;
                    }
                    if exit.success() && !self.restart_now && self.requested_finish() != Finish::Restart {
                        // The server stopped for good and a flag says what to do then.
                        log::info!("init: server finished");
                        self.restart_at = None;
                        finish = Some(self.requested_finish());
                        continue;
                    }
                    self.schedule_restart(&format!(
                        "server (pid {pid}) ended: {exit} after {}s",
                        ran.as_secs()
                    ));
                }
                _ => log::debug!("init: reaped {pid}: {exit}"),
            }
        }
        finish
    }

    /// Waits up to `limit` (in short sigtimedwait naps, reaping) until `done` holds.
    fn wait_until(&mut self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            self.reap_quietly();
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Other signals arriving now are dropped: we are already stopping.
            let _ = wait_signal(&self.sigset, left.min(Duration::from_millis(100)));
        }
    }

    /// Reaping during shutdown: the server's end is expected, not restarted.
    fn reap_quietly(&mut self) {
        for (pid, exit) in reap_children(is_session_child) {
            if self.server.is_some_and(|(s, _)| s == pid) {
                log::info!("init: server (pid {pid}) stopped: {exit}");
                self.server = None;
            }
        }
    }

    /// Stops the server and every other descendant, syncs, then does `finish`. Returns true
    /// when the caller should return (not PID 1 and no power action was possible).
    fn shutdown(&mut self, finish: Finish) -> bool {
        if let Some((pid, _)) = self.server {
            kill(pid, Signal::TERM);
            if !self.wait_until(SERVER_GRACE, |s| s.server.is_none()) {
                log::warn!("init: server did not stop within {}s", SERVER_GRACE.as_secs());
            }
        }
        let me = self.me;
        let remaining = || live_descendants(&process_table(), me);
        let others = remaining();
        if !others.is_empty() {
            log::info!("init: sending SIGTERM to {} processes", others.len());
            others.iter().for_each(|&p| kill(p, Signal::TERM));
            if !self.wait_until(PROCESS_GRACE, |_| remaining().is_empty()) {
                let left = remaining();
                log::warn!("init: sending SIGKILL to {} processes", left.len());
                left.iter().for_each(|&p| kill(p, Signal::KILL));
                self.wait_until(Duration::from_secs(2), |_| remaining().is_empty());
            }
        }
        self.server = None;
        rustix::fs::sync();
        let command = match finish {
            Finish::Restart => {
                if self.pid1 {
                    log::info!("init: all processes stopped; restarting the server");
                    self.backoff = FIRST_BACKOFF;
                    self.restart_at = Some(Instant::now());
                    return false;
                }
                log::info!("init: all processes stopped");
                return true;
            }
            Finish::PowerOff => rustix::system::RebootCommand::PowerOff,
            Finish::Reboot => rustix::system::RebootCommand::Restart,
            Finish::Halt => rustix::system::RebootCommand::Halt,
        };
        if !self.pid1 {
            log::info!("init: not PID 1: {finish:?} requested, stopping the supervisor only");
            return true;
        }
        log::info!("init: {}", format!("{finish:?}").to_lowercase());
        let _ = std::io::stderr().flush();
        if let Err(e) = rustix::system::reboot(command) {
            log::error!("init: reboot(2) failed: {e}; restarting the server");
        }
        self.restart_at = Some(Instant::now());
        false
    }
}

fn kill(pid: i32, sig: Signal) {
    if let Some(p) = Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGHUP => "SIGHUP",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_mount_points_with_escapes() {
        let text = "22 1 0:21 / / rw,relatime shared:1 - rootfs rootfs rw\n\
                    23 22 0:5 / /dev rw,nosuid - devtmpfs dev rw,mode=755\n\
                    40 22 0:40 / /mnt/with\\040space rw - tmpfs tmp rw\n\
                    41 22 0:41 / /back\\134slash rw - tmpfs tmp rw\n";
        assert_eq!(parse_mountinfo(text), vec!["/", "/dev", "/mnt/with space", "/back\\slash"]);
    }

    #[test]
    fn mountinfo_tolerates_garbage() {
        assert_eq!(parse_mountinfo("short line\n\n"), Vec::<String>::new());
        assert_eq!(unescape_octal("a\\04"), "a\\04");
        assert_eq!(unescape_octal("\\999"), "\\999");
    }

    #[test]
    fn proc_stat_with_odd_comm() {
        let s = "1234 (a) b (c) S 77 1234 1234 0 -1 4194560 1 0 0 0";
        assert_eq!(parse_proc_stat(s), Some(ProcStat { pid: 1234, state: 'S', ppid: 77 }));
        assert_eq!(parse_proc_stat("7 (sh) Z 1 7"), Some(ProcStat { pid: 7, state: 'Z', ppid: 1 }));
        assert_eq!(parse_proc_stat("garbage"), None);
        assert_eq!(parse_proc_stat("x (y) S z"), None);
    }

    #[test]
    fn descendants_skip_zombies_and_strangers() {
        let p = |pid, state, ppid| ProcStat { pid, state, ppid };
        let table =
            [p(1, 'S', 0), p(2, 'S', 0), p(10, 'S', 1), p(11, 'Z', 10), p(12, 'S', 11), p(20, 'S', 2)];
        let mut d = live_descendants(&table, 1);
        d.sort();
        assert_eq!(d, vec![10, 12]);
        assert_eq!(live_descendants(&table, 20), Vec::<i32>::new());
    }

    #[test]
    fn flags_file_lines() {
        let words = parse_flags_file("# boot flags\n-d\n\n  -klog  \n-sp=2222\n");
        assert_eq!(words, vec!["-d", "-klog", "-sp=2222"]);
    }

    #[test]
    fn boot_options_defaults_and_fallback() {
        let dir = std::env::temp_dir().join(format!("init-flags-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "-d\n-poweroff\n").unwrap();
        let o = boot_options(&good).unwrap();
        assert!(o.init && o.debug && o.poweroff);
        assert_eq!(o.authorized_keys, BOOT_AUTHORIZED_KEYS);
        assert_eq!(o.host_key, BOOT_HOST_KEY);
        let bad = dir.join("bad");
        std::fs::write(&bad, "-nosuchflag\n").unwrap();
        let o = boot_options(&bad).unwrap();
        assert!(o.init && !o.debug);
        assert_eq!(o.authorized_keys, BOOT_AUTHORIZED_KEYS);
        let o = boot_options(&dir.join("missing")).unwrap();
        assert!(o.init);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn modules_file_lines() {
        let m = parse_modules_file("# deps first\nkernel/net/9p/9pnet.ko\n/abs/9p.ko  debug=1 x=2\n");
        assert_eq!(
            m,
            vec![
                ModuleLine { path: "kernel/net/9p/9pnet.ko".into(), params: String::new() },
                ModuleLine { path: "/abs/9p.ko".into(), params: "debug=1 x=2".into() },
            ]
        );
        assert_eq!(module_file("/abs/x.ko", "6.1.0"), PathBuf::from("/abs/x.ko"));
    }

    #[test]
    fn static_ip_argument() {
        let ip =
            parse_ip_arg("console=ttyS0 ip=10.0.2.15::10.0.2.2:255.255.255.0:board:eth0:off quiet").unwrap();
        assert_eq!(ip.address, std::net::Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(ip.gateway, Some(std::net::Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(ip.netmask, std::net::Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!((ip.hostname.as_str(), ip.device.as_str()), ("board", "eth0"));
        let ip = parse_ip_arg("ip=192.168.1.9").unwrap();
        assert_eq!((ip.gateway, ip.netmask.octets(), ip.device.as_str()), (None, [255, 255, 255, 0], ""));
        assert_eq!(parse_ip_arg("ip=dhcp"), None);
        assert_eq!(parse_ip_arg("ip=10.0.0.2:::::eth0:dhcp"), None);
        assert_eq!(parse_ip_arg("quiet"), None);
    }

    #[test]
    fn child_exit_display() {
        assert_eq!(ChildExit::Exited(3).to_string(), "exit status 3");
        assert_eq!(ChildExit::Signaled(9).to_string(), "killed by signal 9");
        assert!(ChildExit::Exited(0).success());
    }
}

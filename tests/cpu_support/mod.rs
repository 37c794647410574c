//! Helpers for the `cpu` client tests: an OpenSSH sshd on a loopback port with its own
//! config, a per-test HOME with keys and ssh config, running the real `cpu-all cpu` binary with
//! a timeout, and driving it through a pseudo-terminal.
#![allow(dead_code)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "../common/child.rs"]
mod child;
#[path = "../common/keys_and_ports.rs"]
mod keys_and_ports;
#[path = "../common/temp_dir.rs"]
mod temp_dir;

#[allow(unused_imports)] // each test crate uses a different subset
pub use child::{text, wait_or_kill, wait_until};
pub use temp_dir::TempDir;

/// The binary under test: `CPU_TEST_BIN` if set (a copy, when several worktrees share one
/// target directory and may overwrite each other's build), else the one cargo built.
pub fn bin() -> std::ffi::OsString {
    std::env::var_os("CPU_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_cpu-all").into())
}
/// Every child gets at most this long.
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the sshd tests cannot run here, or None if they can.
pub fn sshd_skip_reason() -> Option<String> {
    if !Path::new("/usr/sbin/sshd").exists() {
        return Some("/usr/sbin/sshd is missing (apt-get install openssh-server)".into());
    }
    if !Path::new("/usr/bin/ssh-keygen").exists() {
        return Some("ssh-keygen is missing".into());
    }
    if rustix::process::geteuid().as_raw() != 0 {
        return Some("sshd needs root to run".into());
    }
    None
}

/// Skips the calling test with a clear message when sshd cannot run (the test crate declares
/// `#[path = "common/skip.rs"] mod skip;`).
#[macro_export]
macro_rules! need_sshd {
    () => {
        if let Some(why) = cpu_support::sshd_skip_reason() {
            $crate::skip::here(&why);
            return;
        }
    };
}

/// A helper process killed (by its pid) when the test ends, even if it fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a helper command (ssh-keygen, ssh-add) with stdin closed and the usual timeout.
pub fn status_of(cmd: &mut Command) -> std::process::ExitStatus {
    let mut child = cmd.stdin(Stdio::null()).spawn().unwrap();
    match child::wait_or_kill(&mut child, CHILD_TIMEOUT) {
        Some(st) => st,
        None => child.wait().unwrap(),
    }
}

/// Generates an ed25519 key pair at `path` (and `path.pub`); returns the public line.
pub fn keygen(path: &Path) -> String {
    let st = status_of(&mut keys_and_ports::keygen_command(path, "ed25519", "test"));
    assert!(st.success(), "ssh-keygen failed");
    std::fs::read_to_string(path.with_extension("pub")).unwrap().trim().to_string()
}

/// `type base64` of a public key line.
pub fn key_part(pub_line: &str) -> String {
    pub_line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

/// An OpenSSH sshd on 127.0.0.1, killed on drop.
pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: TempDir,
    /// The host public key line.
    pub host_pub: String,
    pub log: PathBuf,
}

impl Sshd {
    /// Starts sshd accepting `authorized` keys, with `extra` config lines.
    pub fn start(authorized: &[&str], extra: &str) -> Sshd {
        let mut dir = TempDir::new("sshd");
        let host_pub = keygen(&dir.path().join("hostkey"));
        std::fs::write(dir.path().join("authorized"), authorized.join("\n") + "\n").unwrap();
        let _ = std::fs::create_dir_all("/run/sshd");
        for _attempt in 0..5 {
            let port = keys_and_ports::free_loopback_port();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized\n\
                 PermitRootLogin yes\nUsePAM no\nStrictModes no\nPidFile none\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nAcceptEnv CPU_TEST_VAR CPUNONCE CPU_FSTAB CPU_MSIZE CPU_MOUNTOPTS LC_*\n\
                 LogLevel VERBOSE\n{extra}\n",
                d = dir.path().display()
            );
            let cfg = dir.path().join("sshd_config");
            std::fs::write(&cfg, config).unwrap();
            let log = dir.path().join("sshd.log");
            let child = Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let mut sshd = Sshd { child, port, dir, host_pub: host_pub.clone(), log };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                let text = std::fs::read_to_string(&sshd.log).unwrap_or_default();
                if text.contains("Server listening") {
                    return sshd;
                }
                if let Ok(Some(_)) = sshd.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let text = std::fs::read_to_string(&sshd.log).unwrap_or_default();
            eprintln!("sshd did not start on port {port}: {text}");
            let _ = sshd.child.kill();
            let _ = sshd.child.wait();
            dir = std::mem::replace(&mut sshd.dir, TempDir::new("unused"));
        }
        panic!("sshd would not start");
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client HOME with ~/.ssh/id_ed25519 and a config that keeps known_hosts plain.
pub struct Home {
    pub dir: TempDir,
    pub key_pub: String,
}

impl Home {
    pub fn new() -> Home {
        let dir = TempDir::new("home");
        std::fs::create_dir_all(dir.path().join(".ssh")).unwrap();
        let key_pub = keygen(&dir.path().join(".ssh/id_ed25519"));
        std::fs::write(dir.path().join(".ssh/config"), "Host *\n  HashKnownHosts no\n").unwrap();
        Home { dir, key_pub }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn ssh(&self, name: &str) -> PathBuf {
        self.dir.path().join(".ssh").join(name)
    }
    pub fn known_hosts(&self) -> String {
        std::fs::read_to_string(self.ssh("known_hosts")).unwrap_or_default()
    }
}

/// A `cpu-all cpu ARGS` command with HOME set, no agent, and a clean TERM.
pub fn cpu_command(home: &Home, args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("cpu").args(args);
    c.env("HOME", home.path()).env("USER", "root").env_remove("SSH_AUTH_SOCK").env_remove("RUST_LOG");
    c
}

/// Runs `cpu` with `stdin` bytes (or /dev/null) and a timeout; returns its output.
pub fn run_cpu(home: &Home, args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_with_input(cpu_command(home, args), stdin)
}

/// Runs `c` with `stdin` bytes (or /dev/null), its output piped, and the usual timeout.
pub fn run_with_input(mut c: Command, stdin: Option<&[u8]>) -> Output {
    c.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Not joined: a child that stops reading must not hold up the test.
    let _writer = child::feed_stdin(&mut child, stdin.map(<[u8]>::to_vec));
    wait_output(child, CHILD_TIMEOUT)
}

/// Collects a child's stdout/stderr, killing it after `timeout`.
pub fn wait_output(child: Child, timeout: Duration) -> Output {
    let (output, killed) = child::output_or_kill(child, timeout);
    if killed {
        eprintln!("child killed after {timeout:?}");
    }
    output
}

/// The remote command of a terminal session check: says its TERM and window size, then the
/// size again on every SIGWINCH, until it is killed.
pub const TERMINAL_SCRIPT: &str =
    "echo TERM=$TERM; stty size; trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done";

/// Drives a `cpu ... sh -c TERMINAL_SCRIPT` session started with TERM=xterm-cputest on a
/// 33x111 pty: TERM and the size arrive, a resize to 44x122 is seen, `~.` ends the session
/// with 255 and "closed (~.)", and the terminal is back in cooked mode.
pub fn check_terminal_session(pty: &mut PtyChild) {
    let t = Duration::from_secs(15);
    assert!(pty.expect("ready", t), "no start: {:?}", text(&pty.seen));
    let seen = text(&pty.seen);
    assert!(seen.contains("TERM=xterm-cputest\r\n"), "{seen:?}");
    assert!(seen.contains("33 111\r\n"), "{seen:?}");
    pty.resize(44, 122);
    assert!(pty.expect("44 122", t), "resize not seen: {:?}", text(&pty.seen));
    pty.write(b"\r~.");
    assert_eq!(pty.wait(t), Some(255), "{:?}", text(&pty.seen));
    assert!(text(&pty.seen).contains("closed (~.)"));
    // Raw mode was undone.
    assert!(pty.is_cooked(), "raw mode left on");
}

/// A child running on a pseudo-terminal we hold the master side of.
pub struct PtyChild {
    pub child: Child,
    pub master: OwnedFd,
    /// Our own handle on the terminal, to look at its modes after the child is gone.
    pub slave: std::fs::File,
    pub seen: Vec<u8>,
}

impl PtyChild {
    /// Spawns `cmd` with a new session whose controlling terminal is a fresh pty of
    /// `rows`x`cols`.
    pub fn spawn(mut cmd: Command, rows: u16, cols: u16) -> PtyChild {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        set_size(&master, rows, cols);
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(name.to_str().unwrap()).unwrap();
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap());
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::setsid().map_err(std::io::Error::from)?;
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin()).map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        rustix::fs::fcntl_setfl(&master, rustix::fs::OFlags::NONBLOCK).unwrap();
        PtyChild { child, master, slave, seen: Vec::new() }
    }

    /// Reads what the child printed until `want` shows up or `timeout` passes; true if seen.
    pub fn expect(&mut self, want: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if String::from_utf8_lossy(&self.seen).contains(want) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            let mut buf = [0u8; 4096];
            match rustix::io::read(&self.master, &mut buf) {
                Ok(0) => std::thread::sleep(Duration::from_millis(10)),
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
                Err(rustix::io::Errno::AGAIN) => std::thread::sleep(Duration::from_millis(10)),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    pub fn write(&self, bytes: &[u8]) {
        rustix::io::write(&self.master, bytes).unwrap();
    }

    /// Resizes the terminal and sends SIGWINCH to the child, as a terminal emulator does.
    pub fn resize(&self, rows: u16, cols: u16) {
        set_size(&self.master, rows, cols);
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::WINCH).unwrap();
    }

    /// Waits for the exit status (killing the child after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Collect what it printed last (bounded: the pty buffer is finite).
                let mut buf = [0u8; 4096];
                for _ in 0..1000 {
                    match rustix::io::read(&self.master, &mut buf) {
                        Ok(n) if n > 0 => self.seen.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            // Keep the pty drained so the child never blocks writing.
            let mut buf = [0u8; 4096];
            if let Ok(n) = rustix::io::read(&self.master, &mut buf) {
                self.seen.extend_from_slice(&buf[..n]);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn raw_fd(&self) -> i32 {
        self.master.as_raw_fd()
    }

    /// Whether the terminal is back in cooked mode (line editing and echo on).
    pub fn is_cooked(&self) -> bool {
        use rustix::termios::LocalModes;
        let tio = rustix::termios::tcgetattr(&self.slave).unwrap();
        tio.local_modes.contains(LocalModes::ICANON | LocalModes::ECHO)
    }
}

impl Drop for PtyChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_size<Fd: AsFd>(fd: Fd, rows: u16, cols: u16) {
    let ws = rustix::termios::Winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(fd, ws).unwrap();
}

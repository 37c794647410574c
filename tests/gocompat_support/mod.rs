//! Helpers for the Go wire-compatibility tests: building our small Go peers (tests/gocompat/,
//! against Debian's x/crypto/ssh and gliderlabs/ssh sources, offline in GOPATH mode, once per
//! test binary), keys, our cpud and the Go-style gocpud as killed-on-drop children, and runs
//! of any child with a timeout.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[path = "../common/child.rs"]
mod child;
#[path = "../common/keys_and_ports.rs"]
mod keys_and_ports;
#[path = "../common/temp_dir.rs"]
mod temp_dir;

pub use child::text;
pub use temp_dir::TempDir;

/// The binary under test (`CPU_TEST_BIN` overrides, for a shared target directory).
pub fn bin() -> std::ffi::OsString {
    std::env::var_os("CPU_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_cpu-all").into())
}
/// Upper bound for any child of a test.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for building one Go program (cold cache on a slow machine).
pub const GO_BUILD_TIMEOUT: Duration = Duration::from_secs(300);
/// Where Debian installs Go library sources (GOPATH layout).
pub const DEBIAN_GOCODE: &str = "/usr/share/gocode";
/// PATH for every child: no user directories, so runs are reproducible.
pub const PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin";

/// The built Go peers.
pub struct GoPrograms {
    /// A client in the style of the Go cpu client (x/crypto/ssh).
    pub gocpu: PathBuf,
    /// A server in the style of the Go cpud (gliderlabs/ssh).
    pub gocpud: PathBuf,
}

/// Builds the Go programs once; Err is the reason the tests must skip (no Go toolchain or no
/// Debian Go packages). A build failure with everything present is a test failure (panic).
pub fn go_programs() -> Result<&'static GoPrograms, String> {
    static BUILT: OnceLock<Result<GoPrograms, String>> = OnceLock::new();
    BUILT.get_or_init(build_go_programs).as_ref().map_err(Clone::clone)
}

fn build_go_programs() -> Result<GoPrograms, String> {
    // `go` from the caller's PATH (a toolchain may live outside the system directories).
    let version = Command::new("go").arg("version").stdin(Stdio::null()).output();
    match version {
        Ok(out) if out.status.success() => {}
        _ => return Err("`go` is not installed (apt-get install golang-go)".into()),
    }
    for (dir, package) in [
        ("golang.org/x/crypto/ssh", "golang-golang-x-crypto-dev"),
        ("github.com/gliderlabs/ssh", "golang-github-gliderlabs-ssh-dev"),
    ] {
        if !Path::new(DEBIAN_GOCODE).join("src").join(dir).is_dir() {
            return Err(format!("{DEBIAN_GOCODE}/src/{dir} is missing (apt-get install {package})"));
        }
    }
    // Build outputs and Go's cache live under cargo's scratch directory, never in the tree.
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gocompat");
    let own_gopath = out_dir.join("gopath");
    std::fs::create_dir_all(&own_gopath).unwrap();
    let mut built = Vec::new();
    for name in ["gocpu", "gocpud"] {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gocompat").join(name);
        let partial = out_dir.join(format!("{name}.{}", std::process::id()));
        let mut cmd = Command::new("go");
        cmd.arg("build")
            .arg("-o")
            .arg(&partial)
            .arg(".")
            .current_dir(&source)
            .env("GO111MODULE", "off")
            .env("GOFLAGS", "")
            .env("GOPATH", format!("{DEBIAN_GOCODE}:{}", own_gopath.display()))
            .env("GOCACHE", out_dir.join("gocache"))
            .env("HOME", &out_dir);
        let out = run(cmd, None, GO_BUILD_TIMEOUT);
        assert!(
            out.status.success(),
            "go build of {name} failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let done = out_dir.join(name);
        std::fs::rename(&partial, &done).unwrap();
        built.push(done);
    }
    let gocpud = built.pop().unwrap();
    let gocpu = built.pop().unwrap();
    Ok(GoPrograms { gocpu, gocpud })
}

/// Skips the calling test with a clear message when the Go peers cannot be built here (the
/// test crate declares `#[path = "common/skip.rs"] mod skip;`).
#[macro_export]
macro_rules! need_go {
    () => {
        match gocompat_support::go_programs() {
            Ok(go) => go,
            Err(why) => {
                $crate::skip::here(&why);
                return;
            }
        }
    };
}

/// Runs `cmd` feeding `stdin` (or /dev/null); kills it and panics after `timeout`.
pub fn run(mut cmd: Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let writer = child::feed_stdin(&mut child, stdin.map(<[u8]>::to_vec));
    let readers = child::OutputReaders::start(&mut child);
    let Some(status) = child::wait_or_kill(&mut child, timeout) else {
        panic!("{cmd:?} did not finish within {timeout:?}");
    };
    let _ = writer.join();
    readers.finish(status)
}

/// Makes a key pair with ssh-keygen (`kind`: ed25519 or rsa); returns the private key path.
pub fn keygen(dir: &TempDir, name: &str, kind: &str) -> PathBuf {
    let path = dir.join(name);
    let out = run(keys_and_ports::keygen_command(&path, kind, "gocompat"), None, TIMEOUT);
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    path
}

/// The `.pub` file next to a private key.
pub fn public(private: &Path) -> PathBuf {
    private.with_extension("pub")
}

/// A daemon child, killed (by its own handle) on drop.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why cpud cannot be run with a /proc/filesystems that lists 9p, or None if it can.
pub fn claim_9p_skip_reason() -> Option<String> {
    if rustix::process::geteuid().as_raw() != 0 {
        return Some("needs root for a private mount namespace".into());
    }
    for tool in ["/usr/bin/unshare", "/usr/bin/mount"] {
        if !Path::new(tool).exists() {
            return Some(format!("{tool} is missing (util-linux, mount)"));
        }
    }
    None
}

/// Starts our `cpud` on 127.0.0.1 with the given authorized keys and host key.
pub fn start_cpud(dir: &TempDir, authorized: &Path, host_key: &Path) -> Daemon {
    start_cpud_with(dir, authorized, host_key, false)
}

/// Like [`start_cpud`]; with `claim_9p` the daemon runs in its own mount namespace where
/// /proc/filesystems also lists 9p, so `cpud -remote` goes on to dial the 9P back-channel on
/// a kernel without 9p (the mount itself then fails). Needs [`claim_9p_skip_reason`] None.
pub fn start_cpud_with(dir: &TempDir, authorized: &Path, host_key: &Path, claim_9p: bool) -> Daemon {
    let log = dir.join("cpud.log");
    let fake = dir.join("filesystems");
    if claim_9p {
        let real = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        std::fs::write(&fake, real + "nodev\t9p\n").unwrap();
    }
    for _attempt in 0..5 {
        let port = keys_and_ports::free_loopback_port();
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = if claim_9p {
            let mut c = Command::new("/usr/bin/unshare");
            c.args(["-m", "--propagation", "private", "/bin/sh", "-c"])
                .arg("/usr/bin/mount --bind \"$0\" /proc/filesystems && exec \"$@\"")
                .arg(&fake)
                .arg(bin());
            c
        } else {
            Command::new(bin())
        };
        let child = cmd
            .arg("cpud")
            .arg("-pk")
            .arg(authorized)
            .arg("-hk")
            .arg(host_key)
            .args(["-sp", &port.to_string(), "-listen", "127.0.0.1"])
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut daemon = Daemon { child, port, log: log.clone() };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&log).unwrap_or_default().contains("Listening on") {
                return daemon;
            }
            if let Ok(Some(_)) = daemon.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("cpud did not start on {port}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    panic!("cpud would not start");
}

/// Starts gocpud on 127.0.0.1:0 accepting the first key of `authorized`; facts go to `report`.
pub fn start_gocpud(go: &GoPrograms, authorized: &Path, report: &Path) -> Daemon {
    let log = report.with_extension("stderr");
    let mut child = Command::new(&go.gocpud)
        .arg("-pk")
        .arg(authorized)
        .arg("-report")
        .arg(report)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
    let port = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok());
    let mut daemon = Daemon { child, port: 0, log };
    match port {
        Some(port) => daemon.port = port,
        None => panic!(
            "gocpud did not start: {line:?} {}",
            std::fs::read_to_string(&daemon.log).unwrap_or_default()
        ),
    }
    daemon
}

/// The key=value facts a Go peer wrote, one per line.
pub fn report(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// The value of `key=` in a gocpu report.
pub fn fact(lines: &[String], key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    lines.iter().find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

/// Polls `path` until a line satisfies `want` (bounded by `timeout`).
pub fn wait_for_line(path: &Path, timeout: Duration, want: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if report(path).iter().any(|l| want(l)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

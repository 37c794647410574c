//! Test helpers for the discovery tests: a small lab of network namespaces joined by a
//! bridge (all created and deleted by name here, never touching the host's interfaces),
//! and child processes run inside them with their output collected line by line.
//!
//! Children are this test binary itself, re-run with `DISCOVERY_HELPER` naming a helper
//! mode; every child is killed (by its own handle) when dropped, and every wait is bounded.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use cpu_all::discovery::run_decpu_with;
use cpu_all::error::Error;
use cpu_all::options::CpuOptions;

#[path = "../common/child.rs"]
mod child;

use child::lines_of;

/// Environment variable that turns the test binary into a helper.
pub const HELPER_ENV: &str = "DISCOVERY_HELPER";

/// Why a lab cannot be built here (not root, no `ip`, no netns support), or None.
pub fn lab_unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("needs root to create network namespaces".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the ip command (iproute2) is missing".into()),
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Namespaces `<prefix>-hub` (a bridge) and `<prefix>-N` (eth0 = 10.200.0.N/24 on the bridge).
pub struct Lab {
    prefix: String,
    nodes: usize,
}

impl Lab {
    /// Builds a lab with `nodes` namespaces; `tag` keeps parallel tests apart.
    pub fn new(tag: &str, nodes: usize) -> Result<Lab, String> {
        let prefix = format!("dnssd-lab-{}-{tag}", std::process::id());
        let lab = Lab { prefix, nodes: 0 };
        let hub = lab.hub();
        ip(&["netns", "add", &hub])?;
        let mut lab = lab;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        // Without snooping the bridge floods multicast: no IGMP querier needed.
        ip(&["-n", &hub, "link", "set", "br0", "type", "bridge", "mcast_snooping", "0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for n in 1..=nodes {
            let ns = lab.ns(n);
            ip(&["netns", "add", &ns])?;
            lab.nodes = n;
            let port = format!("p{n}");
            ip(&["-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", Lab::addr(n)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "multicast", "on", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }

    /// The namespace name of node `n` (1-based).
    pub fn ns(&self, n: usize) -> String {
        format!("{}-{n}", self.prefix)
    }

    /// The IPv4 address of node `n`.
    pub fn addr(n: usize) -> String {
        format!("10.200.0.{n}")
    }

    /// The host name helpers in node `n` see (each runs in its own UTS namespace, so the
    /// SRV targets differ as they would on separate machines).
    pub fn hostname(n: usize) -> String {
        format!("node{n}")
    }

    /// Runs this test binary's `helper` test inside node `n` with `mode` and extra env.
    pub fn helper(&self, n: usize, mode: &str, env: &[(&str, &str)]) -> Helper {
        let exe = std::env::current_exe().unwrap_or_default();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns(n),
            "unshare",
            "--uts",
            "sh",
            "-c",
            "hostname \"$0\" && exec \"$@\"",
        ])
        .arg(Lab::hostname(n))
        .arg(exe)
        .args(["--exact", "helper", "--nocapture", "--test-threads=1", "--quiet"])
        .env(HELPER_ENV, mode)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        Helper::spawn(cmd, &format!("{mode}@{n}"))
    }

    /// Starts a shell script inside node `n` with stdin, stdout and stderr piped.
    pub fn sh(&self, n: usize, script: &str) -> Helper {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(n), "sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Helper::spawn(cmd, &format!("sh@{n}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in 1..=self.nodes {
            let _ = ip(&["netns", "del", &self.ns(n)]);
        }
        let _ = ip(&["netns", "del", &self.hub()]);
    }
}

/// A child process with its stdout and stderr read into channels of lines.
pub struct Helper {
    name: String,
    child: Child,
    /// Whether the child ends when its stdin closes (the helper modes and scripts here do);
    /// one that does not (the real applet) gets SIGTERM when dropped.
    ends_on_stdin_close: bool,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    seen_stdout: Vec<String>,
    seen_stderr: Vec<String>,
}

impl Helper {
    /// Starts `cmd` with its stdout and stderr read line by line.
    pub fn spawn(mut cmd: Command, name: &str) -> Helper {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        let stdin = child.stdin.take();
        Helper {
            name: name.to_string(),
            child,
            ends_on_stdin_close: true,
            stdin,
            stdout,
            stderr,
            seen_stdout: Vec::new(),
            seen_stderr: Vec::new(),
        }
    }

    /// Waits for a stdout line starting with `prefix`; returns it (None on timeout or exit).
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.seen_stdout.push(line.clone());
                    if line.starts_with(prefix) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Waits for a stderr line containing `text`; returns it (None on timeout or exit). The
    /// lines read meanwhile are kept for [`Helper::stderr_seen`].
    pub fn wait_err_line(&mut self, text: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen_stderr.push(line.clone());
                    if line.contains(text) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Stderr lines read by [`Helper::wait_err_line`] plus whatever arrives within `limit`.
    pub fn stderr_seen(&mut self, limit: Duration) -> String {
        let more = self.stderr_text(limit);
        let mut all = self.seen_stderr.join("\n");
        if !more.is_empty() {
            all.push('\n');
            all.push_str(&more);
        }
        all
    }

    /// Sends one line to the child's stdin.
    pub fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// Closes stdin (helpers treat that as "stop").
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `limit` for exit; kills the child if it is still running.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let status = child::wait_or_kill(&mut self.child, limit);
        if status.is_none() {
            eprintln!("{}: killed after {limit:?}", self.name);
        }
        status.and_then(|s| s.code())
    }

    /// The end of a `decpu` helper run: asserts it exited 0 within `limit`, and returns its
    /// result lines (connect, refused, status, error) and its stderr.
    pub fn decpu_result(&mut self, limit: Duration) -> (Vec<String>, String) {
        let status = self.wait(limit);
        let out = self.stdout_text(Duration::from_secs(1));
        let err = self.stderr_text(Duration::from_secs(1));
        assert_eq!(status, Some(0), "decpu helper failed: {out}\n{err}");
        let lines = out
            .lines()
            .filter(|l| ["connect ", "refused ", "status ", "error "].iter().any(|p| l.starts_with(p)))
            .map(str::to_string)
            .collect();
        (lines, err)
    }

    /// All stdout lines seen so far plus whatever arrives within `limit`.
    pub fn stdout_text(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while let Ok(line) = self.stdout.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.seen_stdout.push(line);
        }
        self.seen_stdout.join("\n")
    }

    /// Stderr lines that arrive within `limit` (after exit: all of them).
    pub fn stderr_text(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            out.push(line);
        }
        out.join("\n")
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.stdin = None;
        if let Ok(None) = self.child.try_wait() {
            if !self.ends_on_stdin_close {
                // Our own child, by its PID (`ip netns exec`, `nsenter`, `unshare` and `sh -c
                // exec` all exec: the PID is the program's).
                if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
            }
            // Give a helper time to say goodbye and reap its children after stdin closed
            // (a running `timeout 10 avahi-browse` included), then kill it.
            let _ = child::wait_or_kill(&mut self.child, Duration::from_secs(12));
        }
    }
}

/// How a child enters a namespace: `ip netns exec` (which also remounts /sys for it) or
/// `nsenter --net` alone (the caller's /sys stays: it shows the host's interfaces).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Enter {
    IpNetnsExec,
    NsenterNet,
}

/// Network namespaces made here and deleted by name when dropped: a lo-only one, or two
/// joined by a veth pair (both ends named `ifname`).
pub struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn make(tag: &str, count: usize) -> Result<Netns, String> {
        let mut made = Netns { names: Vec::new() };
        for n in 1..=count {
            let name = format!("dnssd-{}-{tag}-{n}", std::process::id());
            ip(&["netns", "add", &name])?;
            made.names.push(name);
        }
        Ok(made)
    }

    /// One namespace with only lo, up and multicast-capable.
    pub fn lo_only(tag: &str) -> Result<Netns, String> {
        let made = Netns::make(tag, 1)?;
        ip(&["-n", made.name(1), "link", "set", "lo", "multicast", "on", "up"])?;
        Ok(made)
    }

    /// Two namespaces joined by a veth pair named `ifname` at both ends. With `ipv4`, the ends
    /// get 10.201.0.1/24 and 10.201.0.2/24 (kernel link-local IPv6 too); without, only the
    /// link-local fe80::1 and fe80::2 (no duplicate-address wait).
    pub fn pair(tag: &str, ifname: &str, ipv4: bool) -> Result<Netns, String> {
        let made = Netns::make(tag, 2)?;
        let (a, b) = (made.name(1).to_string(), made.name(2).to_string());
        ip(&["-n", &a, "link", "add", ifname, "type", "veth", "peer", "name", ifname, "netns", &b])?;
        for (n, ns) in [(1, &a), (2, &b)] {
            if ipv4 {
                ip(&["-n", ns, "addr", "add", &format!("{}/24", Netns::addr(n)), "dev", ifname])?;
            } else {
                ip(&["-n", ns, "link", "set", ifname, "addrgenmode", "none"])?;
                ip(&["-n", ns, "addr", "add", &format!("fe80::{n}/64"), "dev", ifname, "nodad"])?;
            }
            ip(&["-n", ns, "link", "set", ifname, "multicast", "on", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(made)
    }

    /// The IPv4 address of end `n` of a pair.
    pub fn addr(n: usize) -> String {
        format!("10.201.0.{n}")
    }

    /// The name of namespace `n` (1-based).
    pub fn name(&self, n: usize) -> &str {
        &self.names[n - 1]
    }

    /// A command that runs `program args` in namespace `n`, in its own UTS namespace with
    /// host name `node<n>` (so SRV targets differ as on separate machines).
    pub fn command(&self, n: usize, enter: Enter, program: &str, args: &[&str]) -> Command {
        let mut cmd = match enter {
            Enter::IpNetnsExec => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", self.name(n)]);
                c
            }
            Enter::NsenterNet => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net=/run/netns/{}", self.name(n)));
                c
            }
        };
        cmd.args(["unshare", "--uts", "sh", "-c", "hostname \"$0\" && exec \"$@\""])
            .arg(format!("node{n}"))
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts `program args` in namespace `n` (see [`Netns::command`]).
    pub fn spawn(
        &self,
        n: usize,
        enter: Enter,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Helper {
        let mut cmd = self.command(n, enter, program, args);
        cmd.envs(env.iter().copied());
        let mut helper = Helper::spawn(cmd, &format!("{program}@{}", self.name(n)));
        // A program (decpud) does not read its stdin: closing it would not end it.
        helper.ends_on_stdin_close = false;
        helper
    }

    /// Runs this test binary's `helper` test in namespace `n` with `mode` and extra env.
    pub fn helper(&self, n: usize, enter: Enter, mode: &str, env: &[(&str, &str)]) -> Helper {
        let exe = std::env::current_exe().unwrap_or_default();
        let mut cmd = self.command(
            n,
            enter,
            &exe.to_string_lossy(),
            &["--exact", "helper", "--nocapture", "--test-threads=1", "--quiet"],
        );
        cmd.env(HELPER_ENV, mode).envs(env.iter().copied());
        Helper::spawn(cmd, &format!("{mode}@{}", self.name(n)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// Why avahi cannot be used here (a tool missing), or None.
pub fn avahi_unavailable() -> Option<String> {
    let missing: Vec<&str> = ["avahi-browse", "avahi-publish", "avahi-daemon", "dbus-daemon"]
        .into_iter()
        .filter(|p| {
            !["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(p).exists())
        })
        .collect();
    (!missing.is_empty())
        .then(|| format!("not installed: {missing:?} (apt-get install avahi-utils avahi-daemon dbus-daemon)"))
}

/// A shell script that starts a private D-Bus and avahi-daemon (config, socket and runtime
/// directory under `dir`; only `iface`; IPv6 as `ipv6` says), prints `avahi-up`, then obeys
/// stdin lines: `browse` runs one resolving avahi-browse of `_ncpu._tcp` and prints
/// `browse-done`; `publish NAME PORT TXT...` starts avahi-publish (its "Established" line is
/// on stdout). When stdin closes it kills and reaps exactly what it started. Run it with
/// `ip netns exec` (a private mount namespace: the tmpfs over /run/avahi-daemon stays there).
pub fn avahi_script(dir: &std::path::Path, iface: &str, ipv6: bool) -> String {
    let d = dir.display();
    let bus_conf = format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={d}/bus</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>
<allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>
"#
    );
    let _ = std::fs::create_dir_all(dir);
    let _ = std::fs::write(dir.join("bus.conf"), bus_conf);
    let _ = std::fs::write(
        dir.join("avahi.conf"),
        format!(
            "[server]\nuse-ipv4=yes\nuse-ipv6={}\nallow-interfaces={iface}\nenable-dbus=yes\n",
            if ipv6 { "yes" } else { "no" }
        ),
    );
    format!(
        "set -e
mkdir -p /run/avahi-daemon && mount -t tmpfs tmpfs /run/avahi-daemon
PIDS=
trap 'kill $PIDS 2>/dev/null; wait' EXIT
dbus-daemon --config-file={d}/bus.conf --nofork &
PIDS=$!
export DBUS_SYSTEM_BUS_ADDRESS=unix:path={d}/bus
i=0; while [ $i -lt 100 ] && [ ! -S {d}/bus ]; do i=$((i+1)); sleep 0.1; done
avahi-daemon --no-drop-root --no-chroot --no-rlimits -f {d}/avahi.conf > {d}/avahi.log 2>&1 &
PIDS=\"$PIDS $!\"
i=0; while [ $i -lt 100 ] && ! avahi-browse -at -p >/dev/null 2>&1; do i=$((i+1)); sleep 0.1; done
echo avahi-up
while read cmd args; do
  case $cmd in
  browse) timeout 10 avahi-browse -r -p -t _ncpu._tcp || true; echo browse-done;;
  publish) avahi-publish -s $args 2>&1 & PIDS=\"$PIDS $!\";;
  esac
done"
    )
}

/// Helper mode `decpu`: runs decpu's selection (arguments one a line) with a runner that
/// records, or with `connect_mode` "tcp" really dials, each choice.
pub fn decpu_helper(args: &str, connect_mode: &str) {
    let args: Vec<OsString> = args.split('\n').filter(|a| !a.is_empty()).map(OsString::from).collect();
    let opts = CpuOptions::from_decpu_args(args).expect("decpu args");
    cpu_all::logger::init("decpu", opts.debug, false);
    let browse: u64 = std::env::var("DECPU_BROWSE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(2500);
    let tcp = connect_mode == "tcp";
    let result = run_decpu_with(opts, Duration::from_millis(browse), |o| {
        let host = o.host.clone().unwrap_or_default();
        let port = o.port.clone();
        if tcp {
            // The resolver, not SocketAddr's parser: it knows zones (fe80::1%eth0).
            let addr: SocketAddr = (host.as_str(), port.parse::<u16>().unwrap_or(0))
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| Error::Connect(format!("cannot resolve {host}")))?;
            if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                println!("refused {host} {port}");
                return Err(Error::Connect(format!("{addr}: {e}")));
            }
        }
        println!("connect {host} {port}");
        Ok(0)
    });
    match result {
        Ok(status) => println!("status {status}"),
        Err(e) => println!("error {} {e}", e.exit_code()),
    }
}

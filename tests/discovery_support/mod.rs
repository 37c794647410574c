//! Test helpers for the discovery tests: a small lab of network namespaces joined by a
//! bridge (all created and deleted by name here, never touching the host's interfaces),
//! and child processes run inside them with their output collected line by line.
//!
//! Children are this test binary itself, re-run with `DISCOVERY_HELPER` naming a helper
//! mode; every child is killed (by its own handle) when dropped, and every wait is bounded.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

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
        let prefix = format!("discovery-{}-{tag}", std::process::id());
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
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    seen_stdout: Vec<String>,
}

fn lines_of(stream: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Helper {
    fn spawn(mut cmd: Command, name: &str) -> Helper {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        let stdin = child.stdin.take();
        Helper { name: name.to_string(), child, stdin, stdout, stderr, seen_stdout: Vec::new() }
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
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("{}: killed after {limit:?}", self.name);
        None
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
            // Give a helper time to say goodbye and reap its children after stdin closed
            // (a running `timeout 10 avahi-browse` included), then kill it.
            let deadline = Instant::now() + Duration::from_secs(12);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

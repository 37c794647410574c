//! Black-box tests of the `cpud -init` supervisor with the real binary: a server that fails is
//! restarted with a growing pause; SIGTERM stops everything; as PID 1 (of a pid namespace
//! made with unshare) SIGTERM restarts the server, or powers off with `-poweroff`.
//!
//! The server is made to fail by giving it a port that is already taken, so this works with
//! the real SSH server as well as with a stub.

#[path = "common/child.rs"]
mod child;
#[path = "common/skip.rs"]
mod skip;

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cpu-all");

/// A child whose stderr is collected in the background.
struct Watched {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Watched {
    fn spawn(cmd: &mut Command) -> Watched {
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
        let mut err = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("log lock").push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Watched { child, log, reader: Some(reader) }
    }

    fn text(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits up to `limit` for `needle` in stderr.
    fn wait_for(&self, needle: &str, limit: Duration) -> bool {
        child::wait_until(limit, || self.text().contains(needle))
    }

    /// Waits up to `limit` for the exit status; kills the child on timeout. After the exit,
    /// waits (up to 10 s) for the reader to reach the pipe's end, so that `text` holds
    /// everything the child wrote: the exit can be seen before the last lines are read.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let status = child::wait_or_kill(&mut self.child, limit)?;
        if let Some(reader) = self.reader.take() {
            if child::wait_until(Duration::from_secs(10), || reader.is_finished()) {
                let _ = reader.join();
            }
        }
        Some(status)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn sigterm(pid: u32) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
}

fn busy_port() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port().to_string();
    (l, port)
}

#[test]
fn subreaper_restarts_failing_server_with_backoff_and_stops_on_sigterm() {
    let (_taken, port) = busy_port();
    let mut d = Watched::spawn(Command::new(BIN).args([
        "cpud",
        "-init",
        "-listen",
        "127.0.0.1",
        "-sp",
        &port,
        "-pk",
        "/dev/null",
    ]));
    assert!(d.wait_for("as a subreaper", Duration::from_secs(10)), "no start line: {}", d.text());
    assert!(d.wait_for("restarting it in 2s", Duration::from_secs(15)), "no second restart: {}", d.text());
    let pauses: Vec<String> = d
        .text()
        .lines()
        .filter_map(|l| l.split("restarting it in ").nth(1).map(str::to_string))
        .take(2)
        .collect();
    assert_eq!(pauses, vec!["1s", "2s"]);
    sigterm(d.child.id());
    let status = d.wait_exit(Duration::from_secs(20)).expect("supervisor did not stop after SIGTERM");
    assert_eq!(status.code(), Some(0), "log: {}", d.text());
    let log = d.text();
    assert!(log.contains("init: SIGTERM received: stopping"), "{log}");
    // Not PID 1: no tmpfs is mounted over the host's /tmp or /run.
    assert!(!log.contains("mounted tmpfs"), "{log}");
}

/// PID 1 of a new pid and mount namespace: needs root and util-linux unshare.
fn pid1_command(extra: &[&str], port: &str) -> Option<Command> {
    if !rustix::process::geteuid().is_root() {
        skip::here("the PID-1 supervisor test needs root (unshare -p -m)");
        return None;
    }
    let probe = Command::new("unshare").args(["-m", "-p", "-f", "--mount-proc", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        skip::here("unshare -m -p -f --mount-proc does not work here");
        return None;
    }
    let mut c = Command::new("unshare");
    c.args(["-m", "-p", "-f", "--mount-proc", "--propagation", "private", BIN, "cpud", "-init"])
        .args(extra)
        .args(["-listen", "127.0.0.1", "-sp", port, "-pk", "/dev/null"]);
    Some(c)
}

/// The namespace's PID 1: unshare's only child.
fn namespace_init(unshare: u32) -> Option<u32> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

#[test]
fn pid1_restarts_server_after_sigterm_and_powers_off_on_request() {
    let (_taken, port) = busy_port();
    // Without -poweroff: SIGTERM stops everything, then the server is started again.
    let Some(mut cmd) = pid1_command(&[], &port) else { return };
    let mut d = Watched::spawn(&mut cmd);
    let init = namespace_init(d.child.id()).expect("namespace init");
    assert!(
        d.wait_for("init: cpud", Duration::from_secs(10)) && d.text().contains("as PID 1"),
        "{}",
        d.text()
    );
    assert!(d.wait_for("restarting it in 1s", Duration::from_secs(10)), "{}", d.text());
    sigterm(init);
    assert!(
        d.wait_for("all processes stopped; restarting the server", Duration::from_secs(20)),
        "{}",
        d.text()
    );
    let log = d.text();
    assert!(log.contains("mounted tmpfs on /tmp"), "PID 1 mounts its tmpfs: {log}");
    assert!(d.child.try_wait().expect("try_wait").is_none(), "PID 1 exited: {log}");
    // SIGKILL is the only way to end it (from the parent namespace).
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(init as i32).expect("pid"),
        rustix::process::Signal::KILL,
    );
    d.wait_exit(Duration::from_secs(10)).expect("unshare did not end after SIGKILL");

    // With -poweroff: SIGTERM ends in reboot(RB_POWER_OFF), which ends the pid namespace.
    let Some(mut cmd) = pid1_command(&["-poweroff"], &port) else { return };
    let mut d = Watched::spawn(&mut cmd);
    let init = namespace_init(d.child.id()).expect("namespace init");
    assert!(d.wait_for("restarting it in 1s", Duration::from_secs(10)), "{}", d.text());
    sigterm(init);
    d.wait_exit(Duration::from_secs(20)).expect("namespace did not power off");
    let log = d.text();
    assert!(log.contains("init: poweroff"), "{log}");
}

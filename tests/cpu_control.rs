//! Connection reuse: the real `cpu` binary against a real `cpud` on 127.0.0.1, with
//! -controlmaster/-controlpath/-controlpersist. cpud's -d log proves what went over the network:
//! one "accepted ... key" line per authenticated connection, one "running" line per session.
//! Checked: sessions through a master give the exact bytes and exit codes of a direct session
//! (3, 255, 137 for SIGKILL, stdin bytes, environment and directory), two mux sessions at once,
//! each with its own 9P forward, the socket mode, a stale socket, the persist timeout,
//! -controlcmd=check/exit, a client of another uid refused, and a cpud told to stop: it
//! finishes the command in progress, then closes the idle master's connection and exits.

mod cpu_support;
#[path = "common/skip.rs"]
mod skip;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cpu_support::{bin, keygen, text, wait_output, wait_until, Home, KillOnDrop, TempDir, CHILD_TIMEOUT};

/// A cpud on 127.0.0.1 (port chosen by the kernel) logging with -d to a file.
struct Cpud {
    _child: KillOnDrop,
    port: u16,
    log: PathBuf,
    host_pub: PathBuf,
}

impl Cpud {
    fn start(dir: &Path, home: &Home) -> Cpud {
        let hostkey = dir.join("hostkey");
        keygen(&hostkey);
        std::fs::write(dir.join("authorized"), format!("{}\n", home.key_pub)).unwrap();
        let log = dir.join("cpud.log");
        let child = Command::new(bin())
            .args(["cpud", "-d", "-sp", "0", "-listen", "127.0.0.1", "-pk"])
            .arg(dir.join("authorized"))
            .arg("-hk")
            .arg(&hostkey)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let deadline = Instant::now() + CHILD_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("Listening on 127.0.0.1:").nth(1) {
                let port: u16 = rest.lines().next().unwrap().trim().parse().unwrap();
                return Cpud { _child: child, port, log, host_pub: hostkey.with_extension("pub") };
            }
            if let Ok(Some(st)) = child.0.try_wait() {
                panic!("cpud exited with {st} before listening: {text}");
            }
            assert!(Instant::now() < deadline, "cpud did not listen within {CHILD_TIMEOUT:?}: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: cpud stops accepting and ends once no command runs.
    fn terminate(&self) {
        let pid = rustix::process::Pid::from_child(&self._child.0);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    }

    /// cpud's exit code, waiting at most `limit`; None (and cpud killed) if it still runs.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        cpu_support::wait_or_kill(&mut self._child.0, limit).and_then(|status| status.code())
    }

    /// Stops the server (and so every connection to it).
    fn kill(&mut self) {
        let _ = self._child.0.kill();
        let _ = self._child.0.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Authenticated connections so far.
    fn connections(&self) -> usize {
        self.log().matches(": accepted ssh-ed25519 key").count()
    }

    /// Sessions started so far.
    fn sessions(&self) -> usize {
        self.log().lines().filter(|l| l.contains(": running ")).count()
    }
}

/// One test's world: a HOME with a key, a cpud, and a directory for the control socket.
struct World {
    home: Home,
    cpud: Cpud,
    dir: TempDir,
}

impl World {
    fn new(tag: &str) -> World {
        let home = Home::new();
        let dir = TempDir::new(tag);
        let cpud = Cpud::start(dir.path(), &home);
        World { home, cpud, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cm")
    }

    /// `cpu` with the pinned host key, the cpud port, the given control flags and no 9P
    /// (unless `args` says otherwise), run in /tmp (a directory both sides have).
    fn cpu(&self, control: &[&str], args: &[&str]) -> Command {
        let mut c = cpu_support::cpu_command(&self.home, &[]);
        c.arg("-hk").arg(&self.cpud.host_pub).args(["-sp", &self.cpud.port.to_string()]);
        c.arg(format!("-controlpath={}", self.socket().display()));
        c.args(control).args(args);
        c.current_dir("/tmp").env("PWD", "/tmp").env("CPU_CONTROL_TEST", "mux-or-direct");
        c
    }

    fn run(&self, control: &[&str], args: &[&str], stdin: Option<&[u8]>) -> Output {
        cpu_support::run_with_input(self.cpu(control, args), stdin)
    }

    /// `-controlcmd=check`: the master's pid, or None with its output.
    fn check(&self) -> std::result::Result<u32, String> {
        let out = self.run(&["-controlcmd=check"], &["127.0.0.1"], None);
        let err = text(&out.stderr);
        match err.split("Master running (pid=").nth(1).and_then(|r| r.split(')').next()) {
            Some(pid) if out.status.code() == Some(0) => Ok(pid.parse().unwrap()),
            _ => Err(format!("status {:?}: {err}", out.status.code())),
        }
    }

    /// Stops the master (if any), and makes sure its process is gone.
    fn stop_master(&self) {
        if let Ok(pid) = self.check() {
            let _ = self.run(&["-controlcmd=exit"], &["127.0.0.1"], None);
            let gone = wait_until(Duration::from_secs(20), || !process_alive(pid));
            if !gone {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_raw(pid as i32).unwrap(),
                    rustix::process::Signal::KILL,
                );
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_master();
    }
}

const AUTO: &[&str] = &["-controlmaster=auto", "-controlpersist=60"];

fn process_alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; its state letter says Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn need_cpud_session() -> bool {
    if !Path::new("/bin/sh").exists() {
        skip::here("/bin/sh is missing");
        return false;
    }
    true
}

/// A command, its stdin, and the exit status, stdout and end of stderr it must give.
type Case<'a> = (&'a [&'a str], Option<&'a [u8]>, i32, &'a str, &'a str);

#[test]
fn sessions_through_the_master_match_direct_ones_over_one_connection() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("mux");
    let cases: &[Case] = &[
        (&["sh", "-c", "echo one; echo two >&2; exit 3"], None, 3, "one\n", "two\n"),
        (&["sh", "-c", "exit 255"], None, 255, "", ""),
        (&["sh", "-c", "printf 'x'; kill -9 $$"], None, 137, "x", ""),
        (&["cat"], Some(b"bytes\x00\xff\n"), 0, "bytes\x00\u{fffd}\n", ""),
        // stdin /dev/null: EOF (sent with the session's start through a master).
        (&["sh", "-c", "cat; echo end"], None, 0, "end\n", ""),
        (&["sh", "-c", "echo \"$CPU_CONTROL_TEST $PWD\""], None, 0, "mux-or-direct /tmp\n", ""),
    ];
    // Direct first (-controlpath=none would do too: -controlmaster=no with no socket yet).
    for (cmd, stdin, code, out, err) in cases {
        let mut args = vec!["-9p=false", "127.0.0.1"];
        args.extend_from_slice(cmd);
        let o = w.run(&["-controlmaster=no"], &args, *stdin);
        assert_eq!(o.status.code(), Some(*code), "direct {cmd:?}: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), *out, "direct {cmd:?}");
        assert!(text(&o.stderr).ends_with(err), "direct {cmd:?}: {}", text(&o.stderr));
    }
    let direct_connections = w.cpud.connections();
    assert_eq!(direct_connections, cases.len(), "{}", w.cpud.log());
    assert!(!w.socket().exists(), "no master with -controlmaster=no");

    // Now through a master: the first run starts it, the rest reuse it.
    for (cmd, stdin, code, out, err) in cases {
        let mut args = vec!["-9p=false", "127.0.0.1"];
        args.extend_from_slice(cmd);
        let o = w.run(AUTO, &args, *stdin);
        assert_eq!(o.status.code(), Some(*code), "mux {cmd:?}: {}", text(&o.stderr));
        assert_eq!(text(&o.stdout), *out, "mux {cmd:?}");
        assert!(text(&o.stderr).ends_with(err), "mux {cmd:?}: {}", text(&o.stderr));
    }
    assert_eq!(
        w.cpud.connections(),
        direct_connections + 1,
        "six sessions, one authentication: {}",
        w.cpud.log()
    );
    assert_eq!(w.cpud.sessions(), 2 * cases.len(), "{}", w.cpud.log());

    // The socket is the user's alone.
    let mode = std::fs::metadata(w.socket()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let pid = w.check().expect("a master after -controlmaster=auto");
    assert!(process_alive(pid));

    // -controlcmd=exit stops it and removes the socket.
    let o = w.run(&["-controlcmd=exit"], &["127.0.0.1"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("Exit request sent."), "{}", text(&o.stderr));
    assert!(!w.socket().exists(), "the socket is removed before the master answers");
    assert!(
        wait_until(Duration::from_secs(20), || !process_alive(pid)),
        "master {pid} still runs after exit"
    );
    let err = w.check().unwrap_err();
    assert!(err.contains("status Some(255)") && err.contains("no control master at"), "{err}");
}

#[test]
fn two_mux_sessions_at_once() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("concurrent");
    let o = w.run(AUTO, &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // A: cat, its stdin held open; B runs and ends while A waits.
    let mut a = w.cpu(AUTO, &["-9p=false", "127.0.0.1", "cat"]);
    a.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut a = a.spawn().unwrap();
    let mut a_in = a.stdin.take().unwrap();
    a_in.write_all(b"from a\n").unwrap();
    let b = w.run(AUTO, &["-9p=false", "127.0.0.1", "echo", "from b"], None);
    assert_eq!((b.status.code(), text(&b.stdout)), (Some(0), "from b\n".into()), "{}", text(&b.stderr));
    assert!(a.try_wait().unwrap().is_none(), "A still runs while B ran and ended");
    a_in.write_all(b"more\n").unwrap();
    drop(a_in);
    let a = wait_output(a, CHILD_TIMEOUT);
    assert_eq!((a.status.code(), text(&a.stdout)), (Some(0), "from a\nmore\n".into()), "{}", text(&a.stderr));
    assert_eq!(w.cpud.connections(), 1, "{}", w.cpud.log());
    assert_eq!(w.cpud.sessions(), 3, "{}", w.cpud.log());
    // SIGTERM ends the master, and it takes its socket with it.
    let pid = w.check().expect("a master");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let gone = wait_until(Duration::from_secs(20), || !process_alive(pid) && !w.socket().exists());
    assert!(gone, "after SIGTERM: master alive={} socket exists={}", process_alive(pid), w.socket().exists());
}

/// A mux session whose reader stalls (`cpu board dmesg | less`, the user not paging) must not
/// stop the master's other sessions: russh stops reading the whole connection when one
/// channel's consumer is full, so each session queues its output (client::OUTPUT_BUDGET). A
/// writes 6 MB that nobody reads yet (more than the old queues held in all, less than the
/// budget); its command must end, and B must run, before A's output is read, whole.
#[test]
fn a_mux_session_whose_reader_stalls_does_not_stop_the_others() {
    if !need_cpud_session() {
        return;
    }
    const SIZE: usize = 6_000_000;
    let w = World::new("stalled");
    let o = w.run(AUTO, &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let ended_before = w.cpud.log().matches(": command ended: ").count();
    let mut a = w.cpu(AUTO, &["-9p=false", "127.0.0.1", "head", "-c", &SIZE.to_string(), "/dev/zero"]);
    a.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let a = a.spawn().unwrap();
    // cpud logs "command ended" once the command's output is all sent on the channel.
    let a_sent =
        wait_until(CHILD_TIMEOUT, || w.cpud.log().matches(": command ended: ").count() > ended_before);
    let b = w.run(AUTO, &["-9p=false", "127.0.0.1", "echo", "from b"], None);
    let a = wait_output(a, CHILD_TIMEOUT);
    assert!(a_sent, "A's command could not send its {SIZE} bytes while A's reader waited: {}", w.cpud.log());
    assert_eq!((b.status.code(), text(&b.stdout)), (Some(0), "from b\n".into()), "{}", text(&b.stderr));
    assert_eq!((a.status.code(), a.stdout.len()), (Some(0), SIZE), "{}", text(&a.stderr));
    assert!(a.stdout.iter().all(|&b| b == 0), "A's bytes are all zero");
    assert_eq!(w.cpud.connections(), 1, "{}", w.cpud.log());
}

/// `cpu host yes | head -1`: when our stdout's reader leaves, the session ends (status 141, as
/// for a local program killed by SIGPIPE; cpud stops the remote command), directly and
/// through a master. cpu used to drain the endless output forever.
#[test]
fn a_stdout_reader_that_leaves_ends_the_session() {
    if !need_cpud_session() {
        return;
    }
    const STOPPED: &str = "client went away; command stopped";
    let w = World::new("stdout-gone");
    for control in [&["-controlmaster=no"][..], AUTO] {
        let stopped_before = w.cpud.log().matches(STOPPED).count();
        let mut c = w.cpu(control, &["-9p=false", "127.0.0.1", "yes"]);
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 2];
        out.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"y\n", "{control:?}");
        drop(out);
        let o = wait_output(child, CHILD_TIMEOUT);
        assert_eq!(o.status.code(), Some(141), "{control:?}: {}", text(&o.stderr));
        let stopped = wait_until(CHILD_TIMEOUT, || w.cpud.log().matches(STOPPED).count() > stopped_before);
        assert!(stopped, "{control:?}: the remote yes was not stopped: {}", w.cpud.log());
    }
    assert_eq!(w.cpud.connections(), 2, "one direct connection, one master's: {}", w.cpud.log());
}

#[test]
fn later_mux_sessions_run_on_the_channel_the_one_before_opened() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("spare");
    let master_log = w.dir.path().join("master.log");
    let mut first = w.cpu(
        &["-d", "-controlmaster=auto", "-controlpersist=60"],
        &["-9p=false", "127.0.0.1", "echo", "one"],
    );
    first.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(std::fs::File::create(&master_log).unwrap());
    let o = wait_output(first.spawn().unwrap(), CHILD_TIMEOUT);
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "one\n".to_string()),
        "{}",
        std::fs::read_to_string(&master_log).unwrap_or_default()
    );
    for word in ["two", "three"] {
        let o = w.run(AUTO, &["-9p=false", "127.0.0.1", "echo", word], None);
        assert_eq!((o.status.code(), text(&o.stdout)), (Some(0), format!("{word}\n")), "{}", text(&o.stderr));
    }
    let log = std::fs::read_to_string(&master_log).unwrap();
    assert_eq!(log.matches("the session runs on the spare channel").count(), 2, "{log}");
    assert_eq!(w.cpud.sessions(), 3, "{}", w.cpud.log());
    assert_eq!(w.cpud.connections(), 1, "{}", w.cpud.log());
}

#[test]
fn each_mux_session_gets_its_own_9p_forward_and_options() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("ninep");
    // The master logs with -d to this file (it keeps stderr only with -d).
    let master_log = w.dir.path().join("master.log");
    let mut first = w.cpu(&["-d", "-controlmaster=auto", "-controlpersist=60"], &["127.0.0.1", "true"]);
    first.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(std::fs::File::create(&master_log).unwrap());
    let _ = wait_output(first.spawn().unwrap(), CHILD_TIMEOUT);
    // A second session with its own options: a relative -root (the client's directory decides
    // what it means) and its own namespace.
    let o = w.run(&[], &["-root=.", "-namespace=/usr", "127.0.0.1", "true"], None);
    let log = std::fs::read_to_string(&master_log).unwrap();
    assert!(
        log.contains(
            r#"control master: session ["true"] in Some("/tmp"), 9p true root "/tmp/.", fstab Some("\n/tmp/cpu/usr /usr none defaults,bind 0 0\n")"#
        ),
        "the mux client's options reach the master: {log}"
    );
    let ports: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("exec \"-port9p=").nth(1))
        .map(|r| r.split(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(ports.len(), 2, "one forward per session: {log}");
    assert_ne!(ports[0], ports[1], "each session has its own forward: {log}");
    // This machine's kernel has no 9p: cpud says so, through the master, with cpud's status.
    if o.status.code() == Some(125) {
        assert!(text(&o.stderr).contains("no 9p support"), "{}", text(&o.stderr));
        skip::skip(
            "cpu_control::each_mux_session_gets_its_own_9p_forward_and_options (mount part)",
            "this kernel has no 9p; the mount through a master is for the VM",
        );
    } else {
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }
    assert_eq!(w.cpud.connections(), 1, "{}", w.cpud.log());
}

#[test]
fn stale_socket_direct_with_no_replaced_with_auto() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("stale");
    // A socket file nobody listens on: a master that died.
    drop(std::os::unix::net::UnixListener::bind(w.socket()).unwrap());
    let o = w.run(&["-d", "-controlmaster=no"], &["-9p=false", "127.0.0.1", "echo", "direct"], None);
    assert_eq!((o.status.code(), text(&o.stdout)), (Some(0), "direct\n".into()), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("stale control socket"), "{}", text(&o.stderr));
    assert!(w.socket().exists(), "-controlmaster=no leaves the socket alone");

    let o = w.run(AUTO, &["-9p=false", "127.0.0.1", "echo", "master"], None);
    assert_eq!((o.status.code(), text(&o.stdout)), (Some(0), "master\n".into()), "{}", text(&o.stderr));
    w.check().expect("auto replaced the stale socket with a live master");
    assert_eq!(w.cpud.connections(), 2, "{}", w.cpud.log());
}

#[test]
fn persist_time_ends_an_idle_master() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("persist");
    let o = w.run(&["-controlmaster=auto", "-controlpersist=1s"], &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // Its pid, unless (on a very busy machine) the second has already passed.
    let pid = w.check().ok();
    let alive = || pid.map(process_alive).unwrap_or(false);
    let gone = wait_until(Duration::from_secs(30), || !alive() && !w.socket().exists());
    assert!(
        gone,
        "master {pid:?} still alive={} socket exists={} 30 s after a 1 s persist",
        alive(),
        w.socket().exists()
    );
    // Without ControlPersist, the master leaves with its last session.
    let o = w.run(&["-controlmaster=auto"], &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let gone = wait_until(Duration::from_secs(30), || !w.socket().exists());
    assert!(gone, "the socket is still there 30 s after the only session of a non-persistent master");
}

#[test]
fn another_uid_is_refused() {
    if !need_cpud_session() {
        return;
    }
    if rustix::process::geteuid().as_raw() != 0 || !Path::new("/usr/bin/setpriv").exists() {
        skip::here("needs root and setpriv to connect as another uid");
        return;
    }
    let w = World::new("uid");
    let master_log = w.dir.path().join("master.log");
    let mut first =
        w.cpu(&["-d", "-controlmaster=auto", "-controlpersist=60"], &["-9p=false", "127.0.0.1", "true"]);
    first.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(std::fs::File::create(&master_log).unwrap());
    let _ = wait_output(first.spawn().unwrap(), CHILD_TIMEOUT);
    // Open the way (the 0600 socket would already stop uid 65534 at connect) so that the
    // master's own check is what refuses.
    std::fs::set_permissions(w.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    std::fs::set_permissions(w.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut c = Command::new("/usr/bin/setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .args(["cpu", "-controlcmd=check"])
        .arg(format!("-controlpath={}", w.socket().display()))
        .arg("127.0.0.1")
        .env("HOME", "/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = wait_output(c.spawn().unwrap(), CHILD_TIMEOUT);
    let err = text(&o.stderr);
    if err.contains("setpriv:") {
        skip::here(&format!("uid 65534 cannot run the test binary here: {err}"));
        return;
    }
    assert_eq!(o.status.code(), Some(255), "{err}");
    assert!(err.contains("refused a client with uid 65534"), "{err}");
    let log = std::fs::read_to_string(&master_log).unwrap();
    assert!(log.contains("refused a client with uid 65534"), "the master logs the refusal: {log}");
    w.check().expect("the master still serves its own uid");
}

#[test]
fn pty_session_through_the_master_resizes_escapes_and_restores() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("pty");
    let o = w.run(AUTO, &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let mut cmd = w.cpu(AUTO, &["-9p=false", "127.0.0.1", "sh", "-c", cpu_support::TERMINAL_SCRIPT]);
    cmd.env("TERM", "xterm-cputest");
    let mut pty = cpu_support::PtyChild::spawn(cmd, 33, 111);
    cpu_support::check_terminal_session(&mut pty);

    let t = Duration::from_secs(15);
    let cmd = w.cpu(AUTO, &["-9p=false", "127.0.0.1", "sh", "-c", "echo hi; exit 5"]);
    let mut pty = cpu_support::PtyChild::spawn(cmd, 24, 80);
    assert_eq!(pty.wait(t), Some(5), "{:?}", text(&pty.seen));
    assert!(text(&pty.seen).contains("hi\r\n"), "{:?}", text(&pty.seen));
    assert!(pty.is_cooked(), "raw mode left on");
    assert_eq!(w.cpud.connections(), 1, "{}", w.cpud.log());
}

#[test]
fn signals_reach_the_command_through_the_master() {
    if !need_cpud_session() {
        return;
    }
    let w = World::new("signals");
    let script = "trap 'echo got-int; exit 9' INT; echo ready; while :; do sleep 0.05; done";
    let mut c = w.cpu(AUTO, &["-9p=false", "127.0.0.1", "sh", "-c", script]);
    let out_file = w.dir.path().join("out");
    c.stdin(Stdio::null()).stdout(std::fs::File::create(&out_file).unwrap()).stderr(Stdio::piped());
    let child = c.spawn().unwrap();
    let pid = rustix::process::Pid::from_child(&child);
    let ready = wait_until(CHILD_TIMEOUT, || {
        std::fs::read_to_string(&out_file).unwrap_or_default().contains("ready")
    });
    assert!(ready, "the command did not start: {:?}", std::fs::read_to_string(&out_file));
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let o = wait_output(child, CHILD_TIMEOUT);
    assert_eq!(o.status.code(), Some(9), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "ready\ngot-int\n");
}

#[test]
fn master_leaves_when_the_server_goes() {
    if !need_cpud_session() {
        return;
    }
    let mut w = World::new("servergone");
    let o = w.run(AUTO, &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let pid = w.check().expect("a master");
    w.cpud.kill();
    let gone = wait_until(Duration::from_secs(30), || !process_alive(pid) && !w.socket().exists());
    assert!(gone, "server gone: master alive={} socket exists={}", process_alive(pid), w.socket().exists());
    // With no master and no server, cpu says it cannot connect, as a direct session would.
    let o = w.run(AUTO, &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(255), "{}", text(&o.stderr));
    assert!(!w.socket().exists());
}

/// SIGTERM to cpud while a master (persisting forever) holds a connection with one command
/// running: nothing new is accepted, the running command's input, output and status still
/// flow, and then cpud closes the master's now idle connection and exits 0 (before, an idle
/// master kept a stopped cpud alive for as long as it persisted). The master leaves with it.
#[test]
fn stopped_cpud_finishes_the_running_command_then_closes_the_idle_master() {
    if !need_cpud_session() {
        return;
    }
    let forever: &[&str] = &["-controlmaster=auto", "-controlpersist=yes"];
    let mut w = World::new("stopping");
    let o = w.run(forever, &["-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let master = w.check().expect("a master");
    let before = w.cpud.sessions();
    // Blocked on its input when the signal comes.
    let mut running = w
        .cpu(forever, &["-9p=false", "127.0.0.1", "sh", "-c", "read x; echo got $x; exit 3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = wait_until(CHILD_TIMEOUT, || w.cpud.sessions() > before);
    assert!(started, "the second session never started: {}", w.cpud.log());
    w.cpud.terminate();
    let refusing = wait_until(CHILD_TIMEOUT, || w.cpud.log().contains("no longer accepting connections"));
    assert!(refusing, "cpud did not stop accepting: {}", w.cpud.log());
    let direct =
        w.run(&["-controlmaster=no"], &["-controlpath=none", "-9p=false", "127.0.0.1", "true"], None);
    assert_eq!(direct.status.code(), Some(255), "a new connection after SIGTERM: {}", text(&direct.stderr));
    let mut stdin = running.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    drop(stdin);
    let out = wait_output(running, CHILD_TIMEOUT);
    assert_eq!(text(&out.stdout), "got hello\n", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let code = w.cpud.wait_exit(CHILD_TIMEOUT);
    assert_eq!(code, Some(0), "cpud after its last command ended: {}", w.cpud.log());
    let gone = wait_until(CHILD_TIMEOUT, || !process_alive(master) && !w.socket().exists());
    assert!(gone, "master alive={} socket exists={}", process_alive(master), w.socket().exists());
}

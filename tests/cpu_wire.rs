//! The `cpu` client against a small scripted russh server in this process: the exact order of
//! what cpu sends (tcpip-forward, env, exec), the forwarded-channel checks (unknown forward
//! refused, wrong nonce closed, right nonce served), signal forwarding, and a session that ends
//! without an exit status.

mod cpu_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, Sig};

use cpu_support::{keygen, text, Home, TempDir};

/// The fake forwarded port the server announces.
const FORWARD_PORT: u32 = 40123;

#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// After exec: probe the 9P back-channel, then exit 0.
    NineP,
    /// After exec: print "ready", wait for signals; on TERM report exit-signal TERM.
    Signals,
    /// After exec: close without exit status.
    NoStatus,
    /// Refuse the 127.0.0.1 forward; after exec probe the ::1 one, then exit 0.
    V6Forward,
}

#[derive(Clone)]
struct Server {
    log: Arc<Mutex<Vec<String>>>,
    script: Script,
    nonce: Arc<Mutex<String>>,
}

impl Server {
    fn record(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
}

async fn wait_closed(ch: &mut Channel<Msg>, timeout: Duration) -> (bool, usize) {
    let mut data = 0;
    let r = tokio::time::timeout(timeout, async {
        loop {
            match ch.wait().await {
                Some(ChannelMsg::Data { data: d }) => {
                    data += d.len();
                    return false;
                }
                Some(ChannelMsg::Close) | Some(ChannelMsg::Eof) | None => return true,
                Some(_) => {}
            }
        }
    })
    .await;
    (r.unwrap_or(false), data)
}

impl server::Handler for Server {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        // russh also queues every request on the Channel object: drain it, or after ~100
        // requests (a big environment) the whole connection stalls.
        let mut channel = channel;
        tokio::spawn(async move { while channel.wait().await.is_some() {} });
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.record(format!("tcpip-forward {address} {port}"));
        if self.script == Script::V6Forward && address == "127.0.0.1" {
            return Ok(false);
        }
        *port = FORWARD_PORT;
        Ok(true)
    }

    async fn env_request(
        &mut self,
        ch: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match name {
            "CPUNONCE" => {
                *self.nonce.lock().unwrap() = value.to_string();
                self.record(format!("env {name} len={}", value.len()));
            }
            "REFUSE_ME" => {
                self.record(format!("env {name} (refused)"));
                session.channel_failure(ch)?;
                return Ok(());
            }
            _ => self.record(format!("env {name}={value}")),
        }
        session.channel_success(ch)?;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        ch: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.record(format!("exec {}", String::from_utf8_lossy(data)));
        session.channel_success(ch)?;
        let handle = session.handle();
        let me = self.clone();
        tokio::spawn(async move {
            match me.script {
                Script::NineP => {
                    // A forward nobody asked for is refused by the client.
                    let r = handle.channel_open_forwarded_tcpip("127.0.0.1", 1, "127.0.0.1", 50000).await;
                    me.record(format!("unknown forward accepted={}", r.is_ok()));
                    if let Ok(mut bad) = handle
                        .channel_open_forwarded_tcpip("127.0.0.1", FORWARD_PORT, "127.0.0.1", 50001)
                        .await
                    {
                        let _ = bad.data(&b"ffffffffffffffffffffffffffffffff"[..]).await;
                        let (closed, _) = wait_closed(&mut bad, Duration::from_secs(5)).await;
                        me.record(format!("wrong nonce closed={closed}"));
                    }
                    let nonce = me.nonce.lock().unwrap().clone();
                    if let Ok(mut good) = handle
                        .channel_open_forwarded_tcpip("127.0.0.1", FORWARD_PORT, "127.0.0.1", 50002)
                        .await
                    {
                        let mut msg = nonce.into_bytes();
                        msg.extend_from_slice(
                            b"\x15\x00\x00\x00\x64\xff\xff\x00\x00\x01\x00\x08\x009P2000.L",
                        );
                        let _ = good.data(&msg[..]).await;
                        let _ = wait_closed(&mut good, Duration::from_secs(5)).await;
                        let _ = good.close().await;
                    }
                    let _ = handle.exit_status_request(ch, 0).await;
                    let _ = handle.eof(ch).await;
                    let _ = handle.close(ch).await;
                }
                Script::Signals => {
                    let _ = handle.data(ch, &b"ready\n"[..]).await;
                }
                Script::V6Forward => {
                    // The client asked for ::1: a connection reported for 127.0.0.1 is refused.
                    let r = handle
                        .channel_open_forwarded_tcpip("127.0.0.1", FORWARD_PORT, "127.0.0.1", 50000)
                        .await;
                    me.record(format!("v4 forward accepted={}", r.is_ok()));
                    let nonce = me.nonce.lock().unwrap().clone();
                    if let Ok(mut good) =
                        handle.channel_open_forwarded_tcpip("::1", FORWARD_PORT, "::1", 50003).await
                    {
                        // The nonce and a Tversion: the Rversion (data) ends the wait at once,
                        // after the client has verified the nonce and started serving 9P.
                        let mut msg = nonce.into_bytes();
                        msg.extend_from_slice(
                            b"\x15\x00\x00\x00\x64\xff\xff\x00\x00\x01\x00\x08\x009P2000.L",
                        );
                        let _ = good.data(&msg[..]).await;
                        let _ = wait_closed(&mut good, Duration::from_secs(5)).await;
                        let _ = good.close().await;
                    }
                    let _ = handle.exit_status_request(ch, 0).await;
                    let _ = handle.close(ch).await;
                }
                Script::NoStatus => {
                    let _ = handle.data(ch, &b"bye\n"[..]).await;
                    let _ = handle.eof(ch).await;
                    let _ = handle.close(ch).await;
                }
            }
        });
        Ok(())
    }

    async fn signal(&mut self, ch: ChannelId, signal: Sig, session: &mut Session) -> Result<(), Self::Error> {
        let name = format!("{signal:?}");
        self.record(format!("signal {name}"));
        if self.script == Script::Signals && matches!(signal, Sig::TERM) {
            session.exit_signal_request(ch, Sig::TERM, false, "terminated", "")?;
            session.eof(ch)?;
            session.close(ch)?;
        }
        Ok(())
    }
}

/// Starts the scripted server on a thread; returns its port, the request log and the pinned
/// host key file.
fn start(script: Script, dir: &TempDir) -> (u16, Arc<Mutex<Vec<String>>>, std::path::PathBuf) {
    let key_path = dir.path().join("hostkey");
    keygen(&key_path);
    let key = russh::keys::load_secret_key(&key_path, None).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let server = Server { log: log.clone(), script, nonce: Arc::new(Mutex::new(String::new())) };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let config = Arc::new(server::Config { keys: vec![key], ..Default::default() });
            // One session per test; bounded so the thread never outlives the test by long.
            if let Ok(Ok((stream, _))) =
                tokio::time::timeout(Duration::from_secs(30), listener.accept()).await
            {
                if let Ok(session) = server::run_stream(config, stream, server).await {
                    let _ = tokio::time::timeout(Duration::from_secs(30), session).await;
                }
            }
        });
    });
    (port, log, key_path.with_extension("pub"))
}

fn cpu(home: &Home, args: &[&str]) -> std::process::Command {
    let mut c = cpu_support::cpu_command(home, args);
    c.env_clear()
        .env("HOME", home.path())
        .env("USER", "tester")
        .env("PATH", "/usr/bin:/bin")
        .env("CPU_TEST_VAR", "1")
        .env("TMPDIR", "/var/folders/xyz")
        .env("REFUSE_ME", "x")
        .current_dir(home.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    c
}

#[test]
fn wire_order_forward_env_exec_and_back_channel_checks() {
    let home = Home::new();
    let dir = TempDir::new("wire");
    let (port, log, pin) = start(Script::NineP, &dir);
    let p = port.to_string();
    let args = ["-d", "-hk", pin.to_str().unwrap(), "-namespace", "/bin", "-sp", &p, "127.0.0.1", "ls", "-l"];
    let out = cpu_support::wait_output(cpu(&home, &args).spawn().unwrap(), cpu_support::CHILD_TIMEOUT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let log = log.lock().unwrap().clone();
    // The client resolves its own symlinks (/bin -> usr/bin on a merged-/usr host).
    let bin = std::fs::canonicalize("/bin").unwrap();
    let fstab = format!("\n/tmp/cpu{} /bin none defaults,bind 0 0\n", bin.display());
    // Command::env sorts the environment; cpu keeps its order and puts TMPDIR=/tmp in place.
    let want: Vec<String> = vec![
        "tcpip-forward 127.0.0.1 0".into(),
        "env CPU_TEST_VAR=1".into(),
        format!("env HOME={}", home.path().display()),
        "env PATH=/usr/bin:/bin".into(),
        "env REFUSE_ME (refused)".into(),
        "env TMPDIR=/tmp".into(),
        "env USER=tester".into(),
        // No PWD in the environment: cpu adds the directory it runs in.
        format!("env PWD={}", home.path().display()),
        "env CPUNONCE len=32".into(),
        format!("env CPU_FSTAB={fstab}"),
        format!("env LC_GLENDA_CPU_FSTAB={fstab}"),
        "env CPU_MSIZE=1048576".into(),
        "env CPU_SYSTEM_MOUNT=1".into(),
        format!("exec -port9p={FORWARD_PORT} 'ls' '-l'"),
        "unknown forward accepted=false".into(),
        "wrong nonce closed=true".into(),
    ];
    assert_eq!(log, want, "{stderr}");
    assert_eq!(stderr.matches("wrong nonce on a forwarded connection").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("nonce verified, serving 9P").count(), 1, "{stderr}");
    assert!(stderr.contains("refused a forwarded connection for 127.0.0.1:1"), "{stderr}");
}

#[test]
fn signals_are_forwarded_and_exit_signal_maps_to_128_plus_n() {
    let home = Home::new();
    let dir = TempDir::new("wire");
    let (port, log, pin) = start(Script::Signals, &dir);
    let p = port.to_string();
    let mut child =
        cpu(&home, &["-9p=false", "-hk", pin.to_str().unwrap(), "-sp", &p, "127.0.0.1", "sleep", "60"])
            .spawn()
            .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut ready).unwrap();
    assert_eq!(&ready, b"ready\n");
    let pid = rustix::process::Pid::from_child(&child);
    for sig in [rustix::process::Signal::INT, rustix::process::Signal::HUP, rustix::process::Signal::TERM] {
        rustix::process::kill_process(pid, sig).unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let out = cpu_support::wait_output(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    let log = log.lock().unwrap().clone();
    let signals: Vec<&String> = log.iter().filter(|l| l.starts_with("signal")).collect();
    assert_eq!(signals, ["signal INT", "signal HUP", "signal TERM"]);
    // Without 9P: no forward, no nonce, no CPU_FSTAB (the namespace's binds have nothing to
    // bind from; a Go cpud would print an error for each), and the exec form.
    assert!(!log.iter().any(|l| l.starts_with("tcpip-forward") || l.starts_with("env CPUNONCE")));
    assert!(!log.iter().any(|l| l.contains("CPU_FSTAB=")), "{log:?}");
    assert!(log.contains(&"exec  'sleep' '60'".to_string()), "{log:?}");
}

#[test]
fn session_without_exit_status_gives_255_after_draining_output() {
    let home = Home::new();
    let dir = TempDir::new("wire");
    let (port, log, pin) = start(Script::NoStatus, &dir);
    let p = port.to_string();
    let out = cpu_support::wait_output(
        cpu(&home, &["-9p=false", "-root=", "-hk", pin.to_str().unwrap(), "-sp", &p, "127.0.0.1", "true"])
            .spawn()
            .unwrap(),
        cpu_support::CHILD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(text(&out.stdout), "bye\n");
    assert!(text(&out.stderr).contains("ended without an exit status"), "{}", text(&out.stderr));
    // -root= : no CPU_FSTAB at all.
    assert!(!log.lock().unwrap().iter().any(|l| l.contains("CPU_FSTAB")));
}

#[test]
fn forward_falls_back_to_ipv6_loopback() {
    let home = Home::new();
    let dir = TempDir::new("wire");
    let (port, log, pin) = start(Script::V6Forward, &dir);
    let p = port.to_string();
    let out = cpu_support::wait_output(
        cpu(&home, &["-d", "-hk", pin.to_str().unwrap(), "-sp", &p, "127.0.0.1", "true"]).spawn().unwrap(),
        cpu_support::CHILD_TIMEOUT,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let log = log.lock().unwrap().clone();
    assert_eq!(&log[..2], ["tcpip-forward 127.0.0.1 0", "tcpip-forward ::1 0"]);
    assert!(log.contains(&"v4 forward accepted=false".to_string()), "{log:?}");
    assert_eq!(stderr.matches("nonce verified, serving 9P").count(), 1, "{stderr}");
}

#[test]
fn large_environment_does_not_stall_the_connection() {
    let home = Home::new();
    let dir = TempDir::new("wire");
    let (port, log, pin) = start(Script::NoStatus, &dir);
    let p = port.to_string();
    let mut cmd = cpu(&home, &["-9p=false", "-hk", pin.to_str().unwrap(), "-sp", &p, "127.0.0.1", "true"]);
    for i in 0..3000 {
        cmd.env(format!("BIG_{i:04}"), i.to_string());
    }
    let out = cpu_support::wait_output(cmd.spawn().unwrap(), cpu_support::CHILD_TIMEOUT);
    assert_eq!(text(&out.stdout), "bye\n", "{}", text(&out.stderr));
    let log = log.lock().unwrap().clone();
    assert_eq!(log.iter().filter(|l| l.starts_with("env BIG_")).count(), 3000);
    assert_eq!(log.last().map(String::as_str), Some("exec  'true'"));
}

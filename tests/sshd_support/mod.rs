//! Helpers for the cpud server tests: temp dirs, keys made with ssh-keygen, an in-process
//! server on 127.0.0.1:0, OpenSSH `ssh` runs with a timeout, and a small russh client for
//! what `ssh` cannot show (exit-signal, forwarded-tcpip fields, early signals).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cpu_all::ssh::server::{serve, ServerConfig};
use cpu_all::transport::{Listener, Net};
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg};
use russh::{Channel, ChannelMsg};
use tokio::sync::mpsc;

#[path = "../common/child.rs"]
mod child;
#[path = "../common/keys_and_ports.rs"]
mod keys_and_ports;
#[path = "../common/temp_dir.rs"]
mod temp_dir;

#[allow(unused_imports)] // each test crate uses a different subset
pub use child::{lines_of, text, wait_until};
pub use temp_dir::TempDir;

/// The real binary, for cpu-form sessions (`cpud -remote`) and black-box runs.
pub const BIN: &str = env!("CARGO_BIN_EXE_cpu-all");
/// Upper bound for any single child process or wait in these tests.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Makes a key pair with ssh-keygen (`kind`: ed25519, ecdsa, rsa); returns the private key path.
pub fn keygen(dir: &TempDir, name: &str, kind: &str) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = keys_and_ports::keygen_command(&path, kind, &format!("{name}@test"));
    cmd.stdin(Stdio::null());
    let out = run_timeout(cmd, None, TIMEOUT);
    assert!(out.status.success(), "ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    path
}

pub fn public_line(private: &Path) -> String {
    std::fs::read_to_string(private.with_extension("pub")).expect("read .pub")
}

/// Writes an authorized_keys file with the given text.
pub fn authorized(dir: &TempDir, text: &str) -> PathBuf {
    let p = dir.join("authorized_keys");
    std::fs::write(&p, text).expect("write authorized_keys");
    p
}

/// Runs `cmd` with optional stdin bytes; kills it and panics after `timeout`.
pub fn run_timeout(mut cmd: Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Output {
    // Without input the caller's stdin setting stands (ssh_command sets /dev/null).
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let writer = child::feed_stdin(&mut child, stdin);
    let readers = child::OutputReaders::start(&mut child);
    let Some(status) = child::wait_or_kill(&mut child, timeout) else {
        panic!("child {cmd:?} did not finish within {timeout:?}");
    };
    let _ = writer.join();
    readers.finish(status)
}

/// An in-process cpud on 127.0.0.1:0, stopped when dropped.
pub struct TestServer {
    pub port: u16,
    pub tenants: Arc<Mutex<Vec<usize>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub fn start(authorized_keys: Option<PathBuf>) -> TestServer {
        Self::start_with(authorized_keys, |_| {})
    }

    pub fn start_with(authorized_keys: Option<PathBuf>, tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let key = cpu_all::ssh::hostkey::generate_ed25519().expect("host key");
        let mut config = ServerConfig::new(key, authorized_keys);
        config.remote_program = PathBuf::from(BIN);
        // A login must finish within the test's own bound, not cpud's: key exchange in a debug
        // build on a loaded machine (several test binaries at once) can take seconds. The
        // identification grace stays short: the tests that prove it wait for it.
        config.handshake_timeout = TIMEOUT;
        config.banner_grace = Duration::from_secs(2);
        config.hangup_grace = Duration::from_millis(500);
        let tenants = Arc::new(Mutex::new(Vec::new()));
        let t = tenants.clone();
        config.on_tenants = Some(Arc::new(move |n| t.lock().unwrap().push(n)));
        tweak(&mut config);
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = Listener::bind(Net::Tcp, "127.0.0.1", "0").await.expect("bind");
                port_tx.send(listener.tcp_port().expect("port")).expect("send port");
                let _ = serve(listener, config, async {
                    let _ = stop_rx.await;
                })
                .await;
            });
        });
        let port = port_rx.recv_timeout(TIMEOUT).expect("server start");
        TestServer { port, tenants, shutdown: Some(stop_tx) }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

/// The common OpenSSH options: no known_hosts, no agent, no config file surprises.
pub fn ssh_command(port: u16, key: &Path) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=10",
        "-p",
        &port.to_string(),
        "-i",
    ])
    .arg(key)
    .env_remove("SSH_AUTH_SOCK")
    .stdin(Stdio::null());
    c
}

/// `ssh -p PORT -i KEY 127.0.0.1 COMMAND` with stdin bytes.
pub fn ssh(port: u16, key: &Path, command: &str, stdin: Option<&[u8]>) -> Output {
    let mut c = ssh_command(port, key);
    c.arg("127.0.0.1").arg(command);
    run_timeout(c, stdin.map(|s| s.to_vec()), TIMEOUT)
}

/// What arrived on a session channel.
#[derive(Debug, Default)]
pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: Option<u32>,
    pub signal: Option<(String, bool, String)>,
    pub eof: bool,
}

/// A forwarded-tcpip channel the server opened, with the fields it named.
pub struct Forwarded {
    pub connected_address: String,
    pub connected_port: u32,
    pub originator_address: String,
    pub originator_port: u32,
    pub channel: Channel<client::Msg>,
}

pub struct TestClient {
    pub handle: client::Handle<ClientHandler>,
    pub forwarded: mpsc::UnboundedReceiver<Forwarded>,
}

pub struct ClientHandler {
    forwarded: mpsc::UnboundedSender<Forwarded>,
}

impl client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        let _ = self.forwarded.send(Forwarded {
            connected_address: connected_address.into(),
            connected_port,
            originator_address: originator_address.into(),
            originator_port,
            channel,
        });
        Ok(())
    }
}

/// Connects and authenticates with `key` (RSA signs with the best hash the server offers).
pub async fn connect(port: u16, key: &Path) -> Result<TestClient, String> {
    let key: PrivateKey = russh::keys::load_secret_key(key, None).map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::unbounded_channel();
    let config = Arc::new(client::Config::default());
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let mut handle = client::connect_stream(config, stream, ClientHandler { forwarded: tx })
        .await
        .map_err(|e| e.to_string())?;
    let hash = handle.best_supported_rsa_hash().await.map_err(|e| e.to_string())?.flatten();
    let auth = handle
        .authenticate_publickey("tester", PrivateKeyWithHashAlg::new(Arc::new(key), hash))
        .await
        .map_err(|e| e.to_string())?;
    if !auth.success() {
        return Err("authentication refused".into());
    }
    Ok(TestClient { handle, forwarded: rx })
}

/// Reads a session channel to its end (bounded by TIMEOUT).
pub async fn collect(channel: &mut Channel<client::Msg>) -> Outcome {
    let mut o = Outcome::default();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let msg = match tokio::time::timeout_at(deadline, channel.wait()).await {
            Ok(m) => m,
            Err(_) => panic!("session did not end within {TIMEOUT:?}: {o:?}"),
        };
        match msg {
            None | Some(ChannelMsg::Close) => break,
            Some(ChannelMsg::Data { data }) => o.stdout.extend_from_slice(&data),
            Some(ChannelMsg::ExtendedData { data, ext: 1 }) => o.stderr.extend_from_slice(&data),
            Some(ChannelMsg::ExitStatus { exit_status }) => o.status = Some(exit_status),
            Some(ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, .. }) => {
                o.signal = Some((format!("{signal_name:?}"), core_dumped, error_message))
            }
            Some(ChannelMsg::Eof) => o.eof = true,
            Some(_) => {}
        }
    }
    o
}

/// Whether a process exists at all (a zombie counts as existing).
pub fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

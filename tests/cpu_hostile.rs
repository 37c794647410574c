//! The `cpu` client against a hostile server (an in-process russh server on loopback that
//! accepts any key): channels the server opens are refused, a flood of forwarded connections
//! to the 9P back-channel's port is refused past a few, and a 9P back-channel flooded by a
//! remote that never reads the replies cannot keep cpu from ending when the server goes.

mod cpu_support;

use std::borrow::Cow;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cpu_support::*;
use russh::server::{Auth, Handler, Msg, Session};
use russh::{Channel, ChannelId};

/// What the hostile server does once the client runs its command.
#[derive(Clone, Copy, PartialEq)]
enum Plan {
    /// Opens session, agent, direct-tcpip and x11 channels to the client, then exits 3.
    OpenChannels,
    /// Floods the 9P back-channel with requests and reads none of the replies.
    Flood9p,
    /// Opens forwarded connections to the client's forward that never send a nonce (as any
    /// local user of the remote machine can, by connecting to the forwarded loopback port),
    /// then exits 3.
    ForwardFlood,
}

/// Forwarded connections the ForwardFlood plan opens.
const FORWARD_FLOOD: usize = 300;

#[derive(Default)]
struct Record {
    /// (channel type, whether the client accepted it)
    opened: Vec<(&'static str, bool)>,
    flood_bytes: usize,
    /// ForwardFlood: (accepted, refused) forwarded connections.
    forwards: (usize, usize),
}

struct Hostile {
    plan: Plan,
    record: Arc<Mutex<Record>>,
    nonce: Option<String>,
    forward: Option<(String, u32)>,
    sessions: Vec<Channel<Msg>>,
}

const FAKE_FORWARD_PORT: u32 = 40_123;

impl Handler for Hostile {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        self.sessions.push(channel);
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "CPUNONCE" {
            self.nonce = Some(value.to_string());
        }
        session.channel_success(channel)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        *port = FAKE_FORWARD_PORT;
        self.forward = Some((address.to_string(), FAKE_FORWARD_PORT));
        Ok(true)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let handle = session.handle();
        let record = self.record.clone();
        match self.plan {
            Plan::OpenChannels => {
                tokio::spawn(async move {
                    let mut opened = Vec::new();
                    opened.push(("session", handle.channel_open_session().await.is_ok()));
                    opened.push(("auth-agent@openssh.com", handle.channel_open_agent().await.is_ok()));
                    let direct = handle.channel_open_direct_tcpip("127.0.0.1", 22, "127.0.0.1", 5555).await;
                    opened.push(("direct-tcpip", direct.is_ok()));
                    opened.push(("x11", handle.channel_open_x11("127.0.0.1", 6010).await.is_ok()));
                    record.lock().unwrap().opened = opened;
                    let _ = handle.exit_status_request(channel, 3).await;
                    let _ = handle.eof(channel).await;
                    let _ = handle.close(channel).await;
                });
            }
            Plan::ForwardFlood => {
                let Some((address, port)) = self.forward.clone() else {
                    return Ok(());
                };
                tokio::spawn(async move {
                    // Held open, silent: each waits for a nonce that never comes.
                    let mut held = Vec::new();
                    let mut refused = 0;
                    for i in 0..FORWARD_FLOOD {
                        let origin_port = 20_000 + i as u32;
                        match handle
                            .channel_open_forwarded_tcpip(address.clone(), port, "127.0.0.1", origin_port)
                            .await
                        {
                            Ok(ch) => held.push(ch),
                            Err(_) => refused += 1,
                        }
                    }
                    record.lock().unwrap().forwards = (held.len(), refused);
                    let _ = handle.exit_status_request(channel, 3).await;
                    let _ = handle.eof(channel).await;
                    let _ = handle.close(channel).await;
                    // Until the client disconnects.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(held);
                });
            }
            Plan::Flood9p => {
                let (Some(nonce), Some((address, port))) = (self.nonce.clone(), self.forward.clone()) else {
                    return Ok(());
                };
                tokio::spawn(async move {
                    let Ok(ch) = handle.channel_open_forwarded_tcpip(address, port, "127.0.0.1", 5555).await
                    else {
                        return;
                    };
                    // Keep the reading half and never read it: the replies pile up.
                    let (unread, writer) = ch.split();
                    let mut w = writer.make_writer();
                    use tokio::io::AsyncWriteExt;
                    if w.write_all(nonce.as_bytes()).await.is_err() {
                        return;
                    }
                    // Tversion msize=8192 "9P2000.L", over and over (bounded).
                    let mut msg = Vec::new();
                    let version = b"9P2000.L";
                    let size = 4 + 1 + 2 + 4 + 2 + version.len();
                    msg.extend_from_slice(&(size as u32).to_le_bytes());
                    msg.push(100);
                    msg.extend_from_slice(&0xffffu16.to_le_bytes());
                    msg.extend_from_slice(&8192u32.to_le_bytes());
                    msg.extend_from_slice(&(version.len() as u16).to_le_bytes());
                    msg.extend_from_slice(version);
                    // Small writes: many SSH messages, more than russh queues per channel.
                    let batch: Vec<u8> = msg.iter().copied().cycle().take(msg.len() * 100).collect();
                    for _ in 0..3000 {
                        if w.write_all(&batch).await.is_err() {
                            break;
                        }
                        record.lock().unwrap().flood_bytes += batch.len();
                    }
                    drop(unread);
                });
            }
        }
        Ok(())
    }
}

/// Serves one connection with `plan`; returns the port and what happened, and the raw fd of
/// the accepted socket (to cut the connection from outside the server's loop).
/// The raw descriptor of the hostile server's accepted socket, once there is one.
type SocketFd = Arc<Mutex<Option<i32>>>;

fn start_hostile(plan: Plan) -> (u16, Arc<Mutex<Record>>, SocketFd) {
    let record = Arc::new(Mutex::new(Record::default()));
    let fd = Arc::new(Mutex::new(None));
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let (r, f) = (record.clone(), fd.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            port_tx.send(listener.local_addr().expect("addr").port()).expect("port");
            let Ok(Ok((stream, _))) = tokio::time::timeout(Duration::from_secs(60), listener.accept()).await
            else {
                return;
            };
            *f.lock().unwrap() = Some(stream.as_raw_fd());
            let config = russh::server::Config {
                keys: vec![cpu_all::ssh::hostkey::generate_ed25519().expect("host key")],
                methods: russh::MethodSet::from(&[russh::MethodKind::PublicKey][..]),
                auth_rejection_time: Duration::ZERO,
                // Little room for the client's replies, so its 9P server soon waits on us.
                window_size: 32 * 1024,
                server_id: russh::SshId::Standard(Cow::Borrowed("SSH-2.0-hostile")),
                ..Default::default()
            };
            let handler = Hostile { plan, record: r, nonce: None, forward: None, sessions: Vec::new() };
            if let Ok(running) = russh::server::run_stream(Arc::new(config), stream, handler).await {
                let _ = tokio::time::timeout(Duration::from_secs(60), running).await;
            }
        });
    });
    let port = port_rx.recv_timeout(Duration::from_secs(10)).expect("hostile server start");
    (port, record, fd)
}

#[test]
fn server_opened_channels_are_refused() {
    let home = Home::new();
    let (port, record, _fd) = start_hostile(Plan::OpenChannels);
    let out = run_cpu(&home, &["-9p=false", "-sp", &port.to_string(), "127.0.0.1", "true"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    let opened = record.lock().unwrap().opened.clone();
    assert_eq!(
        opened,
        [("session", false), ("auth-agent@openssh.com", false), ("direct-tcpip", false), ("x11", false)],
        "{stderr}"
    );
    assert_eq!(stderr.matches("refused a").count(), 4, "{stderr}");
}

#[test]
fn a_flood_of_forwarded_connections_is_refused_past_sixteen() {
    let home = Home::new();
    let (port, record, _fd) = start_hostile(Plan::ForwardFlood);
    let out = run_cpu(&home, &["-sp", &port.to_string(), "127.0.0.1", "true"], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // Each accepted one waits 30 s for its nonce; the flood takes far less, so none ended.
    assert_eq!(record.lock().unwrap().forwards, (16, FORWARD_FLOOD - 16), "{stderr}");
    assert_eq!(stderr.matches("16 already open").count(), 1, "one warning, not one per refusal: {stderr}");
}

#[test]
fn a_flooded_9p_channel_cannot_keep_cpu_alive_after_the_server_goes() {
    let home = Home::new();
    let (port, record, fd) = start_hostile(Plan::Flood9p);
    let mut cmd = cpu_command(&home, &["-sp", &port.to_string(), "127.0.0.1", "true"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn cpu");
    // Wait (bounded) until the flood has filled what it can: a megabyte or more, then no
    // progress for a second (the server's loop is stuck on the replies it does not read).
    let start = Instant::now();
    let (mut last, mut still_since) = (0, Instant::now());
    while start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
        let now = record.lock().unwrap().flood_bytes;
        if now != last {
            (last, still_since) = (now, Instant::now());
        } else if now >= 1 << 20 && still_since.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    let flooded = record.lock().unwrap().flood_bytes;
    // The server goes away: its socket is shut down under its (stalled) loop.
    let raw = fd.lock().unwrap().expect("the server accepted a connection");
    // SAFETY: shutdown(2) on a socket descriptor the server thread still owns; it does not
    // close it, only ends the TCP stream in both directions.
    unsafe { libc::shutdown(raw, libc::SHUT_RDWR) };
    let cut = Instant::now();
    let out = wait_output(child, CHILD_TIMEOUT);
    let took = cut.elapsed();
    println!("FIGURE cpu-exit-after-server-gone-under-9p-flood-ms {} ms", took.as_millis());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(flooded >= 1 << 20, "the flood never got going ({flooded} bytes): {stderr}");
    assert_eq!(out.status.code(), Some(255), "cpu after the server went ({took:?}): {stderr}");
}

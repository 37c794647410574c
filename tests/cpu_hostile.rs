//! The `cpu` client against a hostile server (an in-process russh server on loopback that
//! accepts any key): channels the server opens are refused, a flood of forwarded connections
//! to the 9P back-channel's port is refused past a few, and a 9P back-channel flooded by a
//! remote that never reads the replies cannot keep cpu from ending when the server goes, nor
//! can a request stuck in the client's file system (the open of a FIFO nobody writes).

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
    /// Opens a FIFO of the export for reading over 9P (the open blocks on the client machine
    /// until a writer comes, and none does), then, once released, exits 3.
    OpenFifo,
}

/// Forwarded connections the ForwardFlood plan opens.
const FORWARD_FLOOD: usize = 300;
/// Then forwarded connections for a port of no forward of cpu's.
const UNKNOWN_FORWARD_FLOOD: usize = 50;

#[derive(Default)]
struct Record {
    /// (channel type, whether the client accepted it)
    opened: Vec<(&'static str, bool)>,
    flood_bytes: usize,
    /// ForwardFlood: (accepted, refused) forwarded connections.
    forwards: (usize, usize),
    /// ForwardFlood: forwarded connections for a port cpu never asked for that it refused.
    unknown_refused: usize,
    /// OpenFifo: the 9P replies received (version, attach, walk; the open never answers).
    replies: Vec<String>,
    /// OpenFifo: set by the test once the open is seen blocked; the session then ends.
    release: bool,
}

struct Hostile {
    plan: Plan,
    record: Arc<Mutex<Record>>,
    nonce: Option<String>,
    forward: Option<(String, u32)>,
    sessions: Vec<Channel<Msg>>,
}

const FAKE_FORWARD_PORT: u32 = 40_123;

/// Ends the session as a server does: exit status 3, EOF, close.
async fn end_session(handle: &russh::server::Handle, channel: ChannelId) {
    let _ = handle.exit_status_request(channel, 3).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

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
                    end_session(&handle, channel).await;
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
                    // Then connections for a port cpu never asked for: each refused.
                    let mut unknown_refused = 0;
                    for i in 0..UNKNOWN_FORWARD_FLOOD {
                        let origin_port = 30_000 + i as u32;
                        let other = if port == 65535 { port - 1 } else { port + 1 };
                        if handle
                            .channel_open_forwarded_tcpip(address.clone(), other, "127.0.0.1", origin_port)
                            .await
                            .is_err()
                        {
                            unknown_refused += 1;
                        }
                    }
                    record.lock().unwrap().unknown_refused = unknown_refused;
                    end_session(&handle, channel).await;
                    // Until the client disconnects.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(held);
                });
            }
            Plan::OpenFifo => {
                let (Some(nonce), Some((address, port))) = (self.nonce.clone(), self.forward.clone()) else {
                    return Ok(());
                };
                tokio::spawn(async move {
                    use cpu_all::ninep::wire::*;
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(ch) = handle.channel_open_forwarded_tcpip(address, port, "127.0.0.1", 5555).await
                    else {
                        return;
                    };
                    let mut stream = ch.into_stream();
                    let mut out = nonce.into_bytes();
                    let version = Version { msize: 8192, version: "9P2000.L".into() };
                    out.extend(encode_tmessage(NOTAG, &Tmessage::Version(version)));
                    let attach = Tattach {
                        fid: 0,
                        afid: NOFID,
                        uname: "u".into(),
                        aname: "".into(),
                        n_uname: u32::MAX,
                    };
                    out.extend(encode_tmessage(1, &Tmessage::Attach(attach)));
                    let walk = Twalk { fid: 0, newfid: 1, names: vec!["fifo".into()] };
                    out.extend(encode_tmessage(2, &Tmessage::Walk(walk)));
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    let read_replies = async {
                        for _ in 0..3 {
                            let mut size = [0u8; 4];
                            stream.read_exact(&mut size).await?;
                            let mut frame = size.to_vec();
                            frame.resize(u32::from_le_bytes(size) as usize, 0);
                            stream.read_exact(&mut frame[4..]).await?;
                            let reply = match decode_rmessage(&frame) {
                                Ok((tag, r)) => format!("{tag} {r:?}"),
                                Err(e) => format!("undecodable: {e:?}"),
                            };
                            record.lock().unwrap().replies.push(reply);
                        }
                        Ok::<(), std::io::Error>(())
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(30), read_replies).await;
                    // Only now the open: requests in flight together run in parallel.
                    let open = encode_tmessage(3, &Tmessage::Lopen(Tlopen { fid: 1, flags: 0 }));
                    if stream.write_all(&open).await.is_err() {
                        return;
                    }
                    // Until the test has seen the open blocked (bounded).
                    let released = Instant::now();
                    while !record.lock().unwrap().release && released.elapsed() < Duration::from_secs(60) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    end_session(&handle, channel).await;
                    // The 9P channel stays open: ending it is the client's job.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(stream);
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
    // For no forward of ours: all refused, and one warning on the user's terminal, not 50.
    assert_eq!(record.lock().unwrap().unknown_refused, UNKNOWN_FORWARD_FLOOD, "{stderr}");
    assert_eq!(stderr.matches("no such forward").count(), 1, "one warning, not one per refusal: {stderr}");
}

/// Whether a thread of process `pid` waits in the open of a FIFO (for the other end).
fn waits_in_a_fifo_open(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| {
        let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
        wchan == "wait_for_partner" || wchan == "fifo_open"
    })
}

#[test]
fn a_9p_request_stuck_on_a_fifo_does_not_keep_cpu_alive_after_the_session() {
    let home = Home::new();
    let export = home.path().join("export");
    std::fs::create_dir(&export).expect("export dir");
    let fifo =
        std::ffi::CString::new(export.join("fifo").into_os_string().into_encoded_bytes()).expect("path");
    // SAFETY: mkfifo reads a NUL-terminated path that lives for the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    let (port, record, _fd) = start_hostile(Plan::OpenFifo);
    let root = export.to_str().expect("utf-8 path");
    let mut cmd = cpu_command(&home, &["-sp", &port.to_string(), "-root", root, "127.0.0.1", "true"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn cpu");
    // Bounded wait until one of cpu's threads is inside the FIFO's open.
    let start = Instant::now();
    let mut blocked = false;
    while !blocked && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
        blocked = waits_in_a_fifo_open(child.id());
    }
    record.lock().unwrap().release = true;
    let ended = Instant::now();
    let out = wait_output(child, CHILD_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let replies = record.lock().unwrap().replies.clone();
    assert!(blocked, "no thread of cpu waited in the FIFO's open; 9P replies {replies:?}: {stderr}");
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_eq!(out.status.code(), Some(3), "cpu after the session ended ({:?}): {stderr}", ended.elapsed());
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

//! cpud against hostile peers on loopback: connection floods, key-exchange floods, bad DH
//! values, abusive env requests. The attackers bind 127.0.0.2, 127.0.0.3, ... (all on lo);
//! the legitimate client comes from 127.0.0.1. Every loop is bounded in count and time.
//!
//! Timings are printed ("FIGURE name value unit"), never asserted; `bench/sshd.bench` runs
//! the ignored `figures` test against the static binary to collect them.

#[path = "common/skip.rs"]
mod skip;
mod sshd_support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sshd_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- raw SSH, just enough to attack a key exchange ----

const MSG_KEXINIT: u8 = 20;
const MSG_KEXDH_INIT: u8 = 30;
const MSG_KEXDH_REPLY: u8 = 31;

fn ssh_string(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// An unencrypted binary packet (RFC 4253 section 6) around `payload`.
fn packet(payload: &[u8]) -> Vec<u8> {
    let pad = 8 - (payload.len() + 5) % 8 + 8;
    let mut v = ((payload.len() + pad + 1) as u32).to_be_bytes().to_vec();
    v.push(pad as u8);
    v.extend_from_slice(payload);
    v.resize(v.len() + pad, 0u8);
    v
}

fn kexinit(kex: &str) -> Vec<u8> {
    kexinit_padded(kex, "")
}

/// A KEXINIT whose every name-list but the last two ends in `junk` (made-up names).
fn kexinit_padded(kex: &str, junk: &str) -> Vec<u8> {
    let mut p = vec![MSG_KEXINIT];
    p.extend_from_slice(&[0x5a; 16]);
    for (i, list) in [
        kex,
        "ssh-ed25519,rsa-sha2-256,ecdsa-sha2-nistp256",
        "aes128-ctr,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
        "aes128-ctr,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        let list = if i < 8 { format!("{list}{junk}") } else { list.to_string() };
        p.extend(ssh_string(list.as_bytes()));
    }
    p.extend_from_slice(&[0, 0, 0, 0, 0]);
    packet(&p)
}

fn kexdh_init(e_mpint: &[u8]) -> Vec<u8> {
    let mut p = vec![MSG_KEXDH_INIT];
    p.extend(ssh_string(e_mpint));
    packet(&p)
}

/// 2^2047 + 3 as an mpint: inside group14's range, three bits set, costs the attacker nothing.
fn cheap_valid_e() -> Vec<u8> {
    let mut e = vec![0u8; 257];
    e[1] = 0x80;
    e[256] = 3;
    e
}

/// The server's side of a raw connection: its identification line, then clear packets.
struct RawPeer {
    stream: TcpStream,
    buf: Vec<u8>,
    banner_read: bool,
}

impl RawPeer {
    async fn connect(source: Ipv4Addr, port: u16) -> std::io::Result<RawPeer> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from((source, 0)))?;
        let stream = sock.connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
        Ok(RawPeer { stream, buf: Vec::new(), banner_read: false })
    }

    async fn fill(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// The payload of the next packet; None when the server closed the connection.
    async fn next_payload(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        while !self.banner_read {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                self.buf.drain(..=end);
                self.banner_read = true;
            } else if self.buf.len() > 1024 || !self.fill().await? {
                return Ok(None);
            }
        }
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
                if len > 40_000 {
                    return Err(std::io::Error::other(format!("absurd packet length {len}")));
                }
                if self.buf.len() >= 4 + len {
                    let pad = self.buf[4] as usize;
                    let packet: Vec<u8> = self.buf.drain(..4 + len).collect();
                    let end = (4 + len).saturating_sub(pad);
                    return Ok(Some(packet.get(5..end).unwrap_or_default().to_vec()));
                }
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// Reads packets until one of type `want` (Some(payload)) or the end (None).
    async fn wait_for(&mut self, want: u8) -> std::io::Result<Option<Vec<u8>>> {
        while let Some(p) = self.next_payload().await? {
            if p.first() == Some(&want) {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
}

/// One group14 key exchange with a constant public value: the server computes, we do not.
/// Ok(true) when the server answered with KEXDH_REPLY.
async fn one_dh_exchange(source: Ipv4Addr, port: u16, e: &[u8]) -> std::io::Result<bool> {
    let mut peer = RawPeer::connect(source, port).await?;
    let mut hello = b"SSH-2.0-flood\r\n".to_vec();
    hello.extend(kexinit("diffie-hellman-group14-sha256"));
    peer.stream.write_all(&hello).await?;
    if peer.wait_for(MSG_KEXINIT).await?.is_none() {
        return Ok(false);
    }
    peer.stream.write_all(&kexdh_init(e)).await?;
    Ok(peer.wait_for(MSG_KEXDH_REPLY).await?.is_some())
}

// ---- attacks running beside a test ----

#[derive(Debug, Default)]
struct AttackCounts {
    idle_connects: AtomicU64,
    kex_answered: AtomicU64,
    kex_failed: AtomicU64,
}

/// Idle connections and key-exchange floods from other loopback sources, on a thread of
/// their own, until dropped (or 120 s, whichever comes first).
struct Attack {
    stop: Arc<AtomicBool>,
    counts: Arc<AttackCounts>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attack {
    /// `idle`: (sources, connections per source) that connect and never speak, reconnecting
    /// when dropped; `floods`: loops of group14 exchanges, one source each. Sources are
    /// 127.0.0.2 upwards.
    fn start(port: u16, idle: (u8, usize), floods: u8) -> Attack {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(AttackCounts::default());
        let (s, c) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let hard_stop = Instant::now() + Duration::from_secs(120);
                let running = move |s: &AtomicBool| !s.load(Ordering::SeqCst) && Instant::now() < hard_stop;
                let mut tasks = tokio::task::JoinSet::new();
                for src in 0..idle.0 {
                    let source = Ipv4Addr::new(127, 0, 0, 2 + src);
                    for _ in 0..idle.1 {
                        let (s, c) = (s.clone(), c.clone());
                        tasks.spawn(async move {
                            while running(&s) {
                                if let Ok(mut peer) = RawPeer::connect(source, port).await {
                                    c.idle_connects.fetch_add(1, Ordering::Relaxed);
                                    // Hold it, saying nothing, until the server drops it.
                                    while running(&s) {
                                        match tokio::time::timeout(Duration::from_millis(200), peer.fill())
                                            .await
                                        {
                                            Ok(Ok(true)) | Err(_) => {}
                                            Ok(_) => break,
                                        }
                                    }
                                }
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        });
                    }
                }
                for f in 0..floods {
                    let source = Ipv4Addr::new(127, 0, 0, 2 + idle.0 + f);
                    let (s, c) = (s.clone(), c.clone());
                    tasks.spawn(async move {
                        while running(&s) {
                            let e = cheap_valid_e();
                            match tokio::time::timeout(
                                Duration::from_secs(30),
                                one_dh_exchange(source, port, &e),
                            )
                            .await
                            {
                                Ok(Ok(true)) => c.kex_answered.fetch_add(1, Ordering::Relaxed),
                                _ => {
                                    tokio::time::sleep(Duration::from_millis(20)).await;
                                    c.kex_failed.fetch_add(1, Ordering::Relaxed)
                                }
                            };
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            });
        });
        Attack { stop, counts, thread: Some(thread) }
    }

    fn counts(&self) -> String {
        format!(
            "{} idle connects, {} key exchanges answered, {} failed",
            self.counts.idle_connects.load(Ordering::Relaxed),
            self.counts.kex_answered.load(Ordering::Relaxed),
            self.counts.kex_failed.load(Ordering::Relaxed)
        )
    }
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- cpud as a child process, for its memory and descriptors ----

struct Cpud {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl Cpud {
    fn start(bin: &str, authorized_keys: &std::path::Path) -> Cpud {
        let mut child = Command::new(bin)
            .args(["cpud", "-listen", "127.0.0.1", "-sp", "0", "-pk"])
            .arg(authorized_keys)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cpud");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let l = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(p) = line.split("Listening on 127.0.0.1:").nth(1) {
                    let _ = port_tx.send(p.trim().parse::<u16>().unwrap_or(0));
                }
                let mut log = l.lock().unwrap_or_else(|p| p.into_inner());
                log.push(line);
                if log.len() > 400 {
                    log.drain(..200);
                }
            }
        });
        let port = match port_rx.recv_timeout(TIMEOUT) {
            Ok(p) if p != 0 => p,
            _ => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "cpud did not start ({status:?}): {:?}",
                    log.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        };
        Cpud { child, port, log }
    }

    fn status_kb(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(0)
    }

    fn threads(&self) -> u64 {
        self.status_kb("Threads:")
    }

    /// CPU time cpud has used so far (user and system), in milliseconds.
    fn cpu_ms(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // After the command name in parentheses: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<u64> = rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
        let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        // SAFETY: sysconf only reads a configuration value.
        let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
        ticks * 1000 / per_second
    }

    /// The lines kept so far (the last few hundred).
    fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn log_tail(&self) -> String {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter().rev().take(15).rev().cloned().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Cpud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One login from 127.0.0.1 with a command; returns how long it took, or why it failed.
async fn login(port: u16, key: &std::path::Path) -> Result<Duration, String> {
    let start = Instant::now();
    let client = tokio::time::timeout(TIMEOUT, connect(port, key))
        .await
        .map_err(|_| format!("no login within {TIMEOUT:?}"))??;
    let mut ch = client.handle.channel_open_session().await.map_err(|e| format!("session: {e}"))?;
    ch.exec(true, "echo in").await.map_err(|e| format!("exec: {e}"))?;
    let o = collect(&mut ch).await;
    if text(&o.stdout) != "in\n" || o.status != Some(0) {
        return Err(format!("unexpected session outcome {o:?}"));
    }
    Ok(start.elapsed())
}

/// Median and maximum round trip of one byte through `cat` on an established session.
async fn echo_round_trips(client: &TestClient, rounds: usize) -> Result<(Duration, Duration), String> {
    let mut ch = client.handle.channel_open_session().await.map_err(|e| format!("session: {e}"))?;
    ch.exec(true, "exec cat").await.map_err(|e| format!("exec: {e}"))?;
    let mut times = Vec::new();
    for i in 0..rounds {
        let byte = [b'a' + (i % 26) as u8];
        let start = Instant::now();
        ch.data(&byte[..]).await.map_err(|e| format!("data: {e}"))?;
        loop {
            match tokio::time::timeout(TIMEOUT, ch.wait()).await {
                Ok(Some(russh::ChannelMsg::Data { data })) if data.as_ref() == byte => break,
                Ok(Some(russh::ChannelMsg::Data { data })) => {
                    return Err(format!("echo {data:?}, sent {byte:?}"))
                }
                Ok(Some(_)) => {}
                other => return Err(format!("echo session ended: {other:?}")),
            }
        }
        times.push(start.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = ch.eof().await;
    times.sort();
    Ok((times[times.len() / 2], times[times.len() - 1]))
}

fn figure(name: &str, value: impl std::fmt::Display, unit: &str) {
    println!("FIGURE {name} {value} {unit}");
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The scenario of issue 12: 500 idle connections from 5 sources and 5 group14 flood loops
/// from 5 more, while 127.0.0.1 logs in and an established session echoes. Asserts that
/// every login works and memory stays bounded; prints the timings.
async fn flood_scenario(bin: &str, tag: &str) {
    let dir = TempDir::new(tag);
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let cpud = Cpud::start(bin, &ak);
    let idle_fds = cpud.fds();
    let baseline = login(cpud.port, &key)
        .await
        .unwrap_or_else(|e| panic!("login without attack: {e}\n{}", cpud.log_tail()));
    figure("sshd-login-idle-ms", ms(baseline), "ms");
    let established = connect(cpud.port, &key).await.expect("established session before the attack");
    let (median, _) = echo_round_trips(&established, 10).await.expect("echo before the attack");
    figure("sshd-echo-rtt-idle-ms", ms(median), "ms");

    let attack = Attack::start(cpud.port, (5, 100), 5);
    // The attack is in full swing once every idle connection has been made once and every
    // flood loop has had an exchange answered (bounded; a slow start is said, not fatal).
    let swinging = || {
        attack.counts.idle_connects.load(Ordering::Relaxed) >= 5 * 100
            && attack.counts.kex_answered.load(Ordering::Relaxed) >= 5
    };
    let ramp = Instant::now();
    let deadline = ramp + TIMEOUT;
    while !swinging() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !swinging() {
        eprintln!("the attack was not in full swing after {TIMEOUT:?}: {}", attack.counts());
    }
    eprintln!("attack in full swing after {:?}: {}", ramp.elapsed(), attack.counts());
    let mut worst = Duration::ZERO;
    let mut rss_peak = 0;
    let mut anon_peak = 0;
    for i in 0..5 {
        let took = login(cpud.port, &key).await.unwrap_or_else(|e| {
            panic!("login {i} under attack failed: {e} ({})\n{}", attack.counts(), cpud.log_tail())
        });
        worst = worst.max(took);
        rss_peak = rss_peak.max(cpud.status_kb("VmRSS:"));
        anon_peak = anon_peak.max(cpud.status_kb("RssAnon:"));
    }
    let (echo_median, echo_max) = echo_round_trips(&established, 20)
        .await
        .unwrap_or_else(|e| panic!("established session under attack: {e}\n{}", cpud.log_tail()));
    rss_peak = rss_peak.max(cpud.status_kb("VmRSS:"));
    anon_peak = anon_peak.max(cpud.status_kb("RssAnon:"));
    let fds_during = cpud.fds();
    let threads_during = cpud.threads();
    eprintln!("attack: {}", attack.counts());
    let answered = attack.counts.kex_answered.load(Ordering::Relaxed);
    drop(attack);
    figure("sshd-login-under-flood-worst-ms", ms(worst), "ms");
    figure("sshd-echo-rtt-under-flood-median-ms", ms(echo_median), "ms");
    figure("sshd-echo-rtt-under-flood-max-ms", ms(echo_max), "ms");
    figure("sshd-flood-kex-answered", answered, "exchanges");
    figure("cpud-rss-under-flood-kb", rss_peak, "kb");
    figure("cpud-rss-anon-under-flood-kb", anon_peak, "kb");
    figure("cpud-fds-under-flood", fds_during, "fds");
    figure("cpud-threads-under-flood", threads_during, "threads");
    assert!(anon_peak < 32 * 1024, "cpud allocated {anon_peak} kB under attack");

    // Once the attackers are gone, cpud's descriptors come back down (bounded wait).
    drop(established);
    // (An async wait: the client's own connections close on this runtime.)
    let deadline = Instant::now() + Duration::from_secs(20);
    while cpud.fds() > idle_fds + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = cpud.fds() <= idle_fds + 2;
    figure("cpud-fds-after-flood", cpud.fds(), "fds");
    figure("cpud-rss-after-flood-kb", cpud.status_kb("VmRSS:"), "kb");
    assert!(
        settled,
        "cpud holds {} descriptors after the attack, {idle_fds} before\n{}",
        cpud.fds(),
        cpud.log_tail()
    );
    login(cpud.port, &key)
        .await
        .unwrap_or_else(|e| panic!("login after the attack: {e}\n{}", cpud.log_tail()));
}

/// A session on `client` runs `echo ok`: the server still serves logged-in clients.
async fn assert_a_command_runs(client: &TestClient) {
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.exec(true, "echo ok").await.expect("exec");
    assert_eq!(text(&collect(&mut ch).await.stdout), "ok\n");
}

#[tokio::test]
async fn a_legitimate_login_gets_through_idle_and_key_exchange_floods_from_other_sources() {
    flood_scenario(BIN, "flood").await;
}

/// `bench/sshd.bench`: the same scenario against CPU_ALL_BIN (the static binary).
#[tokio::test]
#[ignore]
async fn figures() {
    let bin = std::env::var("CPU_ALL_BIN").unwrap_or_else(|_| BIN.to_string());
    flood_scenario(&bin, "figures").await;
    env_flood_scenario(&bin).await;
    rekey_scenario(&bin).await;
}

/// The re-exchange figures alone, against CPU_ALL_BIN.
#[tokio::test]
#[ignore]
async fn rekey_figures() {
    let bin = std::env::var("CPU_ALL_BIN").unwrap_or_else(|_| BIN.to_string());
    rekey_scenario(&bin).await;
}

/// One unauthenticated connection asking for group14 re-exchanges (at most 200): how many
/// cpud serves, and the CPU it spends on them.
async fn rekey_scenario(bin: &str) {
    let dir = TempDir::new("rekeyfig");
    let key = keygen(&dir, "id", "ed25519");
    let cpud = Cpud::start(bin, &authorized(&dir, &public_line(&key)));
    let before = cpud.cpu_ms();
    let started = Instant::now();
    let served = rekey_without_login(cpud.port, russh::kex::DH_G14_SHA256, 200).await;
    let served = served.map_or_else(|| "200 (all)".to_string(), |n| n.to_string());
    figure("sshd-preauth-group14-rekeys-served", served, "exchanges");
    figure("sshd-preauth-group14-rekeys-wall-ms", started.elapsed().as_millis(), "ms");
    figure("cpud-cpu-for-one-unauthenticated-connection-ms", cpud.cpu_ms().saturating_sub(before), "ms");
}

// ---- key exchange ----

#[tokio::test]
async fn only_fixed_cost_key_exchanges_are_offered() {
    let dir = TempDir::new("kexlist");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    let mut peer = RawPeer::connect(Ipv4Addr::new(127, 0, 0, 2), server.port).await.expect("connect");
    peer.stream.write_all(b"SSH-2.0-probe\r\n").await.expect("write");
    let offer = tokio::time::timeout(TIMEOUT, peer.wait_for(MSG_KEXINIT))
        .await
        .expect("no KEXINIT in time")
        .expect("read")
        .expect("server closed before KEXINIT");
    let len = u32::from_be_bytes(offer[17..21].try_into().expect("4 bytes")) as usize;
    let names = String::from_utf8_lossy(&offer[21..21 + len]).into_owned();
    assert_eq!(
        names,
        "mlkem768x25519-sha256,curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,\
         diffie-hellman-group14-sha256,ext-info-s,kex-strict-s-v00@openssh.com"
    );
    // A client that insists on group18 finds nothing in common.
    let mut peer = RawPeer::connect(Ipv4Addr::new(127, 0, 0, 2), server.port).await.expect("connect");
    let mut hello = b"SSH-2.0-probe\r\n".to_vec();
    hello.extend(kexinit(
        "diffie-hellman-group18-sha512,diffie-hellman-group16-sha512,diffie-hellman-group14-sha1",
    ));
    peer.stream.write_all(&hello).await.expect("write");
    let reply = tokio::time::timeout(TIMEOUT, async {
        peer.wait_for(MSG_KEXINIT).await?;
        peer.stream.write_all(&kexdh_init(&cheap_valid_e())).await?;
        peer.wait_for(MSG_KEXDH_REPLY).await
    })
    .await
    .expect("server neither answered nor closed");
    assert!(matches!(reply, Ok(None) | Err(_)), "group18 was negotiated: {reply:?}");
}

#[tokio::test]
async fn a_dh_public_value_with_one_bit_set_is_refused() {
    let dir = TempDir::new("dh2");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    let (src, port) = (Ipv4Addr::new(127, 0, 0, 2), server.port);
    let exchange = |e: Vec<u8>| async move {
        tokio::time::timeout(TIMEOUT, one_dh_exchange(src, port, &e)).await.expect("no answer in time")
    };
    // The control: a valid (if lazy) value gets a KEXDH_REPLY, so the refusals below mean something.
    assert!(matches!(exchange(cheap_valid_e()).await, Ok(true)), "a valid e was not answered");
    for e in [vec![2u8], vec![1u8], vec![0x01, 0, 0, 0], {
        let mut big = vec![0u8; 257];
        big[1] = 0x80;
        big
    }] {
        let r = exchange(e.clone()).await;
        assert!(matches!(r, Ok(false) | Err(_)), "e = {e:02x?} got a KEXDH_REPLY");
    }
    // The server is fine afterwards.
    let client = connect(server.port, &key).await.expect("login after the bad exchanges");
    assert_a_command_runs(&client).await;
}

#[tokio::test]
async fn a_pseudo_algorithm_first_in_the_kex_list_cannot_switch_off_the_dh_check() {
    let dir = TempDir::new("pseudokex");
    let key = keygen(&dir, "id", "ed25519");
    // Without the CPU limit before login (see the padded-KEXINIT test).
    let server = TestServer::start_with(Some(authorized(&dir, &public_line(&key))), |c| {
        c.preauth_cpu_floor = Duration::MAX
    });
    // cpud's kex list holds ext-info-s and kex-strict-s-v00@openssh.com; named first by a
    // client they passed for the negotiated exchange (not modp) while russh, skipping them,
    // ran group14 unchecked and outside the modp gate: e = 2 was answered.
    for first in ["ext-info-s", "kex-strict-s-v00@openssh.com"] {
        let kex = format!("{first},diffie-hellman-group14-sha256");
        let exchange = |e: Vec<u8>| {
            let k = kexinit(&kex);
            async move {
                match tokio::time::timeout(TIMEOUT, exchange_after(server.port, k, &e)).await {
                    Ok(r) => matches!(r, Ok(true)),
                    Err(_) => panic!("{first} first: the server neither answered nor closed"),
                }
            }
        };
        assert!(exchange(cheap_valid_e()).await, "{first} first: the control was not served");
        assert!(!exchange(vec![2]).await, "{first} first: e = 2 was answered");
    }
}

/// A group14 exchange with public value `e` after `kexinit`; Ok(true) when the server
/// answers with KEXDH_REPLY.
async fn exchange_after(port: u16, kexinit: Vec<u8>, e: &[u8]) -> std::io::Result<bool> {
    let mut peer = RawPeer::connect(Ipv4Addr::new(127, 0, 0, 2), port).await?;
    let mut hello = b"SSH-2.0-padded\r\n".to_vec();
    hello.extend(kexinit);
    peer.stream.write_all(&hello).await?;
    if peer.wait_for(MSG_KEXINIT).await?.is_none() {
        return Ok(false);
    }
    if peer.stream.write_all(&kexdh_init(e)).await.is_err() {
        return Ok(false);
    }
    Ok(peer.wait_for(MSG_KEXDH_REPLY).await?.is_some())
}

#[tokio::test]
async fn a_kexinit_padded_past_35000_bytes_cannot_switch_off_the_dh_check() {
    let dir = TempDir::new("bigkexinit");
    let key = keygen(&dir, "id", "ed25519");
    // Without the CPU limit before login, which would hide the reply of an exchange computed
    // unchecked (and ungated) behind a cut connection.
    let server = TestServer::start_with(Some(authorized(&dir, &public_line(&key))), |c| {
        c.preauth_cpu_floor = Duration::MAX
    });
    // The clear-text inspection (kexcheck: DH values, the modp gate) followed packets up to
    // 35000 bytes (RFC 4253's minimum) and silently stopped at a longer one; russh takes up
    // to 256 KiB, so a KEXINIT padded with made-up algorithm names switched both checks off
    // (e = 2 was answered). (Spread over the name-lists: russh refuses one much over 16 KiB.)
    let padded = |names: usize| {
        let junk: String = (0..names).map(|i| format!(",x{i:05}@example.com")).collect();
        kexinit_padded("diffie-hellman-group14-sha256", &junk)
    };
    let run = |kexinit: Vec<u8>, e: Vec<u8>| async move {
        let len = kexinit.len();
        match tokio::time::timeout(TIMEOUT, exchange_after(server.port, kexinit, &e)).await {
            Ok(r) => (len, matches!(r, Ok(true))),
            Err(_) => panic!("a {len}-byte KEXINIT: the server neither answered nor closed"),
        }
    };
    // The control: padded, but under 35000 bytes, the exchange is served, and e = 2 is not.
    let (len, served) = run(padded(180), cheap_valid_e()).await;
    assert!(len < 35_000 && served, "the control, a {len}-byte KEXINIT, was not served");
    let (len, served) = run(padded(180), vec![2]).await;
    assert!(len < 35_000 && !served, "e = 2 was answered after a {len}-byte KEXINIT");
    // Over 35000 bytes: refused, with either value.
    for e in [vec![2], cheap_valid_e()] {
        let (len, served) = run(padded(250), e.clone()).await;
        assert!(len > 35_000 && !served, "a {len}-byte KEXINIT was served (e of {} bytes)", e.len());
    }
    // A real client still gets in.
    let client = connect(server.port, &key).await.expect("login");
    assert_a_command_runs(&client).await;
}

// ---- strict key exchange (Terrapin) ----

/// Sends the identification line and `packets` as given, then a group14 KEXDH_INIT once the
/// server's KEXINIT is in; Ok(true) when the server answers with KEXDH_REPLY.
async fn exchange_with(port: u16, packets: &[Vec<u8>]) -> std::io::Result<bool> {
    let mut peer = RawPeer::connect(Ipv4Addr::new(127, 0, 0, 2), port).await?;
    let mut hello = b"SSH-2.0-terrapin\r\n".to_vec();
    hello.extend(packets.concat());
    peer.stream.write_all(&hello).await?;
    if peer.wait_for(MSG_KEXINIT).await?.is_none() {
        return Ok(false);
    }
    // The server may already have closed: a failed write is a refusal too.
    if peer.stream.write_all(&kexdh_init(&cheap_valid_e())).await.is_err() {
        return Ok(false);
    }
    Ok(peer.wait_for(MSG_KEXDH_REPLY).await?.is_some())
}

#[tokio::test]
async fn with_strict_key_exchange_no_other_message_may_enter_the_first_exchange() {
    let dir = TempDir::new("terrapin");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    let ignore = packet(&[2, 0, 0, 0, 0]);
    let plain = kexinit("diffie-hellman-group14-sha256");
    let strict = kexinit("diffie-hellman-group14-sha256,kex-strict-c-v00@openssh.com");
    let run = |packets: Vec<Vec<u8>>| async move {
        match tokio::time::timeout(TIMEOUT, exchange_with(server.port, &packets)).await {
            Ok(Ok(answered)) => answered,
            Ok(Err(_)) => false,
            Err(_) => panic!("the server neither answered nor closed within {TIMEOUT:?}"),
        }
    };
    // The control: without strict kex an SSH_MSG_IGNORE anywhere is fine (RFC 4253).
    assert!(run(vec![ignore.clone(), plain.clone()]).await, "plain, IGNORE first");
    assert!(run(vec![plain, ignore.clone()]).await, "plain, IGNORE after KEXINIT");
    assert!(run(vec![strict.clone()]).await, "strict, nothing injected");
    // Strict: the KEXINIT must be the first packet and nothing else may come before NEWKEYS,
    // which is what defeats the sequence-number shift of Terrapin (CVE-2023-48795).
    assert!(!run(vec![ignore.clone(), strict.clone()]).await, "strict KEXINIT after an IGNORE was served");
    assert!(!run(vec![strict, ignore]).await, "an IGNORE inside a strict exchange was accepted");
}

// ---- key re-exchanges before authentication ----

/// A client that counts finished key exchanges (the first included).
struct KexCounter {
    done: Arc<AtomicU64>,
    finished: Arc<tokio::sync::Notify>,
}

impl russh::client::Handler for KexCounter {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        _names: &russh::Names,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        self.done.fetch_add(1, Ordering::SeqCst);
        self.finished.notify_one();
        Ok(())
    }
}

/// Connects without authenticating and asks for key re-exchanges one after another, at most
/// `rounds`; returns how many were served before the server closed the connection (None: all
/// of them, the connection still open).
async fn rekey_without_login(port: u16, kex: russh::kex::Name, rounds: u64) -> Option<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(tokio::sync::Notify::new());
    let config = russh::client::Config {
        preferred: russh::Preferred { kex: std::borrow::Cow::Owned(vec![kex]), ..russh::Preferred::DEFAULT },
        ..Default::default()
    };
    let stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let handler = KexCounter { done: done.clone(), finished: finished.clone() };
    let handle =
        russh::client::connect_stream(Arc::new(config), stream, handler).await.expect("first exchange");
    for round in 1..=rounds {
        let before = done.load(Ordering::SeqCst);
        if handle.is_closed() || handle.rekey_soon().await.is_err() {
            return Some(round - 1);
        }
        let wait = async {
            let mut asked = Instant::now();
            while done.load(Ordering::SeqCst) == before && !handle.is_closed() {
                // Bounded by the timeout below; the poll catches a close without a wake-up.
                let _ = tokio::time::timeout(Duration::from_millis(100), finished.notified()).await;
                // A request that met an exchange still finishing may be dropped: ask again.
                if asked.elapsed() > Duration::from_secs(2) {
                    let _ = handle.rekey_soon().await;
                    asked = Instant::now();
                }
            }
        };
        if tokio::time::timeout(TIMEOUT, wait).await.is_err() {
            panic!("re-exchange {round}: neither finished nor closed within {TIMEOUT:?}");
        }
        if handle.is_closed() {
            return Some(round - 1);
        }
    }
    None
}

#[tokio::test]
async fn an_unauthenticated_client_that_keeps_re_exchanging_keys_is_cut() {
    let dir = TempDir::new("rekey");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    // Each re-exchange costs cpud what the first did (a group14 one tens of milliseconds,
    // the client nothing): before login only a few are served, then the connection is cut.
    const ROUNDS: u64 = 200;
    let served = rekey_without_login(server.port, russh::kex::CURVE25519, ROUNDS).await;
    let served = served.unwrap_or_else(|| panic!("{ROUNDS} key re-exchanges served before authentication"));
    eprintln!("FIGURE preauth_rekeys_served {served} count");
    assert!(served < ROUNDS);
    // A legitimate login is unaffected, and so is a re-exchange after it.
    let client = connect(server.port, &key).await.expect("login");
    client.handle.rekey_soon().await.expect("re-exchange after login");
    assert_a_command_runs(&client).await;
}

// ---- per-connection limits ----

#[tokio::test]
async fn authentication_attempts_past_ten_end_the_connection() {
    let dir = TempDir::new("authtries");
    let key = keygen(&dir, "id", "ed25519");
    let stranger = keygen(&dir, "stranger", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    let stranger = russh::keys::load_secret_key(&stranger, None).expect("load key");
    let stream = TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect");
    let config = Arc::new(russh::client::Config::default());
    let mut handle = russh::client::connect_stream(config, stream, AnyHost).await.expect("key exchange");
    let mut refused = 0;
    let mut ended = None;
    for attempt in 1..=30 {
        let key = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(stranger.clone()), None);
        match tokio::time::timeout(TIMEOUT, handle.authenticate_publickey("tester", key)).await {
            Err(_) => panic!("attempt {attempt}: no answer within {TIMEOUT:?}"),
            Ok(Ok(r)) if !r.success() => refused += 1,
            Ok(Ok(_)) => panic!("attempt {attempt}: an unauthorized key was accepted"),
            Ok(Err(e)) => {
                ended = Some(format!("attempt {attempt}: {e}"));
                break;
            }
        }
        if handle.is_closed() {
            ended = Some(format!("closed after attempt {attempt}"));
            break;
        }
    }
    let ended = ended.unwrap_or_else(|| panic!("30 refused attempts and the connection is still open"));
    // Ten are answered; the 11th gets a disconnect, which russh's client reports as a refusal.
    assert!(refused <= 11, "{refused} attempts refused before the end ({ended})");
}

#[tokio::test]
async fn rejected_keys_from_many_connections_cannot_flood_cpuds_log() {
    let dir = TempDir::new("logflood");
    let key = keygen(&dir, "id", "ed25519");
    let stranger = keygen(&dir, "stranger", "ed25519");
    let cpud = Cpud::start(BIN, &authorized(&dir, &public_line(&key)));
    let stranger = russh::keys::load_secret_key(&stranger, None).expect("load key");
    // 2 sources x 8 connections (the per-source limit) x 10 attempts (the per-connection one):
    // 16 handshakes at once, all admitted (MaxStartups starts dropping above 16).
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for source in 2..4u8 {
        for _ in 0..8 {
            let stranger = stranger.clone();
            let port = cpud.port;
            tasks.spawn(async move {
                let Ok(peer) = RawPeer::connect(Ipv4Addr::new(127, 0, 0, source), port).await else {
                    return 0;
                };
                let config = Arc::new(russh::client::Config::default());
                let Ok(mut handle) = russh::client::connect_stream(config, peer.stream, AnyHost).await else {
                    return 0;
                };
                let mut refused = 0;
                for _ in 0..10 {
                    let key = russh::keys::PrivateKeyWithHashAlg::new(Arc::new(stranger.clone()), None);
                    match tokio::time::timeout(TIMEOUT, handle.authenticate_publickey("x", key)).await {
                        Ok(Ok(r)) if !r.success() => refused += 1,
                        _ => break,
                    }
                }
                refused
            });
        }
    }
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        refused += r.expect("attacker task");
    }
    let took = started.elapsed();
    // Bounded wait for cpud's last lines to reach us.
    let count = || cpud.log_lines().iter().filter(|l| l.contains("rejected")).count();
    let settle = Instant::now();
    let mut shown = count();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = count();
        if now == shown || settle.elapsed() > TIMEOUT {
            break;
        }
        shown = now;
    }
    // 20 lines per 10 s window: the bound only grows when the machine is slow.
    let windows = took.as_secs() / 10 + 2;
    eprintln!("FIGURE preauth-log-lines {shown} lines for {refused} rejected keys in {took:?}");
    assert!(refused >= 100, "only {refused} keys were tried: {}", cpud.log_tail());
    assert!(shown as u64 <= 20 * windows, "{shown} rejection lines for {refused} attempts in {took:?}");
    // The owner still gets in, and says so in the log.
    login(cpud.port, &key)
        .await
        .unwrap_or_else(|e| panic!("login after the flood: {e}\n{}", cpud.log_tail()));
}

#[tokio::test]
async fn channels_and_forwards_per_connection_are_capped() {
    let dir = TempDir::new("caps");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    let client = connect(server.port, &key).await.expect("login");
    // Sessions that never start a command: 64 at once, then ResourceShortage, one by one.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..80 {
        match client.handle.channel_open_session().await {
            Ok(ch) => open.push(ch),
            Err(russh::Error::ChannelOpenFailure(russh::ChannelOpenFailure::ResourceShortage)) => {
                refused += 1
            }
            Err(e) => panic!("after {} sessions: {e}", open.len()),
        }
    }
    assert_eq!((open.len(), refused), (64, 16));
    // A port in use is refused (and no forward is counted for it).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = u32::from(taken.local_addr().expect("addr").port());
    assert!(client.handle.tcpip_forward("127.0.0.1", taken_port).await.is_err(), "port in use");
    // Forwards: 16 at once, loopback only; a cancelled one makes room.
    let mut ports = Vec::new();
    for _ in 0..20 {
        if let Ok(p) = client.handle.tcpip_forward("127.0.0.1", 0).await {
            ports.push(p);
        }
    }
    assert_eq!(ports.len(), 16, "forwards granted: {ports:?}");
    client.handle.cancel_tcpip_forward("127.0.0.1", ports[0]).await.expect("cancel");
    client.handle.tcpip_forward("127.0.0.1", 0).await.expect("a forward after a cancel");
    // The connection still works: one of the sessions runs a command, and once the others
    // are closed a new one opens.
    let mut first = open.remove(0);
    first.exec(true, "echo ok").await.expect("exec");
    assert_eq!(text(&collect(&mut first).await.stdout), "ok\n");
    for ch in open {
        ch.close().await.expect("close");
    }
    let mut again = None;
    for _ in 0..100 {
        // The server forgets a closed session when its task ends: bounded retries.
        match client.handle.channel_open_session().await {
            Ok(ch) => {
                again = Some(ch);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let mut again = again.expect("no session could be opened after closing the others");
    again.exec(true, "echo again").await.expect("exec");
    assert_eq!(text(&collect(&mut again).await.stdout), "again\n");
}

// ---- env requests ----

/// Sends `vars` as env requests (want-reply) on a fresh session of `client`, then
/// `exec cmd`; returns the replies in order and the command's stdout.
async fn env_session(
    client: &TestClient,
    vars: Vec<(String, String)>,
    cmd: &str,
) -> (Vec<bool>, String, Option<u32>) {
    let ch = client.handle.channel_open_session().await.expect("session");
    let (mut rx, tx) = ch.split();
    let expected = vars.len() + 1;
    let cmd = cmd.to_string();
    // Sent by a task while replies are read here: russh queues replies per channel.
    let sender = tokio::spawn(async move {
        for (n, v) in vars {
            tx.set_env(true, n, v).await.map_err(|e| e.to_string())?;
        }
        tx.exec(true, cmd.into_bytes()).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(tx)
    });
    let mut replies = Vec::new();
    let mut stdout = Vec::new();
    let mut status = None;
    loop {
        match tokio::time::timeout(TIMEOUT, rx.wait()).await {
            Ok(Some(russh::ChannelMsg::Success)) if replies.len() < expected => replies.push(true),
            Ok(Some(russh::ChannelMsg::Failure)) if replies.len() < expected => replies.push(false),
            Ok(Some(russh::ChannelMsg::Data { data })) => stdout.extend_from_slice(&data),
            Ok(Some(russh::ChannelMsg::ExtendedData { data, .. })) => eprintln!("stderr: {}", text(&data)),
            Ok(Some(russh::ChannelMsg::ExitStatus { exit_status })) => status = Some(exit_status),
            Ok(None | Some(russh::ChannelMsg::Close)) => break,
            Ok(Some(_)) => {}
            Err(_) => panic!("session did not end within {TIMEOUT:?}; {} replies so far", replies.len()),
        }
    }
    let _writer = sender.await.expect("sender task").expect("sending requests");
    (replies, text(&stdout), status)
}

#[tokio::test]
async fn env_requests_past_1024_or_256_kib_are_refused_one_by_one() {
    let dir = TempDir::new("envcap");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    let client = connect(server.port, &key).await.expect("connect");
    // A second session on the same connection, started first, must not notice anything.
    let mut bystander = client.handle.channel_open_session().await.expect("bystander session");
    bystander.exec(true, "read line; echo got $line").await.expect("bystander exec");

    // PATH and V0..V1022 make 1024 ordinary variables (the cpu form's environment is exactly
    // what the client sent).
    let mut vars: Vec<(String, String)> = vec![("PATH".into(), "/usr/bin:/bin".into())];
    vars.extend((0..1100).map(|i| (format!("V{i}"), format!("{i}"))));
    vars.insert(5, ("BAD=NAME".into(), "x".into()));
    vars.push(("CPU_MSIZE".into(), "65536".into()));
    let (replies, out, status) =
        env_session(&client, vars, " 'sh' '-c' 'echo $V0 $V1022 ${V1023-unset} ${V1099-unset}'").await;
    let accepted = replies.iter().filter(|r| **r).count();
    // 1024 ordinary variables, then refusals; the bad name refused; CPU_MSIZE (a protocol variable) and exec accepted.
    assert_eq!(accepted, 1024 + 2, "replies: {replies:?}");
    assert!(!replies[5], "a name with '=' was accepted");
    assert!(replies[..1025].iter().enumerate().all(|(i, r)| *r || i == 5));
    assert_eq!(out, "0 1022 unset unset\n");
    assert!(replies[replies.len() - 2], "CPU_MSIZE, past the cap, was refused");
    assert_eq!(status, Some(0));

    // Size: eight 30 kB values fit in 256 KiB, the ninth does not; a small one still does.
    let big = "x".repeat(30_000);
    let mut vars = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
    vars.extend((b'A'..=b'I').map(|c| ((c as char).to_string(), big.clone())));
    vars.push(("Z".to_string(), "small".to_string()));
    let (replies, out, _) = env_session(&client, vars, " 'sh' '-c' 'echo ${#A} ${#H} ${I-unset} $Z'").await;
    let mut expected = vec![true; 9];
    expected.extend([false, true, true]);
    assert_eq!(replies, expected);
    assert_eq!(out, "30000 30000 unset small\n");

    bystander.data(&b"still here\n"[..]).await.expect("bystander data");
    let o = collect(&mut bystander).await;
    assert_eq!(text(&o.stdout), "got still here\n");
}

#[tokio::test]
async fn an_env_flood_neither_grows_cpud_nor_stalls_another_connection() {
    env_flood_scenario(BIN).await;
}

/// 2,000 env requests of 30 kB on one connection while another connection's session echoes.
async fn env_flood_scenario(bin: &str) {
    let dir = TempDir::new("envflood");
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let cpud = Cpud::start(bin, &ak);
    let before = cpud.status_kb("RssAnon:");
    let victim = connect(cpud.port, &key).await.expect("victim connects");
    // 2,000 x 30 kB: 60 MB if cpud kept it all. The flooder has a thread and runtime of its
    // own, so its encryption work does not delay the victim's measurements here.
    let value = "y".repeat(30_000);
    let vars: Vec<(String, String)> = (0..2000).map(|i| (format!("F{i}"), value.clone())).collect();
    let (port, flood_key) = (cpud.port, key.clone());
    let flood = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let flooder = connect(port, &flood_key).await.expect("flooder connects");
            env_session(&flooder, vars, "echo flooded").await
        })
    });
    let (median, max) = echo_round_trips(&victim, 10).await.expect("victim's session during the flood");
    let (replies, out, _) =
        tokio::task::spawn_blocking(move || flood.join()).await.expect("join task").expect("flood thread");
    let after = cpud.status_kb("RssAnon:");
    figure("sshd-echo-rtt-under-env-flood-median-ms", ms(median), "ms");
    figure("sshd-echo-rtt-under-env-flood-max-ms", ms(max), "ms");
    figure("cpud-rss-anon-after-env-flood-kb", after, "kb");
    // 256 KiB per session: eight 30 kB values fit, then exec.
    assert_eq!(replies.iter().filter(|r| **r).count(), 8 + 1, "eight 30 kB values fit, then exec");
    assert_eq!(out, "flooded\n");
    assert!(after < before + 16 * 1024, "cpud grew from {before} kB to {after} kB");
}

// ---- user keys: short RSA, SHA-1 signatures ----

/// Authenticates with `key` signing with `hash` (None: `ssh-rsa`, SHA-1); Ok(success).
async fn try_key(
    port: u16,
    key: russh::keys::PrivateKey,
    hash: Option<russh::keys::HashAlg>,
) -> Result<bool, String> {
    let config = Arc::new(russh::client::Config::default());
    let stream = TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let mut handle =
        russh::client::connect_stream(config, stream, AnyHost).await.map_err(|e| e.to_string())?;
    let auth = handle
        .authenticate_publickey("tester", russh::keys::PrivateKeyWithHashAlg::new(Arc::new(key), hash))
        .await
        .map_err(|e| e.to_string())?;
    Ok(auth.success())
}

struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

#[tokio::test]
async fn ssh_rsa_sha1_signatures_are_refused_and_rsa_sha2_works() {
    let dir = TempDir::new("sha1");
    let rsa = keygen(&dir, "id_rsa", "rsa");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&rsa))));
    let load = || russh::keys::load_secret_key(&rsa, None).expect("load rsa key");
    use russh::keys::HashAlg;
    assert_eq!(try_key(server.port, load(), None).await, Ok(false), "ssh-rsa (SHA-1) was accepted");
    assert_eq!(try_key(server.port, load(), Some(HashAlg::Sha256)).await, Ok(true), "rsa-sha2-256");
    assert_eq!(try_key(server.port, load(), Some(HashAlg::Sha512)).await, Ok(true), "rsa-sha2-512");
    // OpenSSH's ssh, made to use ssh-rsa, is refused too; by default it uses rsa-sha2.
    let mut c = ssh_command(server.port, &rsa);
    c.args(["-o", "PubkeyAcceptedAlgorithms=ssh-rsa", "127.0.0.1", "echo in"]);
    let out = run_timeout(c, None, TIMEOUT);
    assert_eq!(out.status.code(), Some(255), "ssh-rsa login: {}", text(&out.stderr));
    let out = ssh(server.port, &rsa, "echo in", None);
    assert_eq!(text(&out.stdout), "in\n", "rsa-sha2 login: {}", text(&out.stderr));
}

/// A PKCS#1 RSA key of `bits` made by openssl (ssh-keygen refuses under 1024), or why not.
fn openssl_rsa(dir: &TempDir, bits: u32) -> Result<russh::keys::PrivateKey, String> {
    let path = dir.join(&format!("rsa{bits}.pem"));
    let mut c = Command::new("openssl");
    c.args(["genrsa", "-traditional", "-out"]).arg(&path).arg(bits.to_string()).stdin(Stdio::null());
    match c.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return Err(format!("openssl genrsa {bits} failed: {}", text(&o.stderr))),
        Err(e) => return Err(format!("openssl not available: {e}")),
    }
    russh::keys::load_secret_key(&path, None).map_err(|e| format!("russh cannot load a PKCS#1 key: {e}"))
}

#[tokio::test]
async fn rsa_user_keys_under_1024_bits_are_refused() {
    let dir = TempDir::new("rsa768");
    let (short, control) = match (openssl_rsa(&dir, 768), openssl_rsa(&dir, 2048)) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) | (_, Err(e)) => {
            skip::skip("sshd_hostile short RSA keys", &e);
            return;
        }
    };
    let line = |k: &russh::keys::PrivateKey| k.public_key().to_openssh().expect("public key line");
    let server =
        TestServer::start(Some(authorized(&dir, &format!("{}\n{}\n", line(&short), line(&control)))));
    use russh::keys::HashAlg;
    assert_eq!(
        try_key(server.port, control, Some(HashAlg::Sha256)).await,
        Ok(true),
        "the 2048-bit control key"
    );
    assert_eq!(
        try_key(server.port, short, Some(HashAlg::Sha256)).await,
        Ok(false),
        "a 768-bit key was accepted"
    );
}

// ---- forwarded connections whose local end stops reading ----

#[tokio::test]
async fn a_forward_whose_local_end_stops_reading_cannot_stall_the_session() {
    if Command::new("python3").arg("-c").arg("pass").output().is_err() {
        skip::here("needs python3 (a reader with a small socket buffer)");
        return;
    }
    let dir = TempDir::new("fwdstall");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    let mut client = connect(server.port, &key).await.expect("connect");
    let port = client.handle.tcpip_forward("127.0.0.1", 0).await.expect("forward");
    let mut session = client.handle.channel_open_session().await.expect("session");
    // A background holder connects to the forward (with a small receive buffer) and never
    // reads; the command itself ends after a second. The holder is killed by PID at the end.
    let pidfile = dir.join("holder.pid");
    let holder = format!(
        "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)\ns.connect((\"127.0.0.1\", {port}))\ntime.sleep(40)"
    );
    let cmd = format!(
        "python3 -c '{holder}' </dev/null >/dev/null 2>&1 & echo $! > {}; sleep 1; echo done",
        pidfile.display()
    );
    session.exec(true, cmd.as_bytes()).await.expect("exec");
    let fwd = tokio::time::timeout(TIMEOUT, client.forwarded.recv())
        .await
        .expect("no forwarded connection")
        .expect("forwarded channel");
    let (mut fwd_read, fwd_write) = fwd.channel.split();
    tokio::spawn(async move { while fwd_read.wait().await.is_some() {} });
    // 32 MB toward a reader that never reads (bounded; errors end it once the channel closes).
    let flood = tokio::spawn(async move {
        let chunk = vec![0x55u8; 32 << 10];
        let mut sent = 0usize;
        for _ in 0..1024 {
            if fwd_write.data(&chunk[..]).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    let start = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(20), collect(&mut session)).await;
    if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
        // SAFETY: kill(2) on the holder this test started (its PID from the pidfile).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let o = outcome.unwrap_or_else(|_| {
        panic!("the session did not end within 20 s: cpud's loop is stuck on the forward")
    });
    figure("sshd-session-end-with-stalled-forward-ms", ms(start.elapsed()), "ms");
    assert_eq!(text(&o.stdout), "done\n", "stderr: {}", text(&o.stderr));
    assert_eq!(o.status, Some(0));
    flood.abort();
    if let Ok(sent) = flood.await {
        eprintln!("the client got {sent} bytes into the forward");
    }
}

#[test]
fn openssh_logs_in_with_every_offered_key_exchange_and_not_with_others() {
    let dir = TempDir::new("kexssh");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(Some(authorized(&dir, &public_line(&key))));
    for kex in [
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256",
        "diffie-hellman-group14-sha256",
    ] {
        let mut c = ssh_command(server.port, &key);
        c.args(["-o", &format!("KexAlgorithms={kex}"), "127.0.0.1", "echo in"]);
        let out = run_timeout(c, None, TIMEOUT);
        assert_eq!(text(&out.stdout), "in\n", "{kex}: {}", text(&out.stderr));
    }
    for kex in [
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group14-sha1",
        "diffie-hellman-group-exchange-sha256",
    ] {
        let mut c = ssh_command(server.port, &key);
        c.args(["-o", &format!("KexAlgorithms={kex}"), "127.0.0.1", "echo in"]);
        let out = run_timeout(c, None, TIMEOUT);
        assert_eq!(out.status.code(), Some(255), "{kex} was negotiated: {}", text(&out.stdout));
        assert!(out.stdout.is_empty(), "{kex} ran the command");
    }
}

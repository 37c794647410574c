//! cpud seen through a russh client: the messages themselves (exit-signal, forwarded-tcpip
//! fields, ext-info), signals before exec, env handling, resizes, hang-up, garbage.

mod sshd_support;

#[path = "common/skip.rs"]
mod skip;

use std::io::{Read, Write};
use std::time::Duration;

use russh::{ChannelMsg, Sig};
use sshd_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads session output until it ends with `end` (other messages are skipped).
async fn read_until(ch: &mut russh::Channel<russh::client::Msg>, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while !out.ends_with(end) {
        match tokio::time::timeout(TIMEOUT, ch.wait()).await {
            Ok(Some(ChannelMsg::Data { data })) => out.extend_from_slice(&data),
            Ok(Some(_)) => {}
            other => panic!("session ended before {end:?}: {other:?}; got {out:?}"),
        }
    }
    out
}

fn setup(tag: &str) -> (TempDir, std::path::PathBuf, TestServer) {
    let dir = TempDir::new(tag);
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let server = TestServer::start(Some(ak));
    (dir, key, server)
}

#[tokio::test]
async fn exit_signal_names_the_signal_without_sig() {
    let (_dir, key, server) = setup("exitsig");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.exec(true, "kill -KILL $$").await.expect("exec");
    let o = collect(&mut ch).await;
    assert_eq!(o.status, None);
    assert_eq!(o.signal, Some(("KILL".to_string(), false, String::new())));
}

#[tokio::test]
async fn signals_before_exec_are_delivered_when_the_child_starts() {
    let (_dir, key, server) = setup("earlysig");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.signal(Sig::TERM).await.expect("signal");
    ch.exec(true, "exec sleep 20").await.expect("exec");
    let o = collect(&mut ch).await;
    assert_eq!(o.signal.map(|s| s.0), Some("TERM".to_string()));
}

#[tokio::test]
async fn signal_requests_reach_the_process_group() {
    let (_dir, key, server) = setup("sig");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.exec(true, "echo started; sleep 20; echo not reached").await.expect("exec");
    // Wait for the command to run, then interrupt it.
    let first = read_until(&mut ch, b"\n").await;
    assert_eq!(text(&first), "started\n");
    ch.signal(Sig::INT).await.expect("signal");
    let o = collect(&mut ch).await;
    assert_eq!(o.signal.map(|s| s.0), Some("INT".to_string()));
    assert!(o.stdout.is_empty());
}

#[tokio::test]
async fn cpu_form_env_is_exactly_what_the_client_sent() {
    let (_dir, key, server) = setup("env");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.set_env(true, "FOO", "first").await.expect("env");
    ch.set_env(true, "PWD", "/tmp").await.expect("env");
    ch.set_env(true, "PATH", "/usr/bin:/bin").await.expect("env");
    ch.set_env(true, "FOO", "last").await.expect("env");
    ch.exec(true, " 'sh' '-c' 'echo $FOO; pwd; echo ${HOME-unset}'").await.expect("exec");
    let o = collect(&mut ch).await;
    assert_eq!(text(&o.stdout), "last\n/tmp\nunset\n", "stderr: {}", text(&o.stderr));
    assert_eq!(o.status, Some(0));
}

#[tokio::test]
async fn empty_arguments_survive_the_cpu_form() {
    let (_dir, key, server) = setup("args");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.set_env(true, "PATH", "/usr/bin:/bin").await.expect("env");
    ch.exec(true, " 'sh' '-c' 'echo $#' 'zero' '' 'it'\"'\"'s'").await.expect("exec");
    let o = collect(&mut ch).await;
    assert_eq!(text(&o.stdout), "2\n", "stderr: {}", text(&o.stderr));
}

#[tokio::test]
async fn window_change_resizes_the_terminal() {
    let (_dir, key, server) = setup("winch");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[]).await.expect("pty");
    ch.exec(true, "stty size; read line; stty size").await.expect("exec");
    let first = read_until(&mut ch, b"\r\n").await;
    assert_eq!(text(&first), "24 80\r\n");
    ch.window_change(100, 40, 0, 0).await.expect("winch");
    ch.data(&b"go\n"[..]).await.expect("data");
    let o = collect(&mut ch).await;
    let out = text(&o.stdout);
    assert_eq!(out, "go\r\n40 100\r\n");
    assert_eq!(o.status, Some(0));
}

#[tokio::test]
async fn second_exec_and_late_env_are_refused() {
    let (_dir, key, server) = setup("twice");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.exec(true, "read x; echo $x").await.expect("exec");
    ch.exec(true, "echo second").await.expect("send");
    ch.set_env(true, "LATE", "1").await.expect("send");
    let mut replies = Vec::new();
    while replies.len() < 3 {
        match tokio::time::timeout(TIMEOUT, ch.wait()).await {
            Ok(Some(ChannelMsg::Success)) => replies.push(true),
            Ok(Some(ChannelMsg::Failure)) => replies.push(false),
            Ok(Some(_)) => {}
            other => panic!("channel ended early: {other:?}"),
        }
    }
    assert_eq!(replies, [true, false, false]);
    ch.data(&b"hello\n"[..]).await.expect("data");
    ch.eof().await.expect("eof");
    let o = collect(&mut ch).await;
    assert_eq!(text(&o.stdout), "hello\n");
}

#[tokio::test]
async fn server_sends_ext_info_with_rsa_sha2() {
    let dir = TempDir::new("extinfo");
    let key = keygen(&dir, "id_rsa", "rsa");
    let _ak = authorized(&dir, &public_line(&key));
    let server = TestServer::start(None);
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect");
    let config = std::sync::Arc::new(russh::client::Config::default());
    let handle = russh::client::connect_stream(config, stream, NullHandler).await.expect("handshake");
    let best = handle.best_supported_rsa_hash().await.expect("ext-info");
    assert_eq!(best, Some(Some(russh::keys::HashAlg::Sha512)));
}

struct NullHandler;
impl russh::client::Handler for NullHandler {
    type Error = russh::Error;
    async fn check_server_key(
        &mut self,
        _k: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

#[tokio::test]
async fn identification_string_is_not_old_openssh() {
    let (_dir, _key, server) = setup("ident");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.expect("connect");
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf)).await.expect("timeout").expect("read");
    let line = text(&buf[..n]);
    let first = line.lines().next().unwrap_or_default();
    assert_eq!(first, format!("SSH-2.0-cpu-all_{}", env!("CARGO_PKG_VERSION")));
    assert!(!first.contains("OpenSSH_"));
}

#[tokio::test]
async fn tcpip_forward_round_trip_echoes_address_and_originator() {
    let (_dir, key, server) = setup("fwdrt");
    let mut client = connect(server.port, &key).await.expect("connect");
    for address in ["127.0.0.1", "localhost"] {
        let port = client.handle.tcpip_forward(address, 0).await.expect("forward");
        assert!(port > 0);
        let mut sock =
            tokio::net::TcpStream::connect(("127.0.0.1", port as u16)).await.expect("connect forwarded");
        let local = sock.local_addr().expect("addr");
        let mut fwd =
            tokio::time::timeout(TIMEOUT, client.forwarded.recv()).await.expect("timeout").expect("channel");
        assert_eq!(fwd.connected_address, address);
        assert_eq!(fwd.connected_port, port);
        assert_eq!(fwd.originator_address, "127.0.0.1");
        assert_eq!(fwd.originator_port, u32::from(local.port()));
        sock.write_all(b"ping").await.expect("write");
        match tokio::time::timeout(TIMEOUT, fwd.channel.wait()).await {
            Ok(Some(ChannelMsg::Data { data })) => assert_eq!(&data[..], b"ping"),
            other => panic!("expected ping, got {other:?}"),
        }
        fwd.channel.data(&b"pong"[..]).await.expect("reply");
        let mut got = [0u8; 4];
        tokio::time::timeout(TIMEOUT, sock.read_exact(&mut got)).await.expect("timeout").expect("read");
        assert_eq!(&got, b"pong");
        // Cancel really closes the port (the Go cpud's never matches, P8).
        client.handle.cancel_tcpip_forward(address, port).await.expect("cancel");
        let again = tokio::net::TcpStream::connect(("127.0.0.1", port as u16)).await;
        assert!(again.is_err(), "port {port} still open after cancel");
    }
    for bad in ["0.0.0.0", "::", "192.0.2.1"] {
        assert!(client.handle.tcpip_forward(bad, 0).await.is_err(), "{bad} must be refused");
    }
}

#[tokio::test]
async fn hung_up_pty_session_is_killed_even_if_it_ignores_sighup() {
    let (_dir, key, server) = setup("hup");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[]).await.expect("pty");
    ch.exec(true, "trap '' HUP; echo pid=$$; exec sleep 1000").await.expect("exec");
    let out = read_until(&mut ch, b"\r\n").await;
    let pid: i32 = text(&out).trim().trim_start_matches("pid=").parse().expect("pid");
    assert!(process_exists(pid));
    let _ = client.handle.disconnect(russh::Disconnect::ByApplication, "bye", "").await;
    drop(ch);
    drop(client);
    let gone =
        tokio::task::spawn_blocking(move || wait_until(Duration::from_secs(10), || !process_exists(pid)))
            .await
            .unwrap_or(false);
    assert!(gone, "process {pid} survived its client");
}

#[tokio::test]
async fn tenants_count_running_sessions() {
    let (_dir, key, server) = setup("tenants");
    let client = connect(server.port, &key).await.expect("connect");
    let mut a = client.handle.channel_open_session().await.expect("a");
    a.exec(true, "read x").await.expect("exec a");
    let mut b = client.handle.channel_open_session().await.expect("b");
    b.exec(true, "read x").await.expect("exec b");
    let seen = tokio::task::spawn_blocking({
        let t = server.tenants.clone();
        move || wait_until(TIMEOUT, || t.lock().map(|v| v.contains(&2)).unwrap_or(false))
    })
    .await
    .unwrap_or(false);
    assert!(seen, "two running sessions were never counted");
    a.eof().await.expect("eof");
    b.eof().await.expect("eof");
    let _ = collect(&mut a).await;
    let _ = collect(&mut b).await;
    let t = server.tenants.clone();
    let done = tokio::task::spawn_blocking(move || {
        wait_until(TIMEOUT, || t.lock().map(|v| v.last() == Some(&0)).unwrap_or(false))
    })
    .await
    .unwrap_or(false);
    assert!(done);
    assert_eq!(*server.tenants.lock().expect("lock"), vec![1, 2, 1, 0]);
}

#[test]
fn garbage_and_silent_connections_are_dropped_without_disturbing_others() {
    let (_dir, key, server) = setup("garbage");
    let mut junk = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    let mut noise = b"SSH-2.0-junk\r\n".to_vec();
    noise.extend((0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8));
    let _ = junk.write_all(&noise);
    let silent = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    let out = ssh(server.port, &key, "echo fine", None);
    assert_eq!(text(&out.stdout), "fine\n", "{}", text(&out.stderr));
    for mut s in [junk, silent] {
        s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let mut buf = [0u8; 4096];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    break false
                }
                Err(_) => break true,
            }
        };
        assert!(closed, "the server kept a bad connection open");
    }
}

#[tokio::test]
async fn no_authentication_only_when_asked() {
    let dir = TempDir::new("noauth");
    let key = keygen(&dir, "id", "ed25519");
    let server = TestServer::start(None);
    let client = connect(server.port, &key).await.expect("any key is fine without -pk");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.exec(true, "echo open").await.expect("exec");
    assert_eq!(text(&collect(&mut ch).await.stdout), "open\n");
}

#[tokio::test]
async fn shell_request_runs_a_login_shell_in_home() {
    let (_dir, key, server) = setup("shell");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.set_env(true, "SHELL", "/bin/sh").await.expect("env");
    ch.set_env(true, "HOME", "/tmp").await.expect("env");
    ch.request_pty(true, "dumb", 80, 24, 0, 0, &[]).await.expect("pty");
    ch.request_shell(true).await.expect("shell");
    ch.data(&b"echo \"[$0] [$(pwd)] [$TERM]\"; exit 3\n"[..]).await.expect("data");
    let o = collect(&mut ch).await;
    let out = text(&o.stdout);
    assert!(out.contains("[-sh] [/tmp] [dumb]"), "{out:?}");
    assert_eq!(o.status, Some(3));
}

#[tokio::test]
async fn one_connection_runs_many_sessions_one_after_another() {
    let (_dir, key, server) = setup("seq");
    let client = connect(server.port, &key).await.expect("connect");
    for i in 0..80 {
        let mut ch =
            client.handle.channel_open_session().await.unwrap_or_else(|e| panic!("session {i}: {e}"));
        ch.exec(true, format!("echo {i}")).await.expect("exec");
        let o = collect(&mut ch).await;
        assert_eq!(text(&o.stdout), format!("{i}\n"));
    }
}

#[tokio::test]
async fn a_missing_shell_is_reported_with_status_127() {
    let (_dir, key, server) = setup("noshell");
    let client = connect(server.port, &key).await.expect("connect");
    let mut ch = client.handle.channel_open_session().await.expect("session");
    ch.set_env(true, "SHELL", "/nonexistent/shell").await.expect("env");
    ch.exec(true, "echo hi").await.expect("exec");
    let o = collect(&mut ch).await;
    assert_eq!(o.status, Some(127));
    assert!(text(&o.stderr).contains("cannot run /nonexistent/shell"), "{}", text(&o.stderr));
}

#[test]
fn too_many_unfinished_handshakes_from_one_source_are_shed_until_they_time_out() {
    let dir = TempDir::new("startups");
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    // A short waiting line keeps the test small; the source's handshakes fill it up.
    let server = TestServer::start_with(Some(ak), |c| c.admission.queue_per_source = 4);
    let limits = cpu_all::ssh::admission::AdmissionConfig::default();
    let per_source = limits.per_source + 4;
    let hogs: Vec<_> = (0..per_source)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect"))
        .collect();
    // Let the server register them all, then one more from the same address is dropped at once.
    std::thread::sleep(Duration::from_millis(300));
    let mut extra = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect");
    extra.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut buf = [0u8; 64];
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "handshake {} from one source was not shed",
        per_source + 1
    );
    // After the identification grace (2 s in tests) the hogs are gone and clients get in again.
    let ok = wait_until(TIMEOUT, || text(&ssh(server.port, &key, "echo in", None).stdout) == "in\n");
    assert!(ok);
    drop(hogs);
}

#[tokio::test]
async fn pty_req_terminal_modes_are_applied() {
    let (_dir, key, server) = setup("modes");
    let client = connect(server.port, &key).await.expect("connect");
    for (modes, expected) in
        [(vec![(russh::Pty::ECHO, 0)], "got secret\r\n"), (vec![], "secret\r\ngot secret\r\n")]
    {
        let mut ch = client.handle.channel_open_session().await.expect("session");
        ch.request_pty(true, "xterm", 80, 24, 0, 0, &modes).await.expect("pty");
        ch.exec(true, "echo ready; read x; echo got $x").await.expect("exec");
        read_until(&mut ch, b"ready\r\n").await;
        ch.data(&b"secret\n"[..]).await.expect("data");
        let o = collect(&mut ch).await;
        assert_eq!(text(&o.stdout), expected, "modes {modes:?}");
    }
}

/// Issue 5's hang behind "a wrong nonce ... the session goes on": a command that fills its
/// stdout pipe with sendfile/splice from a source served through this very cpud (9P over the
/// forwarded port in real life; here a TCP socket on a remote forward) holds the pipe's mutex
/// while it waits for the data. cpud used to read that pipe on its runtime thread, slept on
/// the mutex, and so could never deliver the data: the whole daemon froze. The lines are sent
/// through the forward a little apart, so busybox cat waits in sendfile (holding the pipe)
/// for each of them; all must come out, and a second connection must still be served.
#[tokio::test]
async fn splicing_command_output_from_a_forwarded_source_does_not_freeze_the_daemon() {
    let have = |p: &str| std::process::Command::new(p).arg("--help").output().is_ok();
    if !have("busybox") || !have("bash") {
        skip::here("needs busybox (its cat uses sendfile) and bash (/dev/tcp)");
        return;
    }
    let (_dir, key, server) = setup("splice");
    let mut client = connect(server.port, &key).await.expect("connect");
    let port = client.handle.tcpip_forward("127.0.0.1", 0).await.expect("forward");
    let mut session = client.handle.channel_open_session().await.expect("session");
    // cat is bounded by `timeout` so that a frozen daemon is released after the test failed.
    let cmd = format!("exec bash -c 'exec timeout 40 busybox cat </dev/tcp/127.0.0.1/{port}'");
    session.exec(true, cmd.as_bytes()).await.expect("exec");
    let fwd = tokio::time::timeout(TIMEOUT, client.forwarded.recv()).await.expect("no forwarded connection");
    let (mut fwd_read, fwd_write) = fwd.expect("forwarded channel").channel.split();
    // Nothing comes back on the forward; keep its queue drained anyway.
    tokio::spawn(async move { while fwd_read.wait().await.is_some() {} });
    let mut expected = String::new();
    let sender = tokio::spawn(async move {
        for round in 0..40 {
            let line = format!("line {round}\n");
            if fwd_write.data(line.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let _ = fwd_write.eof().await;
    });
    for round in 0..40 {
        expected.push_str(&format!("line {round}\n"));
    }
    let mut seen = Vec::new();
    let mut status = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match tokio::time::timeout_at(deadline, session.wait()).await {
            Ok(Some(ChannelMsg::Data { data })) => seen.extend_from_slice(&data),
            Ok(Some(ChannelMsg::ExitStatus { exit_status })) => status = Some(exit_status),
            Ok(None | Some(ChannelMsg::Close)) => break,
            Ok(Some(_)) => {}
            Err(_) => panic!("cpud froze: after 20 s the session had only {:?}", text(&seen)),
        }
    }
    let _ = sender.await;
    assert_eq!(text(&seen), expected);
    assert_eq!(status, Some(0));
    // The daemon still serves new connections.
    let other = connect(server.port, &key).await.expect("second connection");
    let mut ch = other.handle.channel_open_session().await.expect("session");
    ch.exec(true, &b"echo still-serving"[..]).await.expect("exec");
    assert_eq!(text(&collect(&mut ch).await.stdout), "still-serving\n");
}

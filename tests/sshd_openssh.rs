//! OpenSSH's `ssh` against an in-process cpud: exit codes, signals, stdin, stderr, pty,
//! authorized keys, remote forwards, the cpu-form exec string, concurrency.

mod sshd_support;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use sshd_support::*;

fn setup(tag: &str) -> (TempDir, std::path::PathBuf, TestServer) {
    let dir = TempDir::new(tag);
    let key = keygen(&dir, "id_ed25519", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let server = TestServer::start(Some(ak));
    (dir, key, server)
}

#[test]
fn exit_codes_are_passed_through() {
    let (_dir, key, server) = setup("exit");
    for code in [0, 1, 7] {
        let out = ssh(server.port, &key, &format!("exit {code}"), None);
        assert_eq!(out.status.code(), Some(code), "stderr: {}", text(&out.stderr));
    }
    // The same through the cpu form: cpud -remote runs the command and keeps its status.
    let out = ssh(server.port, &key, " 'sh' '-c' 'echo hi; exit 7'", None);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
}

#[test]
fn remote_signal_death_makes_openssh_exit_255() {
    // cpud reports exit-signal TERM (see sshd_protocol for the message itself); OpenSSH's
    // client has no exit status then and exits 255, as it does against OpenSSH's sshd.
    let (_dir, key, server) = setup("sig");
    let out = ssh(server.port, &key, "echo before; kill -TERM $$", None);
    assert_eq!(out.status.code(), Some(255), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "before\n");
}

#[test]
fn stdin_bytes_arrive_exactly_and_eof_ends_the_command() {
    let (_dir, key, server) = setup("stdin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let out = ssh(server.port, &key, "cat", Some(&data));
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "cat returned different bytes");
    let out = ssh(server.port, &key, "wc -c", Some(&data));
    assert_eq!(text(&out.stdout).trim(), "300000");
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let (_dir, key, server) = setup("stderr");
    let out = ssh(server.port, &key, "echo out; echo err >&2; echo out2", None);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "out\nout2\n");
    assert_eq!(text(&out.stderr), "err\n");
}

#[test]
fn exit_status_does_not_wait_for_stdin_eof() {
    // Pitfall P33: `sleep 100 | cpu host date` must not take 100 s.
    let (_dir, key, server) = setup("p33");
    let mut cmd = ssh_command(server.port, &key);
    cmd.arg("127.0.0.1").arg("echo done").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn ssh");
    let stdin = child.stdin.take(); // held open, never written
    let finished = wait_until(TIMEOUT, || matches!(child.try_wait(), Ok(Some(_))));
    if !finished {
        let _ = child.kill();
    }
    let _ = child.wait();
    drop(stdin);
    assert!(finished, "ssh kept running while its stdin stayed open");
    let mut out = String::new();
    let _ = child.stdout.take().map(|mut s| s.read_to_string(&mut out));
    assert_eq!(out, "done\n");
}

#[test]
fn pty_session_has_the_clients_size_and_term() {
    let (_dir, key, server) = setup("pty");
    let pair =
        cpu_all::ssh::pty::open(cpu_all::ssh::pty::WindowSize { cols: 101, rows: 33, ..Default::default() })
            .expect("open a pty for ssh");
    let mut cmd = ssh_command(server.port, &key);
    cmd.args(["-tt", "127.0.0.1", "stty size; echo TERM=$TERM"])
        .env("TERM", "vt100")
        .stdin(Stdio::from(pair.slave.try_clone().expect("dup")))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe; it only gives ssh its own session.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    let out = run_timeout(cmd, None, TIMEOUT);
    drop(pair);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stdout {stdout:?} stderr {}", text(&out.stderr));
    assert!(stdout.contains("33 101\r\n"), "{stdout:?}");
    assert!(stdout.contains("TERM=vt100\r\n"), "{stdout:?}");
}

#[test]
fn every_authorized_key_works_and_others_are_refused() {
    let dir = TempDir::new("keys");
    let ed = keygen(&dir, "id_ed25519", "ed25519");
    let ec = keygen(&dir, "id_ecdsa", "ecdsa");
    let rsa = keygen(&dir, "id_rsa", "rsa");
    let stranger = keygen(&dir, "id_stranger", "ed25519");
    let file = format!(
        "# test keys\n\n{}   \nno-agent-forwarding,from=\"127.0.0.1\" {}\n# rsa last\n{}",
        public_line(&ed).trim(),
        public_line(&ec).trim(),
        public_line(&rsa)
    );
    let ak = authorized(&dir, &file);
    let server = TestServer::start(Some(ak.clone()));
    for key in [&ed, &ec, &rsa] {
        let out = ssh(server.port, key, "echo ok", None);
        assert_eq!(text(&out.stdout), "ok\n", "{}: {}", key.display(), text(&out.stderr));
    }
    let out = ssh(server.port, &stranger, "echo ok", None);
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("Permission denied"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    // The file is read on every attempt: a removed key stops working at once.
    std::fs::write(&ak, public_line(&ec)).expect("rewrite");
    assert_eq!(ssh(server.port, &ed, "echo ok", None).status.code(), Some(255));
    assert_eq!(text(&ssh(server.port, &ec, "echo ok", None).stdout), "ok\n");
}

#[test]
fn remote_forward_allocates_a_loopback_port_and_refuses_others() {
    let (_dir, key, server) = setup("fwd");
    let mut cmd = ssh_command(server.port, &key);
    // -o LogLevel=INFO first: ssh keeps the first value of an option, and "Allocated port"
    // is logged at INFO.
    let mut info = std::process::Command::new("ssh");
    info.args(["-o", "LogLevel=INFO", "-o", "ExitOnForwardFailure=yes"]);
    info.args(cmd.get_args());
    info.env_remove("SSH_AUTH_SOCK").stdin(Stdio::null());
    info.args(["-R", "0:127.0.0.1:9", "127.0.0.1", "true"]);
    let out = run_timeout(info, None, TIMEOUT);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let port: u32 = err
        .split("Allocated port ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no allocated port in {err:?}"));
    assert!(port > 0 && port < 65536);
    cmd.args(["-o", "ExitOnForwardFailure=yes", "-R", "0.0.0.0:0:127.0.0.1:9", "127.0.0.1", "true"]);
    let out = run_timeout(cmd, None, TIMEOUT);
    assert_eq!(out.status.code(), Some(255), "a 0.0.0.0 forward must be refused");
    assert!(text(&out.stderr).contains("forwarding failed"), "{}", text(&out.stderr));
}

#[test]
fn local_forwarding_and_subsystems_are_refused() {
    let (_dir, key, server) = setup("refuse");
    let mut cmd = ssh_command(server.port, &key);
    cmd.args(["-s", "127.0.0.1", "sftp"]);
    let out = run_timeout(cmd, None, TIMEOUT);
    assert_ne!(out.status.code(), Some(0));
    let mut cmd = ssh_command(server.port, &key);
    cmd.args(["-W", "127.0.0.1:9", "127.0.0.1"]);
    let out = run_timeout(cmd, None, TIMEOUT);
    assert_eq!(out.status.code(), Some(255), "direct-tcpip must be refused: {}", text(&out.stderr));
}

#[test]
fn fifty_concurrent_sessions_all_succeed() {
    let (_dir, key, server) = setup("many");
    let port = server.port;
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let key = key.clone();
            std::thread::spawn(move || {
                let out = ssh(port, &key, &format!("echo session {i}"), None);
                (i, out)
            })
        })
        .collect();
    for t in threads {
        let (i, out) = t.join().expect("thread");
        assert!(out.status.success(), "session {i}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), format!("session {i}\n"));
    }
    let counts = server.tenants.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eq!(counts.len(), 100, "one enter and one leave per session");
    assert_eq!(counts.last(), Some(&0));
}

#[test]
fn a_vanished_client_leaves_no_process_behind() {
    let (_dir, key, server) = setup("vanish");
    let mut cmd = ssh_command(server.port, &key);
    cmd.args(["127.0.0.1", "echo $$; exec sleep 1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn ssh");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") && line.len() < 32 {
        match stdout.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => break,
        }
    }
    let pid: i32 = text(&line).trim().parse().unwrap_or_else(|_| panic!("no pid in {line:?}"));
    assert!(process_exists(pid));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        wait_until(Duration::from_secs(10), || !process_exists(pid)),
        "process {pid} outlived its client"
    );
}

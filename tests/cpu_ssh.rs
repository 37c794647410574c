//! The `cpu` client against OpenSSH's sshd on loopback: exit codes, signals, stdin/stdout/
//! stderr, host keys, user keys, ssh_config, a pty session, and the 9P back-channel's nonce
//! check (sshd's ForceCommand stands in for `cpud -remote`).

mod cpu_support;

#[path = "common/skip.rs"]
mod skip;

use std::time::Duration;

use cpu_support::{key_part, keygen, run_cpu, text, Home, PtyChild, Sshd};

fn port(s: &Sshd) -> String {
    s.port.to_string()
}

#[test]
fn exit_codes_0_1_7() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    for (cmd, want) in [(vec!["true"], 0), (vec!["false"], 1), (vec!["sh", "-c", "exit 7"], 7)] {
        let mut args = vec!["-9p=false", "-sp", &p, "127.0.0.1"];
        args.extend(cmd.iter());
        let out = run_cpu(&home, &args, None);
        assert_eq!(out.status.code(), Some(want), "{cmd:?}: stderr {}", text(&out.stderr));
    }
}

#[test]
fn remote_signal_gives_128_plus_n() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    // sshd reports a command killed by a signal with exit-signal (checked: "TERM", "KILL").
    for (script, want) in [("kill -TERM $$", 143), ("kill -KILL $$", 137)] {
        let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "sh", "-c", script], None);
        assert_eq!(out.status.code(), Some(want), "{script}: {}", text(&out.stderr));
    }
}

#[test]
fn stdin_pipe_and_eof_bytes_exact() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "cat"], Some(&data));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "bytes differ");
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "wc", "-c"], Some(&data));
    assert_eq!(text(&out.stdout).trim(), "300000");
}

#[test]
fn stdout_and_stderr_stay_separate() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let out = run_cpu(
        &home,
        &[
            "-9p=false",
            "-sp",
            &p,
            "127.0.0.1",
            "sh",
            "-c",
            "echo out1; echo err1 >&2; echo out2; echo err2 >&2",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    let err = text(&out.stderr);
    assert!(err.ends_with("err1\nerr2\n"), "stderr: {err:?}");
    assert!(!err.contains("out1"));
}

#[test]
fn unknown_host_is_recorded_then_known() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "true"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let want = format!("[127.0.0.1]:{p} {}\n", key_part(&sshd.host_pub));
    assert_eq!(home.known_hosts(), want);
    let err = text(&out.stderr);
    assert!(err.contains(&format!("permanently added [127.0.0.1]:{p}")), "{err}");
    // Second time: known, no notice, file unchanged.
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "true"], None);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&out.stderr).contains("permanently added"));
    assert_eq!(home.known_hosts(), want);
}

#[test]
fn changed_host_key_is_refused_naming_file_and_line() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let other = keygen(&home.path().join("otherhost"));
    let kh = format!("# first line\n[127.0.0.1]:{p} {}\n", key_part(&other));
    std::fs::write(home.ssh("known_hosts"), &kh).unwrap();
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "echo", "ran"], None);
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(text(&out.stdout), "", "the command must not run");
    let err = text(&out.stderr);
    let loc = format!("{}:2", home.ssh("known_hosts").display());
    assert!(err.contains("CHANGED") && err.contains(&loc), "{err}");
    assert_eq!(home.known_hosts(), kh, "known_hosts untouched");
}

#[test]
fn hashed_known_hosts_entry_matches() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    std::fs::write(home.ssh("known_hosts"), format!("[127.0.0.1]:{p} {}\n", key_part(&sshd.host_pub)))
        .unwrap();
    let st = cpu_support::status_of(
        std::process::Command::new("ssh-keygen")
            .arg("-q")
            .arg("-H")
            .arg("-f")
            .arg(home.ssh("known_hosts"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    assert!(st.success());
    let hashed = home.known_hosts();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "true"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("permanently added"));
    assert_eq!(home.known_hosts(), hashed);
}

#[test]
fn pinned_host_key_accepted_or_refused() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let pin = sshd.dir.path().join("hostkey.pub");
    let out =
        run_cpu(&home, &["-9p=false", "-hk", pin.to_str().unwrap(), "-sp", &p, "127.0.0.1", "true"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(home.known_hosts(), "", "a pinned key does not touch known_hosts");
    let other = home.path().join("other");
    keygen(&other);
    let other_pub = other.with_extension("pub");
    let out = run_cpu(
        &home,
        &["-9p=false", "-hk", other_pub.to_str().unwrap(), "-sp", &p, "127.0.0.1", "true"],
        None,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("not the key pinned in"), "{}", text(&out.stderr));
}

#[test]
fn strict_host_key_checking_yes_and_no() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    std::fs::write(home.ssh("config"), "Host strict\n  HostName 127.0.0.1\n  StrictHostKeyChecking yes\nHost loose\n  HostName 127.0.0.1\n  StrictHostKeyChecking no\n").unwrap();
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "strict", "true"], None);
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("StrictHostKeyChecking is yes"), "{}", text(&out.stderr));
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "loose", "true"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!home.ssh("known_hosts").exists(), "nothing recorded with StrictHostKeyChecking no");
}

#[test]
fn wrong_key_rejected_with_255() {
    need_sshd!();
    let home = Home::new();
    let stranger = home.path().join("stranger");
    keygen(&stranger);
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    // -key alone (plus the agent, which is absent): refused.
    let out = run_cpu(
        &home,
        &["-9p=false", "-key", stranger.to_str().unwrap(), "-sp", &p, "127.0.0.1", "true"],
        None,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("authentication failed"), "{}", text(&out.stderr));
    // A -key that does not exist: its own error, before anything else is tried.
    let missing = home.path().join("no-such-key");
    let out = run_cpu(
        &home,
        &["-9p=false", "-key", missing.to_str().unwrap(), "-sp", &p, "127.0.0.1", "true"],
        None,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("unable to read private key"), "{}", text(&out.stderr));
    // -useKey=false: only "none", which sshd refuses.
    let out = run_cpu(&home, &["-9p=false", "-useKey=false", "-sp", &p, "127.0.0.1", "true"], None);
    assert_eq!(out.status.code(), Some(255));
}

#[test]
fn several_identity_files_first_not_authorized() {
    need_sshd!();
    let home = Home::new();
    let good = home.path().join("good");
    let good_pub = keygen(&good);
    let bad = home.path().join("bad");
    keygen(&bad);
    // Only `good` is authorized; the default id_ed25519 is not.
    let sshd = Sshd::start(&[&good_pub], "");
    let p = port(&sshd);
    std::fs::write(
        home.ssh("config"),
        format!(
            "Host board\n  HostName 127.0.0.1\n  Port {p}\n  User root\n  IdentityFile {}\n  IdentityFile ~/good\n  HashKnownHosts no\n",
            bad.display()
        ),
    )
    .unwrap();
    let out = run_cpu(&home, &["-9p=false", "board", "sh", "-c", "echo user=$USER"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "user=root\n");
    // The known_hosts entry uses the HostName and the config's port.
    assert!(home.known_hosts().starts_with(&format!("[127.0.0.1]:{p} ")), "{}", home.known_hosts());
}

#[test]
fn pty_session_window_size_resize_and_escape() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let mut cmd = cpu_support::cpu_command(
        &home,
        &["-9p=false", "-sp", &p, "127.0.0.1", "sh", "-c", cpu_support::TERMINAL_SCRIPT],
    );
    cmd.env("TERM", "xterm-cputest");
    let mut pty = PtyChild::spawn(cmd, 33, 111);
    assert!(pty.is_cooked());
    cpu_support::check_terminal_session(&mut pty);
}

#[test]
fn pty_session_exit_status_and_terminal_restored() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let cmd = cpu_support::cpu_command(
        &home,
        &["-9p=false", "-sp", &p, "127.0.0.1", "sh", "-c", "echo hi; exit 5"],
    );
    let mut pty = PtyChild::spawn(cmd, 24, 80);
    assert_eq!(pty.wait(Duration::from_secs(15)), Some(5));
    assert!(text(&pty.seen).contains("hi\r\n"));
    assert!(pty.is_cooked(), "raw mode left on");
}

/// Stands in for `cpud -remote`: reports what cpu sent, dials the forwarded 9P port once with
/// a wrong nonce and once with the right one (then a Tversion).
const FAKE_REMOTE: &str = r#"#!/bin/bash
cmd="$SSH_ORIGINAL_COMMAND"
echo "exec=[$cmd]"
echo "nonce_len=${#CPUNONCE}"
printf 'fstab=[%s]\n' "$CPU_FSTAB"
printf 'lcfstab=[%s]\n' "$LC_GLENDA_CPU_FSTAB"
echo "msize=$CPU_MSIZE"
port=${cmd#-port9p=}; port=${port%% *}
exec 3<>/dev/tcp/127.0.0.1/$port || exit 20
printf 'ffffffffffffffffffffffffffffffff' >&3
if timeout 5 cat <&3 >/dev/null; then echo "wrong nonce: closed"; else echo "wrong nonce: not closed"; fi
exec 4<>/dev/tcp/127.0.0.1/$port || exit 21
printf '%s' "$CPUNONCE" >&4
printf '\x15\x00\x00\x00\x64\xff\xff\x00\x00\x01\x00\x08\x009P2000.L' >&4
n=$(timeout 3 head -c 7 <&4 | wc -c)
echo "reply_bytes=$n"
exit 0
"#;

#[test]
fn ninep_back_channel_forward_env_exec_and_nonce_check() {
    need_sshd!();
    let home = Home::new();
    let script = home.path().join("fake-remote");
    std::fs::write(&script, FAKE_REMOTE).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sshd = Sshd::start(&[&home.key_pub], &format!("ForceCommand {}", script.display()));
    let p = port(&sshd);
    let out = run_cpu(
        &home,
        &["-d", "-msize", "65536", "-namespace", "/bin=/xbin", "-sp", &p, "127.0.0.1", "echo", "it's"],
        None,
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let exec_line = stdout.lines().next().unwrap_or_default();
    assert!(exec_line.starts_with("exec=[-port9p="), "{stdout}");
    assert!(exec_line.ends_with(" 'echo' 'it'\"'\"'s']"), "{stdout}");
    assert!(stdout.contains("nonce_len=32\n"));
    assert!(stdout.contains("fstab=[\n/tmp/cpu/xbin /bin none defaults,bind 0 0\n]\n"), "{stdout}");
    assert!(stdout.contains("lcfstab=[\n/tmp/cpu/xbin /bin none defaults,bind 0 0\n]\n"), "{stdout}");
    assert!(stdout.contains("msize=65536\n"), "{stdout}");
    assert!(stdout.contains("wrong nonce: closed\n"), "{stdout}");
    assert_eq!(stderr.matches("wrong nonce on a forwarded connection").count(), 1, "{stderr}");
    assert_eq!(stderr.matches("nonce verified, serving 9P").count(), 1, "{stderr}");
}

#[test]
fn agent_keys_are_offered() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let sock = home.path().join("agent.sock");
    let agent = std::process::Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let agent = cpu_support::KillOnDrop(agent);
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let added = cpu_support::status_of(
        std::process::Command::new("ssh-add")
            .arg(home.ssh("id_ed25519"))
            .env("SSH_AUTH_SOCK", &sock)
            .stderr(std::process::Stdio::null()),
    );
    assert!(added.success());
    // The only copy of the authorized key is now in the agent.
    std::fs::remove_file(home.ssh("id_ed25519")).unwrap();
    let mut cmd =
        cpu_support::cpu_command(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "echo", "via-agent"]);
    cmd.env("SSH_AUTH_SOCK", &sock).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let out = cpu_support::wait_output(cmd.spawn().unwrap(), cpu_support::CHILD_TIMEOUT);
    // IdentitiesOnly yes: the agent is not asked, and no key file is left.
    std::fs::write(home.ssh("config"), "Host *\n  IdentitiesOnly yes\n  HashKnownHosts no\n").unwrap();
    let mut cmd = cpu_support::cpu_command(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "true"]);
    cmd.env("SSH_AUTH_SOCK", &sock).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let only = cpu_support::wait_output(cmd.spawn().unwrap(), cpu_support::CHILD_TIMEOUT);
    drop(agent);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "via-agent\n");
    assert_eq!(only.status.code(), Some(255), "{}", text(&only.stderr));
}

#[test]
fn encrypted_key_asks_for_its_passphrase_on_the_terminal() {
    need_sshd!();
    let home = Home::new();
    let enc = home.path().join("enc");
    let st = cpu_support::status_of(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "s3cret", "-C", "enc", "-f"])
            .arg(&enc),
    );
    assert!(st.success());
    let enc_pub = std::fs::read_to_string(enc.with_extension("pub")).unwrap();
    let sshd = Sshd::start(&[enc_pub.trim()], "");
    let p = port(&sshd);
    let args = ["-9p=false", "-key", enc.to_str().unwrap(), "-sp", &p, "127.0.0.1", "echo", "unlocked"];
    let mut pty = PtyChild::spawn(cpu_support::cpu_command(&home, &args), 24, 80);
    let t = Duration::from_secs(15);
    assert!(pty.expect("Enter passphrase for key", t), "{:?}", text(&pty.seen));
    pty.write(b"s3cret\r");
    assert_eq!(pty.wait(t), Some(0), "{:?}", text(&pty.seen));
    let seen = text(&pty.seen);
    assert!(seen.contains("unlocked"), "{seen:?}");
    assert!(!seen.contains("s3cret"), "the passphrase was echoed: {seen:?}");

    // Without a terminal: a clear error, exit 255.
    let mut cmd = cpu_support::cpu_command(&home, &args);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setsid is async-signal-safe; it drops any controlling terminal.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            rustix::process::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let out = cpu_support::wait_output(cmd.spawn().unwrap(), cpu_support::CHILD_TIMEOUT);
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(err.contains("is encrypted and its passphrase cannot be asked"), "{err}");
}

#[test]
fn ipv6_literal_host_as_decpu_passes_it() {
    need_sshd!();
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        skip::here("no IPv6 loopback");
        return;
    }
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "ListenAddress ::1");
    let p = port(&sshd);
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "::1", "echo", "v6"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "v6\n");
    assert_eq!(home.known_hosts(), format!("[::1]:{p} {}\n", key_part(&sshd.host_pub)));
}

#[test]
fn known_rsa_host_key_is_asked_for_first() {
    need_sshd!();
    let home = Home::new();
    let keys = cpu_support::TempDir::new("rsakey");
    let rsa = keys.path().join("rsa");
    let st = cpu_support::status_of(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
            .arg(&rsa),
    );
    assert!(st.success());
    let rsa_pub = std::fs::read_to_string(rsa.with_extension("pub")).unwrap();
    // sshd has an ed25519 and an RSA host key; we only know the RSA one.
    let sshd = Sshd::start(&[&home.key_pub], &format!("HostKey {}", rsa.display()));
    let p = port(&sshd);
    let kh = format!("[127.0.0.1]:{p} {}\n", key_part(&rsa_pub));
    std::fs::write(home.ssh("known_hosts"), &kh).unwrap();
    let out = run_cpu(&home, &["-9p=false", "-sp", &p, "127.0.0.1", "true"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(home.known_hosts(), kh);
}

#[test]
fn interrupts_are_forwarded_and_the_third_ends_cpu() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let mut cmd = cpu_support::cpu_command(
        &home,
        &["-9p=false", "-sp", &p, "127.0.0.1", "sh", "-c", "echo started; sleep 20"],
    );
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let pid = rustix::process::Pid::from_child(&child);
    for _ in 0..3 {
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cpu_support::wait_output(child, Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let log = std::fs::read_to_string(&sshd.log).unwrap();
    assert!(log.contains("session_signal_req"), "sshd saw the signal requests: {log}");
    // OpenSSH 9.x refuses signal requests for root sessions ("requires privilege separation"),
    // so there only the local escalation ends cpu; elsewhere the remote dies of SIGINT (130).
    if log.contains("requires privilege separation") {
        assert!(text(&out.stderr).contains("stopped by signal 2"), "{}", text(&out.stderr));
    }
}

#[test]
fn host_key_alias_names_the_known_hosts_entry() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    std::fs::write(
        home.ssh("config"),
        format!("Host box\n  HostName 127.0.0.1\n  Port {p}\n  HostKeyAlias board-7\n  ConnectTimeout 5\n  HashKnownHosts no\n"),
    )
    .unwrap();
    let out = run_cpu(&home, &["-9p=false", "box", "true"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(home.known_hosts(), format!("[board-7]:{p} {}\n", key_part(&sshd.host_pub)));
}

#[test]
fn pty_session_sigterm_restores_the_terminal() {
    need_sshd!();
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    let cmd = cpu_support::cpu_command(
        &home,
        &["-9p=false", "-sp", &p, "127.0.0.1", "sh", "-c", "echo ready; sleep 30"],
    );
    let mut pty = PtyChild::spawn(cmd, 24, 80);
    let t = Duration::from_secs(15);
    assert!(pty.expect("ready", t), "{:?}", text(&pty.seen));
    assert!(!pty.is_cooked(), "raw mode during the session");
    let pid = rustix::process::Pid::from_child(&pty.child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert_eq!(pty.wait(t), Some(143), "{:?}", text(&pty.seen));
    assert!(pty.is_cooked(), "raw mode left on after SIGTERM");
}

#[test]
fn proxy_command_carries_the_connection_and_a_failed_one_says_so() {
    need_sshd!();
    if std::process::Command::new("python3").arg("-c").arg("").status().map(|s| !s.success()).unwrap_or(true)
    {
        skip::here("no python3: the test's proxy command is a python3 TCP relay");
        return;
    }
    let home = Home::new();
    let sshd = Sshd::start(&[&home.key_pub], "");
    let p = port(&sshd);
    // One process relaying stdin/stdout to host:port, as nc or `ssh -W` does.
    let relay = home.ssh("relay.py");
    std::fs::write(
        &relay,
        "import os, select, socket, sys\n\
         s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n\
         while True:\n\
         \x20   r = select.select([0, s], [], [])[0]\n\
         \x20   if 0 in r:\n\
         \x20       d = os.read(0, 65536)\n\
         \x20       if not d:\n\
         \x20           break\n\
         \x20       s.sendall(d)\n\
         \x20   if s in r:\n\
         \x20       d = s.recv(65536)\n\
         \x20       if not d:\n\
         \x20           break\n\
         \x20       os.write(1, d)\n",
    )
    .unwrap();
    // The alias names no reachable host: only the proxy command knows where to go (%h, %p).
    std::fs::write(
        home.ssh("config"),
        format!(
            "Host viaproxy\n  HostName 127.0.0.1\n  Port {p}\n  ProxyCommand python3 {} %h %p\n  HashKnownHosts no\n\
             Host broken\n  HostName 127.0.0.1\n  Port {p}\n  ProxyCommand sh -c 'echo proxy-stderr >&2; exit 3'\n",
            relay.display()
        ),
    )
    .unwrap();
    let out = run_cpu(&home, &["-9p=false", "viaproxy", "echo", "through-the-proxy"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through-the-proxy\n");
    assert_eq!(home.known_hosts(), format!("[127.0.0.1]:{p} {}\n", key_part(&sshd.host_pub)));
    let out = run_cpu(&home, &["-9p=false", "broken", "true"], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(255), "{err}");
    assert!(err.contains("proxy-stderr"), "the command's own stderr reaches the user: {err}");
    assert!(err.contains("proxy command `sh -c 'echo proxy-stderr >&2; exit 3'`"), "{err}");
}

//! The `cpu` client against OpenSSH's sshd on loopback: exit codes, signals, stdin/stdout/
//! stderr, host keys, user keys, ssh_config, a pty session, and the 9P back-channel's nonce
//! check (sshd's ForceCommand stands in for `cpud -remote`).

mod cpu_support;

use std::time::Duration;

use cpu_support::{key_part, keygen, run_cpu, Home, PtyChild, Sshd};

fn port(s: &Sshd) -> String {
    s.port.to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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
    let st = std::process::Command::new("ssh-keygen")
        .arg("-q")
        .arg("-H")
        .arg("-f")
        .arg(home.ssh("known_hosts"))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
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
        &[
            "-9p=false",
            "-sp",
            &p,
            "127.0.0.1",
            "sh",
            "-c",
            "echo TERM=$TERM; stty size; trap 'stty size' WINCH; echo ready; while :; do sleep 0.05; done",
        ],
    );
    cmd.env("TERM", "xterm-cputest");
    let mut pty = PtyChild::spawn(cmd, 33, 111);
    assert!(pty.is_cooked());
    let t = Duration::from_secs(15);
    assert!(pty.expect("ready", t), "no start: {:?}", text(&pty.seen));
    let seen = text(&pty.seen);
    assert!(seen.contains("TERM=xterm-cputest\r\n"), "{seen:?}");
    assert!(seen.contains("33 111\r\n"), "{seen:?}");
    pty.resize(44, 122);
    assert!(pty.expect("44 122", t), "resize not seen: {:?}", text(&pty.seen));
    pty.write(b"\r~.");
    assert_eq!(pty.wait(t), Some(255), "{:?}", text(&pty.seen));
    assert!(text(&pty.seen).contains("closed (~.)"));
    // Raw mode was undone.
    assert!(pty.is_cooked(), "raw mode left on");
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

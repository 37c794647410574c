//! Sessions without 9P run their command straight from the daemon's child instead of through
//! `cpud -remote`: the real `cpu` client against an in-process cpud whose `cpud -remote` is a
//! wrapper that records every run. Each case runs twice, once on the direct path and once
//! forced through `cpud -remote` (the client's environment carries a CPU_FSTAB line that only
//! `cpud -remote` applies), and both must give the same bytes and exit status: 7, 127
//! with the message for a missing command, 126, a signal death as 128+N, environment and
//! directory, the session's private /tmp, and a pty. A 9P session still goes through
//! `cpud -remote`. Needs root (the session's mount namespace).

// Both support modules include the tests/common/ helpers they need (see tests/gocompat.rs).
#![allow(clippy::duplicate_mod)]

mod cpu_support;
#[path = "common/outside_tmp.rs"]
mod outside_tmp;
#[path = "common/skip.rs"]
mod skip;
mod sshd_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cpu_support::{wait_output, Home, PtyChild, CHILD_TIMEOUT};
use sshd_support::{TestServer, BIN};

/// A cpud whose `cpud -remote` appends its arguments to `marker` before running the real one.
struct Rig {
    home: Home,
    server: TestServer,
    marker: PathBuf,
    /// A directory outside /tmp (the session's /tmp is a fresh tmpfs).
    work: PathBuf,
}

impl Rig {
    fn start(tag: &str) -> Option<Rig> {
        if !rustix::process::geteuid().is_root() {
            skip::here("needs root: a session builds a private mount namespace");
            return None;
        }
        let home = Home::new();
        let work = outside_tmp::scratch_dir(&format!("cpu-all-direct-{tag}"));
        let marker = work.join("remote-runs");
        let wrapper = work.join("remote-wrapper");
        // Perl, not sh: a shell would reset $PWD to its own directory (/) before cpud -remote
        // reads it. perl-base is essential on Debian.
        if !Path::new("/usr/bin/perl").exists() {
            skip::here("no /usr/bin/perl for the cpud -remote wrapper");
            return None;
        }
        let script = format!(
            "#!/usr/bin/perl\nopen(my $m, '>>', '{}') or die;\nprint $m join(' ', @ARGV), \"\\n\";\nclose($m);\nexec('{BIN}', 'cpud', @ARGV) or die;\n",
            marker.display()
        );
        std::fs::write(&wrapper, script).unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let keys = work.join("authorized_keys");
        std::fs::write(&keys, format!("{}\n", home.key_pub)).unwrap();
        let server = TestServer::start_with(Some(keys), |c| c.remote_program = wrapper.clone());
        let rig = Rig { home, server, marker, work };
        // The first connection records the host key (a line on stderr): not part of a case.
        let first = rig.run(&["true"], false);
        assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
        Some(rig)
    }

    /// `cpu ARGS... 127.0.0.1 COMMAND...` in `self.work`; `via_remote` forces `cpud -remote`.
    fn cpu(&self, extra: &[&str], command: &[&str], via_remote: bool) -> Command {
        let port = self.server.port.to_string();
        let mut args: Vec<&str> = extra.to_vec();
        // The direct run sends the default namespace (binds of the client's files, skipped
        // without 9P); the forced one a line only `cpud -remote` mounts (invisible: a tmpfs
        // on the empty /tmp/cpu).
        if via_remote {
            args.push("-root=");
        }
        args.extend(["-sp", &port, "127.0.0.1"]);
        args.extend(command);
        let mut c = cpu_support::cpu_command(&self.home, &args);
        c.current_dir(&self.work).env("PWD", &self.work).env("DIRECT_TEST", "v a l");
        c.env_remove("CPU_FSTAB").env_remove("LC_GLENDA_CPU_FSTAB");
        if via_remote {
            c.env("CPU_FSTAB", "cpu /tmp/cpu tmpfs defaults 0 0\n");
        }
        c
    }

    fn run(&self, command: &[&str], via_remote: bool) -> Output {
        let mut c = self.cpu(&["-9p=false"], command, via_remote);
        c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        wait_output(c.spawn().unwrap(), CHILD_TIMEOUT)
    }

    /// How many sessions went through `cpud -remote` so far.
    fn remote_runs(&self) -> Vec<String> {
        std::fs::read_to_string(&self.marker).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// Runs `command` both ways; asserts the same result and that only the forced run used
    /// `cpud -remote`. Returns (status, stdout, stderr).
    fn both_ways(&self, command: &[&str]) -> (Option<i32>, String, String) {
        let before = self.remote_runs().len();
        let direct = self.run(command, false);
        assert_eq!(self.remote_runs().len(), before, "the direct session ran cpud -remote: {command:?}");
        let remote = self.run(command, true);
        assert_eq!(self.remote_runs().len(), before + 1, "the forced session skipped cpud -remote");
        let show = |o: &Output| (o.status.code(), text(&o.stdout), text(&o.stderr));
        assert_eq!(show(&direct), show(&remote), "{command:?}: direct vs cpud -remote");
        show(&direct)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exit_status_and_output_as_through_cpud_remote() {
    let Some(rig) = Rig::start("status") else { return };
    let got = rig.both_ways(&["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(got, (Some(7), "out\n".into(), "err\n".into()));
}

#[test]
fn missing_command_is_127_with_the_message() {
    let Some(rig) = Rig::start("missing") else { return };
    let got = rig.both_ways(&["no-such-command-direct"]);
    assert_eq!(got, (Some(127), String::new(), "cpud: no-such-command-direct: command not found\n".into()));
}

#[test]
fn not_executable_is_126_with_the_message() {
    let Some(rig) = Rig::start("noexec") else { return };
    let file = rig.work.join("plain");
    std::fs::write(&file, "echo never\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let got = rig.both_ways(&["./plain"]);
    assert_eq!(got, (Some(126), String::new(), "cpud: ./plain: Permission denied (os error 13)\n".into()));
}

/// A cpud that was started with signals ignored (here SIGUSR2; a script's background job has
/// SIGINT and SIGQUIT ignored) still gives its commands every signal at its default and none
/// blocked, on both paths: otherwise the client's Ctrl-C would not reach them.
#[test]
fn commands_start_with_default_signals_whatever_cpud_inherited() {
    // SAFETY: SIG_IGN installs no handler; SIGUSR2 is used by nothing in this test binary.
    unsafe { libc::signal(libc::SIGUSR2, libc::SIG_IGN) };
    let Some(rig) = Rig::start("sigdfl") else { return };
    let got = rig.both_ways(&["sh", "-c", "grep -E '^Sig(Ign|Blk):' /proc/self/status"]);
    let want = "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n";
    assert_eq!(got, (Some(0), want.into(), String::new()));
}

#[test]
fn signal_death_is_128_plus_n() {
    let Some(rig) = Rig::start("signal") else { return };
    let got = rig.both_ways(&["sh", "-c", "kill -TERM $$"]);
    assert_eq!(got.0, Some(128 + 15), "{got:?}");
}

#[test]
fn environment_directory_and_private_tmp() {
    let Some(rig) = Rig::start("env") else { return };
    let script = "pwd; echo \"[$DIRECT_TEST] [$PWD] [${CPU_FSTAB-unset}]\"; ls -a /tmp; \
                  stat -f -c %T /tmp; test -d /tmp/local/proc && echo local-root";
    let got = rig.both_ways(&["sh", "-c", script]);
    let work = rig.work.display();
    let want = format!("{work}\n[v a l] [{work}] [unset]\n.\n..\ncpu\nlocal\ntmpfs\nlocal-root\n");
    assert_eq!(got, (Some(0), want, String::new()));
}

#[test]
fn pty_session_status_output_and_missing_command() {
    let Some(rig) = Rig::start("pty") else { return };
    for via_remote in [false, true] {
        let before = rig.remote_runs().len();
        let cmd = rig.cpu(&["-9p=false"], &["sh", "-c", "tty; echo \"pwd=$(pwd)\"; exit 5"], via_remote);
        let mut pty = PtyChild::spawn(cmd, 24, 80);
        assert_eq!(pty.wait(Duration::from_secs(30)), Some(5), "{}", text(&pty.seen));
        let seen = text(&pty.seen);
        assert!(seen.contains("/dev/pts/"), "{seen}");
        assert!(seen.contains(&format!("pwd={}\r\n", rig.work.display())), "{seen}");
        let cmd = rig.cpu(&["-9p=false"], &["no-such-command-pty"], via_remote);
        let mut pty = PtyChild::spawn(cmd, 24, 80);
        assert_eq!(pty.wait(Duration::from_secs(30)), Some(127), "{}", text(&pty.seen));
        let seen = text(&pty.seen);
        assert!(seen.contains("cpud: no-such-command-pty: command not found\r\n"), "{seen:?}");
        let runs = if via_remote { 2 } else { 0 };
        assert_eq!(rig.remote_runs().len(), before + runs, "via_remote={via_remote}");
    }
}

#[test]
fn ninep_session_still_goes_through_cpud_remote() {
    let Some(rig) = Rig::start("ninep") else { return };
    // The 9p mount itself may fail here (no 9p in this kernel): only the route is checked.
    let mut c = rig.cpu(&[], &["true"], false);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = wait_output(c.spawn().unwrap(), CHILD_TIMEOUT);
    let runs = rig.remote_runs();
    assert_eq!(runs.len(), 1, "status {:?}, stderr {}", out.status, text(&out.stderr));
    assert!(runs[0].starts_with("-remote -port9p="), "{runs:?}");
}

#[test]
fn stdin_eof_alone_and_stdin_bytes_reach_the_command() {
    let Some(rig) = Rig::start("stdin") else { return };
    // No input at all, only EOF: the stdin pipe is closed without a writer thread.
    let got = rig.both_ways(&["sh", "-c", "cat; echo done"]);
    assert_eq!(got, (Some(0), "done\n".into(), String::new()));
    // Input: the writer thread starts with the first chunk and ends with EOF.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut c = rig.cpu(&["-9p=false"], &["sh", "-c", "wc -c; exit 3"], false);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut input, &data));
    let out = wait_output(child, CHILD_TIMEOUT);
    assert!(writer.join().unwrap().is_ok());
    assert_eq!(
        (out.status.code(), text(&out.stdout).trim().to_string()),
        (Some(3), "200000".into()),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn session_without_pwd_runs_in_root_with_pwd_set() {
    let Some(rig) = Rig::start("nopwd") else { return };
    // OpenSSH's ssh sends no environment: the cpu form then gets PWD=/ from cpud.
    let key = rig.home.ssh("id_ed25519");
    let before = rig.remote_runs().len();
    let out = sshd_support::ssh(rig.server.port, &key, " 'sh' '-c' 'pwd; echo \"$PWD\"'", None);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "/\n/\n".into()), "{}", text(&out.stderr));
    assert_eq!(rig.remote_runs().len(), before, "ran cpud -remote");
}

/// Input the command does not read while its output is still leaving: cpud used to stop
/// reading the channel once 128 chunks (~4 MiB) were queued, which stopped russh's whole loop,
/// so the output could not leave, the command never got to its input, and the session hung
/// (`cat` of 50 MB did too). Here the command writes 32 MiB before it reads 24 MiB of input.
#[test]
fn input_queued_while_output_leaves_never_deadlocks() {
    let Some(rig) = Rig::start("bidi") else { return };
    let input: Vec<u8> = (0..24u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut c = rig.cpu(&["-9p=false"], &["sh", "-c", "head -c 33554432 /dev/zero; wc -c"], false);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut to_cpu = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut to_cpu, &input));
    let out = wait_output(child, CHILD_TIMEOUT);
    assert!(writer.join().unwrap().is_ok(), "writing the input failed: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (zeros, count) = out.stdout.split_at(out.stdout.len().min(32 << 20));
    assert_eq!(zeros.len(), 32 << 20, "output length; stderr: {}", text(&out.stderr));
    assert!(zeros.iter().all(|&b| b == 0), "the 32 MiB are not all zeros");
    assert_eq!(text(count).trim(), (24u32 << 20).to_string(), "wc -c of the input");
}

/// The direct path's child (ssh::spawn): in its own mount namespace, and the reference cpud
/// takes to that namespace keeps it after the command ended (its teardown then comes after
/// the exit status, not inside the command's exit).
#[tokio::test(flavor = "current_thread")]
async fn spawned_command_has_its_namespace_and_the_reference_outlives_it() {
    use std::io::{Read, Write};
    if !rustix::process::geteuid().is_root() {
        skip::here("needs root: a session builds a private mount namespace");
        return;
    }
    let tmp = cpu_all::remote::SessionTmp::new(Path::new("/")).unwrap();
    let argv = [std::ffi::OsStr::new("sh"), "-c".as_ref(), "cat; readlink /proc/self/ns/mnt".as_ref()];
    let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let spawned = cpu_all::ssh::spawn::spawn("sh".as_ref(), &argv, &env, &tmp).unwrap();
    let cpu_all::ssh::spawn::Spawned { mut child, stdin, stdout, stderr } = spawned;
    // `cat` waits for its input: the command runs, so the reference was taken.
    let held = child.take_namespace().expect("a reference to the running command's namespace");
    let link = |p: String| std::fs::read_link(p).unwrap().to_string_lossy().into_owned();
    let ours = link("/proc/self/ns/mnt".into());
    let theirs = link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held)));
    assert!(theirs.starts_with("mnt:["), "{theirs}");
    assert_ne!(theirs, ours, "the command runs in a namespace of its own");
    std::fs::File::from(stdin).write_all(b"in\n").unwrap();
    let status = child.wait().await.unwrap();
    let (mut out, mut err) = (String::new(), String::new());
    std::fs::File::from(stdout).read_to_string(&mut out).unwrap();
    std::fs::File::from(stderr).read_to_string(&mut err).unwrap();
    assert_eq!(
        (status.code(), out.as_str(), err.as_str()),
        (Some(0), format!("in\n{theirs}\n").as_str(), "")
    );
    // The command is gone and reaped; the namespace is still there through the reference.
    assert_eq!(link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held))), theirs);
    // A command that cannot be found: the exec's errno, nothing left running.
    let argv = [std::ffi::OsStr::new("no-such-command-here")];
    match cpu_all::ssh::spawn::spawn(argv[0], &argv, &env, &tmp) {
        Err(cpu_all::ssh::spawn::SpawnFailure::Exec(e)) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
        other => panic!("missing command: {:?}", other.err()),
    }
}

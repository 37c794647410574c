//! `cpud -remote` as a real process on this machine's kernel (root only): the private mount
//! namespace, the tmpfs on /tmp, fstab binds, the $PWD fallback and exit statuses, with the
//! real mount calls. (This kernel has no 9p; the 9P mount is tested in the VM.) Skips with a
//! reason when not root or when mount namespaces are not allowed here.

#[path = "common/child.rs"]
mod child;
#[path = "common/outside_tmp.rs"]
mod outside_tmp;
#[path = "common/skip.rs"]
mod skip;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_cpu-all");

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `cpu-all cpud -remote ARGS` with a clean environment plus `env`, killed after 30 s.
fn remote(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("cpud").arg("-remote").args(args).env_clear().env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child::output_or_kill(child, Duration::from_secs(30)).0
}

fn scratch(name: &str) -> PathBuf {
    outside_tmp::scratch_dir(&format!("cpu-all-namespace-{name}"))
}

fn usable() -> bool {
    if !is_root() {
        skip::here("needs root (mount namespaces)");
        return false;
    }
    let probe = remote(&["true"], &[("PWD", "/")]);
    if probe.status.code() == Some(125) {
        skip::here(&format!("cpud -remote cannot set up here: {}", String::from_utf8_lossy(&probe.stderr)));
        return false;
    }
    true
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn private_tmpfs_and_no_leak() {
    if !usable() {
        return;
    }
    let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let o = remote(
        &[
            "sh",
            "-c",
            "grep ' /tmp ' /proc/self/mountinfo | tail -1 | sed 's/.* - //' | cut -d' ' -f1-2; ls -d /tmp/cpu /tmp/local/usr",
        ],
        &[("PWD", "/"), ("TMPDIR", "/nonexistent")],
    );
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(stdout(&o), "tmpfs cpu\n/tmp/cpu\n/tmp/local/usr\n");
    let after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(before.lines().count(), after.lines().count(), "a session mount leaked into this namespace");
    assert!(!after.contains(" - tmpfs cpu "));
}

#[test]
fn fstab_binds_pwd_and_exit_statuses() {
    if !usable() {
        return;
    }
    let dir = scratch("fstab");
    std::fs::create_dir_all(dir.join("source/sub")).unwrap();
    std::fs::write(dir.join("source/sub/f.txt"), "bound\n").unwrap();
    std::fs::create_dir_all(dir.join("target")).unwrap();
    let fstab = format!(
        "\n# comment\n{d}/source {d}/target none defaults,bind 0 0\n{d}/nosuch {d}/target none bind 0 0\n{d}/source {d}/missing-target none bind 0 0\nshort line\n",
        d = dir.display()
    );
    let pwd = format!("{}/target/sub", dir.display());
    let o = remote(
        &["sh", "-c", "pwd; cat f.txt; env | grep -c CPU_ || true"],
        &[("CPU_FSTAB", &fstab), ("PWD", &pwd)],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(stdout(&o), format!("{pwd}\nbound\n0\n"));
    assert!(err.contains(&format!("fstab line 4: {}/nosuch does not exist", dir.display())), "{err}");
    // The root filesystem here is on disk: the missing target is not created, and we say so.
    assert!(
        err.contains("missing-target does not exist on this machine and its root filesystem is on disk"),
        "{err}"
    );
    assert!(!dir.join("missing-target").exists());
    assert!(!dir.join("target/sub").exists(), "the bind leaked out of the session");

    let o = remote(&["pwd"], &[("PWD", "/nonexistent/dir")]);
    assert_eq!(stdout(&o), "/\n");
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("your $PWD \"/nonexistent/dir\" is not in the remote namespace"));

    assert_eq!(remote(&["sh", "-c", "exit 7"], &[("PWD", "/")]).status.code(), Some(7));
    assert_eq!(remote(&["no-such-command-here"], &[("PWD", "/")]).status.code(), Some(127));
    let not_executable = dir.join("source/sub/f.txt");
    assert_eq!(remote(&[not_executable.to_str().unwrap()], &[("PWD", "/")]).status.code(), Some(126));
    let o = remote(&["true"], &[("PWD", "/"), ("CPUNONCE", "0123456789abcdef0123456789abcdef")]);
    assert_eq!(o.status.code(), Some(125));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killed_by_a_signal_is_seen_by_the_parent() {
    if !usable() {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let o = remote(&["sh", "-c", "kill -TERM $$"], &[("PWD", "/")]);
    assert_eq!(o.status.signal(), Some(15), "the command must replace cpud -remote (exec)");
}

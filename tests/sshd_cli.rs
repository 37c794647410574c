//! The real `cpu-all cpud` binary: start-up errors, host keys (-hk, -statedir), -pk "",
//! signals, and the cpu-form re-exec through /proc/self/exe.

mod sshd_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sshd_support::*;

/// A cpud process on 127.0.0.1 with a kernel-chosen port, killed when dropped.
struct Daemon {
    child: Child,
    port: u16,
    log: mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(BIN)
            .arg("cpud")
            .args(["-listen", "127.0.0.1", "-sp", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cpud");
        let rx = lines_of(child.stderr.take().expect("stderr"));
        let mut d = Daemon { child, port: 0, log: rx, lines: Vec::new() };
        let line = d.wait_for("Listening on ");
        d.port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        d
    }

    /// Waits for a log line containing `needle`, returns it.
    fn wait_for(&mut self, needle: &str) -> String {
        if let Some(l) = self.lines.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            match self.log.recv_timeout(TIMEOUT) {
                Ok(l) => {
                    self.lines.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!("cpud never logged {needle:?}; log: {:?}", self.lines),
            }
        }
    }

    fn terminate(&mut self) -> Option<i32> {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let mut status = None;
        wait_until(TIMEOUT, || match self.child.try_wait() {
            Ok(Some(s)) => {
                status = s.code();
                true
            }
            _ => false,
        });
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn cpud_once(args: &[&str], cwd: &Path) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("cpud")
        .args(["-listen", "127.0.0.1", "-sp", "0"])
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null());
    run_timeout(cmd, None, TIMEOUT)
}

fn known_hosts(dir: &TempDir, port: u16, public_line: &str) -> std::path::PathBuf {
    let p = dir.join("known_hosts");
    std::fs::write(&p, format!("[127.0.0.1]:{port} {public_line}\n")).expect("write known_hosts");
    p
}

/// ssh that insists on the host key in `kh`.
fn ssh_checked(port: u16, key: &Path, kh: &Path, command: &str) -> std::process::Output {
    let mut c = Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
    ])
    .arg("-o")
    .arg(format!("UserKnownHostsFile={}", kh.display()))
    .args(["-p", &port.to_string(), "-i"])
    .arg(key)
    .args(["127.0.0.1", command])
    .env_remove("SSH_AUTH_SOCK")
    .stdin(Stdio::null());
    run_timeout(c, None, TIMEOUT)
}

#[test]
fn missing_authorized_keys_stops_cpud_with_exit_1() {
    let dir = TempDir::new("nopk");
    let out = cpud_once(&["-pk", "/nonexistent/authorized_keys"], &dir.0);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot read authorized keys file /nonexistent/authorized_keys"), "{err}");
    // The default -pk is key.pub in the working directory (as Go); absent, cpud refuses too.
    let out = cpud_once(&[], &dir.0);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("key.pub"), "{}", text(&out.stderr));
}

#[test]
fn unusable_host_key_stops_cpud_with_exit_1() {
    let dir = TempDir::new("badhk");
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let junk = dir.join("junk");
    std::fs::write(&junk, "not a key").expect("write");
    let out = cpud_once(
        &["-pk", ak.to_str().unwrap_or_default(), "-hk", junk.to_str().unwrap_or_default()],
        &dir.0,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot use host key"), "{}", text(&out.stderr));
}

#[test]
fn statedir_host_key_is_created_logged_and_kept() {
    let dir = TempDir::new("state");
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let state = dir.join("state");
    let args = ["-pk", ak.to_str().unwrap_or_default(), "-statedir", state.to_str().unwrap_or_default()];
    let mut d = Daemon::start(&args);
    let created = d.wait_for("host key ssh-ed25519 SHA256:");
    assert!(created.contains("created in"), "{created}");
    let host_key = state.join("ssh_host_ed25519_key");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&host_key).expect("state key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The logged fingerprint is the stored key's, and clients see that key.
    let mut kg = Command::new("ssh-keygen");
    kg.arg("-lf").arg(&host_key).stdin(Stdio::null());
    let fp = text(&run_timeout(kg, None, TIMEOUT).stdout);
    let fp = fp.split_whitespace().nth(1).unwrap_or_default().to_string();
    assert!(created.contains(&fp), "{created} vs {fp}");
    let mut y = Command::new("ssh-keygen");
    y.arg("-yf").arg(&host_key).stdin(Stdio::null());
    let public = text(&run_timeout(y, None, TIMEOUT).stdout);
    let kh = known_hosts(&dir, d.port, public.trim());
    let out = ssh_checked(d.port, &key, &kh, "echo checked");
    assert_eq!(text(&out.stdout), "checked\n", "{}", text(&out.stderr));
    assert_eq!(d.terminate(), Some(0));
    // A restart reuses it.
    let mut d = Daemon::start(&args);
    let again = d.wait_for("host key ssh-ed25519 SHA256:");
    assert!(again.contains(&fp) && again.contains("from"), "{again}");
    let kh = known_hosts(&dir, d.port, public.trim());
    assert_eq!(text(&ssh_checked(d.port, &key, &kh, "echo again").stdout), "again\n");
}

#[test]
fn hk_accepts_openssh_rsa_and_ecdsa_keys() {
    let dir = TempDir::new("hk");
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    for kind in ["rsa", "ecdsa", "ed25519"] {
        let hk = keygen(&dir, &format!("host_{kind}"), kind);
        let mut d =
            Daemon::start(&["-pk", ak.to_str().unwrap_or_default(), "-hk", hk.to_str().unwrap_or_default()]);
        let kh = known_hosts(&dir, d.port, public_line(&hk).trim());
        let out = ssh_checked(d.port, &key, &kh, "echo host key ok");
        assert_eq!(text(&out.stdout), "host key ok\n", "{kind}: {}", text(&out.stderr));
        assert_eq!(d.terminate(), Some(0));
    }
}

#[test]
fn empty_pk_means_no_authentication_with_a_loud_warning() {
    let dir = TempDir::new("nopkauth");
    let key = keygen(&dir, "anykey", "ed25519");
    let mut d = Daemon::start(&["-pk", ""]);
    d.wait_for("NO AUTHENTICATION");
    let out = ssh(d.port, &key, "echo anyone", None);
    assert_eq!(text(&out.stdout), "anyone\n", "{}", text(&out.stderr));
}

#[test]
fn cpu_form_reexecs_the_binary_and_keeps_the_status() {
    let dir = TempDir::new("reexec");
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let mut d = Daemon::start(&["-pk", ak.to_str().unwrap_or_default()]);
    let out = ssh(d.port, &key, " 'sh' '-c' 'echo $0 from remote; exit 7'", None);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "sh from remote\n");
    let rejected = keygen(&dir, "other", "ed25519");
    assert_eq!(ssh(d.port, &rejected, "true", None).status.code(), Some(255));
    let line = d.wait_for("rejected ssh-ed25519 key SHA256:");
    assert!(line.contains("not in"), "{line}");
    // SIGTERM with no sessions: a clean exit.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(d.terminate(), Some(0));
}

#[test]
fn register_dials_and_says_ok_once_listening() {
    let dir = TempDir::new("register");
    let key = keygen(&dir, "id", "ed25519");
    let ak = authorized(&dir, &public_line(&key));
    let waiter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let target = format!("127.0.0.1:{}", waiter.local_addr().expect("addr").port());
    let d = Daemon::start(&["-pk", ak.to_str().unwrap_or_default(), "-register", &target]);
    waiter.set_nonblocking(false).expect("blocking");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::Read;
        let got = waiter.accept().map(|(mut s, _)| {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        });
        let _ = tx.send(got.ok());
    });
    let got = rx.recv_timeout(TIMEOUT).expect("cpud never registered");
    assert_eq!(got.as_deref(), Some(&b"ok"[..]));
    assert!(d.port > 0);
}

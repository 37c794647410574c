//! Black-box tests of the multicall binary: dispatch on argv[0], `cpu-all APPLET`, --version,
//! usage text with the Go flags and their defaults, and usage errors (exit status 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/child.rs"]
mod child;
#[path = "common/temp_dir.rs"]
mod temp_dir;

use child::text;
use temp_dir::TempDir;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cpu-all"))
}

/// Runs a command with no stdin and a 20 s limit; kills it if it overstays.
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn cpu-all");
    let readers = child::OutputReaders::start(&mut child);
    let Some(status) = child::wait_or_kill(&mut child, Duration::from_secs(20)) else {
        panic!("cpu-all did not finish in 20 s");
    };
    readers.finish(status)
}

fn cpu_all(args: &[&str]) -> Output {
    let mut c = Command::new(binary());
    c.args(args);
    run(c)
}

/// A directory with links named after each applet, pointing at the binary.
fn applet_links() -> TempDir {
    let dir = TempDir::new("links");
    for name in ["cpu", "cpud", "decpu", "decpud"] {
        std::os::unix::fs::symlink(binary(), dir.path().join(name)).expect("symlink");
    }
    dir
}

fn via_link(dir: &Path, applet: &str, args: &[&str]) -> Output {
    let mut c = Command::new(dir.join(applet));
    c.args(args);
    run(c)
}

#[test]
fn version_names_commit_and_target() {
    let out = cpu_all(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    assert!(s.starts_with(&format!("cpu-all {} (commit ", env!("CARGO_PKG_VERSION"))), "{s}");
    assert!(s.contains("x86_64-unknown-linux") || s.contains("linux"), "{s}");
}

#[test]
fn no_args_and_help_list_the_applets() {
    for args in [&[][..], &["--help"]] {
        let out = cpu_all(args);
        assert_eq!(out.status.code(), Some(0));
        let s = text(&out.stdout);
        for applet in ["cpu ", "cpud ", "decpu ", "decpud "] {
            assert!(s.contains(&format!("  {applet}")), "{applet} missing in {s}");
        }
    }
}

#[test]
fn unknown_applet_is_a_usage_error() {
    let out = cpu_all(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("unknown applet \"frobnicate\""), "{}", text(&out.stderr));
}

#[test]
fn links_dispatch_to_each_applet() {
    let dir = applet_links();
    for (applet, synopsis) in [
        ("cpu", "Usage: cpu [options] host"),
        ("cpud", "Usage: cpud [options]"),
        ("decpu", "Usage: decpu [options]"),
        ("decpud", "Usage: decpud [options]"),
    ] {
        let out = via_link(dir.path(), applet, &["-h"]);
        assert_eq!(out.status.code(), Some(0), "{applet}");
        assert!(text(&out.stdout).starts_with(synopsis), "{applet}: {}", text(&out.stdout));
    }
}

#[test]
fn cpu_usage_lists_go_flags_with_defaults() {
    for args in [&["cpu", "-h"][..], &["cpu", "-help"], &["cpu", "--help"]] {
        let out = cpu_all(args);
        assert_eq!(out.status.code(), Some(0));
        let s = text(&out.stdout);
        for needle in [
            "  -namespace string\n",
            "(default \"/lib:/lib64:/usr:/bin:/etc:/home\")",
            "  -9p\n",
            "  -key string\n",
            "  -hk string\n",
            "  -sp string\n",
            "  -fstab string\n",
            "  -root string\n",
            "  -timeout9p duration\n",
            "(default 100ms)",
            "  -useKey\n",
            "  -net string\n",
            "  -d\n",
            "  -dbg9p\n",
        ] {
            assert!(s.contains(needle), "{needle:?} missing in:\n{s}");
        }
    }
}

#[test]
fn cpud_usage_lists_go_flags_with_defaults() {
    let out = cpu_all(&["cpud", "-h"]);
    assert_eq!(out.status.code(), Some(0));
    let s = text(&out.stdout);
    for needle in [
        "  -pk string\n",
        "(default \"key.pub\")",
        "  -hk string\n",
        "  -sp string\n",
        "(default \"17010\")",
        "  -init\n",
        "  -remote\n",
        "  -port9p string\n",
        "  -klog\n",
        "  -net string\n",
        "(default \"tcp\")",
        "  -registerTO duration\n",
        "(default 5s)",
    ] {
        assert!(s.contains(needle), "{needle:?} missing in:\n{s}");
    }
    let out = cpu_all(&["decpud", "-h"]);
    let s = text(&out.stdout);
    for needle in ["  -dsTxt string\n", "(default \"_ncpu._tcp\")", "(default \"local\")", "  -dnssd\n"] {
        assert!(s.contains(needle), "{needle:?} missing in:\n{s}");
    }
    let out = cpu_all(&["decpu", "-h"]);
    assert!(text(&out.stdout).contains("  -n int\n"));
}

#[test]
fn unknown_flag_exits_2_with_one_line_and_hint() {
    let out = cpu_all(&["cpu", "-nosuchflag", "host"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err, "cpu: flag provided but not defined: -nosuchflag\nRun 'cpu -h' for usage.\n");
    let out = cpu_all(&["cpud", "-sp"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("cpud: flag needs an argument: -sp\n"));
    let out = cpu_all(&["cpu", "-9p=maybe", "host"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("invalid value \"maybe\" for flag -9p"));
    let out = cpu_all(&["cpu", "-timeout9p", "7", "host"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("-timeout9p"));
}

#[test]
fn cpu_without_host_is_a_usage_error() {
    let out = cpu_all(&["cpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cpu: missing host"));
}

#[test]
fn version_on_every_applet_in_every_spelling() {
    let dir = applet_links();
    let want = text(&cpu_all(&["--version"]).stdout);
    for applet in ["cpu", "cpud", "decpu", "decpud"] {
        for flag in ["--version", "-version"] {
            let out = via_link(dir.path(), applet, &[flag]);
            assert_eq!(out.status.code(), Some(0), "{applet} {flag}: {}", text(&out.stderr));
            assert_eq!(text(&out.stdout), want, "{applet} {flag}");
            let out = cpu_all(&[applet, flag]);
            assert_eq!(text(&out.stdout), want, "cpu-all {applet} {flag}");
        }
    }
}

#[test]
fn cpud_extra_argument_says_it_takes_flags_only() {
    let out = cpu_all(&["cpud", "-sp", "17013", "-pk", "K", "extra"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "cpud: unexpected argument \"extra\": cpud takes flags only, no arguments\nRun 'cpud -h' for usage.\n"
    );
    // `-init true` is the Go-flag trap: a boolean's value goes after '='.
    let out = cpu_all(&["decpud", "-init", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "decpud: unexpected argument \"true\": decpud takes flags only; give a boolean flag its value with =, as -init=true\nRun 'decpud -h' for usage.\n"
    );
}

#[test]
fn port_in_the_host_points_to_sp_at_once() {
    let home = TempDir::new("hostport");
    let mut c = Command::new(binary());
    c.args(["cpu", "-9p=false", "localhost:17011", "date"]).env("HOME", home.path());
    let out = run(c);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        "cpu: \"localhost:17011\" is not a host name: give the port with -sp, as in: cpu -sp 17011 localhost ...\n"
    );
}

/// A public key where a private one belongs (and the reverse) stops the applet at start
/// with one line naming the flag, before any network use.
#[test]
fn wrong_kind_of_key_is_one_line_at_start() {
    let dir = TempDir::new("keykind");
    let public = dir.path().join("id_ed25519.pub");
    std::fs::write(
        &public,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDummyDummyDummyDummyDummyDummyDummyDumm me@here\n",
    )
    .expect("write");
    let private = dir.path().join("id_ed25519");
    std::fs::write(
        &private,
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
    )
    .expect("write");
    let (pub_s, priv_s) = (public.to_str().expect("utf-8"), private.to_str().expect("utf-8"));
    let cases: [(&[&str], i32, String); 4] = [
        (
            &["cpu", "-key", pub_s, "127.0.0.1", "true"],
            2,
            format!("cpu: -key {pub_s} is a public key; -key needs a private key (the private key is probably {priv_s})\n"),
        ),
        (
            &["cpu", "-hk", priv_s, "127.0.0.1", "true"],
            2,
            format!("cpu: -hk {priv_s} is a private key; -hk needs public keys (a .pub file, one key per line)\n"),
        ),
        (
            &["cpud", "-sp", "0", "-listen", "127.0.0.1", "-pk", priv_s],
            1,
            format!("cpud: -pk {priv_s} is a private key; -pk needs public keys (a .pub file, one key per line)\n"),
        ),
        (
            &["cpud", "-sp", "0", "-listen", "127.0.0.1", "-pk", pub_s, "-hk", pub_s],
            1,
            format!("cpud: -hk {pub_s} is a public key; -hk needs a private key (the private key is probably {priv_s})\n"),
        ),
    ];
    for (args, code, want) in cases {
        let mut c = Command::new(binary());
        c.args(args).env("HOME", dir.path());
        let out = run(c);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr), want, "{args:?}");
    }
}

#[test]
fn decpu_without_arguments_prints_usage() {
    let out = cpu_all(&["decpu"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.starts_with("Usage: decpu [options]"), "{err}");
    assert!(
        err.ends_with(
            "decpu: missing host: give '.' (the best server around), a dnssd:// URI or a host name\n"
        ),
        "{err}"
    );
}

#[test]
fn help_texts_tell_the_truth() {
    let cpud = text(&cpu_all(&["cpud", "-h"]).stdout);
    assert!(cpud.contains("recommended as PID 1 in an initramfs"), "{cpud}");
    assert!(!cpud.contains("Debug only"), "{cpud}");
    assert!(cpud.contains("Every session runs as cpud's own user"), "{cpud}");
    let cpu = text(&cpu_all(&["cpu", "-h"]).stdout);
    assert!(cpu.contains("accepted for compatibility with Go cpu and ignored"), "{cpu}");
    assert!(!cpu.contains("at least 5s"), "{cpu}");
    assert!(cpu.contains("  cpu board sh -c 'echo $HOME; ls | wc -l'"), "{cpu}");
    assert!(cpu.contains("cpu -sp 17011 board date"), "{cpu}");
}

/// `user@host`: cpud accepts any user name (the Go client sends the local user's) and runs
/// the session as its own user.
#[test]
fn user_at_host_runs_as_cpuds_own_user() {
    if let Err(why) = Command::new("ssh-keygen").arg("-?").stdin(Stdio::null()).output() {
        skip::skip("user_at_host_runs_as_cpuds_own_user", &format!("ssh-keygen cannot run: {why}"));
        return;
    }
    let dir = TempDir::new("user");
    let key = dir.path().join("id_ed25519");
    let mut kg = Command::new("ssh-keygen");
    kg.args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key);
    let out = run(kg);
    assert!(out.status.success(), "ssh-keygen: {}", text(&out.stderr));
    let mut daemon = Daemon::start(&["-pk", &format!("{}.pub", key.display())]);
    let mut id = Command::new("id");
    id.arg("-un");
    let me = text(&run(id).stdout);
    for user in ["nobody", "no-such-user-here"] {
        let mut c = Command::new(binary());
        c.args(["cpu", "-9p=false", "-sp", &daemon.port.to_string(), "-key"])
            .arg(&key)
            .args([&format!("{user}@127.0.0.1"), "id", "-un"])
            .env("HOME", dir.path());
        let out = run(c);
        assert_eq!(out.status.code(), Some(0), "{user}: {}; cpud: {}", text(&out.stderr), daemon.log());
        assert_eq!(text(&out.stdout), me, "{user}");
    }
    daemon.stop();
}

/// `make test`'s last word on skips: the count, then each reason once with its multiplicity.
#[test]
fn skip_summary_counts_every_skip_and_groups_reasons() {
    let dir = TempDir::new("skips");
    let log = dir.path().join("skipped.log");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/skip-summary");
    let mut c = Command::new(&script);
    c.arg(&log);
    let out = run(c);
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "0 skipped\n".to_string()));
    std::fs::write(
        &log,
        "SKIP: a::t1: needs root\nSKIP: vm/init-tests.sh: init: qemu missing\nSKIP: a::t1: needs root\n",
    )
    .expect("write log");
    let mut c = Command::new(&script);
    c.arg(&log);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "3 skipped:\n  (x2) a::t1: needs root\n  vm/init-tests.sh: init: qemu missing\n"
    );
}

/// `cpud` on 127.0.0.1 with a kernel-chosen port; killed (by its pid) when dropped.
struct Daemon {
    child: std::process::Child,
    port: u16,
    stderr: std::sync::mpsc::Receiver<String>,
    lines: Vec<String>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let mut child = Command::new(binary())
            .args(["cpud", "-listen", "127.0.0.1", "-sp", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cpud");
        let rx = child::lines_of(child.stderr.take().expect("stderr"));
        let mut d = Daemon { child, port: 0, stderr: rx, lines: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.port == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match d.stderr.recv_timeout(left) {
                Ok(line) => {
                    if let Some(addr) = line.split("Listening on ").nth(1) {
                        d.port = addr.rsplit(':').next().and_then(|p| p.trim().parse().ok()).unwrap_or(0);
                    }
                    d.lines.push(line);
                }
                Err(_) => {
                    let status = d.child.try_wait().ok().flatten();
                    panic!(
                        "cpud did not say where it listens in 30 s (exit: {status:?}); stderr: {:?}",
                        d.lines
                    );
                }
            }
        }
        d
    }

    fn log(&mut self) -> String {
        while let Ok(l) = self.stderr.try_recv() {
            self.lines.push(l);
        }
        self.lines.join("\n")
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

#[path = "common/skip.rs"]
mod skip;

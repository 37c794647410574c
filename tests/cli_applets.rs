//! Black-box tests of the multicall binary: dispatch on argv[0], `cpu-all APPLET`, --version,
//! usage text with the Go flags and their defaults, and usage errors (exit status 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cpu-all"))
}

/// Runs a command with no stdin and a 20 s limit; kills it if it overstays.
fn run(mut cmd: Command) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn cpu-all");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("cpu-all did not finish in 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn cpu_all(args: &[&str]) -> Output {
    let mut c = Command::new(binary());
    c.args(args);
    run(c)
}

/// A directory with links named after each applet, pointing at the binary.
fn applet_links() -> tempdir::TempDir {
    let dir = tempdir::TempDir::new("cpu-all-links");
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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

/// A tiny self-cleaning temporary directory (no extra crate).
mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> TempDir {
            let base = std::env::temp_dir();
            for i in 0..1000u32 {
                let p = base.join(format!("{prefix}-{}-{i}", std::process::id()));
                if std::fs::create_dir(&p).is_ok() {
                    return TempDir(p);
                }
            }
            panic!("cannot create a temporary directory in {}", base.display());
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

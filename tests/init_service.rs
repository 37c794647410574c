//! The service files in service/: the busybox/OpenWRT script parses and answers as an init
//! script does, and the systemd unit starts cpud with the keys in /etc/cpud.

#[path = "common/skip.rs"]
mod skip;

use std::path::Path;
use std::process::Command;

fn service(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("service").join(name)
}

#[test]
fn init_script_is_valid_sh_and_rejects_unknown_actions() {
    let script = service("cpud.init");
    let syntax = Command::new("sh").arg("-n").arg(&script).status().expect("run sh -n");
    assert!(syntax.success(), "sh -n failed on {}", script.display());
    if Path::new("/etc/rc.common").exists() {
        skip::here("this machine has OpenWRT's rc.common; the plain-script path is not reachable");
        return;
    }
    let out = Command::new("sh").arg(&script).arg("bogus").output().expect("run init script");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"), "{out:?}");
}

#[test]
fn systemd_unit_runs_cpud_with_the_etc_keys() {
    let unit = std::fs::read_to_string(service("cpud.service")).expect("read unit");
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).expect("ExecStart line");
    assert!(exec.starts_with("ExecStart=/usr/local/bin/cpud "), "{exec}");
    assert!(exec.contains("-pk /etc/cpud/authorized_keys"), "{exec}");
    assert!(exec.contains("-statedir /var/lib/cpud"), "{exec}");
    assert!(unit.contains("\n[Install]\nWantedBy=multi-user.target"), "{unit}");
    // The flags in the unit must be ones cpud accepts.
    let words: Vec<&str> = exec
        .trim_start_matches("ExecStart=")
        .split_whitespace()
        .skip(1)
        .filter(|w| !w.starts_with('$'))
        .collect();
    cpu_all::options::CpudOptions::from_args(words, false).expect("unit flags parse");
}

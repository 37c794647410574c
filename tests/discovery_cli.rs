//! The `decpu` applet's errors that come before any network use: a malformed query or
//! `-n` without a command is a usage error (exit 2) with a clear message, never a panic.

use std::process::{Command, Stdio};
use std::time::Duration;

#[path = "common/child.rs"]
mod child;

/// Runs `cpu-all decpu ARGS` with a time limit; returns (exit code, stderr).
fn decpu(args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_cpu-all"))
        .arg("decpu")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cpu-all");
    let (out, _killed) = child::output_or_kill(child, Duration::from_secs(20));
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn discovery_cli_empty_value_is_a_usage_error() {
    let (code, err) = decpu(&["dnssd://?arch=", "date"]);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(
        err.trim_end(),
        "decpu: dnssd: bad URI \"dnssd://?arch=\": arch= has an empty value (use arch=* to accept any value)"
    );
}

#[test]
fn discovery_cli_malformed_uris_are_usage_errors() {
    for (uri, why) in [
        ("dnssd:board", "expected dnssd://"),
        ("dnssd://host:port", "the port after ':' must be a number"),
        ("dnssd://?tenants=<few", "\"few\" is not a number"),
        ("dnssd://?a=%zz", "bad %-escape"),
        ("dnssd://?sort=>", "empty sort key"),
        ("dnssd://_x.example.com", "only the multicast DNS domain \"local\" can be browsed"),
    ] {
        let (code, err) = decpu(&[uri, "date"]);
        assert_eq!(code, Some(2), "{uri}: {err}");
        assert!(err.starts_with("decpu: dnssd: ") && err.contains(why), "{uri}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn discovery_cli_several_servers_need_a_command() {
    let (code, err) = decpu(&["-n", "2", "."]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.starts_with("decpu: Interactive access with more than one CPU is not supported (yet)"),
        "{err}"
    );
    let (code, err) = decpu(&["-n", "2", "board", "date"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("-n 2 needs server discovery"), "{err}");
}

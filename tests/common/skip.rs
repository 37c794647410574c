//! The one way a test says it skipped, so that every skip is seen and counted.
//!
//! cargo reports a test that returns early as `ok` and hides what it printed. [`skip`] writes
//! `SKIP: <what>: <why>` straight to the process's stderr (not through `eprintln!`, which the
//! test harness captures for passing tests) and appends the same line to the file named by
//! `CPU_ALL_SKIP_LOG` when it is set; `make unit`/`make test` set it and end with
//! "N skipped: ..." (tools/skip-summary). Include it with
//! `#[path = "common/skip.rs"] mod skip;` and call `skip::here("why"); return;` (or
//! `skip::skip("what", "why")` for a part of a test or a group).
#![allow(dead_code)]

use std::io::Write;

/// The environment variable naming the file every skip line is appended to.
pub const SKIP_LOG_VAR: &str = "CPU_ALL_SKIP_LOG";

/// [`skip`] with `what` = the running test, as `crate::test_name` (libtest names each test's
/// thread after the test).
pub fn here(why: &str) {
    let exe = std::env::current_exe().ok();
    let binary = exe
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // cargo names test binaries `<crate>-<hash>`.
    let binary = binary.rsplit_once('-').map(|(b, _)| b.to_string()).unwrap_or(binary);
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    skip(&format!("{binary}::{test}"), why);
}

/// Reports a skip: `what` names the test or group, `why` says what is missing (and, best,
/// how to get it). The caller returns right after.
pub fn skip(what: &str, why: &str) {
    let line = format!("SKIP: {what}: {}\n", why.replace('\n', " "));
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_VAR).filter(|p| !p.is_empty()) {
        // One write of one short line with O_APPEND: lines from parallel tests do not mix.
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = appended {
            let _ = writeln!(std::io::stderr(), "SKIP log {}: {e}", std::path::Path::new(&path).display());
        }
    }
}

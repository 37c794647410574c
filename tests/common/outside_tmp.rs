//! A fresh scratch directory a remote session can still see: a session mounts its own tmpfs on
//! /tmp, so nothing under /tmp (where a clone, and so its target dir, may live) is usable there.

use std::path::{Path, PathBuf};

/// `NAME-PID` under the test target's tmp dir, or under /var/tmp when that is inside /tmp;
/// emptied first.
pub fn scratch_dir(name: &str) -> PathBuf {
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let base = if target_tmp.starts_with("/tmp") && Path::new("/var/tmp").is_dir() {
        Path::new("/var/tmp")
    } else {
        target_tmp
    };
    let dir = base.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

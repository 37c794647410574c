//! The one temporary directory type of the test crates: a fresh directory under the system
//! temp dir, named after the test binary, the caller's tag, the process and a counter (so
//! parallel tests and parallel test binaries never share one), removed when dropped.
//! Include it from a support module with `#[path = "../common/temp_dir.rs"] mod temp_dir;`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A temporary directory removed (with everything in it) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `<tmp>/<test binary>-<tag>-<pid>-<n>`, emptied first if a stale one exists.
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{}-{tag}-{}-{n}", test_binary(), std::process::id());
        let p = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create temp dir {}: {e}", p.display()));
        TempDir(p)
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The running test binary's crate name (cargo names it `<crate>-<hash>`), e.g. `cpu_ssh`.
fn test_binary() -> String {
    let exe = std::env::current_exe().ok();
    let file = exe.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    let file = file.unwrap_or_else(|| "test".into());
    file.rsplit_once('-').map(|(crate_name, _)| crate_name.to_string()).unwrap_or(file)
}

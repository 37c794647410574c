//! Build script: records the git commit and the target triple for `cpu-all --version`.

use std::process::Command;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=CPU_ALL_TARGET={target}");

    // A tarball without .git builds too: the commit is then "unknown".
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let commit = if dirty && commit != "unknown" { format!("{commit}-dirty") } else { commit };
    println!("cargo:rustc-env=CPU_ALL_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    // Not .git/index: `git status` above rewrites it, so every build would rerun this script
    // and relink everything. The "-dirty" mark is therefore as of the last commit or checkout.
    println!("cargo:rerun-if-changed=.git/refs/heads");
}

//! Build script: records the git commit and the target triple for `cpu-all --version`, and
//! passes the size-saving link options of the static release binary (README "Size").

use std::process::Command;

fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=CPU_ALL_TARGET={target}");
    static_release_link_args(&target);

    // A tarball without .git builds too: the commit is then "unknown".
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    let commit = if dirty && commit != "unknown" { format!("{commit}-dirty") } else { commit };
    println!("cargo:rustc-env=CPU_ALL_COMMIT={commit}");
    // Rerun when HEAD moves: HEAD itself and the branch it names, asked from git because in a
    // worktree `.git` is a file (a path under it never exists, and cargo reruns a script with a
    // missing rerun-if-changed path on every build, relinking everything). Only existing paths
    // are named. Not the index: `git status` above rewrites it, so every build would rerun;
    // the "-dirty" mark is therefore as of the last commit or checkout.
    println!("cargo:rerun-if-changed=build.rs");
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) =
        git(&["rev-parse", "--symbolic-full-name", "HEAD"]).filter(|b| b.starts_with("refs/"))
    {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
        watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    for path in watched.into_iter().flatten() {
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

/// Link options for the musl release binary (panic = "abort"); bytes in README "Size".
/// - `-z pack-relative-relocs`: x86_64 musl links a static PIE (aarch64 too, through
///   tools/link-static-pie); x86_64's ~4,500 relative relocations take 107 KB as RELA and
///   1.4 KB as RELR, which musl's self-relocation applies. (riscv64 is a static PIE too, but
///   zig, its linker here, rejects the option.)
/// - The toolchain's rust-lld with `--icf=all` (x86_64, aarch64: the targets linked through
///   gcc): identical functions folded, 27 KB. Only code: lld folds no data without
///   `--ignore-data-address-equality`, and Rust promises no distinct function addresses.
/// - `.eh_frame` and its header discarded (~440 KB on x86_64; also aarch64 and riscv64, while
///   armv7 unwinds with its small .ARM.exidx): with panic = "abort" nothing
///   unwinds; they served only RUST_BACKTRACE, which in a stripped binary lists `<unknown>`
///   frames. A panic still prints its message and aborts. `-C force-unwind-tables=no` cannot
///   do it: under fat LTO std's bitcode keeps the module's uwtable flag. crtbegin's own entry
///   stays (its code refers to it).
fn static_release_link_args(target: &str) {
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    if !release || !target.contains("-linux-musl") {
        return;
    }
    // Where the bytes go without an unstripped rebuild: CPU_ALL_LINK_MAP=FILE writes the
    // linker's map (every input section with its size, under its mangled symbol name).
    println!("cargo:rerun-if-env-changed=CPU_ALL_LINK_MAP");
    if let Some(map) = std::env::var_os("CPU_ALL_LINK_MAP").filter(|m| !m.is_empty()) {
        println!("cargo:rustc-link-arg-bins=-Wl,-Map={}", std::path::Path::new(&map).display());
    }
    if target.starts_with("x86_64-") || target.starts_with("aarch64-") {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    if !(target.starts_with("x86_64-") || target.starts_with("aarch64-") || target.starts_with("riscv64")) {
        return;
    }
    if let Some(gcc_ld) = rust_lld_dir().filter(|_| !target.starts_with("riscv64")) {
        println!("cargo:rustc-link-arg-bins=-fuse-ld=lld");
        println!("cargo:rustc-link-arg-bins=-B{}", gcc_ld.display());
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
    }
    let Some(out_dir) = std::env::var_os("OUT_DIR") else { return };
    let script = std::path::Path::new(&out_dir).join("no-eh-frame.ld");
    let text = "SECTIONS { /DISCARD/ : { *(EXCLUDE_FILE(*crtbegin*.o) .eh_frame) } } INSERT AFTER .text;\n";
    if std::fs::write(&script, text).is_ok() {
        println!("cargo:rustc-link-arg-bins=-Wl,--no-eh-frame-hdr");
        println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    }
}

/// The directory holding the `ld.lld` that runs the toolchain's own rust-lld (shipped with
/// rustc on x86_64 Linux hosts; rustc links through it the same way with
/// `-C link-self-contained=+linker`), or None: then the C compiler's default linker is used.
fn rust_lld_dir() -> Option<std::path::PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let host = std::env::var("HOST").ok()?;
    let out = Command::new(rustc).args(["--print", "sysroot"]).output().ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let dir = std::path::Path::new(sysroot.trim()).join("lib/rustlib").join(host).join("bin/gcc-ld");
    dir.join("ld.lld").exists().then_some(dir)
}

/// The trimmed output of a successful `git ARGS`, or None (no git, not a checkout, empty).
fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

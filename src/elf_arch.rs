//! Which machine an ELF executable is for, read from its header, and the one-line explanation
//! cpud gives when exec fails with ENOEXEC because the client's namespace brought binaries of
//! another architecture (an x86_64 client's /bin on an arm64 board).
//!
//! Pure functions over the header bytes, plus one that reads the first bytes of a file. It
//! never executes anything and never fails loudly: an unreadable or non-ELF file gives `None`.

use std::io::Read;
use std::path::Path;

/// The architecture an ELF header names, in Rust's `std::env::consts::ARCH` spelling
/// (`x86_64`, `aarch64`, `arm`, `riscv64`, ...), so it compares with this build's own.
/// `None` when `header` is not an ELF header or names a machine this table does not know.
pub fn elf_machine(header: &[u8]) -> Option<&'static str> {
    if header.len() < 20 || header[..4] != *b"\x7fELF" {
        return None;
    }
    let is_64 = match header[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let machine = match header[5] {
        1 => u16::from_le_bytes([header[18], header[19]]),
        2 => u16::from_be_bytes([header[18], header[19]]),
        _ => return None,
    };
    Some(match (machine, is_64) {
        (3, _) => "x86",
        (62, _) => "x86_64",
        (40, _) => "arm",
        (183, _) => "aarch64",
        (243, true) => "riscv64",
        (243, false) => "riscv32",
        (8, true) => "mips64",
        (8, false) => "mips",
        (20, _) => "powerpc",
        (21, _) => "powerpc64",
        (22, _) => "s390x",
        (258, _) => "loongarch64",
        _ => return None,
    })
}

/// The architecture of the ELF file at `path` (see [`elf_machine`]).
pub fn file_machine(path: &Path) -> Option<&'static str> {
    let mut header = [0u8; 20];
    std::fs::File::open(path).ok()?.read_exact(&mut header).ok()?;
    elf_machine(&header)
}

/// The message for an exec of `program` (found at `path`) that failed with ENOEXEC on a
/// machine of architecture `here`: names the binary's architecture when it is a foreign ELF
/// file and says how to bring a matching userland; otherwise the plain error.
pub fn exec_format_message(program: &str, path: Option<&Path>, here: &str) -> String {
    match path.and_then(file_machine) {
        Some(there) if there != here => format!(
            "cpud: {program} is {} {there} binary; this machine is {here}: give {} {here} userland \
             with -namespace (see README \"Boards and architectures\")",
            article(there),
            article(here)
        ),
        _ => format!("cpud: {program}: exec format error (not an executable for this {here} machine)"),
    }
}

/// "an x86_64", "an aarch64", "a riscv64".
fn article(arch: &str) -> &'static str {
    if arch.starts_with(['a', 'e', 'i', 'o', 'u', 'x']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte ELF header prefix: class, data (endianness) and e_machine.
    fn header(class: u8, data: u8, machine: u16) -> Vec<u8> {
        let mut h = b"\x7fELF".to_vec();
        h.extend([class, data, 1, 0]);
        h.extend([0u8; 8]);
        h.extend([2, 0]); // e_type EXEC (not read)
        let m = if data == 1 { machine.to_le_bytes() } else { machine.to_be_bytes() };
        h.extend(m);
        h
    }

    #[test]
    fn machines() {
        assert_eq!(elf_machine(&header(2, 1, 62)), Some("x86_64"));
        assert_eq!(elf_machine(&header(2, 1, 183)), Some("aarch64"));
        assert_eq!(elf_machine(&header(1, 1, 40)), Some("arm"));
        assert_eq!(elf_machine(&header(2, 1, 243)), Some("riscv64"));
        assert_eq!(elf_machine(&header(1, 1, 243)), Some("riscv32"));
        assert_eq!(elf_machine(&header(2, 2, 22)), Some("s390x"));
        assert_eq!(elf_machine(&header(2, 1, 9999)), None);
        assert_eq!(elf_machine(&header(3, 1, 62)), None);
        assert_eq!(elf_machine(b"#!/bin/sh\necho hello\n"), None);
        assert_eq!(elf_machine(&header(2, 1, 62)[..19]), None);
    }

    #[test]
    fn this_test_binary_is_of_this_build_s_architecture() {
        let me = std::env::current_exe().expect("current_exe");
        assert_eq!(file_machine(&me), Some(std::env::consts::ARCH));
    }

    #[test]
    fn messages() {
        let dir = std::env::temp_dir().join(format!("cpu-all-elf-arch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let bash = dir.join("bash");
        std::fs::write(&bash, header(2, 1, 62)).expect("write");
        assert_eq!(
            exec_format_message("/bin/bash", Some(&bash), "aarch64"),
            "cpud: /bin/bash is an x86_64 binary; this machine is aarch64: give an aarch64 userland \
             with -namespace (see README \"Boards and architectures\")"
        );
        // Same architecture, or not ELF at all: the plain error.
        assert_eq!(
            exec_format_message("/bin/bash", Some(&bash), "x86_64"),
            "cpud: /bin/bash: exec format error (not an executable for this x86_64 machine)"
        );
        let script = dir.join("script");
        std::fs::write(&script, "no interpreter line\n").expect("write");
        assert!(exec_format_message("s", Some(&script), "arm")
            .ends_with("exec format error (not an executable for this arm machine)"));
        assert!(exec_format_message("/bin/bash", Some(&bash), "riscv64").contains("give a riscv64 userland"));
        assert!(exec_format_message("gone", None, "arm").starts_with("cpud: gone: exec format error"));
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! cpu-all: the library behind the `cpu`, `cpud`, `decpu` and `decpud` applets.
//!
//! `cpu HOST CMD` runs CMD on HOST, where it sees the client's files: the client serves its
//! filesystem over 9P2000.L through an SSH remote port forward, and the remote session mounts
//! it at /tmp/cpu in a private mount namespace and binds the chosen parts over its own.
//!
//! Where things live:
//! - [`flags`], [`options`]: Go-compatible command lines and every applet's options.
//! - [`error`]: the error type and the one mapping to exit statuses; [`keyfile`]: a public key
//!   given where a private one is needed (and the reverse), caught at start.
//! - [`cmdline`], [`protocol`]: the exec string and the names both ends agree on.
//! - [`ssh`]: keys, authorized keys, known_hosts, ssh_config, the SSH client and server.
//! - [`ninep`]: the 9P2000.L wire codec and the client's file server.
//! - [`namespace`]: namespace strings, fstab, and the mount/bind/unshare calls.
//! - [`client`]: the `cpu` session (SSH session + 9P back-channel); [`terminal`]: its local
//!   terminal (raw mode, window size, the `~.` escape); [`control`]: connection reuse
//!   (ControlMaster, ControlPath, ControlPersist).
//! - [`server`]: the `cpud` daemon; [`remote`]: `cpud -remote`, the per-session side.
//! - [`transport`]: tcp, vsock, unix and unix-vsock streams and listeners.
//! - [`discovery`]: DNS-SD announcement (decpud) and server selection (decpu).
//! - [`init`]: PID 1 duties for `cpud -init`.
//! - [`elf_arch`]: an ELF file's architecture, for cpud's message when exec says ENOEXEC.

pub mod client;
pub mod cmdline;
pub mod control;
pub mod discovery;
pub mod elf_arch;
pub mod error;
pub mod flags;
pub mod init;
pub mod keyfile;
pub mod logger;
pub mod namespace;
pub mod ninep;
pub mod options;
pub mod protocol;
pub mod remote;
pub mod server;
pub mod ssh;
pub mod task;
pub mod terminal;
pub mod transport;
pub mod wirecount;

pub use error::{Error, Result};

/// The version line of `cpu-all --version`.
pub fn version_line() -> String {
    format!(
        "cpu-all {} (commit {}, {})",
        env!("CARGO_PKG_VERSION"),
        env!("CPU_ALL_COMMIT"),
        env!("CPU_ALL_TARGET")
    )
}

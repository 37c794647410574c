//! 9P2000.L: the wire codec (no I/O), the server (fid table, dispatch), and the backends.
//!
//! The client serves its files with [`serve`] on the stream the remote kernel mounts
//! (v9fs, trans=fd). Layout: [`wire`] is the codec, [`server`] runs a session over any byte
//! stream, [`backend`] is the storage trait, [`hostfs`] the host-directory backend, and
//! [`errno`] the Linux error numbers sent in Rlerror.
//!
//! Behaviour worth knowing (and where it differs from the Go server):
//! - msize = min(asked, `max_msize`), never above 16 MiB; iounit 0; Rread/Rreaddir clamped
//!   so the whole reply fits in msize. Only `9P2000.L` is spoken (anything else: `unknown`).
//! - Twalk: `..` is lexical and stops at the root, `.` stays; empty names and names with
//!   `/` are EINVAL; a walk that fails after the first name returns a partial Rwalk.
//!   No symlink is ever followed on this side.
//! - QID path = st_ino on the export's first device; other devices get their index mixed
//!   into the top bits. Treaddir carries real DT_* types, kernel seek cookies as offsets
//!   (stable across calls), and includes `.` and `..` (`..` of the root shows the root).
//! - A fid holds the file it names (an O_PATH descriptor from the walk, the open descriptor
//!   after Tlopen), so fstat/fchown/futimens/ftruncate through an open file reach that file
//!   even after its name was unlinked, re-created or renamed over.
//! - New files, directories, nodes and symlinks get the requested mode exactly (no umask),
//!   the attaching user (Tattach n_uname) and requested gid when we run as root, else our
//!   uid and the requested gid where chown(2) allows it.
//! - Tlock/Tgetlock follow POSIX: locks belong to the remote process (proc_id, client_id),
//!   kept in a per-session table ([`locks`]); a lock that would wait answers BLOCKED at once.
//! - What a remote may not do: make device nodes (EPERM), set set-user-ID or set-group-ID
//!   bits on anything but a directory (EPERM), write `security.*`/`trusted.*` xattrs (EPERM), use
//!   NOFID as a new fid (EBADF), hold more than `server::MAX_FIDS` fids (EMFILE) or
//!   `server::XATTR_BUDGET` bytes of xattr buffers (ENOMEM), or make us queue replies it does
//!   not read (we stop reading its requests instead).
//! - Txattrcreate with size 0 removes the attribute (as the Linux client expects).
//! - Read-only export: every change is EROFS (opening for write or with O_TRUNC included).
//! - Numbers from the wire are checked before they reach the host: offsets and sizes above
//!   `i64::MAX` (a negative off_t) are EINVAL, lock ranges as fcntl checks them (EINVAL,
//!   EOVERFLOW), nanoseconds of Tsetattr below one second (EINVAL); seconds are
//!   two's-complement both ways, so times before 1970 survive the round trip.

pub mod backend;
pub mod errno;
pub mod hostfs;
pub mod locks;
pub mod server;
pub mod wire;

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};

pub use backend::{Backend, BackendFile};
pub use hostfs::HostFs;
pub use server::{serve_backend, ServerConfig};

/// Default and usual largest msize: the Linux fd transport's limit since 5.15.
pub const DEFAULT_MAX_MSIZE: u32 = 1024 * 1024;

/// What [`serve`] exports and how.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The exported directory (`-root`).
    pub root: PathBuf,
    /// Refuse every change with EROFS.
    pub read_only: bool,
    /// Largest msize we accept (the kernel asks; we answer min(asked, this)).
    pub max_msize: u32,
    /// Log every request and reply (`-dbg9p`).
    pub trace: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            root: PathBuf::from("/"),
            read_only: false,
            max_msize: DEFAULT_MAX_MSIZE,
            trace: false,
        }
    }
}

/// Serves 9P2000.L on `stream` until the peer closes it; Ok(()) on a clean close.
pub async fn serve<S>(stream: S, opts: ServeOptions) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    raise_fd_limit();
    let backend = HostFs::new(&opts.root)
        .map_err(|e| Error::io(format!("9p: cannot export {}", opts.root.display()), e))?;
    let config = ServerConfig { read_only: opts.read_only, max_msize: opts.max_msize, trace: opts.trace };
    serve_backend(stream, backend, config).await
}

/// Every fid holds a descriptor, and a kernel client keeps one fid per cached dentry and
/// open file: lift the soft limit on open files to the hard one (once per process).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut lim = getrlimit(Resource::Nofile);
        if lim.current < lim.maximum {
            lim.current = lim.maximum;
            if let Err(e) = setrlimit(Resource::Nofile, lim) {
                log::debug!("9p: cannot raise the open-file limit: {e}");
            }
        }
    });
}

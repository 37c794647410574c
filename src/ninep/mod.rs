//! 9P2000.L: the wire codec (no I/O), the server (fid table, dispatch), and the backends.
//!
//! The client serves its files with [`serve`] on the stream the remote kernel mounts.

use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};

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

/// Serves 9P2000.L on `stream` until the peer closes it.
pub async fn serve<S>(stream: S, opts: ServeOptions) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = (stream, opts);
    Err(Error::NineP("the 9p server is not implemented yet".into()))
}

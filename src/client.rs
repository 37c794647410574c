//! The `cpu` session: resolve the host, connect, start the 9P back-channel, run the command
//! and return its exit status.

use crate::error::{Error, Result};
use crate::options::CpuOptions;

/// Runs `cpu` with parsed options and returns the remote command's exit status.
pub fn run(opts: CpuOptions) -> Result<i32> {
    let _ = opts;
    Err(Error::Usage("cpu: not implemented yet".into()))
}

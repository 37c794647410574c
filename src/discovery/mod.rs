//! DNS-SD: decpud's announcement with TXT metadata and decpu's browsing and selection.

use crate::error::{Error, Result};
use crate::options::CpuOptions;

/// Runs `decpu`: picks the server(s) by DNS-SD, then runs the session like `cpu`
/// (by setting `host`/`port` and calling [`crate::client::run`]).
pub fn run_decpu(opts: CpuOptions) -> Result<i32> {
    let _ = opts;
    Err(Error::Usage("decpu: not implemented yet".into()))
}

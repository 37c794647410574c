//! The `cpud` daemon: listen, authenticate, and run each session through `cpud -remote`.

use crate::error::{Error, Result};
use crate::options::CpudOptions;

/// Runs the daemon until it is told to stop.
pub fn run(opts: CpudOptions) -> Result<()> {
    let _ = opts;
    Err(Error::Daemon("cpud: not implemented yet".into()))
}

//! Namespace strings, fstab text, and the mount/bind/unshare calls behind a trait.

use crate::error::{Error, Result};

/// The fstab the client sends as CPU_FSTAB (spec 3.5): the `-fstab` file's contents, then one
/// bind line per namespace element. `namespace` empty or `none`: no binds.
pub fn client_fstab(namespace: &str, fstab_file: Option<&str>) -> Result<String> {
    let _ = (namespace, fstab_file);
    Err(Error::Usage("namespace: not implemented yet".into()))
}

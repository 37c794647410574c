//! Namespace strings, fstab text, and the mount/bind/unshare calls behind a trait.

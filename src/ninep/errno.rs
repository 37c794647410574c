//! Linux errno values for Rlerror, and the mapping from host errors to them.
//!
//! Rlerror carries Linux numbers whatever the host is. On Linux the host's errno is the wire
//! errno; errors without an OS code are mapped from their kind.

use std::io;

/// A Linux errno value as sent in Rlerror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u32);

pub const EPERM: Errno = Errno(1);
pub const ENOENT: Errno = Errno(2);
pub const EIO: Errno = Errno(5);
pub const E2BIG: Errno = Errno(7);
pub const EBADF: Errno = Errno(9);
pub const EAGAIN: Errno = Errno(11);
pub const EACCES: Errno = Errno(13);
pub const EBUSY: Errno = Errno(16);
pub const EEXIST: Errno = Errno(17);
pub const ENOTDIR: Errno = Errno(20);
pub const EISDIR: Errno = Errno(21);
pub const EINVAL: Errno = Errno(22);
pub const ENOSPC: Errno = Errno(28);
pub const EROFS: Errno = Errno(30);
pub const ERANGE: Errno = Errno(34);
pub const ENOSYS: Errno = Errno(38);
pub const ENOTEMPTY: Errno = Errno(39);
pub const ELOOP: Errno = Errno(40);
pub const ENODATA: Errno = Errno(61);
pub const EPROTO: Errno = Errno(71);
pub const EOVERFLOW: Errno = Errno(75);
pub const EOPNOTSUPP: Errno = Errno(95);

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Self {
        Errno::from(&e)
    }
}

impl From<&io::Error> for Errno {
    fn from(e: &io::Error) -> Self {
        if let Some(code) = e.raw_os_error() {
            if code > 0 {
                // The host is Linux (this crate targets Linux): its numbers are the wire's.
                return Errno(code as u32);
            }
        }
        match e.kind() {
            io::ErrorKind::NotFound => ENOENT,
            io::ErrorKind::PermissionDenied => EACCES,
            io::ErrorKind::AlreadyExists => EEXIST,
            io::ErrorKind::InvalidInput | io::ErrorKind::InvalidData => EINVAL,
            io::ErrorKind::Unsupported => EOPNOTSUPP,
            io::ErrorKind::WouldBlock => EAGAIN,
            _ => EIO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_codes_pass_through_and_kinds_map() {
        assert_eq!(Errno::from(io::Error::from_raw_os_error(libc::ENOTEMPTY)), ENOTEMPTY);
        assert_eq!(Errno::from(io::Error::from_raw_os_error(libc::ENODATA)), ENODATA);
        assert_eq!(Errno::from(io::Error::new(io::ErrorKind::NotFound, "x")), ENOENT);
        assert_eq!(Errno::from(io::Error::other("x")), EIO);
    }
}

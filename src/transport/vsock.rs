//! AF_VSOCK dial and listen for `-net vsock`, and the parsing of CIDs and vsock ports.
//!
//! CIDs and ports are unsigned 32-bit with Go's base prefixes. Kernel errors become messages
//! that name the likely cause: no vsock in this kernel, no transport or VM for that CID,
//! nothing listening, or a silent peer (old host kernels time out, spec P32).

use std::io;
use std::time::Duration;

use tokio::time::Instant;

use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

use super::BoxStream;
use crate::error::{Error, Result};
use crate::flags::parse_uint;

pub use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_LOCAL};

/// What to load when AF_VSOCK is missing.
const NO_VSOCK: &str = "this kernel has no vsock support (modules vsock, vmw_vsock_virtio_transport; \
                        vhost_vsock on a VM host)";

fn parse_u32(what: &str, s: &str) -> Result<u32> {
    parse_uint(s).and_then(|v| u32::try_from(v).ok()).ok_or_else(|| {
        Error::Usage(format!(
            "bad vsock {what} {s:?}: want an unsigned 32-bit number (42, 0x2a, 0o52 or 0b101010)"
        ))
    })
}

/// Parses a vsock CID: unsigned 32-bit, decimal or with a base prefix (`3`, `0x3`, `0o3`).
pub fn parse_vsock_cid(s: &str) -> Result<u32> {
    parse_u32("CID", s)
}

/// Parses a vsock port: unsigned 32-bit, decimal or with a base prefix. Used for dial and
/// for listen (Go's cpud takes only 16 bits when listening; every 16-bit value means the
/// same here).
pub fn parse_vsock_port(s: &str) -> Result<u32> {
    parse_u32("port", s)
}

pub(super) async fn dial(host: &str, port: &str, deadline: Option<Instant>) -> Result<BoxStream> {
    let cid = parse_vsock_cid(host)?;
    let port = parse_vsock_port(port)?;
    if cid == VMADDR_CID_ANY {
        return Err(Error::Usage(format!(
            "vsock CID {host} is VMADDR_CID_ANY, which is only for listening; give the peer's CID"
        )));
    }
    loop {
        match VsockStream::connect(VsockAddr::new(cid, port)).await {
            Ok(s) => return Ok(Box::new(s)),
            // The kernel gives up on an unanswered connect after 2 s whatever our deadline
            // is; a peer that is still booting gets the rest of the deadline.
            Err(e)
                if e.raw_os_error() == Some(ETIMEDOUT)
                    && deadline.is_some_and(|d| d > Instant::now() + RETRY_PAUSE) =>
            {
                tokio::time::sleep(RETRY_PAUSE).await
            }
            Err(e) => return Err(dial_error(cid, port, &e)),
        }
    }
}

/// Pause between connects that timed out in the kernel.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Explains a failed vsock connect to `cid`/`port`.
pub(super) fn dial_error(cid: u32, port: u32, e: &io::Error) -> Error {
    let target = format!("vsock CID {cid} port {port}");
    let errno = e.raw_os_error().unwrap_or(0);
    let why = match errno {
        x if x == EAFNOSUPPORT => NO_VSOCK.to_string(),
        x if x == ENODEV => format!(
            "no vsock transport reaches CID {cid} (no such device): is a VM with this CID running, \
             and is the right transport loaded (vhost_vsock on the host, vmw_vsock_virtio_transport \
             in a guest; vsock_loopback for CID 1)?"
        ),
        x if x == EHOSTUNREACH || x == ENETUNREACH => {
            format!("CID {cid} is unreachable ({e}): is a VM with this CID running?")
        }
        x if x == ECONNREFUSED || x == ECONNRESET => format!(
            "connection refused: nothing listens on vsock port {port} at CID {cid} \
             (is cpud running there with -net vsock -sp {port}?)"
        ),
        x if x == ETIMEDOUT => format!("timed out: {}", timeout_hint(cid, port)),
        _ => e.to_string(),
    };
    Error::Connect(format!("cannot connect to {target}: {why}"))
}

/// Why a vsock connect may go unanswered, for timeout messages.
pub(super) fn timeout_hint(cid: u32, port: u32) -> String {
    let old_kernels = "old host kernels, e.g. Linux 5.8, time out instead of refusing";
    if cid == VMADDR_CID_HOST {
        format!(
            "nothing answered (is anything listening on the host's vsock port {port}? with a hybrid \
             vsock device (Firecracker, vhost-device-vsock) the host must listen on the device's Unix \
             socket path followed by _{port}; {old_kernels})"
        )
    } else {
        format!(
            "nothing answered (is a VM with CID {cid} running, and is anything listening on its port \
             {port}? {old_kernels})"
        )
    }
}

pub(super) fn bind(addr: &str, port: &str) -> Result<VsockListener> {
    let cid = if addr.is_empty() { VMADDR_CID_ANY } else { parse_vsock_cid(addr)? };
    let port_num = parse_vsock_port(port)?;
    VsockListener::bind(VsockAddr::new(cid, port_num)).map_err(|e| {
        let where_ = if cid == VMADDR_CID_ANY {
            format!("vsock port {port_num}")
        } else {
            format!("vsock CID {cid} port {port_num}")
        };
        let errno = e.raw_os_error().unwrap_or(0);
        let why = match errno {
            x if x == EAFNOSUPPORT => NO_VSOCK.to_string(),
            x if x == EADDRINUSE => "the port is in use".to_string(),
            x if x == EADDRNOTAVAIL => format!("CID {cid} is not a CID of this machine"),
            _ => e.to_string(),
        };
        Error::Daemon(format!("cannot listen on {where_}: {why}"))
    })
}

// Errno values as plain numbers, so matching stays readable.
const EAFNOSUPPORT: i32 = rustix::io::Errno::AFNOSUPPORT.raw_os_error();
const ENODEV: i32 = rustix::io::Errno::NODEV.raw_os_error();
const EHOSTUNREACH: i32 = rustix::io::Errno::HOSTUNREACH.raw_os_error();
const ENETUNREACH: i32 = rustix::io::Errno::NETUNREACH.raw_os_error();
const ECONNREFUSED: i32 = rustix::io::Errno::CONNREFUSED.raw_os_error();
const ECONNRESET: i32 = rustix::io::Errno::CONNRESET.raw_os_error();
const ETIMEDOUT: i32 = rustix::io::Errno::TIMEDOUT.raw_os_error();
const EADDRINUSE: i32 = rustix::io::Errno::ADDRINUSE.raw_os_error();
const EADDRNOTAVAIL: i32 = rustix::io::Errno::ADDRNOTAVAIL.raw_os_error();

#[cfg(test)]
mod tests {
    use super::*;

    fn os(errno: rustix::io::Errno) -> io::Error {
        io::Error::from_raw_os_error(errno.raw_os_error())
    }

    #[test]
    fn cid_and_port_parsing() {
        for s in ["42", "0x2a", "0X2A", "0o52", "052", "0b101010"] {
            assert_eq!(parse_vsock_cid(s).unwrap(), 42, "{s}");
            assert_eq!(parse_vsock_port(s).unwrap(), 42, "{s}");
        }
        assert_eq!(parse_vsock_cid("0xffffffff").unwrap(), u32::MAX);
        assert_eq!(parse_vsock_port("17010").unwrap(), 17010);
        assert_eq!(parse_vsock_port("100000").unwrap(), 100000);
        for bad in ["", "-1", "0x100000000", "4294967296", "abc", "0x", "3.5"] {
            let e = parse_vsock_cid(bad).unwrap_err();
            assert!(e.to_string().starts_with("bad vsock CID"), "{bad}: {e}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn dial_errors_say_what_to_do() {
        let m = |e: rustix::io::Errno| dial_error(3, 17010, &os(e)).to_string();
        assert_eq!(
            m(rustix::io::Errno::AFNOSUPPORT),
            "cannot connect to vsock CID 3 port 17010: this kernel has no vsock support \
             (modules vsock, vmw_vsock_virtio_transport; vhost_vsock on a VM host)"
        );
        assert!(m(rustix::io::Errno::NODEV).contains("no vsock transport reaches CID 3 (no such device)"));
        assert!(m(rustix::io::Errno::HOSTUNREACH).contains("CID 3 is unreachable"));
        assert!(m(rustix::io::Errno::CONNREFUSED)
            .contains("connection refused: nothing listens on vsock port 17010"));
        assert!(m(rustix::io::Errno::TIMEDOUT).contains("old host kernels"));
        let to_host = dial_error(VMADDR_CID_HOST, 5000, &os(rustix::io::Errno::TIMEDOUT)).to_string();
        assert!(to_host.contains("the device's Unix socket path followed by _5000"), "{to_host}");
        assert_eq!(dial_error(3, 1, &os(rustix::io::Errno::CONNREFUSED)).exit_code(), 255);
    }
}

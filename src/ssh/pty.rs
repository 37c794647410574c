//! Pseudo-terminals for `pty-req` sessions: open a pair, size it, and do async I/O on the
//! master side.
//!
//! The daemon keeps only the master; the slave is handed to the child (as its stdin, stdout,
//! stderr and controlling terminal) and closed here right after the spawn, so a master read
//! ends (EIO) once the child and everything it left holding the terminal have gone.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustix::pty::OpenptFlags;
use rustix::termios::Winsize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A terminal size as SSH sends it (characters and pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowSize {
    pub cols: u32,
    pub rows: u32,
    pub width_px: u32,
    pub height_px: u32,
}

impl WindowSize {
    fn to_winsize(self) -> Winsize {
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        Winsize {
            ws_col: clamp(self.cols),
            ws_row: clamp(self.rows),
            ws_xpixel: clamp(self.width_px),
            ws_ypixel: clamp(self.height_px),
        }
    }
}

/// A freshly opened pseudo-terminal pair.
pub struct PtyPair {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a pty pair of the given size. Both ends are close-on-exec; the child gets the slave
/// through dup2, which clears the flag on its stdio copies.
pub fn open(size: WindowSize) -> io::Result<PtyPair> {
    let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let slave = match rustix::pty::ioctl_tiocgptpeer(
        &master,
        OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC,
    ) {
        Ok(fd) => fd,
        // Kernels before 4.13: open the slave by name.
        Err(_) => {
            let name = rustix::pty::ptsname(&master, Vec::new())?;
            rustix::fs::open(
                name.as_c_str(),
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?
        }
    };
    set_size(&master, size)?;
    Ok(PtyPair { master, slave })
}

/// Applies the terminal modes of a `pty-req` (RFC 4254 section 8) to a fresh terminal, as
/// sshd does, so the remote line discipline matches the client's (erase key, ^C, echo...).
/// Unknown opcodes and the line speeds are ignored; an empty list leaves the kernel defaults.
pub fn apply_modes(fd: impl AsFd, modes: &[(russh::Pty, u32)]) -> io::Result<()> {
    use russh::Pty as P;
    use rustix::termios::{
        ControlModes as C, InputModes as I, LocalModes as L, OutputModes as O, SpecialCodeIndex as X,
    };
    if modes.is_empty() {
        return Ok(());
    }
    let mut t = rustix::termios::tcgetattr(&fd)?;
    for &(op, value) in modes {
        let on = value != 0;
        // SSH sends 255 for "disabled"; Linux's _POSIX_VDISABLE is 0.
        let cc = if value >= 255 { 0 } else { value as u8 };
        let special = match op {
            P::VINTR => Some(X::VINTR),
            P::VQUIT => Some(X::VQUIT),
            P::VERASE => Some(X::VERASE),
            P::VKILL => Some(X::VKILL),
            P::VEOF => Some(X::VEOF),
            P::VEOL => Some(X::VEOL),
            P::VEOL2 => Some(X::VEOL2),
            P::VSTART => Some(X::VSTART),
            P::VSTOP => Some(X::VSTOP),
            P::VSUSP => Some(X::VSUSP),
            P::VREPRINT => Some(X::VREPRINT),
            P::VWERASE => Some(X::VWERASE),
            P::VLNEXT => Some(X::VLNEXT),
            P::VDISCARD => Some(X::VDISCARD),
            _ => None,
        };
        if let Some(index) = special {
            t.special_codes[index] = cc;
            continue;
        }
        let input = match op {
            P::IGNPAR => I::IGNPAR,
            P::PARMRK => I::PARMRK,
            P::INPCK => I::INPCK,
            P::ISTRIP => I::ISTRIP,
            P::INLCR => I::INLCR,
            P::IGNCR => I::IGNCR,
            P::ICRNL => I::ICRNL,
            P::IXON => I::IXON,
            P::IXANY => I::IXANY,
            P::IXOFF => I::IXOFF,
            P::IMAXBEL => I::IMAXBEL,
            P::IUTF8 => I::IUTF8,
            _ => I::empty(),
        };
        t.input_modes.set(input, on);
        let local = match op {
            P::ISIG => L::ISIG,
            P::ICANON => L::ICANON,
            P::ECHO => L::ECHO,
            P::ECHOE => L::ECHOE,
            P::ECHOK => L::ECHOK,
            P::ECHONL => L::ECHONL,
            P::NOFLSH => L::NOFLSH,
            P::TOSTOP => L::TOSTOP,
            P::IEXTEN => L::IEXTEN,
            P::ECHOCTL => L::ECHOCTL,
            P::ECHOKE => L::ECHOKE,
            P::PENDIN => L::PENDIN,
            _ => L::empty(),
        };
        t.local_modes.set(local, on);
        let output = match op {
            P::OPOST => O::OPOST,
            P::ONLCR => O::ONLCR,
            P::OCRNL => O::OCRNL,
            P::ONOCR => O::ONOCR,
            P::ONLRET => O::ONLRET,
            _ => O::empty(),
        };
        t.output_modes.set(output, on);
        match op {
            P::CS7 if on => t.control_modes = (t.control_modes - C::CSIZE) | C::CS7,
            P::CS8 if on => t.control_modes = (t.control_modes - C::CSIZE) | C::CS8,
            P::PARENB => t.control_modes.set(C::PARENB, on),
            P::PARODD => t.control_modes.set(C::PARODD, on),
            _ => {}
        }
    }
    Ok(rustix::termios::tcsetattr(&fd, rustix::termios::OptionalActions::Now, &t)?)
}

/// TIOCSWINSZ: the kernel sends SIGWINCH to the terminal's foreground process group.
pub fn set_size(fd: impl AsFd, size: WindowSize) -> io::Result<()> {
    Ok(rustix::termios::tcsetwinsize(fd, size.to_winsize())?)
}

/// The master side, non-blocking, registered with the tokio reactor.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

impl PtyMaster {
    /// Takes the master fd; must be called inside a tokio runtime.
    pub fn new(master: OwnedFd) -> io::Result<PtyMaster> {
        rustix::io::ioctl_fionbio(&master, true)?;
        // SAFETY: an OwnedFd stays open for as long as the AsyncFd owns it and always returns
        // the same descriptor from as_raw_fd.
        let fd = unsafe { AsyncFd::register(master) }.map_err(|e| e.into_parts().1)?;
        Ok(PtyMaster { fd })
    }

    pub fn set_size(&self, size: WindowSize) -> io::Result<()> {
        set_size(self.fd.get_ref(), size)
    }

    /// The terminal's foreground process group (where a typed ^C would go), if any.
    pub fn foreground_group(&self) -> Option<i32> {
        rustix::termios::tcgetpgrp(self.fd.get_ref()).ok().map(|p| p.as_raw_nonzero().get())
    }
}

/// A shared master as an `AsyncRead` + `AsyncWrite` (output pump and input writer each hold
/// one; the terminal closes when the last copy is dropped).
#[derive(Clone)]
pub struct PtyIo(pub Arc<PtyMaster>);

impl AsyncRead for PtyIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|inner| rustix::io::read(inner.get_ref(), &mut *unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // EIO: every slave holder is gone, the terminal's end of file.
                Ok(Err(e)) if e.raw_os_error() == Some(rustix::io::Errno::IO.raw_os_error()) => {
                    return Poll::Ready(Ok(()))
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PtyIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| rustix::io::write(inner.get_ref(), data).map_err(io::Error::from)) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A terminal has no half-close; the client's EOF is not passed on.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_sets_the_size_on_both_ends() {
        let size = WindowSize { cols: 91, rows: 27, width_px: 0, height_px: 0 };
        let pair = open(size).unwrap();
        let ws = rustix::termios::tcgetwinsize(&pair.slave).unwrap();
        assert_eq!((ws.ws_col, ws.ws_row), (91, 27));
        set_size(&pair.master, WindowSize { cols: 100, rows: 40, ..size }).unwrap();
        let ws = rustix::termios::tcgetwinsize(&pair.slave).unwrap();
        assert_eq!((ws.ws_col, ws.ws_row), (100, 40));
        // Huge values from the wire are clamped, not wrapped.
        set_size(&pair.master, WindowSize { cols: 70000, rows: 1, ..size }).unwrap();
        assert_eq!(rustix::termios::tcgetwinsize(&pair.slave).unwrap().ws_col, u16::MAX);
    }

    #[test]
    fn modes_from_pty_req_are_applied() {
        use russh::Pty as P;
        let pair = open(WindowSize { cols: 80, rows: 24, ..Default::default() }).unwrap();
        apply_modes(
            &pair.slave,
            &[(P::VERASE, 8), (P::VINTR, 255), (P::ECHO, 0), (P::ONLCR, 1), (P::TTY_OP_ISPEED, 38400)],
        )
        .unwrap();
        let t = rustix::termios::tcgetattr(&pair.slave).unwrap();
        assert_eq!(t.special_codes[rustix::termios::SpecialCodeIndex::VERASE], 8);
        assert_eq!(t.special_codes[rustix::termios::SpecialCodeIndex::VINTR], 0);
        assert!(!t.local_modes.contains(rustix::termios::LocalModes::ECHO));
        assert!(t.output_modes.contains(rustix::termios::OutputModes::ONLCR));
        // No modes: the defaults stay (echo on).
        let pair = open(WindowSize::default()).unwrap();
        apply_modes(&pair.slave, &[]).unwrap();
        assert!(rustix::termios::tcgetattr(&pair.slave)
            .unwrap()
            .local_modes
            .contains(rustix::termios::LocalModes::ECHO));
    }

    #[test]
    fn master_read_ends_when_the_slave_closes() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let pair = open(WindowSize { cols: 80, rows: 24, ..Default::default() }).unwrap();
            let mut master = PtyIo(Arc::new(PtyMaster::new(pair.master).unwrap()));
            rustix::io::write(&pair.slave, b"hi\n").unwrap();
            drop(pair.slave);
            let mut got = Vec::new();
            let mut buf = [0u8; 64];
            loop {
                let n = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    tokio::io::AsyncReadExt::read(&mut master, &mut buf),
                )
                .await
                .unwrap()
                .unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            // The line discipline turns \n into \r\n.
            assert_eq!(got, b"hi\r\n");
        });
    }
}

//! The local terminal of an interactive `cpu` session: raw mode (restored when the guard is
//! dropped, on every exit path of the session), the window size, and the `~.` escape filter.
//!
//! Nothing here talks SSH; the client feeds keyboard bytes through [`EscapeFilter`] and asks
//! [`window_size`] on SIGWINCH.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use rustix::termios::{OptionalActions, Termios};

/// A terminal's size in characters and pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u32,
    pub rows: u32,
    pub width_px: u32,
    pub height_px: u32,
}

/// The window size of the terminal on `fd`, or None if `fd` is not a terminal.
pub fn window_size<Fd: AsFd>(fd: Fd) -> Option<WindowSize> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    Some(WindowSize {
        cols: u32::from(ws.ws_col),
        rows: u32::from(ws.ws_row),
        width_px: u32::from(ws.ws_xpixel),
        height_px: u32::from(ws.ws_ypixel),
    })
}

/// Whether `fd` is a terminal.
pub fn is_terminal<Fd: AsFd>(fd: Fd) -> bool {
    rustix::termios::isatty(fd)
}

/// Raw mode on a terminal for as long as this guard lives.
pub struct RawMode {
    fd: RawFd,
    saved: Termios,
}

impl RawMode {
    /// Puts the terminal on `fd` in raw mode (no echo, no line editing, no signals from keys,
    /// no output post-processing) and remembers how it was.
    pub fn enter(fd: BorrowedFd<'_>) -> std::io::Result<RawMode> {
        let saved = rustix::termios::tcgetattr(fd)?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(fd, OptionalActions::Flush, &raw)?;
        crate::logger::set_raw_terminal(true);
        Ok(RawMode { fd: fd.as_raw_fd(), saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: the fd is the process's stdin (or another fd the caller keeps open for the
        // whole session); it is only borrowed for this one call.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
        let _ = rustix::termios::tcsetattr(fd, OptionalActions::Drain, &self.saved);
        crate::logger::set_raw_terminal(false);
    }
}

/// What the keyboard asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeAction {
    /// Send the filtered bytes and go on.
    Forward,
    /// `~.` was typed: end the session (bytes before it are still sent).
    Disconnect,
}

/// The ssh escape filter: a `~` typed at the start of a line is held back; `~.` disconnects,
/// `~~` sends one `~`, `~` followed by anything else sends both. The start of the session
/// counts as the start of a line (as in OpenSSH; the Go client needs a newline first).
#[derive(Debug, Clone)]
pub struct EscapeFilter {
    at_line_start: bool,
    tilde_held: bool,
}

impl Default for EscapeFilter {
    fn default() -> Self {
        EscapeFilter { at_line_start: true, tilde_held: false }
    }
}

impl EscapeFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Filters `input`, appending what must be sent to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> EscapeAction {
        for &b in input {
            if self.tilde_held {
                self.tilde_held = false;
                match b {
                    b'.' => return EscapeAction::Disconnect,
                    b'~' => {
                        out.push(b'~');
                        self.at_line_start = false;
                    }
                    other => {
                        out.extend_from_slice(&[b'~', other]);
                        self.at_line_start = other == b'\r' || other == b'\n';
                    }
                }
            } else if self.at_line_start && b == b'~' {
                self.tilde_held = true;
            } else {
                out.push(b);
                self.at_line_start = b == b'\r' || b == b'\n';
            }
        }
        EscapeAction::Forward
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> (Vec<u8>, EscapeAction) {
        let mut f = EscapeFilter::new();
        let mut out = Vec::new();
        let mut last = EscapeAction::Forward;
        for c in chunks {
            last = f.feed(c, &mut out);
            if last == EscapeAction::Disconnect {
                break;
            }
        }
        (out, last)
    }

    #[test]
    fn tilde_dot_after_newline_disconnects() {
        assert_eq!(run(&[b"ls\r~."]), (b"ls\r".to_vec(), EscapeAction::Disconnect));
        assert_eq!(run(&[b"ls\n", b"~", b"."]), (b"ls\n".to_vec(), EscapeAction::Disconnect));
        assert_eq!(run(&[b"~."]), (Vec::new(), EscapeAction::Disconnect), "start of session");
    }

    #[test]
    fn tilde_inside_a_line_is_plain() {
        assert_eq!(run(&[b"a~.b"]), (b"a~.b".to_vec(), EscapeAction::Forward));
    }

    #[test]
    fn double_tilde_sends_one_and_other_bytes_pass() {
        assert_eq!(run(&[b"\r~~."]), (b"\r~.".to_vec(), EscapeAction::Forward));
        assert_eq!(run(&[b"\r~x"]), (b"\r~x".to_vec(), EscapeAction::Forward));
        assert_eq!(run(&[b"\r~\r~."]), (b"\r~\r".to_vec(), EscapeAction::Disconnect));
    }
}

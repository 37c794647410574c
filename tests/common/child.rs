//! Running a child process of a test with a bound on its time: feeding its stdin from a
//! thread, collecting stdout and stderr in threads (so a chatty child never blocks on a full
//! pipe), or line by line as they come, and waiting at most a given time before killing it (by its own handle). What to do
//! on a timeout (panic, or report and go on) stays with the caller. Also the bounded poll of a
//! condition (`wait_until`) that tests use to wait for what a child does.
//! Include it from a support module with `#[path = "../common/child.rs"] mod child;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ExitStatus, Output};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes as text, invalid UTF-8 shown as U+FFFD.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Writes `input` to the child's piped stdin from a thread and then closes it; with no input
/// (or no pipe) the thread does nothing. Join the handle after the child has ended.
pub fn feed_stdin(child: &mut Child, input: Option<Vec<u8>>) -> JoinHandle<()> {
    let mut pipe = child.stdin.take();
    std::thread::spawn(move || {
        if let (Some(w), Some(data)) = (pipe.as_mut(), input) {
            let _ = w.write_all(&data);
        }
        drop(pipe);
    })
}

/// The threads reading a child's piped stdout and stderr to their end.
pub struct OutputReaders {
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl OutputReaders {
    /// Starts reading whichever of stdout and stderr are piped (a missing one reads as empty).
    pub fn start(child: &mut Child) -> OutputReaders {
        OutputReaders { stdout: read_all(child.stdout.take()), stderr: read_all(child.stderr.take()) }
    }

    /// Everything the child wrote, with its exit status. Returns once both pipes are closed.
    pub fn finish(self, status: ExitStatus) -> Output {
        Output {
            status,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }
}

fn read_all(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut v);
        }
        v
    })
}

/// Collects what a child with piped stdout and stderr writes until it exits, killing it after
/// `timeout`; the flag says whether it was killed (the caller says so, or fails).
pub fn output_or_kill(mut child: Child, timeout: Duration) -> (Output, bool) {
    let readers = OutputReaders::start(&mut child);
    let (status, killed) = match wait_or_kill(&mut child, timeout) {
        Some(status) => (status, false),
        None => match child.wait() {
            Ok(status) => (status, true),
            Err(e) => panic!("reaping child {}: {e}", child.id()),
        },
    };
    (readers.finish(status), killed)
}

/// Sends each line `stream` yields (a child's piped stdout or stderr) to the returned
/// receiver, from a thread, until the stream ends or the receiver is dropped.
pub fn lines_of(stream: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (polling every 10 ms) for the child to exit; after `timeout` kills it, reaps it and
/// returns None. A later `child.wait()` then gives the killed child's status.
pub fn wait_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; asks once more at the end, so
/// a condition that became true during the last sleep still counts.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

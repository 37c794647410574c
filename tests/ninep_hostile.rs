//! A remote that does not play fair: floods of fids, xattr buffers, Tflush and big reads it
//! never reads the replies of, and NOFID as a new fid. Each case must get a clear error or
//! backpressure, and the serving process (this one: the server runs in a thread) must stay
//! under 64 MB of RSS (the Rflush flood, small by design: under 4 MB more than before it).
//! Every test runs in a child process of its own, so one case's
//! allocations cannot count against another's.

mod ninep_support;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use cpu_all::ninep::server::{MAX_FIDS, XATTR_BUDGET};
use cpu_all::ninep::wire::*;
use ninep_support::*;

const EBADF: u32 = 9;
const ENOMEM: u32 = 12;
const EMFILE: u32 = 24;
const RSS_LIMIT_KIB: u64 = 64 * 1024;
const CHILD_ENV: &str = "NINEP_HOSTILE_CHILD";

/// Runs test `name` in a fresh child process (unless we are that child); true in the child.
fn in_own_process(name: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run the test in a child process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "{name} failed in its child process ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("1 passed"), "{name} did not run in its child:\n{stdout}");
    false
}

/// A figure of /proc/self/status in KiB (VmRSS: now; VmHWM: the peak so far).
fn status_kib(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|l| l.starts_with(key)).expect("status line");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("status value")
}

/// Asserts that this process (client and server) never went over the limit.
fn assert_rss_bounded(when: &str) {
    let (rss, peak) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    eprintln!("RSS {when}: {rss} KiB, peak {peak} KiB");
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {peak} KiB {when} (limit {RSS_LIMIT_KIB} KiB)");
}

/// Waits until the server has done what it will with the requests it has (RSS unchanged
/// for a second; at most 30 s): only then does "the replies are unread" mean something.
fn settle() {
    let mut last = status_kib("VmRSS:");
    let mut same = 0;
    for _ in 0..150 {
        std::thread::sleep(Duration::from_millis(200));
        let now = status_kib("VmRSS:");
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if same >= 5 {
            return;
        }
    }
    eprintln!("RSS still moving after 30 s ({last} KiB); checking it anyway");
}

fn frame_of(tag: u16, msg: &Tmessage) -> Vec<u8> {
    encode_tmessage(tag, msg)
}

fn tag_of(i: usize) -> u16 {
    (i % 60_000) as u16 + 1
}

/// Sends `n` requests made by `make` without reading any reply until all are sent or the
/// server stops taking them (a write waits 3 s: backpressure); checks the RSS once the
/// server settled; then reads the `n` replies (handing each to `on_reply`) while a thread sends the rest.
fn flood(
    c: &mut Client,
    n: usize,
    make: impl Fn(usize) -> Vec<u8> + Send + 'static,
    mut on_reply: impl FnMut(u16, Rmessage),
) {
    let mut w = c.stream.try_clone().expect("dup socket");
    w.set_write_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut pending: Vec<u8> = Vec::new();
    let mut next = 0usize;
    let mut stalled = false;
    while next < n || !pending.is_empty() {
        while pending.len() < 64 * 1024 && next < n {
            pending.extend(make(next));
            next += 1;
        }
        match w.write(&pending) {
            Ok(k) => {
                pending.drain(..k);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                stalled = true;
                break;
            }
            Err(e) => panic!("sending requests: {e}"),
        }
    }
    eprintln!(
        "flood: {next} of {n} requests made before the server stopped taking them (stalled: {stalled})"
    );
    settle();
    assert_rss_bounded("with the replies unread");
    w.set_write_timeout(Some(Duration::from_secs(60))).expect("timeout");
    let writer = std::thread::spawn(move || {
        w.write_all(&pending).expect("send the rest");
        let mut buf = Vec::new();
        for i in next..n {
            buf.extend(make(i));
            if buf.len() >= 64 * 1024 {
                w.write_all(&buf).expect("send the rest");
                buf.clear();
            }
        }
        w.write_all(&buf).expect("send the rest");
    });
    for _ in 0..n {
        let (tag, r) = c.recv();
        on_reply(tag, r);
    }
    writer.join().expect("writer thread");
}

#[test]
fn nofid_is_never_a_new_fid() {
    let dir = TempDir::new("nofid");
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    assert_eq!(c.walk(0, NOFID, &[]).unwrap_err(), EBADF);
    assert_eq!(c.xattrwalk(0, NOFID, "").unwrap_err(), EBADF);
    assert_eq!(c.attach(NOFID, "").unwrap_err(), EBADF);
    // The connection is fine afterwards.
    c.walk(0, 1, &[]).unwrap();
    h.finish().unwrap();
}

#[test]
fn the_fid_table_is_capped() {
    if !in_own_process("the_fid_table_is_capped") {
        return;
    }
    let dir = TempDir::new("fidcap");
    let mut h = start_attached(options(dir.path()));
    let n = MAX_FIDS + 20_000;
    let (mut ok, mut refused) = (0usize, 0usize);
    flood(
        &mut h.client,
        n,
        |i| frame_of(tag_of(i), &Tmessage::Walk(Twalk { fid: 0, newfid: i as u32 + 1, names: vec![] })),
        |_, r| match r {
            Rmessage::Walk(_) => ok += 1,
            Rmessage::Lerror(e) => {
                assert_eq!(e.ecode, EMFILE);
                refused += 1;
            }
            r => panic!("{r:?}"),
        },
    );
    assert_eq!(ok, MAX_FIDS - 1, "fid 0 is the attach");
    assert_eq!(refused, n - ok);
    assert_rss_bounded(&format!("holding {MAX_FIDS} fids"));
    // Clunking makes room again.
    h.client.clunk(1).unwrap();
    h.client.walk(0, 1, &[]).unwrap();
    h.finish().unwrap();
}

#[test]
fn xattr_buffers_are_capped() {
    if !in_own_process("xattr_buffers_are_capped") {
        return;
    }
    let dir = TempDir::new("xattrcap");
    let mut h = start_attached(options(dir.path()));
    let n = 1500usize;
    const SIZE: usize = 65536;
    let fits = XATTR_BUDGET / SIZE;
    flood(
        &mut h.client,
        n,
        |i| frame_of(tag_of(i), &Tmessage::Walk(Twalk { fid: 0, newfid: i as u32 + 1, names: vec![] })),
        |_, r| assert!(matches!(r, Rmessage::Walk(_)), "{r:?}"),
    );
    let mut granted = Vec::new();
    let mut refused = 0;
    flood(
        &mut h.client,
        n,
        |i| {
            let t = Txattrcreate { fid: i as u32 + 1, name: "user.big".into(), size: SIZE as u64, flags: 0 };
            frame_of(tag_of(i), &Tmessage::XattrCreate(t))
        },
        |tag, r| match r {
            Rmessage::XattrCreate(_) => granted.push(tag),
            Rmessage::Lerror(e) => {
                assert_eq!(e.ecode, ENOMEM);
                refused += 1;
            }
            r => panic!("{r:?}"),
        },
    );
    assert_eq!((granted.len(), refused), (fits, n - fits));
    // Fill every fid: only the granted ones take data.
    let mut written = 0;
    flood(
        &mut h.client,
        n,
        |i| {
            let t = Twrite { fid: i as u32 + 1, offset: 0, data: Payload::new(vec![b'x'; SIZE]) };
            frame_of(tag_of(i), &Tmessage::Write(t))
        },
        |_, r| match r {
            Rmessage::Write(w) => {
                assert_eq!(w.count as usize, SIZE);
                written += 1;
            }
            Rmessage::Lerror(e) => assert_eq!(e.ecode, EBADF),
            r => panic!("{r:?}"),
        },
    );
    assert_eq!(written, fits);
    assert_rss_bounded("with every xattr buffer full");
    h.finish().unwrap();
}

#[test]
fn unread_rflush_replies_stop_the_reading_of_requests() {
    if !in_own_process("unread_rflush_replies_stop_the_reading_of_requests") {
        return;
    }
    let dir = TempDir::new("flushflood");
    let mut h = start_attached(options(dir.path()));
    // An Rflush held in memory costs about 90 bytes (measured with the server broken to queue
    // every reply: 1.5 M unread Rflush, 131 MiB more RSS). The server stops reading after a
    // few tens of thousands (the socket buffers and MAX_IN_FLIGHT), holding well under 1 MiB
    // more; 200,000 held would be about 17 MiB. So the growth while the flood is unread is
    // held to RSS_GROWTH_LIMIT_KIB: a server that queues them fails by about four times.
    const RSS_GROWTH_LIMIT_KIB: u64 = 4 * 1024;
    let before = status_kib("VmRSS:");
    let n = 200_000;
    let mut flushed = 0usize;
    flood(
        &mut h.client,
        n,
        |i| frame_of(tag_of(i), &Tmessage::Flush(Tflush { oldtag: 0xfffe })),
        |_, r| match r {
            Rmessage::Flush(_) => flushed += 1,
            r => panic!("{r:?}"),
        },
    );
    assert_eq!(flushed, n);
    assert_rss_bounded("after the flood");
    // VmHWM is this child's peak since it started: at or above its RSS before the flood.
    let grew = status_kib("VmHWM:").saturating_sub(before);
    assert!(
        grew < RSS_GROWTH_LIMIT_KIB,
        "peak RSS grew {grew} KiB over the {before} KiB before {n} unread Rflush (limit {RSS_GROWTH_LIMIT_KIB} KiB): \
         the server kept reading requests while their replies were unread"
    );
    h.client.walk(0, 1, &[]).unwrap();
    h.finish().unwrap();
}

#[test]
fn unread_big_replies_stop_the_reading_of_requests() {
    if !in_own_process("unread_big_replies_stop_the_reading_of_requests") {
        return;
    }
    let dir = TempDir::new("readflood");
    std::fs::write(dir.join("big"), vec![7u8; 1 << 20]).unwrap();
    let mut h = start_attached(options(dir.path()));
    h.client.walk(0, 1, &["big"]).unwrap();
    h.client.lopen(1, O_RDONLY).unwrap();
    let n = 300;
    let mut bytes = 0usize;
    flood(
        &mut h.client,
        n,
        |i| frame_of(tag_of(i), &Tmessage::Read(Tread { fid: 1, offset: 0, count: 1 << 20 })),
        |_, r| match r {
            Rmessage::Read(d) => bytes += d.data.len(),
            r => panic!("{r:?}"),
        },
    );
    // The reply carries at most msize minus its header.
    assert_eq!(bytes, n * ((1 << 20) - 11));
    assert_rss_bounded("after the flood");
    h.finish().unwrap();
}

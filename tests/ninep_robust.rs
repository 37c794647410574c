//! The server under bad input and load: malformed and truncated messages, framing errors,
//! 64 requests in flight, Tflush, and a clean close.

mod ninep_support;

use std::collections::HashMap;
use std::fs;

use cpu_all::ninep::wire::*;
use ninep_support::*;

const EINVAL: u32 = 22;
const ENOSYS: u32 = 38;

fn frame(ty: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let mut w = Vec::new();
    encode_frame(&mut w, ty, tag, |w| w.extend_from_slice(body));
    w
}

fn expect_error(c: &mut Client, tag: u16, code: u32) {
    match c.recv() {
        (t, Rmessage::Lerror(e)) => assert_eq!((t, e.ecode), (tag, code)),
        other => panic!("expected Rlerror {code} for tag {tag}, got {other:?}"),
    }
}

#[test]
fn malformed_messages_get_rlerror_and_the_connection_survives() {
    let dir = TempDir::new("malformed");
    fs::write(dir.join("f"), b"still here").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    // Unknown type (9P2000 Topen) → ENOSYS.
    c.send_raw(&frame(112, 40, &[0, 0, 0, 0, 0]));
    expect_error(c, 40, ENOSYS);
    // A body cut short: Twalk that announces two names but carries one.
    let mut body = Vec::new();
    0u32.encode(&mut body);
    1u32.encode(&mut body);
    2u16.encode(&mut body);
    P9String::from("f").encode(&mut body);
    c.send_raw(&frame(110, 41, &body));
    expect_error(c, 41, EINVAL);
    // A string length running past the end of the frame.
    let mut body = Vec::new();
    0u32.encode(&mut body);
    0xffffu16.encode(&mut body);
    c.send_raw(&frame(72, 42, &body));
    expect_error(c, 42, EINVAL);
    // An empty body for a message that needs fields.
    c.send_raw(&frame(116, 43, &[]));
    expect_error(c, 43, EINVAL);
    // Twrite whose count exceeds the bytes sent.
    let mut body = Vec::new();
    0u32.encode(&mut body);
    0u64.encode(&mut body);
    1000u32.encode(&mut body);
    body.extend_from_slice(b"short");
    c.send_raw(&frame(118, 44, &body));
    expect_error(c, 44, EINVAL);
    // An R-message sent to the server.
    c.send_raw(&frame(117, 45, &[0, 0, 0, 0]));
    expect_error(c, 45, ENOSYS);
    // Requests on fids that do not exist.
    assert_eq!(c.read(77, 0, 10).unwrap_err(), 9);
    assert_eq!(c.lopen(77, 0).unwrap_err(), 9);
    // The session still works.
    c.walk(0, 1, &["f"]).unwrap();
    c.lopen(1, O_RDONLY).unwrap();
    assert_eq!(c.read(1, 0, 100).unwrap(), b"still here");
    h.finish().expect("clean close after bad requests");
}

#[test]
fn frame_too_small_closes_the_connection() {
    let dir = TempDir::new("tiny");
    let mut h = start_attached(options(dir.path()));
    h.client.send_raw(&[3, 0, 0, 0, 1, 2, 3]);
    assert!(h.client.recv_frame().is_none(), "server should close");
    assert!(h.finish().is_err(), "serve reports the framing error");
}

#[test]
fn frame_larger_than_msize_closes_the_connection() {
    let dir = TempDir::new("huge");
    let mut h = start(options(dir.path()));
    h.client.version(8192).unwrap();
    let mut big = Vec::new();
    encode_frame(&mut big, 118, 1, |w| w.resize(w.len() + 9000, 0));
    h.client.send_raw(&big[..64]);
    assert!(h.client.recv_frame().is_none(), "server should close");
    assert!(h.finish().is_err());
}

#[test]
fn truncated_stream_ends_the_session_without_panic() {
    let dir = TempDir::new("trunc");
    let mut h = start_attached(options(dir.path()));
    // Header says 100 bytes, only 10 arrive, then the client closes.
    let mut partial = Vec::new();
    100u32.encode(&mut partial);
    partial.extend_from_slice(&[110, 1, 0, 0, 0, 0, 0]);
    h.client.send_raw(&partial);
    let r = h.finish();
    assert!(r.is_err(), "a message cut by EOF is an error: {r:?}");
}

#[test]
fn clean_close_returns_ok() {
    let dir = TempDir::new("close");
    let h = start_attached(options(dir.path()));
    h.finish().expect("Ok(()) on a clean close");
}

#[test]
fn sixty_four_requests_in_flight() {
    let dir = TempDir::new("inflight");
    let data: Vec<u8> = (0..64 * 4096u32).map(|i| (i / 4096) as u8 ^ (i as u8)).collect();
    fs::write(dir.join("f"), &data).unwrap();
    for i in 0..64 {
        fs::write(dir.join(&format!("small{i}")), format!("{i}")).unwrap();
    }
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    c.lopen(1, O_RDONLY).unwrap();
    // 64 reads and 64 walks sent back to back, before reading any reply.
    let mut batch = Vec::new();
    for i in 0..64u16 {
        let t = Tmessage::Read(Tread { fid: 1, offset: i as u64 * 4096, count: 4096 });
        batch.extend_from_slice(&encode_tmessage(100 + i, &t));
        let name = format!("small{i}");
        let names = vec![P9String::from(name.as_str())];
        let t = Tmessage::Walk(Twalk { fid: 0, newfid: 1000 + i as u32, names });
        batch.extend_from_slice(&encode_tmessage(200 + i, &t));
    }
    c.send_raw(&batch);
    let mut seen = HashMap::new();
    for _ in 0..128 {
        let (tag, r) = c.recv();
        assert!(seen.insert(tag, ()).is_none(), "tag {tag} answered twice");
        match r {
            Rmessage::Read(r) if (100..164).contains(&tag) => {
                let i = (tag - 100) as usize;
                assert_eq!(&r.data[..], &data[i * 4096..(i + 1) * 4096]);
            }
            Rmessage::Walk(w) if (200..264).contains(&tag) => assert_eq!(w.qids.len(), 1),
            other => panic!("tag {tag}: {other:?}"),
        }
    }
    for i in 0..64u32 {
        let a = c.getattr(1000 + i).unwrap();
        assert_eq!(a.size, format!("{i}").len() as u64);
    }
    h.finish().unwrap();
}

#[test]
fn flush_is_answered_after_the_flushed_reply() {
    let dir = TempDir::new("flush");
    fs::write(dir.join("f"), b"x").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    // Flushing a tag that is not in flight: Rflush at once.
    c.send(9, &Tmessage::Flush(Tflush { oldtag: 1234 }));
    assert_eq!(c.recv(), (9, Rmessage::Flush(Empty {})));
    // A request followed immediately by its flush: either the reply then Rflush, or only
    // Rflush (the request was dropped before it ran). Never Rflush first.
    for round in 0..50u16 {
        let tag = 10 + round * 2;
        let names = vec![P9String::from("f")];
        c.send(tag, &Tmessage::Walk(Twalk { fid: 0, newfid: 5000 + round as u32, names }));
        c.send(tag + 1, &Tmessage::Flush(Tflush { oldtag: tag }));
        match c.recv() {
            (t, Rmessage::Walk(_)) => {
                assert_eq!(t, tag);
                assert_eq!(c.recv(), (tag + 1, Rmessage::Flush(Empty {})));
            }
            (t, Rmessage::Flush(_)) => assert_eq!(t, tag + 1),
            other => panic!("{other:?}"),
        }
    }
    // Still serving.
    c.walk(0, 1, &["f"]).unwrap();
    h.finish().unwrap();
}

#[test]
fn rread_is_clamped_to_msize() {
    let dir = TempDir::new("clamp");
    fs::write(dir.join("f"), vec![1u8; 100_000]).unwrap();
    let mut h = start(options(dir.path()));
    let c = &mut h.client;
    assert_eq!(c.version(8192).unwrap().msize, 8192);
    c.attach(0, "").unwrap();
    c.walk(0, 1, &["f"]).unwrap();
    c.lopen(1, O_RDONLY).unwrap();
    let tag = c.tag();
    c.send(tag, &Tmessage::Read(Tread { fid: 1, offset: 0, count: 1 << 20 }));
    let f = c.recv_frame().unwrap();
    assert_eq!(f.len(), 8192, "the whole Rread fits in msize");
    // Readdir too.
    c.walk(0, 2, &[]).unwrap();
    c.lopen(2, O_RDONLY | O_DIRECTORY).unwrap();
    let tag = c.tag();
    c.send(tag, &Tmessage::Readdir(Treaddir { fid: 2, offset: 0, count: 1 << 20 }));
    let f = c.recv_frame().unwrap();
    assert!(f.len() <= 8192);
    h.finish().unwrap();
}

#[test]
fn a_blocked_request_does_not_stop_the_others_and_flush_waits_for_it() {
    let dir = TempDir::new("blocked");
    let fifo = dir.join("fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::write(dir.join("f"), b"free").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["fifo"]).unwrap();
    // Opening a FIFO for reading waits for a writer: this request sits in the pool.
    c.send(500, &Tmessage::Lopen(Tlopen { fid: 1, flags: O_RDONLY }));
    // Meanwhile other requests are served.
    c.walk(0, 2, &["f"]).unwrap();
    c.lopen(2, O_RDONLY).unwrap();
    assert_eq!(c.read(2, 0, 10).unwrap(), b"free");
    // Flushing the blocked request: Rflush must not come before its reply.
    c.send(501, &Tmessage::Flush(Tflush { oldtag: 500 }));
    c.walk(0, 3, &["f"]).unwrap();
    // Release the FIFO open by opening the write end (bounded: the reader is waiting).
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    match c.recv() {
        (500, Rmessage::Lopen(_)) => {}
        other => panic!("expected Rlopen for tag 500 first, got {other:?}"),
    }
    assert_eq!(c.recv(), (501, Rmessage::Flush(Empty {})));
    drop(writer);
    h.finish().unwrap();
}

#[test]
fn walks_past_sixteen_names_and_reused_or_clunked_fids_are_refused() {
    const EBADF: u32 = 9;
    let dir = TempDir::new("fidedges");
    let deep: std::path::PathBuf = (0..16).map(|i| format!("d{i}")).collect();
    fs::create_dir_all(dir.path().join(&deep)).unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    let names: Vec<String> = (0..17).map(|i| format!("d{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // Sixteen names (Plan 9's MAXWELEM) walk; seventeen are refused without a new fid.
    assert_eq!(c.walk(0, 1, &names[..16]).unwrap().len(), 16);
    assert_eq!(c.walk(0, 2, &names).unwrap_err(), EINVAL);
    assert_eq!(c.getattr(2).unwrap_err(), EBADF);
    // A new fid that is in use is refused and the old one keeps what it named.
    let before = c.getattr(1).unwrap().qid;
    assert!(c.walk(0, 1, &["d0"]).is_err());
    assert_eq!(c.getattr(1).unwrap().qid, before);
    // After a clunk the fid is gone, and its number may name something new.
    c.clunk(1).unwrap();
    assert_eq!(c.getattr(1).unwrap_err(), EBADF);
    assert_eq!(c.clunk(1).unwrap_err(), EBADF);
    c.walk(0, 1, &["d0"]).unwrap();
    assert_eq!(c.getattr(1).unwrap().qid, c.walk(0, 3, &["d0"]).unwrap()[0]);
    h.finish().unwrap();
}

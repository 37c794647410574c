//! 9P server figures (`make bench`): sequential read and write through the server over a
//! Unix socketpair with msize 64 KiB and 1 MiB, and walk+getattr operations per second on
//! small files. Prints `name value unit` lines. The client is the blocking test client,
//! one request outstanding at a time (as one reading process in the kernel), except for
//! the `-pipelined` figures which keep several in flight. `ninep-rtt-floor` is a bare
//! socketpair echo between two threads at the same moment: the least one unpipelined round
//! trip costs on this machine, server or not (walk+getattr+clunk is three of them).

#[path = "../tests/ninep_support/mod.rs"]
mod ninep_support;

use std::fs;
use std::time::{Duration, Instant};

use cpu_all::ninep::wire::*;
use ninep_support::*;

const FILE_SIZE: usize = 64 << 20;
/// Rread/Twrite header room the Linux client leaves (P9_IOHDRSZ).
const IOHDRSZ: u32 = 24;

/// Socket buffers for the socketpair: the default 208 KiB makes every 1 MiB message a
/// dozen wake-ups of each side; the SSH channel in real use has its own window.
static SOCKET_BUFFER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn session(dir: &TempDir, msize: u32) -> Harness {
    let buf = SOCKET_BUFFER.load(std::sync::atomic::Ordering::Relaxed);
    let mut h = start_tuned(options(dir.path()), (buf > 0).then_some(buf), || {});
    h.client.version(msize).expect("version");
    h.client.attach(0, "").expect("attach");
    h
}

/// Sends Tread and reads the Rread straight into `buf` (no per-reply allocation or copy on
/// the client side, so the figure is the server's). Returns the payload length.
fn read_into(c: &mut Client, fid: u32, offset: u64, count: u32, buf: &mut Vec<u8>) -> usize {
    c.send(1, &Tmessage::Read(Tread { fid, offset, count }));
    if buf.len() < count as usize {
        buf.resize(count as usize, 0);
    }
    recv_rread(c, buf)
}

/// Reads one Rread into `buf`; returns the payload length.
fn recv_rread(c: &mut Client, buf: &mut [u8]) -> usize {
    use std::io::Read;
    let mut head = [0u8; 11];
    c.reader.read_exact(&mut head).expect("reply header");
    assert_eq!(head[4], 117, "Rread expected");
    let n = u32::from_le_bytes([head[7], head[8], head[9], head[10]]) as usize;
    c.reader.read_exact(&mut buf[..n]).expect("reply payload");
    n
}

/// Sends a prebuilt Twrite frame with its offset patched in; returns the count written.
fn write_frame(c: &mut Client, frame: &mut [u8], offset: u64) -> usize {
    use std::io::Read;
    frame[11..19].copy_from_slice(&offset.to_le_bytes());
    c.send_raw(frame);
    let mut reply = [0u8; 11];
    c.reader.read_exact(&mut reply).expect("Rwrite");
    assert_eq!(reply[4], 119, "Rwrite expected");
    u32::from_le_bytes([reply[7], reply[8], reply[9], reply[10]]) as usize
}

fn mb_per_s(bytes: usize, t: Duration) -> u64 {
    (bytes as f64 / t.as_secs_f64() / 1e6) as u64
}

fn seq_read(dir: &TempDir, msize: u32, total: usize) -> u64 {
    let mut h = session(dir, msize);
    let c = &mut h.client;
    c.walk(0, 1, &["big"]).unwrap();
    c.lopen(1, O_RDONLY).unwrap();
    let count = msize - IOHDRSZ;
    let mut buf = vec![0u8; count as usize];
    // Warm the page cache and the server's buffers.
    let mut off = 0u64;
    while read_into(c, 1, off, count, &mut buf) > 0 {
        off += count as u64;
    }
    let start = Instant::now();
    let mut done = 0usize;
    let mut off = 0u64;
    while done < total {
        let n = read_into(c, 1, off, count, &mut buf);
        if n == 0 {
            off = 0;
            continue;
        }
        done += n;
        off += n as u64;
    }
    let t = start.elapsed();
    h.finish().unwrap();
    mb_per_s(done, t)
}

fn seq_read_pipelined(dir: &TempDir, msize: u32, total: usize, depth: u64) -> u64 {
    let mut h = session(dir, msize);
    let c = &mut h.client;
    c.walk(0, 1, &["big"]).unwrap();
    c.lopen(1, O_RDONLY).unwrap();
    let count = msize - IOHDRSZ;
    let chunks = (FILE_SIZE as u64) / count as u64;
    let mut buf = vec![0u8; count as usize];
    let start = Instant::now();
    let mut done = 0usize;
    let mut next = 0u64;
    let mut outstanding = 0;
    while done < total {
        while outstanding < depth {
            let off = (next % chunks) * count as u64;
            c.send(1 + (next % depth) as u16, &Tmessage::Read(Tread { fid: 1, offset: off, count }));
            next += 1;
            outstanding += 1;
        }
        done += recv_rread(c, &mut buf);
        outstanding -= 1;
    }
    while outstanding > 0 {
        recv_rread(c, &mut buf);
        outstanding -= 1;
    }
    let t = start.elapsed();
    h.finish().unwrap();
    mb_per_s(done, t)
}

fn seq_write(dir: &TempDir, msize: u32, total: usize) -> u64 {
    let mut h = session(dir, msize);
    let c = &mut h.client;
    c.walk(0, 1, &[]).unwrap();
    c.lcreate(1, "out", O_RDWR | O_CREAT | O_TRUNC, 0o644).unwrap();
    let count = (msize - IOHDRSZ) as usize;
    let block = vec![0x5au8; count];
    // The frame is encoded once; only the offset changes.
    let mut frame =
        encode_tmessage(1, &Tmessage::Write(Twrite { fid: 1, offset: 0, data: Payload::new(block) }));
    let start = Instant::now();
    let mut done = 0usize;
    let mut off = 0usize;
    while done < total {
        if off + count > FILE_SIZE {
            off = 0;
        }
        let n = write_frame(c, &mut frame, off as u64);
        done += n;
        off += n;
    }
    let t = start.elapsed();
    c.clunk(1).unwrap();
    h.finish().unwrap();
    mb_per_s(done, t)
}

fn walk_getattr(dir: &TempDir, seconds: f64) -> u64 {
    let mut h = session(dir, 1 << 20);
    let c = &mut h.client;
    let names: Vec<String> = (0..1000).map(|i| format!("small{i}")).collect();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for name in names.iter().take(200) {
            c.walk(0, 1, &[name.as_str()]).unwrap();
            c.getattr(1).unwrap();
            c.clunk(1).unwrap();
            ops += 1;
        }
    }
    let t = start.elapsed();
    h.finish().unwrap();
    (ops as f64 / t.as_secs_f64()) as u64
}

fn walk_getattr_pipelined(dir: &TempDir, seconds: f64, depth: usize) -> u64 {
    let mut h = session(dir, 1 << 20);
    let c = &mut h.client;
    let start = Instant::now();
    let mut ops = 0u64;
    let mut i = 0u32;
    // Sends one message per fid 10..10+depth at once, then checks every reply's type.
    let round = |c: &mut Client, make: &dyn Fn(u32) -> Tmessage, want: u8| {
        let mut batch = Vec::new();
        for k in 0..depth as u32 {
            batch.extend(encode_tmessage(k as u16 + 1, &make(k)));
        }
        c.send_raw(&batch);
        for _ in 0..depth {
            let f = c.recv_frame().unwrap();
            assert_eq!(f[4], want, "reply type");
        }
    };
    while start.elapsed().as_secs_f64() < seconds {
        // `depth` lookups in flight at once, as several processes would: all walks, then
        // all getattrs, then all clunks (a fid is never used by two requests at once).
        let base = i;
        round(
            c,
            &|k| {
                let name = format!("small{}", (base + k) % 1000);
                let names = vec![P9String::from(name.as_str())];
                Tmessage::Walk(Twalk { fid: 0, newfid: 10 + k, names })
            },
            111,
        );
        round(c, &|k| Tmessage::Getattr(Tgetattr { fid: 10 + k, request_mask: 0x7ff }), 25);
        round(c, &|k| Tmessage::Clunk(Tfid { fid: 10 + k }), 121);
        ops += depth as u64;
        i += depth as u32;
    }
    let t = start.elapsed();
    h.finish().unwrap();
    (ops as f64 / t.as_secs_f64()) as u64
}

fn flush_rtt(dir: &TempDir, seconds: f64) -> u64 {
    let mut h = session(dir, 1 << 20);
    let c = &mut h.client;
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..200 {
            c.send(5, &Tmessage::Flush(Tflush { oldtag: 999 }));
            c.recv_frame().unwrap();
            ops += 1;
        }
    }
    let t = start.elapsed();
    h.finish().unwrap();
    (ops as f64 / t.as_secs_f64()) as u64
}

fn getattr_rtt(dir: &TempDir, seconds: f64) -> u64 {
    let mut h = session(dir, 1 << 20);
    let c = &mut h.client;
    c.walk(0, 1, &["small1"]).unwrap();
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..200 {
            c.getattr(1).unwrap();
            ops += 1;
        }
    }
    let t = start.elapsed();
    h.finish().unwrap();
    (ops as f64 / t.as_secs_f64()) as u64
}

/// The floor under every unpipelined figure: one small message and its reply over the same
/// kind of socketpair between two threads, with nothing but an echo on the other side. A
/// walk+getattr+clunk is three such round trips, so `3 * floor` is the least it can cost on
/// this machine at this moment (a loaded host raises it far above the server's own work).
fn socketpair_rtt_floor(seconds: f64) -> f64 {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(n) = b.read(&mut buf) {
            if n == 0 || b.write_all(&buf[..7]).is_err() {
                break;
            }
        }
    });
    let msg = [0u8; 19];
    let mut reply = [0u8; 7];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..200 {
            a.write_all(&msg).expect("echo request");
            a.read_exact(&mut reply).expect("echo reply");
            n += 1;
        }
    }
    let t = start.elapsed();
    drop(a);
    let _ = echo.join();
    t.as_secs_f64() * 1e6 / n as f64
}

fn main() {
    if let Some(only) = std::env::var_os("NINEP_BENCH_ONLY") {
        // Profiling aid: run one metadata figure alone.
        let dir = TempDir::new("bench-only");
        for i in 0..1000 {
            fs::write(dir.join(&format!("small{i}")), b"small file").expect("small file");
        }
        match only.to_str() {
            Some("walk") => {
                println!("ninep-rtt-floor {:.1} us", socketpair_rtt_floor(1.0));
                println!("ninep-walk-getattr {} ops/s", walk_getattr(&dir, 3.0));
            }
            _ => println!("ninep-walk-getattr-pipelined {} ops/s", walk_getattr_pipelined(&dir, 3.0, 16)),
        }
        return;
    }
    let dir = TempDir::new("bench");
    let data: Vec<u8> = (0..FILE_SIZE).map(|i| (i * 7 % 253) as u8).collect();
    fs::write(dir.join("big"), &data).expect("write test file");
    for i in 0..1000 {
        fs::write(dir.join(&format!("small{i}")), b"small file").expect("small file");
    }
    let gib = 1 << 30;
    println!("ninep-seq-read-1m-defaultbuf {} MB/s", seq_read(&dir, 1 << 20, gib / 2));
    SOCKET_BUFFER.store(4 << 20, std::sync::atomic::Ordering::Relaxed);
    println!("ninep-seq-read-1m {} MB/s", seq_read(&dir, 1 << 20, gib));
    println!("ninep-seq-read-64k {} MB/s", seq_read(&dir, 64 << 10, gib / 2));
    println!("ninep-seq-read-1m-pipelined {} MB/s", seq_read_pipelined(&dir, 1 << 20, gib, 4));
    println!("ninep-seq-write-1m {} MB/s", seq_write(&dir, 1 << 20, gib / 2));
    println!("ninep-seq-write-64k {} MB/s", seq_write(&dir, 64 << 10, gib / 4));
    println!("ninep-rtt-floor {:.1} us", socketpair_rtt_floor(1.0));
    println!("ninep-walk-getattr {} ops/s", walk_getattr(&dir, 2.0));
    println!("ninep-walk-getattr-pipelined {} ops/s", walk_getattr_pipelined(&dir, 2.0, 16));
    // Round trips: one answered on the I/O thread (Tflush of an idle tag) and one that goes
    // through the blocking pool (Tgetattr); the difference is the cost of the hand-off.
    println!("ninep-rtt-inline {:.1} us", 1e6 / flush_rtt(&dir, 1.0) as f64);
    println!("ninep-rtt-getattr {:.1} us", 1e6 / getattr_rtt(&dir, 1.0) as f64);
}

//! Test helpers for the ninep tests: a server on one end of a Unix socketpair (its own
//! thread, current-thread runtime, as the client runs it), and a small blocking 9P2000.L
//! client for the other end. The directory a test serves is a [`TempDir`] (tests/common/).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use cpu_all::ninep::wire::*;
use cpu_all::ninep::{serve, ServeOptions};

#[path = "../common/temp_dir.rs"]
mod temp_dir;

pub use temp_dir::TempDir;

/// A running server and the client end of its socket.
pub struct Harness {
    pub client: Client,
    pub server: Option<JoinHandle<cpu_all::Result<()>>>,
}

impl Harness {
    /// Closes the client end and returns what `serve` returned (bounded wait).
    pub fn finish(mut self) -> cpu_all::Result<()> {
        let _ = self.client.stream.shutdown(std::net::Shutdown::Both);
        let handle = self.server.take().expect("server running");
        for _ in 0..200 {
            if handle.is_finished() {
                return handle.join().expect("server thread panicked");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("server did not stop within 10 s after the client closed");
    }
}

/// Options for a test server.
pub fn options(root: &Path) -> ServeOptions {
    ServeOptions { root: root.to_path_buf(), read_only: false, max_msize: 1 << 20, trace: false }
}

/// Starts `serve` on a socketpair in its own thread. `before` runs first in that thread
/// (e.g. to drop privileges for the thread and the blocking threads it spawns).
pub fn start_with(opts: ServeOptions, before: impl FnOnce() + Send + 'static) -> Harness {
    start_tuned(opts, None, before)
}

/// Like [`start_with`], optionally with larger socket buffers on both ends (benchmarks).
pub fn start_tuned(
    opts: ServeOptions,
    socket_buffer: Option<usize>,
    before: impl FnOnce() + Send + 'static,
) -> Harness {
    let (a, b) = UnixStream::pair().expect("socketpair");
    if let Some(size) = socket_buffer {
        for s in [&a, &b] {
            rustix::net::sockopt::set_socket_send_buffer_size(s, size).expect("SO_SNDBUF");
            rustix::net::sockopt::set_socket_recv_buffer_size(s, size).expect("SO_RCVBUF");
        }
    }
    let server = std::thread::spawn(move || {
        before();
        // I/O only (no time driver): serve must not depend on what the caller enabled.
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
        rt.block_on(async move {
            b.set_nonblocking(true).expect("nonblocking");
            let s = tokio::net::UnixStream::from_std(b).expect("tokio stream");
            serve(s, opts).await
        })
    });
    a.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    a.set_write_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let reader = std::io::BufReader::with_capacity(64 * 1024, a.try_clone().expect("dup socket"));
    Harness { client: Client { stream: a, reader, next_tag: 1 }, server: Some(server) }
}

pub fn start(opts: ServeOptions) -> Harness {
    start_with(opts, || {})
}

/// Starts a server, negotiates msize and attaches fid 0 to the root.
pub fn start_attached(opts: ServeOptions) -> Harness {
    let mut h = start(opts);
    h.client.version(1 << 20).expect("version");
    h.client.attach(0, "").expect("attach");
    h
}

/// A blocking 9P client; every call sends one request and waits for its reply.
pub struct Client {
    pub stream: UnixStream,
    /// Replies are read through a buffer: one syscall for many small replies.
    pub reader: std::io::BufReader<UnixStream>,
    next_tag: u16,
}

/// An Rlerror code, or a reply of an unexpected type.
pub type R<T> = Result<T, u32>;

pub const O_RDONLY: u32 = 0;
pub const O_WRONLY: u32 = 1;
pub const O_RDWR: u32 = 2;
pub const O_CREAT: u32 = 0o100;
pub const O_EXCL: u32 = 0o200;
pub const O_TRUNC: u32 = 0o1000;
pub const O_DIRECTORY: u32 = 0o200000;

impl Client {
    pub fn tag(&mut self) -> u16 {
        let t = self.next_tag;
        self.next_tag = if t >= 0xfff0 { 1 } else { t + 1 };
        t
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    pub fn send(&mut self, tag: u16, msg: &Tmessage) {
        let bytes = encode_tmessage(tag, msg);
        self.send_raw(&bytes);
    }

    /// Reads one reply frame; None when the server closed the connection.
    pub fn recv_frame(&mut self) -> Option<Vec<u8>> {
        let mut size = [0u8; 4];
        if self.reader.read_exact(&mut size).is_err() {
            return None;
        }
        let n = u32::from_le_bytes(size) as usize;
        assert!((7..=(4 << 20)).contains(&n), "reply size {n}");
        let mut frame = vec![0u8; n];
        frame[..4].copy_from_slice(&size);
        self.reader.read_exact(&mut frame[4..]).expect("reply body");
        Some(frame)
    }

    pub fn recv(&mut self) -> (u16, Rmessage) {
        let frame = self.recv_frame().expect("server closed the connection");
        decode_rmessage(&frame).expect("decodable reply")
    }

    pub fn rpc(&mut self, msg: Tmessage) -> R<Rmessage> {
        let tag = self.tag();
        self.send(tag, &msg);
        let (rtag, r) = self.recv();
        assert_eq!(rtag, tag, "reply tag");
        match r {
            Rmessage::Lerror(e) => Err(e.ecode),
            r => Ok(r),
        }
    }

    pub fn version(&mut self, msize: u32) -> R<Version> {
        self.send(NOTAG, &Tmessage::Version(Version { msize, version: "9P2000.L".into() }));
        match self.recv() {
            (NOTAG, Rmessage::Version(v)) => Ok(v),
            other => panic!("version reply {other:?}"),
        }
    }

    pub fn attach(&mut self, fid: u32, aname: &str) -> R<Qid> {
        let t = Tattach { fid, afid: NOFID, uname: "u".into(), aname: aname.into(), n_uname: 0 };
        match self.rpc(Tmessage::Attach(t))? {
            Rmessage::Attach(q) => Ok(q.qid),
            r => panic!("{r:?}"),
        }
    }

    pub fn walk(&mut self, fid: u32, newfid: u32, names: &[&str]) -> R<Vec<Qid>> {
        let names = names.iter().map(|n| P9String::from(*n)).collect();
        match self.rpc(Tmessage::Walk(Twalk { fid, newfid, names }))? {
            Rmessage::Walk(w) => Ok(w.qids),
            r => panic!("{r:?}"),
        }
    }

    pub fn lopen(&mut self, fid: u32, flags: u32) -> R<Qid> {
        match self.rpc(Tmessage::Lopen(Tlopen { fid, flags }))? {
            Rmessage::Lopen(o) => Ok(o.qid),
            r => panic!("{r:?}"),
        }
    }

    pub fn lcreate(&mut self, fid: u32, name: &str, flags: u32, mode: u32) -> R<Qid> {
        let t = Tlcreate { fid, name: name.into(), flags, mode, gid: 0 };
        match self.rpc(Tmessage::Lcreate(t))? {
            Rmessage::Lcreate(o) => Ok(o.qid),
            r => panic!("{r:?}"),
        }
    }

    pub fn read(&mut self, fid: u32, offset: u64, count: u32) -> R<Vec<u8>> {
        match self.rpc(Tmessage::Read(Tread { fid, offset, count }))? {
            Rmessage::Read(r) => Ok(r.data.to_vec()),
            r => panic!("{r:?}"),
        }
    }

    pub fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> R<u32> {
        let t = Twrite { fid, offset, data: Payload::new(data.to_vec()) };
        match self.rpc(Tmessage::Write(t))? {
            Rmessage::Write(w) => Ok(w.count),
            r => panic!("{r:?}"),
        }
    }

    pub fn clunk(&mut self, fid: u32) -> R<()> {
        self.rpc(Tmessage::Clunk(Tfid { fid })).map(|_| ())
    }

    pub fn getattr(&mut self, fid: u32) -> R<Rgetattr> {
        match self.rpc(Tmessage::Getattr(Tgetattr { fid, request_mask: 0x3fff }))? {
            Rmessage::Getattr(a) => Ok(a),
            r => panic!("{r:?}"),
        }
    }

    pub fn setattr(&mut self, t: Tsetattr) -> R<()> {
        self.rpc(Tmessage::Setattr(t)).map(|_| ())
    }

    pub fn mkdir(&mut self, dfid: u32, name: &str, mode: u32) -> R<Qid> {
        match self.rpc(Tmessage::Mkdir(Tmkdir { dfid, name: name.into(), mode, gid: 0 }))? {
            Rmessage::Mkdir(q) => Ok(q.qid),
            r => panic!("{r:?}"),
        }
    }

    pub fn symlink(&mut self, fid: u32, name: &str, target: &str) -> R<Qid> {
        let t = Tsymlink { fid, name: name.into(), target: target.into(), gid: 0 };
        match self.rpc(Tmessage::Symlink(t))? {
            Rmessage::Symlink(q) => Ok(q.qid),
            r => panic!("{r:?}"),
        }
    }

    pub fn readlink(&mut self, fid: u32) -> R<Vec<u8>> {
        match self.rpc(Tmessage::Readlink(Tfid { fid }))? {
            Rmessage::Readlink(r) => Ok(r.target.0),
            r => panic!("{r:?}"),
        }
    }

    pub fn link(&mut self, dfid: u32, fid: u32, name: &str) -> R<()> {
        self.rpc(Tmessage::Link(Tlink { dfid, fid, name: name.into() })).map(|_| ())
    }

    pub fn renameat(&mut self, olddir: u32, old: &str, newdir: u32, new: &str) -> R<()> {
        let t = Trenameat { olddirfid: olddir, oldname: old.into(), newdirfid: newdir, newname: new.into() };
        self.rpc(Tmessage::RenameAt(t)).map(|_| ())
    }

    pub fn rename(&mut self, fid: u32, dfid: u32, name: &str) -> R<()> {
        self.rpc(Tmessage::Rename(Trename { fid, dfid, name: name.into() })).map(|_| ())
    }

    pub fn unlinkat(&mut self, dirfid: u32, name: &str, flags: u32) -> R<()> {
        self.rpc(Tmessage::UnlinkAt(Tunlinkat { dirfid, name: name.into(), flags })).map(|_| ())
    }

    pub fn remove(&mut self, fid: u32) -> R<()> {
        self.rpc(Tmessage::Remove(Tfid { fid })).map(|_| ())
    }

    pub fn statfs(&mut self, fid: u32) -> R<Rstatfs> {
        match self.rpc(Tmessage::Statfs(Tfid { fid }))? {
            Rmessage::Statfs(s) => Ok(s),
            r => panic!("{r:?}"),
        }
    }

    pub fn fsync(&mut self, fid: u32) -> R<()> {
        self.rpc(Tmessage::Fsync(Tfsync { fid, datasync: 0 })).map(|_| ())
    }

    pub fn lock(&mut self, fid: u32, ty: u8, flags: u32, start: u64, length: u64) -> R<u8> {
        self.lock_as(1, fid, ty, flags, start, length)
    }

    /// Tlock on behalf of remote process `proc_id`.
    pub fn lock_as(&mut self, proc_id: u32, fid: u32, ty: u8, flags: u32, start: u64, length: u64) -> R<u8> {
        let t = Tlock { fid, ty, flags, start, length, proc_id, client_id: "c".into() };
        match self.rpc(Tmessage::Lock(t))? {
            Rmessage::Lock(l) => Ok(l.status),
            r => panic!("{r:?}"),
        }
    }

    pub fn getlock(&mut self, fid: u32, ty: u8, start: u64, length: u64) -> R<Rgetlock> {
        self.getlock_as(1, fid, ty, start, length)
    }

    /// Tgetlock on behalf of remote process `proc_id`.
    pub fn getlock_as(&mut self, proc_id: u32, fid: u32, ty: u8, start: u64, length: u64) -> R<Rgetlock> {
        let t = Getlock { fid, ty, start, length, proc_id, client_id: "c".into() };
        match self.rpc(Tmessage::GetLock(t))? {
            Rmessage::GetLock(l) => Ok(l),
            r => panic!("{r:?}"),
        }
    }

    pub fn xattrwalk(&mut self, fid: u32, newfid: u32, name: &str) -> R<u64> {
        match self.rpc(Tmessage::XattrWalk(Txattrwalk { fid, newfid, name: name.into() }))? {
            Rmessage::XattrWalk(x) => Ok(x.size),
            r => panic!("{r:?}"),
        }
    }

    pub fn xattrcreate(&mut self, fid: u32, name: &str, size: u64, flags: u32) -> R<()> {
        let t = Txattrcreate { fid, name: name.into(), size, flags };
        self.rpc(Tmessage::XattrCreate(t)).map(|_| ())
    }

    /// All entries of an open directory, `count` bytes per Treaddir, resuming at the last
    /// entry's offset each time.
    pub fn readdir_all(&mut self, fid: u32, count: u32) -> R<(Vec<Dirent>, usize)> {
        let mut out = Vec::new();
        let mut offset = 0;
        let mut calls = 0;
        for _ in 0..100_000 {
            calls += 1;
            let data = match self.rpc(Tmessage::Readdir(Treaddir { fid, offset, count }))? {
                Rmessage::Readdir(r) => r.data.to_vec(),
                r => panic!("{r:?}"),
            };
            if data.is_empty() {
                return Ok((out, calls));
            }
            assert!(data.len() <= count as usize, "readdir returned more than count");
            let mut r = Reader::new(&data);
            while r.remaining() > 0 {
                let d = Dirent::decode(&mut r).expect("dirent");
                offset = d.offset;
                out.push(d);
            }
        }
        panic!("readdir did not end");
    }
}

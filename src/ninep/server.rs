//! The 9P2000.L server: reads frames from one byte stream, keeps the fid table, runs each
//! request on the blocking pool, and writes replies in the order they finish.
//!
//! Owns: msize negotiation, fids and their paths, QIDs, name checks (no empty, no `/`, `..`
//! never above the root), the read-only rule, Tflush bookkeeping. It must not block the
//! async thread: every backend call runs inside `spawn_blocking` (metadata requests that
//! arrive together share one pool job per CPU, which saves thread wake-ups). A bad request
//! costs an Rlerror, never the connection; only an unframeable byte stream ends it.
//! At most `MAX_IN_FLIGHT` requests (and their unwritten replies) exist at once.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::backend::{
    Attr, Backend, BackendFile, LockOutcome, LockRange, LockType, OpenFlags, SetAttr, SetTime,
};
use super::errno::{self, Errno};
use super::wire::{self, *};
use crate::error::{Error, Result};

/// Requests we run at once; more wait in the socket (bounds memory: each may hold msize).
const MAX_IN_FLIGHT: usize = 128;
/// Smallest msize we agree to (every reply but Rread/Rreaddir must fit).
const MIN_MSIZE: u32 = 512;
/// Largest msize we ever agree to, whatever the configuration says (a reply buffer of this
/// size may be allocated per request in flight).
const MAX_MSIZE: u32 = 16 << 20;
/// Buffers at least this big are recycled instead of freed.
const POOL_MIN: usize = 64 * 1024;
/// How long replies may take to drain after the peer stopped sending.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Wire values of Tlopen/Tlcreate flags (Linux x86 numbering, the same on every host).
mod dotl {
    pub const ACCMODE: u32 = 0o3;
    pub const WRONLY: u32 = 0o1;
    pub const RDWR: u32 = 0o2;
    pub const EXCL: u32 = 0o200;
    pub const TRUNC: u32 = 0o1000;
    pub const APPEND: u32 = 0o2000;
    pub const NONBLOCK: u32 = 0o4000;
    pub const DSYNC: u32 = 0o10000;
    pub const DIRECTORY: u32 = 0o200000;
    pub const SYNC: u32 = 0o4000000;
}

/// Tsetattr `valid` bits.
mod setattr_bits {
    pub const MODE: u32 = 0x1;
    pub const UID: u32 = 0x2;
    pub const GID: u32 = 0x4;
    pub const SIZE: u32 = 0x8;
    pub const ATIME: u32 = 0x10;
    pub const MTIME: u32 = 0x20;
    pub const ATIME_SET: u32 = 0x80;
    pub const MTIME_SET: u32 = 0x100;
}

/// Rgetattr `valid`: the basic set (mode, nlink, uid, gid, rdev, times, ino, size, blocks).
const GETATTR_BASIC: u64 = 0x7ff;
const AT_REMOVEDIR: u32 = 0x200;
const LOCK_SUCCESS: u8 = 0;
const LOCK_BLOCKED: u8 = 1;
const LOCK_TYPE_RDLCK: u8 = 0;
const LOCK_TYPE_WRLCK: u8 = 1;
const LOCK_TYPE_UNLCK: u8 = 2;

/// How a session behaves, apart from what it serves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Refuse every change with EROFS.
    pub read_only: bool,
    /// Largest msize we agree to.
    pub max_msize: u32,
    /// Log every request and reply.
    pub trace: bool,
}

/// What a fid currently stands for.
enum FidKind<F> {
    /// A file walked to, not opened.
    Node,
    /// An open file (Tlopen / Tlcreate).
    Open(Arc<F>),
    /// Txattrwalk result, read with Tread.
    XattrRead(Arc<Vec<u8>>),
    /// Txattrcreate in progress, filled with Twrite, applied at Tclunk.
    XattrWrite { name: Vec<u8>, size: usize, flags: u32, data: Vec<u8> },
}

struct FidState<F> {
    /// Path relative to the export root ("" is the root), made only of checked names.
    path: PathBuf,
    qid: Qid,
    kind: FidKind<F>,
}

type FidRef<F> = Arc<Mutex<FidState<F>>>;

#[derive(Default)]
struct InFlight {
    cancelled: bool,
    flushers: Vec<u16>,
}

/// Recycles big reply and request buffers so a 1 MiB read does not allocate each time.
#[derive(Default)]
struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    fn get(&self) -> Vec<u8> {
        lock(&self.free).pop().unwrap_or_default()
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() >= POOL_MIN {
            let mut free = lock(&self.free);
            if free.len() < 32 {
                free.push(buf);
            }
        }
    }
}

/// Locks a mutex; a panic elsewhere must not take the whole server down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A reply on its way to the writer. It keeps its request's in-flight slot until written,
/// so a peer that stops reading replies also stops us from reading more requests.
struct Outgoing {
    frame: Vec<u8>,
    _slot: Option<OwnedSemaphorePermit>,
}

type Replies = mpsc::UnboundedSender<Outgoing>;

fn send(out: &Replies, frame: Vec<u8>, slot: Option<OwnedSemaphorePermit>) {
    // A closed channel means the writer is gone; the session is ending anyway.
    let _ = out.send(Outgoing { frame, _slot: slot });
}

/// One connection's state.
pub struct Session<B: Backend> {
    backend: B,
    config: ServerConfig,
    msize: AtomicU32,
    fids: Mutex<HashMap<u32, FidRef<B::File>>>,
    /// st_dev → small index mixed into QID paths (the first device seen keeps raw inodes).
    devices: Mutex<HashMap<u64, u64>>,
    inflight: Mutex<HashMap<u16, InFlight>>,
    pool: BufPool,
    /// Pool jobs one batch of metadata requests is spread over (the CPU count).
    lanes: usize,
}

type Res<T> = std::result::Result<T, Errno>;

fn io<T>(r: std::io::Result<T>) -> Res<T> {
    r.map_err(Errno::from)
}

/// A name from the wire that may become one path component.
fn check_name(name: &P9String) -> Res<&OsStr> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(errno::EINVAL);
    }
    Ok(OsStr::from_bytes(b))
}

fn qid_type(mode: u32) -> u8 {
    match mode & super::backend::S_IFMT {
        super::backend::S_IFDIR => QTDIR,
        super::backend::S_IFLNK => QTSYMLINK,
        _ => QTFILE,
    }
}

fn dtype_qid_type(dtype: u8) -> u8 {
    match dtype {
        4 => QTDIR,
        10 => QTSYMLINK,
        _ => QTFILE,
    }
}

/// Host open flags for the wire flags of Tlopen/Tlcreate. Only known bits are carried over;
/// create/exclusive come from the operation, not from here.
fn open_flags(wire: u32) -> OpenFlags {
    let acc = wire & dotl::ACCMODE;
    OpenFlags {
        read: acc != dotl::WRONLY,
        write: acc == dotl::WRONLY || acc == dotl::RDWR,
        truncate: wire & dotl::TRUNC != 0,
        append: wire & dotl::APPEND != 0,
        exclusive: false,
        directory: wire & dotl::DIRECTORY != 0,
        sync: wire & dotl::SYNC != 0,
        dsync: wire & dotl::DSYNC != 0,
        nonblock: wire & dotl::NONBLOCK != 0,
    }
}

/// Finishes a frame whose header was reserved at the start of `buf`.
fn finish_io_frame(buf: &mut [u8], ty: u8, tag: u16, count: usize) {
    let size = (IO_HEADER_LEN + count) as u32;
    buf[0..4].copy_from_slice(&size.to_le_bytes());
    buf[4] = ty;
    buf[5..7].copy_from_slice(&tag.to_le_bytes());
    buf[7..11].copy_from_slice(&(count as u32).to_le_bytes());
}

fn rlerror(tag: u16, e: Errno) -> Vec<u8> {
    let mut w = Vec::with_capacity(11);
    encode_rmessage(&mut w, tag, &Rmessage::Lerror(Rlerror { ecode: e.0 }));
    w
}

impl<B: Backend> Session<B> {
    pub fn new(backend: B, mut config: ServerConfig) -> Self {
        config.max_msize = config.max_msize.clamp(MIN_MSIZE, MAX_MSIZE);
        let msize = config.max_msize;
        Session {
            backend,
            config,
            msize: AtomicU32::new(msize),
            fids: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            pool: BufPool::default(),
            lanes: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }

    fn msize(&self) -> u32 {
        self.msize.load(Ordering::Relaxed)
    }

    fn qid_path(&self, dev: u64, ino: u64) -> u64 {
        let mut devs = lock(&self.devices);
        let next = devs.len() as u64;
        let idx = *devs.entry(dev).or_insert(next);
        // Inode numbers stay exact on the first device; others get their index in the top
        // bits so equal inode numbers on two filesystems do not collide.
        ino ^ idx.rotate_left(48)
    }

    fn qid(&self, attr: &Attr) -> Qid {
        Qid { ty: qid_type(attr.mode), version: 0, path: self.qid_path(attr.dev, attr.ino) }
    }

    fn fid(&self, fid: u32) -> Res<FidRef<B::File>> {
        lock(&self.fids).get(&fid).cloned().ok_or(errno::EBADF)
    }

    fn path_of(&self, fid: u32) -> Res<PathBuf> {
        let f = self.fid(fid)?;
        let path = lock(&f).path.clone();
        Ok(path)
    }

    /// The path of a fid that is not open yet (Tlopen and Tlcreate take only those).
    fn unopened_path(fid: &FidRef<B::File>) -> Res<PathBuf> {
        let st = lock(fid);
        if !matches!(st.kind, FidKind::Node) {
            return Err(errno::EINVAL);
        }
        Ok(st.path.clone())
    }

    fn open_file(&self, fid: u32) -> Res<Arc<B::File>> {
        let f = self.fid(fid)?;
        let st = lock(&f);
        match &st.kind {
            FidKind::Open(f) => Ok(f.clone()),
            _ => Err(errno::EBADF),
        }
    }

    fn insert_fid(&self, fid: u32, state: FidState<B::File>) -> Res<()> {
        let mut fids = lock(&self.fids);
        if fids.contains_key(&fid) {
            return Err(errno::EBADF);
        }
        fids.insert(fid, Arc::new(Mutex::new(state)));
        Ok(())
    }

    fn writable(&self) -> Res<()> {
        if self.config.read_only {
            Err(errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// After a rename, fids under the old name follow the file to its new name.
    fn rename_fids(&self, from: &Path, to: &Path) {
        for f in lock(&self.fids).values() {
            let mut st = lock(f);
            if let Ok(rest) = st.path.strip_prefix(from) {
                let new = if rest.as_os_str().is_empty() { to.to_path_buf() } else { to.join(rest) };
                st.path = new;
            }
        }
    }

    /// Answers Tversion; resets the session.
    fn version(&self, tag: u16, t: &Version) -> Vec<u8> {
        let v = t.version.as_bytes();
        let known = v == b"9P2000.L" || v.starts_with(b"9P2000.L.");
        let reply = if known && t.msize >= MIN_MSIZE {
            let msize = t.msize.min(self.config.max_msize);
            self.msize.store(msize, Ordering::Relaxed);
            lock(&self.fids).clear();
            log::debug!(
                "9p: version 9P2000.L, msize {msize} (asked {}, max {})",
                t.msize,
                self.config.max_msize
            );
            Version { msize, version: "9P2000.L".into() }
        } else {
            log::debug!("9p: refusing version {:?} msize {}", t.version, t.msize);
            Version { msize: 0, version: "unknown".into() }
        };
        let mut w = Vec::new();
        encode_rmessage(&mut w, tag, &Rmessage::Version(reply));
        w
    }

    /// Runs one request and returns the encoded reply frame.
    pub fn dispatch(&self, tag: u16, msg: Tmessage) -> Vec<u8> {
        if let Tmessage::Version(v) = &msg {
            return self.version(tag, v);
        }
        // Only replies that can be big take a recycled buffer.
        let mut buf = match &msg {
            Tmessage::Read(_) | Tmessage::Readdir(_) => self.pool.get(),
            _ => Vec::new(),
        };
        let result = self.execute(tag, msg, &mut buf);
        match result {
            Ok(()) => buf,
            Err(e) => {
                self.pool.put(buf);
                rlerror(tag, e)
            }
        }
    }

    fn reply(&self, buf: &mut Vec<u8>, tag: u16, r: Rmessage) -> Res<()> {
        buf.clear();
        encode_rmessage(buf, tag, &r);
        Ok(())
    }

    fn execute(&self, tag: u16, msg: Tmessage, buf: &mut Vec<u8>) -> Res<()> {
        match msg {
            Tmessage::Version(_) | Tmessage::Flush(_) => Err(errno::EINVAL),
            Tmessage::Auth(_) => Err(errno::ENOSYS),
            Tmessage::Attach(t) => {
                if t.afid != NOFID {
                    return Err(errno::EINVAL);
                }
                let mut path = PathBuf::new();
                for comp in t.aname.as_bytes().split(|&b| b == b'/') {
                    match comp {
                        b"" | b"." => {}
                        b".." => {
                            path.pop();
                        }
                        name => path.push(OsStr::from_bytes(name)),
                    }
                }
                if t.aname.as_bytes().contains(&0) {
                    return Err(errno::EINVAL);
                }
                let attr = io(self.backend.lstat(&path))?;
                let qid = self.qid(&attr);
                self.insert_fid(t.fid, FidState { path, qid, kind: FidKind::Node })?;
                self.reply(buf, tag, Rmessage::Attach(Rqid { qid }))
            }
            Tmessage::Walk(t) => self.walk(tag, t, buf),
            Tmessage::Read(t) => self.read(tag, t, buf),
            Tmessage::Write(t) => {
                let count = self.write(&t)?;
                self.pool.put(t.data.into_buffer());
                self.reply(buf, tag, Rmessage::Write(Rwrite { count }))
            }
            Tmessage::Clunk(t) => {
                let state = lock(&self.fids).remove(&t.fid).ok_or(errno::EBADF)?;
                let mut st = lock(&state);
                if let FidKind::XattrWrite { name, size, flags, data } = &st.kind {
                    if data.len() != *size {
                        return Err(errno::EINVAL);
                    }
                    let name = OsStr::from_bytes(name);
                    if *size == 0 {
                        io(self.backend.remove_xattr(&st.path, name))?;
                    } else {
                        io(self.backend.set_xattr(&st.path, name, data, *flags))?;
                    }
                }
                st.kind = FidKind::Node;
                self.reply(buf, tag, Rmessage::Clunk(Empty {}))
            }
            Tmessage::Remove(t) => {
                let state = lock(&self.fids).remove(&t.fid).ok_or(errno::EBADF)?;
                let path = lock(&state).path.clone();
                self.writable()?;
                if path.as_os_str().is_empty() {
                    return Err(errno::EBUSY);
                }
                let attr = io(self.backend.lstat(&path))?;
                io(self.backend.unlink(&path, attr.is_dir()))?;
                self.reply(buf, tag, Rmessage::Remove(Empty {}))
            }
            Tmessage::Statfs(t) => {
                let s = io(self.backend.statfs(&self.path_of(t.fid)?))?;
                let r = Rstatfs {
                    ty: s.fs_type,
                    bsize: s.bsize,
                    blocks: s.blocks,
                    bfree: s.bfree,
                    bavail: s.bavail,
                    files: s.files,
                    ffree: s.ffree,
                    fsid: s.fsid,
                    namelen: s.namelen,
                };
                self.reply(buf, tag, Rmessage::Statfs(r))
            }
            Tmessage::Lopen(t) => {
                let fid = self.fid(t.fid)?;
                let path = Self::unopened_path(&fid)?;
                let mut flags = open_flags(t.flags);
                if (flags.write || flags.truncate) && self.config.read_only {
                    return Err(errno::EROFS);
                }
                let attr = io(self.backend.lstat(&path))?;
                if attr.is_symlink() {
                    return Err(errno::ELOOP);
                }
                if attr.is_dir() {
                    if flags.write {
                        return Err(errno::EISDIR);
                    }
                    flags.directory = true;
                }
                let file = io(self.backend.open(&path, flags))?;
                let attr = io(file.stat())?;
                let qid = self.qid(&attr);
                {
                    let mut st = lock(&fid);
                    st.qid = qid;
                    st.kind = FidKind::Open(Arc::new(file));
                }
                self.reply(buf, tag, Rmessage::Lopen(Ropen { qid, iounit: 0 }))
            }
            Tmessage::Lcreate(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let fid = self.fid(t.fid)?;
                let dir = Self::unopened_path(&fid)?;
                let mut flags = open_flags(t.flags);
                flags.exclusive = t.flags & dotl::EXCL != 0;
                flags.directory = false;
                let file = io(self.backend.create(&dir, name, flags, t.mode))?;
                let attr = io(file.stat())?;
                let qid = self.qid(&attr);
                {
                    let mut st = lock(&fid);
                    st.path = dir.join(name);
                    st.qid = qid;
                    st.kind = FidKind::Open(Arc::new(file));
                }
                self.reply(buf, tag, Rmessage::Lcreate(Ropen { qid, iounit: 0 }))
            }
            Tmessage::Symlink(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                if t.target.as_bytes().is_empty() || t.target.as_bytes().contains(&0) {
                    return Err(errno::EINVAL);
                }
                let dir = self.path_of(t.fid)?;
                io(self.backend.symlink(&dir, name, OsStr::from_bytes(t.target.as_bytes())))?;
                let qid = self.qid(&io(self.backend.lstat(&dir.join(name)))?);
                self.reply(buf, tag, Rmessage::Symlink(Rqid { qid }))
            }
            Tmessage::Mknod(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let dir = self.path_of(t.dfid)?;
                let rdev = rustix::fs::makedev(t.major, t.minor);
                io(self.backend.mknod(&dir, name, t.mode, rdev))?;
                let qid = self.qid(&io(self.backend.lstat(&dir.join(name)))?);
                self.reply(buf, tag, Rmessage::Mknod(Rqid { qid }))
            }
            Tmessage::Mkdir(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let dir = self.path_of(t.dfid)?;
                io(self.backend.mkdir(&dir, name, t.mode))?;
                let qid = self.qid(&io(self.backend.lstat(&dir.join(name)))?);
                self.reply(buf, tag, Rmessage::Mkdir(Rqid { qid }))
            }
            Tmessage::Rename(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let from = self.path_of(t.fid)?;
                if from.as_os_str().is_empty() {
                    return Err(errno::EBUSY);
                }
                let to = self.path_of(t.dfid)?.join(name);
                io(self.backend.rename(&from, &to))?;
                self.rename_fids(&from, &to);
                self.reply(buf, tag, Rmessage::Rename(Empty {}))
            }
            Tmessage::RenameAt(t) => {
                self.writable()?;
                let from = self.path_of(t.olddirfid)?.join(check_name(&t.oldname)?);
                let to = self.path_of(t.newdirfid)?.join(check_name(&t.newname)?);
                io(self.backend.rename(&from, &to))?;
                self.rename_fids(&from, &to);
                self.reply(buf, tag, Rmessage::RenameAt(Empty {}))
            }
            Tmessage::UnlinkAt(t) => {
                self.writable()?;
                let path = self.path_of(t.dirfid)?.join(check_name(&t.name)?);
                io(self.backend.unlink(&path, t.flags & AT_REMOVEDIR != 0))?;
                self.reply(buf, tag, Rmessage::UnlinkAt(Empty {}))
            }
            Tmessage::Link(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let dir = self.path_of(t.dfid)?;
                let target = self.path_of(t.fid)?;
                io(self.backend.link(&target, &dir, name))?;
                self.reply(buf, tag, Rmessage::Link(Empty {}))
            }
            Tmessage::Readlink(t) => {
                let target = io(self.backend.readlink(&self.path_of(t.fid)?))?;
                self.reply(buf, tag, Rmessage::Readlink(Rreadlink { target: P9String(target) }))
            }
            Tmessage::Getattr(t) => {
                let fid = self.fid(t.fid)?;
                let (path, file) = {
                    let st = lock(&fid);
                    let file = match &st.kind {
                        FidKind::Open(f) => Some(f.clone()),
                        _ => None,
                    };
                    (st.path.clone(), file)
                };
                let a = match file {
                    Some(f) => io(f.stat())?,
                    None => io(self.backend.lstat(&path))?,
                };
                let r = Rgetattr {
                    valid: GETATTR_BASIC,
                    qid: self.qid(&a),
                    mode: a.mode,
                    uid: a.uid,
                    gid: a.gid,
                    nlink: a.nlink,
                    rdev: a.rdev,
                    size: a.size,
                    blksize: a.blksize,
                    blocks: a.blocks,
                    atime_sec: a.atime.0,
                    atime_nsec: a.atime.1,
                    mtime_sec: a.mtime.0,
                    mtime_nsec: a.mtime.1,
                    ctime_sec: a.ctime.0,
                    ctime_nsec: a.ctime.1,
                    ..Default::default()
                };
                self.reply(buf, tag, Rmessage::Getattr(r))
            }
            Tmessage::Setattr(t) => {
                self.writable()?;
                use setattr_bits::*;
                let time = |set: u32, exact: u32, s: u64, ns: u64| {
                    if t.valid & set == 0 {
                        SetTime::Omit
                    } else if t.valid & exact != 0 {
                        SetTime::At(s, ns)
                    } else {
                        SetTime::Now
                    }
                };
                let attr = SetAttr {
                    mode: (t.valid & MODE != 0).then_some(t.mode),
                    uid: (t.valid & UID != 0).then_some(t.uid),
                    gid: (t.valid & GID != 0).then_some(t.gid),
                    size: (t.valid & SIZE != 0).then_some(t.size),
                    atime: time(ATIME, ATIME_SET, t.atime_sec, t.atime_nsec),
                    mtime: time(MTIME, MTIME_SET, t.mtime_sec, t.mtime_nsec),
                };
                let fid = self.fid(t.fid)?;
                let (path, file) = {
                    let st = lock(&fid);
                    let file = match &st.kind {
                        FidKind::Open(f) => Some(f.clone()),
                        _ => None,
                    };
                    (st.path.clone(), file)
                };
                io(self.backend.setattr(&path, file.as_deref(), &attr))?;
                self.reply(buf, tag, Rmessage::Setattr(Empty {}))
            }
            Tmessage::XattrWalk(t) => {
                let (path, qid) = {
                    let f = self.fid(t.fid)?;
                    let st = lock(&f);
                    (st.path.clone(), st.qid)
                };
                if lock(&self.fids).contains_key(&t.newfid) && t.newfid != t.fid {
                    return Err(errno::EBADF);
                }
                let value = if t.name.as_bytes().is_empty() {
                    io(self.backend.list_xattr(&path))?
                } else {
                    if t.name.as_bytes().contains(&0) {
                        return Err(errno::EINVAL);
                    }
                    io(self.backend.get_xattr(&path, OsStr::from_bytes(t.name.as_bytes())))?
                };
                let size = value.len() as u64;
                let state = FidState { path, qid, kind: FidKind::XattrRead(Arc::new(value)) };
                lock(&self.fids).insert(t.newfid, Arc::new(Mutex::new(state)));
                self.reply(buf, tag, Rmessage::XattrWalk(Rxattrwalk { size }))
            }
            Tmessage::XattrCreate(t) => {
                self.writable()?;
                let name = t.name.as_bytes();
                if name.is_empty() || name.contains(&0) {
                    return Err(errno::EINVAL);
                }
                if t.size > super::hostfs::XATTR_MAX as u64 {
                    return Err(errno::E2BIG);
                }
                let fid = self.fid(t.fid)?;
                let mut st = lock(&fid);
                if !matches!(st.kind, FidKind::Node) {
                    return Err(errno::EINVAL);
                }
                st.kind = FidKind::XattrWrite {
                    name: name.to_vec(),
                    size: t.size as usize,
                    flags: t.flags,
                    data: Vec::with_capacity(t.size as usize),
                };
                drop(st);
                self.reply(buf, tag, Rmessage::XattrCreate(Empty {}))
            }
            Tmessage::Readdir(t) => self.readdir(tag, t, buf),
            Tmessage::Fsync(t) => {
                io(self.open_file(t.fid)?.fsync(t.datasync != 0))?;
                self.reply(buf, tag, Rmessage::Fsync(Empty {}))
            }
            Tmessage::Lock(t) => {
                let file = self.open_file(t.fid)?;
                let kind = lock_type(t.ty)?;
                let range = LockRange { start: t.start, length: t.length };
                // Never wait here: BLOCKED makes the kernel sleep and retry.
                let status = match io(file.lock(kind, range))? {
                    LockOutcome::Granted => LOCK_SUCCESS,
                    LockOutcome::Blocked => LOCK_BLOCKED,
                };
                self.reply(buf, tag, Rmessage::Lock(Rlock { status }))
            }
            Tmessage::GetLock(t) => {
                let file = self.open_file(t.fid)?;
                let kind = lock_type(t.ty)?;
                let range = LockRange { start: t.start, length: t.length };
                let r = match io(file.get_lock(kind, range))? {
                    None => Getlock { ty: LOCK_TYPE_UNLCK, ..t },
                    Some(c) => Getlock {
                        fid: t.fid,
                        ty: if c.kind == LockType::Read { LOCK_TYPE_RDLCK } else { LOCK_TYPE_WRLCK },
                        start: c.range.start,
                        length: c.range.length,
                        proc_id: c.pid,
                        client_id: t.client_id,
                    },
                };
                self.reply(buf, tag, Rmessage::GetLock(r))
            }
        }
    }

    fn walk(&self, tag: u16, t: Twalk, buf: &mut Vec<u8>) -> Res<()> {
        if t.names.len() > MAX_WALK_ELEMENTS {
            return Err(errno::EINVAL);
        }
        for n in &t.names {
            let b = n.as_bytes();
            if b.is_empty() || b.contains(&b'/') || b.contains(&0) {
                return Err(errno::EINVAL);
            }
        }
        let (mut path, start_qid) = {
            let f = self.fid(t.fid)?;
            let st = lock(&f);
            (st.path.clone(), st.qid)
        };
        if t.newfid != t.fid && lock(&self.fids).contains_key(&t.newfid) {
            return Err(errno::EBADF);
        }
        let mut qids = Vec::with_capacity(t.names.len());
        let mut qid = start_qid;
        for (i, n) in t.names.iter().enumerate() {
            match n.as_bytes() {
                b"." => {}
                // Lexical parent; PathBuf::pop on the root's "" leaves it the root.
                b".." => {
                    path.pop();
                }
                name => path.push(OsStr::from_bytes(name)),
            }
            match self.backend.lstat(&path) {
                Ok(a) => {
                    qid = self.qid(&a);
                    qids.push(qid);
                }
                Err(e) if i == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        if qids.len() == t.names.len() {
            let state = FidState { path, qid, kind: FidKind::Node };
            lock(&self.fids).insert(t.newfid, Arc::new(Mutex::new(state)));
        }
        self.reply(buf, tag, Rmessage::Walk(Rwalk { qids }))
    }

    fn read(&self, tag: u16, t: Tread, buf: &mut Vec<u8>) -> Res<()> {
        let max = (self.msize() as usize).saturating_sub(IO_HEADER_LEN);
        let count = (t.count as usize).min(max);
        let fid = self.fid(t.fid)?;
        enum Source<F> {
            File(Arc<F>),
            Bytes(Arc<Vec<u8>>),
        }
        let src = match &lock(&fid).kind {
            FidKind::Open(f) => Source::File(f.clone()),
            FidKind::XattrRead(v) => Source::Bytes(v.clone()),
            _ => return Err(errno::EBADF),
        };
        buf.resize(IO_HEADER_LEN + count, 0);
        let n = match src {
            Source::File(f) => io(f.read_at(&mut buf[IO_HEADER_LEN..], t.offset))?,
            Source::Bytes(v) => {
                let start = (t.offset.min(v.len() as u64)) as usize;
                let n = (v.len() - start).min(count);
                buf[IO_HEADER_LEN..IO_HEADER_LEN + n].copy_from_slice(&v[start..start + n]);
                n
            }
        };
        buf.truncate(IO_HEADER_LEN + n);
        finish_io_frame(buf, msg_type::RREAD, tag, n);
        Ok(())
    }

    fn write(&self, t: &Twrite) -> Res<u32> {
        let fid = self.fid(t.fid)?;
        let file = {
            let mut st = lock(&fid);
            match &mut st.kind {
                FidKind::Open(f) => f.clone(),
                FidKind::XattrWrite { size, data, .. } => {
                    if t.offset != data.len() as u64 || data.len() + t.data.len() > *size {
                        return Err(errno::EINVAL);
                    }
                    data.extend_from_slice(&t.data);
                    return Ok(t.data.len() as u32);
                }
                _ => return Err(errno::EBADF),
            }
        };
        self.writable()?;
        let n = io(file.write_at(&t.data, t.offset))?;
        Ok(n as u32)
    }

    fn readdir(&self, tag: u16, t: Treaddir, buf: &mut Vec<u8>) -> Res<()> {
        let max = (self.msize() as usize).saturating_sub(IO_HEADER_LEN);
        let count = (t.count as usize).min(max);
        let fid = self.fid(t.fid)?;
        let (file, at_root, own_qid) = {
            let st = lock(&fid);
            match &st.kind {
                FidKind::Open(f) => (f.clone(), st.path.as_os_str().is_empty(), st.qid),
                _ => return Err(errno::EBADF),
            }
        };
        let dev = io(file.stat())?.dev;
        buf.clear();
        buf.resize(IO_HEADER_LEN, 0);
        let mut used = 0usize;
        io(file.readdir(t.offset, &mut |e| {
            let need = dirent_size(e.name.len());
            if used + need > count {
                return false;
            }
            // ".." of the export root is outside it: show the root instead.
            let qid = if at_root && e.name == b".." {
                own_qid
            } else {
                Qid { ty: dtype_qid_type(e.dtype), version: 0, path: self.qid_path(dev, e.ino) }
            };
            let d = Dirent { qid, offset: e.next_offset, ty: e.dtype, name: P9String(e.name.to_vec()) };
            d.encode(buf);
            used += need;
            true
        }))?;
        finish_io_frame(buf, msg_type::RREADDIR, tag, used);
        Ok(())
    }

    /// Tclunk of a fid that holds no open file touches no filesystem: answer it on the
    /// spot (saves two thread hand-offs on the kernel's walk/getattr/clunk pattern).
    fn clunk_inline(&self, tag: u16, fid: u32) -> Option<Vec<u8>> {
        let mut fids = lock(&self.fids);
        let idle = matches!(lock(fids.get(&fid)?).kind, FidKind::Node | FidKind::XattrRead(_));
        if !idle {
            return None;
        }
        fids.remove(&fid);
        let mut w = Vec::with_capacity(7);
        encode_rmessage(&mut w, tag, &Rmessage::Clunk(Empty {}));
        Some(w)
    }

    /// Registers a request so a Tflush can find it.
    fn begin(&self, tag: u16) {
        lock(&self.inflight).insert(tag, InFlight::default());
    }

    fn cancelled(&self, tag: u16) -> bool {
        lock(&self.inflight).get(&tag).is_some_and(|f| f.cancelled)
    }

    /// Sends the reply (if any), then the Rflush of everyone who flushed this request.
    fn finish(&self, tag: u16, reply: Option<Vec<u8>>, slot: OwnedSemaphorePermit, out: &Replies) {
        let mut inflight = lock(&self.inflight);
        let entry = inflight.remove(&tag).unwrap_or_default();
        if let Some(r) = reply {
            if self.config.trace {
                log::info!("9p -> tag {tag} type {} ({} bytes)", r.get(4).copied().unwrap_or(0), r.len());
            }
            send(out, r, Some(slot));
        }
        for f in entry.flushers {
            send(out, rflush(f), None);
        }
    }

    /// Tflush: answered at once if `oldtag` is not running, else after its reply.
    fn flush(&self, tag: u16, oldtag: u16, out: &Replies) {
        let mut inflight = lock(&self.inflight);
        match inflight.get_mut(&oldtag) {
            Some(f) => {
                f.cancelled = true;
                f.flushers.push(tag);
            }
            None => {
                send(out, rflush(tag), None);
            }
        }
    }
}

fn rflush(tag: u16) -> Vec<u8> {
    let mut w = Vec::with_capacity(7);
    encode_rmessage(&mut w, tag, &Rmessage::Flush(Empty {}));
    w
}

fn lock_type(ty: u8) -> Res<LockType> {
    match ty {
        LOCK_TYPE_RDLCK => Ok(LockType::Read),
        LOCK_TYPE_WRLCK => Ok(LockType::Write),
        LOCK_TYPE_UNLCK => Ok(LockType::Unlock),
        _ => Err(errno::EINVAL),
    }
}

/// One decoded request waiting for (or on) a pool thread.
struct Job {
    tag: u16,
    msg: Tmessage,
    slot: OwnedSemaphorePermit,
}

/// Most metadata requests grouped into one submission.
const MAX_BATCH: usize = 32;

/// Whether `buf` starts with a complete frame (more requests are ready without reading).
fn frame_buffered(buf: &[u8]) -> bool {
    buf.len() >= 4 && buf.len() >= u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}

/// Runs `jobs` one after the other on a pool thread, replying as each finishes.
fn spawn_jobs<B: Backend>(session: Arc<Session<B>>, jobs: Vec<Job>, out: Replies) {
    tokio::task::spawn_blocking(move || {
        for Job { tag, msg, slot } in jobs {
            if session.cancelled(tag) {
                session.finish(tag, None, slot, &out);
            } else {
                let reply = session.dispatch(tag, msg);
                session.finish(tag, Some(reply), slot, &out);
            }
        }
    });
}

/// Submits a batch of metadata requests, spread over at most one job per CPU.
fn submit<B: Backend>(session: &Arc<Session<B>>, batch: &mut Vec<Job>, out: &Replies) {
    if batch.is_empty() {
        return;
    }
    let lanes = session.lanes.min(batch.len());
    let mut chunks: Vec<Vec<Job>> = (0..lanes).map(|_| Vec::new()).collect();
    for (i, job) in batch.drain(..).enumerate() {
        chunks[i % lanes].push(job);
    }
    for jobs in chunks {
        spawn_jobs(session.clone(), jobs, out.clone());
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R, max: u32, pool: &BufPool) -> Result<Option<Vec<u8>>> {
    let mut size_bytes = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = rd.read(&mut size_bytes[got..]).await.map_err(|e| Error::io("9p: reading a request", e))?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(Error::NineP("connection closed inside a message header".into()));
        }
        got += n;
    }
    let size = u32::from_le_bytes(size_bytes);
    if (size as usize) < HEADER_LEN || size > max {
        return Err(Error::NineP(format!("message of {size} bytes (msize {max}); closing")));
    }
    let mut frame = if size as usize >= POOL_MIN { pool.get() } else { Vec::new() };
    frame.resize(size as usize, 0);
    frame[..4].copy_from_slice(&size_bytes);
    rd.read_exact(&mut frame[4..])
        .await
        .map_err(|e| Error::io("9p: connection closed inside a message", e))?;
    Ok(Some(frame))
}

async fn write_loop<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    pool: &BufPool,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(out) = rx.recv().await {
        w.write_all(&out.frame).await?;
        pool.put(out.frame);
        // Coalesce whatever else is ready into one flush.
        while let Ok(out) = rx.try_recv() {
            w.write_all(&out.frame).await?;
            pool.put(out.frame);
        }
        w.flush().await?;
    }
    Ok(())
}

/// Serves one connection with `backend` until the peer closes it.
pub async fn serve_backend<S, B>(stream: S, backend: B, config: ServerConfig) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Backend,
{
    let session = Arc::new(Session::new(backend, config));
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();

    let reader = {
        let session = session.clone();
        async move {
            let mut rd = BufReader::with_capacity(64 * 1024, rd);
            let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
            let mut batch: Vec<Job> = Vec::new();
            loop {
                // Metadata requests that arrived together run as one pool job (fewer thread
                // wake-ups); submit what we have before waiting for more input.
                if !batch.is_empty() && !frame_buffered(rd.buffer()) {
                    submit(&session, &mut batch, &tx);
                }
                let permit = match slots.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        submit(&session, &mut batch, &tx);
                        let Ok(p) = slots.clone().acquire_owned().await else {
                            return Ok(());
                        };
                        p
                    }
                };
                let frame = match read_frame(&mut rd, session.msize(), &session.pool).await {
                    Ok(Some(frame)) => frame,
                    other => {
                        submit(&session, &mut batch, &tx);
                        return other.map(|_| ());
                    }
                };
                match wire::decode_request(frame) {
                    Err((tag, e)) => {
                        log::debug!("9p: bad request (tag {tag:?}): {e}");
                        match tag {
                            Some(tag) => {
                                let code = match e {
                                    WireError::UnknownType(_) => errno::ENOSYS,
                                    _ => errno::EINVAL,
                                };
                                send(&tx, rlerror(tag, code), Some(permit));
                            }
                            None => {
                                submit(&session, &mut batch, &tx);
                                return Err(Error::NineP(format!("unreadable request: {e}")));
                            }
                        }
                    }
                    Ok((tag, msg)) => {
                        if session.config.trace {
                            log::info!("9p <- tag {tag} {msg:?}");
                        }
                        if let Tmessage::Clunk(t) = &msg {
                            if let Some(reply) = session.clunk_inline(tag, t.fid) {
                                send(&tx, reply, Some(permit));
                                continue;
                            }
                        }
                        match msg {
                            Tmessage::Flush(f) => session.flush(tag, f.oldtag, &tx),
                            Tmessage::Version(v) => {
                                send(&tx, session.version(tag, &v), Some(permit));
                            }
                            msg @ (Tmessage::Walk(_)
                            | Tmessage::Getattr(_)
                            | Tmessage::Readlink(_)
                            | Tmessage::Statfs(_)) => {
                                session.begin(tag);
                                batch.push(Job { tag, msg, slot: permit });
                                if batch.len() >= MAX_BATCH {
                                    submit(&session, &mut batch, &tx);
                                }
                            }
                            msg => {
                                session.begin(tag);
                                let job = vec![Job { tag, msg, slot: permit }];
                                spawn_jobs(session.clone(), job, tx.clone());
                            }
                        }
                    }
                }
            }
        }
    };
    let writer = {
        let session = session.clone();
        async move { write_loop(wr, rx, &session.pool).await }
    };
    tokio::pin!(reader);
    tokio::pin!(writer);

    let read_result = tokio::select! {
        r = &mut reader => r,
        // The writer only stops early when writing failed: the connection is unusable.
        w = &mut writer => {
            return w.map_err(|e| Error::io("9p: writing a reply", e));
        }
    };
    match read_result {
        Ok(()) => {
            // The peer is done; let finished replies go out, but do not wait forever for a
            // request stuck in the filesystem (a FIFO, a hung NFS mount).
            // The timer is a plain thread: the caller's runtime may have no time driver.
            let (expired_tx, expired) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                std::thread::sleep(DRAIN_TIMEOUT);
                let _ = expired_tx.send(());
            });
            tokio::select! {
                r = &mut writer => {
                    if let Err(e) = r {
                        log::debug!("9p: peer gone before replies were written: {e}");
                    }
                }
                _ = expired => log::debug!("9p: requests still running after the peer closed"),
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ninep::hostfs::HostFs;

    #[test]
    fn wire_open_flags_are_translated_not_passed_through() {
        let f = open_flags(dotl::WRONLY | dotl::TRUNC | dotl::APPEND | 0o100000 | 0o1000000);
        assert!(f.write && !f.read && f.truncate && f.append);
        assert!(!f.directory && !f.sync && !f.dsync && !f.nonblock && !f.exclusive);
        let f = open_flags(dotl::RDWR | dotl::DIRECTORY | dotl::SYNC | dotl::NONBLOCK);
        assert!(f.read && f.write && f.directory && f.sync && f.nonblock);
        // NOACCESS (3) opens for reading only.
        let f = open_flags(3);
        assert!(f.read && !f.write);
    }

    #[test]
    fn qid_paths_mix_the_device() {
        let s = Session::new(
            HostFs::new(Path::new("/")).expect("open /"),
            ServerConfig { read_only: true, max_msize: u32::MAX, trace: false },
        );
        assert_eq!(s.config.max_msize, MAX_MSIZE);
        // The first device keeps raw inode numbers; another device's equal inode differs.
        assert_eq!(s.qid_path(10, 5), 5);
        assert_ne!(s.qid_path(11, 5), 5);
        assert_eq!(s.qid_path(11, 5), s.qid_path(11, 5));
        assert_ne!(s.qid_path(12, 5), s.qid_path(11, 5));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert_eq!(check_name(&P9String::from(bad)), Err(errno::EINVAL), "{bad:?}");
        }
        assert!(check_name(&P9String::from("...")).is_ok());
    }
}

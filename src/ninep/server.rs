//! The 9P2000.L server: reads frames from one byte stream, keeps the fid table, runs each
//! request on the blocking pool, and writes replies in the order they finish.
//!
//! Owns: msize negotiation, fids (each holds a backend node: the file itself, not its name;
//! the lexical path is kept only for `..`, Tremove and Trename), QIDs, name checks (no
//! empty, no `/`, `..` never above the root), the read-only rule, the remote's safety limits,
//! POSIX locks ([`super::locks`]: the remote's, held on the host too), Tflush bookkeeping. It must not block the async thread:
//! backend calls run inside `spawn_blocking` (metadata requests that arrive together share
//! one pool job per CPU, which saves thread wake-ups), except a lone Twalk or Tgetattr of a
//! file on a local file system (ext4, tmpfs, ...: never a network or FUSE one), answered on
//! the connection thread to save two thread hand-offs; a session whose inline calls turn out
//! slow (over 20 ms, three times) stops doing that. A bad request costs an Rlerror,
//! never the connection; only an unframeable byte stream ends it.
//!
//! Memory a remote can make us hold is bounded: at most `MAX_IN_FLIGHT` requests and their
//! unwritten replies (Rflush included) exist at once, and at most `big_slots` of them may be
//! bigger than `BIG_FRAME` (a 1 MiB Twrite or Rread); when the remote stops reading replies,
//! we stop reading requests. At most `MAX_FIDS` fids, `XATTR_BUDGET` bytes of xattr buffers
//! and `locks::MAX_LOCK_RANGES` lock ranges per session; beyond them requests fail.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::backend::{Attr, Backend, BackendFile, OpenFlags, Owner, SetAttr, SetTime};
use super::errno::{self, Errno};
use super::locks::{self, Holder, LockOwner, LockTable, Outcome};
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
/// Requests or replies bigger than this take one of the few big slots.
const BIG_FRAME: usize = 64 * 1024;
/// Bytes the big slots may hold at once (their number is this over msize, at least 2).
const BIG_BUDGET: usize = 16 << 20;
/// Most fids one session may hold: far above what a kernel client with 10,000 open files
/// and its cached dentries uses, far below what would hurt the client machine.
pub const MAX_FIDS: usize = 100_000;
/// Most bytes of xattr values (read or being written) all fids together may hold.
pub const XATTR_BUDGET: usize = 8 << 20;
/// xattr namespaces the remote may not write: they carry privilege on the client machine.
const PROTECTED_XATTRS: [&[u8]; 2] = [b"security.", b"trusted."];
/// statfs f_type of file systems whose metadata calls never wait for a network or a user
/// space daemon: ext2/3/4, xfs, btrfs, tmpfs, ramfs, overlayfs, f2fs, vfat, exfat, zfs,
/// bcachefs, squashfs, iso9660.
const LOCAL_FS_TYPES: [u32; 13] = [
    0xef53,
    0x5846_5342,
    0x9123_683e,
    0x0102_1994,
    0x8584_58f6,
    0x794c_7630,
    0xf2f5_2010,
    0x4d44,
    0x2011_bab0,
    0x2fc1_2fc1,
    0xca45_1a4e,
    0x7371_7368,
    0x9660,
];
/// An inline request slower than this counts as slow; after `INLINE_SLOW_LIMIT` of them the
/// session stops answering inline (a disk that stalls must not stall the connection).
const INLINE_SLOW: Duration = Duration::from_millis(20);
const INLINE_SLOW_LIMIT: u32 = 3;
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
/// Tattach n_uname when the client sends only a name.
const NONUNAME: u32 = u32::MAX;
const EMFILE: Errno = Errno(24);
const ENOMEM: Errno = Errno(12);
const ENOLCK: Errno = Errno(37);
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
    XattrRead { value: Arc<Vec<u8>>, _charge: XattrCharge },
    /// Txattrcreate in progress, filled with Twrite, applied at Tclunk.
    XattrWrite { name: Vec<u8>, size: usize, flags: u32, data: Vec<u8>, _charge: XattrCharge },
}

/// Bytes of xattr buffer one fid holds, given back to the session's budget when dropped.
struct XattrCharge {
    bytes: usize,
    total: Arc<AtomicUsize>,
}

impl XattrCharge {
    fn take(total: &Arc<AtomicUsize>, bytes: usize) -> Res<XattrCharge> {
        let mut cur = total.load(Ordering::Relaxed);
        loop {
            let next = cur.checked_add(bytes).filter(|&n| n <= XATTR_BUDGET).ok_or(ENOMEM)?;
            match total.compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(XattrCharge { bytes, total: total.clone() }),
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for XattrCharge {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

struct FidState<B: Backend> {
    /// Lexical path relative to the export root ("" is the root), made only of checked
    /// names: for `..`, Tremove and Trename only; everything else goes through `node`.
    path: PathBuf,
    /// The file itself (for an open fid: its open descriptor).
    node: B::Node,
    qid: Qid,
    /// The attaching user (Tattach n_uname): owner of what this fid creates.
    uid: u32,
    kind: FidKind<B::File>,
    /// A lock was taken through this fid: clunking it releases its owners' locks.
    locked: bool,
    /// The file is on a local disk-or-memory file system: cheap metadata requests about it
    /// may be answered on the connection thread.
    local: bool,
}

type FidRef<B> = Arc<Mutex<FidState<B>>>;

#[derive(Default)]
struct InFlight {
    cancelled: bool,
    /// Tflush requests waiting for this one, with their in-flight slots.
    flushers: Vec<(u16, Option<OwnedSemaphorePermit>)>,
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
            if free.len() < 16 {
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
    _slot: Slot,
}

/// The in-flight slot of a request (and its big slot, if it is big), held until the reply
/// is written.
#[derive(Default)]
struct Slot {
    _count: Option<OwnedSemaphorePermit>,
    _big: Option<OwnedSemaphorePermit>,
}

impl Slot {
    fn of(count: OwnedSemaphorePermit) -> Slot {
        Slot { _count: Some(count), _big: None }
    }
}

type Replies = mpsc::UnboundedSender<Outgoing>;

fn send(out: &Replies, frame: Vec<u8>, slot: Slot) {
    // A closed channel means the writer is gone; the session is ending anyway.
    let _ = out.send(Outgoing { frame, _slot: slot });
}

/// One connection's state.
pub struct Session<B: Backend> {
    backend: B,
    config: ServerConfig,
    msize: AtomicU32,
    fids: Mutex<HashMap<u32, FidRef<B>>>,
    locks: Mutex<LockTable>,
    /// Bytes of xattr buffers held by all fids.
    xattr_bytes: Arc<AtomicUsize>,
    /// Our own uid: what an attach without a numeric user stands for.
    own_uid: u32,
    /// st_dev → whether it is a local file system (see `LOCAL_FS_TYPES`).
    local_devs: Mutex<HashMap<u64, bool>>,
    /// Inline requests that took longer than `INLINE_SLOW`.
    slow_inline: AtomicU32,
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
            locks: Mutex::new(LockTable::default()),
            xattr_bytes: Arc::new(AtomicUsize::new(0)),
            own_uid: rustix::process::geteuid().as_raw(),
            local_devs: Mutex::new(HashMap::new()),
            slow_inline: AtomicU32::new(0),
            devices: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            pool: BufPool::default(),
            lanes: crate::discovery::sysinfo::logical_cpus(),
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

    fn fid(&self, fid: u32) -> Res<FidRef<B>> {
        lock(&self.fids).get(&fid).cloned().ok_or(errno::EBADF)
    }

    fn path_of(&self, fid: u32) -> Res<PathBuf> {
        let f = self.fid(fid)?;
        let path = lock(&f).path.clone();
        Ok(path)
    }

    fn node_of(&self, fid: u32) -> Res<B::Node> {
        let f = self.fid(fid)?;
        let node = lock(&f).node.clone();
        Ok(node)
    }

    /// A directory fid's node, lexical path and user (for creating in it).
    fn dir_of(&self, fid: u32) -> Res<(B::Node, PathBuf, u32)> {
        let f = self.fid(fid)?;
        let st = lock(&f);
        Ok((st.node.clone(), st.path.clone(), st.uid))
    }

    /// The node and path of a fid that is not open yet (Tlopen and Tlcreate take only those).
    fn unopened(fid: &FidRef<B>) -> Res<(B::Node, PathBuf, u32)> {
        let st = lock(fid);
        if !matches!(st.kind, FidKind::Node) {
            return Err(errno::EINVAL);
        }
        Ok((st.node.clone(), st.path.clone(), st.uid))
    }

    /// The node of the parent of lexical `path` and the last name (for Tremove, Trename).
    fn parent_of(&self, path: &Path) -> Res<(B::Node, PathBuf)> {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(errno::EBUSY);
        };
        Ok((io(self.backend.lookup(parent))?, PathBuf::from(name)))
    }

    fn open_file(&self, fid: u32) -> Res<Arc<B::File>> {
        let f = self.fid(fid)?;
        let st = lock(&f);
        match &st.kind {
            FidKind::Open(f) => Ok(f.clone()),
            _ => Err(errno::EBADF),
        }
    }

    /// Checks that `fid` may become a new fid (not NOFID, not in use, under the cap).
    fn new_fid_ok(fids: &HashMap<u32, FidRef<B>>, fid: u32) -> Res<()> {
        if fid == NOFID || fids.contains_key(&fid) {
            return Err(errno::EBADF);
        }
        if fids.len() >= MAX_FIDS {
            return Err(EMFILE);
        }
        Ok(())
    }

    fn insert_fid(&self, fid: u32, state: FidState<B>) -> Res<()> {
        let mut fids = lock(&self.fids);
        Self::new_fid_ok(&fids, fid)?;
        fids.insert(fid, Arc::new(Mutex::new(state)));
        Ok(())
    }

    /// Whether device `dev` (of `node`) holds a local file system, where metadata calls do
    /// not wait for a network or a FUSE daemon (asked once per device).
    fn is_local(&self, node: &B::Node, dev: u64) -> bool {
        if let Some(&known) = lock(&self.local_devs).get(&dev) {
            return known;
        }
        let local = self.backend.statfs(node).is_ok_and(|s| LOCAL_FS_TYPES.contains(&s.fs_type));
        lock(&self.local_devs).insert(dev, local);
        local
    }

    /// Whether a Twalk/Tgetattr of `fid` may run on the connection thread: the file is on a
    /// local file system and such calls have not been slow in this session.
    fn may_inline(&self, fid: u32) -> bool {
        if self.slow_inline.load(Ordering::Relaxed) >= INLINE_SLOW_LIMIT {
            return false;
        }
        let Some(f) = lock(&self.fids).get(&fid).cloned() else {
            return false;
        };
        let st = lock(&f);
        st.local
    }

    /// Runs a cheap metadata request right here and notes if it was slow after all.
    fn dispatch_inline(&self, tag: u16, msg: Tmessage) -> Vec<u8> {
        let started = Instant::now();
        let reply = self.dispatch(tag, msg);
        if started.elapsed() > INLINE_SLOW {
            let n = self.slow_inline.fetch_add(1, Ordering::Relaxed) + 1;
            if n == INLINE_SLOW_LIMIT {
                log::debug!("9p: metadata calls are slow here; no longer answering them inline");
            }
        }
        reply
    }

    /// A fid went away: like close(2), its processes' locks on the file go with it.
    fn fid_gone(&self, state: &FidState<B>, fid: u32) {
        if state.locked {
            lock(&self.locks).fid_closed(fid);
        }
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
            *lock(&self.locks) = LockTable::default();
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
                Self::new_fid_ok(&lock(&self.fids), t.fid)?;
                let node = io(self.backend.lookup(&path))?;
                let attr = io(self.backend.stat(&node))?;
                let qid = self.qid(&attr);
                // The kernel attaches once per user (access=user/client) with n_uname set.
                let uid = if t.n_uname != NONUNAME { t.n_uname } else { self.own_uid };
                let local = self.is_local(&node, attr.dev);
                let state = FidState { path, node, qid, uid, kind: FidKind::Node, locked: false, local };
                self.insert_fid(t.fid, state)?;
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
                self.fid_gone(&st, t.fid);
                let kind = std::mem::replace(&mut st.kind, FidKind::Node);
                if let FidKind::XattrWrite { name, size, flags, data, .. } = &kind {
                    if data.len() != *size {
                        return Err(errno::EINVAL);
                    }
                    let name = OsStr::from_bytes(name);
                    if *size == 0 {
                        io(self.backend.remove_xattr(&st.node, name))?;
                    } else {
                        io(self.backend.set_xattr(&st.node, name, data, *flags))?;
                    }
                }
                self.reply(buf, tag, Rmessage::Clunk(Empty {}))
            }
            Tmessage::Remove(t) => {
                let state = lock(&self.fids).remove(&t.fid).ok_or(errno::EBADF)?;
                let (path, node) = {
                    let st = lock(&state);
                    self.fid_gone(&st, t.fid);
                    (st.path.clone(), st.node.clone())
                };
                self.writable()?;
                if path.as_os_str().is_empty() {
                    return Err(errno::EBUSY);
                }
                let attr = io(self.backend.stat(&node))?;
                let (dir, name) = self.parent_of(&path)?;
                io(self.backend.unlink(&dir, name.as_os_str(), attr.is_dir()))?;
                self.reply(buf, tag, Rmessage::Remove(Empty {}))
            }
            Tmessage::Statfs(t) => {
                let s = io(self.backend.statfs(&self.node_of(t.fid)?))?;
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
                let (node, path, _) = Self::unopened(&fid)?;
                let mut flags = open_flags(t.flags);
                if (flags.write || flags.truncate) && self.config.read_only {
                    return Err(errno::EROFS);
                }
                let attr = io(self.backend.stat(&node))?;
                if attr.is_symlink() {
                    return Err(errno::ELOOP);
                }
                if attr.is_dir() {
                    if flags.write {
                        return Err(errno::EISDIR);
                    }
                    flags.directory = true;
                }
                let file = io(self.backend.open(&node, &path, flags))?;
                let attr = io(file.stat())?;
                let qid = self.qid(&attr);
                {
                    let mut st = lock(&fid);
                    st.qid = qid;
                    st.node = self.backend.file_node(&file);
                    st.kind = FidKind::Open(Arc::new(file));
                }
                self.reply(buf, tag, Rmessage::Lopen(Ropen { qid, iounit: 0 }))
            }
            Tmessage::Lcreate(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let fid = self.fid(t.fid)?;
                let (dir, dir_path, uid) = Self::unopened(&fid)?;
                let mut flags = open_flags(t.flags);
                flags.exclusive = t.flags & dotl::EXCL != 0;
                flags.directory = false;
                let owner = Owner { uid, gid: t.gid };
                let file = io(self.backend.create(&dir, name, flags, t.mode, owner))?;
                let attr = io(file.stat())?;
                let qid = self.qid(&attr);
                {
                    let mut st = lock(&fid);
                    st.path = dir_path.join(name);
                    st.qid = qid;
                    st.node = self.backend.file_node(&file);
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
                let (dir, _, uid) = self.dir_of(t.fid)?;
                let owner = Owner { uid, gid: t.gid };
                let attr =
                    io(self.backend.symlink(&dir, name, OsStr::from_bytes(t.target.as_bytes()), owner))?;
                let qid = self.qid(&attr);
                self.reply(buf, tag, Rmessage::Symlink(Rqid { qid }))
            }
            Tmessage::Mknod(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let (dir, _, uid) = self.dir_of(t.dfid)?;
                let rdev = rustix::fs::makedev(t.major, t.minor);
                let attr = io(self.backend.mknod(&dir, name, t.mode, rdev, Owner { uid, gid: t.gid }))?;
                let qid = self.qid(&attr);
                self.reply(buf, tag, Rmessage::Mknod(Rqid { qid }))
            }
            Tmessage::Mkdir(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let (dir, _, uid) = self.dir_of(t.dfid)?;
                let attr = io(self.backend.mkdir(&dir, name, t.mode, Owner { uid, gid: t.gid }))?;
                let qid = self.qid(&attr);
                self.reply(buf, tag, Rmessage::Mkdir(Rqid { qid }))
            }
            Tmessage::Rename(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let from = self.path_of(t.fid)?;
                if from.as_os_str().is_empty() {
                    return Err(errno::EBUSY);
                }
                let (to_dir, to_dir_path, _) = self.dir_of(t.dfid)?;
                let to = to_dir_path.join(name);
                let (from_dir, from_name) = self.parent_of(&from)?;
                io(self.backend.rename(&from_dir, from_name.as_os_str(), &to_dir, name))?;
                self.rename_fids(&from, &to);
                self.reply(buf, tag, Rmessage::Rename(Empty {}))
            }
            Tmessage::RenameAt(t) => {
                self.writable()?;
                let (old_name, new_name) = (check_name(&t.oldname)?, check_name(&t.newname)?);
                let (from_dir, from_path, _) = self.dir_of(t.olddirfid)?;
                let (to_dir, to_path, _) = self.dir_of(t.newdirfid)?;
                io(self.backend.rename(&from_dir, old_name, &to_dir, new_name))?;
                self.rename_fids(&from_path.join(old_name), &to_path.join(new_name));
                self.reply(buf, tag, Rmessage::RenameAt(Empty {}))
            }
            Tmessage::UnlinkAt(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let dir = self.node_of(t.dirfid)?;
                io(self.backend.unlink(&dir, name, t.flags & AT_REMOVEDIR != 0))?;
                self.reply(buf, tag, Rmessage::UnlinkAt(Empty {}))
            }
            Tmessage::Link(t) => {
                self.writable()?;
                let name = check_name(&t.name)?;
                let dir = self.node_of(t.dfid)?;
                let target = self.node_of(t.fid)?;
                let target_path = self.path_of(t.fid)?;
                io(self.backend.link(&target, &target_path, &dir, name))?;
                self.reply(buf, tag, Rmessage::Link(Empty {}))
            }
            Tmessage::Readlink(t) => {
                let target = io(self.backend.readlink(&self.node_of(t.fid)?))?;
                self.reply(buf, tag, Rmessage::Readlink(Rreadlink { target: P9String(target) }))
            }
            Tmessage::Getattr(t) => {
                let a = io(self.backend.stat(&self.node_of(t.fid)?))?;
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
                        Ok(SetTime::Omit)
                    } else if t.valid & exact != 0 {
                        set_time_from_wire(s, ns)
                    } else {
                        Ok(SetTime::Now)
                    }
                };
                let size = match t.valid & SIZE {
                    0 => None,
                    _ => Some(file_offset(t.size)?),
                };
                let attr = SetAttr {
                    mode: (t.valid & MODE != 0).then_some(t.mode),
                    uid: (t.valid & UID != 0).then_some(t.uid),
                    gid: (t.valid & GID != 0).then_some(t.gid),
                    size,
                    atime: time(ATIME, ATIME_SET, t.atime_sec, t.atime_nsec)?,
                    mtime: time(MTIME, MTIME_SET, t.mtime_sec, t.mtime_nsec)?,
                };
                io(self.backend.setattr(&self.node_of(t.fid)?, &attr))?;
                self.reply(buf, tag, Rmessage::Setattr(Empty {}))
            }
            Tmessage::XattrWalk(t) => {
                let (path, node, qid, uid, local) = {
                    let f = self.fid(t.fid)?;
                    let st = lock(&f);
                    (st.path.clone(), st.node.clone(), st.qid, st.uid, st.local)
                };
                if t.newfid != t.fid {
                    Self::new_fid_ok(&lock(&self.fids), t.newfid)?;
                }
                let value = if t.name.as_bytes().is_empty() {
                    io(self.backend.list_xattr(&node))?
                } else {
                    if t.name.as_bytes().contains(&0) {
                        return Err(errno::EINVAL);
                    }
                    io(self.backend.get_xattr(&node, OsStr::from_bytes(t.name.as_bytes())))?
                };
                let size = value.len() as u64;
                let charge = XattrCharge::take(&self.xattr_bytes, value.len())?;
                let kind = FidKind::XattrRead { value: Arc::new(value), _charge: charge };
                let state = FidState { path, node, qid, uid, kind, locked: false, local };
                let mut fids = lock(&self.fids);
                if t.newfid != t.fid {
                    Self::new_fid_ok(&fids, t.newfid)?;
                }
                fids.insert(t.newfid, Arc::new(Mutex::new(state)));
                self.reply(buf, tag, Rmessage::XattrWalk(Rxattrwalk { size }))
            }
            Tmessage::XattrCreate(t) => {
                self.writable()?;
                let name = t.name.as_bytes();
                if name.is_empty() || name.contains(&0) {
                    return Err(errno::EINVAL);
                }
                if PROTECTED_XATTRS.iter().any(|p| name.starts_with(p)) {
                    return Err(errno::EPERM);
                }
                if t.size > super::hostfs::XATTR_MAX as u64 {
                    return Err(errno::E2BIG);
                }
                let fid = self.fid(t.fid)?;
                let mut st = lock(&fid);
                if !matches!(st.kind, FidKind::Node) {
                    return Err(errno::EINVAL);
                }
                let size = t.size as usize;
                let charge = XattrCharge::take(&self.xattr_bytes, size)?;
                st.kind = FidKind::XattrWrite {
                    name: name.to_vec(),
                    size,
                    flags: t.flags,
                    data: Vec::with_capacity(size),
                    _charge: charge,
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
                let kind = lock_kind(t.ty)?;
                let end = lock_range_end(t.start, t.length)?;
                let a = io(file.stat())?;
                let owner = LockOwner { proc_id: t.proc_id, client_id: t.client_id.as_bytes().to_vec() };
                // Never wait here: BLOCKED makes the kernel sleep and retry.
                let open = || file.host_lock();
                let outcome = lock(&self.locks).set((a.dev, a.ino), &owner, t.fid, kind, t.start, end, &open);
                let status = match outcome {
                    Outcome::Granted => LOCK_SUCCESS,
                    Outcome::Blocked => LOCK_BLOCKED,
                    Outcome::NoLocks => return Err(ENOLCK),
                };
                if kind.is_some() {
                    if let Ok(f) = self.fid(t.fid) {
                        lock(&f).locked = true;
                    }
                }
                self.reply(buf, tag, Rmessage::Lock(Rlock { status }))
            }
            Tmessage::GetLock(t) => {
                let file = self.open_file(t.fid)?;
                // Linux (v9fs_file_getlock, through 6.x) asks with type UNLCK, having lost
                // the type of the F_GETLK: report any range another process holds.
                let kind = lock_kind(t.ty)?.unwrap_or(locks::Kind::Write);
                let end = lock_range_end(t.start, t.length)?;
                let a = io(file.stat())?;
                let owner = LockOwner { proc_id: t.proc_id, client_id: t.client_id.as_bytes().to_vec() };
                let open = || file.host_lock();
                let held = lock(&self.locks).get((a.dev, a.ino), &owner, kind, t.start, end, &open);
                let wire_type = |k| if k == locks::Kind::Read { LOCK_TYPE_RDLCK } else { LOCK_TYPE_WRLCK };
                let wire_length = |start: u64, end: u64| if end == u64::MAX { 0 } else { end - start + 1 };
                let r = match held {
                    None => Rgetlock {
                        ty: LOCK_TYPE_UNLCK,
                        start: t.start,
                        length: t.length,
                        proc_id: t.proc_id,
                        client_id: t.client_id,
                    },
                    Some(Holder::Remote(h)) => Rgetlock {
                        ty: wire_type(h.kind),
                        start: h.start,
                        length: wire_length(h.start, h.end),
                        proc_id: h.owner.proc_id,
                        client_id: P9String(h.owner.client_id),
                    },
                    // A process on the client machine: no process of the remote's, so 0.
                    Some(Holder::Host(h)) => Rgetlock {
                        ty: wire_type(h.kind),
                        start: h.start,
                        length: wire_length(h.start, h.end),
                        proc_id: 0,
                        client_id: P9String(Vec::new()),
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
        let (mut path, mut node, start_qid, uid, mut local) = {
            let f = self.fid(t.fid)?;
            let st = lock(&f);
            (st.path.clone(), st.node.clone(), st.qid, st.uid, st.local)
        };
        if t.newfid != t.fid {
            Self::new_fid_ok(&lock(&self.fids), t.newfid)?;
        }
        let mut qids = Vec::with_capacity(t.names.len());
        let mut qid = start_qid;
        for (i, n) in t.names.iter().enumerate() {
            let next = match n.as_bytes() {
                b"." => Ok(node.clone()),
                // Lexical parent, looked up from the root; the root's parent is the root.
                b".." => {
                    path.pop();
                    self.backend.lookup(&path)
                }
                name => {
                    path.push(OsStr::from_bytes(name));
                    self.backend.walk(&node, OsStr::from_bytes(name))
                }
            };
            match next.and_then(|n| self.backend.stat(&n).map(|a| (n, a))) {
                Ok((n, a)) => {
                    local = self.is_local(&n, a.dev);
                    node = n;
                    qid = self.qid(&a);
                    qids.push(qid);
                }
                Err(e) if i == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        if qids.len() == t.names.len() {
            let state = FidState { path, node, qid, uid, kind: FidKind::Node, locked: false, local };
            let mut fids = lock(&self.fids);
            if t.newfid != t.fid {
                Self::new_fid_ok(&fids, t.newfid)?;
            } else if let Some(old) = fids.get(&t.fid) {
                // Walking a fid onto itself replaces what it named.
                self.fid_gone(&lock(old), t.fid);
            }
            fids.insert(t.newfid, Arc::new(Mutex::new(state)));
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
            FidKind::XattrRead { value, .. } => Source::Bytes(value.clone()),
            _ => return Err(errno::EBADF),
        };
        buf.resize(IO_HEADER_LEN + count, 0);
        let n = match src {
            Source::File(f) => io(f.read_at(&mut buf[IO_HEADER_LEN..], file_offset(t.offset)?))?,
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
        let n = io(file.write_at(&t.data, file_offset(t.offset)?))?;
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
        io(file.readdir(file_offset(t.offset)?, &mut |e| {
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
        let idle = {
            let st = lock(fids.get(&fid)?);
            matches!(st.kind, FidKind::Node | FidKind::XattrRead { .. }) && !st.locked
        };
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
    fn finish(&self, tag: u16, reply: Option<Vec<u8>>, slot: Slot, out: &Replies) {
        let mut inflight = lock(&self.inflight);
        let entry = inflight.remove(&tag).unwrap_or_default();
        if let Some(r) = reply {
            if self.config.trace {
                log::info!("9p -> tag {tag} type {} ({} bytes)", r.get(4).copied().unwrap_or(0), r.len());
            }
            send(out, r, slot);
        }
        for (f, permit) in entry.flushers {
            send(out, rflush(f), Slot { _count: permit, _big: None });
        }
    }

    /// Tflush: answered at once if `oldtag` is not running, else after its reply. Its
    /// in-flight slot is held until its Rflush is written, like any request's.
    fn flush(&self, tag: u16, oldtag: u16, slot: OwnedSemaphorePermit, out: &Replies) {
        let mut inflight = lock(&self.inflight);
        match inflight.get_mut(&oldtag) {
            Some(f) => {
                f.cancelled = true;
                f.flushers.push((tag, Some(slot)));
            }
            None => {
                send(out, rflush(tag), Slot::of(slot));
            }
        }
    }
}

fn rflush(tag: u16) -> Vec<u8> {
    let mut w = Vec::with_capacity(7);
    encode_rmessage(&mut w, tag, &Rmessage::Flush(Empty {}));
    w
}

/// The inclusive end of a wire lock range, refused as fcntl(2) refuses it.
fn lock_range_end(start: u64, length: u64) -> Res<u64> {
    locks::range_end(start, length).map_err(|bad| match bad {
        locks::BadRange::Start => errno::EINVAL,
        locks::BadRange::End => errno::EOVERFLOW,
    })
}

/// A file offset or size from the wire as the host takes it: an off_t is signed, so a value
/// above `i64::MAX` would reach the host as a negative one. Refused as pread(2),
/// lseek(2) and truncate(2) refuse a negative offset.
fn file_offset(value: u64) -> Res<u64> {
    if value > i64::MAX as u64 {
        Err(errno::EINVAL)
    } else {
        Ok(value)
    }
}

/// A Tsetattr time: seconds are a two's-complement time64_t on the wire (Linux v9fs sends
/// `ia_atime.tv_sec` as u64, so 1969 arrives as a value near `u64::MAX`); nanoseconds must
/// be a real fraction (a value in the range of UTIME_NOW/UTIME_OMIT would otherwise turn
/// into one of those requests).
fn set_time_from_wire(sec: u64, nsec: u64) -> Res<SetTime> {
    if nsec >= 1_000_000_000 {
        return Err(errno::EINVAL);
    }
    Ok(SetTime::At(i64::from_ne_bytes(sec.to_ne_bytes()), nsec as u32))
}

/// The lock kind of a wire lock type; None is an unlock.
fn lock_kind(ty: u8) -> Res<Option<locks::Kind>> {
    match ty {
        LOCK_TYPE_RDLCK => Ok(Some(locks::Kind::Read)),
        LOCK_TYPE_WRLCK => Ok(Some(locks::Kind::Write)),
        LOCK_TYPE_UNLCK => Ok(None),
        _ => Err(errno::EINVAL),
    }
}

/// One decoded request waiting for (or on) a pool thread.
struct Job {
    tag: u16,
    msg: Tmessage,
    slot: Slot,
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

/// Reads one frame. `Ok(None)` is a clean end of stream between frames. A frame bigger than
/// `BIG_FRAME` first waits for a big slot, which it returns with the frame.
async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    max: u32,
    pool: &BufPool,
    big: &Arc<Semaphore>,
) -> Result<Option<(Vec<u8>, Option<OwnedSemaphorePermit>)>> {
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
    let big_slot = if size as usize > BIG_FRAME {
        let Ok(p) = big.clone().acquire_owned().await else {
            return Ok(None);
        };
        Some(p)
    } else {
        None
    };
    let mut frame = if size as usize >= POOL_MIN { pool.get() } else { Vec::new() };
    frame.resize(size as usize, 0);
    frame[..4].copy_from_slice(&size_bytes);
    rd.read_exact(&mut frame[4..])
        .await
        .map_err(|e| Error::io("9p: connection closed inside a message", e))?;
    Ok(Some((frame, big_slot)))
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
            let big_slots = (BIG_BUDGET / session.config.max_msize as usize).max(2);
            let big = Arc::new(Semaphore::new(big_slots));
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
                let (frame, big_slot) = match read_frame(&mut rd, session.msize(), &session.pool, &big).await
                {
                    Ok(Some(frame)) => frame,
                    other => {
                        submit(&session, &mut batch, &tx);
                        return other.map(|_| ());
                    }
                };
                let mut permit = Slot { _count: Some(permit), _big: big_slot };
                match wire::decode_request(frame) {
                    Err((tag, e)) => {
                        log::debug!("9p: bad request (tag {tag:?}): {e}");
                        match tag {
                            Some(tag) => {
                                let code = match e {
                                    WireError::UnknownType(_) => errno::ENOSYS,
                                    _ => errno::EINVAL,
                                };
                                send(&tx, rlerror(tag, code), permit);
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
                                send(&tx, reply, permit);
                                continue;
                            }
                        }
                        // A big reply (Rread, Rreaddir) needs a big slot too.
                        let reply_size = match &msg {
                            Tmessage::Read(r) => r.count as usize,
                            Tmessage::Readdir(r) => r.count as usize,
                            _ => 0,
                        };
                        if permit._big.is_none() && reply_size.min(session.msize() as usize) > BIG_FRAME {
                            submit(&session, &mut batch, &tx);
                            let Ok(p) = big.clone().acquire_owned().await else {
                                return Ok(());
                            };
                            permit._big = Some(p);
                        }
                        match msg {
                            Tmessage::Flush(f) => match permit._count.take() {
                                Some(count) => session.flush(tag, f.oldtag, count, &tx),
                                None => send(&tx, rflush(tag), permit),
                            },
                            Tmessage::Version(v) => {
                                send(&tx, session.version(tag, &v), permit);
                            }
                            // Alone (nothing else waiting) and about a local file: answer on
                            // this thread, saving two thread hand-offs per round trip.
                            msg @ (Tmessage::Walk(Twalk { fid, .. })
                            | Tmessage::Getattr(Tgetattr { fid, .. }))
                                if batch.is_empty()
                                    && !frame_buffered(rd.buffer())
                                    && session.may_inline(fid) =>
                            {
                                let reply = session.dispatch_inline(tag, msg);
                                send(&tx, reply, permit);
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
        // Reader first: the replies it queues in this poll are written in the same poll,
        // instead of after another turn of the runtime (an extra epoll_wait per request).
        biased;
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
            crate::task::spawn_thread(move || {
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

//! The host-directory backend: serves one directory of the local filesystem with the
//! credentials of the running process.
//!
//! A node is an `O_PATH | O_NOFOLLOW` descriptor of the file itself, opened relative to its
//! parent's descriptor one plain name at a time (so a walk can never leave the export nor
//! follow a symlink: `openat` relative to a symlink's descriptor fails with ENOTDIR). Opening
//! a node reopens that very file through `/proc/self/fd/N`; attributes, owners, times, sizes
//! and xattrs go through the descriptor (or its `/proc/self/fd` name, which reaches exactly
//! that inode, a symlink included). Only lookups by path (the attach name, a lexical `..`,
//! and fallbacks for a host without /proc) resolve several names: relative to the export
//! root's descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (or, before Linux
//! 5.6, one `openat(O_NOFOLLOW)` per component). A symlink is therefore only ever read
//! (readlink), never resolved here: the remote kernel resolves it in its own namespace.
//!
//! New objects get exactly the requested permission bits (created under the process umask,
//! then set through the new descriptor, so they are never wider than asked; under a default
//! ACL the kernel's own result is kept, as a local create would leave it), owned by the
//! attaching user and the requested group when this process may give files away (root), and
//! otherwise by us with the requested group where chown(2) allows it. Set-user-ID and
//! set-group-ID bits are never set on anything but a directory; device nodes are never made.
//! A write to or truncation of a file clears its set-user-ID bit (and set-group-ID with group
//! execute), as the kernel does for a writer without CAP_FSETID: as root we hold that
//! capability, and the remote could otherwise rewrite a set-user-ID program of the export.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, ResolveFlags, Stat, Timespec, Timestamps,
    XattrFlags,
};

use super::backend::{Attr, Backend, BackendFile, DirEntry, OpenFlags, Owner, SetAttr, SetTime, StatFs};
use super::locks::{HostHolder, HostLock, Kind as LockKind};

/// Largest extended attribute value or name list we move (Linux XATTR_SIZE_MAX).
pub const XATTR_MAX: usize = 65536;

/// A host directory exported over 9P.
#[derive(Debug)]
pub struct HostFs {
    root: Arc<OwnedFd>,
    root_path: PathBuf,
    /// Cleared when the kernel has no openat2 (ENOSYS); we then walk component by component.
    have_openat2: AtomicBool,
    /// We may give files away (chown to any user): new objects go to the attaching user.
    as_root: bool,
}

/// A handle on one file: an `O_PATH` descriptor, or the descriptor of the open file.
#[derive(Debug, Clone)]
pub struct HostNode {
    fd: Arc<OwnedFd>,
}

/// Permission bits the remote may set: set-user-ID and set-group-ID only on a directory,
/// where they carry no privilege on Linux (set-group-ID means "new entries inherit the
/// group"; set-user-ID is ignored), so `chmod 07777 dir` works as on a local file system.
pub fn allowed_mode(mode: u32, is_dir: bool) -> u32 {
    let keep = if is_dir { 0o7777 } else { 0o1777 };
    mode & keep
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A directory descriptor: the root (borrowed) or one we opened.
enum DirFd<'a> {
    Root(BorrowedFd<'a>),
    Owned(OwnedFd),
}

impl AsFd for DirFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            DirFd::Root(fd) => *fd,
            DirFd::Owned(fd) => fd.as_fd(),
        }
    }
}

fn io_err(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Retries a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(io_err),
        }
    }
}

/// Splits a checked relative path into its directory and last name; the root is `("", ".")`.
fn split(path: &Path) -> (&Path, &OsStr) {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => (parent, name),
        _ => (Path::new(""), OsStr::new(".")),
    }
}

// The stat field types differ between architectures; the casts are needed on some.
#[allow(clippy::unnecessary_cast)]
fn stat_to_attr(st: &Stat) -> Attr {
    Attr {
        dev: st.st_dev,
        ino: st.st_ino,
        mode: st.st_mode,
        uid: st.st_uid,
        gid: st.st_gid,
        nlink: st.st_nlink as u64,
        rdev: st.st_rdev,
        size: st.st_size as u64,
        blksize: st.st_blksize as u64,
        blocks: st.st_blocks as u64,
        atime: wire_time(st.st_atime as i64, st.st_atime_nsec as i64),
        mtime: wire_time(st.st_mtime as i64, st.st_mtime_nsec as i64),
        ctime: wire_time(st.st_ctime as i64, st.st_ctime_nsec as i64),
    }
}

fn oflags(flags: OpenFlags) -> OFlags {
    let mut o = match (flags.read, flags.write) {
        (true, true) => OFlags::RDWR,
        (false, true) => OFlags::WRONLY,
        _ => OFlags::RDONLY,
    };
    // Never follow a symlink, never acquire a controlling terminal, never leak into children.
    o |= OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY;
    for (on, bit) in [
        (flags.truncate, OFlags::TRUNC),
        (flags.append, OFlags::APPEND),
        (flags.exclusive, OFlags::EXCL),
        (flags.directory, OFlags::DIRECTORY),
        (flags.sync, OFlags::SYNC),
        (flags.dsync, OFlags::DSYNC),
        (flags.nonblock, OFlags::NONBLOCK),
    ] {
        if on {
            o |= bit;
        }
    }
    o
}

/// Linux DT_* value for a file type.
pub fn dtype_of(ft: FileType) -> u8 {
    match ft {
        FileType::Fifo => 1,
        FileType::CharacterDevice => 2,
        FileType::Directory => 4,
        FileType::BlockDevice => 6,
        FileType::RegularFile => 8,
        FileType::Symlink => 10,
        FileType::Socket => 12,
        _ => 0,
    }
}

/// A host time as Rgetattr carries it: the seconds' two's-complement bits (before 1970 is
/// negative), nanoseconds as they are (the kernel keeps them within 0..1e9).
fn wire_time(sec: i64, nsec: i64) -> (u64, u64) {
    (u64::from_ne_bytes(sec.to_ne_bytes()), nsec.clamp(0, 999_999_999) as u64)
}

fn set_time(t: SetTime) -> Timespec {
    match t {
        SetTime::Omit => Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_OMIT },
        SetTime::Now => Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_NOW },
        // Below one second (the server checks), so it fits any platform's tv_nsec (i64, or
        // a 32-bit c_long).
        SetTime::At(s, ns) => Timespec { tv_sec: s, tv_nsec: ns as _ },
    }
}

/// The path through /proc that names exactly the file behind `fd`.
fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // A formatted integer never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Reads a variable-size value with a size query first, retrying if it grew meanwhile.
fn read_sized(
    query: impl Fn() -> rustix::io::Result<usize>,
    fetch: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    for _ in 0..4 {
        let need = retry(&query)?;
        if need == 0 {
            return Ok(Vec::new());
        }
        if need > XATTR_MAX {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        let mut buf = vec![0u8; need];
        match retry(|| fetch(&mut buf)) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

impl HostFs {
    /// Exports `root` (which must be a directory; a symlink given here is followed once).
    pub fn new(root: &Path) -> io::Result<HostFs> {
        let fd =
            retry(|| rfs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()))?;
        Ok(HostFs {
            root: Arc::new(fd),
            root_path: root.to_path_buf(),
            have_openat2: AtomicBool::new(true),
            as_root: rustix::process::geteuid().is_root(),
        })
    }

    /// The exported directory as given.
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// Opens directory `dir` (relative, checked) without following any symlink.
    fn dir(&self, dir: &Path) -> io::Result<DirFd<'_>> {
        if dir.as_os_str().is_empty() {
            return Ok(DirFd::Root(self.root.as_fd()));
        }
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if self.have_openat2.load(Ordering::Relaxed) {
            let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
            match retry(|| rfs::openat2(&*self.root, dir, flags, Mode::empty(), resolve)) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    self.have_openat2.store(false, Ordering::Relaxed);
                }
                // EAGAIN: a concurrent rename raced the lookup; the slow path below is exact.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                other => return other.map(DirFd::Owned),
            }
        }
        let mut cur = DirFd::Root(self.root.as_fd());
        for comp in dir.components() {
            let name = comp.as_os_str();
            let next = retry(|| rfs::openat(&cur, name, flags, Mode::empty()))?;
            cur = DirFd::Owned(next);
        }
        Ok(cur)
    }

    /// Gives a new object in `dir` to `owner` (when we may) and exactly `mode` (no umask),
    /// through its own descriptor. Returns its attributes.
    fn adopt(
        &self,
        dir: BorrowedFd<'_>,
        fd: BorrowedFd<'_>,
        mode: Option<u32>,
        owner: Owner,
    ) -> io::Result<Attr> {
        let st = retry(|| rfs::fstat(fd))?;
        if self.as_root {
            if st.st_uid != owner.uid || st.st_gid != owner.gid {
                let (uid, gid) = (rfs::Uid::from_raw(owner.uid), rfs::Gid::from_raw(owner.gid));
                retry(|| rfs::chownat(fd, c"", Some(uid), Some(gid), AtFlags::EMPTY_PATH))?;
            }
        } else if st.st_gid != owner.gid {
            // A group we are not in: keep the one the host gave, as a local fs would.
            let gid = rfs::Gid::from_raw(owner.gid);
            match retry(|| rfs::chownat(fd, c"", None, Some(gid), AtFlags::EMPTY_PATH)) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                other => other?,
            }
        }
        if let Some(mode) = mode {
            let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
            let want = allowed_mode(mode, is_dir);
            // chown may have cleared set-group-ID, and the umask narrowed the rest. Under a
            // default ACL the kernel applied no umask: the mode and the inherited ACL (its
            // mask narrowed by the mode) are already what a local create gives, and a chmod
            // would widen that mask to the mode's group bits.
            let st = retry(|| rfs::fstat(fd))?;
            if st.st_mode & 0o7777 != want && !has_default_acl(dir) {
                chmod_fd(fd, want)?;
            }
        }
        retry(|| rfs::fstat(fd)).map(|s| stat_to_attr(&s))
    }

    /// The just-made entry `name` of `dir` as an O_PATH descriptor.
    fn entry(dir: &HostNode, name: &OsStr) -> io::Result<OwnedFd> {
        retry(|| {
            rfs::openat(&*dir.fd, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        })
    }
}

/// Runs `f` on the `/proc/self/fd` name of `fd`, which reaches exactly that inode (a symlink
/// included: the magic link lands on it and does not follow it).
fn via_proc<T>(fd: BorrowedFd<'_>, f: impl Fn(&CString) -> rustix::io::Result<T>) -> io::Result<T> {
    let p = proc_fd_path(fd);
    match retry(|| f(&p)) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !Path::new("/proc/self/fd").exists() => {
            // Refuse rather than guess a name: the host has no /proc mounted.
            Err(errno(libc::EOPNOTSUPP))
        }
        other => other,
    }
}

/// chmod through a descriptor: fchmod when it is an open file, its /proc name for O_PATH.
fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let mode = Mode::from_raw_mode(mode);
    match retry(|| rfs::fchmod(fd, mode)) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => via_proc(fd, |p| rfs::chmod(p.as_c_str(), mode)),
        other => other,
    }
}

/// Clears set-user-ID, and set-group-ID with group execute, on a regular file about to be
/// written or just truncated (the kernel's file_remove_privs for writers without
/// CAP_FSETID; set-group-ID without group execute is no privilege and stays). EPERM (not
/// our file) is fine: then we lack CAP_FSETID too and the kernel clears them itself.
fn drop_set_id(fd: BorrowedFd<'_>) -> io::Result<()> {
    let st = retry(|| rfs::fstat(fd))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Ok(());
    }
    let mode = st.st_mode & 0o7777;
    let mut clear = mode & 0o4000;
    if mode & 0o2010 == 0o2010 {
        clear |= 0o2000;
    }
    if clear == 0 {
        return Ok(());
    }
    match chmod_fd(fd, mode & !clear) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        other => other,
    }
}

/// Whether directory `dir` carries a default ACL (new entries inherit it instead of getting
/// the umask). An error reading it counts as no.
fn has_default_acl(dir: BorrowedFd<'_>) -> bool {
    via_proc(dir, |p| rfs::getxattr_query(p.as_c_str(), c"system.posix_acl_default")).is_ok_and(|n| n > 0)
}

/// Links the inode behind `fd` as `dir/name` through its /proc/self/fd name (no privilege
/// needed, unlike AT_EMPTY_PATH before Linux 6.10); a symlink is linked itself.
fn link_by_proc(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    via_proc(fd, |p| rfs::linkat(rfs::CWD, p.as_c_str(), dir, name, AtFlags::SYMLINK_FOLLOW))
}

fn is_symlink(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = retry(|| rfs::fstat(fd))?;
    Ok(FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
}

fn errno_of(e: io::Error) -> rustix::io::Errno {
    rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Backend for HostFs {
    type Node = HostNode;
    type File = HostFile;

    fn lookup(&self, path: &Path) -> io::Result<HostNode> {
        if path.as_os_str().is_empty() {
            return Ok(HostNode { fd: self.root.clone() });
        }
        let (dir, name) = split(path);
        let d = self.dir(dir)?;
        let fd = retry(|| {
            rfs::openat(&d, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        })?;
        Ok(HostNode { fd: Arc::new(fd) })
    }

    fn walk(&self, dir: &HostNode, name: &OsStr) -> io::Result<HostNode> {
        Ok(HostNode { fd: Arc::new(Self::entry(dir, name)?) })
    }

    fn stat(&self, node: &HostNode) -> io::Result<Attr> {
        retry(|| rfs::fstat(&*node.fd)).map(|s| stat_to_attr(&s))
    }

    fn open(&self, node: &HostNode, path: &Path, flags: OpenFlags) -> io::Result<HostFile> {
        // Reopen the inode itself. NOFOLLOW would refuse the magic link; the node is known
        // not to be a symlink (the server checks), so nothing is followed.
        let o = oflags(flags) & !OFlags::NOFOLLOW;
        let p = proc_fd_path(node.fd.as_fd());
        let fd = match retry(|| rfs::open(p.as_c_str(), o, Mode::empty())) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !Path::new("/proc/self/fd").exists() => {
                // No /proc: open by name (the node's name may have moved since the walk).
                let (dir, name) = split(path);
                let d = self.dir(dir)?;
                retry(|| rfs::openat(&d, name, oflags(flags), Mode::empty()))?
            }
            other => other?,
        };
        if flags.truncate && flags.write {
            drop_set_id(fd.as_fd())?;
        }
        Ok(HostFile::new(fd))
    }

    fn file_node(&self, file: &HostFile) -> HostNode {
        HostNode { fd: file.fd.clone() }
    }

    fn create(
        &self,
        dir: &HostNode,
        name: &OsStr,
        flags: OpenFlags,
        mode: u32,
        owner: Owner,
    ) -> io::Result<HostFile> {
        let perm = Mode::from_raw_mode(allowed_mode(mode, false));
        let o = oflags(flags);
        // O_EXCL first so we know whether we made the file (only then do owner and mode
        // change); an existing file is opened as it is unless the remote asked for O_EXCL.
        for _ in 0..8 {
            match retry(|| rfs::openat(&*dir.fd, name, o | OFlags::CREATE | OFlags::EXCL, perm)) {
                Ok(fd) => {
                    self.adopt(dir.fd.as_fd(), fd.as_fd(), Some(mode), owner)?;
                    return Ok(HostFile::new(fd));
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && !flags.exclusive => {
                    match retry(|| rfs::openat(&*dir.fd, name, o, Mode::empty())) {
                        // Removed in between: try creating again.
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                        Ok(fd) => {
                            if flags.truncate && flags.write {
                                drop_set_id(fd.as_fd())?;
                            }
                            return Ok(HostFile::new(fd));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(errno(libc::EAGAIN))
    }

    fn mkdir(&self, dir: &HostNode, name: &OsStr, mode: u32, owner: Owner) -> io::Result<Attr> {
        retry(|| rfs::mkdirat(&*dir.fd, name, Mode::from_raw_mode(allowed_mode(mode, true))))?;
        let fd = Self::entry(dir, name)?;
        self.adopt(dir.fd.as_fd(), fd.as_fd(), Some(mode), owner)
    }

    fn symlink(&self, dir: &HostNode, name: &OsStr, target: &OsStr, owner: Owner) -> io::Result<Attr> {
        retry(|| rfs::symlinkat(target, &*dir.fd, name))?;
        let fd = Self::entry(dir, name)?;
        self.adopt(dir.fd.as_fd(), fd.as_fd(), None, owner)
    }

    fn mknod(&self, dir: &HostNode, name: &OsStr, mode: u32, rdev: u64, owner: Owner) -> io::Result<Attr> {
        let ft = FileType::from_raw_mode(mode);
        if !matches!(ft, FileType::Fifo | FileType::Socket | FileType::RegularFile) {
            // Character and block devices would hand the remote the client's hardware.
            return Err(errno(libc::EPERM));
        }
        let perm = Mode::from_raw_mode(allowed_mode(mode, false));
        retry(|| rfs::mknodat(&*dir.fd, name, ft, perm, rdev))?;
        let fd = Self::entry(dir, name)?;
        self.adopt(dir.fd.as_fd(), fd.as_fd(), Some(mode), owner)
    }

    fn link(&self, target: &HostNode, target_path: &Path, dir: &HostNode, name: &OsStr) -> io::Result<()> {
        // linkat(AT_EMPTY_PATH) links the very inode (a symlink itself, never what it points
        // to) but needs CAP_DAC_READ_SEARCH; without it the kernel says ENOENT. Then the
        // inode's /proc/self/fd name with AT_SYMLINK_FOLLOW: following that magic link lands
        // on the inode itself (for a symlink: the link, not its target), the documented way
        // to link an O_TMPFILE. Only without /proc do we link by name (never following).
        match retry(|| rfs::linkat(&*target.fd, c"", &*dir.fd, name, AtFlags::EMPTY_PATH)) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EPERM)) => {
                match link_by_proc(target.fd.as_fd(), dir.fd.as_fd(), name) {
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                        let (tdir, tname) = split(target_path);
                        let td = self.dir(tdir)?;
                        retry(|| rfs::linkat(&td, tname, &*dir.fd, name, AtFlags::empty()))
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    fn rename(&self, from_dir: &HostNode, from: &OsStr, to_dir: &HostNode, to: &OsStr) -> io::Result<()> {
        retry(|| rfs::renameat(&*from_dir.fd, from, &*to_dir.fd, to))
    }

    fn unlink(&self, dir: &HostNode, name: &OsStr, is_dir: bool) -> io::Result<()> {
        let flags = if is_dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
        retry(|| rfs::unlinkat(&*dir.fd, name, flags))
    }

    fn readlink(&self, node: &HostNode) -> io::Result<Vec<u8>> {
        retry(|| rfs::readlinkat(&*node.fd, c"", Vec::new())).map(|c| c.into_bytes())
    }

    fn setattr(&self, node: &HostNode, attr: &SetAttr) -> io::Result<()> {
        let fd = node.fd.as_fd();
        // chown first: it clears set-id bits that a following chmod may set again.
        if attr.uid.is_some() || attr.gid.is_some() {
            let uid = attr.uid.map(rfs::Uid::from_raw);
            let gid = attr.gid.map(rfs::Gid::from_raw);
            retry(|| rfs::chownat(fd, c"", uid, gid, AtFlags::EMPTY_PATH))?;
        }
        if let Some(mode) = attr.mode {
            let st = retry(|| rfs::fstat(fd))?;
            let ft = FileType::from_raw_mode(st.st_mode);
            if ft == FileType::Symlink {
                return Err(errno(libc::EOPNOTSUPP));
            }
            let mode = mode & 0o7777;
            if allowed_mode(mode, ft == FileType::Directory) != mode {
                return Err(errno(libc::EPERM));
            }
            chmod_fd(fd, mode)?;
        }
        if let Some(size) = attr.size {
            match retry(|| rfs::ftruncate(fd, size)) {
                // An O_PATH node or a file open for reading: truncate the inode through a
                // descriptor opened for writing (permission checked as for truncate(2)).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF) | Some(libc::EINVAL)) => {
                    if is_symlink(fd)? {
                        return Err(errno(libc::EINVAL));
                    }
                    let o = OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
                    let w = via_proc(fd, |p| rfs::open(p.as_c_str(), o, Mode::empty()))?;
                    retry(|| rfs::ftruncate(&w, size))?;
                }
                other => other?,
            }
            drop_set_id(fd)?;
        }
        if attr.atime != SetTime::Omit || attr.mtime != SetTime::Omit {
            let times =
                Timestamps { last_access: set_time(attr.atime), last_modification: set_time(attr.mtime) };
            via_proc(fd, |p| rfs::utimensat(rfs::CWD, p.as_c_str(), &times, AtFlags::empty()))?;
        }
        Ok(())
    }

    // The statfs field types differ between architectures; the casts are needed on some.
    #[allow(clippy::unnecessary_cast)]
    fn statfs(&self, node: &HostNode) -> io::Result<StatFs> {
        let s = retry(|| rfs::fstatfs(&*node.fd))?;
        // SAFETY: fsid_t is two plain ints; reading its bytes is always valid.
        let fsid_words: [i32; 2] = unsafe { std::mem::transmute(s.f_fsid) };
        let fsid = (fsid_words[0] as u32 as u64) | ((fsid_words[1] as u32 as u64) << 32);
        Ok(StatFs {
            fs_type: s.f_type as u32,
            bsize: s.f_bsize as u32,
            blocks: s.f_blocks as u64,
            bfree: s.f_bfree as u64,
            bavail: s.f_bavail as u64,
            files: s.f_files as u64,
            ffree: s.f_ffree as u64,
            fsid,
            namelen: s.f_namelen as u32,
        })
    }

    fn get_xattr(&self, node: &HostNode, name: &OsStr) -> io::Result<Vec<u8>> {
        let fd = node.fd.as_fd();
        if is_symlink(fd)? {
            return Err(errno(libc::ENODATA));
        }
        via_proc(fd, |p| {
            read_sized(
                || rfs::getxattr_query(p.as_c_str(), name),
                |buf| rfs::getxattr(p.as_c_str(), name, buf),
            )
            .map_err(errno_of)
        })
    }

    fn list_xattr(&self, node: &HostNode) -> io::Result<Vec<u8>> {
        let fd = node.fd.as_fd();
        if is_symlink(fd)? {
            return Ok(Vec::new());
        }
        via_proc(fd, |p| {
            read_sized(|| rfs::listxattr_query(p.as_c_str()), |buf| rfs::listxattr(p.as_c_str(), buf))
                .map_err(errno_of)
        })
    }

    fn set_xattr(&self, node: &HostNode, name: &OsStr, value: &[u8], flags: u32) -> io::Result<()> {
        let fd = node.fd.as_fd();
        if is_symlink(fd)? {
            return Err(errno(libc::EPERM));
        }
        let flags = XattrFlags::from_bits_retain(flags & 3);
        via_proc(fd, |p| rfs::setxattr(p.as_c_str(), name, value, flags))
    }

    fn remove_xattr(&self, node: &HostNode, name: &OsStr) -> io::Result<()> {
        let fd = node.fd.as_fd();
        if is_symlink(fd)? {
            return Err(errno(libc::ENODATA));
        }
        via_proc(fd, |p| rfs::removexattr(p.as_c_str(), name))
    }
}

/// An open host file or directory.
#[derive(Debug)]
pub struct HostFile {
    fd: Arc<OwnedFd>,
    /// Serializes seek+getdents on a directory.
    dir_cursor: Mutex<()>,
    /// Set-id bits were cleared before the first write through this file.
    set_id_dropped: AtomicBool,
}

impl HostFile {
    fn new(fd: OwnedFd) -> Self {
        HostFile { fd: Arc::new(fd), dir_cursor: Mutex::new(()), set_id_dropped: AtomicBool::new(false) }
    }
}

impl BackendFile for HostFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        retry(|| rustix::io::pread(&*self.fd, &mut *buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if !self.set_id_dropped.load(Ordering::Relaxed) {
            drop_set_id(self.fd.as_fd())?;
            self.set_id_dropped.store(true, Ordering::Relaxed);
        }
        retry(|| rustix::io::pwrite(&*self.fd, buf, offset))
    }

    fn stat(&self) -> io::Result<Attr> {
        retry(|| rfs::fstat(&*self.fd)).map(|s| stat_to_attr(&s))
    }

    fn readdir(&self, offset: u64, sink: &mut dyn FnMut(DirEntry<'_>) -> bool) -> io::Result<()> {
        let _cursor = self.dir_cursor.lock().unwrap_or_else(|p| p.into_inner());
        retry(|| rfs::seek(&*self.fd, rfs::SeekFrom::Start(offset)))?;
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 32 * 1024];
        let mut dir = RawDir::new(&*self.fd, &mut buf);
        while let Some(entry) = dir.next() {
            let entry = entry.map_err(io_err)?;
            let e = DirEntry {
                name: entry.file_name().to_bytes(),
                ino: entry.ino(),
                dtype: dtype_of(entry.file_type()),
                next_offset: entry.next_entry_cookie(),
            };
            if !sink(e) {
                break;
            }
        }
        Ok(())
    }

    fn fsync(&self, datasync: bool) -> io::Result<()> {
        if datasync {
            retry(|| rfs::fdatasync(&*self.fd))
        } else {
            retry(|| rfs::fsync(&*self.fd))
        }
    }

    fn host_lock(&self) -> io::Result<Option<Box<dyn HostLock>>> {
        let fd = retry(|| rustix::io::fcntl_dupfd_cloexec(&*self.fd, 0))?;
        Ok(Some(Box::new(OfdLock { fd })))
    }
}

/// The session's locks on one host file: open-file-description locks (F_OFD_SETLK) on a
/// duplicate of the descriptor the first lock came through. They belong to that open file,
/// not to this process, so they conflict with every other process's locks and every other
/// session's, and the clunk of the fid it came from does not release them (the duplicate
/// keeps the description open).
struct OfdLock {
    fd: OwnedFd,
}

/// A `struct flock` for `start..=end` (`u64::MAX` = to the end of any file), or None when the
/// range starts beyond the largest file offset (no byte there can be locked).
fn flock_of(kind: Option<LockKind>, start: u64, end: u64) -> Option<libc::flock> {
    let l_start = i64::try_from(start).ok()?;
    // A length that reaches OFFSET_MAX is the same lock as "to the end" (length 0).
    let l_len = if end >= i64::MAX as u64 { 0 } else { (end - start + 1) as i64 };
    // SAFETY: flock is plain integers, for which all-zero is valid (and l_pid must be 0 for
    // the OFD commands).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match kind {
        None => libc::F_UNLCK,
        Some(LockKind::Read) => libc::F_RDLCK,
        Some(LockKind::Write) => libc::F_WRLCK,
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = l_start as libc::off_t;
    fl.l_len = l_len as libc::off_t;
    Some(fl)
}

impl OfdLock {
    fn fcntl(&self, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
        retry(|| {
            // SAFETY: `fd` is open for the call's length and `fl` is a valid, exclusively
            // borrowed struct flock, which F_OFD_SETLK reads and F_OFD_GETLK writes.
            let r = unsafe { libc::fcntl(self.fd.as_raw_fd(), cmd, &mut *fl as *mut libc::flock) };
            match r {
                -1 => Err(rustix::io::Errno::from_raw_os_error(
                    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
                )),
                _ => Ok(()),
            }
        })
    }
}

impl HostLock for OfdLock {
    fn set(&self, kind: Option<LockKind>, start: u64, end: u64) -> io::Result<bool> {
        let Some(mut fl) = flock_of(kind, start, end) else { return Ok(true) };
        match self.fcntl(libc::F_OFD_SETLK, &mut fl) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn conflict(&self, kind: LockKind, start: u64, end: u64) -> io::Result<Option<HostHolder>> {
        let Some(mut fl) = flock_of(Some(kind), start, end) else { return Ok(None) };
        self.fcntl(libc::F_OFD_GETLK, &mut fl)?;
        let kind = match fl.l_type as libc::c_int {
            libc::F_RDLCK => LockKind::Read,
            libc::F_WRLCK => LockKind::Write,
            _ => return Ok(None),
        };
        let start = fl.l_start.max(0) as u64;
        let end = if fl.l_len <= 0 { u64::MAX } else { start.saturating_add(fl.l_len as u64 - 1) };
        Ok(Some(HostHolder { kind, start, end }))
    }
}

impl Drop for OfdLock {
    fn drop(&mut self) {
        // The description may outlive this descriptor (the fid it came from can still be
        // open, or a request still running holds it): let go of everything explicitly.
        if let Some(mut fl) = flock_of(None, 0, u64::MAX) {
            let _ = self.fcntl(libc::F_OFD_SETLK, &mut fl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_proc_fallback_links_a_symlink_itself() {
        let dir = std::env::temp_dir().join(format!("ninep-hostfs-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).expect("scratch dir");
        std::fs::write(dir.join("target"), b"t").expect("target");
        std::os::unix::fs::symlink("target", dir.join("s")).expect("symlink");
        let o = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let link = rfs::open(dir.join("s"), o, Mode::empty()).expect("O_PATH of the symlink");
        let d =
            rfs::open(&dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).expect("dir");
        link_by_proc(link.as_fd(), d.as_fd(), OsStr::new("hard")).expect("link");
        let (s, hard) = (dir.join("s").symlink_metadata(), dir.join("hard").symlink_metadata());
        let (s, hard) = (s.expect("s"), hard.expect("hard"));
        let target_links = std::fs::metadata(dir.join("target")).map(|m| m.nlink());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(hard.file_type().is_symlink());
        assert_eq!((hard.ino(), hard.nlink()), (s.ino(), 2));
        assert_eq!(target_links.ok(), Some(1));
    }
}

//! The host-directory backend: serves one directory of the local filesystem with the
//! credentials of the running process.
//!
//! Confinement: every path is resolved relative to an `O_PATH` descriptor of the export
//! root, with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` for the directories on the
//! way (or, on kernels before 5.6, one `openat(O_NOFOLLOW)` per component), and the last
//! component is always used through `*at()` calls that do not follow symlinks. A symlink is
//! therefore only ever read (readlink), never resolved here: the remote kernel resolves it
//! in its own namespace.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, RawDir, ResolveFlags, Stat, Timespec, Timestamps,
    XattrFlags,
};

use super::backend::{
    Attr, Backend, BackendFile, DirEntry, LockConflict, LockOutcome, LockRange, LockType, OpenFlags, SetAttr,
    SetTime, StatFs,
};

/// Largest extended attribute value or name list we move (Linux XATTR_SIZE_MAX).
pub const XATTR_MAX: usize = 65536;

/// A host directory exported over 9P.
#[derive(Debug)]
pub struct HostFs {
    root: OwnedFd,
    root_path: PathBuf,
    /// Cleared when the kernel has no openat2 (ENOSYS); we then walk component by component.
    have_openat2: AtomicBool,
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
        atime: (st.st_atime as u64, st.st_atime_nsec as u64),
        mtime: (st.st_mtime as u64, st.st_mtime_nsec as u64),
        ctime: (st.st_ctime as u64, st.st_ctime_nsec as u64),
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

fn set_time(t: SetTime) -> Timespec {
    match t {
        SetTime::Omit => Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_OMIT },
        SetTime::Now => Timespec { tv_sec: 0, tv_nsec: rfs::UTIME_NOW },
        SetTime::At(s, ns) => Timespec { tv_sec: s as i64, tv_nsec: ns as _ },
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
        Ok(HostFs { root: fd, root_path: root.to_path_buf(), have_openat2: AtomicBool::new(true) })
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
            match retry(|| rfs::openat2(&self.root, dir, flags, Mode::empty(), resolve)) {
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

    /// An O_PATH descriptor of the file itself (a symlink stays a symlink).
    fn node(&self, path: &Path) -> io::Result<OwnedFd> {
        let (dir, name) = split(path);
        let d = self.dir(dir)?;
        retry(|| rfs::openat(&d, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()))
    }

    /// Runs an xattr call on the file at `path` through its /proc/self/fd name, so the call
    /// reaches exactly the file we resolved (no symlink followed, no read permission needed).
    fn with_xattr_path<T>(
        &self,
        path: &Path,
        on_symlink: impl FnOnce() -> io::Result<T>,
        f: impl Fn(&CString) -> rustix::io::Result<T>,
    ) -> io::Result<T> {
        let node = self.node(path)?;
        let st = retry(|| rfs::fstat(&node))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
            return on_symlink();
        }
        let p = proc_fd_path(node.as_fd());
        match retry(|| f(&p)) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !Path::new("/proc/self").exists() => {
                // No /proc mounted: fall back to the plain path. The last component was just
                // checked not to be a symlink; directories on the way are not re-checked.
                let real = self.root_path.join(path);
                let c = CString::new(real.as_os_str().as_bytes())
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                retry(|| f(&c))
            }
            other => other,
        }
    }
}

impl Backend for HostFs {
    type File = HostFile;

    fn lstat(&self, path: &Path) -> io::Result<Attr> {
        let (dir, name) = split(path);
        let d = self.dir(dir)?;
        retry(|| rfs::statat(&d, name, AtFlags::SYMLINK_NOFOLLOW)).map(|s| stat_to_attr(&s))
    }

    fn open(&self, path: &Path, flags: OpenFlags) -> io::Result<HostFile> {
        let (dir, name) = split(path);
        let d = self.dir(dir)?;
        let fd = retry(|| rfs::openat(&d, name, oflags(flags), Mode::empty()))?;
        Ok(HostFile::new(fd))
    }

    fn create(&self, dir: &Path, name: &OsStr, flags: OpenFlags, mode: u32) -> io::Result<HostFile> {
        let d = self.dir(dir)?;
        let o = oflags(flags) | OFlags::CREATE;
        let fd = retry(|| rfs::openat(&d, name, o, Mode::from_raw_mode(mode & 0o7777)))?;
        Ok(HostFile::new(fd))
    }

    fn mkdir(&self, dir: &Path, name: &OsStr, mode: u32) -> io::Result<()> {
        let d = self.dir(dir)?;
        retry(|| rfs::mkdirat(&d, name, Mode::from_raw_mode(mode & 0o7777)))
    }

    fn symlink(&self, dir: &Path, name: &OsStr, target: &OsStr) -> io::Result<()> {
        let d = self.dir(dir)?;
        retry(|| rfs::symlinkat(target, &d, name))
    }

    fn mknod(&self, dir: &Path, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
        let d = self.dir(dir)?;
        let ft = FileType::from_raw_mode(mode);
        retry(|| rfs::mknodat(&d, name, ft, Mode::from_raw_mode(mode & 0o7777), rdev))
    }

    fn link(&self, target: &Path, dir: &Path, name: &OsStr) -> io::Result<()> {
        let (tdir, tname) = split(target);
        let td = self.dir(tdir)?;
        let d = self.dir(dir)?;
        retry(|| rfs::linkat(&td, tname, &d, name, AtFlags::empty()))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (fdir, fname) = split(from);
        let (tdir, tname) = split(to);
        let fd = self.dir(fdir)?;
        let td = self.dir(tdir)?;
        retry(|| rfs::renameat(&fd, fname, &td, tname))
    }

    fn unlink(&self, path: &Path, dir: bool) -> io::Result<()> {
        let (pdir, name) = split(path);
        let d = self.dir(pdir)?;
        let flags = if dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
        retry(|| rfs::unlinkat(&d, name, flags))
    }

    fn readlink(&self, path: &Path) -> io::Result<Vec<u8>> {
        let (dir, name) = split(path);
        let d = self.dir(dir)?;
        retry(|| rfs::readlinkat(&d, name, Vec::new())).map(|c| c.into_bytes())
    }

    fn setattr(&self, path: &Path, file: Option<&HostFile>, attr: &SetAttr) -> io::Result<()> {
        let (dir, name) = split(path);
        let d = self.dir(dir)?;
        // chown first: it clears set-id bits that a following chmod may set again.
        if attr.uid.is_some() || attr.gid.is_some() {
            let uid = attr.uid.map(rfs::Uid::from_raw);
            let gid = attr.gid.map(rfs::Gid::from_raw);
            retry(|| rfs::chownat(&d, name, uid, gid, AtFlags::SYMLINK_NOFOLLOW))?;
        }
        if let Some(mode) = attr.mode {
            let mode = Mode::from_raw_mode(mode & 0o7777);
            let via_file = file.map(|f| retry(|| rfs::fchmod(&f.fd, mode)));
            match via_file {
                Some(Ok(())) => {}
                _ => {
                    let node = retry(|| {
                        rfs::openat(
                            &d,
                            name,
                            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                    })?;
                    let st = retry(|| rfs::fstat(&node))?;
                    if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
                    }
                    match retry(|| rfs::chmod(proc_fd_path(node.as_fd()).as_c_str(), mode)) {
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            retry(|| rfs::chmodat(&d, name, mode, AtFlags::empty()))?
                        }
                        other => other?,
                    }
                }
            }
        }
        if let Some(size) = attr.size {
            let via_file = file.map(|f| retry(|| rfs::ftruncate(&f.fd, size)));
            match via_file {
                Some(Ok(())) => {}
                _ => {
                    let o = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
                    let fd = retry(|| rfs::openat(&d, name, o, Mode::empty()))?;
                    retry(|| rfs::ftruncate(&fd, size))?;
                }
            }
        }
        if attr.atime != SetTime::Omit || attr.mtime != SetTime::Omit {
            let times =
                Timestamps { last_access: set_time(attr.atime), last_modification: set_time(attr.mtime) };
            retry(|| rfs::utimensat(&d, name, &times, AtFlags::SYMLINK_NOFOLLOW))?;
        }
        Ok(())
    }

    // The statfs field types differ between architectures; the casts are needed on some.
    #[allow(clippy::unnecessary_cast)]
    fn statfs(&self, path: &Path) -> io::Result<StatFs> {
        let node = self.node(path)?;
        let s = retry(|| rfs::fstatfs(&node))?;
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

    fn get_xattr(&self, path: &Path, name: &OsStr) -> io::Result<Vec<u8>> {
        self.with_xattr_path(
            path,
            || Err(io::Error::from_raw_os_error(libc::ENODATA)),
            |p| {
                read_sized(
                    || rfs::getxattr_query(p.as_c_str(), name),
                    |buf| rfs::getxattr(p.as_c_str(), name, buf),
                )
                .map_err(|e| rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))
            },
        )
    }

    fn list_xattr(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.with_xattr_path(
            path,
            || Ok(Vec::new()),
            |p| {
                read_sized(|| rfs::listxattr_query(p.as_c_str()), |buf| rfs::listxattr(p.as_c_str(), buf))
                    .map_err(|e| rustix::io::Errno::from_raw_os_error(e.raw_os_error().unwrap_or(libc::EIO)))
            },
        )
    }

    fn set_xattr(&self, path: &Path, name: &OsStr, value: &[u8], flags: u32) -> io::Result<()> {
        let flags = XattrFlags::from_bits_retain(flags & 3);
        self.with_xattr_path(
            path,
            || Err(io::Error::from_raw_os_error(libc::EPERM)),
            |p| rfs::setxattr(p.as_c_str(), name, value, flags),
        )
    }

    fn remove_xattr(&self, path: &Path, name: &OsStr) -> io::Result<()> {
        self.with_xattr_path(
            path,
            || Err(io::Error::from_raw_os_error(libc::ENODATA)),
            |p| rfs::removexattr(p.as_c_str(), name),
        )
    }
}

/// An open host file or directory.
#[derive(Debug)]
pub struct HostFile {
    fd: OwnedFd,
    /// Serializes seek+getdents on a directory.
    dir_cursor: Mutex<()>,
}

impl HostFile {
    fn new(fd: OwnedFd) -> Self {
        HostFile { fd, dir_cursor: Mutex::new(()) }
    }

    fn flock(&self, cmd: libc::c_int, kind: LockType, range: LockRange) -> io::Result<libc::flock> {
        let start = i64::try_from(range.start).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = i64::try_from(range.length).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: flock is a plain C struct; all-zero is a valid value.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = match kind {
            LockType::Read => libc::F_RDLCK,
            LockType::Write => libc::F_WRLCK,
            LockType::Unlock => libc::F_UNLCK,
        } as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = start;
        fl.l_len = len;
        loop {
            // SAFETY: the fd is open for the life of self and fl is a valid flock.
            let r = unsafe { libc::fcntl(self.fd.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
            if r == 0 {
                return Ok(fl);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}

impl BackendFile for HostFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        retry(|| rustix::io::pread(&self.fd, &mut *buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        retry(|| rustix::io::pwrite(&self.fd, buf, offset))
    }

    fn stat(&self) -> io::Result<Attr> {
        retry(|| rfs::fstat(&self.fd)).map(|s| stat_to_attr(&s))
    }

    fn readdir(&self, offset: u64, sink: &mut dyn FnMut(DirEntry<'_>) -> bool) -> io::Result<()> {
        let _cursor = self.dir_cursor.lock().unwrap_or_else(|p| p.into_inner());
        retry(|| rfs::seek(&self.fd, rfs::SeekFrom::Start(offset)))?;
        let mut buf = vec![MaybeUninit::<u8>::uninit(); 32 * 1024];
        let mut dir = RawDir::new(&self.fd, &mut buf);
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
            retry(|| rfs::fdatasync(&self.fd))
        } else {
            retry(|| rfs::fsync(&self.fd))
        }
    }

    fn lock(&self, kind: LockType, range: LockRange) -> io::Result<LockOutcome> {
        // Open-file-description locks: owned by this open file (one per fid), so two fids
        // conflict as two processes would, and closing one fid drops only its locks.
        match self.flock(libc::F_OFD_SETLK, kind, range) {
            Ok(_) => Ok(LockOutcome::Granted),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                Ok(LockOutcome::Blocked)
            }
            Err(e) => Err(e),
        }
    }

    fn get_lock(&self, kind: LockType, range: LockRange) -> io::Result<Option<LockConflict>> {
        let fl = self.flock(libc::F_OFD_GETLK, kind, range)?;
        let kind = match fl.l_type as libc::c_int {
            libc::F_UNLCK => return Ok(None),
            libc::F_RDLCK => LockType::Read,
            _ => LockType::Write,
        };
        Ok(Some(LockConflict {
            kind,
            range: LockRange { start: fl.l_start as u64, length: fl.l_len as u64 },
            pid: fl.l_pid as u32,
        }))
    }
}

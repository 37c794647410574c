//! The storage behind the 9P server: the [`Backend`] trait (one exported tree) and
//! [`BackendFile`] (one open file). The server owns fids, paths, QIDs and the wire; a backend
//! only answers "do this to the file at this path".
//!
//! Paths given to a backend are relative to the export root and already checked by the
//! server: every component is a plain name (never empty, `.`, `..`, or containing `/`); the
//! empty path is the root itself. A backend must not follow symlinks in any component, so
//! nothing outside the export is reachable. Errors are `io::Error`s carrying errno values.

use std::ffi::OsStr;
use std::io;
use std::path::Path;

/// What `lstat`/`fstat` report, in Linux terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub dev: u64,
    pub ino: u64,
    /// Full st_mode (type and permission bits, Linux values).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime: (u64, u64),
    pub mtime: (u64, u64),
    pub ctime: (u64, u64),
}

/// File type bits of st_mode.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFREG: u32 = 0o100000;

impl Attr {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
}

/// A time to set: leave it, set it to now, or set it to a value (seconds, nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Omit,
    Now,
    At(u64, u64),
}

/// The changes of one Tsetattr, already decoded from its `valid` mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits (the type bits are ignored).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: SetTime,
    pub mtime: SetTime,
}

/// Filesystem figures for Tstatfs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatFs {
    pub fs_type: u32,
    pub bsize: u32,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub fsid: u64,
    pub namelen: u32,
}

/// One directory entry as a backend reports it.
#[derive(Debug, Clone, Copy)]
pub struct DirEntry<'a> {
    pub name: &'a [u8],
    pub ino: u64,
    /// A Linux DT_* value (DT_DIR=4, DT_REG=8, DT_LNK=10, ..., DT_UNKNOWN=0).
    pub dtype: u8,
    /// The offset to pass to `readdir` to continue after this entry.
    pub next_offset: u64,
}

/// A POSIX record lock type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockType {
    Read,
    Write,
    Unlock,
}

/// A lock region: start and length (0 = to the end of the file), as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRange {
    pub start: u64,
    pub length: u64,
}

/// Outcome of a non-blocking lock attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    Granted,
    /// Someone else holds a conflicting lock.
    Blocked,
}

/// A conflicting lock found by `get_lock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockConflict {
    pub kind: LockType,
    pub range: LockRange,
    pub pid: u32,
}

/// Host open(2) flags the server asks for (translated from the wire, never raw).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenFlags {
    pub read: bool,
    pub write: bool,
    pub truncate: bool,
    pub append: bool,
    pub exclusive: bool,
    pub directory: bool,
    pub sync: bool,
    pub dsync: bool,
    pub nonblock: bool,
}

/// One exported tree.
pub trait Backend: Send + Sync + 'static {
    /// An open file or directory.
    type File: BackendFile;

    /// Attributes of `path` without following a symlink at the end.
    fn lstat(&self, path: &Path) -> io::Result<Attr>;
    /// Opens an existing file (never following a symlink).
    fn open(&self, path: &Path, flags: OpenFlags) -> io::Result<Self::File>;
    /// Creates and opens `dir/name`.
    fn create(&self, dir: &Path, name: &OsStr, flags: OpenFlags, mode: u32) -> io::Result<Self::File>;
    fn mkdir(&self, dir: &Path, name: &OsStr, mode: u32) -> io::Result<()>;
    fn symlink(&self, dir: &Path, name: &OsStr, target: &OsStr) -> io::Result<()>;
    /// `mode` carries the file type bits.
    fn mknod(&self, dir: &Path, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()>;
    /// Makes `dir/name` a hard link to `target`.
    fn link(&self, target: &Path, dir: &Path, name: &OsStr) -> io::Result<()>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// unlink, or rmdir when `dir` is set.
    fn unlink(&self, path: &Path, dir: bool) -> io::Result<()>;
    fn readlink(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Applies `attr`; `file` is the fid's open file, if any (for ftruncate/fchmod).
    fn setattr(&self, path: &Path, file: Option<&Self::File>, attr: &SetAttr) -> io::Result<()>;
    fn statfs(&self, path: &Path) -> io::Result<StatFs>;
    fn get_xattr(&self, path: &Path, name: &OsStr) -> io::Result<Vec<u8>>;
    /// The NUL-separated list of names, as listxattr(2) returns it.
    fn list_xattr(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// `flags` are XATTR_CREATE (1) / XATTR_REPLACE (2).
    fn set_xattr(&self, path: &Path, name: &OsStr, value: &[u8], flags: u32) -> io::Result<()>;
    fn remove_xattr(&self, path: &Path, name: &OsStr) -> io::Result<()>;
}

/// One open file of a backend. Methods take `&self`: several requests may use one open
/// file at once.
pub trait BackendFile: Send + Sync + 'static {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    fn stat(&self) -> io::Result<Attr>;
    /// Lists entries starting at `offset` (0 = the beginning; otherwise a `next_offset`
    /// from an earlier call), calling `sink` for each until it returns false or the
    /// directory ends.
    fn readdir(&self, offset: u64, sink: &mut dyn FnMut(DirEntry<'_>) -> bool) -> io::Result<()>;
    fn fsync(&self, datasync: bool) -> io::Result<()>;
    /// Tries to take (or release) a lock without waiting.
    fn lock(&self, kind: LockType, range: LockRange) -> io::Result<LockOutcome>;
    /// Returns a lock that would conflict with `kind` on `range`, if any.
    fn get_lock(&self, kind: LockType, range: LockRange) -> io::Result<Option<LockConflict>>;
}

//! The storage behind the 9P server: the [`Backend`] trait (one exported tree), its nodes
//! (a handle on one file, held by a fid) and [`BackendFile`] (one open file). The server owns
//! fids, QIDs, locks and the wire; a backend only answers "do this to this file" or "do this
//! to the entry `name` of this directory".
//!
//! Names and paths given to a backend are already checked by the server: every component is
//! a plain name (never empty, `.`, `..`, or containing `/`); the empty path is the root. A
//! backend must not follow symlinks anywhere, so nothing outside the export is reachable, and
//! must not apply the process umask. Errors are `io::Error`s carrying errno values.

use std::ffi::OsStr;
use std::io;
use std::path::Path;

use super::locks::HostLock;

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
    /// Times as (seconds, nanoseconds); the seconds are a two's-complement time64_t (a
    /// time before 1970 is a value near `u64::MAX`), as Rgetattr carries them and as the
    /// Linux client reads them back into its signed `tv_sec`.
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

/// A time to set: leave it, set it to now, or set it to a value (seconds since 1970, which
/// may be negative, and nanoseconds below one second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Omit,
    Now,
    At(i64, u32),
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

/// Who a new file, directory, node or symlink belongs to: the attaching user (used when the
/// server may give files away, i.e. runs as root) and the group the remote asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// One exported tree. Every file is reached through a [`Backend::Node`], a handle on the file
/// itself (not on its name): whatever happens to the name later, a node keeps meaning the
/// same file. Names appear only where the call needs one: in a directory node.
pub trait Backend: Send + Sync + 'static {
    /// A handle on one file, directory, symlink or other node (never followed).
    type Node: Clone + Send + Sync + 'static;
    /// An open file or directory.
    type File: BackendFile;

    /// The node at `path` (relative to the export root, checked names only).
    fn lookup(&self, path: &Path) -> io::Result<Self::Node>;
    /// The entry `name` of directory `dir`, not following a symlink.
    fn walk(&self, dir: &Self::Node, name: &OsStr) -> io::Result<Self::Node>;
    /// Attributes of the node itself (a symlink is not followed).
    fn stat(&self, node: &Self::Node) -> io::Result<Attr>;
    /// Opens the file `node` names (never a symlink). `path` is its name, used only when the
    /// host cannot reopen a node by itself.
    fn open(&self, node: &Self::Node, path: &Path, flags: OpenFlags) -> io::Result<Self::File>;
    /// The node an open file stands for.
    fn file_node(&self, file: &Self::File) -> Self::Node;
    /// Creates and opens `dir/name` with exactly `mode` (no umask), owned by `owner` as far
    /// as the host allows. An existing file is opened unless `flags.exclusive`.
    fn create(
        &self,
        dir: &Self::Node,
        name: &OsStr,
        flags: OpenFlags,
        mode: u32,
        owner: Owner,
    ) -> io::Result<Self::File>;
    fn mkdir(&self, dir: &Self::Node, name: &OsStr, mode: u32, owner: Owner) -> io::Result<Attr>;
    fn symlink(&self, dir: &Self::Node, name: &OsStr, target: &OsStr, owner: Owner) -> io::Result<Attr>;
    /// `mode` carries the file type bits.
    fn mknod(&self, dir: &Self::Node, name: &OsStr, mode: u32, rdev: u64, owner: Owner) -> io::Result<Attr>;
    /// Makes `dir/name` a hard link to `target` (whose own name is `target_path`).
    fn link(&self, target: &Self::Node, target_path: &Path, dir: &Self::Node, name: &OsStr)
        -> io::Result<()>;
    fn rename(&self, from_dir: &Self::Node, from: &OsStr, to_dir: &Self::Node, to: &OsStr) -> io::Result<()>;
    /// unlink, or rmdir when `is_dir` is set.
    fn unlink(&self, dir: &Self::Node, name: &OsStr, is_dir: bool) -> io::Result<()>;
    fn readlink(&self, node: &Self::Node) -> io::Result<Vec<u8>>;
    fn setattr(&self, node: &Self::Node, attr: &SetAttr) -> io::Result<()>;
    fn statfs(&self, node: &Self::Node) -> io::Result<StatFs>;
    fn get_xattr(&self, node: &Self::Node, name: &OsStr) -> io::Result<Vec<u8>>;
    /// The NUL-separated list of names, as listxattr(2) returns it.
    fn list_xattr(&self, node: &Self::Node) -> io::Result<Vec<u8>>;
    /// `flags` are XATTR_CREATE (1) / XATTR_REPLACE (2).
    fn set_xattr(&self, node: &Self::Node, name: &OsStr, value: &[u8], flags: u32) -> io::Result<()>;
    fn remove_xattr(&self, node: &Self::Node, name: &OsStr) -> io::Result<()>;
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
    /// A new handle through which the session holds its locks on this file on the host, so
    /// processes there see them (see [`super::locks`]); `Ok(None)`: this backend has no
    /// host locks, and the session's table alone decides.
    fn host_lock(&self) -> io::Result<Option<Box<dyn HostLock>>> {
        Ok(None)
    }
}

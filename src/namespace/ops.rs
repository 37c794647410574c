//! The privileged and filesystem calls of a session's setup, behind one small trait.
//!
//! [`SystemOps`] makes the real calls (rustix, std). [`super::recording::RecordingOps`]
//! records them against a fake file tree, so the setup sequence and the fstab handling are
//! unit-tested without root; the real calls are exercised in the VM tests.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::fstab::MsFlags;

/// What is at a path (after following symlinks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Missing,
    Directory,
    File,
    /// A device, socket or fifo: still a valid bind source or target.
    Other,
}

/// Every call the setup sequence makes that touches the system.
pub trait MountOps {
    /// unshare(CLONE_NEWNS): a mount namespace of our own.
    fn unshare_mount_namespace(&mut self) -> io::Result<()>;
    /// mount(NULL, path, NULL, MS_REC|MS_PRIVATE): no propagation to or from the parent.
    fn make_private(&mut self, path: &Path) -> io::Result<()>;
    /// mount(2).
    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()>;
    /// Mounts 9p over `channel` (named in `data`). If the server has not answered within
    /// `deadline`, the channel is shut down so the mount fails with `TimedOut` instead of
    /// hanging forever (a kernel 9p mount waits for Rversion without a timeout).
    fn mount_9p(
        &mut self,
        channel: &OwnedFd,
        target: &Path,
        flags: MsFlags,
        data: &str,
        deadline: Duration,
    ) -> io::Result<()> {
        let _ = (channel, deadline);
        self.mount("localhost", target, "9p", flags, data)
    }
    /// Starts [`MountOps::mount_9p`] beside the caller's next calls (the real calls: in a
    /// thread), so two 9p mounts over two connections make their round trips at the same
    /// time; [`PendingMount::wait`] gives the result. `channel` must stay open until then
    /// (`data` names its descriptor). The default mounts before returning.
    fn start_mount_9p(
        &mut self,
        channel: &OwnedFd,
        target: &Path,
        flags: MsFlags,
        data: &str,
        deadline: Duration,
    ) -> PendingMount {
        PendingMount::Done(self.mount_9p(channel, target, flags, data, deadline))
    }
    /// umount2(2) with MNT_DETACH.
    fn unmount(&mut self, target: &Path) -> io::Result<()>;
    /// mkdir -p with mode 0755.
    fn mkdir_all(&mut self, path: &Path) -> io::Result<()>;
    /// Creates an empty file (a mount point for a file bind); parents must exist.
    fn create_file(&mut self, path: &Path) -> io::Result<()>;
    /// What is at `path`, following symlinks.
    fn path_kind(&self, path: &Path) -> PathKind;
    /// The fully symlink-resolved path, if resolution succeeds.
    fn resolve(&self, path: &Path) -> Option<PathBuf>;
    /// Whether the nearest existing ancestor of `path` lives in memory (tmpfs, ramfs: an
    /// initramfs root), so creating a mount point there changes no disk.
    fn in_memory_filesystem(&self, path: &Path) -> bool;
    /// Whether /proc/filesystems lists `fstype` (true when it cannot be read: let mount decide).
    fn filesystem_supported(&self, fstype: &str) -> bool;
    /// Runs `/sbin/modprobe module` if it exists; whether it succeeded.
    fn load_module(&mut self, module: &str) -> bool;
    /// Connects to `addr`, writes `greeting`, and returns the blocking socket.
    fn dial(&mut self, addr: SocketAddr, greeting: &[u8]) -> io::Result<OwnedFd>;
    /// The msize the kernel reports for the 9p mount at `target` (from mountinfo).
    fn mounted_msize(&self, target: &Path) -> Option<u32>;
    /// chdir(2).
    fn change_dir(&mut self, path: &Path) -> io::Result<()>;
    /// Opens a bind source as a handle (O_PATH, following symlinks) and says what it is, so
    /// that checking and binding it cost one lookup: on the coherent 9p mount every lookup of
    /// a path is a walk and a getattr, and dentries are dropped as soon as they are unused, so
    /// resolving, checking and binding by path walked the client three times (8 requests).
    /// `None`: not supported here; the caller resolves, checks and binds by path.
    fn open_bind_source(&mut self, path: &Path) -> Option<io::Result<BindSource>> {
        let _ = path;
        None
    }
    /// Opens several bind sources at once, as [`MountOps::open_bind_source`] would, but only
    /// along paths without symlinks: the lookups of independent paths on a 9p mount then
    /// overlap (one round trip for all instead of one each). An entry is `None` where this did
    /// not open it (a symlink on the way, missing, any error, or not supported here): the
    /// caller opens that one at its turn, which also reports the error.
    fn open_bind_sources_together(&mut self, paths: &[PathBuf]) -> Vec<Option<BindSource>> {
        paths.iter().map(|_| None).collect()
    }
}

/// A 9p mount started by [`MountOps::start_mount_9p`].
#[derive(Debug)]
pub enum PendingMount {
    /// Already done.
    Done(io::Result<()>),
    /// Going on in this thread.
    Running(std::thread::JoinHandle<io::Result<()>>),
}

impl PendingMount {
    /// Waits for the mount to finish (bounded by the deadline it was started with).
    pub fn wait(self) -> io::Result<()> {
        match self {
            PendingMount::Done(result) => result,
            PendingMount::Running(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the thread mounting 9p ended without a result"))),
        }
    }
}

/// A bind source held open: bind it through [`BindSource::mount_path`] while it is held.
#[derive(Debug)]
pub struct BindSource {
    /// The O_PATH descriptor.
    pub handle: OwnedFd,
    /// What it is.
    pub kind: PathKind,
}

impl BindSource {
    /// The path that names exactly this file for mount(2) (the fd's magic link).
    pub fn mount_path(&self) -> String {
        use std::os::fd::AsRawFd;
        format!("/proc/self/fd/{}", self.handle.as_raw_fd())
    }
}

/// How long a loopback dial of the back-channel may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const MODPROBE: &str = "/sbin/modprobe";

/// The real calls.
#[derive(Debug, Default)]
pub struct SystemOps;

fn to_io(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

fn c_string(s: &str) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(s)
        .map_err(|_| io::Error::from_raw_os_error(rustix::io::Errno::INVAL.raw_os_error()))
}

impl MountOps for SystemOps {
    fn unshare_mount_namespace(&mut self) -> io::Result<()> {
        // SAFETY: only CLONE_NEWNS (which implies CLONE_FS) is unshared, never CLONE_FILES, so
        // no thread can end up with a file descriptor table it does not expect; `cpud -remote`
        // is single-threaded anyway.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }.map_err(to_io)
    }

    fn make_private(&mut self, path: &Path) -> io::Result<()> {
        use rustix::mount::MountPropagationFlags as P;
        rustix::mount::mount_change(path, P::PRIVATE | P::REC).map_err(to_io)
    }

    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()> {
        let data = c_string(data)?;
        let flags = rustix::mount::MountFlags::from_bits_retain(flags);
        rustix::mount::mount(source, target, fstype, flags, Some(data.as_c_str())).map_err(to_io)
    }

    fn mount_9p(
        &mut self,
        channel: &OwnedFd,
        target: &Path,
        flags: MsFlags,
        data: &str,
        deadline: Duration,
    ) -> io::Result<()> {
        let watched = channel.try_clone()?;
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            let fired = wait.recv_timeout(deadline) == Err(std::sync::mpsc::RecvTimeoutError::Timeout);
            if fired {
                // The kernel reads this socket; shutting it down fails the pending mount.
                let _ = rustix::net::shutdown(&watched, rustix::net::Shutdown::Both);
            }
            fired
        });
        let result = self.mount("localhost", target, "9p", flags, data);
        let _ = done.send(());
        let fired = watchdog.join().unwrap_or(false);
        match result {
            Err(_) if fired => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client's 9p server did not answer within {} s", deadline.as_secs()),
            )),
            other => other,
        }
    }

    fn start_mount_9p(
        &mut self,
        channel: &OwnedFd,
        target: &Path,
        flags: MsFlags,
        data: &str,
        deadline: Duration,
    ) -> PendingMount {
        // The thread gets its own descriptor of the socket for the watchdog; the kernel reads
        // the one `data` names, which the caller keeps open.
        let channel = match channel.try_clone() {
            Ok(fd) => fd,
            Err(e) => return PendingMount::Done(Err(e)),
        };
        let (target, data) = (target.to_path_buf(), data.to_string());
        let thread = std::thread::Builder::new()
            .name("mount-9p".into())
            .spawn(move || SystemOps.mount_9p(&channel, &target, flags, &data, deadline));
        match thread {
            Ok(thread) => PendingMount::Running(thread),
            Err(e) => PendingMount::Done(Err(e)),
        }
    }

    fn unmount(&mut self, target: &Path) -> io::Result<()> {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH).map_err(to_io)
    }

    fn mkdir_all(&mut self, path: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(path)
    }

    fn create_file(&mut self, path: &Path) -> io::Result<()> {
        std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path).map(drop)
    }

    fn path_kind(&self, path: &Path) -> PathKind {
        match std::fs::metadata(path) {
            Err(_) => PathKind::Missing,
            Ok(m) if m.is_dir() => PathKind::Directory,
            Ok(m) if m.is_file() => PathKind::File,
            Ok(_) => PathKind::Other,
        }
    }

    fn resolve(&self, path: &Path) -> Option<PathBuf> {
        std::fs::canonicalize(path).ok()
    }

    fn in_memory_filesystem(&self, path: &Path) -> bool {
        let existing = path.ancestors().find(|p| std::fs::symlink_metadata(p).is_ok());
        let Some(existing) = existing else { return false };
        match rustix::fs::statfs(existing) {
            #[allow(clippy::unnecessary_cast)] // f_type's integer type differs between targets
            Ok(s) => matches!(s.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC),
            Err(_) => false,
        }
    }

    fn filesystem_supported(&self, fstype: &str) -> bool {
        match std::fs::read_to_string("/proc/filesystems") {
            Ok(text) => text.lines().any(|l| l.split_whitespace().last() == Some(fstype)),
            Err(_) => true,
        }
    }

    fn load_module(&mut self, module: &str) -> bool {
        if !Path::new(MODPROBE).exists() {
            return false;
        }
        std::process::Command::new(MODPROBE)
            .arg(module)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn dial(&mut self, addr: SocketAddr, greeting: &[u8]) -> io::Result<OwnedFd> {
        use std::io::Write;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, DIAL_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.write_all(greeting)?;
        Ok(OwnedFd::from(stream))
    }

    fn mounted_msize(&self, target: &Path) -> Option<u32> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        msize_from_mountinfo(&text, target.to_str()?)
    }

    fn change_dir(&mut self, path: &Path) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn open_bind_source(&mut self, path: &Path) -> Option<io::Result<BindSource>> {
        use rustix::fs::{FileType, Mode, OFlags};
        // The magic link must work: /proc mounted (an early initramfs may lack it).
        if std::fs::symlink_metadata("/proc/self/fd").is_err() {
            return None;
        }
        // Most binds are directories: O_DIRECTORY tells without a stat (on the coherent 9p
        // mount a stat is a getattr round trip; the lookup has the type already).
        let flags = OFlags::PATH | OFlags::CLOEXEC;
        let opened = match rustix::fs::open(path, flags | OFlags::DIRECTORY, Mode::empty()) {
            Ok(fd) => Ok(BindSource { handle: fd, kind: PathKind::Directory }),
            Err(rustix::io::Errno::NOTDIR) => rustix::fs::open(path, flags, Mode::empty()).and_then(|fd| {
                let kind = match FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) {
                    FileType::Directory => PathKind::Directory,
                    FileType::RegularFile => PathKind::File,
                    _ => PathKind::Other,
                };
                Ok(BindSource { handle: fd, kind })
            }),
            Err(e) => Err(e),
        };
        Some(opened.map_err(to_io))
    }

    fn open_bind_sources_together(&mut self, paths: &[PathBuf]) -> Vec<Option<BindSource>> {
        if std::fs::symlink_metadata("/proc/self/fd").is_err() {
            return paths.iter().map(|_| None).collect();
        }
        let mut opened = Vec::with_capacity(paths.len());
        for chunk in paths.chunks(MAX_SOURCES_TOGETHER) {
            std::thread::scope(|scope| {
                let lookups: Vec<_> =
                    chunk.iter().map(|path| scope.spawn(move || open_without_symlinks(path))).collect();
                // A thread that could not be joined opened nothing the caller relies on.
                opened.extend(lookups.into_iter().map(|lookup| lookup.join().ok().flatten()));
            });
        }
        opened
    }
}

/// How many bind sources [`SystemOps`] opens at once (a session has a handful; the cap only
/// bounds the threads a long fstab could ask for).
const MAX_SOURCES_TOGETHER: usize = 16;

/// Opens `path` as a bind source if no component of it is a symlink (openat2
/// RESOLVE_NO_SYMLINKS, Linux 5.6+); `None` on any error.
fn open_without_symlinks(path: &Path) -> Option<BindSource> {
    use rustix::fs::{FileType, Mode, OFlags, ResolveFlags, CWD};
    let flags = OFlags::PATH | OFlags::CLOEXEC;
    let resolve = ResolveFlags::NO_SYMLINKS;
    match rustix::fs::openat2(CWD, path, flags | OFlags::DIRECTORY, Mode::empty(), resolve) {
        Ok(fd) => Some(BindSource { handle: fd, kind: PathKind::Directory }),
        Err(rustix::io::Errno::NOTDIR) => {
            let fd = rustix::fs::openat2(CWD, path, flags, Mode::empty(), resolve).ok()?;
            let kind = match FileType::from_raw_mode(rustix::fs::fstat(&fd).ok()?.st_mode) {
                FileType::Directory => PathKind::Directory,
                FileType::RegularFile => PathKind::File,
                FileType::Symlink => return None,
                _ => PathKind::Other,
            };
            Some(BindSource { handle: fd, kind })
        }
        Err(_) => None,
    }
}

/// The `msize=` of the last mount on `target` in /proc/self/mountinfo text.
pub fn msize_from_mountinfo(mountinfo: &str, target: &str) -> Option<u32> {
    // Fields: id parent maj:min root mountpoint options ... - fstype source superoptions
    let line = mountinfo.lines().rfind(|l| l.split(' ').nth(4) == Some(target))?;
    let super_options = line.split(" - ").nth(1)?.split(' ').nth(2)?;
    super_options.split(',').find_map(|o| o.strip_prefix("msize=")).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msize_from_a_real_mountinfo_line() {
        let text = "24 1 0:22 / /tmp rw,relatime - tmpfs tmp rw,inode64\n\
36 35 0:26 / /tmp/cpu rw,nosuid,nodev,relatime - 9p localhost rw,access=client,msize=1048576,trans=fd,rfd=3,wfd=3\n";
        assert_eq!(msize_from_mountinfo(text, "/tmp/cpu"), Some(1 << 20));
        assert_eq!(msize_from_mountinfo(text, "/tmp"), None);
        assert_eq!(msize_from_mountinfo("garbage", "/tmp/cpu"), None);
    }

    #[test]
    fn real_calls_that_need_no_privilege() {
        let ops = SystemOps;
        assert_eq!(ops.path_kind(Path::new("/")), PathKind::Directory);
        assert_eq!(ops.path_kind(Path::new("/proc/self/status")), PathKind::File);
        assert_eq!(ops.path_kind(Path::new("/nonexistent/x")), PathKind::Missing);
        assert_eq!(ops.resolve(Path::new("/proc/../")), Some(PathBuf::from("/")));
        assert!(ops.filesystem_supported("proc"));
        assert!(!ops.filesystem_supported("no-such-fs"));
    }

    #[test]
    fn bind_sources_opened_together_skip_symlinked_paths() {
        let mut ops = SystemOps;
        let paths: Vec<PathBuf> = ["/proc", "/dev/null", "/proc/self", "/nonexistent/x", "/proc/self/status"]
            .map(PathBuf::from)
            .into();
        let opened = ops.open_bind_sources_together(&paths);
        let kinds: Vec<Option<PathKind>> = opened.iter().map(|o| o.as_ref().map(|s| s.kind)).collect();
        // /proc/self is a symlink, and so is a path through it: left to the caller.
        assert_eq!(kinds, [Some(PathKind::Directory), Some(PathKind::Other), None, None, None]);
        let proc_source = opened[0].as_ref().expect("/proc opened");
        assert_eq!(std::fs::read_link(proc_source.mount_path()).expect("magic link"), PathBuf::from("/proc"));
        let many: Vec<PathBuf> = (0..MAX_SOURCES_TOGETHER + 3).map(|_| PathBuf::from("/proc")).collect();
        assert!(ops.open_bind_sources_together(&many).iter().all(Option::is_some));
    }

    #[test]
    fn bind_sources_held_open_know_their_kind() {
        let mut ops = SystemOps;
        let kind = |ops: &mut SystemOps, p: &str| {
            ops.open_bind_source(Path::new(p)).expect("/proc is mounted here").map(|s| s.kind)
        };
        assert_eq!(kind(&mut ops, "/proc/self").ok(), Some(PathKind::Directory));
        assert_eq!(kind(&mut ops, "/proc/self/status").ok(), Some(PathKind::File));
        assert_eq!(kind(&mut ops, "/dev/null").ok(), Some(PathKind::Other));
        let missing = kind(&mut ops, "/nonexistent/x").expect_err("missing");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound);
        let source = ops.open_bind_source(Path::new("/proc")).expect("supported").expect("opened");
        let shown = std::fs::read_link(source.mount_path()).expect("the magic link");
        assert_eq!(shown, PathBuf::from("/proc"));
    }
}

//! A [`MountOps`] test double: records every call and answers from a fake file tree.
//!
//! Paths are given kinds up front (`with_dir`, `with_file`, `with_symlink`); mkdir and
//! create_file add to the tree; a bind shows the source's subtree under the target, and a
//! mount at a target makes the paths registered under `with_mount_contents` appear. Failures are injected per call with `fail_when`.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::fstab::MsFlags;
use super::ops::{MountOps, PathKind};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Unshare,
    MakePrivate(PathBuf),
    Mount { source: String, target: PathBuf, fstype: String, flags: MsFlags, data: String },
    Unmount(PathBuf),
    MkdirAll(PathBuf),
    CreateFile(PathBuf),
    LoadModule(String),
    Dial { addr: SocketAddr, greeting: Vec<u8> },
    ChangeDir(PathBuf),
}

type Predicate = Box<dyn Fn(&Call) -> bool>;

/// The recording double.
pub struct RecordingOps {
    /// Every call, in order (failed ones too).
    pub calls: Vec<Call>,
    paths: BTreeMap<PathBuf, PathKind>,
    symlinks: BTreeMap<PathBuf, PathBuf>,
    mount_contents: BTreeMap<PathBuf, Vec<(PathBuf, PathKind)>>,
    memory_root: bool,
    filesystems: Vec<String>,
    module_loads: Vec<(String, String)>,
    failures: Vec<(Predicate, i32)>,
    msize_limit: Option<u32>,
    /// The paths of every `open_bind_sources_together` call (nothing is opened: the caller
    /// then opens each at its turn, as without the call).
    pub opened_together: Vec<Vec<PathBuf>>,
}

impl Default for RecordingOps {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingOps {
    /// A tree with `/` and `/tmp`, a disk (not in-memory) root, 9p and tmpfs supported.
    pub fn new() -> Self {
        let mut r = RecordingOps {
            calls: Vec::new(),
            paths: BTreeMap::new(),
            symlinks: BTreeMap::new(),
            mount_contents: BTreeMap::new(),
            memory_root: false,
            filesystems: vec!["tmpfs".into(), "9p".into(), "proc".into()],
            module_loads: Vec::new(),
            failures: Vec::new(),
            msize_limit: None,
            opened_together: Vec::new(),
        };
        r.paths.insert("/".into(), PathKind::Directory);
        r.paths.insert("/tmp".into(), PathKind::Directory);
        r
    }

    pub fn with_dir(mut self, path: &str) -> Self {
        self.add(Path::new(path), PathKind::Directory);
        self
    }

    pub fn with_file(mut self, path: &str) -> Self {
        self.add(Path::new(path), PathKind::File);
        self
    }

    /// `path` resolves to `to` (both absolute).
    pub fn with_symlink(mut self, path: &str, to: &str) -> Self {
        self.symlinks.insert(path.into(), to.into());
        self
    }

    /// Paths that appear once something is mounted on `target` (e.g. the client's files).
    pub fn with_mount_contents(mut self, target: &str, dirs: &[&str], files: &[&str]) -> Self {
        let list = self.mount_contents.entry(target.into()).or_default();
        list.extend(dirs.iter().map(|d| (PathBuf::from(d), PathKind::Directory)));
        list.extend(files.iter().map(|f| (PathBuf::from(f), PathKind::File)));
        self
    }

    /// The root filesystem is an initramfs (mount points may be created).
    pub fn with_memory_root(mut self) -> Self {
        self.memory_root = true;
        self
    }

    /// The kernel has no 9p; `modprobe 9p` fails unless `with_loadable_module` says otherwise.
    pub fn without_filesystem(mut self, fstype: &str) -> Self {
        self.filesystems.retain(|f| f != fstype);
        self
    }

    /// `modprobe module` succeeds and makes `fstype` available.
    pub fn with_loadable_module(mut self, module: &str, fstype: &str) -> Self {
        self.module_loads.push((module.into(), fstype.into()));
        self
    }

    /// 9p mounts with an msize above `limit` fail with EINVAL.
    pub fn with_msize_limit(mut self, limit: u32) -> Self {
        self.msize_limit = Some(limit);
        self
    }

    /// Calls for which `pred` is true fail with `errno` (e.g. `libc` EPERM = 1).
    pub fn fail_when(mut self, errno: i32, pred: impl Fn(&Call) -> bool + 'static) -> Self {
        self.failures.push((Box::new(pred), errno));
        self
    }

    /// The recorded mounts only (convenient for assertions).
    pub fn mounts(&self) -> Vec<&Call> {
        self.calls.iter().filter(|c| matches!(c, Call::Mount { .. })).collect()
    }

    fn add(&mut self, path: &Path, kind: PathKind) {
        for parent in path.ancestors().skip(1) {
            self.paths.entry(parent.to_path_buf()).or_insert(PathKind::Directory);
        }
        self.paths.insert(path.to_path_buf(), kind);
    }

    fn record(&mut self, call: Call) -> io::Result<()> {
        let failure = self.failures.iter().find(|(pred, _)| pred(&call)).map(|(_, errno)| *errno);
        self.calls.push(call);
        match failure {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn resolve_links(&self, path: &Path) -> PathBuf {
        // Replace the longest symlinked prefix (one level is enough for the tests).
        for ancestor in path.ancestors() {
            if let Some(to) = self.symlinks.get(ancestor) {
                let rest = path.strip_prefix(ancestor).unwrap_or(Path::new(""));
                return if rest.as_os_str().is_empty() { to.clone() } else { to.join(rest) };
            }
        }
        path.to_path_buf()
    }
}

const EINVAL: i32 = 22;
const ENODEV: i32 = 19;
const ENOENT: i32 = 2;

impl MountOps for RecordingOps {
    fn unshare_mount_namespace(&mut self) -> io::Result<()> {
        self.record(Call::Unshare)
    }

    fn make_private(&mut self, path: &Path) -> io::Result<()> {
        self.record(Call::MakePrivate(path.into()))
    }

    fn mount(
        &mut self,
        source: &str,
        target: &Path,
        fstype: &str,
        flags: MsFlags,
        data: &str,
    ) -> io::Result<()> {
        let call = Call::Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            flags,
            data: data.into(),
        };
        self.record(call)?;
        if (fstype == "9p" || fstype == "tmpfs") && !self.filesystems.iter().any(|f| f == fstype) {
            return Err(io::Error::from_raw_os_error(ENODEV));
        }
        if fstype == "9p" {
            let msize =
                data.split(',').find_map(|o| o.strip_prefix("msize=")).and_then(|v| v.parse::<u32>().ok());
            if let (Some(limit), Some(msize)) = (self.msize_limit, msize) {
                if msize > limit {
                    return Err(io::Error::from_raw_os_error(EINVAL));
                }
            }
        }
        if self.path_kind(target) == PathKind::Missing {
            return Err(io::Error::from_raw_os_error(ENOENT));
        }
        if flags & super::fstab::ms::BIND != 0 {
            // The source's subtree shows up under the target (what is below it stays hidden
            // in reality; the double only adds).
            let source = self.resolve_links(Path::new(source));
            let shown: Vec<(PathBuf, PathKind)> = self
                .paths
                .iter()
                .filter_map(|(p, k)| p.strip_prefix(&source).ok().map(|rest| (target.join(rest), *k)))
                .collect();
            for (p, k) in shown {
                self.add(&p, k);
            }
        }
        if let Some(contents) = self.mount_contents.get(target).cloned() {
            for (p, k) in contents {
                self.add(&p, k);
            }
        }
        Ok(())
    }

    fn unmount(&mut self, target: &Path) -> io::Result<()> {
        self.record(Call::Unmount(target.into()))
    }

    fn mkdir_all(&mut self, path: &Path) -> io::Result<()> {
        self.record(Call::MkdirAll(path.into()))?;
        self.add(path, PathKind::Directory);
        Ok(())
    }

    fn create_file(&mut self, path: &Path) -> io::Result<()> {
        self.record(Call::CreateFile(path.into()))?;
        self.add(path, PathKind::File);
        Ok(())
    }

    fn path_kind(&self, path: &Path) -> PathKind {
        self.paths.get(&self.resolve_links(path)).copied().unwrap_or(PathKind::Missing)
    }

    fn resolve(&self, path: &Path) -> Option<PathBuf> {
        let resolved = self.resolve_links(path);
        self.paths.contains_key(&resolved).then_some(resolved)
    }

    fn in_memory_filesystem(&self, _path: &Path) -> bool {
        self.memory_root
    }

    fn filesystem_supported(&self, fstype: &str) -> bool {
        self.filesystems.iter().any(|f| f == fstype)
    }

    fn load_module(&mut self, module: &str) -> bool {
        let _ = self.record(Call::LoadModule(module.into()));
        let found = self.module_loads.iter().find(|(m, _)| m == module).map(|(_, fs)| fs.clone());
        match found {
            Some(fs) => {
                self.filesystems.push(fs);
                true
            }
            None => false,
        }
    }

    fn dial(&mut self, addr: SocketAddr, greeting: &[u8]) -> io::Result<OwnedFd> {
        self.record(Call::Dial { addr, greeting: greeting.to_vec() })?;
        Ok(OwnedFd::from(std::fs::File::open("/dev/null")?))
    }

    fn mounted_msize(&self, _target: &Path) -> Option<u32> {
        None
    }

    fn change_dir(&mut self, path: &Path) -> io::Result<()> {
        self.record(Call::ChangeDir(path.into()))?;
        match self.path_kind(path) {
            PathKind::Directory => Ok(()),
            _ => Err(io::Error::from_raw_os_error(ENOENT)),
        }
    }

    fn open_bind_sources_together(&mut self, paths: &[PathBuf]) -> Vec<Option<super::ops::BindSource>> {
        self.opened_together.push(paths.to_vec());
        paths.iter().map(|_| None).collect()
    }
}

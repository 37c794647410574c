//! Every 9P2000.L operation through the real server over a socketpair, checked against the
//! files it leaves on disk.

mod ninep_support;

#[path = "common/skip.rs"]
mod skip;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, SystemTime};

use cpu_all::ninep::wire::*;
use ninep_support::*;

const ENOENT: u32 = 2;
const EEXIST: u32 = 17;
const ENOTDIR: u32 = 20;
const EINVAL: u32 = 22;
const EROFS: u32 = 30;
const ENOTEMPTY: u32 = 39;
const ELOOP: u32 = 40;
const ENODATA: u32 = 61;
const EOPNOTSUPP: u32 = 95;
const EACCES: u32 = 13;

#[test]
fn version_negotiates_msize_and_refuses_other_dialects() {
    let dir = TempDir::new("version");
    let mut opts = options(dir.path());
    opts.max_msize = 65536;
    let mut h = start(opts);
    let v = h.client.version(1 << 20).unwrap();
    assert_eq!((v.msize, v.version.as_bytes()), (65536, &b"9P2000.L"[..]));
    let v = h.client.version(8192).unwrap();
    assert_eq!(v.msize, 8192);
    h.client.send(NOTAG, &Tmessage::Version(Version { msize: 8192, version: "9P2000.u".into() }));
    match h.client.recv() {
        (_, Rmessage::Version(v)) => assert_eq!((v.msize, v.version.as_bytes()), (0, &b"unknown"[..])),
        r => panic!("{r:?}"),
    }
    // Tauth is refused; attach with an afid is refused.
    let r = h.client.rpc(Tmessage::Auth(Tauth { afid: 1, uname: "u".into(), aname: "".into(), n_uname: 0 }));
    assert_eq!(r.unwrap_err(), 38);
    h.client.version(65536).unwrap();
    let t = Tattach { fid: 0, afid: 5, uname: "u".into(), aname: "".into(), n_uname: 0 };
    assert_eq!(h.client.rpc(Tmessage::Attach(t)).unwrap_err(), EINVAL);
    h.client.attach(0, "").unwrap();
    h.finish().expect("clean close");
}

#[test]
fn create_write_read_back() {
    let dir = TempDir::new("rw");
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &[]).unwrap();
    let qid = c.lcreate(1, "hello.txt", O_RDWR | O_CREAT, 0o640).unwrap();
    assert_eq!(qid.ty, QTFILE);
    assert_eq!(qid.path, fs::metadata(dir.join("hello.txt")).unwrap().ino());
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut off = 0;
    while off < data.len() {
        let end = (off + 65536).min(data.len());
        let n = c.write(1, off as u64, &data[off..end]).unwrap();
        off += n as usize;
    }
    assert_eq!(fs::read(dir.join("hello.txt")).unwrap(), data);
    assert_eq!(fs::metadata(dir.join("hello.txt")).unwrap().permissions().mode() & 0o777, 0o640);
    // Read back through the same fid and a new one.
    assert_eq!(c.read(1, 10, 5).unwrap(), &data[10..15]);
    c.clunk(1).unwrap();
    c.walk(0, 2, &["hello.txt"]).unwrap();
    c.lopen(2, O_RDONLY).unwrap();
    let mut back = Vec::new();
    while back.len() < data.len() {
        let chunk = c.read(2, back.len() as u64, 1 << 20).unwrap();
        assert!(!chunk.is_empty());
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, data);
    assert!(c.read(2, data.len() as u64, 100).unwrap().is_empty());
    // Writing on a read-only open fails.
    assert!(c.write(2, 0, b"x").is_err());
    c.clunk(2).unwrap();
    // O_EXCL on an existing name, O_TRUNC empties.
    c.walk(0, 3, &[]).unwrap();
    assert_eq!(c.lcreate(3, "hello.txt", O_RDWR | O_CREAT | O_EXCL, 0o600).unwrap_err(), EEXIST);
    c.lcreate(3, "hello.txt", O_RDWR | O_CREAT | O_TRUNC, 0o600).unwrap();
    assert_eq!(fs::metadata(dir.join("hello.txt")).unwrap().len(), 0);
    c.fsync(3).unwrap();
    c.clunk(3).unwrap();
    // Clunk of an unknown fid.
    assert_eq!(c.clunk(99).unwrap_err(), 9);
    h.finish().unwrap();
}

#[test]
fn rename_link_symlink_mkdir_remove() {
    let dir = TempDir::new("names");
    fs::write(dir.join("a"), b"AAA").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    let q = c.mkdir(0, "sub", 0o750).unwrap();
    assert_eq!(q.ty, QTDIR);
    let md = fs::metadata(dir.join("sub")).unwrap();
    assert!(md.is_dir());
    assert_eq!(q.path, md.ino());
    assert_eq!(md.permissions().mode() & 0o777, 0o750);
    assert_eq!(c.mkdir(0, "sub", 0o750).unwrap_err(), EEXIST);

    c.walk(0, 1, &["sub"]).unwrap();
    c.renameat(0, "a", 1, "b").unwrap();
    assert!(!dir.join("a").exists());
    assert_eq!(fs::read(dir.join("sub/b")).unwrap(), b"AAA");

    c.walk(0, 2, &["sub", "b"]).unwrap();
    c.link(0, 2, "hard").unwrap();
    assert_eq!(fs::metadata(dir.join("hard")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(dir.join("hard")).unwrap().ino(), fs::metadata(dir.join("sub/b")).unwrap().ino());

    let q = c.symlink(0, "sym", "sub/b").unwrap();
    assert_eq!(q.ty, QTSYMLINK);
    assert_eq!(fs::read_link(dir.join("sym")).unwrap().to_str(), Some("sub/b"));
    c.walk(0, 3, &["sym"]).unwrap();
    assert_eq!(c.readlink(3).unwrap(), b"sub/b");

    // Trename moves the file and the fid follows it.
    c.rename(2, 0, "moved").unwrap();
    assert_eq!(fs::read(dir.join("moved")).unwrap(), b"AAA");
    assert_eq!(c.getattr(2).unwrap().size, 3);
    // Renaming a directory keeps fids below it valid.
    fs::write(dir.join("sub/inner"), b"12345").unwrap();
    c.walk(0, 4, &["sub", "inner"]).unwrap();
    c.renameat(0, "sub", 0, "sub2").unwrap();
    assert_eq!(c.getattr(4).unwrap().size, 5);
    c.lopen(4, O_RDONLY).unwrap();
    assert_eq!(c.read(4, 0, 10).unwrap(), b"12345");

    // unlinkat honours AT_REMOVEDIR; ENOTEMPTY on a full directory.
    assert_eq!(c.unlinkat(0, "sub2", 0x200).unwrap_err(), ENOTEMPTY);
    assert_eq!(c.unlinkat(0, "hard", 0x200).unwrap_err(), ENOTDIR);
    c.unlinkat(0, "hard", 0).unwrap();
    assert!(!dir.join("hard").exists());
    c.mkdir(0, "empty", 0o755).unwrap();
    assert!(c.unlinkat(0, "empty", 0).is_err(), "unlink without AT_REMOVEDIR on a directory");
    c.unlinkat(0, "empty", 0x200).unwrap();
    assert!(!dir.join("empty").exists());
    // Tremove removes and clunks.
    c.walk(0, 5, &["moved"]).unwrap();
    c.remove(5).unwrap();
    assert!(!dir.join("moved").exists());
    assert_eq!(c.clunk(5).unwrap_err(), 9);
    // Bad names.
    for bad in ["", ".", "..", "a/b"] {
        assert_eq!(c.mkdir(0, bad, 0o755).unwrap_err(), EINVAL, "mkdir {bad:?}");
    }
    h.finish().unwrap();
}

#[test]
fn mknod_fifo() {
    let dir = TempDir::new("mknod");
    let mut h = start_attached(options(dir.path()));
    let t = Tmknod { dfid: 0, name: "fifo".into(), mode: 0o010644, major: 0, minor: 0, gid: 0 };
    match h.client.rpc(Tmessage::Mknod(t)).unwrap() {
        Rmessage::Mknod(q) => assert_eq!(q.qid.path, fs::metadata(dir.join("fifo")).unwrap().ino()),
        r => panic!("{r:?}"),
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(dir.join("fifo")).unwrap().file_type().is_fifo());
    h.finish().unwrap();
}

#[test]
fn readdir_lists_types_and_resumes() {
    let dir = TempDir::new("readdir");
    for i in 0..150 {
        fs::write(dir.join(&format!("file-with-a-longish-name-{i:03}")), b"x").unwrap();
    }
    fs::create_dir(dir.join("adir")).unwrap();
    std::os::unix::fs::symlink("nowhere", dir.join("alink")).unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &[]).unwrap();
    let q = c.lopen(1, O_RDONLY | O_DIRECTORY).unwrap();
    assert_eq!(q.ty, QTDIR);
    // 512 bytes per call forces many calls, each resumed from the previous entry's offset.
    let (entries, calls) = c.readdir_all(1, 512).unwrap();
    assert!(calls > 10, "only {calls} calls");
    let mut names: Vec<String> =
        entries.iter().map(|d| String::from_utf8(d.name.0.clone()).unwrap()).collect();
    names.sort();
    let mut want: Vec<String> =
        fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    want.push(".".into());
    want.push("..".into());
    want.sort();
    assert_eq!(names, want);
    let ty = |n: &str| entries.iter().find(|d| d.name.as_bytes() == n.as_bytes()).unwrap();
    assert_eq!(ty("adir").ty, 4);
    assert_eq!(ty("adir").qid.ty, QTDIR);
    assert_eq!(ty("alink").ty, 10);
    assert_eq!(ty("alink").qid.ty, QTSYMLINK);
    assert_eq!(ty("file-with-a-longish-name-007").ty, 8);
    assert_eq!(
        ty("file-with-a-longish-name-007").qid.path,
        fs::metadata(dir.join("file-with-a-longish-name-007")).unwrap().ino()
    );
    // ".." of the export root is the root itself.
    assert_eq!(ty("..").qid.path, q.path);
    // One big call returns the same set.
    let (again, calls) = c.readdir_all(1, 65536).unwrap();
    assert_eq!(again.len(), entries.len());
    assert!(calls <= 3);
    // Readdir on an unopened fid fails.
    c.walk(0, 2, &[]).unwrap();
    assert!(c.readdir_all(2, 512).is_err());
    h.finish().unwrap();
}

#[test]
fn getattr_and_setattr_match_the_disk() {
    let dir = TempDir::new("attr");
    fs::write(dir.join("f"), vec![7u8; 10_000]).unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    let a = c.getattr(1).unwrap();
    let md = fs::symlink_metadata(dir.join("f")).unwrap();
    assert_eq!(a.valid & 0x7ff, 0x7ff);
    assert_eq!(a.mode, md.mode());
    assert_eq!((a.uid, a.gid), (md.uid(), md.gid()));
    assert_eq!(a.nlink, md.nlink());
    assert_eq!(a.size, 10_000);
    assert_eq!(a.blocks, md.blocks());
    assert_eq!(a.blksize, md.blksize());
    assert_eq!((a.mtime_sec, a.mtime_nsec), (md.mtime() as u64, md.mtime_nsec() as u64));
    assert_eq!((a.ctime_sec, a.ctime_nsec), (md.ctime() as u64, md.ctime_nsec() as u64));
    assert_eq!(a.qid.path, md.ino());

    // mode + size + exact mtime + atime now.
    let t = Tsetattr {
        fid: 1,
        valid: 0x1 | 0x8 | 0x10 | 0x20 | 0x100,
        mode: 0o600,
        size: 1234,
        mtime_sec: 1_000_000_000,
        mtime_nsec: 5,
        ..Default::default()
    };
    let before = SystemTime::now() - Duration::from_secs(2);
    c.setattr(t).unwrap();
    let md = fs::metadata(dir.join("f")).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o600);
    assert_eq!(md.len(), 1234);
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_000_000_000, 5));
    assert!(md.accessed().unwrap() >= before);
    // uid/gid: we run as root in CI, so chown to another id works; otherwise EPERM.
    let t = Tsetattr { fid: 1, valid: 0x2 | 0x4, uid: 4321, gid: 4321, ..Default::default() };
    match c.setattr(t) {
        Ok(()) => assert_eq!(fs::metadata(dir.join("f")).unwrap().uid(), 4321),
        Err(e) => assert_eq!(e, 1, "chown as non-root"),
    }
    // Setattr of size through an open fid.
    c.walk(0, 2, &["f"]).unwrap();
    c.lopen(2, O_RDWR).unwrap();
    c.setattr(Tsetattr { fid: 2, valid: 0x8, size: 3, ..Default::default() }).unwrap();
    assert_eq!(fs::metadata(dir.join("f")).unwrap().len(), 3);
    assert_eq!(c.getattr(2).unwrap().size, 3);
    h.finish().unwrap();
}

#[test]
fn statfs_reports_the_real_filesystem() {
    let dir = TempDir::new("statfs");
    let mut h = start_attached(options(dir.path()));
    let s = h.client.statfs(0).unwrap();
    let real = rustix::fs::statfs(dir.path()).unwrap();
    assert_eq!(s.ty as i64, real.f_type as i64);
    assert_eq!(s.bsize as i64, real.f_bsize as i64);
    assert_eq!(s.blocks, real.f_blocks as u64);
    assert_eq!(s.files, real.f_files as u64);
    assert_eq!(s.namelen as i64, real.f_namelen as i64);
    h.finish().unwrap();
}

/// An open-file-description lock taken (or asked about) by this test process, standing for
/// any process on the client machine: Ok(true) taken, Ok(false) someone else holds it.
fn host_setlk(f: &fs::File, ty: i32, start: i64, len: i64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero is a valid struct flock (and l_pid must be 0 for OFD commands).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: a valid descriptor and a valid struct flock for the call's length.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &mut fl as *mut libc::flock) };
    let e = std::io::Error::last_os_error().raw_os_error();
    assert!(r == 0 || matches!(e, Some(libc::EAGAIN | libc::EACCES)), "F_OFD_SETLK: {e:?}");
    r == 0
}

/// F_OFD_GETLK from this test process: (type, start, len) of the first conflicting lock.
fn host_getlk(f: &fs::File, start: i64, len: i64) -> Option<(i32, i64, i64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: as in host_setlk.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: as in host_setlk; F_OFD_GETLK writes the struct back.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    (fl.l_type as i32 != libc::F_UNLCK).then_some((fl.l_type as i32, fl.l_start, fl.l_len))
}

#[test]
fn remote_locks_and_the_client_machines_locks_exclude_each_other() {
    let dir = TempDir::new("hostlocks");
    fs::write(dir.join("f"), [7u8; 100]).unwrap();
    const WR: u8 = 1;
    const RD: u8 = 0;
    const UN: u8 = 2;
    const P: u32 = 10;
    const Q: u32 = 20;
    let local = fs::OpenOptions::new().read(true).write(true).open(dir.join("f")).unwrap();
    let mut a = start_attached(options(dir.path()));
    let mut b = start_attached(options(dir.path()));
    for c in [&mut a.client, &mut b.client] {
        c.walk(0, 1, &["f"]).unwrap();
        c.lopen(1, O_RDWR).unwrap();
    }
    // A remote process's write lock is a lock on the client machine too.
    assert_eq!(a.client.lock_as(P, 1, WR, 0, 0, 10).unwrap(), 0);
    assert_eq!(host_getlk(&local, 0, 100), Some((libc::F_WRLCK, 0, 10)));
    assert!(!host_setlk(&local, libc::F_RDLCK, 9, 1), "a local reader must wait for the remote writer");
    // A local process's lock blocks the remote, and F_GETLK there names it (process 0).
    assert!(host_setlk(&local, libc::F_WRLCK, 50, 10));
    assert_eq!(a.client.lock_as(P, 1, RD, 0, 55, 1).unwrap(), 1, "BLOCKED by the local lock");
    let g = a.client.getlock_as(P, 1, UN, 40, 30).unwrap();
    assert_eq!((g.ty, g.start, g.length, g.proc_id), (WR, 50, 10, 0));
    // Another session (another cpu to the same files) meets the first one on the host.
    assert_eq!(b.client.lock_as(Q, 1, WR, 0, 5, 1).unwrap(), 1, "BLOCKED by the other session");
    let g = b.client.getlock_as(Q, 1, UN, 0, 0).unwrap();
    assert_eq!((g.ty, g.start, g.length), (WR, 0, 10));
    // Releases reach the host: the remote unlocks, the other session gets its lock.
    assert_eq!(a.client.lock_as(P, 1, UN, 0, 0, 10).unwrap(), 0);
    assert_eq!(b.client.lock_as(Q, 1, WR, 0, 5, 1).unwrap(), 0);
    assert!(host_setlk(&local, libc::F_UNLCK, 50, 10));
    assert_eq!(a.client.lock_as(P, 1, RD, 0, 55, 1).unwrap(), 0);
    assert_eq!(host_getlk(&local, 0, 0), Some((libc::F_WRLCK, 5, 1)), "first conflict: b's byte 5");
    // The clunk drops the process's locks on the host; the end of a session drops all.
    a.client.clunk(1).unwrap();
    assert!(host_setlk(&local, libc::F_WRLCK, 55, 1), "a's read lock went with its fid");
    b.finish().unwrap();
    assert!(host_setlk(&local, libc::F_WRLCK, 0, 0), "b's locks went with its session");
    a.finish().unwrap();
}

#[test]
fn posix_locks_belong_to_the_remote_process() {
    let dir = TempDir::new("locks");
    fs::write(dir.join("f"), b"data").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    // Process 10 opens the file twice (fids 1 and 2), process 20 once (fid 3).
    for fid in [1, 2, 3] {
        c.walk(0, fid, &["f"]).unwrap();
        c.lopen(fid, O_RDWR).unwrap();
    }
    const WR: u8 = 1;
    const RD: u8 = 0;
    const UN: u8 = 2;
    const P: u32 = 10;
    const Q: u32 = 20;
    assert_eq!(c.lock_as(P, 1, WR, 0, 0, 100).unwrap(), 0, "first write lock granted");
    assert_eq!(c.lock_as(P, 2, WR, 0, 50, 100).unwrap(), 0, "same process, second fid: no conflict");
    assert_eq!(c.lock_as(Q, 3, WR, 0, 120, 10).unwrap(), 1, "another process: BLOCKED");
    // BLOCK flag: still answered at once with BLOCKED (the kernel retries).
    assert_eq!(c.lock_as(Q, 3, RD, 1, 0, 0).unwrap(), 1);
    assert_eq!(c.lock_as(Q, 3, WR, 0, 200, 10).unwrap(), 0, "no conflict outside the range");
    // F_GETLK names the holder and the merged range it holds.
    let g = c.getlock_as(Q, 3, WR, 0, 10).unwrap();
    assert_eq!((g.ty, g.start, g.length, g.proc_id), (WR, 0, 150, P));
    assert_eq!(g.client_id.as_bytes(), b"c");
    // Linux asks with type UNLCK (it loses the F_GETLK type): any other holder is reported.
    assert_eq!(c.getlock_as(Q, 3, UN, 0, 10).unwrap().proc_id, P);
    assert_eq!(c.getlock_as(P, 1, WR, 0, 10).unwrap().ty, UN, "own locks never conflict");
    // Unlock through the second fid releases what the first took.
    assert_eq!(c.lock_as(P, 2, UN, 0, 0, 0).unwrap(), 0);
    assert_eq!(c.lock_as(Q, 3, WR, 0, 0, 100).unwrap(), 0, "granted after unlock");
    // Clunking a fid a process locked through drops all its locks on the file (close(2)).
    assert_eq!(c.lock_as(P, 1, RD, 0, 300, 10).unwrap(), 0);
    assert_eq!(c.lock_as(P, 2, RD, 0, 400, 10).unwrap(), 0);
    assert_eq!(c.lock_as(Q, 3, WR, 0, 300, 1).unwrap(), 1);
    c.clunk(2).unwrap();
    assert_eq!(c.lock_as(Q, 3, WR, 0, 300, 1).unwrap(), 0, "released by the clunk of fid 2");
    assert_eq!(c.getlock_as(Q, 3, WR, 400, 1).unwrap().ty, UN);
    // Locks need an open fid.
    c.walk(0, 4, &["f"]).unwrap();
    assert_eq!(c.lock_as(P, 4, WR, 0, 0, 0).unwrap_err(), 9);
    h.finish().unwrap();
}

#[test]
fn xattrs_read_and_written_through() {
    let dir = TempDir::new("xattr");
    fs::write(dir.join("f"), b"x").unwrap();
    let probe = rustix::fs::setxattr(dir.join("f"), "user.probe", b"1", rustix::fs::XattrFlags::empty());
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    if let Err(e) = probe {
        skip::skip(
            "ninep_ops::xattrs_read_and_written_through: the xattr value checks",
            &format!("{} has no user xattrs ({e})", dir.path().display()),
        );
        c.xattrcreate(1, "user.test", 3, 0).unwrap();
        c.write(1, 0, b"abc").unwrap();
        assert_eq!(c.clunk(1).unwrap_err(), EOPNOTSUPP);
        return;
    }
    rustix::fs::removexattr(dir.join("f"), "user.probe").unwrap();
    // Set via Txattrcreate + Twrite + Tclunk.
    c.xattrcreate(1, "user.test", 5, 0).unwrap();
    c.write(1, 0, b"hello").unwrap();
    c.clunk(1).unwrap();
    let mut buf = [0u8; 16];
    let n = rustix::fs::getxattr(dir.join("f"), "user.test", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"hello");
    // Read via Txattrwalk + Tread.
    c.walk(0, 2, &["f"]).unwrap();
    assert_eq!(c.xattrwalk(2, 3, "user.test").unwrap(), 5);
    assert_eq!(c.read(3, 0, 100).unwrap(), b"hello");
    c.clunk(3).unwrap();
    // List.
    let size = c.xattrwalk(2, 4, "").unwrap();
    let list = c.read(4, 0, size as u32).unwrap();
    assert!(list.split(|&b| b == 0).any(|n| n == b"user.test"), "list {list:?}");
    c.clunk(4).unwrap();
    // Missing attribute.
    assert_eq!(c.xattrwalk(2, 5, "user.missing").unwrap_err(), ENODATA);
    // Remove: xattrcreate with size 0.
    c.walk(0, 6, &["f"]).unwrap();
    c.xattrcreate(6, "user.test", 0, 0).unwrap();
    c.clunk(6).unwrap();
    assert!(rustix::fs::getxattr(dir.join("f"), "user.test", &mut buf[..]).is_err());
    // A short write is an error at clunk.
    c.walk(0, 7, &["f"]).unwrap();
    c.xattrcreate(7, "user.short", 10, 0).unwrap();
    c.write(7, 0, b"abc").unwrap();
    assert_eq!(c.clunk(7).unwrap_err(), EINVAL);
    h.finish().unwrap();
}

#[test]
fn errors_carry_linux_errno() {
    let dir = TempDir::new("errors");
    fs::write(dir.join("file"), b"x").unwrap();
    fs::create_dir(dir.join("full")).unwrap();
    fs::write(dir.join("full/x"), b"x").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    assert_eq!(c.walk(0, 1, &["missing"]).unwrap_err(), ENOENT);
    // Partial walk: first element fine, second missing → Rwalk with one qid, no new fid.
    assert_eq!(c.walk(0, 1, &["full", "missing"]).unwrap().len(), 1);
    assert_eq!(c.getattr(1).unwrap_err(), 9);
    assert_eq!(c.walk(0, 1, &["file", "x"]).unwrap().len(), 1);
    c.walk(0, 2, &["file"]).unwrap();
    assert_eq!(c.walk(2, 3, &["x"]).unwrap_err(), ENOTDIR);
    assert_eq!(c.mkdir(0, "file", 0o755).unwrap_err(), EEXIST);
    assert_eq!(c.unlinkat(0, "full", 0x200).unwrap_err(), ENOTEMPTY);
    assert_eq!(c.unlinkat(0, "missing", 0).unwrap_err(), ENOENT);
    assert_eq!(c.walk(0, 3, &["a/b"]).unwrap_err(), EINVAL);
    assert_eq!(c.walk(0, 3, &[""]).unwrap_err(), EINVAL);
    let many: Vec<&str> = std::iter::repeat_n("full", 17).collect();
    assert_eq!(c.walk(0, 3, &many).unwrap_err(), EINVAL);
    // Walk to a fid number that is taken.
    assert_eq!(c.walk(0, 2, &["full"]).unwrap_err(), 9);
    h.finish().unwrap();
}

#[test]
fn eacces_when_not_root() {
    if !rustix::process::geteuid().is_root() {
        skip::here("needs root to create a file another user cannot read");
        return;
    }
    let dir = TempDir::new("eacces");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("secret"), b"s").unwrap();
    fs::set_permissions(dir.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    // Drop to nobody in the server thread only (raw per-thread syscalls); the runtime's
    // blocking threads are created by that thread and inherit its credentials.
    let mut h = start_with(options(dir.path()), || {
        // SAFETY: plain syscalls with integer arguments; they affect only this thread.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534), 0);
        }
    });
    let c = &mut h.client;
    c.version(65536).unwrap();
    c.attach(0, "").unwrap();
    c.walk(0, 1, &["secret"]).unwrap();
    assert_eq!(c.lopen(1, O_RDONLY).unwrap_err(), EACCES);
    assert_eq!(c.mkdir(0, "new", 0o755).unwrap_err(), EACCES);
    c.walk(0, 2, &[]).unwrap();
    assert_eq!(c.lcreate(2, "new", O_RDWR | O_CREAT, 0o644).unwrap_err(), EACCES);
    assert!(!dir.join("new").exists());
    h.finish().unwrap();
}

#[test]
fn root_confinement() {
    let outer = TempDir::new("confine");
    let root = outer.join("root");
    fs::create_dir(&root).unwrap();
    fs::write(outer.join("outside.txt"), b"outside").unwrap();
    fs::create_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink("..", root.join("up")).unwrap();
    std::os::unix::fs::symlink(outer.path(), root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../outside.txt", root.join("d/link")).unwrap();
    let mut h = start_attached(options(&root));
    let c = &mut h.client;
    let rootq = c.getattr(0).unwrap().qid;
    // ".." at the root stays at the root, however many times.
    let q = c.walk(0, 1, &["..", "..", ".."]).unwrap();
    assert!(q.iter().all(|q| *q == rootq));
    assert_eq!(c.walk(1, 2, &["outside.txt"]).unwrap_err(), ENOENT);
    // ".." below the root goes back up, but only to the root.
    let q = c.walk(0, 3, &["d", "..", "..", "d"]).unwrap();
    assert_eq!(q[1], rootq);
    assert_eq!(q[2], rootq);
    // Symlinks are not followed by walk.
    let q = c.walk(0, 4, &["up"]).unwrap();
    assert_eq!(q[0].ty, QTSYMLINK);
    // Through a symlink: the walk stops at the link (partial Rwalk, no new fid) ...
    assert_eq!(c.walk(0, 5, &["up", "outside.txt"]).unwrap(), vec![q[0]]);
    assert_eq!(c.getattr(5).unwrap_err(), 9);
    assert_eq!(c.walk(0, 5, &["abs", "outside.txt"]).unwrap().len(), 1);
    // ... and starting from the link itself it is refused outright.
    // (ENOTDIR or ELOOP: a symlink is never a directory to the server.)
    let not_a_dir = |e: u32| e == ENOTDIR || e == ELOOP;
    assert!(not_a_dir(c.walk(4, 5, &["outside.txt"]).unwrap_err()));
    c.walk(0, 10, &["abs"]).unwrap();
    assert!(not_a_dir(c.walk(10, 5, &["root", "d"]).unwrap_err()));
    c.walk(0, 6, &["d", "link"]).unwrap();
    assert_eq!(c.lopen(6, O_RDONLY).unwrap_err(), ELOOP);
    assert_eq!(c.readlink(6).unwrap(), b"../outside.txt");
    // Attach names are confined the same way.
    assert_eq!(c.attach(7, "../..").unwrap(), rootq);
    assert!(not_a_dir(c.walk(4, 8, &["d"]).unwrap_err()));
    // Creating through a symlinked directory fails too.
    c.walk(0, 9, &["abs"]).unwrap();
    assert!(c.mkdir(9, "x", 0o755).is_err());
    assert!(!outer.join("x").exists());
    h.finish().unwrap();
}

const EPERM: u32 = 1;
const SET_MODE: u32 = 0x1;
const SET_UID: u32 = 0x2;
const SET_GID: u32 = 0x4;
const SET_SIZE: u32 = 0x8;
const SET_ATIME: u32 = 0x10;
const SET_MTIME: u32 = 0x20;
const SET_ATIME_SET: u32 = 0x80;
const SET_MTIME_SET: u32 = 0x100;

/// Where a file stands: its bytes and the metadata a stray chmod, chown, utimes, truncate or
/// link would change.
fn footprint(path: &std::path::Path) -> (Vec<u8>, u32, u32, u32, i64, u64) {
    let m = fs::metadata(path).unwrap();
    (fs::read(path).unwrap(), m.mode(), m.uid(), m.gid(), m.mtime(), m.nlink())
}

#[test]
fn no_operation_on_a_symlink_reaches_its_target_outside_the_root() {
    let outer = TempDir::new("symops");
    let root = outer.join("root");
    fs::create_dir(&root).unwrap();
    let target = outer.join("target");
    fs::write(&target, b"outside").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
    let before = footprint(&target);
    std::os::unix::fs::symlink(&target, root.join("s")).unwrap();
    std::os::unix::fs::symlink(outer.join("made"), root.join("dangling")).unwrap();
    let me = fs::symlink_metadata(root.join("s")).unwrap();
    let mut h = start_attached(options(&root));
    let c = &mut h.client;
    c.walk(0, 1, &["s"]).unwrap();
    let t = |valid| Tsetattr {
        fid: 1,
        valid,
        mode: 0o4777,
        uid: me.uid(),
        gid: me.gid(),
        size: 0,
        atime_sec: 1000,
        mtime_sec: 1000,
        ..Default::default()
    };
    // chmod and truncate are refused; chown and times reach the link itself (lchown, lutimes).
    assert_eq!(c.setattr(t(SET_MODE)).unwrap_err(), EOPNOTSUPP);
    assert_eq!(c.setattr(t(SET_SIZE)).unwrap_err(), EINVAL);
    c.setattr(t(SET_UID | SET_GID)).unwrap();
    c.setattr(t(SET_ATIME | SET_MTIME | SET_ATIME_SET | SET_MTIME_SET)).unwrap();
    assert_eq!(fs::symlink_metadata(root.join("s")).unwrap().mtime(), 1000);
    // Extended attributes: none read, none written.
    assert_eq!(c.xattrwalk(1, 2, "user.x").unwrap_err(), ENODATA);
    c.walk(1, 2, &[]).unwrap();
    c.xattrcreate(2, "user.x", 3, 0).unwrap();
    c.write(2, 0, b"abc").unwrap();
    assert_eq!(c.clunk(2).unwrap_err(), EPERM);
    // Opening it, or creating over it or over a dangling one, with or without O_EXCL.
    assert_eq!(c.lopen(1, O_RDWR | O_TRUNC).unwrap_err(), ELOOP);
    c.walk(0, 3, &[]).unwrap();
    assert_eq!(c.lcreate(3, "s", O_RDWR | O_CREAT | O_TRUNC, 0o666).unwrap_err(), ELOOP);
    assert_eq!(c.lcreate(3, "dangling", O_RDWR | O_CREAT, 0o666).unwrap_err(), ELOOP);
    assert_eq!(c.lcreate(3, "dangling", O_RDWR | O_CREAT | O_EXCL, 0o666).unwrap_err(), EEXIST);
    assert_eq!(c.mkdir(0, "dangling", 0o755).unwrap_err(), EEXIST);
    assert_eq!(c.symlink(0, "dangling", "x").unwrap_err(), EEXIST);
    // A hard link of it is a second link, not a link of the target; rename and unlink move
    // and remove links.
    c.link(0, 1, "hard").unwrap();
    assert!(fs::symlink_metadata(root.join("hard")).unwrap().file_type().is_symlink());
    c.renameat(0, "hard", 0, "moved").unwrap();
    c.unlinkat(0, "moved", 0).unwrap();
    c.remove(1).unwrap();
    assert!(fs::symlink_metadata(root.join("s")).is_err());
    assert!(fs::symlink_metadata(outer.join("made")).is_err(), "created outside the root");
    assert_eq!(footprint(&target), before);
    h.finish().unwrap();
}

#[test]
fn a_directory_swapped_for_a_symlink_after_the_walk_is_not_followed() {
    let outer = TempDir::new("swap");
    let root = outer.join("root");
    fs::create_dir_all(root.join("d")).unwrap();
    fs::write(root.join("d/f"), b"inside").unwrap();
    fs::create_dir(outer.join("elsewhere")).unwrap();
    let victim = outer.join("elsewhere/f");
    fs::write(&victim, b"outside").unwrap();
    let before = footprint(&victim);
    let mut h = start_attached(options(&root));
    let c = &mut h.client;
    c.walk(0, 1, &["d", "f"]).unwrap();
    c.walk(0, 2, &["d", "f"]).unwrap();
    c.walk(0, 3, &["d"]).unwrap();
    // The host (or a race) swaps the directory for a symlink out of the export.
    fs::rename(root.join("d"), root.join("d.orig")).unwrap();
    std::os::unix::fs::symlink(outer.join("elsewhere"), root.join("d")).unwrap();
    // Requests that go by the fid's name resolve "d" without following it (ENOTDIR: the
    // symlink itself is no directory; ELOOP: a lookup refused to follow it).
    let not_followed = |e: u32| e == ENOTDIR || e == ELOOP;
    let e = c.remove(1).unwrap_err();
    assert!(not_followed(e), "remove: {e}");
    let e = c.rename(2, 0, "stolen").unwrap_err();
    assert!(not_followed(e), "rename: {e}");
    assert_eq!(c.walk(0, 4, &["d", "f"]).unwrap().len(), 1, "walked through the symlink");
    // A fid holds its directory: what it creates and removes stays in that directory.
    c.walk(3, 5, &[]).unwrap();
    c.lcreate(5, "new", O_RDWR | O_CREAT, 0o644).unwrap();
    c.write(5, 0, b"n").unwrap();
    assert_eq!(fs::read(root.join("d.orig/new")).unwrap(), b"n");
    c.unlinkat(3, "f", 0).unwrap();
    assert!(!root.join("d.orig/f").exists());
    c.walk(3, 6, &[]).unwrap();
    c.lopen(6, O_RDONLY | O_DIRECTORY).unwrap();
    let names: Vec<String> = c
        .readdir_all(6, 4096)
        .unwrap()
        .0
        .iter()
        .map(|d| String::from_utf8_lossy(d.name.as_bytes()).into_owned())
        .collect();
    assert!(names.contains(&"new".to_string()) && !names.contains(&"f".to_string()), "{names:?}");
    assert!(!outer.join("elsewhere/new").exists());
    assert!(!outer.join("elsewhere/stolen").exists() && !root.join("stolen").exists());
    assert_eq!(footprint(&victim), before);
    h.finish().unwrap();
}

#[test]
fn read_only_export_refuses_changes() {
    let dir = TempDir::new("ro");
    fs::write(dir.join("f"), b"content").unwrap();
    fs::create_dir(dir.join("d")).unwrap();
    let mut opts = options(dir.path());
    opts.read_only = true;
    let mut h = start_attached(opts);
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    assert_eq!(c.lopen(1, O_RDWR).unwrap_err(), EROFS);
    assert_eq!(c.lopen(1, O_RDONLY | O_TRUNC).unwrap_err(), EROFS);
    c.lopen(1, O_RDONLY).unwrap();
    assert_eq!(c.read(1, 0, 100).unwrap(), b"content");
    c.walk(0, 2, &[]).unwrap();
    assert_eq!(c.lcreate(2, "new", O_RDWR | O_CREAT, 0o644).unwrap_err(), EROFS);
    assert_eq!(c.mkdir(0, "nd", 0o755).unwrap_err(), EROFS);
    assert_eq!(c.symlink(0, "s", "f").unwrap_err(), EROFS);
    assert_eq!(c.renameat(0, "f", 0, "g").unwrap_err(), EROFS);
    assert_eq!(c.unlinkat(0, "f", 0).unwrap_err(), EROFS);
    assert_eq!(c.link(0, 1, "h").unwrap_err(), EROFS);
    c.walk(0, 3, &["f"]).unwrap();
    assert_eq!(c.setattr(Tsetattr { fid: 3, valid: 0x8, ..Default::default() }).unwrap_err(), EROFS);
    assert_eq!(c.xattrcreate(3, "user.x", 1, 0).unwrap_err(), EROFS);
    assert_eq!(c.remove(3).unwrap_err(), EROFS);
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"content");
    assert!(dir.join("d").is_dir());
    h.finish().unwrap();
}

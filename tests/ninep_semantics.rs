//! The export behaves like a local POSIX file system: a fid is the file it was walked or
//! opened to (whatever happens to the name later), modes are exactly the requested ones
//! whatever our umask, new objects belong to the attaching user and the requested group.

mod ninep_support;
#[path = "common/skip.rs"]
mod skip;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use cpu_all::ninep::wire::*;
use ninep_support::*;

const EPERM: u32 = 1;
const EOPNOTSUPP: u32 = 95;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn setattr(valid: u32) -> Tsetattr {
    Tsetattr { fid: 0, valid, ..Default::default() }
}

const SET_MODE: u32 = 0x1;
const SET_UID: u32 = 0x2;
const SET_GID: u32 = 0x4;
const SET_SIZE: u32 = 0x8;
const SET_ATIME: u32 = 0x10;
const SET_MTIME: u32 = 0x20;
const SET_ATIME_SET: u32 = 0x80;
const SET_MTIME_SET: u32 = 0x100;

#[test]
fn an_open_fid_keeps_its_file_when_the_name_is_recreated() {
    let dir = TempDir::new("fidfile");
    fs::write(dir.join("f"), b"old contents").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    c.lopen(1, O_RDWR).unwrap();
    // The name now means another file.
    fs::remove_file(dir.join("f")).unwrap();
    fs::write(dir.join("f"), b"new").unwrap();
    // fstat: the old file, unlinked.
    let a = c.getattr(1).unwrap();
    assert_eq!((a.size, a.nlink), (12, 0));
    // ftruncate and futimens act on the old file; the new one is untouched.
    let t = Tsetattr {
        fid: 1,
        valid: SET_SIZE | SET_MTIME | SET_MTIME_SET,
        size: 3,
        mtime_sec: 1_000_000,
        ..Default::default()
    };
    c.setattr(t).unwrap();
    let a = c.getattr(1).unwrap();
    assert_eq!((a.size, a.mtime_sec), (3, 1_000_000));
    assert_eq!(c.read(1, 0, 100).unwrap(), b"old");
    let new = fs::metadata(dir.join("f")).unwrap();
    assert_eq!(new.len(), 3);
    assert_ne!(new.mtime(), 1_000_000);
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"new");
    if is_root() {
        // fchown too.
        c.setattr(Tsetattr { fid: 1, valid: SET_UID | SET_GID, uid: 4321, gid: 4322, ..Default::default() })
            .unwrap();
        let a = c.getattr(1).unwrap();
        assert_eq!((a.uid, a.gid), (4321, 4322));
        assert_eq!(fs::metadata(dir.join("f")).unwrap().uid(), 0);
    }
    h.finish().unwrap();
}

#[test]
fn a_walked_fid_keeps_its_file_when_a_rename_replaces_the_name() {
    let dir = TempDir::new("fidrename");
    fs::write(dir.join("g"), b"gg").unwrap();
    fs::write(dir.join("h"), b"hhhhhhhh").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    let q = c.walk(0, 1, &["g"]).unwrap();
    fs::rename(dir.join("h"), dir.join("g")).unwrap();
    let a = c.getattr(1).unwrap();
    assert_eq!((a.qid.path, a.size, a.nlink), (q[0].path, 2, 0), "still the replaced file");
    // Opening the fid opens that file, not the one now under its name.
    c.lopen(1, O_RDONLY).unwrap();
    assert_eq!(c.read(1, 0, 100).unwrap(), b"gg");
    // Names are resolved in the directory fid when a call needs one.
    c.walk(0, 2, &[]).unwrap();
    assert_eq!(c.getattr(2).unwrap().qid.ty, QTDIR);
    c.walk(0, 3, &["g"]).unwrap();
    c.lopen(3, O_RDONLY).unwrap();
    assert_eq!(c.read(3, 0, 100).unwrap(), b"hhhhhhhh");
    h.finish().unwrap();
}

#[test]
fn a_directory_fid_creates_in_its_directory_after_a_rename() {
    let dir = TempDir::new("dirfid");
    fs::create_dir(dir.join("d")).unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["d"]).unwrap();
    fs::rename(dir.join("d"), dir.join("moved")).unwrap();
    fs::create_dir(dir.join("d")).unwrap();
    c.mkdir(1, "sub", 0o755).unwrap();
    assert!(dir.join("moved/sub").is_dir());
    assert!(!dir.join("d/sub").exists());
    h.finish().unwrap();
}

#[test]
fn modes_are_exactly_the_requested_ones_whatever_the_umask() {
    let dir = TempDir::new("modes");
    // The process umask must not narrow what the remote asked for.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &[]).unwrap();
    c.lcreate(1, "f666", O_RDWR | O_CREAT, 0o666).unwrap();
    c.mkdir(0, "d777", 0o777).unwrap();
    c.mkdir(0, "d2775", 0o2775).unwrap();
    let r = c.rpc(Tmessage::Mknod(Tmknod {
        dfid: 0,
        name: "fifo".into(),
        mode: 0o010666,
        major: 0,
        minor: 0,
        gid: 0,
    }));
    assert!(r.is_ok(), "{r:?}");
    // Set-user-ID and set-group-ID on a file are dropped at creation ...
    c.walk(0, 2, &[]).unwrap();
    c.lcreate(2, "suid", O_RDWR | O_CREAT, 0o6755).unwrap();
    rustix::process::umask(old);
    let mode = |p: &str| fs::symlink_metadata(dir.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("f666"), 0o666);
    assert_eq!(mode("d777"), 0o777);
    assert_eq!(mode("d2775"), 0o2775, "set-group-ID on a directory is inheritance, allowed");
    assert_eq!(mode("fifo"), 0o666);
    assert_eq!(mode("suid"), 0o755);
    // ... and refused by setattr.
    c.walk(0, 3, &["f666"]).unwrap();
    for bad in [0o4755, 0o2755, 0o6777] {
        let t = Tsetattr { fid: 3, mode: bad, ..setattr(SET_MODE) };
        assert_eq!(c.setattr(t).unwrap_err(), EPERM, "{bad:o}");
    }
    c.setattr(Tsetattr { fid: 3, mode: 0o1640, ..setattr(SET_MODE) }).unwrap();
    assert_eq!(mode("f666"), 0o1640);
    // On a directory both bits carry no privilege: chmod 07777 works as locally.
    c.walk(0, 6, &["d777"]).unwrap();
    c.setattr(Tsetattr { fid: 6, mode: 0o7777, ..setattr(SET_MODE) }).unwrap();
    assert_eq!(mode("d777"), 0o7777);
    // Creating an existing file without O_EXCL opens it and leaves its mode alone.
    c.walk(0, 4, &[]).unwrap();
    c.lcreate(4, "f666", O_RDWR | O_CREAT, 0o600).unwrap();
    assert_eq!(mode("f666"), 0o1640);
    // A symlink's mode cannot be set (as chmod on Linux).
    c.symlink(0, "l", "f666").unwrap();
    c.walk(0, 5, &["l"]).unwrap();
    assert_eq!(c.setattr(Tsetattr { fid: 5, mode: 0o600, ..setattr(SET_MODE) }).unwrap_err(), EOPNOTSUPP);
    // Times of a symlink itself (utimensat AT_SYMLINK_NOFOLLOW) are set on the link.
    let t = Tsetattr {
        fid: 5,
        valid: SET_ATIME | SET_MTIME | SET_ATIME_SET | SET_MTIME_SET,
        atime_sec: 7,
        mtime_sec: 8,
        ..Default::default()
    };
    c.setattr(t).unwrap();
    assert_eq!(fs::symlink_metadata(dir.join("l")).unwrap().mtime(), 8);
    assert_ne!(fs::metadata(dir.join("f666")).unwrap().mtime(), 8);
    h.finish().unwrap();
}

#[test]
fn device_nodes_cannot_be_made() {
    let dir = TempDir::new("nodev");
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    // /dev/kmsg (char 1:11) and /dev/sda (block 8:0): refused whoever we are.
    for (name, mode, major, minor) in [("kmsg", 0o020666, 1, 11), ("sda", 0o060666, 8, 0)] {
        let t = Tmknod { dfid: 0, name: name.into(), mode, major, minor, gid: 0 };
        assert_eq!(c.rpc(Tmessage::Mknod(t)).unwrap_err(), EPERM, "{name}");
        assert!(fs::symlink_metadata(dir.join(name)).is_err(), "{name} exists");
    }
    // A socket node is fine.
    let t = Tmknod { dfid: 0, name: "sock".into(), mode: 0o140600, major: 0, minor: 0, gid: 0 };
    c.rpc(Tmessage::Mknod(t)).unwrap();
    h.finish().unwrap();
}

#[test]
fn writing_or_truncating_a_set_id_file_clears_its_set_id_bits() {
    // Only a writer with CAP_FSETID (root) keeps the bits: the kernel clears them for others
    // itself, so without root this test could not fail.
    if !is_root() {
        skip::here("needs root: without CAP_FSETID the kernel clears the bits itself");
        return;
    }
    let dir = TempDir::new("setidwrite");
    // 02755: set-group-ID with group execute is a privilege; 02644 (no group execute) is
    // not (the kernel leaves it, and so do we); 01755: sticky, no privilege.
    let cases = [("u", 0o4755, 0o755), ("g", 0o2755, 0o755), ("ug", 0o6755, 0o755), ("g-x", 0o2644, 0o2644)];
    for (name, mode, _) in cases {
        fs::write(dir.join(name), b"#!/bin/sh\necho original\n").unwrap();
        fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    for name in ["trunc", "opentrunc"] {
        fs::write(dir.join(name), b"x").unwrap();
        fs::set_permissions(dir.join(name), fs::Permissions::from_mode(0o4755)).unwrap();
    }
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    let mut fid = 1;
    for (name, _, _) in cases {
        c.walk(0, fid, &[name]).unwrap();
        c.lopen(fid, O_RDWR).unwrap();
        c.write(fid, 0, b"#!/bin/sh\nid -u\n").unwrap();
        fid += 1;
    }
    // Truncating through Tsetattr, and opening with O_TRUNC.
    c.walk(0, fid, &["trunc"]).unwrap();
    c.setattr(Tsetattr { fid, valid: 0x8, size: 0, ..Default::default() }).unwrap();
    c.walk(0, fid + 1, &["opentrunc"]).unwrap();
    c.lopen(fid + 1, O_WRONLY | O_TRUNC).unwrap();
    h.finish().unwrap();
    let mode = |name: &str| fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o7777;
    for (name, _, after) in cases {
        assert_eq!(mode(name), after, "{name}");
    }
    assert_eq!(mode("trunc"), 0o755);
    assert_eq!(mode("opentrunc"), 0o755);
}

#[test]
fn protected_xattrs_cannot_be_written() {
    let dir = TempDir::new("secxattr");
    fs::write(dir.join("f"), b"").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    for (fid, name) in [(1, "security.capability"), (2, "trusted.overlay.opaque"), (3, "security.selinux")] {
        c.walk(0, fid, &["f"]).unwrap();
        assert_eq!(c.xattrcreate(fid, name, 4, 0).unwrap_err(), EPERM, "{name}");
        // Removal (size 0) too.
        assert_eq!(c.xattrcreate(fid, name, 0, 0).unwrap_err(), EPERM, "{name}");
    }
    h.finish().unwrap();
}

fn attach_as(c: &mut Client, fid: u32, uid: u32) {
    let t = Tattach { fid, afid: NOFID, uname: "u".into(), aname: "".into(), n_uname: uid };
    c.rpc(Tmessage::Attach(t)).unwrap();
}

#[test]
fn new_objects_belong_to_the_attaching_user_and_requested_group() {
    if !is_root() {
        skip::here("needs root to give files away");
        return;
    }
    let dir = TempDir::new("owners");
    let mut h = start(options(dir.path()));
    let c = &mut h.client;
    c.version(1 << 20).unwrap();
    attach_as(c, 0, 4321);
    attach_as(c, 100, 0);
    c.walk(0, 1, &[]).unwrap();
    let t = Tlcreate { fid: 1, name: "f".into(), flags: O_RDWR | O_CREAT, mode: 0o644, gid: 4322 };
    c.rpc(Tmessage::Lcreate(t)).unwrap();
    let t = Tmkdir { dfid: 0, name: "d".into(), mode: 0o755, gid: 4321 };
    c.rpc(Tmessage::Mkdir(t)).unwrap();
    let t = Tsymlink { fid: 0, name: "l".into(), target: "f".into(), gid: 4323 };
    c.rpc(Tmessage::Symlink(t)).unwrap();
    let t = Tmknod { dfid: 0, name: "p".into(), mode: 0o010640, major: 0, minor: 0, gid: 4321 };
    c.rpc(Tmessage::Mknod(t)).unwrap();
    // Another user's attach creates as that user.
    let t = Tmkdir { dfid: 100, name: "rootdir".into(), mode: 0o700, gid: 0 };
    c.rpc(Tmessage::Mkdir(t)).unwrap();
    let owner = |p: &str| {
        let m = fs::symlink_metadata(dir.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("f"), (4321, 4322));
    assert_eq!(owner("d"), (4321, 4321));
    assert_eq!(owner("l"), (4321, 4323));
    assert_eq!(owner("p"), (4321, 4321));
    assert_eq!(owner("rootdir"), (0, 0));
    // Fids walked from an attach keep its user.
    c.walk(0, 2, &["d"]).unwrap();
    c.mkdir(2, "sub", 0o750).unwrap();
    assert_eq!(owner("d/sub").0, 4321);
    h.finish().unwrap();
}

#[test]
fn as_a_normal_user_the_group_is_honoured_where_chown_allows() {
    if !is_root() {
        skip::here("needs root to switch the server thread's user");
        return;
    }
    let dir = TempDir::new("groups");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    // The server thread (and the pool threads it starts) runs as 4321 in groups 4321, 4400.
    let mut h = start_with(options(dir.path()), || {
        let groups: [libc::gid_t; 2] = [4321, 4400];
        // SAFETY: plain syscalls with valid arguments; they affect only this thread.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 2, groups.as_ptr()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, 4321, 4321, 4321), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 4321, 4321, 4321), 0);
        }
    });
    let c = &mut h.client;
    c.version(1 << 20).unwrap();
    attach_as(c, 0, 4321);
    let t = Tmkdir { dfid: 0, name: "member".into(), mode: 0o775, gid: 4400 };
    c.rpc(Tmessage::Mkdir(t)).unwrap();
    let t = Tmkdir { dfid: 0, name: "stranger".into(), mode: 0o775, gid: 0 };
    c.rpc(Tmessage::Mkdir(t)).unwrap();
    c.walk(0, 1, &[]).unwrap();
    let t = Tlcreate { fid: 1, name: "f".into(), flags: O_RDWR | O_CREAT, mode: 0o664, gid: 4400 };
    c.rpc(Tmessage::Lcreate(t)).unwrap();
    let owner = |p: &str| {
        let m = fs::symlink_metadata(dir.join(p)).unwrap();
        (m.uid(), m.gid(), m.permissions().mode() & 0o7777)
    };
    assert_eq!(owner("member"), (4321, 4400, 0o775));
    assert_eq!(owner("stranger"), (4321, 4321, 0o775), "a group we are not in falls back to ours");
    assert_eq!(owner("f"), (4321, 4400, 0o664));
    // The owner may set times and modes of its own file.
    c.walk(0, 2, &["f"]).unwrap();
    c.setattr(Tsetattr { fid: 2, valid: SET_ATIME | SET_MTIME, ..Default::default() }).unwrap();
    c.setattr(Tsetattr { fid: 2, valid: SET_MODE, mode: 0o600, ..Default::default() }).unwrap();
    assert_eq!(owner("f").2, 0o600);
    h.finish().unwrap();
}

/// Tlink of a symlink's fid links the symlink itself (link(2) does not follow), through
/// whichever way the server links an inode: as root (AT_EMPTY_PATH) or as a normal user
/// (the inode's /proc/self/fd name), both checked here.
fn link_a_symlink(dir: &TempDir, c: &mut Client) {
    fs::write(dir.join("target"), b"the target").unwrap();
    c.symlink(0, "s", "target").unwrap();
    c.walk(0, 1, &["s"]).unwrap();
    c.link(0, 1, "hard").unwrap();
    let s = fs::symlink_metadata(dir.join("s")).unwrap();
    let hard = fs::symlink_metadata(dir.join("hard")).unwrap();
    assert!(hard.file_type().is_symlink(), "the link is a symlink, not the target: {hard:?}");
    assert_eq!((hard.ino(), hard.nlink()), (s.ino(), 2), "same inode as the symlink");
    assert_eq!(fs::read_link(dir.join("hard")).unwrap(), std::path::Path::new("target"));
    assert_eq!(fs::metadata(dir.join("target")).unwrap().nlink(), 1, "the target was not linked");
    // The fid keeps its file: replacing the name does not change what it links.
    fs::remove_file(dir.join("s")).unwrap();
    fs::write(dir.join("s"), b"a file now").unwrap();
    c.link(0, 1, "hard2").unwrap();
    assert_eq!(fs::symlink_metadata(dir.join("hard2")).unwrap().ino(), s.ino());
}

#[test]
fn a_hard_link_to_a_symlink_links_the_symlink_itself() {
    let dir = TempDir::new("linksym");
    let mut h = start_attached(options(dir.path()));
    link_a_symlink(&dir, &mut h.client);
    h.finish().unwrap();
}

#[test]
fn a_hard_link_to_a_symlink_without_privileges() {
    if !is_root() {
        // As a normal user the server takes the same path this test forces below.
        let dir = TempDir::new("linksym-user");
        let mut h = start_attached(options(dir.path()));
        link_a_symlink(&dir, &mut h.client);
        h.finish().unwrap();
        return;
    }
    let dir = TempDir::new("linksym-user");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    // The server thread (and its pool threads) run as 4321, without CAP_DAC_READ_SEARCH.
    let mut h = start_with(options(dir.path()), || {
        // SAFETY: plain syscalls with valid arguments; they affect only this thread.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, 4321, 4321, 4321), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, 4321, 4321, 4321), 0);
        }
    });
    let c = &mut h.client;
    c.version(1 << 20).unwrap();
    attach_as(c, 0, 4321);
    link_a_symlink(&dir, c);
    assert_eq!(fs::symlink_metadata(dir.join("hard")).unwrap().uid(), 4321);
    h.finish().unwrap();
}

/// A raw `system.posix_acl_*` value: version 2, then (tag, perm, id) entries.
fn posix_acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

#[test]
fn a_default_acl_shapes_new_files_as_on_a_local_file_system() {
    let dir = TempDir::new("defacl");
    fs::create_dir(dir.join("d")).unwrap();
    const UNDEFINED: u32 = u32::MAX;
    // user::rwx user:4321:rwx group::r-x mask::r-x other::r-x
    let default = posix_acl(&[
        (0x01, 7, UNDEFINED),
        (0x02, 7, 4321),
        (0x04, 5, UNDEFINED),
        (0x10, 5, UNDEFINED),
        (0x20, 5, UNDEFINED),
    ]);
    let d = dir.join("d");
    if let Err(e) =
        rustix::fs::setxattr(&d, "system.posix_acl_default", &default, rustix::fs::XattrFlags::empty())
    {
        skip::skip("default ACL", &format!("{} does not take POSIX ACLs: {e}", dir.path().display()));
        return;
    }
    // What a local create gives (no umask under a default ACL) ...
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    fs::File::create(d.join("local")).unwrap();
    fs::create_dir(d.join("localdir")).unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    // ... and the same through 9P: a file 0666, a directory 0777.
    c.walk(0, 1, &["d"]).unwrap();
    c.lcreate(1, "remote", O_RDWR | O_CREAT, 0o666).unwrap();
    c.walk(0, 2, &["d"]).unwrap();
    c.mkdir(2, "remotedir", 0o777).unwrap();
    rustix::process::umask(old);
    let mode = |p: &str| fs::metadata(d.join(p)).unwrap().permissions().mode() & 0o7777;
    let acl = |p: &str| {
        let mut buf = [0u8; 256];
        let n = rustix::fs::getxattr(d.join(p), "system.posix_acl_access", &mut buf).unwrap();
        buf[..n].to_vec()
    };
    // The mask is r-- (the default mask r-x narrowed by the mode's rw-): 0644 shown.
    assert_eq!((mode("local"), mode("remote")), (0o644, 0o644));
    assert_eq!((mode("localdir"), mode("remotedir")), (0o755, 0o755));
    // The inherited access ACLs are the local ones, mask entry (0x10) included.
    assert_eq!(acl("local"), acl("remote"));
    assert_eq!(acl("localdir"), acl("remotedir"));
    let mask = |v: &[u8]| v[4..].chunks(8).find(|e| e[0] == 0x10).map(|e| e[2]);
    assert_eq!(mask(&acl("remote")), Some(4), "mask r--");
    h.finish().unwrap();
}

const EINVAL: u32 = 22;
const EOVERFLOW: u32 = 75;

#[test]
fn lock_ranges_are_checked_as_fcntl_checks_them() {
    let dir = TempDir::new("lockrange");
    fs::write(dir.join("f"), b"x").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    c.lopen(1, O_RDWR).unwrap();
    const WR: u8 = 1;
    let max = i64::MAX as u64;
    // A start that would be a negative off_t: EINVAL, for set and get.
    assert_eq!(c.lock(1, WR, 0, 1 << 63, 1).unwrap_err(), EINVAL);
    assert_eq!(c.lock(1, WR, 0, u64::MAX, 0).unwrap_err(), EINVAL);
    assert_eq!(c.getlock(1, WR, u64::MAX, 1).unwrap_err(), EINVAL);
    // An end past the largest offset: EOVERFLOW (and no wrap to a small range).
    assert_eq!(c.lock(1, WR, 0, max, 2).unwrap_err(), EOVERFLOW);
    assert_eq!(c.lock(1, WR, 0, 10, u64::MAX).unwrap_err(), EOVERFLOW);
    assert_eq!(c.getlock(1, WR, 1, max + 1).unwrap_err(), EOVERFLOW);
    // Nothing was taken by those: another process may lock everything.
    assert_eq!(c.getlock_as(2, 1, WR, 0, 0).unwrap().ty, 2, "unlocked");
    // The last byte itself is a fine range, reported back exactly.
    assert_eq!(c.lock(1, WR, 0, max, 1).unwrap(), 0);
    let held = c.getlock_as(2, 1, WR, 0, 0).unwrap();
    assert_eq!((held.ty, held.start, held.length, held.proc_id), (WR, max, 1, 1));
    h.finish().unwrap();
}

#[test]
fn offsets_and_sizes_beyond_off_t_are_refused() {
    let dir = TempDir::new("offsets");
    fs::write(dir.join("f"), b"contents").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    c.lopen(1, O_RDWR).unwrap();
    for off in [1u64 << 63, u64::MAX] {
        assert_eq!(c.read(1, off, 10).unwrap_err(), EINVAL, "read at {off}");
        assert_eq!(c.write(1, off, b"zz").unwrap_err(), EINVAL, "write at {off}");
        let t = Tsetattr { fid: 1, valid: SET_SIZE, size: off, ..Default::default() };
        assert_eq!(c.setattr(t).unwrap_err(), EINVAL, "truncate to {off}");
    }
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"contents");
    c.walk(0, 2, &[]).unwrap();
    c.lopen(2, O_RDONLY | O_DIRECTORY).unwrap();
    let r = c.rpc(Tmessage::Readdir(Treaddir { fid: 2, offset: u64::MAX, count: 4096 }));
    assert_eq!(r.unwrap_err(), EINVAL);
    h.finish().unwrap();
}

#[test]
fn times_before_1970_survive_the_round_trip() {
    let dir = TempDir::new("oldtimes");
    fs::write(dir.join("f"), b"").unwrap();
    let mut h = start_attached(options(dir.path()));
    let c = &mut h.client;
    c.walk(0, 1, &["f"]).unwrap();
    // 1969-12-31 00:00:00.5 and 1901-12-13 20:45:52 (the smallest 32-bit time_t), sent as
    // the Linux client sends them: the two's-complement bits of tv_sec.
    let (day_before, old) = (-86_400i64, -2_147_483_648i64);
    let t = Tsetattr {
        fid: 1,
        valid: SET_ATIME | SET_MTIME | SET_ATIME_SET | SET_MTIME_SET,
        atime_sec: old as u64,
        atime_nsec: 0,
        mtime_sec: day_before as u64,
        mtime_nsec: 500_000_000,
        ..Default::default()
    };
    c.setattr(t).unwrap();
    let m = fs::metadata(dir.join("f")).unwrap();
    assert_eq!((m.mtime(), m.mtime_nsec(), m.atime()), (day_before, 500_000_000, old));
    let a = c.getattr(1).unwrap();
    assert_eq!((a.mtime_sec as i64, a.mtime_nsec, a.atime_sec as i64), (day_before, 500_000_000, old));
    // Nanoseconds of a second or more are refused, including the values that mean "now" and
    // "leave it" to utimensat(2): the times stay as they are.
    for nsec in [1_000_000_000u64, (1 << 30) - 1, (1 << 30) - 2, u64::MAX] {
        let t = Tsetattr {
            fid: 1,
            valid: SET_MTIME | SET_MTIME_SET,
            mtime_sec: 5,
            mtime_nsec: nsec,
            ..Default::default()
        };
        assert_eq!(c.setattr(t).unwrap_err(), EINVAL, "nsec {nsec}");
    }
    assert_eq!(fs::metadata(dir.join("f")).unwrap().mtime(), day_before);
    h.finish().unwrap();
}

//! The `cpud -remote` setup sequence against the recording double: order of the privileged
//! calls, the 9P mount options and msize fallback, the fstab decisions, the clear errors.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use cpu_all::error::EXIT_REMOTE_SETUP;
use cpu_all::namespace::fstab::ms;
use cpu_all::namespace::session::{prepare_session, SessionSettings, NEED_CAP_SYS_ADMIN, NO_9P_SUPPORT};
use cpu_all::namespace::{client_fstab, Call, RecordingOps};

const NONCE: &str = "0123456789abcdef0123456789abcdef";
const EPERM: i32 = 1;
const ECONNREFUSED: i32 = 111;
const ENODEV: i32 = 19;

fn settings(fstab: Option<String>) -> SessionSettings {
    SessionSettings {
        nonce: Some(NONCE.into()),
        port9p: Some(4242),
        user: "me".into(),
        fstab,
        msize: None,
        mount_opts: None,
        pwd: Some(OsString::from("/home/me/src")),
        kernel_release: None,
        system_mount: false,
    }
}

/// A client with the usual directories, seen under /tmp/cpu once 9p is mounted.
fn client_tree(ops: RecordingOps) -> RecordingOps {
    ops.with_mount_contents(
        "/tmp/cpu",
        &[
            "/tmp/cpu/lib",
            "/tmp/cpu/lib64",
            "/tmp/cpu/usr",
            "/tmp/cpu/bin",
            "/tmp/cpu/etc",
            "/tmp/cpu/home/me/src",
        ],
        &["/tmp/cpu/etc/hosts"],
    )
    .with_dir("/lib")
    .with_dir("/usr")
    .with_dir("/bin")
    .with_dir("/etc")
    .with_dir("/home")
}

fn mount(source: &str, target: &str, fstype: &str, flags: u32, data: &str) -> Call {
    Call::Mount {
        source: source.into(),
        target: target.into(),
        fstype: fstype.into(),
        flags,
        data: data.into(),
    }
}

fn ninep_data(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Mount { fstype, data, .. } if fstype == "9p" => Some(data.clone()),
            _ => None,
        })
        .collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn full_sequence_in_order() {
    let mut ops = client_tree(RecordingOps::new()).with_memory_root();
    let fstab = client_fstab(cpu_all::options::DEFAULT_NAMESPACE, None).unwrap();
    let prepared = prepare_session(&mut ops, &settings(Some(fstab))).unwrap();
    let data = ninep_data(&ops.calls);
    assert_eq!(data.len(), 1);
    let fd: String =
        data[0].split("rfdno=").nth(1).unwrap().chars().take_while(char::is_ascii_digit).collect();
    assert_eq!(
        data[0],
        format!("version=9p2000.L,trans=fd,rfdno={fd},wfdno={fd},uname=me,noxattr,msize=1048576")
    );
    let bind = ms::BIND;
    assert_eq!(
        ops.calls,
        vec![
            Call::Unshare,
            Call::MakePrivate("/".into()),
            mount("cpu", "/tmp", "tmpfs", 0, ""),
            Call::MkdirAll("/tmp/cpu".into()),
            Call::MkdirAll("/tmp/local".into()),
            mount("/", "/tmp/local", "", bind, ""),
            Call::Dial { addr: addr("127.0.0.1:4242"), greeting: NONCE.as_bytes().to_vec() },
            mount("localhost", "/tmp/cpu", "9p", ms::NODEV | ms::NOSUID, &data[0]),
            mount("/tmp/cpu/lib", "/lib", "none", bind, ""),
            // /lib64 is missing on this initramfs: the mount point is created first.
            Call::MkdirAll("/lib64".into()),
            mount("/tmp/cpu/lib64", "/lib64", "none", bind, ""),
            mount("/tmp/cpu/usr", "/usr", "none", bind, ""),
            mount("/tmp/cpu/bin", "/bin", "none", bind, ""),
            mount("/tmp/cpu/etc", "/etc", "none", bind, ""),
            mount("/tmp/cpu/home", "/home", "none", bind, ""),
            Call::ChangeDir("/home/me/src".into()),
        ]
    );
    assert_eq!(prepared.msize, Some(1 << 20));
    assert_eq!(prepared.working_dir, PathBuf::from("/home/me/src"));
    assert!(!prepared.pwd_fallback);
    assert!(prepared.warnings.is_empty(), "{:?}", prepared.warnings);
}

#[test]
fn unshare_refused_is_fatal_with_its_own_message() {
    let mut ops = RecordingOps::new().fail_when(EPERM, |c| *c == Call::Unshare);
    let err = prepare_session(&mut ops, &settings(None)).unwrap_err();
    assert_eq!(err.to_string(), NEED_CAP_SYS_ADMIN);
    assert_eq!(err.exit_code(), EXIT_REMOTE_SETUP);
    assert_eq!(ops.calls, vec![Call::Unshare]);
}

#[test]
fn no_mount_before_root_is_private() {
    let mut ops = RecordingOps::new().fail_when(22, |c| matches!(c, Call::MakePrivate(_)));
    let err = prepare_session(&mut ops, &settings(None)).unwrap_err();
    assert!(err.to_string().starts_with("cannot make / private"), "{err}");
    assert_eq!(err.exit_code(), EXIT_REMOTE_SETUP);
    assert!(ops.mounts().is_empty());
}

#[test]
fn tmpfs_failure_is_fatal() {
    let mut ops = RecordingOps::new()
        .fail_when(EPERM, |c| matches!(c, Call::Mount { fstype, .. } if fstype == "tmpfs"));
    let err = prepare_session(&mut ops, &settings(None)).unwrap_err();
    assert_eq!(err.to_string(), "cannot mount a tmpfs on /tmp: Operation not permitted (os error 1)");
}

#[test]
fn without_nonce_no_dial_and_client_binds_skipped() {
    let mut ops = client_tree(RecordingOps::new()).with_dir("/proc");
    let mut s = settings(Some(client_fstab("/usr", Some("proc /proc proc nosuid,nodev 0 0")).unwrap()));
    s.nonce = None;
    let prepared = prepare_session(&mut ops, &s).unwrap();
    assert!(!ops.calls.iter().any(|c| matches!(c, Call::Dial { .. })));
    assert!(ninep_data(&ops.calls).is_empty());
    assert_eq!(prepared.msize, None);
    assert!(ops.calls.contains(&mount("proc", "/proc", "proc", ms::NOSUID | ms::NODEV, "")));
    assert!(!ops
        .calls
        .iter()
        .any(|c| matches!(c, Call::Mount { target, .. } if target == &PathBuf::from("/usr"))));
    // /home/me/src does not exist without the client's files: fall back to /.
    assert!(prepared.pwd_fallback);
    assert_eq!(ops.calls.last(), Some(&Call::ChangeDir("/".into())));
}

#[test]
fn dials_loopback_v4_then_v6() {
    let mut ops = client_tree(RecordingOps::new())
        .fail_when(ECONNREFUSED, |c| matches!(c, Call::Dial { addr, .. } if addr.is_ipv4()));
    prepare_session(&mut ops, &settings(None)).unwrap();
    let dials: Vec<SocketAddr> = ops
        .calls
        .iter()
        .filter_map(|c| match c {
            Call::Dial { addr, .. } => Some(*addr),
            _ => None,
        })
        .collect();
    assert_eq!(dials, vec![addr("127.0.0.1:4242"), addr("[::1]:4242")]);
}

#[test]
fn unreachable_back_channel_is_fatal() {
    let mut ops = RecordingOps::new().fail_when(ECONNREFUSED, |c| matches!(c, Call::Dial { .. }));
    let err = prepare_session(&mut ops, &settings(None)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot reach the client's 9p server on 127.0.0.1:4242 or [::1]:4242: Connection refused (os error 111)"
    );
    assert_eq!(err.exit_code(), EXIT_REMOTE_SETUP);
}

#[test]
fn msize_falls_back_on_einval() {
    let mut ops = client_tree(RecordingOps::new()).with_msize_limit(256 * 1024);
    let prepared = prepare_session(&mut ops, &settings(None)).unwrap();
    let tried: Vec<String> =
        ninep_data(&ops.calls).iter().map(|d| d.rsplit("msize=").next().unwrap().to_string()).collect();
    assert_eq!(tried, ["1048576", "524288", "262144"]);
    assert_eq!(prepared.msize, Some(262144));
    // One dial only: the same channel is reused for every attempt.
    assert_eq!(ops.calls.iter().filter(|c| matches!(c, Call::Dial { .. })).count(), 1);
}

#[test]
fn msize_from_the_client_and_mount_options() {
    let mut ops = client_tree(RecordingOps::new());
    let mut s = settings(None);
    s.msize = Some("65536".into());
    s.mount_opts = Some("cache=loose,,access=client".into());
    s.user = "eve,access=any".into();
    prepare_session(&mut ops, &s).unwrap();
    let data = ninep_data(&ops.calls);
    assert_eq!(data.len(), 1);
    assert!(
        data[0].ends_with(",uname=eve_access=any,noxattr,msize=65536,cache=loose,access=client"),
        "{}",
        data[0]
    );
}

#[test]
fn cache_mode_default_by_kernel_release_unless_the_client_names_one() {
    let data_for = |release: Option<&str>, opts: Option<&str>| {
        let mut ops = client_tree(RecordingOps::new());
        let mut s = settings(None);
        s.kernel_release = release.map(String::from);
        s.mount_opts = opts.map(String::from);
        prepare_session(&mut ops, &s).unwrap();
        let data = ninep_data(&ops.calls);
        assert_eq!(data.len(), 1);
        data[0].rsplit("msize=1048576").next().unwrap().to_string()
    };
    assert_eq!(data_for(Some("6.1.0-56-amd64"), None), ",cache=mmap,locktimeout=1");
    assert_eq!(
        data_for(Some("6.12.9+bpo-arm64"), Some("access=client")),
        ",cache=mmap,locktimeout=1,access=client"
    );
    // Go's own options, as the bench emulates them: the client's choice wins.
    assert_eq!(data_for(Some("6.1.0"), Some("cache=none")), ",locktimeout=1,cache=none");
    assert_eq!(data_for(Some("6.1.0"), Some("locktimeout=5,cache")), ",locktimeout=5,cache");
    assert_eq!(data_for(Some("3.10.0-1160.el7.x86_64"), None), "");
    assert_eq!(data_for(Some("garbage"), None), "");
    assert_eq!(data_for(None, None), "");
}

/// The client's system directories as the second (system) mount shows them.
fn with_system_mount(ops: RecordingOps) -> RecordingOps {
    ops.with_mount_contents(
        "/tmp/.cpu-system",
        &["/tmp/.cpu-system/lib", "/tmp/.cpu-system/lib64", "/tmp/.cpu-system/usr", "/tmp/.cpu-system/bin"],
        &[],
    )
}

/// (source, target) of every bind, in order.
fn binds(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Mount { source, target, flags, .. } if flags & ms::BIND != 0 && source != "/" => {
                Some((source.clone(), target.display().to_string()))
            }
            _ => None,
        })
        .collect()
}

fn dials(calls: &[Call]) -> usize {
    calls.iter().filter(|c| matches!(c, Call::Dial { .. })).count()
}

#[test]
fn system_directories_from_a_second_mount_with_cached_metadata_when_the_client_offers_it() {
    let mut ops = with_system_mount(client_tree(RecordingOps::new()).with_memory_root());
    let mut s = settings(Some(client_fstab(cpu_all::options::DEFAULT_NAMESPACE, None).unwrap()));
    s.kernel_release = Some("6.1.0-56-amd64".into());
    s.system_mount = true;
    let prepared = prepare_session(&mut ops, &s).unwrap();
    assert!(prepared.warnings.is_empty(), "{:?}", prepared.warnings);
    assert_eq!(dials(&ops.calls), 2, "one connection per mount");
    // Both connections first, then the system mount is started before the main one, so
    // their round trips overlap (the double mounts on the spot, the real calls in a thread).
    let data = ninep_data(&ops.calls);
    assert_eq!(data.len(), 2);
    assert!(data[0].ends_with(",msize=1048576,cache=loose,locktimeout=1"), "{}", data[0]);
    assert!(data[1].ends_with(",msize=1048576,cache=mmap,locktimeout=1"), "{}", data[1]);
    let first_mount =
        ops.calls.iter().position(|c| matches!(c, Call::Mount { fstype, .. } if fstype == "9p"));
    let last_dial = ops.calls.iter().rposition(|c| matches!(c, Call::Dial { .. }));
    assert!(last_dial < first_mount, "{:?}", ops.calls);
    // Written through (MS_SYNCHRONOUS): cache=loose would keep a write to /usr past the exit.
    assert!(ops.calls.iter().any(|c| matches!(c,
        Call::Mount { target, fstype, flags, .. } if fstype == "9p" && target == &PathBuf::from("/tmp/.cpu-system")
            && *flags == ms::NODEV | ms::NOSUID | ms::SYNCHRONOUS)));
    assert_eq!(prepared.channels.len(), 2, "both connections kept, to be shut down after the command");
    assert!(prepared.writes_through);
    let want: Vec<(String, String)> = [
        ("/tmp/.cpu-system/lib", "/lib"),
        ("/tmp/.cpu-system/lib64", "/lib64"),
        ("/tmp/.cpu-system/usr", "/usr"),
        ("/tmp/.cpu-system/bin", "/bin"),
        ("/tmp/cpu/etc", "/etc"),
        ("/tmp/cpu/home", "/home"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(binds(&ops.calls), want);
    // Every source is on a client mount and none is under an earlier target: one batch.
    let sources: Vec<PathBuf> = want.iter().map(|(source, _)| PathBuf::from(source)).collect();
    assert_eq!(ops.opened_together, [sources]);
}

#[test]
fn bind_sources_opened_together_only_where_no_earlier_line_can_shadow_them() {
    let fstab = "/tmp/cpu/usr /usr none bind 0 0\n\
                 /tmp/cpu/opt /tmp/cpu/home none bind 0 0\n\
                 /tmp/cpu/home/me /me none bind 0 0\n\
                 /tmp/cpu/etc /etc none bind 0 0\n\
                 proc /proc2 proc defaults 0 0\n\
                 /tmp/local/etc /etc2 none bind 0 0\n\
                 /tmp/cpu/usr/lib /usr/lib none bind 0 0\n";
    let tree = |ops: RecordingOps| {
        ops.with_mount_contents(
            "/tmp/cpu",
            &["/tmp/cpu/usr", "/tmp/cpu/usr/lib", "/tmp/cpu/opt", "/tmp/cpu/home/me", "/tmp/cpu/etc"],
            &[],
        )
    };
    let mut ops = tree(RecordingOps::new().with_memory_root());
    let prepared = prepare_session(&mut ops, &settings(Some(fstab.into()))).unwrap();
    // /tmp/cpu/home/me lies under the target of the line before it; /proc and /tmp/local are
    // not the client's; /tmp/cpu/usr/lib is under /usr's source, not under a target.
    let want: Vec<PathBuf> =
        ["/tmp/cpu/usr", "/tmp/cpu/opt", "/tmp/cpu/etc", "/tmp/cpu/usr/lib"].map(PathBuf::from).into();
    assert_eq!(ops.opened_together, [want]);
    // The double opens nothing together, so every line still binds at its turn, in order.
    let targets: Vec<String> = binds(&ops.calls).into_iter().map(|(_, target)| target).collect();
    assert_eq!(targets, ["/usr", "/tmp/cpu/home", "/me", "/etc", "/usr/lib"], "{:?}", prepared.warnings);

    // Without the 9p mount, or with a single client source, there is nothing to overlap.
    let mut ops = tree(RecordingOps::new().with_memory_root());
    let mut s = settings(Some(fstab.into()));
    s.nonce = None;
    prepare_session(&mut ops, &s).unwrap();
    assert!(ops.opened_together.is_empty());
    let mut ops = tree(RecordingOps::new().with_memory_root());
    prepare_session(&mut ops, &settings(Some("/tmp/cpu/usr /usr none bind 0 0\n".into()))).unwrap();
    assert!(ops.opened_together.is_empty());
}

#[test]
fn one_mount_for_a_go_client_an_explicit_cache_mode_or_a_failed_second_mount() {
    let fstab = client_fstab(cpu_all::options::DEFAULT_NAMESPACE, None).unwrap();
    let all_from_main = |ops: &RecordingOps| {
        binds(&ops.calls).iter().all(|(source, _)| source.starts_with("/tmp/cpu/"))
            && binds(&ops.calls).len() == 6
    };
    // A Go client does not offer the second connection.
    let mut ops = with_system_mount(client_tree(RecordingOps::new()).with_memory_root());
    let mut s = settings(Some(fstab.clone()));
    s.kernel_release = Some("6.1.0".into());
    prepare_session(&mut ops, &s).unwrap();
    assert_eq!(dials(&ops.calls), 1);
    assert!(all_from_main(&ops), "{:?}", binds(&ops.calls));

    // -mountopts cache=none (the bench's emulation of Go): applied to everything, one mount.
    let mut ops = with_system_mount(client_tree(RecordingOps::new()).with_memory_root());
    s.system_mount = true;
    s.mount_opts = Some("cache=none".into());
    prepare_session(&mut ops, &s).unwrap();
    assert_eq!(dials(&ops.calls), 1);
    assert!(all_from_main(&ops), "{:?}", binds(&ops.calls));

    // The second mount fails: a debug note, and the binds come from the main mount.
    let mut ops = with_system_mount(client_tree(RecordingOps::new()).with_memory_root()).fail_when(
        EPERM,
        |c| matches!(c, Call::Mount { target, .. } if target == &PathBuf::from("/tmp/.cpu-system")),
    );
    s.mount_opts = None;
    let prepared = prepare_session(&mut ops, &s).unwrap();
    assert_eq!(dials(&ops.calls), 2);
    assert!(all_from_main(&ops), "{:?}", binds(&ops.calls));
    assert!(prepared.warnings.is_empty(), "{:?}", prepared.warnings);

    // A kernel that refuses the requested msize: the main mount falls back to a smaller one;
    // the system mount, made beside it with the requested msize, fails and is not retried.
    let mut ops =
        with_system_mount(client_tree(RecordingOps::new()).with_memory_root()).with_msize_limit(256 * 1024);
    let prepared = prepare_session(&mut ops, &s).unwrap();
    assert_eq!(prepared.msize, Some(256 * 1024));
    assert!(all_from_main(&ops), "{:?}", binds(&ops.calls));
    assert!(prepared.warnings.is_empty(), "{:?}", prepared.warnings);
    assert_eq!(prepared.channels.len(), 1, "the failed system mount's connection is closed");
}

#[test]
fn channel_options_cannot_be_overridden() {
    for bad in ["trans=tcp", "cache=loose,rfdno=0", "wfdno=1", "msize=8192", "version=9p2000.u"] {
        let mut ops = client_tree(RecordingOps::new());
        let mut s = settings(None);
        s.mount_opts = Some(bad.into());
        let err = prepare_session(&mut ops, &s).unwrap_err();
        assert!(err.to_string().starts_with("CPU_MOUNTOPTS may not set "), "{bad}: {err}");
        assert!(!ops.calls.iter().any(|c| matches!(c, Call::Dial { .. })), "{bad}: dialed anyway");
    }
}

#[test]
fn kernel_without_9p() {
    let mut ops = RecordingOps::new().without_filesystem("9p");
    let err = prepare_session(&mut ops, &settings(None)).unwrap_err();
    assert_eq!(err.to_string(), NO_9P_SUPPORT);
    assert_eq!(err.exit_code(), EXIT_REMOTE_SETUP);
    assert!(ops.calls.contains(&Call::LoadModule("9p".into())));
    assert!(
        !ops.calls.iter().any(|c| matches!(c, Call::Dial { .. })),
        "no nonce is spent on a kernel without 9p"
    );

    // modprobe 9p helps:
    let mut ops = client_tree(RecordingOps::new()).without_filesystem("9p").with_loadable_module("9p", "9p");
    assert_eq!(prepare_session(&mut ops, &settings(None)).unwrap().msize, Some(1 << 20));

    // /proc/filesystems lied, mount says ENODEV: same message.
    let mut ops =
        RecordingOps::new().fail_when(ENODEV, |c| matches!(c, Call::Mount { fstype, .. } if fstype == "9p"));
    assert_eq!(prepare_session(&mut ops, &settings(None)).unwrap_err().to_string(), NO_9P_SUPPORT);
}

#[test]
fn nonce_without_port_is_an_error() {
    let mut ops = RecordingOps::new();
    let mut s = settings(None);
    s.port9p = None;
    let err = prepare_session(&mut ops, &s).unwrap_err();
    assert_eq!(err.to_string(), "CPUNONCE is set but no -port9p was given: cannot reach the client's files");
}

#[test]
fn missing_bind_source_warns_and_goes_on() {
    let mut ops = client_tree(RecordingOps::new());
    let fstab = client_fstab("/nosuch:/usr:/srv/data=/elsewhere", None).unwrap();
    let prepared = prepare_session(&mut ops, &settings(Some(fstab))).unwrap();
    assert!(ops.calls.contains(&mount("/tmp/cpu/usr", "/usr", "none", ms::BIND, "")));
    assert_eq!(
        prepared.warnings[..2],
        [
            "fstab line 2: the client has no /nosuch; /nosuch is left as it is".to_string(),
            "fstab line 4: the client has no /elsewhere; /srv/data is left as it is".to_string(),
        ]
    );
}

#[test]
fn missing_target_on_a_disk_root_is_not_created() {
    let mut ops = client_tree(RecordingOps::new()); // disk root, no /lib64
    let fstab = client_fstab("/lib64:/lib:/home", None).unwrap();
    let prepared = prepare_session(&mut ops, &settings(Some(fstab))).unwrap();
    assert!(!ops.calls.iter().any(|c| matches!(c, Call::MkdirAll(p) if p == &PathBuf::from("/lib64"))));
    assert!(ops.calls.contains(&mount("/tmp/cpu/lib", "/lib", "none", ms::BIND, "")));
    assert_eq!(prepared.warnings.len(), 1);
    assert_eq!(
        prepared.warnings[0],
        "/lib64 does not exist on this machine and its root filesystem is on disk, so it is not created: \
         dynamically linked host programs will fail with \"no such file or directory\" (their loader or libraries live in /lib64)"
    );
}

#[test]
fn file_bind_on_memory_root_creates_an_empty_file() {
    let mut ops = client_tree(RecordingOps::new()).with_memory_root();
    let fstab = client_fstab("/etc/resolv.conf=/etc/hosts", None).unwrap();
    let mut s = settings(Some(fstab));
    s.pwd = Some("/".into());
    prepare_session(&mut ops, &s).unwrap();
    let tail: Vec<&Call> = ops.calls.iter().rev().take(3).collect();
    assert_eq!(
        tail,
        [
            &Call::ChangeDir("/".into()),
            &mount("/tmp/cpu/etc/hosts", "/etc/resolv.conf", "none", ms::BIND, ""),
            &Call::CreateFile("/etc/resolv.conf".into()),
        ]
    );
}

#[test]
fn symlinks_resolved_on_both_sides() {
    // merged /usr on the server: /bin -> /usr/bin; on the client too.
    let mut ops = client_tree(RecordingOps::new())
        .with_dir("/usr/bin")
        .with_symlink("/bin", "/usr/bin")
        .with_dir("/tmp/cpu/usr/bin")
        .with_symlink("/tmp/cpu/bin", "/tmp/cpu/usr/bin");
    prepare_session(&mut ops, &settings(Some(client_fstab("/bin", None).unwrap()))).unwrap();
    assert!(
        ops.calls.contains(&mount("/tmp/cpu/usr/bin", "/usr/bin", "none", ms::BIND, "")),
        "{:?}",
        ops.calls
    );
}

#[test]
fn read_only_bind_is_remounted() {
    let mut ops = client_tree(RecordingOps::new());
    let fstab = "/tmp/cpu/etc /etc none bind,ro,nosuid 0 0\n".to_string();
    prepare_session(&mut ops, &settings(Some(fstab))).unwrap();
    let mounts = ops.mounts();
    let n = mounts.len();
    assert_eq!(mounts[n - 2], &mount("/tmp/cpu/etc", "/etc", "none", ms::BIND | ms::RDONLY | ms::NOSUID, ""));
    assert_eq!(
        mounts[n - 1],
        &mount("none", "/etc", "", ms::REMOUNT | ms::BIND | ms::RDONLY | ms::NOSUID, "")
    );
}

#[test]
fn failed_fstab_mount_is_a_warning() {
    let mut ops = client_tree(RecordingOps::new())
        .fail_when(EPERM, |c| matches!(c, Call::Mount { target, .. } if target == &PathBuf::from("/usr")));
    let prepared =
        prepare_session(&mut ops, &settings(Some(client_fstab("/usr:/etc:/home", None).unwrap()))).unwrap();
    assert_eq!(
        prepared.warnings,
        ["fstab line 2: mount /tmp/cpu/usr on /usr (none, defaults,bind) failed: Operation not permitted (os error 1)"]
    );
    assert!(ops.calls.contains(&mount("/tmp/cpu/etc", "/etc", "none", ms::BIND, "")));
}

#[test]
fn pwd_fallback_warns() {
    let mut ops = client_tree(RecordingOps::new());
    let mut s = settings(None);
    s.pwd = Some("/Users/me".into());
    let prepared = prepare_session(&mut ops, &s).unwrap();
    assert!(prepared.pwd_fallback);
    assert_eq!(prepared.working_dir, PathBuf::from("/"));
    assert_eq!(
        prepared.warnings,
        ["your $PWD \"/Users/me\" is not in the remote namespace (No such file or directory (os error 2)); running in /"]
    );
}

#[test]
fn settings_from_environment() {
    let env = |name: &str| -> Option<OsString> {
        match name {
            "CPUNONCE" => Some(NONCE.into()),
            "LC_GLENDA_CPU_FSTAB" => Some("x /y none bind 0 0\n".into()),
            "USER" => Some("me".into()),
            "CPU_MSIZE" => Some("131072".into()),
            "PWD" => Some("/home/me".into()),
            "CPU_SYSTEM_MOUNT" => Some("1".into()),
            _ => None,
        }
    };
    let s = SessionSettings::from_env(Some(7), env);
    assert_eq!(
        s,
        SessionSettings {
            nonce: Some(NONCE.into()),
            port9p: Some(7),
            user: "me".into(),
            fstab: Some("x /y none bind 0 0\n".into()),
            msize: Some("131072".into()),
            mount_opts: None,
            pwd: Some("/home/me".into()),
            kernel_release: None,
            system_mount: true,
        }
    );
}

#[test]
fn a_mute_9p_server_is_an_error_not_a_retry() {
    const ETIMEDOUT: i32 = 110;
    let mut ops = RecordingOps::new()
        .fail_when(ETIMEDOUT, |c| matches!(c, Call::Mount { fstype, .. } if fstype == "9p"));
    let err = prepare_session(&mut ops, &settings(None)).unwrap_err();
    assert!(err.to_string().starts_with("cannot mount the client's files on /tmp/cpu: "), "{err}");
    assert_eq!(ninep_data(&ops.calls).len(), 1, "no msize fallback after a timeout");
}

/// The keeper (teardown after the exit status) is used only when no mount keeps dirty pages.
#[test]
fn writes_through_only_with_cache_modes_that_write_synchronously() {
    let with = |release: Option<&str>, opts: Option<&str>| {
        let mut s = settings(None);
        s.kernel_release = release.map(str::to_string);
        s.mount_opts = opts.map(str::to_string);
        cpu_all::namespace::session::main_mount_writes_through(&s)
    };
    assert!(with(Some("6.1.0-56-amd64"), None), "default mmap on 6.1");
    assert!(with(Some("6.1.0"), Some("cache=none")));
    assert!(with(Some("6.12.3"), Some("cache=none")));
    assert!(with(None, None), "no cache mode: the kernel's none");
    assert!(!with(Some("6.6.0"), None), "6.6's mmap has writeback");
    assert!(!with(Some("6.1.0"), Some("cache=loose")));
    assert!(!with(Some("6.1.0"), Some("cache=fscache")));
    let mut ops = client_tree(RecordingOps::new()).with_memory_root();
    let mut s = settings(None);
    s.mount_opts = Some("cache=loose".into());
    let prepared = prepare_session(&mut ops, &s).unwrap();
    assert!(!prepared.writes_through);
    assert_eq!(prepared.channels.len(), 1);
    let mut ops = RecordingOps::new().with_memory_root();
    let mut s = settings(None);
    s.nonce = None;
    let prepared = prepare_session(&mut ops, &s).unwrap();
    assert!(!prepared.writes_through && prepared.channels.is_empty(), "no 9p mount, nothing to keep");
}

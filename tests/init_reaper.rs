//! The orphan reaper of `cpud -init`: orphans re-parented to a subreaper are reaped, a
//! registered session child is left for its owner. One test only: reaping is per process, and
//! other tests in the same binary would lose their children's statuses.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cpu_all::init::{forget_session_child, note_session_child, reap_children, ChildExit};

fn state_of(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_all::init::parse_proc_stat(&stat).map(|s| s.state)
}

#[test]
fn reaps_orphans_but_not_session_children() {
    rustix::process::set_child_subreaper(Some(rustix::process::getpid())).expect("PR_SET_CHILD_SUBREAPER");

    // A session child that has exited (a zombie) before the reaper runs.
    let mut session = Command::new("sh").args(["-c", "exit 7"]).spawn().expect("spawn sh");
    let session_pid = session.id();
    note_session_child(session_pid as i32);
    let t = Instant::now();
    while state_of(session_pid) != Some('Z') && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(state_of(session_pid), Some('Z'), "session child did not exit");

    // A double fork: sh starts `sleep` in the background and exits; sleep becomes our orphan.
    let mut parent = Command::new("sh")
        .args(["-c", "sleep 0.3 & echo $!"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let mut line = String::new();
    std::io::BufReader::new(parent.stdout.take().expect("stdout")).read_line(&mut line).expect("read pid");
    let orphan: i32 = line.trim().parse().expect("orphan pid");
    assert!(parent.wait().expect("wait sh").success());

    // The session child is peeked first (it is older): the reaper must look past it.
    let mut reaped = Vec::new();
    let t = Instant::now();
    while !reaped.iter().any(|(p, _)| *p == orphan) && t.elapsed() < Duration::from_secs(10) {
        reaped.extend(reap_children(cpu_all::init::is_session_child));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reaped.contains(&(orphan, ChildExit::Exited(0))), "orphan not reaped: {reaped:?}");
    assert!(!reaped.iter().any(|(p, _)| *p as u32 == session_pid), "session child's status was stolen");

    // Its owner still gets the real status.
    let status = session.wait().expect("wait session child");
    assert_eq!(status.code(), Some(7));
    forget_session_child(session_pid as i32);
    assert!(!cpu_all::init::is_session_child(session_pid as i32));
    // Nothing left to reap, and no zombie child remains.
    assert!(reap_children(|_| false).is_empty());
}

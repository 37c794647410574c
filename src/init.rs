//! PID 1 duties for `cpud -init`: basic mounts, loopback, reaping orphans.
//!
//! Also the registry of session children: as PID 1 (or a subreaper) cpud reaps every orphan,
//! but must not steal the exit status of a session's own child, which its session task waits
//! for. The SSH server registers each child it spawns here.

use std::collections::HashSet;
use std::sync::Mutex;

static SESSION_CHILDREN: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Marks `pid` as a session child whose status its session waits for (never reaped here).
pub fn note_session_child(pid: i32) {
    if let Ok(mut g) = SESSION_CHILDREN.lock() {
        g.get_or_insert_with(HashSet::new).insert(pid);
    }
}

/// Forgets `pid` once its session has collected its status.
pub fn forget_session_child(pid: i32) {
    if let Ok(mut g) = SESSION_CHILDREN.lock() {
        if let Some(set) = g.as_mut() {
            set.remove(&pid);
        }
    }
}

/// Whether `pid` is a registered session child.
pub fn is_session_child(pid: i32) -> bool {
    SESSION_CHILDREN.lock().map(|g| g.as_ref().is_some_and(|s| s.contains(&pid))).unwrap_or(false)
}

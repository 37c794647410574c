//! POSIX record locks of one 9P session, kept in the server and owned by remote processes,
//! and mirrored onto the client machine so its processes and the remote's meet.
//!
//! Tlock carries the lock owner as the remote sees it: `proc_id` (the process) and
//! `client_id` (the machine). POSIX locks belong to a process, not to a descriptor: one
//! process may lock through two fids of one file without conflicting with itself, unlock
//! through either, and closing any of its descriptors drops all its locks on the file. Host
//! locks cannot express that (classic fcntl locks would make every remote process one owner,
//! this one; OFD locks make every fid its own owner), so the table of who holds what lives
//! here: per file (device, inode), a list of byte ranges with their owner, split and merged
//! as fcntl does.
//!
//! The host still sees them: per locked file the session holds one [`HostLock`] (in the host
//! backend an open-file-description lock on a descriptor of its own) covering the union of
//! the remote's ranges, the strongest kind where they overlap. A remote lock is granted only
//! when both the table and the host grant it, so a process on the client machine (a sqlite3
//! there, another `cpu` session) and a remote process exclude each other as two local
//! processes would; Tgetlock reports a host holder as process 0. A file system that has no
//! locks of its own (the backend says so) keeps the session-only table.
//!
//! A blocked request is answered BLOCKED at once; the remote kernel sleeps and retries, so
//! the server never waits. The number of ranges is capped per session (ENOLCK beyond), so a
//! remote cannot grow the table, nor the descriptors behind it, without bound.

use std::collections::HashMap;
use std::io;

/// Most lock ranges one session may hold in total.
pub const MAX_LOCK_RANGES: usize = 65_536;

/// The file a lock is on.
pub type FileKey = (u64, u64);

/// The remote process holding a lock.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockOwner {
    pub proc_id: u32,
    pub client_id: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Read,
    Write,
}

/// One held range; `end` is inclusive (`u64::MAX` = to the end of any file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub owner: LockOwner,
    pub kind: Kind,
    pub start: u64,
    pub end: u64,
}

/// A lock held on the host by someone outside the session (a local process, another
/// session); `end` is inclusive, `u64::MAX` = to the end of any file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostHolder {
    pub kind: Kind,
    pub start: u64,
    pub end: u64,
}

/// Who blocks a lock: another remote process of this session, or a holder on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Remote(Range),
    Host(HostHolder),
}

/// The session's hold on one file's locks on the host (see the module text). Dropping it
/// releases every range it holds.
pub trait HostLock: Send {
    /// Makes this handle hold `start..=end` as `kind` (None: not at all), never waiting.
    /// `Ok(false)`: a holder outside the session conflicts, and nothing changed.
    fn set(&self, kind: Option<Kind>, start: u64, end: u64) -> io::Result<bool>;
    /// The first lock held outside this handle that would block `kind` on `start..=end`.
    fn conflict(&self, kind: Kind, start: u64, end: u64) -> io::Result<Option<HostHolder>>;
}

/// Makes a new [`HostLock`] on the file a request came through: `Ok(None)` when the backend
/// has no host locks.
pub type OpenHostLock<'a> = &'a dyn Fn() -> io::Result<Option<Box<dyn HostLock>>>;

/// What a set request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    /// Another owner holds a conflicting range, in the session or on the host.
    Blocked,
    /// The session holds too many ranges (or the host has no descriptor left for them).
    NoLocks,
}

/// Whether a file's locks are mirrored on the host.
#[derive(Default)]
enum HostState {
    /// No lock taken yet.
    #[default]
    Untried,
    Held(Box<dyn HostLock>),
    /// The backend or the file system has no host locks: the table alone decides.
    SessionOnly,
}

#[derive(Default)]
struct FileLocks {
    ranges: Vec<Range>,
    /// Fids each owner locked through: clunking any of them drops the owner's locks.
    fids: HashMap<LockOwner, Vec<u32>>,
    host: HostState,
}

impl FileLocks {
    fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.fids.is_empty()
    }

    /// The host handle, made on first use. Err: the host has no descriptor left.
    fn host(&mut self, open: OpenHostLock<'_>) -> Result<Option<&dyn HostLock>, ()> {
        if matches!(self.host, HostState::Untried) {
            self.host = match new_handle(open)? {
                Some(h) => HostState::Held(h),
                None => HostState::SessionOnly,
            };
        }
        Ok(match &self.host {
            HostState::Held(h) => Some(h.as_ref()),
            _ => None,
        })
    }

    /// After the ranges changed within `spans`, makes the host hold there what the ranges
    /// now cover. Only releases or downgrades, which no other holder can refuse.
    fn sync_host(&mut self, spans: &[(u64, u64)]) {
        let HostState::Held(h) = &self.host else { return };
        for (kind, start, end) in coverage(&self.ranges, spans) {
            if let Err(e) = h.set(kind, start, end) {
                log::debug!("9p: releasing a host lock failed: {e}");
            }
        }
    }

    /// Takes `kind` on `start..=end` on the host. A read-only handle cannot take a write lock:
    /// then a new handle from the requesting fid (open for writing, or the remote's kernel
    /// would not have asked) takes over every range the old one held.
    fn take_on_host(&mut self, open: OpenHostLock<'_>, kind: Kind, start: u64, end: u64) -> Outcome {
        let Ok(host) = self.host(open) else { return Outcome::NoLocks };
        let Some(host) = host else { return Outcome::Granted };
        let taken = host.set(Some(kind), start, end);
        if kind == Kind::Write && matches!(&taken, Err(e) if e.raw_os_error() == Some(libc::EBADF)) {
            return self.hand_over(open, kind, start, end);
        }
        self.outcome_of(taken)
    }

    /// The read-only handle is replaced by a new one that holds what the old one did and then
    /// takes `kind` on `start..=end`.
    fn hand_over(&mut self, open: OpenHostLock<'_>, kind: Kind, start: u64, end: u64) -> Outcome {
        let new = match new_handle(open) {
            Err(()) => return Outcome::NoLocks,
            Ok(None) => {
                self.host = HostState::SessionOnly;
                return Outcome::Granted;
            }
            Ok(Some(h)) => h,
        };
        // The old handle holds only read ranges (it could not take a write one), which the
        // new one can share; only then does the old one let go, so no gap opens.
        for r in &self.ranges {
            if !matches!(new.set(Some(r.kind), r.start, r.end), Ok(true)) {
                return Outcome::Blocked;
            }
        }
        let taken = new.set(Some(kind), start, end);
        self.host = HostState::Held(new);
        self.outcome_of(taken)
    }

    /// What a host lock request's result means for the remote: a host error other than a
    /// conflict leaves this file's locks to the session table alone.
    fn outcome_of(&mut self, taken: io::Result<bool>) -> Outcome {
        match taken {
            Ok(true) => Outcome::Granted,
            Ok(false) => Outcome::Blocked,
            Err(e) => {
                log::debug!("9p: a host lock failed ({e}); this file's locks stay in the session");
                self.host = HostState::SessionOnly;
                Outcome::Granted
            }
        }
    }
}

/// A new host handle from `open`: None when there are no host locks for the file (the
/// session table decides alone); Err when the host has no descriptor left.
fn new_handle(open: OpenHostLock<'_>) -> Result<Option<Box<dyn HostLock>>, ()> {
    match open() {
        Ok(h) => Ok(h),
        Err(e) if out_of_descriptors(&e) => Err(()),
        Err(e) => {
            log::debug!("9p: no host locks for a file ({e}); its locks stay in the session");
            Ok(None)
        }
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM))
}

/// What `ranges` hold within `spans`: consecutive pieces covering the spans, each with the
/// strongest kind any owner holds there (None: nobody).
fn coverage(ranges: &[Range], spans: &[(u64, u64)]) -> Vec<(Option<Kind>, u64, u64)> {
    // Half-open positions in u128, so the range ending at u64::MAX has an end to point at.
    let mut merged: Vec<(u128, u128)> = spans.iter().map(|&(s, e)| (s as u128, e as u128 + 1)).collect();
    merged.sort_unstable();
    merged.dedup_by(|next, prev| {
        let touches = next.0 <= prev.1;
        if touches {
            prev.1 = prev.1.max(next.1);
        }
        touches
    });
    if merged.is_empty() {
        return Vec::new();
    }
    // Where the strongest kind changes: a sweep over the ends of the ranges that touch a span.
    let touches = |r: &&Range| {
        let k = merged.partition_point(|m| m.1 <= r.start as u128);
        k < merged.len() && merged[k].0 <= r.end as u128
    };
    let mut events: Vec<(u128, Kind, i64)> = Vec::new();
    for r in ranges.iter().filter(touches) {
        events.push((r.start as u128, r.kind, 1));
        events.push((r.end as u128 + 1, r.kind, -1));
    }
    events.sort_unstable_by_key(|e| e.0);
    let mut steps: Vec<(u128, Option<Kind>)> = vec![(0, None)];
    let (mut reads, mut writes) = (0i64, 0i64);
    let mut i = 0;
    while i < events.len() {
        let at = events[i].0;
        while i < events.len() && events[i].0 == at {
            match events[i].1 {
                Kind::Read => reads += events[i].2,
                Kind::Write => writes += events[i].2,
            }
            i += 1;
        }
        let kind = if writes > 0 {
            Some(Kind::Write)
        } else if reads > 0 {
            Some(Kind::Read)
        } else {
            None
        };
        match steps.last_mut() {
            Some(last) if last.0 == at => last.1 = kind,
            _ => steps.push((at, kind)),
        }
        if steps.len() >= 2 && steps[steps.len() - 2].1 == kind {
            steps.pop();
        }
    }
    let mut pieces = Vec::new();
    for (a, b) in merged {
        // The step in force at `a`, then every step that starts before `b`.
        let mut k = steps.partition_point(|s| s.0 <= a) - 1;
        let mut from = a;
        while from < b {
            let until = steps.get(k + 1).map_or(b, |s| s.0.min(b));
            pieces.push((steps[k].1, from as u64, (until - 1) as u64));
            from = until;
            k += 1;
        }
    }
    pieces
}

/// Every lock of one session.
pub struct LockTable {
    files: HashMap<FileKey, FileLocks>,
    ranges: usize,
    cap: usize,
}

impl Default for LockTable {
    fn default() -> Self {
        LockTable::with_cap(MAX_LOCK_RANGES)
    }
}

/// Why a range from the wire is not one fcntl(2) would accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRange {
    /// The start is not a valid file offset (an off_t is signed: above `i64::MAX` it would
    /// be negative). fcntl says EINVAL.
    Start,
    /// The last byte lies beyond the largest file offset. fcntl says EOVERFLOW.
    End,
}

/// The inclusive end of `length` bytes from `start` (0 = to the end of any file, kept as
/// `u64::MAX`), checked as fcntl checks l_start and l_len: both ends are file offsets.
pub fn range_end(start: u64, length: u64) -> Result<u64, BadRange> {
    const OFFSET_MAX: u64 = i64::MAX as u64;
    if start > OFFSET_MAX {
        return Err(BadRange::Start);
    }
    if length == 0 {
        return Ok(u64::MAX);
    }
    // start <= OFFSET_MAX and length >= 1: neither subtraction wraps, and the sum is
    // only formed when it stays within OFFSET_MAX.
    if length - 1 > OFFSET_MAX - start {
        return Err(BadRange::End);
    }
    Ok(start + (length - 1))
}

fn conflicts(held: &Range, owner: &LockOwner, kind: Kind, start: u64, end: u64) -> bool {
    &held.owner != owner
        && held.start <= end
        && start <= held.end
        && (kind == Kind::Write || held.kind == Kind::Write)
}

impl LockTable {
    /// A table that holds at most `cap` ranges.
    pub fn with_cap(cap: usize) -> LockTable {
        LockTable { files: HashMap::new(), ranges: 0, cap }
    }

    /// Takes (`kind` Some) or releases (None) `start..=end` of `file` for `owner`, who asks
    /// through `fid`; `open` makes the file's host handle when it has none yet.
    #[allow(clippy::too_many_arguments)]
    pub fn set(
        &mut self,
        file: FileKey,
        owner: &LockOwner,
        fid: u32,
        kind: Option<Kind>,
        start: u64,
        end: u64,
        open: OpenHostLock<'_>,
    ) -> Outcome {
        let locks = self.files.entry(file).or_default();
        if let Some(kind) = kind {
            if locks.ranges.iter().any(|h| conflicts(h, owner, kind, start, end)) {
                return Outcome::Blocked;
            }
        }
        // The owner's ranges after this request: cut [start, end] out of them, then add
        // the new one and merge neighbours of the same kind, as fcntl does.
        let mut next: Vec<Range> = Vec::new();
        let mut old_mine = 0;
        // Where this request takes something away from the owner: only there can the host's
        // share change on an unlock.
        let mut released = Vec::new();
        for r in locks.ranges.iter().filter(|r| &r.owner == owner) {
            old_mine += 1;
            if r.end < start || r.start > end {
                next.push(r.clone());
                continue;
            }
            released.push((r.start.max(start), r.end.min(end)));
            if r.start < start {
                next.push(Range { end: start - 1, ..r.clone() });
            }
            if r.end > end {
                next.push(Range { start: end + 1, ..r.clone() });
            }
        }
        if let Some(kind) = kind {
            let mut new = Range { owner: owner.clone(), kind, start, end };
            next.retain(|r| {
                let touches = r.kind == kind
                    && (r.end == u64::MAX || r.end + 1 >= new.start)
                    && (new.end == u64::MAX || new.end + 1 >= r.start);
                if touches {
                    new.start = new.start.min(r.start);
                    new.end = new.end.max(r.end);
                }
                !touches
            });
            next.push(new);
        }
        let total = self.ranges - old_mine + next.len();
        let mut outcome =
            if total > self.cap && total > self.ranges { Outcome::NoLocks } else { Outcome::Granted };
        // After this request the session holds all of [start, end] as `kind` (no other
        // owner may hold a write lock there, and ours there is replaced): the host must
        // grant exactly that before the table changes.
        if let (Outcome::Granted, Some(kind)) = (outcome, kind) {
            outcome = locks.take_on_host(open, kind, start, end);
        }
        if outcome != Outcome::Granted {
            if locks.is_empty() {
                self.files.remove(&file);
            }
            return outcome;
        }
        locks.ranges.retain(|r| &r.owner != owner);
        locks.ranges.extend(next);
        if kind.is_some() {
            let fids = locks.fids.entry(owner.clone()).or_default();
            if !fids.contains(&fid) {
                fids.push(fid);
            }
        } else {
            if !locks.ranges.iter().any(|r| &r.owner == owner) {
                locks.fids.remove(owner);
            }
            locks.sync_host(&released);
        }
        if locks.is_empty() {
            self.files.remove(&file);
        }
        self.ranges = total;
        Outcome::Granted
    }

    /// The first lock of another owner that would block `kind` on `start..=end`: in the
    /// session, else on the host (asked through the file's handle, or a new one from `open`).
    pub fn get(
        &self,
        file: FileKey,
        owner: &LockOwner,
        kind: Kind,
        start: u64,
        end: u64,
        open: OpenHostLock<'_>,
    ) -> Option<Holder> {
        let locks = self.files.get(&file);
        if let Some(r) = locks.and_then(|l| l.ranges.iter().find(|h| conflicts(h, owner, kind, start, end))) {
            return Some(Holder::Remote(r.clone()));
        }
        let asked = match locks.map(|l| &l.host) {
            Some(HostState::Held(h)) => h.conflict(kind, start, end),
            Some(HostState::SessionOnly) => return None,
            Some(HostState::Untried) | None => match open() {
                Ok(Some(h)) => h.conflict(kind, start, end),
                Ok(None) => return None,
                Err(e) => Err(e),
            },
        };
        match asked {
            Ok(found) => found.map(Holder::Host),
            Err(e) => {
                log::debug!("9p: asking the host for a conflicting lock failed: {e}");
                None
            }
        }
    }

    /// Fid `fid` is gone (Tclunk, Tremove): like close(2), every owner that locked through
    /// it loses all its locks on that file.
    pub fn fid_closed(&mut self, fid: u32) {
        let mut dropped = 0;
        self.files.retain(|_, locks| {
            let gone: Vec<LockOwner> =
                locks.fids.iter().filter(|(_, fids)| fids.contains(&fid)).map(|(o, _)| o.clone()).collect();
            let mut spans = Vec::new();
            for owner in gone {
                locks.fids.remove(&owner);
                let n = locks.ranges.len();
                locks.ranges.retain(|r| {
                    let theirs = r.owner == owner;
                    if theirs {
                        spans.push((r.start, r.end));
                    }
                    !theirs
                });
                dropped += n - locks.ranges.len();
            }
            if locks.is_empty() {
                // Dropping the handle releases everything it held.
                return false;
            }
            locks.sync_host(&spans);
            true
        });
        self.ranges -= dropped.min(self.ranges);
    }

    /// Ranges held in the whole session.
    pub fn len(&self) -> usize {
        self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(p: u32) -> LockOwner {
        LockOwner { proc_id: p, client_id: b"board".to_vec() }
    }

    const F: FileKey = (1, 2);

    fn no_host() -> io::Result<Option<Box<dyn HostLock>>> {
        Ok(None)
    }

    fn remote(h: Option<Holder>) -> Range {
        match h {
            Some(Holder::Remote(r)) => r,
            other => panic!("expected a remote holder, got {other:?}"),
        }
    }

    #[test]
    fn one_owner_locks_twice_without_conflict_others_are_blocked() {
        let mut t = LockTable::default();
        assert_eq!(t.set(F, &owner(1), 10, Some(Kind::Write), 0, 9, &no_host), Outcome::Granted);
        // Same process, another fid: no conflict with itself.
        assert_eq!(t.set(F, &owner(1), 11, Some(Kind::Write), 5, 19, &no_host), Outcome::Granted);
        assert_eq!(t.len(), 1, "merged into one range");
        assert_eq!(t.set(F, &owner(2), 12, Some(Kind::Read), 15, 15, &no_host), Outcome::Blocked);
        let held = remote(t.get(F, &owner(2), Kind::Read, 0, u64::MAX, &no_host));
        assert_eq!((held.owner.proc_id, held.start, held.end, held.kind), (1, 0, 19, Kind::Write));
        // Unlock the middle through the second fid: two ranges remain.
        assert_eq!(t.set(F, &owner(1), 11, None, 5, 9, &no_host), Outcome::Granted);
        assert_eq!(t.len(), 2);
        assert_eq!(t.set(F, &owner(2), 12, Some(Kind::Write), 5, 9, &no_host), Outcome::Granted);
        // Closing fid 10 (the first fid of process 1) drops all of its locks.
        t.fid_closed(10);
        assert!(t.get(F, &owner(2), Kind::Write, 0, u64::MAX, &no_host).is_none());
        assert_eq!(t.len(), 1);
        t.fid_closed(12);
        assert!(t.is_empty());
    }

    #[test]
    fn read_locks_share_and_downgrade_splits() {
        let mut t = LockTable::default();
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), 0, u64::MAX, &no_host), Outcome::Granted);
        assert_eq!(t.set(F, &owner(2), 2, Some(Kind::Read), 100, 199, &no_host), Outcome::Granted);
        assert_eq!(t.set(F, &owner(2), 2, Some(Kind::Write), 100, 199, &no_host), Outcome::Blocked);
        // Process 1 upgrades part of its read lock to write: split in three, one conflict.
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Write), 0, 49, &no_host), Outcome::Granted);
        assert_eq!(t.len(), 3);
        let c = remote(t.get(F, &owner(3), Kind::Read, 0, 0, &no_host));
        assert_eq!((c.kind, c.end), (Kind::Write, 49));
        assert_eq!(range_end(5, 0), Ok(u64::MAX));
        assert_eq!(range_end(5, 10), Ok(14));
        assert_eq!(range_end(u64::MAX, 2), Err(BadRange::Start));
        assert_eq!(range_end(1 << 63, 0), Err(BadRange::Start));
        assert_eq!(range_end(i64::MAX as u64, 1), Ok(i64::MAX as u64));
        assert_eq!(range_end(i64::MAX as u64, 2), Err(BadRange::End));
        assert_eq!(range_end(1, u64::MAX), Err(BadRange::End));
    }

    #[test]
    fn the_number_of_ranges_is_capped() {
        let mut t = LockTable::with_cap(100);
        for i in 0..100 {
            assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), i * 2, i * 2, &no_host), Outcome::Granted);
        }
        let n = 200;
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), n, n, &no_host), Outcome::NoLocks);
        assert_eq!(t.len(), 100);
        // Unlocking still works and frees room.
        assert_eq!(t.set(F, &owner(1), 1, None, 0, 0, &no_host), Outcome::Granted);
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), n, n, &no_host), Outcome::Granted);
    }

    /// A host with 64 lockable bytes: what each handle holds, and what someone outside the
    /// session holds.
    struct FakeHost {
        held: HashMap<usize, [Option<Kind>; 64]>,
        outside: [Option<Kind>; 64],
        handles: usize,
        calls: usize,
    }

    impl Default for FakeHost {
        fn default() -> Self {
            FakeHost { held: HashMap::new(), outside: [None; 64], handles: 0, calls: 0 }
        }
    }

    type Shared = std::sync::Arc<std::sync::Mutex<FakeHost>>;

    struct FakeHandle {
        id: usize,
        writable: bool,
        fail: Option<i32>,
        host: Shared,
    }

    fn bytes(start: u64, end: u64) -> std::ops::RangeInclusive<usize> {
        start as usize..=(end.min(63) as usize)
    }

    impl HostLock for FakeHandle {
        fn set(&self, kind: Option<Kind>, start: u64, end: u64) -> io::Result<bool> {
            if let Some(errno) = self.fail {
                return Err(io::Error::from_raw_os_error(errno));
            }
            if kind == Some(Kind::Write) && !self.writable {
                return Err(io::Error::from_raw_os_error(libc::EBADF));
            }
            let mut h = self.host.lock().unwrap();
            h.calls += 1;
            let others: Vec<[Option<Kind>; 64]> =
                h.held.iter().filter(|(id, _)| **id != self.id).map(|(_, b)| *b).chain([h.outside]).collect();
            for i in bytes(start, end) {
                for o in &others {
                    if o[i].is_some()
                        && (kind == Some(Kind::Write) || o[i] == Some(Kind::Write))
                        && kind.is_some()
                    {
                        return Ok(false);
                    }
                }
            }
            let mine = h.held.entry(self.id).or_insert([None; 64]);
            for i in bytes(start, end) {
                mine[i] = kind;
            }
            Ok(true)
        }

        fn conflict(&self, kind: Kind, start: u64, end: u64) -> io::Result<Option<HostHolder>> {
            let h = self.host.lock().unwrap();
            for i in bytes(start, end) {
                if let Some(k) = h.outside[i] {
                    if kind == Kind::Write || k == Kind::Write {
                        let first =
                            (0..=i).rev().take_while(|&j| h.outside[j] == Some(k)).last().unwrap_or(i);
                        let last = (i..64).take_while(|&j| h.outside[j] == Some(k)).last().unwrap_or(i);
                        return Ok(Some(HostHolder { kind: k, start: first as u64, end: last as u64 }));
                    }
                }
            }
            Ok(None)
        }
    }

    impl Drop for FakeHandle {
        fn drop(&mut self) {
            self.host.lock().unwrap().held.remove(&self.id);
        }
    }

    fn opener(
        host: &Shared,
        writable: bool,
        fail: Option<i32>,
    ) -> impl Fn() -> io::Result<Option<Box<dyn HostLock>>> + '_ {
        move || {
            let mut h = host.lock().unwrap();
            h.handles += 1;
            Ok(Some(Box::new(FakeHandle { id: h.handles, writable, fail, host: host.clone() })
                as Box<dyn HostLock>))
        }
    }

    /// What the session holds on the host, byte by byte: '.' nothing, 'r', 'w'; one string
    /// per handle that holds anything.
    fn held(host: &Shared, upto: usize) -> Vec<String> {
        let h = host.lock().unwrap();
        let mut ids: Vec<&usize> = h.held.keys().collect();
        ids.sort();
        ids.iter()
            .map(|id| {
                h.held[*id][..upto]
                    .iter()
                    .map(|k| match k {
                        None => '.',
                        Some(Kind::Read) => 'r',
                        Some(Kind::Write) => 'w',
                    })
                    .collect::<String>()
            })
            .filter(|s| s.chars().any(|c| c != '.'))
            .collect()
    }

    #[test]
    fn the_host_holds_the_union_of_the_sessions_locks_and_its_own_block_them() {
        let host = Shared::default();
        host.lock().unwrap().outside[30] = Some(Kind::Write);
        let open = opener(&host, true, None);
        let mut t = LockTable::default();
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Write), 0, 3, &open), Outcome::Granted);
        assert_eq!(held(&host, 16), ["wwww............"]);
        // A holder on the host blocks the remote, and nothing changes.
        assert_eq!(t.set(F, &owner(2), 2, Some(Kind::Read), 28, 31, &open), Outcome::Blocked);
        assert_eq!(t.len(), 1);
        let h = t.get(F, &owner(2), Kind::Read, 20, 40, &open);
        assert_eq!(h, Some(Holder::Host(HostHolder { kind: Kind::Write, start: 30, end: 30 })));
        // Two remote readers share; the host holds their union as read.
        assert_eq!(t.set(F, &owner(2), 2, Some(Kind::Read), 6, 9, &open), Outcome::Granted);
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), 8, 11, &open), Outcome::Granted);
        assert_eq!(held(&host, 16), ["wwww..rrrrrr...."]);
        // One reader leaves: the other's bytes stay held.
        assert_eq!(t.set(F, &owner(2), 2, None, 0, u64::MAX, &open), Outcome::Granted);
        assert_eq!(held(&host, 16), ["wwww....rrrr...."]);
        // A write over a read the same owner holds upgrades it; unlocking half downgrades nothing else.
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Write), 9, 10, &open), Outcome::Granted);
        assert_eq!(held(&host, 16), ["wwww....rwwr...."]);
        assert_eq!(t.set(F, &owner(1), 1, None, 0, 1, &open), Outcome::Granted);
        assert_eq!(held(&host, 16), ["..ww....rwwr...."]);
        // An owner with nothing to release costs the host nothing.
        let calls = host.lock().unwrap().calls;
        assert_eq!(t.set(F, &owner(3), 3, None, 0, u64::MAX, &open), Outcome::Granted);
        assert_eq!(host.lock().unwrap().calls, calls);
        // Closing the fid drops the owner's locks, and the host handle with the last of them.
        t.fid_closed(1);
        assert!(t.is_empty());
        assert_eq!(held(&host, 16), Vec::<String>::new());
        assert!(host.lock().unwrap().held.is_empty(), "the handle is gone");
    }

    #[test]
    fn a_read_only_handle_hands_its_ranges_to_a_writable_one_without_a_gap() {
        let host = Shared::default();
        let mut t = LockTable::default();
        assert_eq!(
            t.set(F, &owner(1), 1, Some(Kind::Read), 0, 3, &opener(&host, false, None)),
            Outcome::Granted
        );
        assert_eq!(
            t.set(F, &owner(2), 2, Some(Kind::Write), 8, 9, &opener(&host, true, None)),
            Outcome::Granted
        );
        assert_eq!(held(&host, 12), ["rrrr....ww.."], "one handle, the writable one");
        // Another owner's lock on the old handle's bytes is still refused by the table.
        assert_eq!(
            t.set(F, &owner(2), 2, Some(Kind::Write), 0, 0, &opener(&host, true, None)),
            Outcome::Blocked
        );
    }

    #[test]
    fn a_file_system_without_host_locks_keeps_the_session_table() {
        let host = Shared::default();
        let open = opener(&host, true, Some(libc::ENOLCK));
        let mut t = LockTable::default();
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Write), 0, 3, &open), Outcome::Granted);
        assert_eq!(
            t.set(F, &owner(2), 2, Some(Kind::Write), 2, 2, &open),
            Outcome::Blocked,
            "the table still decides"
        );
        assert_eq!(t.get(F, &owner(2), Kind::Write, 0, 9, &open).map(|h| remote(Some(h)).start), Some(0));
        // Out of descriptors: ENOLCK to the remote, nothing kept.
        let full =
            || -> io::Result<Option<Box<dyn HostLock>>> { Err(io::Error::from_raw_os_error(libc::EMFILE)) };
        assert_eq!(t.set((9, 9), &owner(1), 1, Some(Kind::Write), 0, 3, &full), Outcome::NoLocks);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn coverage_gives_the_strongest_kind_piece_by_piece() {
        let r = |kind, start, end| Range { owner: owner(1), kind, start, end };
        let ranges = [r(Kind::Write, 0, 9), r(Kind::Read, 5, 19), r(Kind::Read, 30, u64::MAX)];
        assert_eq!(
            coverage(&ranges, &[(0, 40)]),
            [
                (Some(Kind::Write), 0, 9),
                (Some(Kind::Read), 10, 19),
                (None, 20, 29),
                (Some(Kind::Read), 30, 40)
            ]
        );
        assert_eq!(coverage(&ranges, &[(100, u64::MAX)]), [(Some(Kind::Read), 100, u64::MAX)]);
        // Overlapping spans are merged, each byte reported once.
        assert_eq!(
            coverage(&ranges, &[(3, 12), (0, 5)]),
            [(Some(Kind::Write), 0, 9), (Some(Kind::Read), 10, 12)]
        );
        assert_eq!(coverage(&[], &[(0, u64::MAX)]), [(None, 0, u64::MAX)]);
    }
}

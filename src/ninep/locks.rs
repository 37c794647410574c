//! POSIX record locks of one 9P session, kept in the server and owned by remote processes.
//!
//! Tlock carries the lock owner as the remote sees it: `proc_id` (the process) and
//! `client_id` (the machine). POSIX locks belong to a process, not to a descriptor: one
//! process may lock through two fids of one file without conflicting with itself, unlock
//! through either, and closing any of its descriptors drops all its locks on the file. Host
//! locks cannot express that (classic fcntl locks would make every remote process one owner,
//! this one; OFD locks make every fid its own owner), so the table lives here: per file
//! (device, inode), a list of byte ranges with their owner, split and merged as fcntl does.
//!
//! What it costs: remote locks are not seen by processes on the client machine, and theirs
//! are not seen by the remote (both sides' locks used to meet in the host kernel as OFD locks,
//! with the wrong owner semantics). A blocked request is answered BLOCKED at once; the remote
//! kernel sleeps and retries, so the server never waits. The number of ranges is capped per
//! session (ENOLCK beyond), so a remote cannot grow the table without bound.

use std::collections::HashMap;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// What a set request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    /// Another owner holds a conflicting range.
    Blocked,
    /// The session holds too many ranges.
    NoLocks,
}

#[derive(Default)]
struct FileLocks {
    ranges: Vec<Range>,
    /// Fids each owner locked through: clunking any of them drops the owner's locks.
    fids: HashMap<LockOwner, Vec<u32>>,
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
    /// through `fid`.
    pub fn set(
        &mut self,
        file: FileKey,
        owner: &LockOwner,
        fid: u32,
        kind: Option<Kind>,
        start: u64,
        end: u64,
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
        for r in locks.ranges.iter().filter(|r| &r.owner == owner) {
            old_mine += 1;
            if r.end < start || r.start > end {
                next.push(r.clone());
                continue;
            }
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
        if total > self.cap && total > self.ranges {
            if locks.ranges.is_empty() && locks.fids.is_empty() {
                self.files.remove(&file);
            }
            return Outcome::NoLocks;
        }
        locks.ranges.retain(|r| &r.owner != owner);
        locks.ranges.extend(next);
        if kind.is_some() {
            let fids = locks.fids.entry(owner.clone()).or_default();
            if !fids.contains(&fid) {
                fids.push(fid);
            }
        } else if !locks.ranges.iter().any(|r| &r.owner == owner) {
            locks.fids.remove(owner);
        }
        if locks.ranges.is_empty() && locks.fids.is_empty() {
            self.files.remove(&file);
        }
        self.ranges = total;
        Outcome::Granted
    }

    /// The first range of another owner that would block `kind` on `start..=end`.
    pub fn get(&self, file: FileKey, owner: &LockOwner, kind: Kind, start: u64, end: u64) -> Option<Range> {
        let locks = self.files.get(&file)?;
        locks.ranges.iter().find(|h| conflicts(h, owner, kind, start, end)).cloned()
    }

    /// Fid `fid` is gone (Tclunk, Tremove): like close(2), every owner that locked through
    /// it loses all its locks on that file.
    pub fn fid_closed(&mut self, fid: u32) {
        let mut dropped = 0;
        self.files.retain(|_, locks| {
            let gone: Vec<LockOwner> =
                locks.fids.iter().filter(|(_, fids)| fids.contains(&fid)).map(|(o, _)| o.clone()).collect();
            for owner in gone {
                locks.fids.remove(&owner);
                let n = locks.ranges.len();
                locks.ranges.retain(|r| r.owner != owner);
                dropped += n - locks.ranges.len();
            }
            !(locks.ranges.is_empty() && locks.fids.is_empty())
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

    #[test]
    fn one_owner_locks_twice_without_conflict_others_are_blocked() {
        let mut t = LockTable::default();
        assert_eq!(t.set(F, &owner(1), 10, Some(Kind::Write), 0, 9), Outcome::Granted);
        // Same process, another fid: no conflict with itself.
        assert_eq!(t.set(F, &owner(1), 11, Some(Kind::Write), 5, 19), Outcome::Granted);
        assert_eq!(t.len(), 1, "merged into one range");
        assert_eq!(t.set(F, &owner(2), 12, Some(Kind::Read), 15, 15), Outcome::Blocked);
        let held = t.get(F, &owner(2), Kind::Read, 0, u64::MAX).expect("conflict");
        assert_eq!((held.owner.proc_id, held.start, held.end, held.kind), (1, 0, 19, Kind::Write));
        // Unlock the middle through the second fid: two ranges remain.
        assert_eq!(t.set(F, &owner(1), 11, None, 5, 9), Outcome::Granted);
        assert_eq!(t.len(), 2);
        assert_eq!(t.set(F, &owner(2), 12, Some(Kind::Write), 5, 9), Outcome::Granted);
        // Closing fid 10 (the first fid of process 1) drops all of its locks.
        t.fid_closed(10);
        assert!(t.get(F, &owner(2), Kind::Write, 0, u64::MAX).is_none());
        assert_eq!(t.len(), 1);
        t.fid_closed(12);
        assert!(t.is_empty());
    }

    #[test]
    fn read_locks_share_and_downgrade_splits() {
        let mut t = LockTable::default();
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), 0, u64::MAX), Outcome::Granted);
        assert_eq!(t.set(F, &owner(2), 2, Some(Kind::Read), 100, 199), Outcome::Granted);
        assert_eq!(t.set(F, &owner(2), 2, Some(Kind::Write), 100, 199), Outcome::Blocked);
        // Process 1 upgrades part of its read lock to write: split in three, one conflict.
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Write), 0, 49), Outcome::Granted);
        assert_eq!(t.len(), 3);
        let c = t.get(F, &owner(3), Kind::Read, 0, 0).expect("write lock");
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
            assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), i * 2, i * 2), Outcome::Granted);
        }
        let n = 200;
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), n, n), Outcome::NoLocks);
        assert_eq!(t.len(), 100);
        // Unlocking still works and frees room.
        assert_eq!(t.set(F, &owner(1), 1, None, 0, 0), Outcome::Granted);
        assert_eq!(t.set(F, &owner(1), 1, Some(Kind::Read), n, n), Outcome::Granted);
    }
}

//! When a peer that sends without reading has gone too far: the bookkeeping shared by the
//! pumps between an SSH channel and a local stream (`cpu`'s 9P back-channel, cpud's
//! forwarded connections).
//!
//! A pump takes every channel message as it arrives, so russh's connection loop never waits
//! for a slow local end, and queues the bytes. A queue that only grows because the local end
//! is slow (a disk, a loaded guest) is normal; one that grows while the other direction has
//! been stuck for a while (the peer does not read what it is sent) is a flood. [`Backlog`]
//! says which: past [`SOFT_LIMIT`] queued bytes with the watched writer blocked for
//! [`STUCK_FOR`], or past [`HARD_LIMIT`] in any case. It does no I/O.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Queued bytes tolerated while the watched writer makes progress.
pub const SOFT_LIMIT: usize = 8 << 20;
/// Queued bytes never exceeded (the memory bound).
pub const HARD_LIMIT: usize = 64 << 20;
/// How long the watched writer may wait before the peer counts as not reading.
pub const STUCK_FOR: Duration = Duration::from_secs(2);

/// Queued bytes, and since when the watched writer has been waiting.
pub struct Backlog {
    queued: AtomicUsize,
    /// Milliseconds since `origin` + 1 when the writer started waiting; 0: not waiting.
    blocked_since: AtomicU64,
    origin: Instant,
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog { queued: AtomicUsize::new(0), blocked_since: AtomicU64::new(0), origin: Instant::now() }
    }
}

impl Backlog {
    /// Counts `n` more queued bytes; returns the total.
    pub fn add(&self, n: usize) -> usize {
        self.queued.fetch_add(n, Ordering::SeqCst) + n
    }

    /// `n` queued bytes were passed on.
    pub fn sub(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::SeqCst);
    }

    /// The watched writer starts waiting.
    pub fn writer_waits(&self) {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let _ = self.blocked_since.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The watched writer got through.
    pub fn writer_done(&self) {
        self.blocked_since.store(0, Ordering::SeqCst);
    }

    /// Whether `queued` bytes are too many now.
    pub fn too_much(&self, queued: usize) -> bool {
        if queued > HARD_LIMIT {
            return true;
        }
        if queued <= SOFT_LIMIT {
            return false;
        }
        match self.blocked_since.load(Ordering::SeqCst) {
            0 => false,
            since => {
                let now = self.origin.elapsed().as_millis() as u64 + 1;
                Duration::from_millis(now.saturating_sub(since)) >= STUCK_FOR
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_is_fine_stuck_is_not_and_the_hard_limit_holds() {
        let b = Backlog::default();
        assert!(!b.too_much(SOFT_LIMIT + 1), "over the soft limit but the writer is not waiting");
        b.writer_waits();
        assert!(!b.too_much(SOFT_LIMIT + 1), "waiting, but not for long");
        assert!(b.too_much(HARD_LIMIT + 1));
        // Pretend the wait began long ago.
        b.blocked_since.store(1, Ordering::SeqCst);
        let later =
            Backlog { origin: Instant::now() - STUCK_FOR - Duration::from_millis(10), ..Backlog::default() };
        later.writer_waits();
        later.blocked_since.store(1, Ordering::SeqCst);
        assert!(later.too_much(SOFT_LIMIT + 1));
        assert!(!later.too_much(SOFT_LIMIT));
        later.writer_done();
        assert!(!later.too_much(SOFT_LIMIT + 1));
        assert_eq!(b.add(10), 10);
        b.sub(4);
        assert_eq!(b.add(0), 6);
    }
}

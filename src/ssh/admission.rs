//! Admission control for cpud's accept loop: which new connections may start a handshake.
//!
//! This module owns the bookkeeping of unauthenticated connections ("startups") and the
//! decision taken on accept; it does no I/O. The rules follow OpenSSH's sshd:
//! - `MaxStartups start:rate:full`: below `start` in-progress handshakes every connection is
//!   admitted; from `start` on a new one is dropped with probability `rate`% rising linearly
//!   to 100% at `full` (random early drop).
//! - `PerSourceMaxStartups`: one source (an IPv4 address, an IPv6 /64) holds at most
//!   `per_source` handshakes at once.
//!
//! One addition makes a lock-out by a few sources impossible: once `start` is reached, a
//! connection from a source that holds fewer handshakes than the busiest other source evicts
//! that source's oldest handshake instead of being dropped at random. Sources that hold one
//! handshake each (a real botnet) still meet random early drop, as with OpenSSH.
//!
//! A connection over its source's limit is not dropped at once: it may wait (without a
//! thread; at most [`AdmissionConfig::queue_per_source`] per source and
//! [`AdmissionConfig::queue_total`] in all) for one of its source's
//! handshakes to finish, so a burst of legitimate logins from one machine (`decpu -n`, a
//! script starting 50 `cpu`s) is served a little later instead of refused.
//!
//! A [`Ticket`] stands for one admitted handshake until it is released (the peer
//! authenticated) or dropped (the connection ended); an evicted connection learns it through
//! the receiver handed out with its ticket.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// OpenSSH's `MaxStartups start:rate:full`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxStartups {
    pub start: usize,
    pub rate: u32,
    pub full: usize,
}

impl MaxStartups {
    /// Parses `start:rate:full` or a single number `N` (which means `N:100:N`, a hard limit).
    pub fn parse(text: &str) -> Option<MaxStartups> {
        let parts: Vec<&str> = text.split(':').collect();
        let limits = match parts.as_slice() {
            [n] => {
                let n = n.parse().ok()?;
                MaxStartups { start: n, rate: 100, full: n }
            }
            [s, r, f] => MaxStartups { start: s.parse().ok()?, rate: r.parse().ok()?, full: f.parse().ok()? },
            _ => return None,
        };
        (limits.start >= 1 && limits.rate <= 100 && limits.full >= limits.start).then_some(limits)
    }

    /// The chance in percent that a new connection is dropped while `in_progress` handshakes
    /// run.
    pub fn drop_percent(&self, in_progress: usize) -> u32 {
        if in_progress < self.start {
            return 0;
        }
        if in_progress >= self.full {
            return 100;
        }
        let span = (self.full - self.start) as u64;
        let above = (in_progress - self.start) as u64;
        let rate = u64::from(self.rate);
        // `above < span`, so the result stays below 100.
        (rate + (100 - rate) * above / span) as u32
    }
}

/// The limits of [`Admission`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionConfig {
    pub max_startups: MaxStartups,
    /// Handshakes in progress from one source at once.
    pub per_source: usize,
    /// Connections from one source that may wait for one of its handshakes to end.
    pub queue_per_source: usize,
    /// Waiting connections from all sources together (each holds a descriptor).
    pub queue_total: usize,
    /// How long such a connection may wait.
    pub queue_wait: std::time::Duration,
}

impl Default for AdmissionConfig {
    /// 16:30:64 and 8 per source: the ceiling bounds cpud's memory (a handshake runs on a
    /// thread of its own); 8 per source leaves room for `decpu -n` and parallel scripts.
    fn default() -> AdmissionConfig {
        AdmissionConfig {
            max_startups: MaxStartups { start: 16, rate: 30, full: 64 },
            per_source: 8,
            queue_per_source: 192,
            queue_total: 256,
            queue_wait: std::time::Duration::from_secs(30),
        }
    }
}

/// Where a connection comes from, as far as limits go.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    V4([u8; 4]),
    /// The /64 prefix: one IPv6 host usually owns a whole /64.
    V6([u8; 8]),
    /// Another transport (vsock CID, unix peer): the peer description without its port.
    Other(String),
}

impl Source {
    /// The source of a peer as [`crate::transport::Listener::accept`] describes it.
    pub fn of_peer(peer: &str) -> Source {
        if let Ok(addr) = peer.parse::<SocketAddr>() {
            return Source::of_ip(addr.ip());
        }
        match peer.rsplit_once(" port ") {
            Some((head, _)) => Source::Other(head.to_string()),
            None => Source::Other(peer.to_string()),
        }
    }

    pub fn of_ip(ip: IpAddr) -> Source {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Source::V4(v4.octets()),
            IpAddr::V6(v6) => {
                let o = v6.octets();
                Source::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }
}

/// Why a connection was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    PerSource { limit: usize },
    EarlyDrop { in_progress: usize, percent: u32 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::PerSource { limit } => {
                write!(f, "{limit} handshakes from this source already in progress")
            }
            Refusal::EarlyDrop { in_progress, percent } => {
                write!(f, "{in_progress} handshakes in progress (drop chance {percent}%)")
            }
        }
    }
}

/// The outcome of [`Admission::admit`].
pub enum Verdict {
    /// Admitted; the receiver fires if a later connection evicts this one.
    Admitted {
        ticket: Ticket,
        evicted: oneshot::Receiver<()>,
    },
    Refused(Refusal),
}

struct Pending {
    id: u64,
    evict: oneshot::Sender<()>,
}

struct State {
    in_progress: usize,
    /// Per source, oldest first.
    sources: HashMap<Source, Vec<Pending>>,
    next_id: u64,
    rng: u64,
}

/// The shared admission state of one server.
pub struct Admission {
    config: AdmissionConfig,
    state: Mutex<State>,
    /// Woken whenever a handshake stops counting.
    released: tokio::sync::Notify,
    queued: Mutex<HashMap<Source, usize>>,
}

impl Admission {
    pub fn new(config: AdmissionConfig) -> Arc<Admission> {
        Self::with_seed(config, random_seed())
    }

    /// With a fixed seed for the random early drop (tests).
    pub fn with_seed(config: AdmissionConfig, seed: u64) -> Arc<Admission> {
        Arc::new(Admission {
            config,
            state: Mutex::new(State { in_progress: 0, sources: HashMap::new(), next_id: 0, rng: seed | 1 }),
            released: tokio::sync::Notify::new(),
            queued: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> AdmissionConfig {
        self.config
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> usize {
        self.lock().in_progress
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides on a new connection from `source`.
    pub fn admit(self: &Arc<Self>, source: Source) -> Verdict {
        let limits = self.config.max_startups;
        let mut st = self.lock();
        let mine = st.sources.get(&source).map_or(0, Vec::len);
        if mine >= self.config.per_source {
            return Verdict::Refused(Refusal::PerSource { limit: self.config.per_source });
        }
        let mut evicted_one = false;
        if st.in_progress >= limits.start {
            let busiest = st
                .sources
                .iter()
                .filter(|(s, list)| **s != source && list.len() >= mine + 2)
                .max_by_key(|(_, list)| list.len())
                .map(|(s, _)| s.clone());
            match busiest {
                Some(victim_source) => {
                    if let Some(list) = st.sources.get_mut(&victim_source) {
                        let victim = list.remove(0);
                        let _ = victim.evict.send(());
                    }
                    st.in_progress -= 1;
                    evicted_one = true;
                }
                None => {
                    let percent = limits.drop_percent(st.in_progress);
                    if percent > 0 && st.next_random() % 100 < u64::from(percent) {
                        return Verdict::Refused(Refusal::EarlyDrop { in_progress: st.in_progress, percent });
                    }
                }
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        let (evict, evicted) = oneshot::channel();
        st.sources.entry(source.clone()).or_default().push(Pending { id, evict });
        st.in_progress += 1;
        drop(st);
        if evicted_one {
            // The victim's source has room again for one of its waiting connections.
            self.released.notify_waiters();
        }
        Verdict::Admitted { ticket: Ticket { admission: Some(self.clone()), source, id }, evicted }
    }

    /// A place in `source`'s waiting line, if it has room.
    pub fn queue(self: &Arc<Self>, source: &Source) -> Option<QueuePlace> {
        let mut q = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if q.values().sum::<usize>() >= self.config.queue_total {
            return None;
        }
        let n = q.entry(source.clone()).or_insert(0);
        if *n >= self.config.queue_per_source {
            return None;
        }
        *n += 1;
        Some(QueuePlace { admission: self.clone(), source: source.clone() })
    }

    /// Waits (at most `limit`) until `source` may start a handshake; the verdict then, or the
    /// per-source refusal when the time ran out.
    pub async fn admit_when_possible(
        self: &Arc<Self>,
        source: Source,
        limit: std::time::Duration,
    ) -> Verdict {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so a release between the two is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.admit(source.clone()) {
                Verdict::Refused(Refusal::PerSource { limit }) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Verdict::Refused(Refusal::PerSource { limit });
                    }
                }
                other => return other,
            }
        }
    }

    fn forget(&self, source: &Source, id: u64) {
        let mut st = self.lock();
        let Some(list) = st.sources.get_mut(source) else { return };
        let Some(pos) = list.iter().position(|p| p.id == id) else {
            // Already evicted (and uncounted then).
            return;
        };
        list.remove(pos);
        if list.is_empty() {
            st.sources.remove(source);
        }
        st.in_progress -= 1;
        drop(st);
        self.released.notify_waiters();
    }
}

impl State {
    /// xorshift64*: good enough to make the drop unpredictable to a peer that cannot see it.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    match rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty()) {
        Ok(8) => u64::from_ne_bytes(b),
        _ => {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        }
    }
}

/// A connection waiting for its source's turn; leaves the line when dropped.
pub struct QueuePlace {
    admission: Arc<Admission>,
    source: Source,
}

impl Drop for QueuePlace {
    fn drop(&mut self) {
        let mut q = self.admission.queued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = q.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                q.remove(&self.source);
            }
        }
    }
}

/// One admitted handshake; it stops counting when released or dropped.
pub struct Ticket {
    admission: Option<Arc<Admission>>,
    source: Source,
    id: u64,
}

impl Ticket {
    /// The peer authenticated (or the connection ended): the slot is free again.
    pub fn release(&mut self) {
        if let Some(a) = self.admission.take() {
            a.forget(&self.source, self.id);
        }
    }

    pub fn is_released(&self) -> bool {
        self.admission.is_none()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(last: u8) -> Source {
        Source::V4([127, 0, 0, last])
    }

    fn admitted(v: Verdict) -> (Ticket, oneshot::Receiver<()>) {
        match v {
            Verdict::Admitted { ticket, evicted } => (ticket, evicted),
            Verdict::Refused(r) => panic!("refused: {r}"),
        }
    }

    #[test]
    fn parses_max_startups_like_sshd() {
        assert_eq!(MaxStartups::parse("10:30:100"), Some(MaxStartups { start: 10, rate: 30, full: 100 }));
        assert_eq!(MaxStartups::parse("20"), Some(MaxStartups { start: 20, rate: 100, full: 20 }));
        for bad in ["", "0", "10:30", "10:101:100", "100:30:10", "a:b:c", "1:2:3:4"] {
            assert_eq!(MaxStartups::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn drop_chance_rises_linearly_from_rate_to_full() {
        let m = MaxStartups { start: 10, rate: 30, full: 100 };
        assert_eq!(m.drop_percent(0), 0);
        assert_eq!(m.drop_percent(9), 0);
        assert_eq!(m.drop_percent(10), 30);
        assert_eq!(m.drop_percent(55), 65);
        assert_eq!(m.drop_percent(99), 99);
        assert_eq!(m.drop_percent(100), 100);
        assert_eq!(m.drop_percent(1000), 100);
    }

    #[test]
    fn sources_are_addresses_and_ipv6_prefixes() {
        assert_eq!(Source::of_peer("127.0.0.2:5000"), Source::of_peer("127.0.0.2:6000"));
        assert_ne!(Source::of_peer("127.0.0.2:5000"), Source::of_peer("127.0.0.3:5000"));
        assert_eq!(Source::of_peer("[2001:db8:1:2::1]:22"), Source::of_peer("[2001:db8:1:2:ffff::9]:23"));
        assert_ne!(Source::of_peer("[2001:db8:1:2::1]:22"), Source::of_peer("[2001:db8:1:3::1]:22"));
        assert_eq!(Source::of_peer("[::ffff:10.1.2.3]:1"), Source::of_peer("10.1.2.3:2"));
        assert_eq!(Source::of_peer("vsock CID 3 port 1025"), Source::of_peer("vsock CID 3 port 1026"));
    }

    #[test]
    fn per_source_limit_and_release() {
        let a = Admission::with_seed(
            AdmissionConfig {
                max_startups: MaxStartups { start: 100, rate: 30, full: 100 },
                per_source: 2,
                queue_per_source: 1,
                queue_total: 1,
                queue_wait: std::time::Duration::ZERO,
            },
            1,
        );
        let (mut t1, _) = admitted(a.admit(v4(2)));
        let (_t2, _) = admitted(a.admit(v4(2)));
        assert!(matches!(a.admit(v4(2)), Verdict::Refused(Refusal::PerSource { limit: 2 })));
        let (_t3, _) = admitted(a.admit(v4(3)));
        assert_eq!(a.in_progress(), 3);
        t1.release();
        assert_eq!(a.in_progress(), 2);
        let (_t4, _) = admitted(a.admit(v4(2)));
        drop(t1);
        assert_eq!(a.in_progress(), 3);
    }

    #[test]
    fn hard_limit_drops_everyone_alike_when_no_source_is_greedy() {
        let a = Admission::with_seed(
            AdmissionConfig {
                max_startups: MaxStartups { start: 3, rate: 100, full: 3 },
                per_source: 5,
                queue_per_source: 1,
                queue_total: 1,
                queue_wait: std::time::Duration::ZERO,
            },
            7,
        );
        let held: Vec<_> = (2..5).map(|i| admitted(a.admit(v4(i)))).collect();
        assert!(matches!(
            a.admit(v4(9)),
            Verdict::Refused(Refusal::EarlyDrop { in_progress: 3, percent: 100 })
        ));
        drop(held);
        assert_eq!(a.in_progress(), 0);
    }

    #[test]
    fn a_new_source_evicts_the_oldest_handshake_of_the_busiest_source() {
        let a = Admission::with_seed(
            AdmissionConfig {
                max_startups: MaxStartups { start: 4, rate: 100, full: 4 },
                per_source: 8,
                queue_per_source: 1,
                queue_total: 1,
                queue_wait: std::time::Duration::ZERO,
            },
            3,
        );
        let mut greedy: Vec<_> = (0..3).map(|_| admitted(a.admit(v4(2)))).collect();
        let (_other, _) = admitted(a.admit(v4(3)));
        // Full. The greedy source cannot take more; a fresh source gets in at its expense.
        assert!(matches!(a.admit(v4(2)), Verdict::Refused(Refusal::EarlyDrop { .. })));
        let (legit, _) = admitted(a.admit(v4(1)));
        assert_eq!(a.in_progress(), 4);
        assert_eq!(greedy[0].1.try_recv(), Ok(()), "the oldest greedy handshake was told to go");
        assert!(greedy[1].1.try_recv().is_err());
        // The evicted ticket no longer counts, and dropping it changes nothing.
        drop(greedy.remove(0));
        assert_eq!(a.in_progress(), 4);
        // Still two ahead of a newcomer: evicted again. Then every source holds one, and
        // newcomers meet the random early drop (100% at full).
        let (_legit2, _) = admitted(a.admit(v4(4)));
        assert_eq!(greedy[0].1.try_recv(), Ok(()));
        assert!(matches!(a.admit(v4(5)), Verdict::Refused(Refusal::EarlyDrop { .. })));
        drop(legit);
        assert_eq!(a.in_progress(), 3);
    }

    #[test]
    fn early_drop_is_random_between_start_and_full() {
        let a = Admission::with_seed(
            AdmissionConfig {
                max_startups: MaxStartups { start: 1, rate: 50, full: 1000 },
                per_source: 1,
                queue_per_source: 1,
                queue_total: 1,
                queue_wait: std::time::Duration::ZERO,
            },
            42,
        );
        let _first = admitted(a.admit(Source::Other("first".into())));
        let mut kept = Vec::new();
        let mut dropped = 0;
        for i in 0..200 {
            match a.admit(Source::Other(format!("peer {i}"))) {
                Verdict::Admitted { ticket, .. } => kept.push(ticket),
                Verdict::Refused(_) => dropped += 1,
            }
        }
        assert!(dropped > 50 && !kept.is_empty(), "dropped {dropped}, kept {}", kept.len());
    }

    #[tokio::test]
    async fn a_connection_over_its_sources_limit_waits_for_a_place() {
        let a = Admission::with_seed(
            AdmissionConfig {
                max_startups: MaxStartups { start: 10, rate: 30, full: 10 },
                per_source: 1,
                queue_per_source: 1,
                queue_total: 1,
                queue_wait: std::time::Duration::ZERO,
            },
            5,
        );
        let (mut first, _) = admitted(a.admit(v4(2)));
        let place = a.queue(&v4(2)).expect("room in the line");
        assert!(a.queue(&v4(2)).is_none(), "the line holds one");
        // Nothing frees up: refused after the wait.
        let r = a.admit_when_possible(v4(2), std::time::Duration::from_millis(50)).await;
        assert!(matches!(r, Verdict::Refused(Refusal::PerSource { limit: 1 })));
        // The first handshake ends while the second waits: it gets in.
        let waiter = {
            let a = a.clone();
            tokio::spawn(
                async move { a.admit_when_possible(v4(2), std::time::Duration::from_secs(30)).await },
            )
        };
        tokio::task::yield_now().await;
        first.release();
        let (_second, _) = admitted(waiter.await.expect("waiter"));
        drop(place);
        assert!(a.queue(&v4(2)).is_some(), "the place was given back");
    }

    #[test]
    fn the_waiting_line_is_bounded_per_source_and_in_all() {
        let config = AdmissionConfig { queue_per_source: 2, queue_total: 3, ..AdmissionConfig::default() };
        let a = Admission::with_seed(config, 9);
        let p1 = a.queue(&v4(2)).expect("first");
        let _p2 = a.queue(&v4(2)).expect("second");
        assert!(a.queue(&v4(2)).is_none(), "per source");
        let _p3 = a.queue(&v4(3)).expect("another source");
        assert!(a.queue(&v4(4)).is_none(), "in all");
        drop(p1);
        assert!(a.queue(&v4(4)).is_some());
    }
}

//! The in-process history store.
//!
//! Streams are sharded by a hash of their id; each shard is a plain mutex held only
//! for a map update and never across an `.await`. `history.bytes` is split evenly
//! over the shards, so the total never exceeds it: when a shard is over its share,
//! its oldest entries go first, whichever streams they belong to, found through a
//! per-shard FIFO of (stream, offset) that is compacted when more than half of it
//! is stale (amortised O(1) per append).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::{History, HistoryStats, HistoryStore, Position, Recovery, StreamRef};
use crate::config::HistoryConfig;

/// Bytes counted per entry besides its frame: the entry, its FIFO slot, map share.
pub const ENTRY_OVERHEAD: usize = 48;
/// Number of shards.
const SHARDS: usize = 32;

/// A stream's id, owned: what the FIFO remembers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum StreamId {
    Key(Arc<str>),
    User(i64),
    Room(Arc<str>),
    All,
}

impl StreamId {
    fn as_ref(&self) -> StreamRef<'_> {
        match self {
            StreamId::Key(k) => StreamRef::Key(k),
            StreamId::User(m) => StreamRef::User(*m),
            StreamId::Room(r) => StreamRef::Room(r),
            StreamId::All => StreamRef::All,
        }
    }
}

#[derive(Debug)]
struct Stream {
    id: StreamId,
    epoch: u32,
    top: u64,
    entries: VecDeque<(u64, Bytes)>,
    bytes: usize,
    used: Instant,
}

impl Stream {
    fn new(id: StreamId, now: Instant) -> Self {
        Stream {
            id,
            epoch: History::new_epoch(),
            top: 0,
            entries: VecDeque::new(),
            bytes: 0,
            used: now,
        }
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.top,
        }
    }
}

#[derive(Debug)]
struct FifoSlot {
    stream: StreamId,
    epoch: u32,
    offset: u64,
}

type Map<K> = HashMap<K, Stream, ahash::RandomState>;

#[derive(Debug, Default)]
struct Shard {
    keys: Map<Arc<str>>,
    users: Map<i64>,
    rooms: Map<Arc<str>>,
    all: Option<Stream>,
    fifo: VecDeque<FifoSlot>,
    entries: usize,
    bytes: usize,
}

impl Shard {
    fn get_mut(&mut self, s: StreamRef<'_>) -> Option<&mut Stream> {
        match s {
            StreamRef::Key(k) => self.keys.get_mut(k),
            StreamRef::User(m) => self.users.get_mut(&m),
            StreamRef::Room(r) => self.rooms.get_mut(r),
            StreamRef::All => self.all.as_mut(),
        }
    }

    fn get_or_create(&mut self, s: StreamRef<'_>, now: Instant) -> &mut Stream {
        /// A stream in a map keyed by name, made (one allocation) only if missing.
        fn named<'m>(
            map: &'m mut Map<Arc<str>>,
            name: &str,
            make: impl FnOnce(Arc<str>) -> StreamId,
            now: Instant,
        ) -> &'m mut Stream {
            if !map.contains_key(name) {
                let a: Arc<str> = name.into();
                map.insert(a.clone(), Stream::new(make(a), now));
            }
            map.get_mut(name)
                .unwrap_or_else(|| unreachable!("inserted above"))
        }
        match s {
            StreamRef::Key(k) => named(&mut self.keys, k, StreamId::Key, now),
            StreamRef::User(m) => self
                .users
                .entry(m)
                .or_insert_with(|| Stream::new(StreamId::User(m), now)),
            StreamRef::Room(r) => named(&mut self.rooms, r, StreamId::Room, now),
            StreamRef::All => self
                .all
                .get_or_insert_with(|| Stream::new(StreamId::All, now)),
        }
    }

    /// Drops the oldest entry of the shard, whichever stream holds it.
    fn evict_oldest(&mut self) -> bool {
        while let Some(slot) = self.fifo.pop_front() {
            let Some(st) = self.get_mut(slot.stream.as_ref()) else {
                continue;
            };
            if st.epoch != slot.epoch {
                continue;
            }
            match st.entries.front() {
                Some(&(off, _)) if off == slot.offset => {
                    let (_, frame) = st.entries.pop_front().unwrap_or_else(|| unreachable!());
                    let n = frame.len() + ENTRY_OVERHEAD;
                    st.bytes -= n;
                    self.bytes -= n;
                    self.entries -= 1;
                    return true;
                }
                _ => continue,
            }
        }
        false
    }

    /// Removes FIFO slots whose entries are gone, once more than half are stale.
    fn compact(&mut self) {
        if self.fifo.len() <= 64 || self.fifo.len() <= 2 * self.entries {
            return;
        }
        let mut fifo = std::mem::take(&mut self.fifo);
        fifo.retain(|slot| match self.get_mut(slot.stream.as_ref()) {
            Some(st) if st.epoch == slot.epoch => st
                .entries
                .front()
                .is_some_and(|&(first, _)| slot.offset >= first),
            _ => false,
        });
        self.fifo = fifo;
    }

    fn remove_stream(&mut self, st: &Stream) {
        self.entries -= st.entries.len();
        self.bytes -= st.bytes;
    }
}

/// Push history in this process's memory.
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: ahash::RandomState,
    size: usize,
    shard_bytes: usize,
    ttl: Duration,
}

impl MemoryStore {
    /// A store with `history.size`, `history.bytes` and `history.ttl` from `config`.
    pub fn new(config: &HistoryConfig) -> Self {
        Self::with_limits(config.size, config.bytes, config.ttl)
    }

    /// A store keeping `size` pushes per stream, `bytes` in all, for `ttl` unused.
    pub fn with_limits(size: usize, bytes: usize, ttl: Duration) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: ahash::RandomState::new(),
            size: size.max(1),
            shard_bytes: (bytes / SHARDS).max(1),
            ttl,
        }
    }

    fn shard(&self, s: StreamRef<'_>) -> &Mutex<Shard> {
        &self.shards[self.hasher.hash_one(s) as usize % self.shards.len()]
    }
}

impl HistoryStore for MemoryStore {
    fn append(&self, stream: StreamRef<'_>, frame: &Bytes, create: bool) -> Option<Position> {
        let now = Instant::now();
        let mut shard = self.shard(stream).lock();
        let sh = &mut *shard;
        let st = if create {
            sh.get_or_create(stream, now)
        } else {
            sh.get_mut(stream)?
        };
        st.top += 1;
        st.used = now;
        let pos = st.position();
        let n = frame.len() + ENTRY_OVERHEAD;
        st.entries.push_back((pos.offset, frame.clone()));
        st.bytes += n;
        let mut freed = (0, 0);
        if st.entries.len() > self.size {
            if let Some((_, old)) = st.entries.pop_front() {
                let m = old.len() + ENTRY_OVERHEAD;
                st.bytes -= m;
                freed = (1, m);
            }
        }
        let id = st.id.clone();
        sh.fifo.push_back(FifoSlot {
            stream: id,
            epoch: pos.epoch,
            offset: pos.offset,
        });
        sh.entries = sh.entries + 1 - freed.0;
        sh.bytes = sh.bytes + n - freed.1;
        while sh.bytes > self.shard_bytes && sh.evict_oldest() {}
        sh.compact();
        Some(pos)
    }

    fn ensure(&self, stream: StreamRef<'_>) -> Position {
        let now = Instant::now();
        let mut shard = self.shard(stream).lock();
        let st = shard.get_or_create(stream, now);
        st.used = now;
        st.position()
    }

    fn since(&self, stream: StreamRef<'_>, since: Position) -> Recovery {
        let now = Instant::now();
        let mut shard = self.shard(stream).lock();
        let st = shard.get_or_create(stream, now);
        st.used = now;
        let top = st.position();
        let not = Recovery {
            top,
            recovered: false,
            entries: Vec::new(),
        };
        if since.epoch != top.epoch || since.offset > top.offset {
            return not;
        }
        let first = st.entries.front().map_or(top.offset + 1, |&(o, _)| o);
        if since.offset + 1 < first {
            return not;
        }
        let entries = st
            .entries
            .iter()
            .filter(|(o, _)| *o > since.offset)
            .map(|(o, f)| (*o, f.clone()))
            .collect();
        Recovery {
            top,
            recovered: true,
            entries,
        }
    }

    fn expire(&self, now: Instant) -> usize {
        let ttl = self.ttl;
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut sh = shard.lock();
            let sh = &mut *sh;
            let mut gone = Vec::new();
            let live = |st: &Stream| now.saturating_duration_since(st.used) < ttl;
            sh.keys.retain(|_, st| {
                live(st) || {
                    gone.push((st.entries.len(), st.bytes));
                    false
                }
            });
            sh.users.retain(|_, st| {
                live(st) || {
                    gone.push((st.entries.len(), st.bytes));
                    false
                }
            });
            sh.rooms.retain(|_, st| {
                live(st) || {
                    gone.push((st.entries.len(), st.bytes));
                    false
                }
            });
            if let Some(st) = sh.all.take_if(|st| !live(st)) {
                sh.remove_stream(&st);
                dropped += 1;
            }
            for (e, b) in &gone {
                sh.entries -= e;
                sh.bytes -= b;
            }
            dropped += gone.len();
            sh.compact();
        }
        dropped
    }

    fn stats(&self) -> HistoryStats {
        let mut s = HistoryStats::default();
        for shard in self.shards.iter() {
            let sh = shard.lock();
            s.streams += (sh.keys.len() + sh.users.len() + sh.rooms.len()) as u64
                + u64::from(sh.all.is_some());
            s.entries += sh.entries as u64;
            s.bytes += sh.bytes as u64;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Frame;

    fn frame(n: u64) -> Bytes {
        Frame::new(1000, 0, n.to_string()).to_bytes()
    }

    fn store(size: usize) -> MemoryStore {
        MemoryStore::with_limits(size, 1 << 30, Duration::from_secs(60))
    }

    #[test]
    fn offsets_grow_by_one_per_append_and_epochs_differ_per_stream() {
        let s = store(10);
        assert_eq!(s.append(StreamRef::Key("a"), &frame(1), false), None);
        let p0 = s.ensure(StreamRef::Key("a"));
        assert_eq!(p0.offset, 0);
        assert_ne!(p0.epoch, 0);
        let p1 = s.append(StreamRef::Key("a"), &frame(1), false).unwrap();
        let p2 = s.append(StreamRef::Key("a"), &frame(2), true).unwrap();
        assert_eq!((p1.epoch, p1.offset, p2.offset), (p0.epoch, 1, 2));
        let r = s.append(StreamRef::Room("a"), &frame(1), true).unwrap();
        assert_eq!(
            r.offset, 1,
            "a room and a key of the same name are two streams"
        );
        assert_eq!(s.stats().streams, 2);
    }

    #[test]
    fn since_replays_everything_missed_or_nothing() {
        let s = store(3);
        let e = s.ensure(StreamRef::User(7)).epoch;
        for i in 1..=5 {
            s.append(StreamRef::User(7), &frame(i), false);
        }
        // entries 3, 4, 5 are kept
        let at = |offset| Position { epoch: e, offset };
        let r = s.since(StreamRef::User(7), at(2));
        assert!(r.recovered);
        assert_eq!(r.entries.iter().map(|x| x.0).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(r.top, at(5));
        let r = s.since(StreamRef::User(7), at(5));
        assert!(r.recovered && r.entries.is_empty(), "up to date");
        let r = s.since(StreamRef::User(7), at(1));
        assert!(!r.recovered && r.entries.is_empty(), "push 2 was dropped");
        let r = s.since(StreamRef::User(7), at(6));
        assert!(!r.recovered, "ahead of the stream");
        let r = s.since(
            StreamRef::User(7),
            Position {
                epoch: e ^ 1,
                offset: 4,
            },
        );
        assert!(!r.recovered, "another epoch");
    }

    #[test]
    fn bytes_cap_drops_the_oldest_across_streams() {
        let per = frame(1).len() + ENTRY_OVERHEAD;
        // one shard's share holds 4 entries
        let s = MemoryStore::with_limits(100, 4 * per * SHARDS, Duration::from_secs(60));
        // find two streams in the same shard
        let a = StreamRef::Key("a");
        let b = (0..10_000)
            .map(|i| format!("b{i}"))
            .find(|k| std::ptr::eq(s.shard(StreamRef::Key(k)), s.shard(a)))
            .unwrap();
        let b = StreamRef::Key(&b);
        let ea = s.ensure(a).epoch;
        let eb = s.ensure(b).epoch;
        for i in 1..=3 {
            s.append(a, &frame(i), false);
        }
        for i in 1..=3 {
            s.append(b, &frame(i), false);
        }
        let st = s.stats();
        assert_eq!(st.entries, 4);
        assert!(st.bytes <= (4 * per) as u64);
        assert!(
            !s.since(
                a,
                Position {
                    epoch: ea,
                    offset: 0
                }
            )
            .recovered
        );
        let r = s.since(
            a,
            Position {
                epoch: ea,
                offset: 2,
            },
        );
        assert!(r.recovered && r.entries.len() == 1, "a keeps its newest");
        assert!(
            s.since(
                b,
                Position {
                    epoch: eb,
                    offset: 0
                }
            )
            .recovered
        );
    }

    #[test]
    fn fifo_stays_bounded_when_only_the_size_cap_trims() {
        let s = store(2);
        s.ensure(StreamRef::Key("old"));
        s.append(StreamRef::Key("old"), &frame(1), false);
        for i in 0..10_000 {
            s.append(StreamRef::Room("hot"), &frame(i), true);
        }
        let total: usize = s.shards.iter().map(|sh| sh.lock().fifo.len()).sum();
        assert!(total < 200, "fifo has {total} slots for 3 entries");
        assert_eq!(s.stats().entries, 3);
    }

    #[test]
    fn unused_streams_expire_and_come_back_with_a_new_epoch() {
        let s = MemoryStore::with_limits(10, 1 << 20, Duration::from_millis(50));
        let e1 = s.ensure(StreamRef::Room("r")).epoch;
        s.append(StreamRef::Room("r"), &frame(1), false);
        s.ensure(StreamRef::All);
        assert_eq!(s.expire(Instant::now()), 0);
        assert_eq!(s.expire(Instant::now() + Duration::from_millis(60)), 2);
        assert_eq!(s.stats(), HistoryStats::default());
        let r = s.since(
            StreamRef::Room("r"),
            Position {
                epoch: e1,
                offset: 0,
            },
        );
        assert!(!r.recovered, "a new stream, a new epoch");
        assert_ne!(r.top.epoch, e1);
        assert_eq!(r.top.offset, 0);
    }
}

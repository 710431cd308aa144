//! Push history per source stream, so a client that lost its connection resumes
//! without loss.
//!
//! A stream holds the last pushes of one source: a key, a user id, a room, or every
//! broadcast. Each has an **epoch** (random, new whenever the stream is created,
//! including after it expired) and an **offset** that grows by one per push
//! appended, so a client's position is `(epoch, offset)`. A push is appended once per
//! stream it addresses, never once per recipient: a room push is one entry in the
//! room's stream.
//!
//! Retention: `history.size` pushes per stream, `history.bytes` over all streams (a
//! hard cap, oldest first), and `history.ttl` (a stream no one pushed to or
//! resumed from for that long is dropped). Anything dropped only turns a later
//! resume into an honest "not recovered": [`HistoryStore::since`] returns every
//! missed push or none.
//!
//! [`HistoryStore`] is the storage; [`memory::MemoryStore`] the in-process one.
//! [`History`] adds what the registry needs around it: which source kinds are kept
//! and the per-stream ordering locks that make append order the delivery order.

pub mod memory;
pub mod redis_store;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use serde::{Deserialize, Serialize};

use crate::config::{HistoryConfig, HistoryStoreKind};
use crate::protocol::Source;

/// One stream, borrowed: what a lookup needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamRef<'a> {
    Key(&'a str),
    User(i64),
    Room(&'a str),
    All,
}

impl StreamRef<'_> {
    /// The source kind of this stream.
    pub fn source(&self) -> Source {
        match self {
            StreamRef::Key(_) => Source::Key,
            StreamRef::User(_) => Source::User,
            StreamRef::Room(_) => Source::Room,
            StreamRef::All => Source::All,
        }
    }
}

/// A position in a stream: the client has every push up to `offset` of `epoch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub epoch: u32,
    pub offset: u64,
}

/// What [`HistoryStore::since`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The stream's epoch and the offset of its last push.
    pub top: Position,
    /// Every push after the asked position is in `entries`. False when the epoch
    /// changed, the position is ahead of the stream, or pushes after it were
    /// dropped; `entries` is then empty.
    pub recovered: bool,
    /// The missed pushes, oldest first: offset and the encoded frame.
    pub entries: Vec<(u64, Bytes)>,
}

/// Sizes, for `Online` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryStats {
    pub streams: u64,
    pub entries: u64,
    pub bytes: u64,
}

/// Storage of push history. Every method is short and never blocks on I/O, so the
/// registry may call it under a bucket lock.
pub trait HistoryStore: Send + Sync + fmt::Debug {
    /// Appends an encoded frame to `stream` and returns its position. A missing
    /// stream is created (with a new epoch) when `create`, else nothing is kept and
    /// `None` is returned.
    fn append(&self, stream: StreamRef<'_>, frame: &Bytes, create: bool) -> Option<Position>;

    /// The stream's epoch and top offset, creating it if missing; marks it used.
    fn ensure(&self, stream: StreamRef<'_>) -> Position;

    /// Everything after `since`, or an honest "not recovered"; creates the stream if
    /// missing and marks it used.
    fn since(&self, stream: StreamRef<'_>, since: Position) -> Recovery;

    /// Drops streams unused for longer than the TTL; returns how many were dropped.
    fn expire(&self, now: Instant) -> usize;

    /// Current sizes.
    fn stats(&self) -> HistoryStats;
}

/// Number of ordering-lock shards.
const ORDER_SHARDS: usize = 256;

/// The history a registry appends to: the store, which kinds are kept, and the
/// ordering locks.
pub struct History {
    store: Arc<dyn HistoryStore>,
    kinds: [bool; 4],
    order: Box<[Mutex<()>]>,
    hasher: ahash::RandomState,
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("store", &self.store)
            .field("kinds", &self.kinds)
            .finish()
    }
}

impl History {
    /// History over `store`, keeping the source kinds `config` enables in this
    /// process (none is, when `history.store = "redis"`: the tier's Redis keeps
    /// them, see [`crate::cluster::shared`]).
    pub fn new(store: Arc<dyn HistoryStore>, config: &HistoryConfig) -> Self {
        let here = config.store == HistoryStoreKind::Memory;
        History {
            store,
            kinds: [
                config.key && here,
                config.user && here,
                config.room && here,
                config.all && here,
            ],
            order: (0..ORDER_SHARDS).map(|_| Mutex::new(())).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    /// The configured history, or `None` when `history.enabled = false`.
    pub fn from_config(config: &HistoryConfig) -> Option<Arc<History>> {
        config.enabled.then(|| {
            let store = Arc::new(memory::MemoryStore::new(config));
            Arc::new(History::new(store, config))
        })
    }

    /// Whether pushes from `source` are kept.
    #[inline]
    pub fn keeps(&self, source: Source) -> bool {
        self.kinds[source.index()]
    }

    /// The store.
    pub fn store(&self) -> &dyn HistoryStore {
        &*self.store
    }

    fn order_shard(&self, stream: StreamRef<'_>) -> usize {
        self.hasher.hash_one(stream) as usize % self.order.len()
    }

    /// The ordering lock of a user or room stream: held around append and fan-out,
    /// so every recipient gets the stream's pushes in offset order, and around a
    /// registration that reads the stream, so none is in flight meanwhile.
    pub fn order(&self, stream: StreamRef<'_>) -> MutexGuard<'_, ()> {
        self.order[self.order_shard(stream)].lock()
    }

    /// The ordering locks of several streams, taken in shard order (so two callers
    /// never wait on each other) and each shard once.
    pub fn order_many(&self, streams: &[StreamRef<'_>]) -> Vec<MutexGuard<'_, ()>> {
        let mut shards: Vec<usize> = streams.iter().map(|s| self.order_shard(*s)).collect();
        shards.sort_unstable();
        shards.dedup();
        shards.into_iter().map(|i| self.order[i].lock()).collect()
    }

    /// A new random epoch (never 0, which means "not in history").
    pub fn new_epoch() -> u32 {
        loop {
            let e: u32 = rand::random();
            if e != 0 {
                return e;
            }
        }
    }
}

/// What a resuming connection is told about one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    pub epoch: u32,
    /// The offset of the stream's last push: live pushes continue after it.
    pub offset: u64,
    /// Present when the client sent a position for this source: whether every push
    /// after it was replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

impl SourceState {
    /// The stream's epoch and top offset.
    pub fn position(&self) -> Position {
        Position {
            epoch: self.epoch,
            offset: self.offset,
        }
    }
}

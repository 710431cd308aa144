//! The sharded registry of connected clients.
//!
//! Channels are spread over a power-of-two number of buckets by a hash of their key.
//! Each bucket maps key → channel, room → members and user id → keys, behind one
//! plain mutex that is held only for map updates and non-blocking queue appends,
//! never across an `.await`. A room's members live in the buckets of their keys, so
//! a room push visits every bucket and each pushes to its own members, like goim.

use std::collections::HashMap;
use std::ops::AddAssign;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use indexmap::IndexSet;
use parking_lot::Mutex;
use slab::Slab;

use crate::channel::{Channel, CloseReason, Transport};
use crate::history::{History, Position, SourceState, StreamRef};
use crate::protocol::{PushMeta, Source};
use crate::resume::{Positions, ResumeReply};
use crate::rpc::proto::PushOutcome;
pub use crate::rpc::proto::{Online, Tally};

mod filter;

pub use filter::{FilterFull, OpFilter, OpList, OpListError, MAX_FILTER_OPS};

impl Tally {
    #[inline]
    fn add(&mut self, o: PushOutcome) {
        match o {
            PushOutcome::Delivered => self.delivered += 1,
            PushOutcome::QueueFull => self.queue_full += 1,
            PushOutcome::Filtered => self.filtered += 1,
            PushOutcome::Stored => self.stored += 1,
            PushOutcome::Forwarded => self.forwarded_nodes += 1,
            PushOutcome::Unavailable => self.unavailable += 1,
            PushOutcome::Offline => {}
        }
    }
}

impl AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.delivered += o.delivered;
        self.queue_full += o.queue_full;
        self.filtered += o.filtered;
        self.stored += o.stored;
        self.appended += o.appended;
        self.forwarded_nodes += o.forwarded_nodes;
        self.unavailable += o.unavailable;
    }
}

/// What the registry tells a directory (the cluster's, in Redis) when its
/// registrations change. Called on the hot path, sometimes under a bucket's lock:
/// an implementation must not block or await (it queues, and may drop, since the
/// directory's periodic refresh rewrites everything).
pub trait DirectoryHook: Send + Sync + std::fmt::Debug {
    /// A key was registered, replaced or unregistered.
    fn key_changed(&self, key: &Arc<str>);
    /// A user id's connection count changed.
    fn user_changed(&self, mid: i64);
    /// A room's member count changed.
    fn room_changed(&self, room: &Arc<str>);
    /// Members of `room` on the other nodes of the tier, as last read.
    fn remote_room_online(&self, room: &str) -> u64;
}

/// Every key with its connection id, every user id with its connection count.
pub type DirectorySnapshot = (Vec<(Arc<str>, u64)>, HashMap<i64, u64>);

/// Joining a new room would make more rooms than the registry's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("room limit reached: {0} rooms exist (registry.max_rooms)")]
pub struct RoomsFull(pub usize);

struct Entry {
    chan: Arc<Channel>,
    accepts: OpFilter,
    room: Option<Arc<str>>,
}

impl Entry {
    #[inline]
    fn push(&self, op: u32, frame: &Bytes, meta: PushMeta) -> PushOutcome {
        if self.accepts.accepts(op) {
            self.chan.try_push(frame, meta)
        } else {
            PushOutcome::Filtered
        }
    }

    /// As [`Entry::push`], for a push that must be its source's next offset
    /// (shared history).
    #[inline]
    fn push_next(&self, op: u32, frame: &Bytes, meta: PushMeta) -> PushOutcome {
        if self.accepts.accepts(op) {
            self.chan.push_next(frame, meta, false)
        } else {
            PushOutcome::Filtered
        }
    }
}

/// What AuthReply reports for `source` from what history found (`rec`), adding
/// to `replay` the missed pushes `accepts` lets through when the client `asked`
/// and every one was there.
fn resume_state(
    source: Source,
    rec: crate::history::Recovery,
    asked: bool,
    accepts: &OpFilter,
    replay: &mut Vec<(Bytes, PushMeta)>,
) -> SourceState {
    let epoch = rec.top.epoch;
    if asked && rec.recovered {
        replay.extend(
            rec.entries
                .into_iter()
                .filter(|(_, f)| accepts.accepts(op_of(f)))
                .map(|(offset, f)| {
                    let meta = PushMeta {
                        source,
                        epoch,
                        offset,
                    };
                    (f, meta)
                }),
        );
    }
    SourceState {
        epoch,
        offset: rec.top.offset,
        recovered: asked.then_some(rec.recovered),
    }
}

/// The op of an encoded frame.
pub(crate) fn op_of(frame: &[u8]) -> u32 {
    frame
        .get(8..12)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Online counts per room, sharded by a hash of the room id, so a Heartbeat reads
/// one shard instead of every bucket. Updated under the bucket's lock (lock order:
/// bucket, then room shard).
type CountShard = Mutex<HashMap<Arc<str>, u64, ahash::RandomState>>;

struct RoomCounts {
    shards: Box<[CountShard]>,
    hasher: ahash::RandomState,
    /// Rooms with at least one member.
    rooms: AtomicUsize,
    max_rooms: usize,
}

impl RoomCounts {
    fn new(n: usize, max_rooms: usize) -> Self {
        RoomCounts {
            shards: (0..n).map(|_| Mutex::new(HashMap::default())).collect(),
            hasher: ahash::RandomState::new(),
            rooms: AtomicUsize::new(0),
            max_rooms,
        }
    }

    fn shard(&self, room: &str) -> &CountShard {
        let h = self.hasher.hash_one(room) as usize;
        &self.shards[h % self.shards.len()]
    }

    /// Counts one more member; a room that does not exist yet is created only
    /// while there are fewer than `max_rooms`.
    fn join(&self, room: &Arc<str>) -> Result<(), RoomsFull> {
        let mut shard = self.shard(room).lock();
        if let Some(n) = shard.get_mut(room) {
            *n += 1;
            return Ok(());
        }
        let max = self.max_rooms;
        self.rooms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(RoomsFull)?;
        shard.insert(room.clone(), 1);
        Ok(())
    }

    fn leave(&self, room: &str) {
        let mut shard = self.shard(room).lock();
        if let Some(n) = shard.get_mut(room) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shard.remove(room);
                self.rooms.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn get(&self, room: &str) -> u64 {
        self.shard(room).lock().get(room).copied().unwrap_or(0)
    }
}

#[derive(Default)]
struct BucketInner {
    entries: Slab<Entry>,
    by_key: HashMap<Arc<str>, usize, ahash::RandomState>,
    rooms: HashMap<Arc<str>, IndexSet<usize, ahash::RandomState>, ahash::RandomState>,
    users: HashMap<i64, Vec<usize>, ahash::RandomState>,
    /// Keys a connection is registering with shared key history: the key pushes
    /// that arrive meanwhile, for its registration to queue after the replay.
    pending: HashMap<Arc<str>, Pending, ahash::RandomState>,
}

/// Most key pushes buffered for one registering connection; more closes it with
/// `Overflow` once registered (its client resumes and gets them from history).
pub const PENDING_MAX: usize = 4096;

/// Key, user, room and broadcast pushes buffered for a connection between its
/// claim and its registration ([`Registry::begin_pending`]).
struct Pending {
    conn: u64,
    mid: Option<i64>,
    room: Option<Arc<str>>,
    frames: Vec<(Bytes, PushMeta)>,
    overflow: bool,
}

impl Pending {
    fn buffer(&mut self, frame: &Bytes, meta: PushMeta) {
        if self.frames.len() < PENDING_MAX {
            self.frames.push((frame.clone(), meta));
        } else {
            self.overflow = true;
        }
    }
}

/// A stream as the tier's shared history holds it, read by the session between
/// claiming and registering (`history.store = "redis"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStream {
    /// The stream's state and, if the client asked (`asked`), what it missed.
    pub recovery: crate::history::Recovery,
    /// The client sent a position for this source.
    pub asked: bool,
}

/// The shared streams of a registering connection: its key's, and its user's
/// when user history is shared and it has a user id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shared {
    pub key: Option<SharedStream>,
    pub user: Option<SharedStream>,
    /// The room's, when room history is shared and it joins a room.
    pub room: Option<SharedStream>,
    /// The broadcast stream's, when broadcast history is shared.
    pub all: Option<SharedStream>,
}

impl BucketInner {
    /// Moves entry `idx` to `room` (or out of any room). A refused new room leaves
    /// the entry where it was.
    fn join_room(
        &mut self,
        idx: usize,
        room: Option<Arc<str>>,
        counts: &RoomCounts,
    ) -> Result<(), RoomsFull> {
        if self.entries[idx].room == room {
            return Ok(());
        }
        if let Some(room) = &room {
            counts.join(room)?;
        }
        let old = std::mem::replace(&mut self.entries[idx].room, room.clone());
        if let Some(old) = old {
            if let Some(members) = self.rooms.get_mut(&old) {
                if members.swap_remove(&idx) {
                    counts.leave(&old);
                }
                if members.is_empty() {
                    self.rooms.remove(&old);
                }
            }
        }
        if let Some(room) = room {
            self.rooms.entry(room).or_default().insert(idx);
        }
        Ok(())
    }

    fn remove(&mut self, idx: usize, counts: &RoomCounts) -> Arc<Channel> {
        // Leaving a room is never refused.
        let _ = self.join_room(idx, None, counts);
        let e = self.entries.remove(idx);
        self.by_key.remove(&e.chan.key);
        if let Some(mid) = e.chan.mid {
            if let Some(ids) = self.users.get_mut(&mid) {
                ids.retain(|&i| i != idx);
                if ids.is_empty() {
                    self.users.remove(&mid);
                }
            }
        }
        e.chan
    }

    fn entry_of(&mut self, chan: &Channel) -> Option<usize> {
        let idx = *self.by_key.get(&chan.key)?;
        (self.entries[idx].chan.id == chan.id).then_some(idx)
    }
}

/// The sharded registry.
pub struct Registry {
    buckets: Box<[Mutex<BucketInner>]>,
    mask: usize,
    hasher: ahash::RandomState,
    next_id: AtomicU64,
    /// Channels online per transport, by [`Transport::index`].
    online: [AtomicUsize; Transport::ALL.len()],
    room_counts: RoomCounts,
    history: Option<Arc<History>>,
    hook: std::sync::OnceLock<Arc<dyn DirectoryHook>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("buckets", &self.buckets.len())
            .field("online", &self.online())
            .finish()
    }
}

impl Registry {
    /// A registry of `buckets` buckets (rounded up to a power of two), with no
    /// room limit.
    pub fn new(buckets: usize) -> Self {
        Self::with_max_rooms(buckets, usize::MAX)
    }

    /// A registry of `buckets` buckets holding at most `max_rooms` rooms.
    pub fn with_max_rooms(buckets: usize, max_rooms: usize) -> Self {
        Self::with_history(buckets, max_rooms, None)
    }

    /// A registry of `buckets` buckets holding at most `max_rooms` rooms, appending
    /// pushes to `history` (if any) before it fans them out.
    pub fn with_history(buckets: usize, max_rooms: usize, history: Option<Arc<History>>) -> Self {
        let n = buckets.max(1).next_power_of_two();
        Registry {
            buckets: (0..n).map(|_| Mutex::new(BucketInner::default())).collect(),
            mask: n - 1,
            hasher: ahash::RandomState::new(),
            next_id: AtomicU64::new(1),
            online: [const { AtomicUsize::new(0) }; Transport::ALL.len()],
            room_counts: RoomCounts::new(n, max_rooms),
            history,
            hook: std::sync::OnceLock::new(),
        }
    }

    /// Sets the directory told of every registration change (once; a second call
    /// is ignored).
    pub fn set_hook(&self, hook: Arc<dyn DirectoryHook>) {
        let _ = self.hook.set(hook);
    }

    fn tell(&self, key: &Arc<str>, mid: Option<i64>, rooms: &[Option<&Arc<str>>]) {
        if let Some(h) = self.hook.get() {
            h.key_changed(key);
            if let Some(mid) = mid {
                h.user_changed(mid);
            }
            for r in rooms.iter().flatten() {
                h.room_changed(r);
            }
        }
    }

    /// Members of `room` across the tier: this node's, plus the other nodes' as
    /// the directory last read them (this node's only, without a cluster).
    pub fn tier_room_online(&self, room: &str) -> u64 {
        let local = self.room_online(room);
        match self.hook.get() {
            Some(h) => local + h.remote_room_online(room),
            None => local,
        }
    }

    /// Every registered key with its connection id, every user id with its
    /// connection count: what the directory rewrites on each refresh.
    pub fn directory_snapshot(&self) -> DirectorySnapshot {
        let mut keys = Vec::new();
        let mut users: HashMap<i64, u64> = HashMap::new();
        for bucket in self.buckets.iter() {
            let b = bucket.lock();
            for (_, e) in b.entries.iter() {
                keys.push((e.chan.key.clone(), e.chan.id));
            }
            for (&mid, ids) in &b.users {
                *users.entry(mid).or_default() += ids.len() as u64;
            }
        }
        (keys, users)
    }

    /// Connections of user `mid` on this node.
    pub fn user_online(&self, mid: i64) -> u64 {
        self.buckets
            .iter()
            .map(|b| b.lock().users.get(&mid).map_or(0, |v| v.len() as u64))
            .sum()
    }

    /// The history pushes are appended to, if any.
    pub fn history(&self) -> Option<&Arc<History>> {
        self.history.as_ref()
    }

    /// The history, if it keeps pushes from `source`.
    fn keeping(&self, source: Source) -> Option<&History> {
        self.history.as_deref().filter(|h| h.keeps(source))
    }

    /// Appends `frame` to `stream` if its source is kept (creating the stream when
    /// `create`); the push's meta either way.
    #[inline]
    fn append(&self, stream: StreamRef<'_>, frame: &Bytes, create: bool) -> PushMeta {
        let source = stream.source();
        match self
            .keeping(source)
            .and_then(|h| h.store().append(stream, frame, create))
        {
            Some(p) => PushMeta {
                source,
                epoch: p.epoch,
                offset: p.offset,
            },
            None => PushMeta::untracked(source),
        }
    }

    /// A fresh connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    #[inline]
    fn bucket(&self, key: &str) -> &Mutex<BucketInner> {
        let h = self.hasher.hash_one(key) as usize;
        &self.buckets[h & self.mask]
    }

    fn counter(&self, t: Transport) -> &AtomicUsize {
        &self.online[t.index()]
    }

    /// Adds a channel. A channel already online with the same key is removed and
    /// returned, so the caller can close it. Refused, changing nothing, when `room`
    /// would be one room more than the limit.
    pub fn register(
        &self,
        chan: Arc<Channel>,
        room: Option<Arc<str>>,
        accepts: OpFilter,
    ) -> Result<Option<Arc<Channel>>, RoomsFull> {
        self.register_with(chan, room, accepts, None, None, |_| None)
    }

    /// Registers `chan` as [`Registry::register`] does, and, in the same critical
    /// section (so that no push can come first), queues the reply `auth_reply`
    /// builds and, for a resume-capable channel, replays each source's history
    /// since the client's `positions`. `auth_reply` gets the state of every source
    /// the channel receives with history on (for a resume-capable channel).
    ///
    /// With shared key history, `shared` is the key's stream as the session read
    /// it after claiming the key: its replay comes from there, and the key pushes
    /// buffered since [`Registry::begin_pending`] follow it.
    pub fn register_with(
        &self,
        chan: Arc<Channel>,
        room: Option<Arc<str>>,
        accepts: OpFilter,
        positions: Option<&Positions>,
        shared: Option<Shared>,
        auth_reply: impl FnOnce(Option<ResumeReply>) -> Option<Bytes>,
    ) -> Result<Option<Arc<Channel>>, RoomsFull> {
        // The user's and room's ordering locks: no push to them is in flight while
        // their history is read, so the replay and the live pushes meet exactly.
        let mut ordered = Vec::with_capacity(2);
        if let (Some(mid), Some(_)) = (chan.mid, self.keeping(Source::User)) {
            ordered.push(StreamRef::User(mid));
        }
        if let (Some(room), Some(_)) = (&room, self.keeping(Source::Room)) {
            ordered.push(StreamRef::Room(room));
        }
        let _order = self.history.as_ref().map(|h| h.order_many(&ordered));
        let mut b = self.bucket(&chan.key).lock();
        let counts = &self.room_counts;
        // Taken first, so a refusal leaves everything as it was.
        if let Some(room) = &room {
            counts.join(room)?;
        }
        let mut replaced_room = None;
        let replaced = b.by_key.get(&chan.key).copied().map(|idx| {
            replaced_room = b.entries[idx].room.clone();
            b.remove(idx, counts)
        });
        // Counters change under the bucket's lock, so a replacement never makes
        // them dip below zero.
        self.counter(chan.transport).fetch_add(1, Ordering::Relaxed);
        if let Some(old) = &replaced {
            self.counter(old.transport).fetch_sub(1, Ordering::Relaxed);
        }
        // History: streams exist while their client is connected (so a push after
        // it leaves is kept), and a resume-capable channel gets its replay.
        let (reply, replay) = self.peek_resume(&chan, room.as_deref(), &accepts, positions, shared);
        if let Some(r) = &reply {
            for source in Source::ALL {
                if let Some(state) = r.source(source) {
                    chan.set_floor(source, state.position());
                }
            }
        }
        if let Some(frame) = auth_reply(reply) {
            chan.force_reply(&frame);
        }
        for (frame, meta) in &replay {
            chan.force_push(frame, *meta);
        }
        // Shared key history: what reached this node since the key was claimed,
        // after the replay; the channel drops what the replay had.
        if let Some(p) = b.pending.remove(&chan.key) {
            if p.conn == chan.id {
                for (frame, meta) in &p.frames {
                    if accepts.accepts(op_of(frame)) {
                        chan.push_next(frame, *meta, true);
                    }
                }
                if p.overflow {
                    chan.close(CloseReason::Overflow);
                }
            } else {
                b.pending.insert(chan.key.clone(), p);
            }
        }
        let mid = chan.mid;
        let key = chan.key.clone();
        let idx = b.entries.insert(Entry {
            chan,
            accepts,
            room: None,
        });
        b.by_key.insert(key, idx);
        if let Some(mid) = mid {
            b.users.entry(mid).or_default().push(idx);
        }
        let key = b.entries[idx].chan.key.clone();
        if let Some(room) = &room {
            b.entries[idx].room = Some(room.clone());
            b.rooms.entry(room.clone()).or_default().insert(idx);
        }
        drop(b);
        self.tell(&key, mid, &[room.as_ref(), replaced_room.as_ref()]);
        if let Some(old) = &replaced {
            if old.mid != mid {
                if let (Some(h), Some(m)) = (self.hook.get(), old.mid) {
                    h.user_changed(m);
                }
            }
        }
        Ok(replaced)
    }

    /// What registering `chan` would answer and replay, changing no registration:
    /// for a resume-capable channel, the state of every source it receives with
    /// history on and each source's pushes since the client's `positions` that
    /// `accepts` lets through, in order (`None` and nothing with history off, or
    /// for a goim channel, whose streams are only made to exist).
    ///
    /// For a connection whose handshake is not confirmed yet (QUIC 0-RTT): its
    /// AuthReply and replay go out at once, and [`Registry::register_with`] runs
    /// once the handshake is confirmed, from the tops reported here. It touches
    /// no bucket, room, user or counter; like any connection of the key it
    /// creates a missing stream (empty, with a new epoch) and marks the streams
    /// used, so their retention starts over.
    ///
    /// [`Registry::register_with`] calls it too: it is the history part of every
    /// registration.
    ///
    /// `shared`: the key's stream from the tier's shared key history, which
    /// stands for the key source (the local history keeps no key streams then).
    pub fn peek_resume(
        &self,
        chan: &Channel,
        room: Option<&str>,
        accepts: &OpFilter,
        positions: Option<&Positions>,
        shared: Option<Shared>,
    ) -> (Option<ResumeReply>, Vec<(Bytes, PushMeta)>) {
        let mut replay = Vec::new();
        let Some(h) = &self.history else {
            return (None, replay);
        };
        let mut shared_states = Vec::new();
        if let Some(sh) = shared.filter(|_| chan.resume) {
            for (source, st) in [
                (Source::Key, sh.key),
                (Source::User, sh.user),
                (Source::Room, sh.room),
                (Source::All, sh.all),
            ] {
                if let Some(st) = st {
                    let state = resume_state(source, st.recovery, st.asked, accepts, &mut replay);
                    shared_states.push((source, state));
                }
            }
        }
        let streams = [
            Some(StreamRef::Key(&chan.key)),
            chan.mid.map(StreamRef::User),
            room.map(StreamRef::Room),
            Some(StreamRef::All),
        ];
        let kept = streams
            .into_iter()
            .flatten()
            .filter(|s| h.keeps(s.source()));
        if !chan.resume {
            // A goim client is told nothing; its streams only have to exist.
            for stream in kept {
                h.store().ensure(stream);
            }
            return (None, replay);
        }
        let mut r = ResumeReply {
            key: chan.key.to_string(),
            ..ResumeReply::default()
        };
        for (source, state) in shared_states {
            r.sources.insert(source.name().to_owned(), state);
        }
        for stream in kept {
            let source = stream.source();
            let asked = positions.and_then(|p| p.get(source));
            let state = match asked {
                Some(pos) => {
                    let rec = h.store().since(stream, pos);
                    resume_state(source, rec, true, accepts, &mut replay)
                }
                None => {
                    let top = h.store().ensure(stream);
                    SourceState {
                        epoch: top.epoch,
                        offset: top.offset,
                        recovered: None,
                    }
                }
            };
            r.sources.insert(source.name().to_owned(), state);
        }
        (Some(r), replay)
    }

    /// Removes `chan` if it is still the channel registered under its key.
    pub fn unregister(&self, chan: &Channel) -> bool {
        let mut b = self.bucket(&chan.key).lock();
        match b.entry_of(chan) {
            Some(idx) => {
                let room = b.entries[idx].room.clone();
                b.remove(idx, &self.room_counts);
                self.counter(chan.transport).fetch_sub(1, Ordering::Relaxed);
                drop(b);
                self.tell(&chan.key, chan.mid, &[room.as_ref()]);
                true
            }
            None => false,
        }
    }

    /// Moves `chan` to `room` (or out of any room). `Ok(false)` when it is no
    /// longer registered; refused, leaving it where it was, when `room` would be
    /// one room more than the limit.
    pub fn change_room(&self, chan: &Channel, room: Option<Arc<str>>) -> Result<bool, RoomsFull> {
        self.change_room_with(chan, room, |_| None)
    }

    /// As [`Registry::change_room`], and queues the reply `reply` builds before any
    /// push from the new room can come; `reply` gets the new room's state when the
    /// channel is resume-capable and room history is on.
    pub fn change_room_with(
        &self,
        chan: &Channel,
        room: Option<Arc<str>>,
        reply: impl FnOnce(Option<SourceState>) -> Option<Bytes>,
    ) -> Result<bool, RoomsFull> {
        self.change_room_at(chan, room, None, reply)
    }

    /// As [`Registry::change_room_with`]; with shared room history, `shared_top`
    /// is the new room's position as the session read it from the tier's Redis
    /// (the channel takes the room's pushes after it).
    pub fn change_room_at(
        &self,
        chan: &Channel,
        room: Option<Arc<str>>,
        shared_top: Option<Position>,
        reply: impl FnOnce(Option<SourceState>) -> Option<Bytes>,
    ) -> Result<bool, RoomsFull> {
        let h = self.keeping(Source::Room);
        let _order = match (h, &room) {
            (Some(h), Some(r)) => Some(h.order(StreamRef::Room(r))),
            _ => None,
        };
        let mut b = self.bucket(&chan.key).lock();
        let Some(idx) = b.entry_of(chan) else {
            return Ok(false);
        };
        let old_room = b.entries[idx].room.clone();
        b.join_room(idx, room.clone(), &self.room_counts)?;
        if let Some(h) = self.hook.get() {
            for r in [&old_room, &room].into_iter().flatten() {
                h.room_changed(r);
            }
        }
        let state = match (h, &room) {
            (_, Some(_)) if chan.resume && shared_top.is_some() => {
                let top = shared_top.unwrap_or_default();
                chan.set_floor(Source::Room, top);
                Some(SourceState {
                    epoch: top.epoch,
                    offset: top.offset,
                    recovered: None,
                })
            }
            (Some(h), Some(r)) if chan.resume => {
                let top = h.store().ensure(StreamRef::Room(r));
                chan.set_floor(Source::Room, top);
                Some(SourceState {
                    epoch: top.epoch,
                    offset: top.offset,
                    recovered: None,
                })
            }
            _ => None,
        };
        if let Some(frame) = reply(state) {
            chan.force_reply(&frame);
        }
        Ok(true)
    }

    /// Rooms with at least one member.
    pub fn room_count(&self) -> usize {
        self.room_counts.rooms.load(Ordering::Relaxed)
    }

    /// Applies a Sub (`add`) or Unsub to `chan`'s op filter. `Ok(false)` when the
    /// channel is no longer registered.
    pub fn update_filter(
        &self,
        chan: &Channel,
        ops: &OpList,
        add: bool,
    ) -> Result<bool, FilterFull> {
        let mut b = self.bucket(&chan.key).lock();
        match b.entry_of(chan) {
            Some(idx) => {
                let f = &mut b.entries[idx].accepts;
                if add {
                    f.sub(ops)?;
                } else {
                    f.unsub(ops)?;
                }
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The channel online under `key`.
    pub fn get(&self, key: &str) -> Option<Arc<Channel>> {
        let b = self.bucket(key).lock();
        b.by_key.get(key).map(|&i| b.entries[i].chan.clone())
    }

    /// Marks `key` as registering for connection `conn` (shared key history):
    /// until [`Registry::register_with`] registers that connection, the key pushes
    /// [`Registry::push_key_at`] gets for the key are buffered for it (at most
    /// [`PENDING_MAX`]). A later call for the same key replaces the mark.
    pub fn begin_pending(
        &self,
        key: &Arc<str>,
        conn: u64,
        mid: Option<i64>,
        room: Option<Arc<str>>,
    ) {
        self.bucket(key).lock().pending.insert(
            key.clone(),
            Pending {
                conn,
                mid,
                room,
                frames: Vec::new(),
                overflow: false,
            },
        );
    }

    /// Whether a session is connecting `key` ([`Registry::begin_pending`]).
    pub fn is_pending(&self, key: &str) -> bool {
        self.bucket(key).lock().pending.contains_key(key)
    }

    /// Whether a registering connection ([`Registry::begin_pending`]) is of user
    /// `mid` (`Some`) or joins `room` (`Some`).
    pub fn pending_for(&self, mid: Option<i64>, room: Option<&str>) -> bool {
        self.buckets.iter().any(|b| {
            b.lock().pending.values().any(|p| {
                (mid.is_some() && p.mid == mid) || (room.is_some() && p.room.as_deref() == room)
            })
        })
    }

    /// Drops `conn`'s pending mark on `key`, if it is still there (a session that
    /// failed before registering).
    pub fn end_pending(&self, key: &str, conn: u64) {
        let mut b = self.bucket(key).lock();
        if b.pending.get(key).is_some_and(|p| p.conn == conn) {
            b.pending.remove(key);
        }
    }

    /// Queues a key push the tier's shared key history already appended (it
    /// carries its position, and nothing is appended here): to the key's channel
    /// if it takes the offset next, and to a registering connection's buffer.
    pub fn push_key_at(&self, key: &str, frame: &Bytes, meta: PushMeta) -> PushOutcome {
        let mut b = self.bucket(key).lock();
        let mut outcome = PushOutcome::Offline;
        if let Some(p) = b.pending.get_mut(key) {
            p.buffer(frame, meta);
            outcome = PushOutcome::Stored;
        }
        if let Some(e) = b.by_key.get(key).map(|&i| &b.entries[i]) {
            outcome = e.push_next(op_of(frame), frame, meta);
        }
        outcome
    }

    /// Queues a room push the tier's shared room history already appended: to
    /// every member that takes the offset next, and to the buffers of
    /// connections registering into the room.
    pub fn push_room_at(&self, room: &str, frame: &Bytes, meta: PushMeta) -> Tally {
        let mut t = Tally::default();
        let op = op_of(frame);
        for bucket in self.buckets.iter() {
            let mut b = bucket.lock();
            for p in b
                .pending
                .values_mut()
                .filter(|p| p.room.as_deref() == Some(room))
            {
                p.buffer(frame, meta);
            }
            if let Some(members) = b.rooms.get(room) {
                for &i in members {
                    t.add(b.entries[i].push_next(op, frame, meta));
                }
            }
        }
        t
    }

    /// Queues a user push the tier's shared history already appended: to every
    /// connection of the user that takes the offset next, and to the buffers of
    /// the user's registering connections.
    pub fn push_user_at(&self, mid: i64, frame: &Bytes, meta: PushMeta) -> Tally {
        let mut t = Tally::default();
        let op = op_of(frame);
        for bucket in self.buckets.iter() {
            let mut b = bucket.lock();
            if b.users.is_empty() && b.pending.is_empty() {
                continue;
            }
            for p in b.pending.values_mut().filter(|p| p.mid == Some(mid)) {
                p.buffer(frame, meta);
            }
            if let Some(ids) = b.users.get(&mid) {
                for &i in ids {
                    t.add(b.entries[i].push_next(op, frame, meta));
                }
            }
        }
        t
    }

    /// Pushes an encoded frame to one key, appending it to the key's history first
    /// (under the bucket's lock, so history order is delivery order). `Stored` when
    /// the key is offline but its stream is live.
    pub fn push_key(&self, key: &str, op: u32, frame: &Bytes) -> PushOutcome {
        let b = self.bucket(key).lock();
        let entry = b.by_key.get(key).map(|&i| &b.entries[i]);
        let meta = self.append(StreamRef::Key(key), frame, entry.is_some());
        match entry.map(|e| e.push(op, frame, meta)) {
            Some(PushOutcome::Offline) | None if meta.is_tracked() => PushOutcome::Stored,
            Some(o) => o,
            None => PushOutcome::Offline,
        }
    }

    /// Pushes an encoded frame to every connection of each user id. With user
    /// history on, each user's stream gets it once, under the stream's ordering lock.
    pub fn push_users(&self, mids: &[i64], op: u32, frame: &Bytes) -> Tally {
        let mut t = Tally::default();
        let Some(h) = self.keeping(Source::User) else {
            let meta = PushMeta::untracked(Source::User);
            for bucket in self.buckets.iter() {
                let b = bucket.lock();
                if b.users.is_empty() {
                    continue;
                }
                for mid in mids {
                    if let Some(ids) = b.users.get(mid) {
                        for &i in ids {
                            t.add(b.entries[i].push(op, frame, meta));
                        }
                    }
                }
            }
            return t;
        };
        for &mid in mids {
            let stream = StreamRef::User(mid);
            let _order = h.order(stream);
            // Appended when the first connection is found, or, with none, only if
            // the stream is live.
            let mut meta = None;
            for bucket in self.buckets.iter() {
                let b = bucket.lock();
                if let Some(ids) = b.users.get(&mid) {
                    let m = *meta.get_or_insert_with(|| self.append(stream, frame, true));
                    for &i in ids {
                        t.add(b.entries[i].push(op, frame, m));
                    }
                }
            }
            let m = meta.unwrap_or_else(|| self.append(stream, frame, false));
            t.appended += u64::from(m.is_tracked());
        }
        t
    }

    /// Pushes an encoded frame to every member of `room`. With room history on, the
    /// room's stream gets it once, under the stream's ordering lock.
    pub fn push_room(&self, room: &str, op: u32, frame: &Bytes) -> Tally {
        let mut t = Tally::default();
        let stream = StreamRef::Room(room);
        let h = self.keeping(Source::Room);
        let _order = h.map(|h| h.order(stream));
        let mut meta = h.is_none().then(|| PushMeta::untracked(Source::Room));
        for bucket in self.buckets.iter() {
            let b = bucket.lock();
            if let Some(members) = b.rooms.get(room) {
                let m = *meta.get_or_insert_with(|| self.append(stream, frame, true));
                for &i in members {
                    t.add(b.entries[i].push(op, frame, m));
                }
            }
        }
        let m = meta.unwrap_or_else(|| self.append(stream, frame, false));
        t.appended = u64::from(m.is_tracked());
        t
    }

    /// Appends a broadcast to the broadcast stream, if that is kept: the caller
    /// does it once per broadcast, in the order it fans them out.
    pub fn append_broadcast(&self, frame: &Bytes) -> PushMeta {
        self.append(StreamRef::All, frame, true)
    }

    /// Pushes an encoded frame to every channel of one bucket.
    pub fn push_bucket(&self, bucket: usize, op: u32, frame: &Bytes, meta: PushMeta) -> Tally {
        let mut t = Tally::default();
        if let Some(bucket) = self.buckets.get(bucket) {
            let b = bucket.lock();
            for (_, e) in b.entries.iter() {
                t.add(e.push(op, frame, meta));
            }
        }
        t
    }

    /// Queues a broadcast the tier's shared history already appended to every
    /// channel of one bucket that takes the offset next, and to the buffers of
    /// the bucket's registering connections.
    pub fn push_bucket_at(&self, bucket: usize, frame: &Bytes, meta: PushMeta) -> Tally {
        let mut t = Tally::default();
        let op = op_of(frame);
        if let Some(bucket) = self.buckets.get(bucket) {
            let mut b = bucket.lock();
            for p in b.pending.values_mut() {
                p.buffer(frame, meta);
            }
            for (_, e) in b.entries.iter() {
                t.add(e.push_next(op, frame, meta));
            }
        }
        t
    }

    /// The channels of one bucket that accept `op`: for paced broadcasts, which must
    /// not hold the bucket's lock while they wait.
    pub fn bucket_channels(&self, bucket: usize, op: u32) -> Vec<Arc<Channel>> {
        match self.buckets.get(bucket) {
            Some(bucket) => bucket
                .lock()
                .entries
                .iter()
                .filter(|(_, e)| e.accepts.accepts(op))
                .map(|(_, e)| e.chan.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Channels in `room` across all buckets.
    pub fn room_online(&self, room: &str) -> u64 {
        self.room_counts.get(room)
    }

    /// Every non-empty room with its online count, sorted by room id.
    pub fn rooms(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = Vec::new();
        for shard in self.room_counts.shards.iter() {
            v.extend(shard.lock().iter().map(|(r, &n)| (r.to_string(), n)));
        }
        v.sort();
        v
    }

    pub fn online(&self) -> Online {
        let n = |t: Transport| self.online[t.index()].load(Ordering::Relaxed) as u64;
        let o = Online {
            total: 0,
            tcp: n(Transport::Tcp),
            quic: n(Transport::Quic),
            tls: n(Transport::Tls),
            ws: n(Transport::Ws),
            wss: n(Transport::Wss),
            paced: Vec::new(),
        };
        Online {
            total: o.tcp + o.quic + o.tls + o.ws + o.wss,
            ..o
        }
    }

    /// Closes the channel online under `key`. Its session unregisters it.
    pub fn kick(&self, key: &str) -> bool {
        match self.get(key) {
            Some(ch) => {
                ch.close(CloseReason::Kicked);
                true
            }
            None => false,
        }
    }

    /// Closes every channel (shutdown). Returns how many were asked to close.
    pub fn close_all(&self, reason: CloseReason) -> usize {
        let mut n = 0;
        for bucket in self.buckets.iter() {
            let b = bucket.lock();
            for (_, e) in b.entries.iter() {
                e.chan.close(reason);
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::OutReceiver as Receiver;

    fn chan(r: &Registry, key: &str, mid: Option<i64>) -> (Arc<Channel>, Receiver) {
        Channel::new(r.next_id(), key.into(), mid, Transport::Tcp, 8)
    }

    fn frame() -> Bytes {
        Bytes::from_static(b"f")
    }

    fn drain(rx: &mut Receiver) -> usize {
        rx.drain()
    }

    #[test]
    fn push_by_key_and_offline() {
        let r = Registry::new(4);
        let (a, mut ra) = chan(&r, "a", None);
        assert!(r.register(a, None, OpFilter::default()).unwrap().is_none());
        assert_eq!(r.push_key("a", 1000, &frame()), PushOutcome::Delivered);
        assert_eq!(r.push_key("b", 1000, &frame()), PushOutcome::Offline);
        assert_eq!(drain(&mut ra), 1);
        assert_eq!(r.online().total, 1);
    }

    #[test]
    fn same_key_replaces_and_stale_unregister_is_ignored() {
        let r = Registry::new(4);
        let (a1, _r1) = chan(&r, "a", Some(1));
        let (a2, mut r2) = chan(&r, "a", Some(1));
        r.register(a1.clone(), Some("room".into()), OpFilter::default())
            .unwrap();
        let old = r
            .register(a2.clone(), Some("room".into()), OpFilter::default())
            .unwrap();
        assert_eq!(old.map(|c| c.id), Some(a1.id));
        assert_eq!(r.online().total, 1);
        assert_eq!(r.room_online("room"), 1);
        // the old session ending must not remove the new channel
        assert!(!r.unregister(&a1));
        assert_eq!(r.push_key("a", 1, &frame()), PushOutcome::Delivered);
        assert_eq!(r.push_users(&[1], 1, &frame()).delivered, 1);
        assert_eq!(drain(&mut r2), 2);
        assert!(r.unregister(&a2));
        assert_eq!(r.online().total, 0);
        assert_eq!(r.room_online("room"), 0);
        assert!(r.rooms().is_empty());
    }

    #[test]
    fn rooms_count_across_buckets_and_empty_rooms_vanish() {
        let r = Registry::new(8);
        let mut keep = Vec::new();
        for i in 0..50 {
            let (c, rx) = chan(&r, &format!("k{i}"), None);
            let room = if i % 2 == 0 { "even" } else { "odd" };
            r.register(c.clone(), Some(room.into()), OpFilter::default())
                .unwrap();
            keep.push((c, rx));
        }
        assert_eq!(r.room_online("even"), 25);
        assert_eq!(
            r.rooms(),
            vec![("even".to_string(), 25), ("odd".to_string(), 25)]
        );
        let t = r.push_room("odd", 1000, &frame());
        assert_eq!(t.delivered, 25);
        for (c, _) in &keep {
            r.change_room(c, Some("all".into())).unwrap();
        }
        assert_eq!(r.rooms(), vec![("all".to_string(), 50)]);
        for (c, _) in &keep {
            r.unregister(c);
        }
        assert!(r.rooms().is_empty());
        assert_eq!(r.online(), Online::default());
    }

    #[test]
    fn new_rooms_beyond_the_limit_are_refused_and_change_nothing() {
        let r = Registry::with_max_rooms(4, 2);
        let (a, _ra) = chan(&r, "a", None);
        let (b, _rb) = chan(&r, "b", None);
        let (c, _rc) = chan(&r, "c", Some(7));
        r.register(a.clone(), Some("r1".into()), OpFilter::default())
            .unwrap();
        r.register(b.clone(), Some("r2".into()), OpFilter::default())
            .unwrap();
        assert!(matches!(
            r.register(c.clone(), Some("r3".into()), OpFilter::default()),
            Err(RoomsFull(2))
        ));
        assert!(r.get("c").is_none(), "a refused registration adds nothing");
        assert!(r.push_users(&[7], 1000, &frame()).delivered == 0);
        assert_eq!(r.online().total, 2);
        // moving to a new room is refused and leaves the channel where it was
        assert_eq!(r.change_room(&a, Some("r3".into())), Err(RoomsFull(2)));
        assert_eq!(r.push_room("r1", 1000, &frame()).delivered, 1);
        // existing rooms can still be joined; a room emptied frees its place
        r.register(c.clone(), Some("r1".into()), OpFilter::default())
            .unwrap();
        assert_eq!(r.change_room(&b, Some("r1".into())), Ok(true));
        assert_eq!(r.room_count(), 1);
        assert_eq!(r.change_room(&a, Some("r3".into())), Ok(true));
        assert_eq!(
            r.rooms(),
            vec![("r1".to_string(), 2), ("r3".to_string(), 1)]
        );
        for ch in [&a, &b, &c] {
            r.unregister(ch);
        }
        assert_eq!(r.room_count(), 0);
    }

    #[test]
    fn op_filter_and_sub_unsub() {
        let r = Registry::new(2);
        let (a, _ra) = chan(&r, "a", None);
        r.register(a.clone(), None, OpFilter::new(vec![1000]))
            .unwrap();
        assert_eq!(r.push_key("a", 1000, &frame()), PushOutcome::Delivered);
        assert_eq!(r.push_key("a", 1001, &frame()), PushOutcome::Filtered);
        assert_eq!(
            r.update_filter(&a, &OpList::new(vec![1001]).unwrap(), true),
            Ok(true)
        );
        assert_eq!(r.push_key("a", 1001, &frame()), PushOutcome::Delivered);
        assert_eq!(
            r.update_filter(&a, &OpList::new(vec![1000]).unwrap(), false),
            Ok(true)
        );
        assert_eq!(r.push_key("a", 1000, &frame()), PushOutcome::Filtered);
        // unsubscribing the last op leaves a filter that accepts nothing
        assert_eq!(
            r.update_filter(&a, &OpList::new(vec![1001]).unwrap(), false),
            Ok(true)
        );
        assert_eq!(r.push_key("a", 1001, &frame()), PushOutcome::Filtered);
    }

    #[test]
    fn full_queue_does_not_stop_the_rest_of_a_push() {
        let r = Registry::new(1);
        let (slow, _rs) = Channel::new(r.next_id(), "slow".into(), None, Transport::Tcp, 1);
        let (fast, mut rf) = Channel::new(r.next_id(), "fast".into(), None, Transport::Quic, 8);
        r.register(slow, Some("r".into()), OpFilter::default())
            .unwrap();
        r.register(fast, Some("r".into()), OpFilter::default())
            .unwrap();
        assert_eq!(r.push_room("r", 1, &frame()).delivered, 2);
        let t = r.push_room("r", 1, &frame());
        assert_eq!((t.delivered, t.queue_full), (1, 1));
        assert_eq!(drain(&mut rf), 2);
        assert_eq!(
            r.online(),
            Online {
                total: 2,
                tcp: 1,
                quic: 1,
                ..Online::default()
            }
        );
    }

    #[test]
    fn broadcast_visits_every_bucket_and_kick_closes() {
        let r = Registry::new(4);
        let mut keep = Vec::new();
        for i in 0..20 {
            let (c, rx) = chan(&r, &format!("k{i}"), None);
            r.register(c.clone(), None, OpFilter::default()).unwrap();
            keep.push((c, rx));
        }
        let total: u64 = (0..r.bucket_count())
            .map(|b| {
                r.push_bucket(b, 1, &frame(), PushMeta::untracked(Source::All))
                    .delivered
            })
            .sum();
        assert_eq!(total, 20);
        let paced: usize = (0..r.bucket_count())
            .map(|b| r.bucket_channels(b, 1).len())
            .sum();
        assert_eq!(paced, 20);
        assert!(r.kick("k3"));
        assert!(!r.kick("nobody"));
        assert_eq!(keep[3].0.close_reason(), Some(CloseReason::Kicked));
        assert_eq!(r.close_all(CloseReason::Shutdown), 20);
    }
}

//! One connected client as the registry sees it.
//!
//! A [`Channel`] owns the sending side of the client's bounded outbound queue and a
//! close signal. Pushes append to the queue and never wait; the session's
//! writer owns the receiving side and the socket.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::history::Position;
use crate::protocol::{self, PushMeta, Source};

/// The transport a client connected over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    /// goim v2 frames over plain TCP.
    Tcp,
    /// goim v2 frames over TLS over TCP (`client.tls_bind`).
    Tls,
    /// WebSocket (`client.ws_bind`): one frame, or one Raw frame, per message.
    Ws,
    /// WebSocket over TLS (`client.wss_bind`).
    Wss,
    /// One QUIC stream.
    Quic,
}

impl Transport {
    /// Every transport, in [`Transport::index`] order.
    pub const ALL: [Transport; 5] = [
        Transport::Tcp,
        Transport::Tls,
        Transport::Ws,
        Transport::Wss,
        Transport::Quic,
    ];

    /// A dense index, for per-transport counters.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name in logs (the `conn` span's `transport` field) and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Quic => "quic",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the server closed a channel; sent nowhere, but logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Another connection authenticated with the same key.
    Replaced,
    /// A backend called `Kick`.
    Kicked,
    /// The server is shutting down.
    Shutdown,
    /// Its queue refused a push and did not get back to its low-water mark (half
    /// its bound) for `client.slow_consumer_timeout`.
    SlowConsumer,
    /// A resume-capable connection's queue refused a push kept in history: rather
    /// than skip it, the server closes the connection and the client resumes.
    Overflow,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Replaced => "replaced by a new connection with the same key",
            CloseReason::Kicked => "kicked by a backend",
            CloseReason::Shutdown => "server shutting down",
            CloseReason::SlowConsumer => {
                "slow consumer: queue full and not back to half within client.slow_consumer_timeout"
            }
            CloseReason::Overflow => {
                "queue full for a push kept in history: the client resumes to get it"
            }
        })
    }
}

impl CloseReason {
    /// The reason's name in the DisconnectReply body and in logs.
    pub fn name(self) -> &'static str {
        match self {
            CloseReason::Replaced => "replaced",
            CloseReason::Kicked => "kicked",
            CloseReason::Shutdown => "shutdown",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::Overflow => "overflow",
        }
    }

    /// Whether the client should connect again (and resume): not when another
    /// connection took its key or a backend kicked it.
    pub fn reconnect(self) -> bool {
        !matches!(self, CloseReason::Replaced | CloseReason::Kicked)
    }

    /// The body of the DisconnectReply a connection closed for this reason gets:
    /// JSON `{"reason":"…","reconnect":bool}`. goim clients take no body from
    /// DisconnectReply and ignore it; a quicpush client learns why, and that after
    /// `shutdown` it should resume on another node of the tier.
    pub fn disconnect_body(self) -> Bytes {
        Bytes::from(format!(
            r#"{{"reason":"{}","reconnect":{}}}"#,
            self.name(),
            self.reconnect()
        ))
    }
}

pub use crate::rpc::proto::PushOutcome;

/// A channel's bounded outbound queue: the bytes its writer will send next.
///
/// A push appends the encoded frame, stamped with the connection's next push
/// sequence number, to this buffer under a plain mutex, and wakes the writer only
/// when the buffer was empty; the writer swaps the whole buffer out and sends it in
/// one write. Copying a small frame is cheaper than sharing it: no reference count
/// bounces between the core that pushes and the core that writes.
///
/// Two bounds apply: frames queued (`client.queue_size`), and bytes queued plus the
/// bytes the writer took and has not finished writing (`client.queue_bytes`): what a
/// client costs the server is the whole backlog, on its way to the socket or not. A
/// push or reply that does not fit is refused (a reply waits for room). Only forced
/// frames go beyond: AuthReply and a replay at registration (a replay holds at most
/// `history.size` pushes per source), and a resume-capable ChangeRoomReply, queued
/// under the registry's lock after its session waited for room, so at most that one
/// frame over the bound.
struct OutQueue {
    state: Mutex<QueueState>,
    /// The writer waits here for bytes, or for the queue to shut.
    readable: Notify,
    /// Replies wait here for room.
    writable: Notify,
}

struct QueueState {
    buf: BytesMut,
    frames: usize,
    cap: usize,
    /// Bound on `buf.len() + in_flight`.
    max_bytes: usize,
    /// Bytes the writer took and has not reported written.
    in_flight: usize,
    /// The most `buf.len() + in_flight` has been.
    peak: usize,
    /// Sequence number of the last push queued on this connection.
    push_seq: u32,
    /// No more pushes: the server is closing the channel, or the client is gone.
    shut: bool,
    /// When a push was first refused since a write last finished with the queue at
    /// or below its low-water mark ([`QueueState::at_low_water`]).
    lagging_since: Option<Instant>,
    /// How long the queue may lag before the client is a slow consumer.
    slow_after: Duration,
    /// Frames carry the resume extension.
    resume: bool,
    /// Per source: pushes of this epoch up to this offset were already queued (a
    /// replay), so a live copy of one is dropped.
    floors: [Position; 4],
}

impl QueueState {
    /// Bytes queued or being written.
    fn used(&self) -> usize {
        self.buf.len() + self.in_flight
    }

    /// Whether a frame of `len` bytes may be queued. An empty queue takes any one
    /// frame, so a frame larger than the bound cannot wait forever.
    fn has_room(&self, len: usize) -> bool {
        self.frames < self.cap && (self.used() + len <= self.max_bytes || self.used() == 0)
    }

    /// At or below half of both bounds (frames, and bytes queued): a client whose
    /// writes keep finishing with no more than this queued is keeping up, whatever
    /// it refused before. Under a steady
    /// load a write rarely finishes with the queue empty, so "empty" would make a
    /// burst long ago count as lag.
    fn at_low_water(&self) -> bool {
        self.frames <= self.cap / 2 && self.buf.len() <= self.max_bytes / 2
    }
}

enum Push {
    Queued {
        was_empty: bool,
    },
    /// Refused; `slow` once the queue has lagged for longer than `slow_after`.
    Full {
        slow: bool,
    },
    Shut,
    /// Already queued by a replay.
    Duplicate,
    /// Not the next offset of its source ([`Stamp::Next`]): one was lost before it.
    Gap,
}

/// How a frame is stamped as it is copied into the queue.
#[derive(Clone, Copy)]
enum Stamp {
    /// A reply: as it is.
    Reply,
    /// A push: the next push seq and, on a resume-capable connection, the extension.
    Push(PushMeta),
    /// A push that must be its source's next offset on a resume-capable
    /// connection (shared key history, which delivers through pub/sub): an older
    /// one is a duplicate, a later one a gap.
    Next(PushMeta),
}

impl OutQueue {
    fn append(&self, frame: &[u8], stamp: Stamp, force: bool) -> Push {
        let mut s = self.state.lock();
        if s.shut {
            return Push::Shut;
        }
        match stamp {
            // A replay (forced) is what set the floor; only live copies are dropped.
            Stamp::Push(meta) if !force && s.resume && meta.is_tracked() => {
                let floor = s.floors[meta.source.index()];
                if meta.epoch == floor.epoch && meta.offset <= floor.offset {
                    return Push::Duplicate;
                }
            }
            Stamp::Next(meta) if s.resume && meta.is_tracked() => {
                let floor = s.floors[meta.source.index()];
                let same = meta.epoch == floor.epoch;
                if same && meta.offset <= floor.offset {
                    return Push::Duplicate;
                }
                // A new epoch (the stream expired and began again) starts at 1.
                let next = if same { floor.offset + 1 } else { 1 };
                if meta.offset != next {
                    return Push::Gap;
                }
            }
            _ => {}
        }
        let len = match stamp {
            Stamp::Push(_) | Stamp::Next(_) if s.resume => frame.len() + protocol::EXT_LEN,
            _ => frame.len(),
        };
        if !force && !s.has_room(len) {
            // Only the refusing path reads the clock.
            let now = Instant::now();
            let since = *s.lagging_since.get_or_insert(now);
            return Push::Full {
                slow: now.duration_since(since) >= s.slow_after,
            };
        }
        if let Stamp::Next(meta) = stamp {
            if s.resume && meta.is_tracked() {
                s.floors[meta.source.index()] = Position {
                    epoch: meta.epoch,
                    offset: meta.offset,
                };
            }
        }
        match stamp {
            Stamp::Push(meta) | Stamp::Next(meta) => {
                s.push_seq = s.push_seq.wrapping_add(1);
                let seq = s.push_seq;
                if s.resume {
                    protocol::put_with_ext(&mut s.buf, frame, seq, meta);
                } else {
                    protocol::put_with_seq(&mut s.buf, frame, seq);
                }
            }
            Stamp::Reply => s.buf.extend_from_slice(frame),
        }
        s.frames += 1;
        s.peak = s.peak.max(s.used());
        Push::Queued {
            was_empty: s.frames == 1,
        }
    }

    fn shut(&self) {
        self.state.lock().shut = true;
        self.readable.notify_one();
        self.writable.notify_waiters();
    }
}

/// A snapshot of a channel's queue ([`Channel::queue_level`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueLevel {
    /// Frames waiting for the writer (not counting those it is writing).
    pub frames: usize,
    /// Bytes waiting for the writer plus those it took and has not finished
    /// writing: what `client.queue_bytes` bounds.
    pub bytes: usize,
    /// Of `bytes`, those the writer took and has not finished writing.
    pub in_flight: usize,
    /// The most `bytes` has been over the channel's life.
    pub peak_bytes: usize,
    /// A push was refused and the queue has not been back at its low-water mark
    /// since: the slow-consumer clock is running.
    pub lagging: bool,
}

/// What [`OutReceiver::next`] hands the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Frames now in the writer's buffer.
    pub frames: usize,
    /// The queue is shut: write this batch, then stop.
    pub last: bool,
}

/// The writer's end of a channel's queue. Dropping it shuts the queue: later
/// pushes report the channel offline.
pub struct OutReceiver {
    chan: Arc<Channel>,
}

impl fmt::Debug for OutReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutReceiver")
    }
}

impl OutReceiver {
    /// Waits for queued bytes (or the queue shutting), yields once to the
    /// scheduler so that whatever else is running (a push fanning out to many
    /// clients) can queue more first, then swaps the queued bytes into `out`
    /// (which must be empty; its allocation is reused by the queue).
    pub async fn next(&mut self, out: &mut BytesMut) -> Batch {
        self.next_after(out, Duration::ZERO).await
    }

    /// As [`OutReceiver::next`], then, unless the queue is shutting, waits
    /// `coalesce` for more to queue before taking it (`client.write_coalesce`):
    /// one write for what a fan-out queues meanwhile.
    pub async fn next_after(&mut self, out: &mut BytesMut, coalesce: Duration) -> Batch {
        let shut = loop {
            {
                let s = self.chan.queue.state.lock();
                if s.frames > 0 || s.shut {
                    break s.shut;
                }
            }
            self.chan.queue.readable.notified().await;
        };
        if coalesce.is_zero() || shut {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(coalesce).await;
        }
        self.take(out)
    }

    /// Swaps whatever is queued into `out` without waiting. Its bytes still count
    /// against `client.queue_bytes` until [`OutReceiver::written`].
    pub fn take(&mut self, out: &mut BytesMut) -> Batch {
        let batch = {
            let mut s = self.chan.queue.state.lock();
            std::mem::swap(&mut s.buf, out);
            s.in_flight += out.len();
            let frames = std::mem::take(&mut s.frames);
            Batch {
                frames,
                last: s.shut,
            }
        };
        if batch.frames > 0 {
            self.chan.queue.writable.notify_waiters();
        }
        batch
    }

    /// Tells the queue the writer has sent everything it took: if what was queued
    /// meanwhile is at or below the low-water mark (half the bound), the client is
    /// keeping up and no longer lagging. Lag is a backlog sustained above the mark.
    pub fn written(&mut self) {
        let freed = {
            let mut s = self.chan.queue.state.lock();
            if s.at_low_water() {
                s.lagging_since = None;
            }
            std::mem::take(&mut s.in_flight)
        };
        if freed > 0 {
            self.chan.queue.writable.notify_waiters();
        }
    }

    /// Discards everything queued; returns how many frames that was.
    pub fn drain(&mut self) -> usize {
        let (frames, dropped) = {
            let mut s = self.chan.queue.state.lock();
            (std::mem::take(&mut s.frames), std::mem::take(&mut s.buf))
        };
        if !dropped.is_empty() {
            self.chan.queue.writable.notify_waiters();
        }
        frames
    }
}

impl Drop for OutReceiver {
    fn drop(&mut self) {
        self.chan.queue.shut();
    }
}

/// The bounds of a channel's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Frames queued (`client.queue_size`).
    pub frames: usize,
    /// Bytes queued plus those being written (`client.queue_bytes`).
    pub bytes: usize,
    /// How long the queue may lag before the client is a slow consumer
    /// (`client.slow_consumer_timeout`).
    pub slow_after: Duration,
}

/// A client's registration: identity, outbound queue and close signal.
pub struct Channel {
    /// Unique per connection for the life of the process.
    pub id: u64,
    pub key: Arc<str>,
    pub mid: Option<i64>,
    pub transport: Transport,
    /// The connection negotiated resume: pushes carry the extension.
    pub resume: bool,
    /// Inline, so a fan-out reaches the queue in one hop from the registry's entry.
    queue: OutQueue,
    close: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.id)
            .field("key", &self.key)
            .field("mid", &self.mid)
            .field("transport", &self.transport)
            .finish()
    }
}

impl Channel {
    /// A channel and the receiving side of its queue of `queue_size` frames, with
    /// no slow-consumer limit (see [`Channel::with_limits`]).
    pub fn new(
        id: u64,
        key: Arc<str>,
        mid: Option<i64>,
        transport: Transport,
        queue_size: usize,
    ) -> (Arc<Channel>, OutReceiver) {
        Self::with_limits(id, key, mid, transport, queue_size, Duration::MAX)
    }

    /// A channel whose queue holds `queue_size` frames and which is closed as a
    /// slow consumer when a push is refused after the queue has been lagging for
    /// `slow_after`: a push was refused, and no write has finished since with at
    /// most half of `queue_size` queued.
    pub fn with_limits(
        id: u64,
        key: Arc<str>,
        mid: Option<i64>,
        transport: Transport,
        queue_size: usize,
        slow_after: Duration,
    ) -> (Arc<Channel>, OutReceiver) {
        Self::with_resume(id, key, mid, transport, queue_size, slow_after, false)
    }

    /// As [`Channel::with_limits`], for a connection that negotiated resume (`resume`).
    pub fn with_resume(
        id: u64,
        key: Arc<str>,
        mid: Option<i64>,
        transport: Transport,
        queue_size: usize,
        slow_after: Duration,
        resume: bool,
    ) -> (Arc<Channel>, OutReceiver) {
        let limits = QueueLimits {
            frames: queue_size,
            bytes: usize::MAX,
            slow_after,
        };
        Self::open(id, key, mid, transport, limits, resume)
    }

    /// A channel whose queue is bounded by `limits`, for a connection that
    /// negotiated resume or not (`resume`).
    pub fn open(
        id: u64,
        key: Arc<str>,
        mid: Option<i64>,
        transport: Transport,
        limits: QueueLimits,
        resume: bool,
    ) -> (Arc<Channel>, OutReceiver) {
        let QueueLimits {
            frames,
            bytes,
            slow_after,
        } = limits;
        let queue = OutQueue {
            state: Mutex::new(QueueState {
                buf: BytesMut::new(),
                frames: 0,
                cap: frames.max(1),
                max_bytes: bytes.max(1),
                in_flight: 0,
                peak: 0,
                push_seq: 0,
                shut: false,
                lagging_since: None,
                slow_after,
                resume,
                floors: [Position::default(); 4],
            }),
            readable: Notify::new(),
            writable: Notify::new(),
        };
        let ch = Channel {
            id,
            key,
            mid,
            transport,
            resume,
            queue,
            close: CancellationToken::new(),
            reason: OnceLock::new(),
        };
        let ch = Arc::new(ch);
        (ch.clone(), OutReceiver { chan: ch })
    }

    /// Queues a pushed frame (encoded once for every recipient, with a 16-byte
    /// header) without waiting; `meta` says where it came from.
    #[inline]
    pub fn try_push(&self, frame: &Bytes, meta: PushMeta) -> PushOutcome {
        let resumable = self.resume && meta.is_tracked();
        let r = self.queue.append(frame, Stamp::Push(meta), false);
        self.push_outcome(r, resumable)
    }

    #[inline]
    fn push_outcome(&self, r: Push, resumable: bool) -> PushOutcome {
        match r {
            Push::Queued { was_empty } => {
                if was_empty {
                    self.queue.readable.notify_one();
                }
                PushOutcome::Delivered
            }
            Push::Duplicate => PushOutcome::Delivered,
            // Skipping a push kept in history would leave a hole the client cannot
            // see; closing lets it resume and get every push in order.
            Push::Full { .. } | Push::Gap if resumable => {
                self.close(CloseReason::Overflow);
                PushOutcome::Stored
            }
            Push::Full { slow } => {
                if slow {
                    self.close(CloseReason::SlowConsumer);
                }
                PushOutcome::QueueFull
            }
            Push::Gap => PushOutcome::Stored,
            Push::Shut if resumable => PushOutcome::Stored,
            // Closing: its writer sends what was queued, then DisconnectReply.
            Push::Shut => PushOutcome::Offline,
        }
    }

    /// Queues a push that must be the next offset of its source (shared key
    /// history): a duplicate is dropped (`Delivered`, it was queued before), and a
    /// gap closes the channel with [`CloseReason::Overflow`] so that its client
    /// resumes and gets every push in order (`Stored`: it is in history). `force`
    /// ignores the queue's bound (the buffered pushes of a registration).
    pub fn push_next(&self, frame: &Bytes, meta: PushMeta, force: bool) -> PushOutcome {
        let resumable = self.resume && meta.is_tracked();
        let r = self.queue.append(frame, Stamp::Next(meta), force);
        self.push_outcome(r, resumable)
    }

    /// Queues a replayed push whatever the queue's bound (a replay is bounded by
    /// `history.size` per source). False if the queue is shut.
    pub fn force_push(&self, frame: &Bytes, meta: PushMeta) -> bool {
        self.force(frame, Stamp::Push(meta))
    }

    /// Queues a reply at once, whatever the queue's bound: for AuthReply and a
    /// resume-capable ChangeRoomReply, queued under the registry's lock so that no
    /// push can come before them. False if the queue is shut.
    pub fn force_reply(&self, frame: &Bytes) -> bool {
        self.force(frame, Stamp::Reply)
    }

    fn force(&self, frame: &Bytes, stamp: Stamp) -> bool {
        match self.queue.append(frame, stamp, true) {
            Push::Queued { was_empty } => {
                if was_empty {
                    self.queue.readable.notify_one();
                }
                true
            }
            Push::Duplicate => true,
            Push::Full { .. } | Push::Shut | Push::Gap => false,
        }
    }

    /// Live pushes from `source` up to `pos` are already queued (or before the
    /// client's position): drop live copies of them.
    pub fn set_floor(&self, source: Source, pos: Position) {
        self.queue.state.lock().floors[source.index()] = pos;
    }

    /// Queues a reply, waiting for room: a client that floods requests without
    /// reading its replies only slows down its own reader. False if the writer is gone.
    pub async fn reply(&self, frame: Bytes) -> bool {
        loop {
            let room = self.queue.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.queue.append(&frame, Stamp::Reply, false) {
                Push::Queued { was_empty } => {
                    if was_empty {
                        self.queue.readable.notify_one();
                    }
                    return true;
                }
                Push::Shut | Push::Gap => return false,
                Push::Duplicate => return true,
                Push::Full { .. } => room.await,
            }
        }
    }

    /// How full the queue is now: a cheap read under the queue's lock, for tests and
    /// diagnostics.
    pub fn queue_level(&self) -> QueueLevel {
        let s = self.queue.state.lock();
        QueueLevel {
            frames: s.frames,
            bytes: s.used(),
            in_flight: s.in_flight,
            peak_bytes: s.peak,
            lagging: s.lagging_since.is_some(),
        }
    }

    /// Waits until a frame of `len` bytes fits in the queue, for a reply that must
    /// then be forced in under the registry's lock ([`Channel::force_reply`]):
    /// pushes queued in between can take the room, so it may go over the bound by
    /// that one frame. False if the queue is shut.
    pub async fn room_for(&self, len: usize) -> bool {
        loop {
            let room = self.queue.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let s = self.queue.state.lock();
                if s.shut {
                    return false;
                }
                if s.has_room(len) {
                    return true;
                }
            }
            room.await;
        }
    }

    /// Ends the writer: what is queued is still written, then its stream finishes
    /// (without DisconnectReply unless [`Channel::close`] was called). Pushes from
    /// now on report the channel offline.
    pub fn shut(&self) {
        self.queue.shut();
    }

    /// Asks the session to send DisconnectReply and close. The first reason wins.
    /// Pushes from now on report the channel offline.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.queue.shut();
        self.close.cancel();
    }

    /// Why the channel was closed by the server, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }

    /// Resolves once [`Channel::close`] was called.
    pub async fn closed(&self) {
        self.close.cancelled().await
    }

    /// Whether [`Channel::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Frame;

    fn frame(body: &'static [u8]) -> Bytes {
        Frame::new(1000, 0, body).to_bytes()
    }

    #[test]
    fn every_transport_is_listed_at_its_index() {
        for (i, t) in Transport::ALL.iter().enumerate() {
            assert_eq!(t.index(), i, "{t}");
        }
    }

    /// Awaits `fut` for at most a few seconds: a regression fails the test instead
    /// of hanging it.
    async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .expect("timed out")
    }

    const KEY: PushMeta = PushMeta {
        source: Source::Key,
        epoch: 0,
        offset: 0,
    };

    fn at(offset: u64) -> PushMeta {
        PushMeta {
            source: Source::Key,
            epoch: 7,
            offset,
        }
    }

    #[tokio::test]
    async fn resumable_channel_stamps_the_extension_drops_replayed_copies_and_closes_on_overflow() {
        let (ch, mut rx) =
            Channel::with_resume(1, "k".into(), None, Transport::Tcp, 2, Duration::MAX, true);
        assert!(ch.force_push(&frame(b"r1"), at(1)));
        ch.set_floor(
            Source::Key,
            Position {
                epoch: 7,
                offset: 1,
            },
        );
        assert_eq!(
            ch.try_push(&frame(b"r1"), at(1)),
            PushOutcome::Delivered,
            "a duplicate"
        );
        assert_eq!(ch.try_push(&frame(b"l2"), at(2)), PushOutcome::Delivered);
        let mut out = BytesMut::new();
        rx.take(&mut out);
        let got: Vec<_> = std::iter::from_fn(|| protocol::decode_server(&mut out, 4096).unwrap())
            .map(|(f, m)| (f.seq, f.body, m.map(|m| m.offset)))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, Bytes::from_static(b"r1"), Some(1)),
                (2, Bytes::from_static(b"l2"), Some(2))
            ]
        );
        // untracked pushes that do not fit are refused as for goim clients
        assert_eq!(ch.try_push(&frame(b"a"), KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&frame(b"b"), KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&frame(b"c"), KEY), PushOutcome::QueueFull);
        assert!(!ch.is_closed());
        // a tracked one closes the connection: its client resumes from history
        assert_eq!(ch.try_push(&frame(b"l3"), at(3)), PushOutcome::Stored);
        assert_eq!(ch.close_reason(), Some(CloseReason::Overflow));
        assert_eq!(ch.try_push(&frame(b"l4"), at(4)), PushOutcome::Stored);
        assert_eq!(ch.try_push(&frame(b"x"), KEY), PushOutcome::Offline);
    }

    #[tokio::test]
    async fn full_queue_is_a_distinct_outcome() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 2);
        let f = frame(b"frame");
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::QueueFull);
        assert_eq!(rx.drain(), 2);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        drop(rx);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Offline);
    }

    #[tokio::test]
    async fn pushes_are_stamped_with_the_connection_sequence() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 8);
        ch.try_push(&frame(b"a"), KEY);
        assert!(within(ch.reply(Frame::new(3, 77, Bytes::new()).to_bytes())).await);
        ch.try_push(&frame(b"b"), KEY);
        let mut out = BytesMut::new();
        let batch = within(rx.next(&mut out)).await;
        assert_eq!(
            batch,
            Batch {
                frames: 3,
                last: false
            }
        );
        let seqs: Vec<u32> = std::iter::from_fn(|| protocol::decode(&mut out, 4096).unwrap())
            .map(|f| f.seq)
            .collect();
        assert_eq!(
            seqs,
            vec![1, 77, 2],
            "replies keep their seq; pushes count 1, 2"
        );
    }

    #[tokio::test]
    async fn writer_wakes_for_a_push() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 8);
        let waiter = tokio::spawn(async move {
            let mut out = BytesMut::new();
            rx.next(&mut out).await
        });
        tokio::task::yield_now().await;
        assert_eq!(ch.try_push(&frame(b"f"), KEY), PushOutcome::Delivered);
        assert_eq!(within(waiter).await.unwrap().frames, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_coalescing_writer_takes_what_queued_within_its_wait() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 8);
        let waiter = tokio::spawn(async move {
            let mut out = BytesMut::new();
            let b = rx.next_after(&mut out, Duration::from_millis(2)).await;
            (b, rx)
        });
        tokio::task::yield_now().await;
        assert_eq!(ch.try_push(&frame(b"1"), KEY), PushOutcome::Delivered);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(ch.try_push(&frame(b"2"), KEY), PushOutcome::Delivered);
        let (b, mut rx) = waiter.await.unwrap();
        assert_eq!(b.frames, 2, "both pushes in one write");
        // Without a wait, the writer takes the first push alone.
        let waiter = tokio::spawn(async move {
            let mut out = BytesMut::new();
            rx.next_after(&mut out, Duration::ZERO).await
        });
        tokio::task::yield_now().await;
        assert_eq!(ch.try_push(&frame(b"3"), KEY), PushOutcome::Delivered);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(waiter.await.unwrap().frames, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shutting_queue_is_taken_at_once_whatever_the_wait() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 8);
        ch.try_push(&frame(b"last"), KEY);
        ch.close(CloseReason::Kicked);
        let t0 = tokio::time::Instant::now();
        let mut out = BytesMut::new();
        let b = rx.next_after(&mut out, Duration::from_secs(5)).await;
        assert!(b.last);
        assert_eq!(b.frames, 1);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn reply_waits_for_room() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 1);
        assert!(within(ch.reply(frame(b"1"))).await);
        let ch2 = ch.clone();
        let second = tokio::spawn(async move { ch2.reply(frame(b"2")).await });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the queue is full: the reply waits");
        assert_eq!(rx.drain(), 1);
        assert!(within(second).await.unwrap());
        assert_eq!(rx.drain(), 1);
        drop(rx);
        assert!(!within(ch.reply(frame(b"3"))).await, "no writer: refused");
    }

    #[tokio::test]
    async fn a_queue_that_lags_past_the_limit_closes_its_channel() {
        let slow_after = Duration::from_millis(50);
        let (ch, mut rx) = Channel::with_limits(1, "k".into(), None, Transport::Tcp, 1, slow_after);
        let f = frame(b"f");
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(
            ch.try_push(&f, KEY),
            PushOutcome::QueueFull,
            "lagging starts"
        );
        tokio::time::sleep(slow_after + Duration::from_millis(10)).await;
        // the writer took the frame but has not finished writing it: still lagging
        let mut out = BytesMut::new();
        assert_eq!(rx.take(&mut out).frames, 1);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::QueueFull);
        assert!(ch.is_closed(), "refused after lagging for {slow_after:?}");
        assert_eq!(ch.close_reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Offline);
    }

    #[tokio::test]
    async fn a_writer_that_catches_up_ends_the_lag() {
        let slow_after = Duration::from_millis(50);
        let (ch, mut rx) = Channel::with_limits(1, "k".into(), None, Transport::Tcp, 1, slow_after);
        let f = frame(b"f");
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::QueueFull);
        tokio::time::sleep(slow_after + Duration::from_millis(10)).await;
        assert_eq!(rx.drain(), 1);
        rx.written();
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(
            ch.try_push(&f, KEY),
            PushOutcome::QueueFull,
            "a new lag starts"
        );
        assert!(!ch.is_closed());
    }

    #[tokio::test]
    async fn a_burst_long_ago_is_not_lag_when_writes_finish_at_low_water() {
        let slow_after = Duration::from_millis(50);
        let (ch, mut rx) = Channel::with_limits(1, "k".into(), None, Transport::Tcp, 4, slow_after);
        let f = frame(b"f");
        for _ in 0..4 {
            assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        }
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::QueueFull, "the burst");
        assert!(ch.queue_level().lagging);
        // Steady load: every write finishes with a frame or two queued meanwhile,
        // never with the queue empty, for longer than the limit.
        let mut out = BytesMut::new();
        for _ in 0..3 {
            rx.take(&mut out);
            out.clear();
            assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
            assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
            rx.written();
            assert!(!ch.queue_level().lagging, "2 of 4 queued: at low water");
            tokio::time::sleep(slow_after / 2).await;
        }
        // another refusal, long after the burst, starts a new lag
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::QueueFull);
        assert!(
            !ch.is_closed(),
            "closed for a burst {:?} ago",
            3 * slow_after / 2
        );
        // A write that finishes above low water does not end the lag: a backlog
        // sustained for the limit is slow.
        rx.take(&mut out);
        out.clear();
        for _ in 0..3 {
            assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        }
        rx.written();
        assert!(ch.queue_level().lagging, "3 of 4 queued: above low water");
        tokio::time::sleep(slow_after + Duration::from_millis(10)).await;
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::QueueFull);
        assert_eq!(ch.close_reason(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn the_byte_bound_counts_what_the_writer_is_writing_and_replies_wait_for_room() {
        let f = frame(b"0123456789");
        let len = f.len();
        let limits = QueueLimits {
            frames: 100,
            bytes: 3 * len,
            slow_after: Duration::MAX,
        };
        let (ch, mut rx) = Channel::open(1, "k".into(), None, Transport::Tcp, limits, false);
        for _ in 0..3 {
            assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        }
        assert_eq!(
            ch.try_push(&f, KEY),
            PushOutcome::QueueFull,
            "3 frames of bytes"
        );
        assert!(ch.queue_level().lagging, "refused by bytes: the same lag");
        let mut out = BytesMut::new();
        assert_eq!(rx.take(&mut out).frames, 3);
        let level = ch.queue_level();
        assert_eq!(
            (level.frames, level.bytes, level.in_flight),
            (0, 3 * len, 3 * len)
        );
        assert_eq!(
            ch.try_push(&f, KEY),
            PushOutcome::QueueFull,
            "taken but not written still counts"
        );
        let ch2 = ch.clone();
        let reply = tokio::spawn(async move { ch2.reply(frame(b"reply")).await });
        tokio::task::yield_now().await;
        assert!(!reply.is_finished(), "no room: the reply waits");
        rx.written();
        assert!(within(reply).await.unwrap(), "written: room for the reply");
        assert_eq!(ch.queue_level().bytes, frame(b"reply").len());
        // A forced reply goes in whatever the bound; the peak records it.
        rx.drain();
        for _ in 0..3 {
            assert_eq!(ch.try_push(&f, KEY), PushOutcome::Delivered);
        }
        assert!(ch.force_reply(&f));
        let level = ch.queue_level();
        assert_eq!((level.bytes, level.peak_bytes), (4 * len, 4 * len));
        // An empty queue takes any one frame, however large.
        rx.drain();
        let big = Frame::new(1000, 0, vec![0u8; 4 * len]).to_bytes();
        assert_eq!(ch.try_push(&big, KEY), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f, KEY), PushOutcome::QueueFull);
    }

    #[tokio::test]
    async fn room_for_waits_until_a_frame_fits() {
        let f = frame(b"0123456789");
        let limits = QueueLimits {
            frames: 100,
            bytes: 2 * f.len(),
            slow_after: Duration::MAX,
        };
        let (ch, mut rx) = Channel::open(1, "k".into(), None, Transport::Tcp, limits, true);
        assert!(within(ch.room_for(f.len())).await);
        assert!(ch.force_reply(&f));
        assert!(ch.force_reply(&f));
        let ch2 = ch.clone();
        let waiting = tokio::spawn(async move { ch2.room_for(f.len()).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        rx.drain();
        assert!(within(waiting).await.unwrap());
        drop(rx);
        assert!(!within(ch.room_for(1)).await, "shut: no room ever");
    }

    #[tokio::test]
    async fn close_shuts_the_queue_and_wakes_the_writer() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Quic, 2);
        assert!(!ch.is_closed());
        ch.try_push(&frame(b"queued before"), KEY);
        ch.close(CloseReason::Replaced);
        ch.close(CloseReason::Shutdown);
        within(ch.closed()).await;
        assert_eq!(ch.close_reason(), Some(CloseReason::Replaced));
        assert_eq!(ch.try_push(&frame(b"x"), KEY), PushOutcome::Offline);
        let mut out = BytesMut::new();
        assert_eq!(
            within(rx.next(&mut out)).await,
            Batch {
                frames: 1,
                last: true
            }
        );
    }
}

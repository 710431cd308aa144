//! One connected client as the registry sees it.
//!
//! A [`Channel`] owns the sending side of the client's bounded outbound queue and a
//! close signal. Pushes `try_send` into the queue and never wait; the session's
//! writer owns the receiving side and the socket.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The transport a client connected over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Transport {
    Tcp,
    Quic,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        })
    }
}

/// What a writer takes off the queue: an encoded frame.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A pushed message, encoded once for all its recipients; the writer stamps the
    /// connection's next push sequence number into its seq field.
    Push(Bytes),
    /// A reply to the client's own frame, written as it is (its seq echoes the client's).
    Reply(Bytes),
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
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::Replaced => "replaced by a new connection with the same key",
            CloseReason::Kicked => "kicked by a backend",
            CloseReason::Shutdown => "server shutting down",
        })
    }
}

/// The result of pushing one message to one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PushOutcome {
    /// Queued for the client's writer.
    Delivered,
    /// No channel with that key (or it is closing).
    Offline,
    /// The client's queue is full; this message was not queued.
    QueueFull,
    /// The client's accepts list does not hold the op.
    Filtered,
}

/// A channel's bounded outbound queue.
///
/// A plain mutex around a ring buffer: a push is a lock, a `push_back` and, only
/// when the queue was empty, one wake-up of the writer, which then drains
/// everything queued in one go. Cheaper per delivery than a general-purpose
/// channel, which matters when one push fans out to every client.
struct OutQueue {
    state: Mutex<QueueState>,
    /// The writer waits here for the queue to become non-empty.
    readable: Notify,
    /// Replies wait here for room.
    writable: Notify,
}

struct QueueState {
    items: VecDeque<Outbound>,
    cap: usize,
    /// No more pushes: the server is closing the channel, or the writer is gone.
    shut: bool,
}

enum Push {
    Queued { was_empty: bool },
    Full,
    Shut,
}

impl OutQueue {
    fn push(&self, item: Outbound) -> Push {
        let mut s = self.state.lock();
        if s.shut {
            return Push::Shut;
        }
        if s.items.len() >= s.cap {
            return Push::Full;
        }
        s.items.push_back(item);
        Push::Queued {
            was_empty: s.items.len() == 1,
        }
    }

    fn shut(&self) {
        self.state.lock().shut = true;
        self.writable.notify_waiters();
    }
}

/// The writer's end of a channel's queue. Dropping it shuts the queue: later
/// pushes report the channel offline.
pub struct OutReceiver {
    queue: Arc<OutQueue>,
}

impl fmt::Debug for OutReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutReceiver")
    }
}

impl OutReceiver {
    /// Waits until the queue holds something, then moves up to `max` items into
    /// `out`. Returns how many it moved (never 0).
    pub async fn recv_many(&mut self, out: &mut Vec<Outbound>, max: usize) -> usize {
        loop {
            let n = self.take(out, max);
            if n > 0 {
                return n;
            }
            self.queue.readable.notified().await;
        }
    }

    /// Waits until the queue holds something, then yields once to the scheduler so
    /// that whatever else is running (a push fanning out to many clients) can queue
    /// more for this writer first: fewer, larger writes under load.
    pub async fn ready(&mut self) {
        loop {
            if !self.queue.state.lock().items.is_empty() {
                break;
            }
            self.queue.readable.notified().await;
        }
        tokio::task::yield_now().await;
    }

    /// Moves up to `max` queued items into `out` without waiting.
    pub fn take(&mut self, out: &mut Vec<Outbound>, max: usize) -> usize {
        let n = {
            let mut s = self.queue.state.lock();
            let n = s.items.len().min(max);
            out.extend(s.items.drain(..n));
            n
        };
        if n > 0 {
            self.queue.writable.notify_waiters();
        }
        n
    }

    /// One queued item, if any.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let item = self.queue.state.lock().items.pop_front();
        if item.is_some() {
            self.queue.writable.notify_waiters();
        }
        item
    }

    /// Takes no more items: later pushes report the channel offline. What is
    /// queued stays for [`OutReceiver::take`].
    pub fn close(&mut self) {
        self.queue.shut();
    }
}

impl Drop for OutReceiver {
    fn drop(&mut self) {
        self.queue.shut();
    }
}

/// A client's registration: identity, outbound queue and close signal.
pub struct Channel {
    /// Unique per connection for the life of the process.
    pub id: u64,
    pub key: Arc<str>,
    pub mid: Option<i64>,
    pub transport: Transport,
    queue: Arc<OutQueue>,
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
    /// A channel and the receiving side of its queue of `queue_size` frames.
    pub fn new(
        id: u64,
        key: Arc<str>,
        mid: Option<i64>,
        transport: Transport,
        queue_size: usize,
    ) -> (Arc<Channel>, OutReceiver) {
        let queue = Arc::new(OutQueue {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                cap: queue_size.max(1),
                shut: false,
            }),
            readable: Notify::new(),
            writable: Notify::new(),
        });
        let ch = Channel {
            id,
            key,
            mid,
            transport,
            queue: queue.clone(),
            close: CancellationToken::new(),
            reason: OnceLock::new(),
        };
        (Arc::new(ch), OutReceiver { queue })
    }

    /// Queues a pushed frame without waiting.
    #[inline]
    pub fn try_push(&self, frame: &Bytes) -> PushOutcome {
        match self.queue.push(Outbound::Push(frame.clone())) {
            Push::Queued { was_empty } => {
                if was_empty {
                    self.queue.readable.notify_one();
                }
                PushOutcome::Delivered
            }
            Push::Full => PushOutcome::QueueFull,
            // Closing: its writer sends what was queued, then DisconnectReply.
            Push::Shut => PushOutcome::Offline,
        }
    }

    /// Queues a reply, waiting for room: a client that floods requests without
    /// reading its replies only slows down its own reader. False if the writer is gone.
    pub async fn reply(&self, frame: Bytes) -> bool {
        let item = Outbound::Reply(frame);
        loop {
            let room = self.queue.writable.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut s = self.queue.state.lock();
                if s.shut {
                    return false;
                }
                if s.items.len() < s.cap {
                    s.items.push_back(item);
                    let was_empty = s.items.len() == 1;
                    drop(s);
                    if was_empty {
                        self.queue.readable.notify_one();
                    }
                    return true;
                }
            }
            room.await;
        }
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

    #[tokio::test]
    async fn writer_wakes_for_a_push_and_drains_everything() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 8);
        let waiter = tokio::spawn(async move {
            let mut out = Vec::new();
            let n = rx.recv_many(&mut out, 100).await;
            (n, rx)
        });
        tokio::task::yield_now().await;
        let f = Bytes::from_static(b"f");
        assert_eq!(ch.try_push(&f), PushOutcome::Delivered);
        let (n, mut rx) = waiter.await.unwrap();
        assert!(n >= 1);
        for _ in 0..3 {
            ch.try_push(&f);
        }
        let mut out = Vec::new();
        assert_eq!(rx.recv_many(&mut out, 100).await + n, 4);
    }

    #[tokio::test]
    async fn reply_waits_for_room() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 1);
        assert!(ch.reply(Bytes::from_static(b"1")).await);
        let ch2 = ch.clone();
        let second = tokio::spawn(async move { ch2.reply(Bytes::from_static(b"2")).await });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the queue is full: the reply waits");
        assert!(rx.try_recv().is_some());
        assert!(second.await.unwrap());
        assert!(matches!(rx.try_recv(), Some(Outbound::Reply(b)) if &b[..] == b"2"));
        drop(rx);
        assert!(
            !ch.reply(Bytes::from_static(b"3")).await,
            "no writer: refused"
        );
    }

    #[tokio::test]
    async fn full_queue_is_a_distinct_outcome() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 2);
        let f = Bytes::from_static(b"frame");
        assert_eq!(ch.try_push(&f), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f), PushOutcome::QueueFull);
        assert!(matches!(rx.try_recv(), Some(Outbound::Push(_))));
        assert_eq!(ch.try_push(&f), PushOutcome::Delivered);
        drop(rx);
        assert_eq!(ch.try_push(&f), PushOutcome::Offline);
    }

    #[tokio::test]
    async fn first_close_reason_wins() {
        let (ch, _rx) = Channel::new(1, "k".into(), None, Transport::Quic, 2);
        assert!(!ch.is_closed());
        ch.close(CloseReason::Replaced);
        assert_eq!(ch.try_push(&Bytes::from_static(b"x")), PushOutcome::Offline);
        ch.close(CloseReason::Shutdown);
        ch.closed().await;
        assert_eq!(ch.close_reason(), Some(CloseReason::Replaced));
    }
}

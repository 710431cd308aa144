//! One connected client as the registry sees it.
//!
//! A [`Channel`] owns the sending side of the client's bounded outbound queue and a
//! close signal. Pushes `try_send` into the queue and never wait; the session's
//! writer owns the receiving side and the socket.

use std::fmt;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
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

/// A client's registration: identity, outbound queue and close signal.
pub struct Channel {
    /// Unique per connection for the life of the process.
    pub id: u64,
    pub key: Arc<str>,
    pub mid: Option<i64>,
    pub transport: Transport,
    tx: mpsc::Sender<Outbound>,
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
    ) -> (Arc<Channel>, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(queue_size);
        let ch = Channel {
            id,
            key,
            mid,
            transport,
            tx,
            close: CancellationToken::new(),
            reason: OnceLock::new(),
        };
        (Arc::new(ch), rx)
    }

    /// Queues a pushed frame without waiting.
    #[inline]
    pub fn try_push(&self, frame: &Bytes) -> PushOutcome {
        if self.close.is_cancelled() {
            // Closing: its writer sends what was queued, then DisconnectReply; a
            // push now would be reported delivered and never written.
            return PushOutcome::Offline;
        }
        match self.tx.try_send(Outbound::Push(frame.clone())) {
            Ok(()) => PushOutcome::Delivered,
            Err(mpsc::error::TrySendError::Full(_)) => PushOutcome::QueueFull,
            Err(mpsc::error::TrySendError::Closed(_)) => PushOutcome::Offline,
        }
    }

    /// Queues a reply, waiting for room: a client that floods requests without
    /// reading its replies only slows down its own reader.
    pub async fn reply(&self, frame: Bytes) -> bool {
        self.tx.send(Outbound::Reply(frame)).await.is_ok()
    }

    /// Asks the session to send DisconnectReply and close. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
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
    async fn full_queue_is_a_distinct_outcome() {
        let (ch, mut rx) = Channel::new(1, "k".into(), None, Transport::Tcp, 2);
        let f = Bytes::from_static(b"frame");
        assert_eq!(ch.try_push(&f), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f), PushOutcome::Delivered);
        assert_eq!(ch.try_push(&f), PushOutcome::QueueFull);
        assert!(matches!(rx.recv().await, Some(Outbound::Push(_))));
        assert_eq!(ch.try_push(&f), PushOutcome::Delivered);
        drop(rx);
        assert_eq!(ch.try_push(&f), PushOutcome::Offline);
    }

    #[tokio::test]
    async fn first_close_reason_wins() {
        let (ch, _rx) = Channel::new(1, "k".into(), None, Transport::Quic, 2);
        assert!(!ch.is_closed());
        ch.close(CloseReason::Replaced);
        ch.close(CloseReason::Shutdown);
        ch.closed().await;
        assert_eq!(ch.close_reason(), Some(CloseReason::Replaced));
    }
}

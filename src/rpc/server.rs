//! Serving backend connections: one accept task per bound endpoint, one task per
//! connection, one task per stream. Each stream carries a sequence of calls; the
//! server starts them in order, runs up to [`MAX_PENDING`] at once (a call that
//! waits on Redis does not hold back the ones behind it) and answers them in
//! order, one coalesced write per batch of replies ready.
//!
//! Shutdown has two steps: `shutdown` stops accepting backends (calls keep being
//! answered while the clients drain); `drain` then has each stream answer every
//! call it has read, finish, and wait for the backend to have the replies, so
//! closing the endpoint afterwards loses no reply.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use tokio::io::AsyncReadExt;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use super::dispatch::Dispatcher;
use super::proto::{Request, Response, RpcError};
use crate::codec;
use crate::shutdown::Shutdown;

/// How long a backend's TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a draining stream waits for the backend to acknowledge its replies.
const REPLY_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one RPC endpoint: accepts backends until `shutdown`, answers their
/// calls until `drain`.
pub async fn serve(
    endpoint: quinn::Endpoint,
    dispatcher: Arc<Dispatcher>,
    max_request: usize,
    tracker: TaskTracker,
    shutdown: Shutdown,
    drain: Shutdown,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let remote = incoming.remote_address();
        let span = info_span!("rpc", remote = %remote);
        let dispatcher = dispatcher.clone();
        let t = tracker.clone();
        let drain = drain.clone();
        tracker.spawn(
            async move {
                let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        warn!(error = %e, "backend handshake failed");
                        return;
                    }
                    Err(_) => {
                        warn!(timeout = ?HANDSHAKE_TIMEOUT, "backend handshake not completed in time");
                        return;
                    }
                };
                info!("backend connected");
                serve_connection(conn, dispatcher, max_request, t, drain).await;
            }
            .instrument(span),
        );
    }
}

async fn serve_connection(
    conn: quinn::Connection,
    dispatcher: Arc<Dispatcher>,
    max_request: usize,
    tracker: TaskTracker,
    drain: Shutdown,
) {
    loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            // open streams finish on their own; the endpoint closes the connection
            _ = drain.cancelled() => return,
        };
        match accepted {
            Ok((send, recv)) => {
                let d = dispatcher.clone();
                let span = info_span!("stream", id = %send.id());
                tracker.spawn(
                    serve_stream(send, recv, d, max_request, drain.clone()).instrument(span),
                );
            }
            Err(quinn::ConnectionError::ApplicationClosed(_))
            | Err(quinn::ConnectionError::LocallyClosed) => {
                info!("backend disconnected");
                return;
            }
            Err(e) => {
                warn!(error = %e, "backend connection lost");
                return;
            }
        }
    }
}

/// Replies buffered before they are written even if more calls are waiting.
const FLUSH_AT: usize = 256 * 1024;

/// Calls one stream may have started and not yet answered. At the limit the
/// stream stops reading, so QUIC flow control holds the backend back.
pub const MAX_PENDING: usize = 256;
/// Request bytes one stream's unanswered calls may hold (besides one call of
/// up to `rpc.max_request_bytes`, which is always taken).
pub const MAX_PENDING_BYTES: usize = 8 << 20;

/// A call started on a stream: once it finishes, its id, its request's size
/// and its response.
type PendingCall = BoxFuture<'static, (u64, usize, Response)>;

/// The calls a stream has started, answered in the order they were read.
///
/// Every call is started in the order it was read: its future is first polled
/// in that order ([`FuturesOrdered`] polls new futures first in, first out), so
/// its local part and the Redis command it queues (a tier's forwarding) run in
/// stream order, and a call that waits on Redis no longer holds back the calls
/// behind it. A Broadcast, which may wait for room in the fan-out queues,
/// starts only when every earlier call has been answered, and the calls after
/// it wait for it, as they did when a stream ran one call at a time.
struct Pipeline {
    calls: FuturesOrdered<PendingCall>,
    /// Request bytes of the calls in `calls`.
    bytes: usize,
    /// Replies not yet written.
    out: BytesMut,
}

impl Pipeline {
    fn new() -> Self {
        Self {
            calls: FuturesOrdered::new(),
            bytes: 0,
            out: BytesMut::with_capacity(64 * 1024),
        }
    }

    fn is_full(&self) -> bool {
        self.calls.len() >= MAX_PENDING || self.bytes >= MAX_PENDING_BYTES
    }

    /// Takes a finished call's reply.
    fn done(&mut self, (id, size, response): (u64, usize, Response)) {
        self.bytes -= size;
        reply(&mut self.out, id, &response);
    }

    /// Starts a call of `size` request bytes; a Broadcast first waits for every
    /// earlier call, then runs alone.
    async fn start(&mut self, dispatcher: &Arc<Dispatcher>, id: u64, size: usize, req: Request) {
        if matches!(req, Request::Broadcast { .. }) {
            self.finish_all().await;
            let response = dispatcher.dispatch(req).await;
            reply(&mut self.out, id, &response);
            return;
        }
        let d = dispatcher.clone();
        self.bytes += size;
        self.calls
            .push_back(async move { (id, size, d.dispatch(req).await) }.boxed());
    }

    /// Answers a call that needed no dispatch (a refusal), after the earlier ones.
    fn answer(&mut self, id: u64, response: Response) {
        if self.calls.is_empty() {
            reply(&mut self.out, id, &response);
        } else {
            self.calls
                .push_back(futures_util::future::ready((id, 0, response)).boxed());
        }
    }

    /// Takes the replies of every call finished now, in order, without waiting.
    async fn take_ready(&mut self) {
        std::future::poll_fn(|cx| {
            while let Poll::Ready(Some(call)) = self.calls.poll_next_unpin(cx) {
                self.done(call);
            }
            Poll::Ready(())
        })
        .await;
    }

    /// Waits for every call started and takes their replies.
    async fn finish_all(&mut self) {
        while let Some(call) = self.calls.next().await {
            self.done(call);
        }
    }
}

/// Answers the calls on one stream until the backend finishes it, or until
/// `drain`: then the calls already read are answered and the stream finished.
/// Calls are pipelined ([`Pipeline`]): up to [`MAX_PENDING`] may be running.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    dispatcher: Arc<Dispatcher>,
    max_request: usize,
    drain: Shutdown,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut calls = Pipeline::new();
    // Bytes of an oversize request still to be skipped.
    let mut skip: u64 = 0;
    let mut draining = false;
    // Nothing more will be read: the backend finished or lost the stream, or
    // the stream fell out of step.
    let mut ended = false;
    // A reply write failed: the backend cannot get replies any more, but the
    // calls started still run to the end.
    let mut unwritable = false;
    loop {
        tokio::select! {
            biased;
            _ = drain.cancelled(), if !draining && !ended => {
                draining = true;
                // Every call that has arrived is answered: take what is buffered
                // without waiting for more.
                while let Some(Ok(n)) = recv.read_buf(&mut buf).now_or_never() {
                    if n == 0 {
                        break;
                    }
                }
            }
            Some(call) = calls.calls.next(), if !calls.calls.is_empty() => calls.done(call),
            r = recv.read_buf(&mut buf), if !draining && !ended && !calls.is_full() => match r {
                Ok(0) => {
                    if !buf.is_empty() {
                        info!(
                            partial_request_bytes = buf.len(),
                            "stream finished in the middle of a request; the request is dropped"
                        );
                    }
                    ended = true;
                }
                Ok(_) => {}
                Err(e) => {
                    log_read_end(&e, buf.len());
                    ended = true;
                }
            },
            else => break,
        }
        while !ended && !calls.is_full() {
            if skip > 0 {
                let n = skip.min(buf.len() as u64) as usize;
                buf.advance(n);
                skip -= n as u64;
                if skip > 0 {
                    break;
                }
            }
            let (id, len) = match codec::peek_prefix(&buf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    // Framing is lost: nothing after this can be trusted. The
                    // calls already started are still answered.
                    warn!(error = %e, "stream out of step; closing it");
                    let _ = recv.stop(quinn::VarInt::from_u32(1));
                    ended = true;
                    break;
                }
            };
            if len > max_request as u64 {
                warn!(
                    call = id,
                    len,
                    max = max_request,
                    "request too large; refused"
                );
                calls.answer(
                    id,
                    Err(RpcError::RequestTooLarge {
                        len,
                        max: max_request as u64,
                    }),
                );
                buf.advance(codec::PREFIX_LEN);
                skip = len;
                continue;
            }
            let total = codec::PREFIX_LEN + len as usize;
            if buf.len() < total {
                buf.reserve(total - buf.len());
                break;
            }
            let msg = buf.split_to(total);
            match codec::decode_payload::<Request>(&msg[codec::PREFIX_LEN..]) {
                Ok(req) => {
                    if matches!(req, Request::Broadcast { .. }) {
                        // A broadcast may wait for room in the fan-out queues:
                        // every call before it is answered, and the replies
                        // sent, first.
                        calls.finish_all().await;
                        if !calls.out.is_empty() && !unwritable {
                            unwritable = send.write_all(&calls.out).await.is_err();
                        }
                        calls.out.clear();
                    }
                    calls.start(&dispatcher, id, total, req).await;
                }
                Err(e) => {
                    warn!(call = id, error = %e, "malformed request");
                    calls.answer(id, Err(RpcError::Malformed(e.to_string())));
                }
            }
            if calls.out.len() >= FLUSH_AT {
                break;
            }
        }
        calls.take_ready().await;
        if !calls.out.is_empty() {
            if !unwritable {
                if let Err(e) = send.write_all(&calls.out).await {
                    debug!(error = %e, "stream write failed");
                    unwritable = true;
                }
            }
            calls.out.clear();
        }
        if (draining || ended) && calls.calls.is_empty() {
            if draining && !buf.is_empty() && skip == 0 {
                debug!(
                    bytes = buf.len(),
                    "shutting down: an incomplete call is left unanswered"
                );
            }
            if draining {
                let _ = recv.stop(crate::transport::quic::code::SHUTDOWN.into());
            }
            break;
        }
    }
    if unwritable {
        return;
    }
    if send.finish().is_ok() && draining {
        // Closing the endpoint would discard replies the backend has not acknowledged.
        let _ = tokio::time::timeout(REPLY_ACK_TIMEOUT, send.stopped()).await;
    }
}

/// Logs why a stream's reads ended with an error. A reset, or a loss with a request
/// half read (`partial` bytes buffered), drops that request, so it is logged at info;
/// a stream ending with its connection between requests is routine.
fn log_read_end(e: &std::io::Error, partial: usize) {
    if e.kind() == std::io::ErrorKind::ConnectionReset {
        info!(
            error = %e,
            partial_request_bytes = partial,
            "backend reset the stream; a request half sent is dropped"
        );
    } else if partial > 0 {
        info!(
            error = %e,
            partial_request_bytes = partial,
            "stream lost in the middle of a request; the request is dropped"
        );
    } else {
        debug!(error = %e, "stream read ended");
    }
}

fn reply(out: &mut BytesMut, id: u64, response: &Response) {
    if let Err(e) = codec::write_message(out, id, response) {
        warn!(call = id, error = %e, "cannot encode reply");
        let fallback: Response = Err(RpcError::Internal(format!("cannot encode reply: {e}")));
        let _ = codec::write_message(out, id, &fallback);
    }
}

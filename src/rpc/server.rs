//! Serving backend connections: one accept task per bound endpoint, one task per
//! connection, one task per stream. Each stream carries a sequence of calls; the
//! server answers them in order, one coalesced write per batch of calls read.
//!
//! Shutdown has two steps: `shutdown` stops accepting backends (calls keep being
//! answered while the clients drain); `drain` then has each stream answer every
//! call it has read, finish, and wait for the backend to have the replies, so
//! closing the endpoint afterwards loses no reply.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::FutureExt;
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

/// Answers the calls on one stream until the backend finishes it, or until
/// `drain`: then the calls already read are answered and the stream finished.
async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    dispatcher: Arc<Dispatcher>,
    max_request: usize,
    drain: Shutdown,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    // Bytes of an oversize request still to be skipped.
    let mut skip: u64 = 0;
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            _ = drain.cancelled() => {
                draining = true;
                // Every call that has arrived is answered: take what is buffered
                // without waiting for more.
                while let Some(Ok(n)) = recv.read_buf(&mut buf).now_or_never() {
                    if n == 0 {
                        break;
                    }
                }
            }
            r = recv.read_buf(&mut buf) => match r {
                Ok(0) => {
                    if !buf.is_empty() {
                        info!(
                            partial_request_bytes = buf.len(),
                            "stream finished in the middle of a request; the request is dropped"
                        );
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    log_read_end(&e, buf.len());
                    break;
                }
            },
        }
        loop {
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
                    // Framing is lost: nothing after this can be trusted.
                    warn!(error = %e, "stream out of step; closing it");
                    let _ = send.write_all(&out).await;
                    let _ = send.finish();
                    let _ = recv.stop(quinn::VarInt::from_u32(1));
                    return;
                }
            };
            if len > max_request as u64 {
                warn!(
                    call = id,
                    len,
                    max = max_request,
                    "request too large; refused"
                );
                reply(
                    &mut out,
                    id,
                    &Err(RpcError::RequestTooLarge {
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
            let request = codec::decode_payload::<Request>(&msg[codec::PREFIX_LEN..]);
            let response: Response = match request {
                Ok(req) => {
                    if matches!(req, Request::Broadcast { .. }) && !out.is_empty() {
                        // A broadcast may wait for room in the fan-out queues:
                        // send the replies already made first.
                        if send.write_all(&out).await.is_err() {
                            return;
                        }
                        out.clear();
                    }
                    dispatcher.dispatch(req).await
                }
                Err(e) => {
                    warn!(call = id, error = %e, "malformed request");
                    Err(RpcError::Malformed(e.to_string()))
                }
            };
            reply(&mut out, id, &response);
            if out.len() >= FLUSH_AT {
                if send.write_all(&out).await.is_err() {
                    return;
                }
                out.clear();
            }
        }
        if !out.is_empty() {
            if let Err(e) = send.write_all(&out).await {
                debug!(error = %e, "stream write failed");
                return;
            }
            out.clear();
        }
        if draining {
            if !buf.is_empty() {
                debug!(
                    bytes = buf.len(),
                    "shutting down: an incomplete call is left unanswered"
                );
            }
            let _ = recv.stop(crate::transport::quic::code::SHUTDOWN.into());
            break;
        }
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

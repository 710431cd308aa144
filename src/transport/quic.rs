//! Clients over QUIC: ALPN `quicpush/1`; the client opens one bidirectional stream
//! and the same goim frames flow on it both ways.

use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tracing::{debug, field, info_span, warn, Instrument};

use super::{ConnLimits, ConnPermits};
use crate::channel::Transport;
use crate::session::{self, SessionContext};

/// Application close codes on client QUIC connections.
pub mod code {
    /// The session ended normally.
    pub const DONE: u32 = 0;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 1;
    /// The client did not open its stream in time.
    pub const NO_STREAM: u32 = 2;
}

/// Accepts QUIC clients until shutdown.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    tracker: TaskTracker,
) {
    let shutdown = ctx.shutdown.clone();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let remote = incoming.remote_address();
        // Over the connection limit the handshake is refused before any work.
        let Ok(permit) = limits.total.clone().try_acquire_owned() else {
            warn!(%remote, "QUIC connection refused: connection limit reached");
            incoming.refuse();
            continue;
        };
        let Some(ip_permit) = limits.per_ip.try_acquire(remote.ip()) else {
            warn!(%remote, "QUIC connection refused: per-IP connection limit reached");
            incoming.refuse();
            continue;
        };
        let permits = ConnPermits {
            _total: permit,
            _ip: ip_permit,
        };
        let span = info_span!("conn", transport = "quic", remote = %remote, key = field::Empty);
        let ctx = ctx.clone();
        tracker.spawn(
            async move {
                let timeout = ctx.limits.handshake_timeout;
                // A peer that starts a handshake and goes quiet holds a permit only
                // this long (dropping the attempt closes it).
                let conn = match tokio::time::timeout(timeout, incoming).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        warn!(error = %e, "QUIC handshake failed");
                        return;
                    }
                    Err(_) => {
                        warn!(?timeout, "QUIC handshake not completed in time");
                        return;
                    }
                };
                let (send, recv) = match tokio::time::timeout(timeout, conn.accept_bi()).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(error = %e, "connection ended before opening a stream");
                        return;
                    }
                    Err(_) => {
                        warn!(?timeout, "connection closed: no stream opened in time");
                        conn.close(code::NO_STREAM.into(), b"no stream");
                        return;
                    }
                };
                let result = session::run(ctx, recv, send, Transport::Quic, None).await;
                super::log_end(&result);
                conn.close(code::DONE.into(), b"bye");
                drop(permits);
            }
            .instrument(span),
        );
    }
}

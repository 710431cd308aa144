//! Clients over QUIC: ALPN `quicpush/1`; the client opens one bidirectional stream
//! and the same goim frames flow on it both ways.
//!
//! # Migration and the per-IP count
//!
//! quinn migrates connections: when a client's address changes (a phone moving
//! from Wi-Fi to mobile data, a NAT rebinding), packets from the new address
//! carry on the same connection, and [`quinn::Connection::remote_address`] names
//! the current path. The per-IP connection count follows it: a connection counts
//! against the address it is reached at now, not the one it started from.
//! Otherwise a client that moved would keep charging its old address (refusing
//! its neighbours there), and connections opened from one address and moved to
//! another could pile up on the second beyond the limit.
//!
//! quinn does not tell the application about a migration, so the check rides on
//! the client's own traffic: the stream reader handed to the session
//! ([`FollowPath`]) compares the remote address with the permit's after every
//! read that returns data, and moves the permit when they differ. That costs no
//! timer and no wake-up, one look at the connection's address per read; and since
//! a live client must send a frame (at least a heartbeat) every
//! `client.heartbeat_timeout`, the count follows a move within that time. A
//! connection that moves to an address already at its limit is closed with
//! [`code::IP_LIMIT`], as a new connection from there would be refused.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::task::TaskTracker;
use tracing::{debug, field, info, info_span, warn, Instrument};

use super::{ConnLimits, IpPermit};
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
    /// The client moved to an address at its per-IP connection limit.
    pub const IP_LIMIT: u32 = 3;
}

/// A client's stream reader that keeps the connection's per-IP permit on the
/// address the connection is currently reached at (see the module docs).
#[derive(Debug)]
pub struct FollowPath {
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    permit: IpPermit,
}

impl FollowPath {
    /// Reads `recv`, moving `permit` as `conn` migrates.
    pub fn new(recv: quinn::RecvStream, conn: quinn::Connection, permit: IpPermit) -> Self {
        FollowPath { recv, conn, permit }
    }

    /// Moves the permit to the connection's current address, or closes the
    /// connection if that address has no room.
    fn follow(&mut self) -> io::Result<()> {
        let remote = self.conn.remote_address();
        let from = self.permit.ip();
        if remote.ip() == from {
            return Ok(());
        }
        if self.permit.move_to(remote.ip()) {
            info!(%from, to = %remote, "client moved: counted for its new address");
            return Ok(());
        }
        warn!(%from, to = %remote, "client moved to an address at its per-IP connection limit: closing");
        self.conn
            .close(code::IP_LIMIT.into(), b"per-IP connection limit");
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "moved to an address at its per-IP connection limit",
        ))
    }
}

impl AsyncRead for FollowPath {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.recv).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.follow()?;
        }
        read
    }
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
                let recv = FollowPath::new(recv, conn.clone(), ip_permit);
                let result = session::run(ctx, recv, send, Transport::Quic).await;
                super::log_end(&result);
                conn.close(code::DONE.into(), b"bye");
                drop(permit);
            }
            .instrument(span),
        );
    }
}

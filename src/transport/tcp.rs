//! goim v2 clients over TCP: the byte stream of frames. The accept loop here is
//! shared by every listener on TCP (plain, TLS, WebSocket and WebSocket over TLS).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{error, field, info_span, Instrument};

use super::{ConnLimits, ConnPermits};
use crate::channel::Transport;
use crate::metrics::HandshakeFailure;
use crate::session::{self, SessionContext};

/// Accepts TCP clients until shutdown.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    tracker: TaskTracker,
) {
    accept_loop(
        listener,
        ctx,
        limits,
        tracker,
        Transport::Tcp,
        |ctx, socket| async move {
            let (reader, writer) = socket.into_split();
            let metrics = ctx.metrics.clone();
            let result = session::run(ctx, reader, writer, Transport::Tcp, None).await;
            super::log_end(&metrics, &result);
        },
    )
    .await
}

/// Accepts connections until shutdown, each holding a permit of the connection
/// limit (taken before accept) and of its address's per-IP limit (taken right
/// after, before any byte is read), and runs `handle` for each in the tracker,
/// inside the connection's `conn` span.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    tracker: TaskTracker,
    transport: Transport,
    handle: F,
) where
    F: Fn(Arc<SessionContext>, TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let shutdown = ctx.shutdown.clone();
    loop {
        // The permit is taken before accept: over the limit, connections wait in
        // the kernel's backlog instead of costing a task and buffers.
        let permit = tokio::select! {
            p = limits.total.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (socket, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // e.g. out of file descriptors: back off instead of spinning
                    error!(error = %e, transport = transport.name(), "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Some(ip_permit) = limits.per_ip.try_acquire(remote.ip()) else {
            super::refused(super::Refusal::TcpPerIp, remote);
            drop(socket);
            continue;
        };
        let permits = ConnPermits::new(permit, ip_permit);
        let _ = socket.set_nodelay(true);
        let span = info_span!(
            "conn",
            transport = transport.name(),
            remote = %remote,
            key = field::Empty
        );
        let run = handle(ctx.clone(), socket);
        tracker.spawn(
            async move {
                run.await;
                drop(permits);
            }
            .instrument(span),
        );
    }
}

/// Runs `step` (a TLS handshake, a WebSocket upgrade) within
/// `client.handshake_timeout`; `None` (logged) when it failed, timed out, or the
/// server began shutting down first.
pub(crate) async fn within_handshake<T, E: std::fmt::Display>(
    ctx: &SessionContext,
    what: &'static str,
    step: impl Future<Output = Result<T, E>>,
) -> Option<T> {
    let timeout = ctx.limits.handshake_timeout;
    tokio::select! {
        r = tokio::time::timeout(timeout, step) => match r {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::info!(error = %e, "{what} failed");
                ctx.metrics.handshake_failed(HandshakeFailure::Transport);
                None
            }
            Err(_) => {
                tracing::info!(?timeout, "{what} not done within client.handshake_timeout");
                ctx.metrics.handshake_failed(HandshakeFailure::Transport);
                None
            }
        },
        _ = ctx.shutdown.cancelled() => None,
    }
}

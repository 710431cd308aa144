//! goim v2 clients over TCP: the byte stream of frames.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{error, field, info_span, Instrument};

use super::{ConnLimits, ConnPermits};
use crate::channel::Transport;
use crate::session::{self, SessionContext};

/// Accepts TCP clients until shutdown.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    tracker: TaskTracker,
) {
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
                    error!(error = %e, "TCP accept failed");
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
        let span = info_span!("conn", transport = "tcp", remote = %remote, key = field::Empty);
        let ctx = ctx.clone();
        tracker.spawn(
            async move {
                let (reader, writer) = socket.into_split();
                let metrics = ctx.metrics.clone();
                let result = session::run(ctx, reader, writer, Transport::Tcp, None).await;
                super::log_end(&metrics, &result);
                drop(permits);
            }
            .instrument(span),
        );
    }
}

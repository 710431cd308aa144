//! goim v2 clients over TLS over TCP (`client.tls_bind`): the same byte stream of
//! frames as [`super::tcp`], inside TLS with the server certificate from
//! `tls.dir` and no client certificate. The TLS handshake must finish within
//! `client.handshake_timeout` (then Auth within another).

use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use super::tcp::{accept_loop, within_handshake};
use super::ConnLimits;
use crate::channel::Transport;
use crate::session::{self, SessionContext, SessionWrite};

/// A server-side TLS stream over a client's TCP connection.
pub type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

impl SessionWrite for tokio::io::WriteHalf<ServerTls> {
    const LINGER: bool = true;

    fn write_batch(
        &mut self,
        out: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send {
        session::write_stream(self, out)
    }

    async fn finish(&mut self) {
        // close_notify, then the TCP FIN
        let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
    }
}

/// Accepts TLS clients until shutdown.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    tracker: TaskTracker,
    acceptor: TlsAcceptor,
) {
    accept_loop(
        listener,
        ctx,
        limits,
        tracker,
        Transport::Tls,
        move |ctx, socket| {
            let acceptor = acceptor.clone();
            async move {
                let Some(stream) =
                    within_handshake(&ctx, "TLS handshake", acceptor.accept(socket)).await
                else {
                    return;
                };
                let (reader, writer) = tokio::io::split(stream);
                let metrics = ctx.metrics.clone();
                let result = session::run(ctx, reader, writer, Transport::Tls, None).await;
                super::log_end(&metrics, &result);
            }
        },
    )
    .await
}

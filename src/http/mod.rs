//! One HTTP/1.1 listener (`http.bind`, goim-logic's port 3111) for goim-logic's
//! push API ([`api`]) and `GET /metrics`.
//!
//! Every route builds the same [`Request`](crate::rpc::Request) the QUIC RPC
//! carries and calls the same [`Dispatcher`]: there is no second push path.
//!
//! Replies are goim-logic's JSON, `{"code": 0, "message": "", "data": ...}`, with
//! HTTP 200 for a refused call too (code -400 for a bad request, -500 for a server
//! error), as goim-logic answers; other statuses only where HTTP itself has one:
//! 401 (no or a wrong bearer token, with `WWW-Authenticate: Bearer`), 404 (unknown
//! route), 405 (wrong method), 413 (body over `http.max_body_bytes`) and 414
//! (query over `http.max_query_bytes`), each with the same JSON shape.
//!
//! Every request, `/metrics` included, needs `Authorization: Bearer <token>` (the
//! token in `http.api_token_file`), unless `http.require_token = false`, which
//! the configuration allows on loopback addresses only. Each request may take
//! `http.timeout`, reading its body included; at most `http.max_connections`
//! connections are served at once.
//!
//! Shutdown: the listener stops accepting with the server's shutdown signal, and
//! the requests in flight are answered before the server goes on.

pub mod api;
pub mod client;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, warn};

use crate::metrics::Snapshot;
use crate::rpc::dispatch::Dispatcher;
use crate::shutdown::Shutdown;
use crate::transport::ConnLimits;

/// goim-logic's codes.
pub const OK: i32 = 0;
pub const REQUEST_ERR: i32 = -400;
pub const UNAUTHORIZED: i32 = -401;
pub const NOT_FOUND: i32 = -404;
pub const METHOD_NOT_ALLOWED: i32 = -405;
pub const SERVER_ERR: i32 = -500;

/// What every request shares.
#[derive(Debug)]
pub struct HttpState {
    pub dispatcher: Arc<Dispatcher>,
    /// The client connection limits: their per-IP count is `ip_count`.
    pub conn_limits: ConnLimits,
    /// The bearer token every request needs; `None`: none needed.
    pub token: Option<String>,
    pub max_body: usize,
    pub max_query: usize,
    pub timeout: Duration,
}

/// goim-logic's reply body.
#[derive(Debug, Serialize)]
pub struct Body<T: Serialize> {
    pub code: i32,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
}

/// A JSON reply with `status`.
pub fn reply<T: Serialize>(
    status: StatusCode,
    code: i32,
    message: String,
    data: Option<T>,
) -> Response {
    let body = serde_json::to_vec(&Body {
        code,
        message,
        data,
    })
    .unwrap_or_else(|e| {
        format!("{{\"code\":{SERVER_ERR},\"message\":\"cannot encode the reply: {e}\"}}")
            .into_bytes()
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A refused request: its status (200 for goim's -400/-500), code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: i32,
    pub message: String,
}

impl ApiError {
    /// A bad request: HTTP 200, code -400.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::OK,
            code: REQUEST_ERR,
            message: message.into(),
        }
    }

    /// A server error: HTTP 200, code -500.
    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::OK,
            code: SERVER_ERR,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = reply::<()>(self.status, self.code, self.message, None);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The router over `state`.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/goim/push/keys", post(api::push_keys))
        .route("/goim/push/mids", post(api::push_mids))
        .route("/goim/push/room", post(api::push_room))
        .route("/goim/push/all", post(api::push_all))
        .route("/goim/online/top", get(api::online_top))
        .route("/goim/online/room", get(api::online_room))
        .route("/goim/online/total", get(api::online_total))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: NOT_FOUND,
        message: format!("no route {}", req.uri().path()),
    }
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: METHOD_NOT_ALLOWED,
        message: format!("{} does not take {}", req.uri().path(), req.method()),
    }
}

/// Whether two tokens are equal, in time that depends on their lengths only.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the bearer token, if one is needed.
fn authorize(state: &HttpState, req: &Request) -> Result<(), ApiError> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let refuse = |message: &str| ApiError {
        status: StatusCode::UNAUTHORIZED,
        code: UNAUTHORIZED,
        message: message.to_owned(),
    };
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Err(refuse(
            "missing bearer token: send Authorization: Bearer <the token in http.api_token_file>",
        ));
    };
    let given = value
        .as_bytes()
        .strip_prefix(b"Bearer ")
        .ok_or_else(|| refuse("the Authorization header is not a bearer token (Bearer <token>)"))?;
    if !same_token(given.trim_ascii(), token.as_bytes()) {
        return Err(refuse("wrong bearer token"));
    }
    Ok(())
}

/// Token, query length and the per-request timeout, before every route.
async fn guard(State(state): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    if let Err(e) = authorize(&state, &req) {
        debug!(path = req.uri().path(), reason = %e.message, "HTTP request refused");
        return e.into_response();
    }
    let query = req.uri().query().map_or(0, str::len);
    if query > state.max_query {
        return ApiError {
            status: StatusCode::URI_TOO_LONG,
            code: REQUEST_ERR,
            message: format!(
                "query of {query} bytes exceeds http.max_query_bytes of {}",
                state.max_query
            ),
        }
        .into_response();
    }
    let path = req.uri().path().to_owned();
    match tokio::time::timeout(state.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            warn!(%path, timeout = ?state.timeout, "HTTP request timed out");
            ApiError::server(format!(
                "{path} took longer than http.timeout of {:?}",
                state.timeout
            ))
            .into_response()
        }
    }
}

/// `GET /metrics`: the Prometheus text, or 404 when metrics are off.
async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let d = &state.dispatcher;
    let snap = Snapshot {
        online: d.registry.online(),
        rooms: d.registry.room_count() as u64,
        history: d
            .registry
            .history()
            .map(|h| h.store().stats())
            .unwrap_or_default(),
        paced_running: d.broadcaster.paced_running() as u64,
    };
    match d.metrics.encode(&snap) {
        Some(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        None => ApiError {
            status: StatusCode::NOT_FOUND,
            code: NOT_FOUND,
            message: "metrics are off (metrics.enabled = false)".into(),
        }
        .into_response(),
    }
}

/// A TCP listener that serves at most `permits` connections at once: the
/// permit is taken before accept, so more wait in the kernel's backlog.
struct Limited {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

/// An accepted connection holding its permit.
struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for Limited {
    type Io = LimitedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let permit = match self.permits.clone().acquire_owned().await {
                Ok(p) => p,
                // never closed; wait for the shutdown to drop this listener
                Err(_) => std::future::pending().await,
            };
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        LimitedStream {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    // e.g. out of file descriptors: back off instead of spinning
                    error!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Serves `listener` until `shutdown`, then answers the requests in flight.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    max_connections: usize,
    shutdown: Shutdown,
) {
    let listener = Limited {
        listener,
        permits: Arc::new(Semaphore::new(max_connections)),
    };
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
    {
        error!(error = %e, "HTTP listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"a"));
    }
}

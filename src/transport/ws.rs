//! goim clients over WebSocket (`client.ws_bind`, and over TLS `client.wss_bind`),
//! as goim's comet serves them: the HTTP upgrade on `/sub`, then goim v2 frames in
//! binary messages.
//!
//! An adapter only: after the upgrade the connection is a reader and a writer
//! handed to [`session::run`], like a TCP socket.
//!
//! - **Upgrade.** Taken like a TCP connection (the connection limit before
//!   accept, the per-IP limit right after), then the TLS handshake (wss) and the
//!   HTTP upgrade must both finish within `client.handshake_timeout`; Auth then
//!   has another. A path other than `/sub` gets 404. With
//!   `client.ws_allowed_origins` set, an `Origin` header not in the list (an exact,
//!   ASCII-case-insensitive match on `scheme://host[:port]`) gets 403; a request
//!   without one (not a browser) is let in.
//! - **Reading** ([`WsReader`]): the client's binary messages, back to back, as a
//!   byte stream of frames. A message is at most `client.max_body` + 16 bytes
//!   (one frame of the largest body, or a Raw frame of that size, as TCP's frame
//!   decoder allows); tungstenite refuses a larger one from its header, before
//!   buffering it, and the connection is closed (1009). A text message closes
//!   it (1003). Ping and pong are tungstenite's; a close frame is a clean end.
//! - **Writing** ([`WsWriter`]): goim's web client reads one frame per message,
//!   or a Raw frame (op 9) whose body is several complete frames. The session's
//!   writer hands over everything queued at a wake-up in one buffer; it is split
//!   at frame boundaries ([`messages`]): consecutive pushes go out as one Raw
//!   message of at most [`RAW_MAX`] bytes (a single push as itself), and every
//!   reply (AuthReply, HeartbeatReply, DisconnectReply, ...) as a message of its
//!   own, since goim's JS client treats each frame inside a Raw as a push.
//!   Frames with the resume extension (headerLen 32) pass unchanged.
//!   [`SessionWrite::finish`] sends a close frame.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::TaskTracker;

use super::tcp::{accept_loop, within_handshake};
use super::ConnLimits;
use crate::channel::Transport;
use crate::protocol::{self, op, HEADER_LEN};
use crate::session::{self, SessionContext, SessionWrite};

/// The HTTP path of the upgrade, as goim's comet.
pub const PATH: &str = "/sub";

/// Largest Raw message the writer builds (its 16-byte header included): pushes
/// queued together are sent as one Raw frame up to this size, then another. A
/// single frame larger than this is sent as itself.
pub const RAW_MAX: usize = 32 * 1024;

/// How long `finish` waits for the close frame to be taken.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a WebSocket listener checks during the upgrade.
#[derive(Debug, Clone)]
pub struct WsOptions {
    /// `client.ws_allowed_origins`; empty: any origin.
    pub allowed_origins: Arc<[String]>,
    /// The largest message a client may send: `client.max_body` + 16.
    pub max_message: usize,
}

impl WsOptions {
    pub fn new(allowed_origins: &[String], max_body: usize) -> Self {
        WsOptions {
            allowed_origins: allowed_origins.into(),
            max_message: max_body + HEADER_LEN,
        }
    }

    /// tungstenite's settings: small read buffers (most clients are idle), the
    /// message cap, and a write buffer that holds one wake-up's messages.
    pub fn config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(64 * 1024)
            .max_message_size(Some(self.max_message))
            .max_frame_size(Some(self.max_message))
    }

    /// Whether an upgrade with this `Origin` header (if any) is allowed.
    pub fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            _ if self.allowed_origins.is_empty() => true,
            None => true,
            Some(o) => self
                .allowed_origins
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(o)),
        }
    }

    /// The upgrade's check: 404 off `/sub`, 403 for an origin not allowed.
    // The shape of tungstenite's `Callback`, large error and all.
    #[allow(clippy::result_large_err)]
    fn check(&self, req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
        let refuse = |status: StatusCode, why: &str| {
            let mut r = ErrorResponse::new(Some(why.to_owned()));
            *r.status_mut() = status;
            r
        };
        if req.uri().path() != PATH {
            tracing::debug!(
                path = req.uri().path(),
                "WebSocket upgrade refused: not /sub"
            );
            return Err(refuse(StatusCode::NOT_FOUND, "not found"));
        }
        let origin = req.headers().get("origin").map(|v| v.as_bytes());
        if !self.origin_allowed(origin) {
            let origin = origin.map(String::from_utf8_lossy);
            tracing::debug!(?origin, "WebSocket upgrade refused: origin not allowed");
            return Err(refuse(StatusCode::FORBIDDEN, "origin not allowed"));
        }
        Ok(resp)
    }
}

/// Accepts WebSocket clients until shutdown; over TLS with `tls`.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    tracker: TaskTracker,
    opts: WsOptions,
    tls: Option<TlsAcceptor>,
) {
    let transport = if tls.is_some() {
        Transport::Wss
    } else {
        Transport::Ws
    };
    accept_loop(
        listener,
        ctx,
        limits,
        tracker,
        transport,
        move |ctx, socket| {
            let opts = opts.clone();
            let tls = tls.clone();
            async move {
                match tls {
                    None => {
                        let up = upgrade(socket, &opts);
                        if let Some(ws) = within_handshake(&ctx, "WebSocket upgrade", up).await {
                            run(ctx, ws, Transport::Ws).await;
                        }
                    }
                    Some(acceptor) => {
                        let up = async {
                            let stream = acceptor.accept(socket).await.map_err(WsError::Io)?;
                            upgrade(stream, &opts).await
                        };
                        let what = "TLS handshake and WebSocket upgrade";
                        if let Some(ws) = within_handshake(&ctx, what, up).await {
                            run(ctx, ws, Transport::Wss).await;
                        }
                    }
                }
            }
        },
    )
    .await
}

/// The HTTP upgrade, checked by [`WsOptions::check`].
async fn upgrade<S>(stream: S, opts: &WsOptions) -> Result<WebSocketStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| opts.check(req, resp);
    tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(opts.config())).await
}

/// Runs the session over an upgraded connection.
async fn run<S>(ctx: Arc<SessionContext>, ws: WebSocketStream<S>, transport: Transport)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, writer) = split(ws);
    let metrics = ctx.metrics.clone();
    let result = session::run(ctx, reader, writer, transport, None).await;
    super::log_end(&metrics, &result);
}

/// Splits an upgraded connection into the session's reader and writer.
pub fn split<S>(ws: WebSocketStream<S>) -> (WsReader<S>, WsWriter<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (sink, stream) = ws.split();
    let close = Arc::new(Mutex::new(None));
    (
        WsReader {
            stream,
            chunk: Bytes::new(),
            close: close.clone(),
        },
        WsWriter { sink, close },
    )
}

/// The client's binary messages as one byte stream.
pub struct WsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    /// What is left of the message being read.
    chunk: Bytes,
    /// The close frame the writer ends with, when reading failed for a reason
    /// the client should hear.
    close: Arc<Mutex<Option<CloseFrame>>>,
}

impl<S> WsReader<S> {
    fn fail(&self, code: CloseCode, why: &'static str) -> io::Error {
        *self.close.lock() = Some(CloseFrame {
            code,
            reason: why.into(),
        });
        io::Error::new(io::ErrorKind::InvalidData, why)
    }
}

/// Moves as much of a received message's remaining bytes into `buf` as fit;
/// false when nothing was left (the next message is needed). Both ends' readers
/// (this server's and [`crate::client`]'s) turn messages into a byte stream so.
pub(crate) fn copy_chunk(chunk: &mut Bytes, buf: &mut ReadBuf<'_>) -> bool {
    if chunk.is_empty() {
        return false;
    }
    let n = chunk.len().min(buf.remaining());
    buf.put_slice(&chunk[..n]);
    chunk.advance(n);
    true
}

impl<S> AsyncRead for WsReader<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if copy_chunk(&mut this.chunk, buf) {
                return Poll::Ready(Ok(()));
            }
            let msg = ready!(this.stream.poll_next_unpin(cx));
            return Poll::Ready(match msg {
                Some(Ok(Message::Binary(b))) => {
                    this.chunk = b;
                    continue;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Text(_))) => Err(this.fail(
                    CloseCode::Unsupported,
                    "a text message: goim frames travel in binary messages",
                )),
                // a close frame, or the connection gone after one: a clean end
                None
                | Some(Ok(Message::Close(_)))
                | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => Ok(()),
                Some(Err(WsError::Capacity(e))) => {
                    tracing::debug!(error = %e, "WebSocket message over the limit");
                    Err(this.fail(
                        CloseCode::Size,
                        "a message larger than client.max_body allows",
                    ))
                }
                Some(Err(WsError::Io(e))) => Err(e),
                Some(Err(e)) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            });
        }
    }
}

/// The session's writer over a WebSocket: one message per frame, or per Raw
/// batch of pushes ([`messages`]).
pub struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    close: Arc<Mutex<Option<CloseFrame>>>,
}

fn ws_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S> SessionWrite for WsWriter<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// As TCP: the connection is a TCP socket underneath.
    const LINGER: bool = true;

    async fn write_batch(&mut self, out: &[u8]) -> io::Result<()> {
        let msgs = messages(out, RAW_MAX)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        for m in msgs {
            self.sink.feed(Message::Binary(m)).await.map_err(ws_io)?;
        }
        self.sink.flush().await.map_err(ws_io)
    }

    async fn finish(&mut self) {
        let frame = self.close.lock().take().unwrap_or(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        });
        let close = self.sink.send(Message::Close(Some(frame)));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

/// Why [`messages`] could not split a buffer (never for the session's own
/// buffers, which hold whole frames only).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a partial frame at byte {0} of the writer's buffer")]
pub struct PartialFrame(pub usize);

/// Splits whole frames, back to back, into WebSocket messages: each reply (and
/// any Raw frame) alone; consecutive pushes as one Raw frame (op 9, ver 1,
/// seq 0, body = the frames as they are) of at most `raw_max` bytes, or as
/// itself when it is alone or too large to share one.
pub fn messages(out: &[u8], raw_max: usize) -> Result<Vec<Bytes>, PartialFrame> {
    let mut msgs = Vec::new();
    // the pushes gathered for the next Raw message: out[run.0..run.1], run.2 frames
    let mut run = (0usize, 0usize, 0usize);
    let flush = |msgs: &mut Vec<Bytes>, (start, end, n): (usize, usize, usize)| match n {
        0 => {}
        1 => msgs.push(Bytes::copy_from_slice(&out[start..end])),
        _ => {
            let body = &out[start..end];
            let mut b = BytesMut::with_capacity(HEADER_LEN + body.len());
            protocol::put_header(&mut b, body.len(), protocol::VERSION, op::RAW, 0);
            b.extend_from_slice(body);
            msgs.push(b.freeze());
        }
    };
    let mut pos = 0;
    while pos < out.len() {
        let rest = &out[pos..];
        if rest.len() < HEADER_LEN {
            return Err(PartialFrame(pos));
        }
        let pack_len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if pack_len < HEADER_LEN || pack_len > rest.len() {
            return Err(PartialFrame(pos));
        }
        let frame_op = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
        let end = pos + pack_len;
        if op::is_reply(frame_op) || frame_op == op::RAW {
            flush(&mut msgs, run);
            msgs.push(Bytes::copy_from_slice(&out[pos..end]));
            run = (end, end, 0);
        } else {
            if run.2 > 0 && HEADER_LEN + (end - run.0) > raw_max {
                flush(&mut msgs, run);
                run = (pos, pos, 0);
            }
            run = (run.0, end, run.2 + 1);
        }
        pos = end;
    }
    flush(&mut msgs, run);
    Ok(msgs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Frame, PushMeta, Source};

    fn push(body: &str) -> Bytes {
        Frame::new(1000, 0, body.as_bytes().to_vec()).to_bytes()
    }

    fn cat(frames: &[Bytes]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.to_vec()).collect()
    }

    fn decode_all(b: &[u8]) -> Vec<Frame> {
        let mut buf = BytesMut::from(b);
        let mut v = Vec::new();
        while let Some((f, _)) = protocol::decode_server(&mut buf, 1 << 20).unwrap() {
            v.push(f);
        }
        assert!(buf.is_empty());
        v
    }

    #[test]
    fn one_push_is_sent_as_itself() {
        let p = push("a");
        assert_eq!(messages(&p, RAW_MAX).unwrap(), vec![p]);
    }

    #[test]
    fn pushes_go_in_raw_batches_and_replies_alone() {
        let reply = Frame::new(op::HEARTBEAT_REPLY, 3, vec![0, 0, 0, 1]).to_bytes();
        let frames = [
            push("a"),
            push("b"),
            reply.clone(),
            push("c"),
            push("d"),
            push("e"),
        ];
        let msgs = messages(&cat(&frames), RAW_MAX).unwrap();
        assert_eq!(msgs.len(), 3);
        let raw = decode_all(&msgs[0]);
        assert_eq!((raw.len(), raw[0].op, raw[0].seq), (1, op::RAW, 0));
        assert_eq!(&raw[0].body[..], &cat(&frames[..2])[..]);
        assert_eq!(msgs[1], reply);
        let raw = decode_all(&msgs[2]);
        assert_eq!(&raw[0].body[..], &cat(&frames[3..])[..]);
    }

    #[test]
    fn raw_batches_stay_under_the_cap_and_keep_every_frame_in_order() {
        let frames: Vec<Bytes> = (0..100).map(|i| push(&format!("{i:0100}"))).collect();
        let all = cat(&frames);
        let msgs = messages(&all, 1024).unwrap();
        assert!(msgs.len() > 1);
        let mut back = Vec::new();
        for m in &msgs {
            assert!(m.len() <= 1024, "{}", m.len());
            let f = decode_all(m);
            assert_eq!(f.len(), 1, "one frame per message");
            assert_eq!(f[0].op, op::RAW);
            back.extend_from_slice(&f[0].body);
        }
        assert_eq!(back, all);
        // a frame larger than the cap goes as itself, between batches
        let big = push(&"x".repeat(2000));
        let mixed = cat(&[push("a"), push("b"), big.clone(), push("c")]);
        let msgs = messages(&mixed, 1024).unwrap();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[1], big);
        assert_eq!(msgs[2], push("c"));
    }

    #[test]
    fn frames_with_the_resume_extension_pass_unchanged() {
        let meta = PushMeta {
            source: Source::Key,
            epoch: 7,
            offset: 9,
        };
        let mut b = BytesMut::new();
        protocol::put_with_ext(&mut b, &push("a"), 1, meta);
        protocol::put_with_ext(&mut b, &push("b"), 2, meta);
        let msgs = messages(&b, RAW_MAX).unwrap();
        assert_eq!(msgs.len(), 1);
        let raw = decode_all(&msgs[0]);
        assert_eq!(&raw[0].body[..], &b[..]);
        let mut inner = BytesMut::from(&raw[0].body[..]);
        let (f, m) = protocol::decode_server(&mut inner, 4096).unwrap().unwrap();
        assert_eq!((f.seq, m), (1, Some(meta)));
    }

    #[test]
    fn a_partial_frame_is_an_error_not_a_panic() {
        let p = push("abc");
        assert_eq!(messages(&p[..10], RAW_MAX), Err(PartialFrame(0)));
        let mut two = p.to_vec();
        two.extend_from_slice(&p[..p.len() - 1]);
        assert_eq!(messages(&two, RAW_MAX), Err(PartialFrame(p.len())));
        let mut short = p.to_vec();
        short[..4].copy_from_slice(&3u32.to_be_bytes());
        assert!(messages(&short, RAW_MAX).is_err());
        assert_eq!(messages(&[], RAW_MAX), Ok(vec![]));
    }

    #[test]
    fn origins_match_exactly_and_a_missing_one_is_allowed() {
        let any = WsOptions::new(&[], 4096);
        assert!(any.origin_allowed(Some(b"https://evil.example")));
        let o = WsOptions::new(&["https://app.example.com".to_owned()], 4096);
        assert!(o.origin_allowed(None));
        assert!(o.origin_allowed(Some(b"https://app.example.com")));
        assert!(o.origin_allowed(Some(b"HTTPS://APP.example.com")));
        assert!(!o.origin_allowed(Some(b"http://app.example.com")));
        assert!(!o.origin_allowed(Some(b"https://app.example.com:444")));
        assert!(!o.origin_allowed(Some(b"https://app.example.com.evil")));
        assert!(!o.origin_allowed(Some(b"null")));
    }
}

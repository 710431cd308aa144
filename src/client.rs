//! A goim v2 client over TCP, TLS, WebSocket (ws/wss) or QUIC: what the examples,
//! the integration tests and load tools use to play a device.
//!
//! Over WebSocket ([`PushClient::connect_ws`]) each frame the client sends is one
//! binary message, and each message the server sends must hold exactly one frame
//! or one Raw frame (op 9) of complete frames: anything else is an error
//! ([`PushClientError::Io`], `InvalidData`). Raw frames are split, so the caller
//! sees the frames inside one by one; [`WsStats`] counts what arrived how.
//!
//! [`PushClient`] is one connection. [`ResumeState`] is what a resuming client
//! keeps between connections (its key and last position per source), and
//! [`ResumingClient`] reconnects with backoff and jitter and resumes, so a caller
//! sees one unbroken stream of pushes: each once, in per-source order.
//!
//! Over QUIC, [`PushClient::connect_quic_0rtt`] sends Auth as 0-RTT data when the
//! [`quinn::ClientConfig`] holds a session ticket from an earlier connection (reuse
//! one config, or clones of it): the server answers with AuthReply and the replay
//! before the handshake ends, so the first missed push arrives one round trip
//! after the client started. [`ResumingClient`] does this on every QUIC reconnect.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{self, op, Frame, FrameError, PushMeta, Source, MAX_BODY_LIMIT};
use crate::resume::{Positions, ResumeReply, ResumeRequest};
use crate::tls::{self, TlsError};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PushClientError {
    /// Connecting, reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The QUIC connection could not be set up.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The CA certificate could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The server sent something that is not a frame.
    #[error("bad frame from server: {0}")]
    Frame(#[from] FrameError),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// The server answered Auth with something else.
    #[error("expected AuthReply (8), got op {0}")]
    AuthRefused(u32),
    /// Connecting and authenticating took longer than allowed.
    #[error("no AuthReply within {0:?} of connecting")]
    ConnectTimeout(std::time::Duration),
    /// The resume answer in AuthReply is not the expected JSON.
    #[error("bad resume reply: {0}")]
    BadResumeReply(String),
    /// The server answered the WebSocket upgrade with this HTTP status.
    #[error("WebSocket upgrade refused: HTTP {0}")]
    WsRefused(u16),
    /// The WebSocket handshake failed otherwise.
    #[error("WebSocket: {0}")]
    WebSocket(String),
}

/// The read half of a client connection.
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a client connection.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;
/// A QUIC client's connection and endpoint, kept alive with its stream.
pub type QuicParts = (quinn::Connection, quinn::Endpoint);

/// What a 0-RTT connection attempt came to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZeroRtt {
    /// The client config held a ticket for the server: Auth went out as 0-RTT data.
    pub attempted: bool,
    /// The server accepted the 0-RTT data. After an attempt, `false` means the
    /// server rejected it and the client sent Auth again once the handshake was done.
    pub accepted: bool,
}

fn quic_err(e: impl std::fmt::Display) -> PushClientError {
    PushClientError::Quic(e.to_string())
}

/// Opens the client's stream and writes `first` on it.
async fn open_and_send(
    conn: &quinn::Connection,
    first: &[u8],
) -> Result<(quinn::SendStream, quinn::RecvStream), PushClientError> {
    let (mut send, recv) = conn.open_bi().await.map_err(quic_err)?;
    send.write_all(first).await.map_err(quic_err)?;
    Ok((send, recv))
}

/// One client connection.
pub struct PushClient {
    reader: Reader,
    writer: Writer,
    buf: BytesMut,
    seq: u32,
    quic: Option<QuicParts>,
    ws: Option<Arc<WsStats>>,
}

impl std::fmt::Debug for PushClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushClient")
            .field("quic", &self.quic.is_some())
            .finish()
    }
}

impl PushClient {
    /// Connects over TCP.
    pub async fn connect_tcp(addr: SocketAddr) -> Result<PushClient, PushClientError> {
        let socket = tokio::net::TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let (r, w) = socket.into_split();
        Ok(Self::from_parts(Box::new(r), Box::new(w), None))
    }

    /// Connects over QUIC, trusting the CA in `ca_path`.
    pub async fn connect_quic(
        addr: SocketAddr,
        server_name: &str,
        ca_path: &Path,
    ) -> Result<PushClient, PushClientError> {
        let config = tls::quic_client_config(ca_path)?;
        Self::connect_quic_with(addr, server_name, config).await
    }

    /// Connects over QUIC with a ready configuration.
    pub async fn connect_quic_with(
        addr: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> Result<PushClient, PushClientError> {
        Self::connect_quic_on(tls::client_endpoint(addr)?, addr, server_name, config).await
    }

    /// Connects over QUIC from a ready endpoint (e.g. one whose socket simulates
    /// a network, see [`crate::netsim`]) with a ready configuration.
    pub async fn connect_quic_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> Result<PushClient, PushClientError> {
        let conn = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| PushClientError::Quic(e.to_string()))?
            .await
            .map_err(|e| PushClientError::Quic(e.to_string()))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| PushClientError::Quic(e.to_string()))?;
        Ok(Self::from_parts(
            Box::new(recv),
            Box::new(send),
            Some((conn, endpoint)),
        ))
    }

    /// A client over any reader and writer.
    pub fn from_parts(reader: Reader, writer: Writer, quic: Option<QuicParts>) -> PushClient {
        PushClient {
            reader,
            writer,
            buf: BytesMut::with_capacity(8192),
            seq: 0,
            quic,
            ws: None,
        }
    }

    /// Connects over TLS over TCP (`client.tls_bind`), trusting the CA in `ca_path`.
    pub async fn connect_tls(
        addr: SocketAddr,
        server_name: &str,
        ca_path: &Path,
    ) -> Result<PushClient, PushClientError> {
        let config = tls::tcp_client_config(ca_path, &[])?;
        let stream = tls_connect(addr, server_name, config).await?;
        let (r, w) = tokio::io::split(stream);
        Ok(Self::from_parts(Box::new(r), Box::new(w), None))
    }

    /// Connects over WebSocket to `ws://addr/sub`.
    pub async fn connect_ws(addr: SocketAddr) -> Result<PushClient, PushClientError> {
        Self::connect_ws_with(addr, crate::transport::ws::PATH, None).await
    }

    /// Connects over WebSocket to `path`, sending `origin` as the `Origin` header
    /// when given (as a browser does).
    pub async fn connect_ws_with(
        addr: SocketAddr,
        path: &str,
        origin: Option<&str>,
    ) -> Result<PushClient, PushClientError> {
        let socket = tokio::net::TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let url = format!("ws://{addr}{path}");
        Self::ws_over(socket, &url, origin).await
    }

    /// Connects over WebSocket over TLS to `wss://addr/sub`, trusting the CA in
    /// `ca_path`.
    pub async fn connect_wss(
        addr: SocketAddr,
        server_name: &str,
        ca_path: &Path,
    ) -> Result<PushClient, PushClientError> {
        let config = tls::tcp_client_config(ca_path, &[tls::WSS_ALPN])?;
        let stream = tls_connect(addr, server_name, config).await?;
        let url = format!(
            "wss://{server_name}:{}{}",
            addr.port(),
            crate::transport::ws::PATH
        );
        Self::ws_over(stream, &url, None).await
    }

    /// The WebSocket handshake for `url` over a connected stream.
    pub async fn ws_over<S>(
        stream: S,
        url: &str,
        origin: Option<&str>,
    ) -> Result<PushClient, PushClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Error as WsError;
        let mut req = url
            .into_client_request()
            .map_err(|e| PushClientError::WebSocket(e.to_string()))?;
        if let Some(o) = origin {
            let v = o
                .parse()
                .map_err(|_| PushClientError::WebSocket(format!("bad origin {o:?}")))?;
            req.headers_mut().insert("origin", v);
        }
        let (ws, _) = tokio_tungstenite::client_async(req, stream)
            .await
            .map_err(|e| match e {
                WsError::Http(resp) => PushClientError::WsRefused(resp.status().as_u16()),
                WsError::Io(e) => PushClientError::Io(e),
                e => PushClientError::WebSocket(e.to_string()),
            })?;
        let stats = Arc::new(WsStats::default());
        let (sink, stream) = futures_util::StreamExt::split(ws);
        let reader = ws_client::MessageReader {
            stream,
            chunk: Bytes::new(),
            stats: stats.clone(),
        };
        let writer = ws_client::MessageWriter {
            sink,
            pending: BytesMut::new(),
        };
        let mut c = Self::from_parts(Box::new(reader), Box::new(writer), None);
        c.ws = Some(stats);
        Ok(c)
    }

    /// What arrived in which WebSocket messages, on a WebSocket connection.
    pub fn ws_stats(&self) -> Option<&WsStats> {
        self.ws.as_deref()
    }

    /// Connects over QUIC from `endpoint` and sends Auth with `auth_body` (seq 1) as
    /// early as it can: as 0-RTT data when `config` holds a ticket for
    /// `server_name` from an earlier connection made with it, else once the
    /// handshake completes. If the server rejects the 0-RTT data (it discards it),
    /// the stream is opened again and Auth sent again, so the caller gets a working
    /// connection either way.
    ///
    /// Returns once the handshake is done and Auth is sent; the server's AuthReply
    /// (with, for a resume request, the replay behind it) is read as usual, e.g.
    /// with [`PushClient::resume_reply`].
    pub async fn connect_quic_0rtt(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
        auth_body: impl Into<Bytes>,
    ) -> Result<(PushClient, ZeroRtt), PushClientError> {
        let auth = Frame::new(op::AUTH, 1, auth_body).to_bytes();
        let connecting = endpoint
            .connect_with(config, addr, server_name)
            .map_err(quic_err)?;
        let (conn, (send, recv), zero_rtt) = match connecting.into_0rtt() {
            Ok((conn, accepted)) => {
                // The stream and Auth leave with the ClientHello.
                let (early, accepted) = tokio::join!(open_and_send(&conn, &auth), accepted);
                if let Some(e) = conn.close_reason() {
                    return Err(quic_err(e));
                }
                let stream = match (accepted, early) {
                    (true, early) => early?,
                    // Rejected: the server never saw that stream; open it again.
                    (false, early) => {
                        drop(early);
                        open_and_send(&conn, &auth).await?
                    }
                };
                let z = ZeroRtt {
                    attempted: true,
                    accepted,
                };
                (conn, stream, z)
            }
            Err(connecting) => {
                let conn = connecting.await.map_err(quic_err)?;
                let stream = open_and_send(&conn, &auth).await?;
                (conn, stream, ZeroRtt::default())
            }
        };
        let mut c = Self::from_parts(
            Box::new(recv),
            Box::new(send),
            Some((conn, endpoint.clone())),
        );
        c.seq = 1;
        Ok((c, zero_rtt))
    }

    /// Sends a frame with the next seq; returns that seq.
    pub async fn send(&mut self, op: u32, body: impl Into<Bytes>) -> Result<u32, PushClientError> {
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(op, self.seq, body);
        self.send_raw(&frame.to_bytes()).await?;
        Ok(self.seq)
    }

    /// Writes bytes as they are (for sending malformed input in tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), PushClientError> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Sends Auth with `token` and waits for AuthReply.
    pub async fn auth(&mut self, token: impl Into<Bytes>) -> Result<(), PushClientError> {
        self.send(op::AUTH, token).await?;
        match self.next_frame().await? {
            Some(f) if f.op == op::AUTH_REPLY => Ok(()),
            Some(f) => Err(PushClientError::AuthRefused(f.op)),
            None => Err(PushClientError::Closed),
        }
    }

    /// Sends a Heartbeat; the reply arrives through [`PushClient::next_frame`].
    pub async fn heartbeat(&mut self) -> Result<u32, PushClientError> {
        self.send(op::HEARTBEAT, Bytes::new()).await
    }

    /// Sends Auth asking for resume from `state`'s positions, waits for AuthReply and
    /// applies its answer to `state`. `token` is a JWT or, in open mode, goim's JSON
    /// token (whose object gets the `resume` field).
    pub async fn auth_resume(
        &mut self,
        token: &[u8],
        state: &mut ResumeState,
    ) -> Result<ResumeReply, PushClientError> {
        let body = resume_auth_body(token, &state.request())
            .map_err(|e| PushClientError::BadResumeReply(e.to_string()))?;
        self.send(op::AUTH, body).await?;
        self.resume_reply(state).await
    }

    /// Reads the AuthReply to a resume request already sent and applies its answer
    /// to `state`.
    pub async fn resume_reply(
        &mut self,
        state: &mut ResumeState,
    ) -> Result<ResumeReply, PushClientError> {
        let f = match self.next_frame().await? {
            Some(f) if f.op == op::AUTH_REPLY => f,
            Some(f) => return Err(PushClientError::AuthRefused(f.op)),
            None => return Err(PushClientError::Closed),
        };
        let reply: ResumeReply = serde_json::from_slice(&f.body)
            .map_err(|e| PushClientError::BadResumeReply(e.to_string()))?;
        state.apply(&reply);
        Ok(reply)
    }

    /// The next frame from the server; `None` when the server closed the stream.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, PushClientError> {
        Ok(self.next_frame_meta().await?.map(|(f, _)| f))
    }

    /// The next frame and, on a resume-capable connection, where the push came from.
    pub async fn next_frame_meta(
        &mut self,
    ) -> Result<Option<(Frame, Option<PushMeta>)>, PushClientError> {
        loop {
            if let Some(f) = protocol::decode_server(&mut self.buf, MAX_BODY_LIMIT)? {
                return Ok(Some(f));
            }
            self.buf.reserve(4096);
            let n = match self.reader.read_buf(&mut self.buf).await {
                Ok(n) => n,
                // A QUIC connection closed by the server reads as an error.
                Err(_) if self.quic.is_some() => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Takes the client apart: its halves, bytes read but not yet decoded, and the
    /// QUIC connection if any.
    pub fn into_parts(self) -> (Reader, Writer, BytesMut, Option<QuicParts>) {
        (self.reader, self.writer, self.buf, self.quic)
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.writer.shutdown().await;
        if let Some((conn, endpoint)) = self.quic.take() {
            conn.close(0u32.into(), b"bye");
            endpoint.wait_idle().await;
        }
    }
}

/// A TLS connection to `addr`, verifying `server_name`.
async fn tls_connect(
    addr: SocketAddr,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, PushClientError> {
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| {
        PushClientError::Io(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    })?;
    let socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, socket)
        .await?)
}

/// Counts of what a WebSocket client received: every message held one frame, or
/// one Raw frame of complete frames (anything else failed the read).
#[derive(Debug, Default)]
pub struct WsStats {
    /// Messages holding one frame other than Raw.
    pub single: AtomicU64,
    /// Messages holding one Raw frame.
    pub raw: AtomicU64,
    /// Frames inside those Raw frames.
    pub raw_frames: AtomicU64,
    /// The most frames one Raw frame held.
    pub max_raw_frames: AtomicU64,
}

impl WsStats {
    /// (single-frame messages, Raw messages, frames inside Raw, most in one Raw).
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        (
            self.single.load(Ordering::Relaxed),
            self.raw.load(Ordering::Relaxed),
            self.raw_frames.load(Ordering::Relaxed),
            self.max_raw_frames.load(Ordering::Relaxed),
        )
    }
}

/// The WebSocket halves of a client connection.
mod ws_client {
    use std::io;
    use std::pin::Pin;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::task::{ready, Context, Poll};

    use bytes::{Bytes, BytesMut};
    use futures_util::stream::{SplitSink, SplitStream};
    use futures_util::{Sink, StreamExt};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_tungstenite::tungstenite::{Error as WsError, Message};
    use tokio_tungstenite::WebSocketStream;

    use super::WsStats;
    use crate::protocol::{op, EXT_HEADER_LEN, HEADER_LEN};

    fn bad(why: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    /// The length of the frame at the front of `b`, checked to be whole.
    fn frame_len(b: &[u8]) -> Result<usize, String> {
        if b.len() < HEADER_LEN {
            return Err(format!("{} bytes: less than a frame header", b.len()));
        }
        let pack_len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let header_len = u16::from_be_bytes([b[4], b[5]]) as usize;
        if header_len != HEADER_LEN && header_len != EXT_HEADER_LEN {
            return Err(format!("headerLen {header_len}"));
        }
        if pack_len < header_len || pack_len > b.len() {
            return Err(format!("packLen {pack_len} with {} bytes", b.len()));
        }
        Ok(pack_len)
    }

    /// Checks a message holds exactly one frame, or one Raw frame of complete
    /// frames; returns the bytes of the frames it carries (a Raw frame's body).
    pub(super) fn unpack(msg: Bytes, stats: &WsStats) -> Result<Bytes, String> {
        let len = frame_len(&msg)?;
        if len != msg.len() {
            return Err(format!(
                "a message of {} bytes holds a frame of {len} and more",
                msg.len()
            ));
        }
        let frame_op = u32::from_be_bytes([msg[8], msg[9], msg[10], msg[11]]);
        if frame_op != op::RAW {
            stats.single.fetch_add(1, Ordering::Relaxed);
            return Ok(msg);
        }
        let body = msg.slice(HEADER_LEN..);
        let mut rest = &body[..];
        let mut n = 0u64;
        while !rest.is_empty() {
            let l = frame_len(rest).map_err(|e| format!("inside a Raw frame: {e}"))?;
            rest = &rest[l..];
            n += 1;
        }
        stats.raw.fetch_add(1, Ordering::Relaxed);
        stats.raw_frames.fetch_add(n, Ordering::Relaxed);
        stats.max_raw_frames.fetch_max(n, Ordering::Relaxed);
        Ok(body)
    }

    pub(super) struct MessageReader<S> {
        pub(super) stream: SplitStream<WebSocketStream<S>>,
        pub(super) chunk: Bytes,
        pub(super) stats: Arc<WsStats>,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MessageReader<S> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            loop {
                if crate::transport::ws::copy_chunk(&mut this.chunk, buf) {
                    return Poll::Ready(Ok(()));
                }
                match ready!(this.stream.poll_next_unpin(cx)) {
                    Some(Ok(Message::Binary(b))) => {
                        this.chunk = unpack(b, &this.stats).map_err(bad)?;
                    }
                    Some(Ok(Message::Text(t))) => {
                        return Poll::Ready(Err(bad(format!("a text message: {t}"))))
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    None
                    | Some(Ok(Message::Close(_)))
                    | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                        return Poll::Ready(Ok(()))
                    }
                    Some(Err(WsError::Io(e))) => return Poll::Ready(Err(e)),
                    Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                }
            }
        }
    }

    /// Everything written between two flushes goes as one binary message: a
    /// frame [`super::PushClient::send`] writes is one message.
    pub(super) struct MessageWriter<S> {
        pub(super) sink: SplitSink<WebSocketStream<S>, Message>,
        pub(super) pending: BytesMut,
    }

    fn ws_io(e: WsError) -> io::Error {
        match e {
            WsError::Io(e) => e,
            e => io::Error::other(e),
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MessageWriter<S> {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.get_mut().pending.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let mut sink = Pin::new(&mut this.sink);
            if !this.pending.is_empty() {
                ready!(sink.as_mut().poll_ready(cx)).map_err(ws_io)?;
                let msg = Message::Binary(this.pending.split().freeze());
                sink.as_mut().start_send(msg).map_err(ws_io)?;
            }
            sink.poll_flush(cx).map_err(ws_io)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            ready!(self.as_mut().poll_flush(cx))?;
            Pin::new(&mut self.get_mut().sink)
                .poll_close(cx)
                .map_err(ws_io)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::protocol::Frame;

        #[test]
        fn a_message_must_hold_one_frame_or_one_raw_of_whole_frames() {
            let stats = WsStats::default();
            let f = Frame::new(1000, 1, &b"hi"[..]).to_bytes();
            assert_eq!(unpack(f.clone(), &stats).unwrap(), f);
            let two: Bytes = [f.clone(), f.clone()].concat().into();
            assert!(
                unpack(two.clone(), &stats).is_err(),
                "two frames in one message"
            );
            let raw = Frame::new(op::RAW, 0, two.clone()).to_bytes();
            assert_eq!(unpack(raw, &stats).unwrap(), two);
            let torn = Frame::new(op::RAW, 0, two.slice(..two.len() - 1)).to_bytes();
            assert!(unpack(torn, &stats).is_err(), "a partial frame inside Raw");
            assert!(unpack(f.slice(..10), &stats).is_err());
            assert_eq!(stats.counts(), (1, 1, 2, 2));
        }
    }
}

/// The Auth body asking for resume: `token`'s open-mode JSON object with a `resume`
/// field, or `{"token": <jwt>, "resume": ...}` for a JWT.
pub fn resume_auth_body(token: &[u8], req: &ResumeRequest) -> Result<Vec<u8>, serde_json::Error> {
    let resume = serde_json::to_value(req)?;
    match serde_json::from_slice::<serde_json::Value>(token) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.insert("resume".into(), resume);
            serde_json::to_vec(&m)
        }
        _ => {
            let jwt = String::from_utf8_lossy(token).trim().to_owned();
            serde_json::to_vec(&serde_json::json!({ "token": jwt, "resume": resume }))
        }
    }
}

/// How long [`ResumingClient`] gives one connect + Auth before it tries again.
pub const CONNECT_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a resuming client keeps between connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeState {
    /// The connection's key, as the server last said.
    pub key: Option<String>,
    /// The last position received per source.
    pub positions: Positions,
    /// Resumes that came back "not recovered", per source, since this state began.
    pub not_recovered: u64,
    /// Resumes whose every asked source was recovered.
    pub recovered: u64,
}

impl ResumeState {
    /// The resume request for the next connection.
    pub fn request(&self) -> ResumeRequest {
        ResumeRequest {
            key: self.key.clone(),
            positions: self.positions.clone(),
        }
    }

    /// Notes a received push: its source's position moves to it.
    pub fn observe(&mut self, meta: &PushMeta) {
        if meta.is_tracked() {
            self.positions.set(
                meta.source,
                Some(crate::resume::Position {
                    epoch: meta.epoch,
                    offset: meta.offset,
                }),
            );
        }
    }

    /// Applies AuthReply's answer. A recovered source keeps its position: the
    /// replay that follows moves it. Any other source starts at the stream's top
    /// (a not-recovered one must be resynced from the backend).
    pub fn apply(&mut self, reply: &ResumeReply) {
        self.key = Some(reply.key.clone());
        let mut all_recovered = true;
        let mut asked = false;
        for source in Source::ALL {
            let Some(st) = reply.source(source) else {
                self.positions.set(source, None);
                continue;
            };
            match st.recovered {
                Some(true) => asked = true,
                Some(false) => {
                    asked = true;
                    all_recovered = false;
                    self.not_recovered += 1;
                    self.positions.set(source, Some(st.position()));
                }
                None => self.positions.set(source, Some(st.position())),
            }
        }
        if asked && all_recovered {
            self.recovered += 1;
        }
    }
}

/// A caller's own way of making a connection for [`ResumingClient`]: socket
/// options, an endpoint whose socket simulates a network ([`crate::netsim`]), or
/// another handshake. Each call makes one new, unauthenticated connection.
pub trait Connector: Send + Sync {
    /// Connects once.
    fn connect(&self) -> BoxFuture<'_, Result<PushClient, PushClientError>>;
}

/// How [`ResumingClient`] reaches the server.
#[derive(Clone)]
pub enum Dial {
    Tcp(SocketAddr),
    Quic {
        addr: SocketAddr,
        server_name: String,
        config: quinn::ClientConfig,
    },
    /// QUIC from the caller's endpoint (e.g. on a simulated network), with 0-RTT
    /// when `config` holds a ticket for the server, as [`Dial::Quic`].
    QuicOn {
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: String,
        config: quinn::ClientConfig,
    },
    /// TLS over TCP (`client.tls_bind`), trusting the CA in `ca`.
    Tls {
        addr: SocketAddr,
        server_name: String,
        ca: std::path::PathBuf,
    },
    /// WebSocket, `ws://addr/sub`.
    Ws(SocketAddr),
    /// WebSocket over TLS, `wss://addr/sub`, trusting the CA in `ca`.
    Wss {
        addr: SocketAddr,
        server_name: String,
        ca: std::path::PathBuf,
    },
    /// Through the caller's [`Connector`].
    Custom(Arc<dyn Connector>),
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dial::Tcp(a) => write!(f, "tcp://{a}"),
            Dial::Tls { addr, .. } => write!(f, "tls://{addr}"),
            Dial::Ws(a) => write!(f, "ws://{a}/sub"),
            Dial::Wss { addr, .. } => write!(f, "wss://{addr}/sub"),
            Dial::Quic { addr, .. } | Dial::QuicOn { addr, .. } => write!(f, "quic://{addr}"),
            Dial::Custom(_) => f.write_str("custom"),
        }
    }
}

impl Dial {
    /// Connects once.
    pub async fn connect(&self) -> Result<PushClient, PushClientError> {
        match self {
            Dial::Tcp(a) => PushClient::connect_tcp(*a).await,
            Dial::Tls {
                addr,
                server_name,
                ca,
            } => PushClient::connect_tls(*addr, server_name, ca).await,
            Dial::Ws(a) => PushClient::connect_ws(*a).await,
            Dial::Wss {
                addr,
                server_name,
                ca,
            } => PushClient::connect_wss(*addr, server_name, ca).await,
            Dial::Quic {
                addr,
                server_name,
                config,
            } => PushClient::connect_quic_with(*addr, server_name, config.clone()).await,
            Dial::QuicOn {
                endpoint,
                addr,
                server_name,
                config,
            } => {
                PushClient::connect_quic_on(endpoint.clone(), *addr, server_name, config.clone())
                    .await
            }
            Dial::Custom(c) => c.connect().await,
        }
    }
}

/// What [`ResumingClient::next`] returns.
#[derive(Debug)]
pub enum Event {
    /// A push, with where it came from.
    Push(Frame, PushMeta),
    /// A frame that is not a push (a reply).
    Reply(Frame),
    /// The connection was lost (the error, if any) and a new one resumed.
    Resumed(ResumeReply),
}

/// Reconnect backoff: from `min`, doubling to `max`, each wait jittered by ±50 %.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: std::time::Duration,
    pub max: std::time::Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: std::time::Duration::from_millis(50),
            max: std::time::Duration::from_secs(5),
        }
    }
}

/// A client that reconnects and resumes whenever its connection is lost.
pub struct ResumingClient {
    dial: Dial,
    token: Bytes,
    backoff: Backoff,
    pub state: ResumeState,
    conn: Option<PushClient>,
    /// The QUIC endpoint every connection is made from, once there is one.
    endpoint: Option<quinn::Endpoint>,
    /// Connections made, the first included.
    pub connects: u64,
    /// QUIC connections that sent Auth as 0-RTT data.
    pub zero_rtt_attempted: u64,
    /// Of those, the ones whose 0-RTT data the server accepted.
    pub zero_rtt_accepted: u64,
    /// Why the server last closed the connection, from its DisconnectReply.
    pub last_disconnect: Option<Disconnect>,
    /// Other nodes of the tier to resume on, tried in turn after `dial` when the
    /// server drains (DisconnectReply `shutdown`) or a connect attempt fails.
    others: std::collections::VecDeque<Dial>,
}

/// A DisconnectReply's body: why the server closed the connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Disconnect {
    /// `replaced`, `kicked`, `shutdown`, `slow_consumer` or `overflow`.
    pub reason: String,
    /// Whether the server asks the client to connect again and resume (after
    /// `shutdown`: on another node of the tier).
    pub reconnect: bool,
}

impl Disconnect {
    /// Parses a DisconnectReply body; `None` for an empty or foreign one.
    pub fn parse(body: &[u8]) -> Option<Disconnect> {
        serde_json::from_slice(body).ok()
    }
}

impl std::fmt::Debug for ResumingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumingClient")
            .field("dial", &self.dial)
            .field("state", &self.state)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl ResumingClient {
    /// Connects and authenticates (with resume), retrying with backoff until it does.
    pub async fn connect(
        dial: Dial,
        token: impl Into<Bytes>,
        backoff: Backoff,
    ) -> (Self, ResumeReply) {
        Self::start(dial, Default::default(), token.into(), backoff).await
    }

    async fn start(
        dial: Dial,
        others: std::collections::VecDeque<Dial>,
        token: Bytes,
        backoff: Backoff,
    ) -> (Self, ResumeReply) {
        let mut c = ResumingClient {
            dial,
            token,
            backoff,
            state: ResumeState::default(),
            conn: None,
            endpoint: None,
            connects: 0,
            zero_rtt_attempted: 0,
            zero_rtt_accepted: 0,
            last_disconnect: None,
            others,
        };
        let reply = c.reconnect().await;
        (c, reply)
    }

    /// As [`ResumingClient::connect`], with other nodes of the tier to move to when
    /// the current one drains or cannot be reached (each tried in turn, the first
    /// one first).
    pub async fn connect_any(
        dials: Vec<Dial>,
        token: impl Into<Bytes>,
        backoff: Backoff,
    ) -> Option<(Self, ResumeReply)> {
        let mut dials: std::collections::VecDeque<Dial> = dials.into();
        let dial = dials.pop_front()?;
        Some(Self::start(dial, dials, token.into(), backoff).await)
    }

    /// The node dialled now.
    pub fn dial(&self) -> &Dial {
        &self.dial
    }

    /// Moves on to the next node, if there is another.
    fn next_node(&mut self) {
        if let Some(next) = self.others.pop_front() {
            let was = std::mem::replace(&mut self.dial, next);
            self.others.push_back(was);
        }
    }

    async fn reconnect(&mut self) -> ResumeReply {
        let mut wait = self.backoff.min;
        loop {
            // A handshake that stalls (its packets lost again and again) is given
            // up and tried afresh rather than waited out to the idle timeout.
            let attempt = tokio::time::timeout(CONNECT_ATTEMPT, self.try_connect());
            match attempt
                .await
                .unwrap_or(Err(PushClientError::ConnectTimeout(CONNECT_ATTEMPT)))
            {
                Ok(reply) => return reply,
                Err(e) => {
                    tracing::debug!(error = %e, dial = ?self.dial, "reconnect failed");
                    self.next_node();
                    let jitter = rand::random::<f64>() + 0.5;
                    tokio::time::sleep(wait.mul_f64(jitter)).await;
                    wait = (wait * 2).min(self.backoff.max);
                }
            }
        }
    }

    async fn try_connect(&mut self) -> Result<ResumeReply, PushClientError> {
        let (c, reply) = match &self.dial {
            Dial::Tcp(_) | Dial::Tls { .. } | Dial::Ws(_) | Dial::Wss { .. } | Dial::Custom(_) => {
                let mut c = self.dial.connect().await?;
                let reply = c.auth_resume(&self.token, &mut self.state).await?;
                (c, reply)
            }
            Dial::Quic {
                addr,
                server_name,
                config,
            }
            | Dial::QuicOn {
                addr,
                server_name,
                config,
                ..
            } => {
                // One endpoint for every connection; the tickets live in `config`.
                let endpoint = match (&self.dial, &self.endpoint) {
                    (Dial::QuicOn { endpoint, .. }, _) => endpoint.clone(),
                    (_, Some(e)) => e.clone(),
                    (_, None) => {
                        let e = tls::client_endpoint(*addr)?;
                        self.endpoint = Some(e.clone());
                        e
                    }
                };
                let body = resume_auth_body(&self.token, &self.state.request())
                    .map_err(|e| PushClientError::BadResumeReply(e.to_string()))?;
                let (mut c, z) = PushClient::connect_quic_0rtt(
                    &endpoint,
                    *addr,
                    server_name,
                    config.clone(),
                    body,
                )
                .await?;
                self.zero_rtt_attempted += u64::from(z.attempted);
                self.zero_rtt_accepted += u64::from(z.accepted);
                let reply = c.resume_reply(&mut self.state).await?;
                (c, reply)
            }
        };
        self.connects += 1;
        self.conn = Some(c);
        Ok(reply)
    }

    /// Drops the connection as a network change would; the next [`Self::next`]
    /// reconnects and resumes.
    pub fn drop_connection(&mut self) {
        self.conn = None;
    }

    /// The current connection, if any (to send Heartbeats or other frames).
    pub fn connection(&mut self) -> Option<&mut PushClient> {
        self.conn.as_mut()
    }

    /// The next push or reply; reconnects and resumes when the connection is lost.
    pub async fn next(&mut self) -> Event {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Event::Resumed(self.reconnect().await);
            };
            match conn.next_frame_meta().await {
                Ok(Some((f, Some(meta)))) if is_push(f.op) => {
                    self.state.observe(&meta);
                    return Event::Push(f, meta);
                }
                Ok(Some((f, Some(meta)))) if f.op == op::CHANGE_ROOM_REPLY => {
                    // the new room's position; live pushes from it follow
                    let pos = meta.is_tracked().then_some(crate::resume::Position {
                        epoch: meta.epoch,
                        offset: meta.offset,
                    });
                    self.state.positions.set(Source::Room, pos);
                    return Event::Reply(f);
                }
                Ok(Some((f, _))) if f.op == op::DISCONNECT_REPLY => {
                    self.last_disconnect = Disconnect::parse(&f.body);
                    if matches!(&self.last_disconnect, Some(d) if d.reason == "shutdown") {
                        self.next_node();
                    }
                    self.conn = None;
                }
                Ok(Some((f, _))) => return Event::Reply(f),
                Ok(None) | Err(_) => self.conn = None,
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        if let Some(c) = self.conn.take() {
            c.close().await;
        }
    }
}

/// Whether a server-sent op is a push (as opposed to a reply to the client).
fn is_push(op: u32) -> bool {
    !op::is_reply(op)
}

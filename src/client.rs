//! A goim v2 client over TCP or QUIC: what the examples, the integration tests and
//! load tools use to play a device.
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
        }
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
    /// Through the caller's [`Connector`].
    Custom(Arc<dyn Connector>),
}

impl std::fmt::Debug for Dial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dial::Tcp(a) => write!(f, "tcp://{a}"),
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
        let mut c = ResumingClient {
            dial,
            token: token.into(),
            backoff,
            state: ResumeState::default(),
            conn: None,
            endpoint: None,
            connects: 0,
            zero_rtt_attempted: 0,
            zero_rtt_accepted: 0,
        };
        let reply = c.reconnect().await;
        (c, reply)
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
                    let jitter = rand::random::<f64>() + 0.5;
                    tokio::time::sleep(wait.mul_f64(jitter)).await;
                    wait = (wait * 2).min(self.backoff.max);
                }
            }
        }
    }

    async fn try_connect(&mut self) -> Result<ResumeReply, PushClientError> {
        let (c, reply) = match &self.dial {
            Dial::Tcp(_) | Dial::Custom(_) => {
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
                Ok(Some((f, _))) if f.op == op::DISCONNECT_REPLY => self.conn = None,
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

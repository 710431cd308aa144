//! One client connection: the reader and writer loops, written once for every
//! transport over `AsyncRead` / `AsyncWrite`.
//!
//! ```text
//! reader: Auth → register → { Heartbeat | ChangeRoom | Sub | Unsub | SendMsg | Raw }*
//!           replies ──┐
//! registry pushes ────┴─▶ bounded queue ─▶ writer: drain all, one write per wake-up
//! ```
//!
//! The reader handles the client's frames and queues replies; the writer owns the
//! socket's write half. When the server closes the channel (replaced, kicked,
//! shutdown) the writer drains the queue, adds DisconnectReply and finishes the
//! stream. When either side fails, the other stops too.
//!
//! # Auth before the handshake is confirmed (QUIC 0-RTT)
//!
//! [`run`] may be handed a [`HandshakeConfirmed`] future: the transport's proof
//! that the peer holds the handshake keys. TCP passes none (its TLS-less goim
//! protocol has nothing to confirm), and neither does a QUIC connection whose
//! handshake was done before its Auth arrived: their Auth registers at once, in one
//! [`Registry::register_with`]. When Auth came as 0-RTT data, which a recorded
//! flight can replay, the session splits it in two:
//!
//! 1. **At once, read-only.** Auth is verified, the channel built, and for a
//!    resume-capable client [`Registry::peek_resume`] reads each source's state
//!    and the pushes since its positions, changing no registration. AuthReply
//!    (with the resume JSON) and the replay are queued and the writer started: they
//!    leave as 0.5-RTT data, readable only by the holder of the keys. A goim
//!    client gets nothing yet: its AuthReply means "registered", and it has no
//!    replay to gain.
//! 2. **Once confirmed** (at most `client.handshake_timeout`): the channel is
//!    registered with positions = the tops phase 1 reported, so whatever was
//!    appended in between is replayed behind the first replay, floors are set and
//!    live pushes follow, each once. AuthReply is not sent again. If history no
//!    longer holds a source from its reported top (dropped in the gap, or a new
//!    epoch), the channel is closed with [`CloseReason::Overflow`] before any live
//!    push is queued: the client resumes again and is told, never a silent gap.
//!
//! If the handshake is lost or times out first, nothing was registered: no
//! connection was replaced, no room joined, no frame after Auth handled. The
//! session ends with [`SessionEnd::Unconfirmed`]. Phase 1's only lasting trace is
//! the one any connection of the key leaves in history: a missing stream is
//! created empty and the streams' retention starts over.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::auth::{AuthError, Authenticator, MAX_ID_LEN};
use crate::channel::{Channel, CloseReason, OutReceiver, QueueLimits, Transport};
use crate::metrics::{Metrics, WriteCounters};
use crate::protocol::{self, op, Frame, FrameError, PushMeta, Source};
use crate::registry::{OpFilter, OpList, Registry, RoomsFull};
use crate::resume::{Positions, ResumeReply};
use crate::shutdown::Shutdown;

/// How long a finishing writer waits for the peer to take the last bytes.
const FINISH_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer growth step.
const READ_CHUNK: usize = 512;
/// After the server closed a session, how long it reads and discards the client's
/// input, so closing a TCP socket with unread bytes does not reset the connection
/// and discard the DisconnectReply on its way.
const LINGER: Duration = Duration::from_secs(1);

/// The write half of a client connection.
pub trait SessionWrite: Unpin + Send + 'static {
    /// Whether the session reads and discards input for a moment after the server
    /// closed it (see `LINGER`).
    const LINGER: bool = false;

    /// Sends `out`, whole frames back to back (everything the writer took from
    /// the queue at one wake-up), and flushes. A byte stream writes it as it is
    /// ([`write_stream`]); a message transport (WebSocket) splits it at frame
    /// boundaries.
    fn write_batch(&mut self, out: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Ends the stream gracefully once everything written was sent.
    fn finish(&mut self) -> impl Future<Output = ()> + Send;
}

/// [`SessionWrite::write_batch`] for a byte stream: one `write_all` and a flush.
pub async fn write_stream<W: AsyncWrite + Unpin>(w: &mut W, out: &[u8]) -> std::io::Result<()> {
    w.write_all(out).await?;
    w.flush().await
}

impl SessionWrite for tokio::net::tcp::OwnedWriteHalf {
    const LINGER: bool = true;

    fn write_batch(&mut self, out: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send {
        write_stream(self, out)
    }

    async fn finish(&mut self) {
        let _ = self.shutdown().await;
    }
}

impl SessionWrite for quinn::SendStream {
    fn write_batch(&mut self, out: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send {
        write_stream(self, out)
    }

    async fn finish(&mut self) {
        if quinn::SendStream::finish(self).is_ok() {
            // Resolves once the peer has every byte, so closing the connection after
            // this does not discard the DisconnectReply.
            let _ = tokio::time::timeout(FINISH_TIMEOUT, self.stopped()).await;
        }
    }
}

/// An in-memory connection (`tokio::io::duplex` split in two): for tests and fuzzing.
impl SessionWrite for tokio::io::WriteHalf<tokio::io::DuplexStream> {
    fn write_batch(&mut self, out: &[u8]) -> impl Future<Output = std::io::Result<()>> + Send {
        write_stream(self, out)
    }

    async fn finish(&mut self) {
        let _ = self.shutdown().await;
    }
}

/// Limits applied to every session.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_body: usize,
    pub handshake_timeout: Duration,
    pub heartbeat_timeout: Duration,
    pub write_timeout: Duration,
    pub queue_size: usize,
    /// Bytes queued or being written per client (`client.queue_bytes`).
    pub queue_bytes: usize,
    /// A client whose queue refuses a push and does not get back to half full for
    /// this long is disconnected.
    pub slow_consumer_timeout: Duration,
    /// Frames per second a client may send; bursts of twice as many.
    pub max_frames_per_sec: u32,
    /// How long a writer waits for more before writing (`client.write_coalesce`).
    pub write_coalesce: Duration,
}

/// A token bucket over the frames a client sends.
#[derive(Debug)]
struct FrameRate {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl FrameRate {
    fn new(per_sec: u32) -> Self {
        let per_sec = f64::from(per_sec.max(1));
        FrameRate {
            per_sec,
            burst: 2.0 * per_sec,
            tokens: 2.0 * per_sec,
            at: tokio::time::Instant::now(),
        }
    }

    /// Takes one frame's token, or says the client is over its rate.
    fn take(&mut self) -> Result<(), SessionError> {
        let now = tokio::time::Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        if self.tokens < 1.0 {
            return Err(SessionError::RateLimited(self.per_sec as u32));
        }
        self.tokens -= 1.0;
        Ok(())
    }
}

/// What every session shares.
#[derive(Debug)]
pub struct SessionContext {
    pub registry: Arc<Registry>,
    pub auth: Authenticator,
    pub limits: SessionLimits,
    pub shutdown: Shutdown,
    /// The server's metrics ([`Metrics::disabled`] counts nothing).
    pub metrics: Arc<Metrics>,
    /// The tier, when key streams live in its Redis (`history.store = "redis"`):
    /// a connection then claims its key and reads its stream there before it
    /// registers. `None` otherwise.
    pub shared_keys: Option<Arc<crate::cluster::Cluster>>,
}

/// Why a session ended with an error. Each is logged with the connection's span.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Reading from the client failed.
    #[error("read failed: {0}")]
    Read(std::io::Error),
    /// The client sent bytes that are not a valid frame.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// No Auth frame within the handshake timeout.
    #[error("no Auth frame within {0:?}")]
    HandshakeTimeout(Duration),
    /// With shared key history, the tier's Redis did not answer the key claim
    /// or read: nothing was registered, and the client retries.
    #[error("cannot register with the tier's key history: {0}")]
    Tier(#[from] crate::cluster::ClusterError),
    /// The connection closed before authenticating.
    #[error("connection closed before Auth")]
    ClosedBeforeAuth,
    /// The first frame was not Auth.
    #[error("first frame has op {0}, expected Auth (7)")]
    NotAuth(u32),
    /// The Auth frame's token was refused.
    #[error("auth failed: {0}")]
    Auth(#[from] AuthError),
    /// No frame within the heartbeat timeout.
    #[error("no frame for {0:?} (heartbeat timeout)")]
    HeartbeatTimeout(Duration),
    /// A frame's body is invalid for its op.
    #[error("invalid body for op {op}: {reason}")]
    BadBody { op: u32, reason: String },
    /// The client sent frames faster than `client.max_frames_per_sec` allows.
    #[error("more than {0} frames per second (inbound rate limit)")]
    RateLimited(u32),
    /// The client asked to join a new room when the node has `registry.max_rooms`.
    #[error("{0}")]
    RoomsFull(#[from] RoomsFull),
    /// The writer failed or timed out, so the connection is unusable.
    #[error("write failed: {0}")]
    Write(#[from] WriteError),
}

impl SessionError {
    /// Whether the client ended the connection on purpose: over QUIC a client
    /// that closes its connection (CONNECTION_CLOSE with an application code)
    /// shows up as a read error rather than an end of stream.
    pub fn is_peer_close(&self) -> bool {
        let SessionError::Read(e) = self else {
            return false;
        };
        matches!(
            e.get_ref()
                .and_then(|i| i.downcast_ref::<quinn::ReadError>()),
            Some(quinn::ReadError::ConnectionLost(
                quinn::ConnectionError::ApplicationClosed(_)
            ))
        )
    }
}

/// Why a session's writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The socket refused the bytes (for example, the client hung up).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The client accepted no bytes within `client.write_timeout`.
    #[error("client took no bytes for {0:?}")]
    Timeout(Duration),
    /// The writer task ended abnormally.
    #[error("writer task failed: {0}")]
    Task(String),
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client closed its side.
    ClientClosed,
    /// The server closed it (DisconnectReply sent).
    ServerClosed(CloseReason),
    /// The handshake was never confirmed (lost or timed out) after a 0-RTT Auth:
    /// nothing was registered. What a replayed 0-RTT flight comes to.
    Unconfirmed,
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max_body: usize,
) -> Result<Option<Frame>, SessionError> {
    loop {
        if let Some(frame) = protocol::decode(buf, max_body)? {
            return Ok(Some(frame));
        }
        if buf.capacity() - buf.len() < 64 {
            // Small steps: an idle client holds this buffer for hours. decode()
            // reserves a large frame's whole length once its header is in.
            buf.reserve(READ_CHUNK);
        }
        let n = reader.read_buf(buf).await.map_err(SessionError::Read)?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(SessionError::Truncated(buf.len()))
            };
        }
    }
}

/// The AuthReply frame: goim's empty body, or for a resume-capable connection the
/// [`ResumeReply`] JSON.
fn auth_reply_frame(resume: bool, key: &str, seq: u32, state: Option<ResumeReply>) -> Bytes {
    let body = match (resume, state) {
        (true, Some(state)) => Bytes::from(serde_json::to_vec(&state).unwrap_or_default()),
        // Resume asked for with history off: every source is untracked.
        (true, None) => Bytes::from(
            serde_json::to_vec(&ResumeReply {
                key: key.to_owned(),
                ..Default::default()
            })
            .unwrap_or_default(),
        ),
        (false, _) => Bytes::new(),
    };
    Frame::new(op::AUTH_REPLY, seq, body).to_bytes()
}

/// Counts a resume-capable registration: recovered unless history lacked some
/// of what the client asked for.
fn count_resume(metrics: &Metrics, resume: bool, state: Option<&ResumeReply>) {
    if resume {
        let lost = state.is_some_and(|s| s.sources.values().any(|st| st.recovered == Some(false)));
        metrics.resumed(!lost);
    }
}

/// The top of every source AuthReply reported: where phase 2 resumes from.
fn tops_of(reply: &ResumeReply) -> Positions {
    let mut p = Positions::default();
    for source in Source::ALL {
        p.set(source, reply.source(source).map(|s| s.position()));
    }
    p
}

/// Shared history, before registering `chan`: marks it pending (key and user
/// pushes arriving for it are buffered), claims its key and its user's presence
/// on this node in the tier's directory, then, for a resume-capable channel,
/// reads its key's (and user's) stream since the client's positions. A push
/// appended before the claim is in the read; one after it reaches this node and
/// is buffered; registration queues both once, in order. `None` for a goim
/// channel, which has nothing to replay.
async fn claim_and_read(
    registry: &Registry,
    c: &crate::cluster::Cluster,
    chan: &Channel,
    room: Option<Arc<str>>,
    positions: Option<&Positions>,
) -> Result<Option<crate::registry::Shared>, SessionError> {
    use crate::cluster::shared;
    use crate::history::StreamRef;
    use crate::registry::{Shared, SharedStream};
    let mid = chan.mid.filter(|_| c.shares_user_history());
    let room = room.filter(|_| c.shares_room_history());
    registry.begin_pending(&chan.key, chan.id, mid, room.clone());
    let read = async {
        shared::claim(c, &chan.key, chan.id).await?;
        if let Some(mid) = mid {
            shared::claim_user(c, mid, registry.user_online(mid) + 1).await?;
        }
        if let Some(r) = &room {
            shared::claim_room(c, r, registry.room_online(r) + 1).await?;
        }
        if !chan.resume {
            return Ok(None);
        }
        let asked = |source| positions.and_then(|p| p.get(source));
        let stream = |recovery, source| SharedStream {
            recovery,
            asked: asked(source).is_some(),
        };
        let key = shared::read(c, StreamRef::Key(&chan.key), asked(Source::Key));
        let user = async {
            match mid {
                Some(mid) => Ok(Some(
                    shared::read(c, StreamRef::User(mid), asked(Source::User)).await?,
                )),
                None => Ok(None),
            }
        };
        let in_room = async {
            match &room {
                Some(r) => Ok(Some(
                    shared::read(c, StreamRef::Room(r), asked(Source::Room)).await?,
                )),
                None => Ok(None),
            }
        };
        let all = async {
            if c.shares_all_history() {
                Ok(Some(
                    shared::read(c, StreamRef::All, asked(Source::All)).await?,
                ))
            } else {
                Ok(None)
            }
        };
        // The reads at once: one round trip.
        let (key, user, in_room, all) = tokio::try_join!(key, user, in_room, all)?;
        Ok(Some(Shared {
            key: Some(stream(key, Source::Key)),
            user: user.map(|u| stream(u, Source::User)),
            room: in_room.map(|r| stream(r, Source::Room)),
            all: all.map(|a| stream(a, Source::All)),
        }))
    };
    let r = read.await;
    if r.is_err() {
        registry.end_pending(&chan.key, chan.id);
        // The presence claimed above: rewritten from the real counts.
        if let Some(mid) = mid {
            let _ = c.dirty.try_send(crate::cluster::Dirty::User(mid));
        }
        if let Some(r) = room {
            let _ = c.dirty.try_send(crate::cluster::Dirty::Room(r));
        }
    }
    r.map_err(SessionError::Tier)
}

/// How the wait for a handshake's confirmation ended.
enum Confirmation {
    Confirmed,
    /// Lost, timed out, or the writer failed.
    Unconfirmed,
    Shutdown,
}

/// Waits for the handshake to be confirmed, at most `client.handshake_timeout`.
async fn confirmation(
    ctx: &SessionContext,
    confirm: HandshakeConfirmed,
    stop: &CancellationToken,
) -> Confirmation {
    tokio::select! {
        c = tokio::time::timeout(ctx.limits.handshake_timeout, confirm) => {
            if matches!(c, Ok(true)) {
                Confirmation::Confirmed
            } else {
                Confirmation::Unconfirmed
            }
        }
        _ = ctx.shutdown.cancelled() => Confirmation::Shutdown,
        // the writer stopped: the connection is gone
        _ = stop.cancelled() => Confirmation::Unconfirmed,
    }
}

/// Resolves once the transport's handshake is confirmed (`true`: the peer proved
/// it holds the handshake keys), or to `false` when the connection was lost or
/// the handshake timed out first. See the module docs.
pub type HandshakeConfirmed = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Runs a client session to its end. The caller's span names the connection.
///
/// `confirmed` is `None` when the handshake is already confirmed (TCP); a QUIC
/// connection that accepted 0-RTT data passes the future that resolves once it
/// is, and the session defers every side effect of its Auth until then.
pub async fn run<R, W>(
    ctx: Arc<SessionContext>,
    mut reader: R,
    writer: W,
    transport: Transport,
    confirmed: Option<HandshakeConfirmed>,
) -> Result<SessionEnd, SessionError>
where
    R: AsyncRead + Unpin + Send,
    W: SessionWrite,
{
    let limits = &ctx.limits;
    let mut buf = BytesMut::new();
    ctx.metrics.accepted(transport);

    let first = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, read_frame(&mut reader, &mut buf, limits.max_body)) => {
            r.map_err(|_| SessionError::HandshakeTimeout(limits.handshake_timeout))??
        }
        _ = ctx.shutdown.cancelled() => return Ok(SessionEnd::ServerClosed(CloseReason::Shutdown)),
    };
    let auth = first.ok_or(SessionError::ClosedBeforeAuth)?;
    if auth.op != op::AUTH {
        return Err(SessionError::NotAuth(auth.op));
    }
    let id = ctx.auth.verify(&auth.body)?;
    tracing::Span::current().record("key", id.key.as_str());

    let resume = id.resume.is_some();
    let (chan, rx) = Channel::open(
        ctx.registry.next_id(),
        id.key.as_str().into(),
        id.mid,
        transport,
        QueueLimits {
            frames: limits.queue_size,
            bytes: limits.queue_bytes,
            slow_after: limits.slow_consumer_timeout,
        },
        resume,
    );
    let mut room: Option<Arc<str>> = id.room.as_deref().map(Arc::from);
    let accepts = OpFilter::new(id.accepts.clone());
    let auth_seq = auth.seq;
    let auth_reply = |state| auth_reply_frame(resume, &id.key, auth_seq, state);
    let positions = id.resume.as_ref().map(|r| &r.positions);

    // Confirmed already (TCP, or a QUIC handshake that finished before its Auth
    // was read), or not yet (Auth came as 0-RTT data)?
    let mut pending = confirmed;
    if let Some(c) = pending.as_mut() {
        match c.as_mut().now_or_never() {
            Some(true) => pending = None,
            Some(false) => {
                debug!("handshake failed before Auth was handled: nothing registered");
                return Ok(SessionEnd::Unconfirmed);
            }
            None => {}
        }
    }

    let stop = CancellationToken::new();
    // Shared key history: the key is claimed and its stream read before
    // registering, which are side effects, so a 0-RTT Auth waits for the
    // handshake's confirmation first (no 0.5-RTT replay in this mode).
    let mut shared = None;
    if let Some(c) = &ctx.shared_keys {
        if let Some(confirm) = pending.take() {
            match confirmation(&ctx, confirm, &stop).await {
                Confirmation::Confirmed => {}
                Confirmation::Unconfirmed => return Ok(SessionEnd::Unconfirmed),
                Confirmation::Shutdown => {
                    return Ok(SessionEnd::ServerClosed(CloseReason::Shutdown))
                }
            }
        }
        // Boxed, as the ChangeRoom read below.
        shared = Some(
            Box::pin(claim_and_read(
                &ctx.registry,
                c,
                &chan,
                room.clone(),
                positions,
            ))
            .await?,
        );
    }
    let spawn_writer = |writer: W, rx: OutReceiver| {
        tokio::spawn(write_loop(
            writer,
            rx,
            chan.clone(),
            stop.clone(),
            (limits.write_timeout, limits.write_coalesce),
            ctx.metrics.writer(transport),
        ))
    };
    let (writer_task, replaced) = match pending {
        None => {
            // AuthReply goes first in the queue, before any push, then the replay:
            // both are queued in the registration's critical section.
            let registered = ctx.registry.register_with(
                chan.clone(),
                room.clone(),
                accepts,
                positions,
                shared.flatten(),
                |state| {
                    count_resume(&ctx.metrics, resume, state.as_ref());
                    Some(auth_reply(state))
                },
            );
            let replaced = match registered {
                Ok(replaced) => replaced,
                Err(e) => {
                    ctx.registry.end_pending(&chan.key, chan.id);
                    return Err(e.into());
                }
            };
            (spawn_writer(writer, rx), replaced)
        }
        Some(confirm) => {
            // Phase 1, before the handshake is confirmed: only what has no side
            // effect. A resume-capable client gets AuthReply and its replay now,
            // as 0.5-RTT data that only the holder of the handshake keys can read.
            let tops = if resume {
                let (state, replay) =
                    ctx.registry
                        .peek_resume(&chan, room.as_deref(), &accepts, positions, None);
                let tops = state.as_ref().map(tops_of);
                chan.force_reply(&auth_reply(state));
                for (frame, meta) in &replay {
                    chan.force_push(frame, *meta);
                }
                debug!(
                    replayed = replay.len(),
                    "0-RTT Auth: AuthReply and replay sent before the handshake is confirmed"
                );
                tops
            } else {
                None
            };
            let writer_task = spawn_writer(writer, rx);
            match confirmation(&ctx, confirm, &stop).await {
                Confirmation::Confirmed => {}
                Confirmation::Unconfirmed => {
                    // A replayed 0-RTT flight ends here: nothing was registered.
                    debug!("handshake not confirmed: the 0-RTT Auth registered nothing");
                    chan.shut();
                    writer_task.abort();
                    let _ = writer_task.await;
                    return Ok(SessionEnd::Unconfirmed);
                }
                Confirmation::Shutdown => {
                    chan.close(CloseReason::Shutdown);
                    let _ = writer_task.await;
                    return Ok(SessionEnd::ServerClosed(CloseReason::Shutdown));
                }
            }
            // Phase 2: the peer holds the keys. Register, replaying what was
            // appended since the tops phase 1 reported (AuthReply already went).
            let registered = if resume {
                let mut gap = false;
                let r = ctx.registry.register_with(
                    chan.clone(),
                    room.clone(),
                    accepts,
                    tops.as_ref(),
                    None,
                    |state| {
                        count_resume(&ctx.metrics, true, state.as_ref());
                        gap = state.is_some_and(|s| {
                            s.sources.values().any(|st| st.recovered == Some(false))
                        });
                        if gap {
                            // History lost pushes after what AuthReply told the
                            // client: closed before any live push is queued, so
                            // its client resumes and is told, never a silent gap.
                            chan.close(CloseReason::Overflow);
                        }
                        None
                    },
                );
                if gap {
                    debug!("history changed before the handshake was confirmed: the client resumes again");
                }
                r
            } else {
                // A goim client learns it is registered from AuthReply: it is sent
                // now, at registration, as on TCP.
                ctx.registry.register_with(
                    chan.clone(),
                    room.clone(),
                    accepts,
                    None,
                    None,
                    |state| Some(auth_reply(state)),
                )
            };
            match registered {
                Ok(replaced) => (writer_task, replaced),
                Err(e) => {
                    chan.shut();
                    let _ = writer_task.await;
                    return Err(e.into());
                }
            }
        }
    };
    if let Some(old) = replaced {
        debug!(
            old_conn = old.id,
            "replacing the connection with the same key"
        );
        old.close(CloseReason::Replaced);
    }
    if ctx.shutdown.is_cancelled() {
        chan.close(CloseReason::Shutdown);
    }
    debug!(mid = ?id.mid, room = ?room, platform = %id.platform, "authenticated");

    let result = read_loop(&ctx, &mut reader, &mut buf, &chan, &mut room, &stop).await;

    ctx.registry.unregister(&chan);
    // The writer sends what is queued, then ends; a slow consumer would not take
    // it, so its connection is dropped at once.
    chan.shut();
    if matches!(
        result,
        Ok(SessionEnd::ServerClosed(CloseReason::SlowConsumer))
    ) {
        writer_task.abort();
    }
    let write_result = match writer_task.await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(WriteError::Task(e.to_string())),
    };
    let lingers =
        matches!(result, Ok(SessionEnd::ServerClosed(r)) if r != CloseReason::SlowConsumer);
    if W::LINGER && lingers {
        let mut sink = vec![0u8; 1024];
        let linger = async { while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(LINGER, linger).await;
    }
    match (result, write_result) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(SessionError::Write(e)),
        (Ok(end), Ok(())) => Ok(end),
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    ctx: &SessionContext,
    reader: &mut R,
    buf: &mut BytesMut,
    chan: &Arc<Channel>,
    room: &mut Option<Arc<str>>,
    stop: &CancellationToken,
) -> Result<SessionEnd, SessionError> {
    let limits = &ctx.limits;
    let mut rate = FrameRate::new(limits.max_frames_per_sec);
    loop {
        let frame = tokio::select! {
            r = tokio::time::timeout(limits.heartbeat_timeout, read_frame(reader, buf, limits.max_body)) => {
                match r.map_err(|_| SessionError::HeartbeatTimeout(limits.heartbeat_timeout))?? {
                    Some(f) => f,
                    None => return Ok(SessionEnd::ClientClosed),
                }
            }
            _ = chan.closed() => {
                return Ok(SessionEnd::ServerClosed(chan.close_reason().unwrap_or(CloseReason::Shutdown)));
            }
            // the writer stopped: the client is not taking bytes
            _ = stop.cancelled() => return Ok(SessionEnd::ClientClosed),
        };
        if frame.op == op::RAW {
            for inner in protocol::split_raw(&frame.body, limits.max_body)? {
                rate.take()?;
                handle(ctx, chan, room, inner).await?;
            }
        } else {
            rate.take()?;
            handle(ctx, chan, room, frame).await?;
        }
    }
}

async fn handle(
    ctx: &SessionContext,
    chan: &Arc<Channel>,
    room: &mut Option<Arc<str>>,
    frame: Frame,
) -> Result<(), SessionError> {
    let reply = |op, body: Bytes| Frame::new(op, frame.seq, body).to_bytes();
    let out = match frame.op {
        op::HEARTBEAT => {
            let online = room
                .as_deref()
                .map_or(0, |r| ctx.registry.tier_room_online(r));
            let count = u32::try_from(online).unwrap_or(u32::MAX);
            reply(
                op::HEARTBEAT_REPLY,
                Bytes::copy_from_slice(&count.to_be_bytes()),
            )
        }
        op::CHANGE_ROOM => {
            let id = std::str::from_utf8(&frame.body).map_err(|_| SessionError::BadBody {
                op: frame.op,
                reason: "room id is not UTF-8".into(),
            })?;
            if id.len() > MAX_ID_LEN {
                return Err(SessionError::BadBody {
                    op: frame.op,
                    reason: format!("room id longer than {MAX_ID_LEN} bytes"),
                });
            }
            let next = (!id.is_empty()).then(|| Arc::from(id));
            if chan.resume {
                // The reply, with the new room's position in the extension, is
                // queued before any push from that room.
                let plain = reply(op::CHANGE_ROOM_REPLY, frame.body.clone());
                // Forced in under the registry's lock, so room for it first (a
                // flood of ChangeRoom only slows this client's reader). False: the
                // writer is gone, and the read loop notices through `stop`.
                if !chan.room_for(plain.len() + protocol::EXT_LEN).await {
                    return Ok(());
                }
                // Shared room history: the new room's presence here claimed and
                // its position read first (a push between the read and the move
                // shows as a gap: the channel closes and the client resumes).
                let shared_top = match (&ctx.shared_keys, &next) {
                    (Some(c), Some(r)) if c.shares_room_history() => {
                        use crate::cluster::shared;
                        // Boxed: the Redis calls' state is large and rare, and
                        // would otherwise size every idle session.
                        let read = Box::pin(async {
                            shared::claim_room(c, r, ctx.registry.room_online(r) + 1).await?;
                            shared::read(c, crate::history::StreamRef::Room(r), None).await
                        });
                        let rec = read.await.map_err(SessionError::Tier)?;
                        Some(rec.top)
                    }
                    _ => None,
                };
                ctx.registry
                    .change_room_at(chan, next.clone(), shared_top, |state| {
                        let meta = state.map_or(PushMeta::untracked(Source::Room), |s| PushMeta {
                            source: Source::Room,
                            epoch: s.epoch,
                            offset: s.offset,
                        });
                        let mut b = BytesMut::new();
                        protocol::put_with_ext(&mut b, &plain, frame.seq, meta);
                        Some(b.freeze())
                    })?;
                *room = next;
                debug!(room = ?room, "changed room");
                return Ok(());
            }
            ctx.registry.change_room(chan, next.clone())?;
            *room = next;
            debug!(room = ?room, "changed room");
            reply(op::CHANGE_ROOM_REPLY, frame.body.clone())
        }
        op::SUB | op::UNSUB => {
            // Parsed, capped, sorted and deduplicated before the bucket's lock.
            let ops = OpList::parse(&frame.body).map_err(|e| SessionError::BadBody {
                op: frame.op,
                reason: e.to_string(),
            })?;
            ctx.registry
                .update_filter(chan, &ops, frame.op == op::SUB)
                .map_err(|e| SessionError::BadBody {
                    op: frame.op,
                    reason: e.to_string(),
                })?;
            let reply_op = if frame.op == op::SUB {
                op::SUB_REPLY
            } else {
                op::UNSUB_REPLY
            };
            reply(reply_op, frame.body.clone())
        }
        op::SEND_MSG => reply(op::SEND_MSG_REPLY, frame.body.clone()),
        op::AUTH => {
            return Err(SessionError::BadBody {
                op: frame.op,
                reason: "already authenticated".into(),
            })
        }
        other => {
            debug!(
                op = other,
                "ignoring a frame with an op the server does not handle"
            );
            return Ok(());
        }
    };
    // A closed queue means the writer is gone; the read loop notices through `stop`.
    chan.reply(out).await;
    Ok(())
}

async fn write_loop<W: SessionWrite>(
    mut writer: W,
    mut rx: OutReceiver,
    chan: Arc<Channel>,
    stop: CancellationToken,
    (write_timeout, coalesce): (Duration, Duration),
    counters: WriteCounters,
) -> Result<(), WriteError> {
    // Starts empty and grows with use: most clients are idle most of the time.
    let mut out = BytesMut::new();
    let result = loop {
        // Everything queued, in one buffer; `last` once the queue is shut.
        let batch = rx.next_after(&mut out, coalesce).await;
        if let (true, Some(reason)) = (batch.last, chan.close_reason()) {
            Frame::new(op::DISCONNECT_REPLY, 0, reason.disconnect_body()).encode(&mut out);
        }
        let (frames, bytes) = (batch.frames, out.len());
        if let Err(e) = write_out(&mut writer, &mut out, write_timeout).await {
            break Err(e);
        }
        counters.written(frames, bytes);
        rx.written();
        if batch.last {
            break Ok(());
        }
    };
    if result.is_ok() {
        writer.finish().await;
    }
    stop.cancel();
    result
}

/// Writes and clears `out`: one write call for everything buffered.
async fn write_out<W: SessionWrite>(
    writer: &mut W,
    out: &mut BytesMut,
    write_timeout: Duration,
) -> Result<(), WriteError> {
    if out.is_empty() {
        return Ok(());
    }
    match tokio::time::timeout(write_timeout, writer.write_batch(out)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(WriteError::Io(e)),
        Err(_) => return Err(WriteError::Timeout(write_timeout)),
    }
    out.clear();
    if out.capacity() > 16 * 1024 {
        // give a burst's buffer back; idle clients are the common case
        *out = BytesMut::new();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Arc<SessionContext> {
        Arc::new(SessionContext {
            registry: Arc::new(Registry::new(4)),
            auth: Authenticator::Open,
            limits: SessionLimits {
                max_body: protocol::DEFAULT_MAX_BODY,
                handshake_timeout: Duration::from_secs(5),
                heartbeat_timeout: Duration::from_secs(10),
                write_timeout: Duration::from_secs(1),
                queue_size: 8,
                queue_bytes: 64 * 1024,
                slow_consumer_timeout: Duration::from_secs(5),
                max_frames_per_sec: 100,
                write_coalesce: Duration::ZERO,
            },
            shutdown: Shutdown::new(),
            metrics: Arc::new(Metrics::disabled()),
            shared_keys: None,
        })
    }

    /// Plays `input` as a client that then half-closes, and returns how the session
    /// ended and the frames the client read.
    async fn play(
        ctx: &Arc<SessionContext>,
        input: &[u8],
    ) -> (Result<SessionEnd, SessionError>, Vec<Frame>) {
        let (client, server) = tokio::io::duplex(1024);
        let (read, write) = tokio::io::split(server);
        let session = tokio::spawn(run(ctx.clone(), read, write, Transport::Tcp, None));
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(input).await.unwrap();
        client_write.shutdown().await.unwrap();
        let mut out = Vec::new();
        client_read.read_to_end(&mut out).await.unwrap();
        let result = session.await.unwrap();
        let mut buf = BytesMut::from(&out[..]);
        let mut frames = Vec::new();
        while let Some(f) = protocol::decode(&mut buf, protocol::MAX_BODY_LIMIT).unwrap() {
            frames.push(f);
        }
        assert!(buf.is_empty(), "whole frames only");
        (result, frames)
    }

    #[tokio::test]
    async fn a_session_future_stays_small() {
        // An idle connection holds its session's state for hours: the rare,
        // large states (the tier's Redis calls) are boxed so that they do not
        // size every session.
        let (_client, server) = tokio::io::duplex(64);
        let (read, write) = tokio::io::split(server);
        let fut = run(ctx(), read, write, Transport::Tcp, None);
        let size = std::mem::size_of_val(&fut);
        eprintln!("session future: {size} bytes");
        assert!(size <= 2048, "the session future is {size} bytes");
    }

    fn frames(fs: &[Frame]) -> Vec<u8> {
        fs.iter().flat_map(|f| f.to_bytes()).collect()
    }

    fn history_ctx(size: usize) -> Arc<SessionContext> {
        let config = crate::config::HistoryConfig {
            size,
            ..Default::default()
        };
        let history = crate::history::History::from_config(&config);
        let ctx = ctx();
        Arc::new(SessionContext {
            registry: Arc::new(Registry::with_history(4, usize::MAX, history)),
            auth: Authenticator::Open,
            limits: ctx.limits.clone(),
            shutdown: Shutdown::new(),
            metrics: Arc::new(Metrics::disabled()),
            shared_keys: None,
        })
    }

    /// A client whose session's handshake is confirmed when the test says so.
    struct Deferred {
        read: tokio::io::ReadHalf<tokio::io::DuplexStream>,
        write: tokio::io::WriteHalf<tokio::io::DuplexStream>,
        buf: BytesMut,
        confirm: Option<tokio::sync::oneshot::Sender<bool>>,
        session: tokio::task::JoinHandle<Result<SessionEnd, SessionError>>,
    }

    impl Deferred {
        async fn start(ctx: &Arc<SessionContext>, auth: &str) -> Deferred {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (sr, sw) = tokio::io::split(server);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let confirmed: HandshakeConfirmed = Box::pin(async move { rx.await == Ok(true) });
            let session = tokio::spawn(run(ctx.clone(), sr, sw, Transport::Quic, Some(confirmed)));
            let (read, mut write) = tokio::io::split(client);
            let auth = Frame::new(op::AUTH, 1, auth.as_bytes().to_vec());
            write.write_all(&auth.to_bytes()).await.unwrap();
            Deferred {
                read,
                write,
                buf: BytesMut::new(),
                confirm: Some(tx),
                session,
            }
        }

        fn confirm(&mut self, ok: bool) {
            let _ = self.confirm.take().unwrap().send(ok);
        }

        async fn next(&mut self) -> (Frame, Option<PushMeta>) {
            loop {
                if let Some(f) = protocol::decode_server(&mut self.buf, 4096).unwrap() {
                    return f;
                }
                let read = self.read.read_buf(&mut self.buf);
                let n = tokio::time::timeout(Duration::from_secs(5), read)
                    .await
                    .expect("no frame")
                    .unwrap();
                assert!(n > 0, "closed");
            }
        }

        /// Nothing arrives for a while.
        async fn quiet(&mut self) {
            let read = self.read.read_buf(&mut self.buf);
            let r = tokio::time::timeout(Duration::from_millis(50), read).await;
            assert!(r.is_err(), "got {:?}", self.buf);
        }
    }

    fn key_frame(body: &'static str) -> Bytes {
        Frame::new(1000, 0, body.as_bytes()).to_bytes()
    }

    /// The key's stream, created as a connection would; its epoch.
    fn key_stream(ctx: &SessionContext) -> u32 {
        let h = ctx.registry.history().unwrap();
        h.store().ensure(crate::history::StreamRef::Key("k")).epoch
    }

    fn resume_auth(epoch: u32, offset: u64) -> String {
        format!(
            r#"{{"key":"k","resume":{{"positions":{{"key":{{"epoch":{epoch},"offset":{offset}}}}}}}}}"#
        )
    }

    async fn wait_registered(ctx: &SessionContext) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while ctx.registry.get("k").is_none() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_0rtt_auth_gets_its_replay_at_once_and_registers_once_confirmed() {
        let ctx = history_ctx(100);
        let epoch = key_stream(&ctx);
        for b in ["m1", "m2"] {
            ctx.registry.push_key("k", 1000, &key_frame(b));
        }
        let mut c = Deferred::start(&ctx, &resume_auth(epoch, 0)).await;
        let (reply, _) = c.next().await;
        assert_eq!(reply.op, op::AUTH_REPLY);
        let reply: ResumeReply = serde_json::from_slice(&reply.body).unwrap();
        let key = reply.source(Source::Key).unwrap();
        assert_eq!((key.offset, key.recovered), (2, Some(true)));
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(c.next().await);
        }
        // not registered yet: a push now is only kept
        assert!(ctx.registry.get("k").is_none());
        assert_eq!(ctx.registry.online().total, 0);
        assert_eq!(
            ctx.registry.push_key("k", 1000, &key_frame("m3")),
            crate::channel::PushOutcome::Stored
        );
        c.confirm(true);
        wait_registered(&ctx).await;
        got.push(c.next().await);
        ctx.registry.push_key("k", 1000, &key_frame("m4"));
        got.push(c.next().await);
        let seen: Vec<(u32, Bytes, u64)> = got
            .into_iter()
            .map(|(f, m)| (f.seq, f.body, m.unwrap().offset))
            .collect();
        let want: Vec<(u32, Bytes, u64)> = (1..=4)
            .map(|i| (i, Bytes::from(format!("m{i}")), u64::from(i)))
            .collect();
        assert_eq!(seen, want, "each once, in order, AuthReply not sent again");
        c.write.shutdown().await.unwrap();
        assert_eq!(c.session.await.unwrap().unwrap(), SessionEnd::ClientClosed);
        assert_eq!(ctx.registry.online().total, 0);
    }

    #[tokio::test]
    async fn history_lost_between_the_phases_closes_with_overflow() {
        let ctx = history_ctx(2);
        let epoch = key_stream(&ctx);
        let mut c = Deferred::start(&ctx, &resume_auth(epoch, 0)).await;
        assert_eq!(c.next().await.0.op, op::AUTH_REPLY);
        // three pushes while unconfirmed: history keeps only the last two
        for b in ["m1", "m2", "m3"] {
            ctx.registry.push_key("k", 1000, &key_frame(b));
        }
        c.confirm(true);
        let (f, _) = c.next().await;
        assert_eq!(f.op, op::DISCONNECT_REPLY, "no push after the gap: {f:?}");
        let end = c.session.await.unwrap().unwrap();
        assert_eq!(end, SessionEnd::ServerClosed(CloseReason::Overflow));
        assert_eq!(ctx.registry.online().total, 0);
    }

    #[tokio::test]
    async fn an_unconfirmed_0rtt_auth_changes_nothing() {
        let ctx = history_ctx(100);
        let (live, _live_rx) =
            Channel::new(ctx.registry.next_id(), "k".into(), None, Transport::Quic, 8);
        ctx.registry
            .register(live.clone(), Some("r".into()), OpFilter::default())
            .unwrap();
        // a goim client: nothing at all before confirmation
        let mut goim = Deferred::start(&ctx, r#"{"key":"k","room_id":"other"}"#).await;
        goim.quiet().await;
        goim.confirm(false);
        assert_eq!(
            goim.session.await.unwrap().unwrap(),
            SessionEnd::Unconfirmed
        );
        // a resuming one: answered, then nothing
        let epoch = key_stream(&ctx);
        let mut resuming = Deferred::start(&ctx, &resume_auth(epoch, 0)).await;
        assert_eq!(resuming.next().await.0.op, op::AUTH_REPLY);
        resuming.confirm(false);
        assert_eq!(
            resuming.session.await.unwrap().unwrap(),
            SessionEnd::Unconfirmed
        );
        assert_eq!(ctx.registry.get("k").map(|c| c.id), Some(live.id));
        assert!(!live.is_closed());
        assert_eq!(ctx.registry.online().total, 1);
        assert_eq!(ctx.registry.rooms(), vec![("r".to_string(), 1)]);
    }

    #[tokio::test]
    async fn a_goim_client_gets_auth_reply_once_registered() {
        let ctx = history_ctx(100);
        let mut c = Deferred::start(&ctx, r#"{"key":"k"}"#).await;
        c.quiet().await;
        assert!(ctx.registry.get("k").is_none());
        c.confirm(true);
        let (f, _) = c.next().await;
        assert_eq!((f.op, f.body.len()), (op::AUTH_REPLY, 0));
        assert!(
            ctx.registry.get("k").is_some(),
            "registered before AuthReply"
        );
        c.write.shutdown().await.unwrap();
        assert_eq!(c.session.await.unwrap().unwrap(), SessionEnd::ClientClosed);
    }

    #[tokio::test]
    async fn runs_over_an_in_memory_connection() {
        let ctx = ctx();
        let input = frames(&[
            Frame::new(op::AUTH, 1, &br#"{"key":"k","room_id":"r"}"#[..]),
            Frame::new(op::HEARTBEAT, 2, Bytes::new()),
        ]);
        let (result, replies) = play(&ctx, &input).await;
        assert_eq!(result.unwrap(), SessionEnd::ClientClosed);
        let got: Vec<(u32, u32)> = replies.iter().map(|f| (f.op, f.seq)).collect();
        assert_eq!(got, [(op::AUTH_REPLY, 1), (op::HEARTBEAT_REPLY, 2)]);
        assert_eq!(&replies[1].body[..], &1u32.to_be_bytes());
        assert_eq!(ctx.registry.online().total, 0);
        assert!(ctx.registry.rooms().is_empty());
    }
}

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

//!
//! # 0-RTT, and what waits for handshake confirmation
//!
//! A returning client (one that kept its session ticket, see [`crate::tls`]) opens
//! its stream and sends Auth (with its resume positions) as 0-RTT data, in the
//! same flight as its ClientHello. Each connection is accepted with
//! [`quinn::Connecting::into_0rtt`], which on a server always succeeds: the session
//! starts at once, reads the early Auth, and answers with 0.5-RTT data (AuthReply
//! and the replay), which only the holder of the handshake keys can decrypt. So
//! the first missed push reaches a resuming client one round trip after it started.
//!
//! 0-RTT data can be replayed: anyone who recorded the client's first flight can
//! send it again. So the session is also handed the handshake's confirmation, and
//! everything with a side effect (registering the connection, replacing another
//! connection of the key, joining a room, any frame after Auth) waits for it (see
//! [`crate::session`]). Confirmation is the [`quinn::ZeroRttAccepted`] future
//! resolving while the connection is still open. On a server that future resolves
//! when quinn reports the handshake complete, which it does only after rustls has
//! verified the client's Finished: a MAC over the whole handshake under keys
//! derived from the resumed secret and a fresh (EC)DHE exchange with this server's
//! new key share. Whoever replays a recorded flight has neither the client's
//! ephemeral key nor its resumption secret, cannot produce that Finished, and its
//! connection is never confirmed. (The future also resolves when the connection
//! is lost; the connection is then closed, which is why the close reason is
//! checked: a false "confirmed" is impossible, a false "lost" only happens to a
//! connection that is gone anyway.)
//!
//! A replay meets two more walls before that. The ticket is single-use (stateful,
//! in this process), so a replay of a flight the server already took gets a full
//! handshake with no early data; and while the original connection lives, quinn
//! routes packets with its initial connection id to it, where they are dropped.
//! What is left is a replay that arrives first, the real flight being delayed or
//! blocked: its Auth is read and answered, nothing is registered, and the
//! connection is closed at the handshake deadline. The answer goes to the
//! replayer's address, at most three times the bytes it sent (QUIC's limit for an
//! unvalidated address), and is unreadable there.
//!
//! The handshake timeout is unchanged: a peer that has not completed the
//! handshake `client.handshake_timeout` after its first packet is closed with
//! [`code::NO_HANDSHAKE`] (a watchdog beside the session), so it holds its place
//! at most that long.
//!
//! # Unvalidated addresses, Retry, and when a connection is counted
//!
//! A UDP source address can be forged: a client Initial proves nothing about who
//! sent it. So a handshake from an address that has not been validated takes no
//! connection permit and no per-IP place; otherwise a flood of Initials from
//! forged addresses, none of which ever answers, would hold the permits for the
//! handshake timeout, starve the TCP accept loop waiting on the same limit, and
//! use up the quota of any address it names. Such handshakes have a budget of
//! their own instead ([`Unvalidated`], `quic.retry_threshold` in progress over
//! all client endpoints). Beyond it, each new one is answered with a Retry: a
//! token the client must echo from the address it claims, which a forger never
//! receives. (A returning client still gets its 0-RTT after a Retry: quinn
//! resends the early data with the token; `tests/quic_flood.rs` checks it.) `quic.retry_threshold = 0` validates
//! every address that way, at one round trip more per connection.
//!
//! A handshake is counted against the connection limit and its address's
//! per-IP limit once the address is proven: at accept when its Initial carries
//! our Retry token, otherwise when the handshake completes (the peer answered
//! from that address). Taking the permits never waits: when either limit is
//! full, the handshake is refused at accept, or the connection closed at
//! completion with [`code::CONN_LIMIT`] or [`code::IP_LIMIT`]. Until then the session may read a 0-RTT
//! Auth and answer it, but registers nothing: registration waits for the
//! handshake's confirmation, and confirmation includes being counted. So the
//! connection cap bounds the connections that exist for the registry, and at most
//! `quic.retry_threshold` unvalidated handshakes are in progress besides. An
//! unvalidated handshake from an address already at its limit is refused at
//! once: only proven connections fill an address's quota, so that refusal
//! cannot be caused by a forger.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::task::TaskTracker;
use tracing::{debug, field, info, info_span, warn, Instrument};

use super::{refused, ConnLimits, ConnPermits, Refusal};
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
    /// The handshake was not completed within `client.handshake_timeout`.
    pub const NO_HANDSHAKE: u32 = 4;
    /// The handshake completed with the connection limit reached.
    pub const CONN_LIMIT: u32 = 5;
}

/// Random bytes in each server connection ID: quinn's default generator has 3
/// (24 bits), and a Retry's source connection ID is drawn without a check for
/// IDs in use (quinn-proto `Endpoint::retry`). The client's token'd Initials go
/// to that ID, and the endpoint routes an Initial by its destination ID alone
/// (to a connection holding it as a local ID, or to the Incoming/connection
/// started by another client's Initial to the same ID), so with thousands of
/// connections a collision was likely and its client got no answer until its
/// idle timeout. With 8 bytes a collision is negligible.
const CID_NONCE_LEN: usize = 8;
/// A keyed hash of the random bytes, so that a short-header packet with an ID
/// we never issued is dropped without a stateless reset, as with quinn's default.
const CID_TAG_LEN: usize = 4;

/// The server's connection ID generator: [`CID_NONCE_LEN`] random bytes and a
/// [`CID_TAG_LEN`]-byte SipHash of them under a per-endpoint random key.
pub struct CidGenerator {
    key: std::collections::hash_map::RandomState,
}

impl CidGenerator {
    pub fn new() -> Self {
        CidGenerator {
            key: std::collections::hash_map::RandomState::new(),
        }
    }

    fn tag(&self, nonce: &[u8]) -> [u8; CID_TAG_LEN] {
        use std::hash::{BuildHasher, Hasher};
        let mut h = self.key.build_hasher();
        h.write(nonce);
        let mut tag = [0; CID_TAG_LEN];
        tag.copy_from_slice(&h.finish().to_le_bytes()[..CID_TAG_LEN]);
        tag
    }
}

impl Default for CidGenerator {
    fn default() -> Self {
        Self::new()
    }
}

impl quinn::ConnectionIdGenerator for CidGenerator {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        use rand::RngCore;
        let mut bytes = [0; CID_NONCE_LEN + CID_TAG_LEN];
        rand::thread_rng().fill_bytes(&mut bytes[..CID_NONCE_LEN]);
        let tag = self.tag(&bytes[..CID_NONCE_LEN]);
        bytes[CID_NONCE_LEN..].copy_from_slice(&tag);
        quinn::ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &quinn::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() == CID_NONCE_LEN + CID_TAG_LEN
            && self.tag(&cid[..CID_NONCE_LEN]) == cid[CID_NONCE_LEN..]
        {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_NONCE_LEN + CID_TAG_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Handshakes in progress from addresses not validated yet, over all client
/// endpoints, and how many may be (see the module docs).
#[derive(Debug)]
pub struct Unvalidated {
    threshold: usize,
    in_progress: AtomicUsize,
}

/// One unvalidated handshake's place in [`Unvalidated`], given back on drop.
#[derive(Debug)]
struct UnvalidatedPlace(Arc<Unvalidated>);

impl Unvalidated {
    /// A budget of `threshold` handshakes (`quic.retry_threshold`); 0: every
    /// address is validated with a Retry.
    pub fn new(threshold: usize) -> Self {
        Unvalidated {
            threshold,
            in_progress: AtomicUsize::new(0),
        }
    }

    /// Unvalidated handshakes in progress.
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Relaxed)
    }

    /// A place for one more, unless `threshold` are in progress.
    fn try_enter(self: &Arc<Self>) -> Option<UnvalidatedPlace> {
        self.in_progress
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.threshold).then_some(n + 1)
            })
            .ok()?;
        Some(UnvalidatedPlace(self.clone()))
    }
}

impl Drop for UnvalidatedPlace {
    fn drop(&mut self) {
        self.0.in_progress.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's permits: taken at accept for a validated address, when the
/// handshake completes otherwise (`None` until then). Shared by the stream
/// reader, which moves the per-IP place as the connection migrates, and the
/// handshake's confirmation, which fills it; locked only briefly, never across
/// an await.
type Counted = Arc<Mutex<Option<ConnPermits>>>;

/// How an accepted handshake is to be counted.
#[derive(Debug)]
enum Admission {
    /// Its address is validated: its permits are taken.
    Counted(ConnPermits),
    /// Not yet: it holds a place among the unvalidated handshakes, and is counted
    /// when the handshake completes.
    Unvalidated(UnvalidatedPlace),
}

/// The global and per-IP permits for a connection from `remote`, without waiting.
fn permits(limits: &ConnLimits, remote: std::net::SocketAddr) -> Result<ConnPermits, Refusal> {
    let total = limits
        .total
        .clone()
        .try_acquire_owned()
        .map_err(|_| Refusal::QuicLimit)?;
    let ip = limits
        .per_ip
        .try_acquire(remote.ip())
        .ok_or(Refusal::QuicPerIp)?;
    Ok(ConnPermits::new(total, ip))
}

/// Takes the connection's permits for the address it is reached at now: the
/// connection has proven that address.
fn count(limits: &ConnLimits, conn: &quinn::Connection, counted: &Counted) -> Result<(), Refusal> {
    *counted.lock() = Some(permits(limits, conn.remote_address())?);
    Ok(())
}

/// A client's stream reader that keeps the connection's per-IP permit on the
/// address the connection is currently reached at (see the module docs).
#[derive(Debug)]
pub struct FollowPath {
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    counted: Counted,
}

impl FollowPath {
    /// Reads `recv`, moving the per-IP place in `counted` as `conn` migrates.
    fn new(recv: quinn::RecvStream, conn: quinn::Connection, counted: Counted) -> Self {
        FollowPath {
            recv,
            conn,
            counted,
        }
    }

    /// Moves the permit to the connection's current address, or closes the
    /// connection if that address has no room. Before the connection is counted
    /// there is nothing to move: it is counted where its handshake completes.
    fn follow(&mut self) -> io::Result<()> {
        let remote = self.conn.remote_address();
        let (from, moved) = {
            let mut counted = self.counted.lock();
            let Some(permits) = counted.as_mut() else {
                return Ok(());
            };
            let from = permits.ip.ip();
            if remote.ip() == from {
                return Ok(());
            }
            (from, permits.ip.move_to(remote.ip()))
        };
        if moved {
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

/// Why a handshake was not confirmed.
#[derive(Debug, Clone)]
enum Unconfirmed {
    /// Not within `client.handshake_timeout` of the first packet.
    TimedOut,
    /// The connection failed or closed first.
    Lost(quinn::ConnectionError),
    /// The handshake completed, but a limit had no room for the connection.
    Refused(Refusal),
}

/// The handshake's confirmation, awaited by the session and the watchdog alike.
type Confirmation = Shared<BoxFuture<'static, Result<(), Unconfirmed>>>;

/// Serves one accepted connection to its end.
async fn connection(
    incoming: quinn::Incoming,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    admission: Admission,
) {
    let timeout = ctx.limits.handshake_timeout;
    let deadline = tokio::time::Instant::now() + timeout;
    let counted: Counted = Arc::new(Mutex::new(None));
    let unvalidated = match admission {
        Admission::Counted(permits) => {
            *counted.lock() = Some(permits);
            None
        }
        Admission::Unvalidated(place) => Some(place),
    };
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "QUIC handshake failed");
            return;
        }
    };
    // On the server this always succeeds: 0-RTT keys if the client sent early
    // data that its ticket allows, 0.5-RTT keys otherwise.
    let (conn, confirmed): (quinn::Connection, Confirmation) = match connecting.into_0rtt() {
        Ok((conn, accepted)) => {
            let c = conn.clone();
            let counted = counted.clone();
            let confirmed = async move {
                // Resolves at handshake completion, which a server reaches only
                // with the client's Finished, or at connection loss.
                tokio::time::timeout_at(deadline, accepted)
                    .await
                    .map_err(|_| Unconfirmed::TimedOut)?;
                if let Some(e) = c.close_reason() {
                    return Err(Unconfirmed::Lost(e));
                }
                // The peer answered from its address: it leaves the unvalidated
                // handshakes and is counted.
                if let Some(place) = unvalidated {
                    drop(place);
                    count(&limits, &c, &counted).map_err(Unconfirmed::Refused)?;
                }
                Ok(())
            };
            (conn, confirmed.boxed().shared())
        }
        Err(connecting) => match tokio::time::timeout_at(deadline, connecting).await {
            Ok(Ok(conn)) => {
                let result = match unvalidated {
                    Some(place) => {
                        drop(place);
                        count(&limits, &conn, &counted).map_err(Unconfirmed::Refused)
                    }
                    None => Ok(()),
                };
                (conn, async move { result }.boxed().shared())
            }
            Ok(Err(e)) => {
                warn!(error = %e, "QUIC handshake failed");
                return;
            }
            Err(_) => {
                warn!(?timeout, "QUIC handshake not completed in time");
                return;
            }
        },
    };
    // A peer that starts a handshake and does not finish it holds its permit only
    // until the deadline: then its connection is closed, whatever the session does.
    let watchdog = {
        let conn = conn.clone();
        let confirmed = confirmed.clone();
        async move {
            match confirmed.await {
                Ok(()) => {}
                // The peer's failure, not the server's (and what a replayed 0-RTT
                // flight comes to): info, not warn.
                Err(Unconfirmed::TimedOut) => {
                    info!(?timeout, "QUIC handshake not completed in time");
                    conn.close(code::NO_HANDSHAKE.into(), b"handshake timeout");
                }
                Err(Unconfirmed::Lost(e)) => info!(error = %e, "QUIC handshake failed"),
                Err(Unconfirmed::Refused(reason)) => {
                    refused(reason, conn.remote_address());
                    match reason {
                        Refusal::QuicPerIp => {
                            conn.close(code::IP_LIMIT.into(), b"per-IP connection limit")
                        }
                        _ => conn.close(code::CONN_LIMIT.into(), b"connection limit"),
                    }
                }
            }
            std::future::pending::<Infallible>().await
        }
    };
    // Boxed: the session's state machine lives in one allocation of its own
    // size, rather than being copied into this future beside the handshake's
    // (an idle connection holds this for hours).
    let served = Box::pin(async {
        // The handshake gets its deadline (the watchdog), then the stream as long again.
        let (send, recv) = match tokio::time::timeout_at(deadline + timeout, conn.accept_bi()).await
        {
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
        let recv = FollowPath::new(recv, conn.clone(), counted.clone());
        let confirmed = confirmed.clone().map(|r| r.is_ok()).boxed();
        let metrics = ctx.metrics.clone();
        let result = session::run(ctx, recv, send, Transport::Quic, Some(confirmed)).await;
        super::log_end(&metrics, &result);
    });
    tokio::select! {
        () = served => {}
        never = watchdog => match never {},
    }
    conn.close(code::DONE.into(), b"bye");
}

/// Accepts QUIC clients until shutdown; `unvalidated` is shared by every client
/// endpoint.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<SessionContext>,
    limits: ConnLimits,
    unvalidated: Arc<Unvalidated>,
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
        let admission = if incoming.remote_address_validated() {
            // It echoed our Retry token from this address: counted from now on.
            // Over a limit the handshake is refused before any work.
            match permits(&limits, remote) {
                Ok(p) => Admission::Counted(p),
                Err(reason) => {
                    refused(reason, remote);
                    incoming.refuse();
                    continue;
                }
            }
        } else {
            // Only proven connections hold permits, so these checks cannot be
            // tripped by a forger; they spare a handshake that would be refused.
            if limits.total.available_permits() == 0 {
                refused(Refusal::QuicLimit, remote);
                incoming.refuse();
                continue;
            }
            if limits.per_ip.is_full(remote.ip()) {
                refused(Refusal::QuicPerIp, remote);
                incoming.refuse();
                continue;
            }
            match unvalidated.try_enter() {
                Some(place) => Admission::Unvalidated(place),
                None => {
                    refused(Refusal::QuicRetry, remote);
                    // Unvalidated, so a Retry is always possible.
                    if let Err(e) = incoming.retry() {
                        e.into_incoming().ignore();
                    }
                    continue;
                }
            }
        };
        let span = info_span!("conn", transport = "quic", remote = %remote, key = field::Empty);
        let ctx = ctx.clone();
        let limits = limits.clone();
        tracker.spawn(connection(incoming, ctx, limits, admission).instrument(span));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::ConnectionIdGenerator;

    /// 100,000 IDs, as many as a busy endpoint issues (Retries included), without
    /// a repeat: quinn's default generator (24 random bits) repeats within a few
    /// thousand, which left a Retry'd client unanswered.
    #[test]
    fn cids_do_not_repeat_and_validate() {
        let mut g = CidGenerator::new();
        assert_eq!(g.cid_len(), 12);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let cid = g.generate_cid();
            assert_eq!(cid.len(), 12);
            assert!(g.validate(&cid).is_ok());
            assert!(seen.insert(cid), "connection ID repeated");
        }
        // An ID this generator did not issue (another key, a flipped byte, another
        // length) is told apart.
        let cid = g.generate_cid();
        assert!(CidGenerator::new().validate(&cid).is_err());
        let mut bytes = cid.to_vec();
        bytes[0] ^= 1;
        assert!(g.validate(&quinn::ConnectionId::new(&bytes)).is_err());
        assert!(g.validate(&quinn::ConnectionId::new(&bytes[..8])).is_err());
    }
}

//! Soak test: a real `quicpush serve` child process under about a minute of mixed
//! traffic, checked message by message.
//!
//! Clients (2,000 by default, about half over TCP and half over QUIC) connect,
//! disconnect, resume and change rooms at random, while four backends, each on its
//! own RPC connection, push by key (`PushMsg`, `MPushMsg`, `MPushMsgs`), by user id
//! (`PushUser`; two clients share each user id), to rooms (`BroadcastRoom`) and to
//! everyone (`Broadcast`), each at a paced, bounded rate with one call in flight,
//! against a `quicpush serve` child process on loopback ports.
//!
//! Every message body carries its kind, its backend, the backend's sequence number
//! and its target, so the clients and the final check know what each one is:
//!
//! - A quarter of the clients are *stable*: connected for the whole run (they still
//!   change rooms). Each must receive exactly once every key push reported
//!   `Delivered` to its key, every user push to its user id and every room push
//!   made while it was in that room for the whole call (both when the call's tally
//!   shows no full queue), and every broadcast; and nothing else.
//! - A tenth of the clients *resume* (over TCP and QUIC, a transport picked per
//!   connection): each stays in one room and keeps one `ResumeState` for the round,
//!   negotiates resume in every Auth, and again and again loses its connection
//!   (closed abruptly or gracefully without reading what is queued, replaced by its
//!   own next connection, whose Auth carries the positions read so far, or kicked
//!   by a backend and read to its DisconnectReply), then resumes after up to 1.5 s.
//!   Connected before the load starts and reading its last connection to the end
//!   marker, it must receive, exactly once across all its connections, every push
//!   to its key reported `Delivered` or `Stored` (and every push to its key must be
//!   one of those: its stream is live all round), every user push to its user id
//!   and room push to its room (each call's tally must show it appended to those
//!   streams: `Tally.appended`), and every broadcast; nothing else. On each of its
//!   connections every push carries the resume extension, and each source's
//!   offsets follow on from the last one received (or from AuthReply's top) by one,
//!   in one epoch; AuthReply names its key and all four sources, and every resume
//!   recovers every source: one "not recovered" fails the test. The server keeps
//!   history for keys, user ids, rooms and broadcasts, sized from the load (see
//!   `history_plan`). What a replaced connection still delivers is not taken (the
//!   new connection resumed before it), but its push seq is checked and it must end
//!   with DisconnectReply.
//! - The other clients *churn*: they connect over either transport, change rooms,
//!   close gracefully or abruptly, or open a new connection with the same key so the
//!   server replaces the old one (which must end with DisconnectReply). A churning
//!   client may miss what was queued for a connection it closed, but never receives
//!   a message twice or one not meant for it.
//! - On every connection the server's push sequence runs 1, 2, 3, ... without a gap,
//!   and for each client the messages of one backend arrive in the order the backend
//!   sent them (synchronous pushes and broadcasts are each in order; broadcasts are
//!   accepted before they are delivered, so they keep no order with the rest; a
//!   resume replays each source in turn, so a resuming client's order is checked
//!   per source). Pushes to keys of clients that are away report `Stored` (their
//!   key's history is live): only `Delivered` ones are owed to stable clients.
//! - A room push reaches a client only in its current room, or in the room it is
//!   moving to (between ChangeRoom and ChangeRoomReply).
//! - After every client left, the server reports no connection and no room; it
//!   logged no error and no panic, and it exits 0 on SIGTERM.
//!
//! The load runs twice: a warm-up round of the same duration, then the soak.
//! The server's RSS after the soak (and 5 s idle) must be within 10% of its level
//! before the soak (after the warm-up, every client gone, 5 s idle): the allocator
//! keeps what a load once needed, so a server without a leak ends the soak near
//! that level, while a leak grows with the connections and messages served, and
//! the soak serves twice as many. The server's history is bounded so that it fills
//! during the warm-up, so it is part of that level. The level before any client
//! (started, one backend connected: about 8.5 MiB, nearly all of it the binary's
//! pages) is printed too, but is no bar:
//! glibc's malloc keeps the memory freed after a load peak in its per-thread arenas
//! (about 40 MiB after 2,000 clients), and long-lived pools (log spans, QUIC
//! connection-id tables, the registry's slabs) keep their peak size.
//!
//! Run (release: the soak measures the server as it is deployed):
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! `QUICPUSH_SOAK_SECS` (default 60) sets the soak's duration, `QUICPUSH_SOAK_CLIENTS`
//! (default 2000) the clients, `QUICPUSH_SOAK_SEED` the random seed (printed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::{AddAssign, RangeInclusive};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use quicpush::auth;
use quicpush::bench::process::{ProcStat, ServerProcess};
use quicpush::channel::PushOutcome;
use quicpush::client::{PushClient, Reader, ResumeState, Writer};
use quicpush::history::memory::ENTRY_OVERHEAD;
use quicpush::protocol::{self, op, Frame, PushMeta, Source, HEADER_LEN, MAX_BODY_LIMIT};
use quicpush::registry::Tally;
use quicpush::resume::{Position, ResumeReply};
use quicpush::rpc::proto::PushItem;
use quicpush::rpc::Client;
use quicpush::tls::BackendIdentity;
use quicpush::Config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The op of every pushed message.
const OP: u32 = 1000;
/// Backends, each with its own RPC connection.
const BACKENDS: usize = 4;
/// Calls per second per backend (one call in flight at a time).
const CALLS_PER_SEC: f64 = 150.0;
/// The backends' calls, per mille: PushMsg, MPushMsg, MPushMsgs, PushUser,
/// BroadcastRoom, Broadcast.
const MIX: [(Call, u32); 6] = [
    (Call::PushMsg, 500),
    (Call::MPushMsg, 120),
    (Call::MPushMsgs, 120),
    (Call::PushUser, 120),
    (Call::BroadcastRoom, 130),
    (Call::Broadcast, 10),
];
/// Keys one MPushMsg call pushes to, and messages in one MPushMsgs call.
const KEYS_PER_CALL: RangeInclusive<usize> = 2..=24;
/// User ids one PushUser call pushes to.
const MIDS_PER_CALL: RangeInclusive<usize> = 1..=4;
/// Rooms the clients move between.
const ROOMS: u32 = 16;
/// Shared client endpoints (UDP sockets) for the QUIC clients.
const QUIC_ENDPOINTS: usize = 8;
/// Longest a connect + auth may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest the stable clients wait for the end marker after the load stopped.
const END_WAIT: Duration = Duration::from_secs(60);
/// Longest the server may take to report no connection and no room.
const EMPTY_WAIT: Duration = Duration::from_secs(30);
/// How long the server may idle before its memory is measured again.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(5);
/// Allowed growth of the server's RSS over the soak, from its level before it.
const RSS_TOLERANCE: f64 = 0.10;
/// Failure descriptions kept per client (the rest are only counted).
const KEEP_EXAMPLES: usize = 5;
/// How long a resuming client's connection lives before it loses it (seconds).
const RESUMING_STAY: (f64, f64) = (0.3, 4.0);
/// How long a resuming client stays away after losing a connection (seconds).
const RESUMING_AWAY: (f64, f64) = (0.0, 1.5);
/// The shortest time the server's history holds (seconds), whatever the warm-up's
/// length: a resuming client's outage is its time away plus a connect.
const MIN_HISTORY_WINDOW: f64 = 8.0;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

fn key_of(client: u32) -> String {
    format!("soak-{client}")
}

/// Two clients share each user id.
fn mid_of(client: u32) -> i64 {
    1 + i64::from(client / 2)
}

fn room_name(room: u32) -> String {
    format!("soak://room/{room}")
}

/// A quarter of the clients stay connected for the whole run, as many over TCP
/// (even indexes) as over QUIC (odd), each sharing its user id with a churning one.
fn is_stable(client: u32) -> bool {
    matches!(client % 8, 0 | 3)
}

/// A tenth of the clients resume: never stable, and none shares its user id with
/// another resuming client (two share it with a stable client, over TCP and QUIC,
/// two with a churning one). Each picks a transport per connection.
fn is_resuming(client: u32) -> bool {
    matches!(client % 40, 1 | 2 | 22 | 31)
}

fn stable_via(client: u32) -> Via {
    if client % 2 == 0 {
        Via::Tcp
    } else {
        Via::Quic
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Tcp,
    Quic,
}

// ---------------------------------------------------------------------------
// Message bodies

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// PushMsg: one key.
    Key = 1,
    /// MPushMsg: one body to many keys.
    Keys = 2,
    /// One message of an MPushMsgs call, to one key.
    Item = 3,
    /// PushUser.
    User = 4,
    /// BroadcastRoom.
    Room = 5,
    /// Broadcast.
    Broadcast = 6,
    /// The broadcast that ends the run.
    End = 7,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Key,
            2 => Kind::Keys,
            3 => Kind::Item,
            4 => Kind::User,
            5 => Kind::Room,
            6 => Kind::Broadcast,
            7 => Kind::End,
            _ => return None,
        })
    }
}

/// `target` of messages sent to several keys or user ids, or to everyone.
const NO_TARGET: u32 = u32::MAX;
const BODY_HEAD: usize = 10;

/// Padding, so that bodies of different sizes pass through the queues.
fn pad_len(backend: u8, seq: u32) -> usize {
    (seq as usize)
        .wrapping_mul(37)
        .wrapping_add(backend as usize * 11)
        % 240
}

/// `kind u8 | backend u8 | seq u32 | target u32 | padding`.
fn body(kind: Kind, backend: u8, seq: u32, target: u32) -> Bytes {
    let pad = pad_len(backend, seq);
    let mut b = BytesMut::with_capacity(BODY_HEAD + pad);
    b.put_u8(kind as u8);
    b.put_u8(backend);
    b.put_u32(seq);
    b.put_u32(target);
    b.put_bytes(b'.', pad);
    b.freeze()
}

#[derive(Debug, Clone, Copy)]
struct Msg {
    kind: Kind,
    backend: u8,
    seq: u32,
    target: u32,
}

fn parse(mut b: &[u8]) -> Option<Msg> {
    if b.len() < BODY_HEAD {
        return None;
    }
    let full = b;
    let kind = Kind::from_u8(b.get_u8())?;
    let backend = b.get_u8();
    let seq = b.get_u32();
    let target = b.get_u32();
    if backend as usize >= BACKENDS && kind != Kind::End {
        return None;
    }
    let pad = pad_len(backend, seq);
    if full.len() != BODY_HEAD + pad || b.iter().any(|&c| c != b'.') {
        return None;
    }
    Some(Msg {
        kind,
        backend,
        seq,
        target,
    })
}

/// A message's identity: its backend and that backend's sequence number.
fn msg_id(backend: u8, seq: u32) -> u64 {
    (u64::from(seq) << 8) | u64::from(backend)
}

// ---------------------------------------------------------------------------
// Backends

/// A backend call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    PushMsg,
    MPushMsg,
    MPushMsgs,
    PushUser,
    BroadcastRoom,
    Broadcast,
}

impl Call {
    /// The call for a draw in `0..1000`, by [`MIX`].
    fn pick(draw: u32) -> Call {
        let mut upto = 0;
        for (call, permille) in MIX {
            upto += permille;
            if draw < upto {
                return call;
            }
        }
        MIX[MIX.len() - 1].0
    }

    /// Calls per second of this kind, over all backends.
    fn rate(self) -> f64 {
        let permille = MIX.iter().find(|(c, _)| *c == self).map_or(0, |m| m.1);
        BACKENDS as f64 * CALLS_PER_SEC * f64::from(permille) / 1000.0
    }
}

/// Who a message was sent to and what the server answered.
#[derive(Debug, Clone)]
enum Target {
    /// PushMsg or one MPushMsgs message: the client and its outcome.
    Key {
        client: u32,
        outcome: PushOutcome,
    },
    /// MPushMsg: each client and its outcome.
    Keys(Vec<(u32, PushOutcome)>),
    User {
        mids: Vec<i64>,
        tally: Tally,
    },
    Room {
        room: u32,
        tally: Tally,
    },
    Broadcast,
}

#[derive(Debug, Clone)]
struct Sent {
    target: Target,
    sent_at: Instant,
    replied_at: Instant,
    /// The call failed: the push may or may not have happened.
    failed: bool,
}

#[derive(Debug, Default)]
struct BackendLog {
    /// Indexed by sequence number - 1.
    sent: Vec<Sent>,
    calls: HashMap<&'static str, u64>,
    errors: Vec<String>,
}

struct Backend {
    id: u8,
    rpc: Arc<Client>,
    clients: u32,
    until: Instant,
    max_calls: u64,
    rng: StdRng,
    log: BackendLog,
}

impl Backend {
    fn next_seq(&self) -> u32 {
        self.log.sent.len() as u32 + 1
    }

    fn record(&mut self, target: Target, sent_at: Instant, failed: bool) {
        self.log.sent.push(Sent {
            target,
            sent_at,
            replied_at: Instant::now(),
            failed,
        });
    }

    fn error(&mut self, method: &str, e: impl std::fmt::Display) {
        self.log
            .errors
            .push(format!("backend {} {method}: {e}", self.id));
    }

    /// A call's value, or (after recording the error) `on_error`; and whether it failed.
    fn settle<T, E: std::fmt::Display>(
        &mut self,
        method: &str,
        result: Result<T, E>,
        on_error: T,
    ) -> (T, bool) {
        match result {
            Ok(v) => (v, false),
            Err(e) => {
                self.error(method, e);
                (on_error, true)
            }
        }
    }

    fn random_client(&mut self) -> u32 {
        self.rng.gen_range(0..self.clients)
    }

    /// Pushes until `until`, `CALLS_PER_SEC` calls a second, one at a time, so each
    /// call's pushes are queued before the next call starts.
    async fn run(mut self) -> BackendLog {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / CALLS_PER_SEC));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut calls = 0u64;
        while Instant::now() < self.until && calls < self.max_calls {
            tick.tick().await;
            calls += 1;
            match Call::pick(self.rng.gen_range(0..1000)) {
                Call::PushMsg => self.push_msg().await,
                Call::MPushMsg => self.mpush_msg().await,
                Call::MPushMsgs => self.mpush_msgs().await,
                Call::PushUser => self.push_user().await,
                Call::BroadcastRoom => self.broadcast_room().await,
                Call::Broadcast => self.broadcast().await,
            }
        }
        self.log
    }

    fn count(&mut self, method: &'static str) {
        *self.log.calls.entry(method).or_default() += 1;
    }

    async fn push_msg(&mut self) {
        self.count("PushMsg");
        let client = self.random_client();
        let seq = self.next_seq();
        let b = body(Kind::Key, self.id, seq, client);
        let at = Instant::now();
        let result = self.rpc.push_msg(key_of(client), OP, b).await;
        let (outcome, failed) = self.settle("PushMsg", result, PushOutcome::Delivered);
        self.record(Target::Key { client, outcome }, at, failed);
    }

    async fn mpush_msg(&mut self) {
        self.count("MPushMsg");
        let n = self.rng.gen_range(KEYS_PER_CALL).min(self.clients as usize);
        let clients: Vec<u32> = rand::seq::index::sample(&mut self.rng, self.clients as usize, n)
            .into_iter()
            .map(|c| c as u32)
            .collect();
        let seq = self.next_seq();
        let b = body(Kind::Keys, self.id, seq, NO_TARGET);
        let keys = clients.iter().map(|&c| key_of(c)).collect();
        let at = Instant::now();
        match self.rpc.mpush_msg(keys, OP, b).await {
            Ok(m) if m.outcomes.len() == clients.len() => {
                let t = Target::Keys(clients.into_iter().zip(m.outcomes).collect());
                self.record(t, at, false);
            }
            r => {
                self.error("MPushMsg", format!("{r:?}"));
                let t = Target::Keys(
                    clients
                        .into_iter()
                        .map(|c| (c, PushOutcome::Delivered))
                        .collect(),
                );
                self.record(t, at, true);
            }
        }
    }

    async fn mpush_msgs(&mut self) {
        self.count("MPushMsgs");
        let n = self.rng.gen_range(KEYS_PER_CALL);
        let first = self.next_seq();
        let clients: Vec<u32> = (0..n).map(|_| self.random_client()).collect();
        let msgs = clients
            .iter()
            .enumerate()
            .map(|(i, &c)| PushItem {
                key: key_of(c),
                op: OP,
                body: body(Kind::Item, self.id, first + i as u32, c),
            })
            .collect();
        let at = Instant::now();
        let (outcomes, failed) = match self.rpc.mpush_msgs(msgs).await {
            Ok(m) if m.outcomes.len() == n => (m.outcomes, false),
            r => {
                self.error("MPushMsgs", format!("{r:?}"));
                (vec![PushOutcome::Delivered; n], true)
            }
        };
        for (client, outcome) in clients.into_iter().zip(outcomes) {
            self.record(Target::Key { client, outcome }, at, failed);
        }
    }

    async fn push_user(&mut self) {
        self.count("PushUser");
        let users = (self.clients as usize).div_ceil(2);
        let n = self.rng.gen_range(MIDS_PER_CALL).min(users);
        let mids: Vec<i64> = rand::seq::index::sample(&mut self.rng, users, n)
            .into_iter()
            .map(|u| 1 + u as i64)
            .collect();
        let seq = self.next_seq();
        let b = body(Kind::User, self.id, seq, NO_TARGET);
        let at = Instant::now();
        let result = self.rpc.push_user(mids.clone(), OP, b).await;
        let (tally, failed) = self.settle("PushUser", result, Tally::default());
        self.record(Target::User { mids, tally }, at, failed);
    }

    async fn broadcast_room(&mut self) {
        self.count("BroadcastRoom");
        let room = self.rng.gen_range(0..ROOMS);
        let seq = self.next_seq();
        let b = body(Kind::Room, self.id, seq, room);
        let at = Instant::now();
        let result = self.rpc.broadcast_room(room_name(room), OP, b).await;
        let (tally, failed) = self.settle("BroadcastRoom", result, Tally::default());
        self.record(Target::Room { room, tally }, at, failed);
    }

    async fn broadcast(&mut self) {
        self.count("Broadcast");
        let seq = self.next_seq();
        let b = body(Kind::Broadcast, self.id, seq, NO_TARGET);
        let at = Instant::now();
        let result = self.rpc.broadcast(OP, b, 0).await.map(|_| ());
        let ((), failed) = self.settle("Broadcast", result, ());
        self.record(Target::Broadcast, at, failed);
    }
}

// ---------------------------------------------------------------------------
// Clients

/// What every client needs to connect.
struct Dial {
    tcp: SocketAddr,
    quic: SocketAddr,
    quic_config: quinn::ClientConfig,
    endpoints: Vec<quinn::Endpoint>,
    secret: Vec<u8>,
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// TCP: FIN; QUIC: the stream finished, then the connection closed.
    Graceful,
    /// TCP: RST (zero linger); QUIC: the connection closed at once with an error code.
    Abrupt,
}

/// One client connection, authenticated.
struct Conn {
    reader: Reader,
    writer: Writer,
    buf: BytesMut,
    quic: Option<quinn::Connection>,
    /// The connection's own state, as the client sees it.
    push_seq: u32,
    room: Option<u32>,
    /// A ChangeRoom was sent and its reply has not arrived: the room it asked for.
    pending: Option<Option<u32>>,
    /// Client frames sent (their seq).
    seq: u32,
    /// The connection negotiated resume: pushes carry the extension.
    resume: bool,
}

/// How a resuming client loses a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Closed abruptly, without reading what is queued.
    Abrupt,
    /// Closed gracefully, without reading what is queued.
    Graceful,
    /// Replaced by the client's own next connection, which resumes from what it
    /// read on this one; what this one still delivers is not taken.
    Replaced,
    /// Kicked by a backend: read to its end (DisconnectReply), then resumed.
    Kicked,
}

impl Loss {
    fn random(rng: &mut StdRng) -> Loss {
        match rng.gen_range(0..10) {
            0..=2 => Loss::Abrupt,
            3..=5 => Loss::Graceful,
            6..=7 => Loss::Replaced,
            _ => Loss::Kicked,
        }
    }

    /// How the socket is set up and closed.
    fn ending(self) -> Ending {
        match self {
            Loss::Abrupt => Ending::Abrupt,
            _ => Ending::Graceful,
        }
    }
}

impl Dial {
    async fn connect(
        &self,
        client: u32,
        via: Via,
        room: Option<u32>,
        ending: Ending,
    ) -> Result<Conn, String> {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.connect_inner(client, via, room, ending),
        )
        .await
        .map_err(|_| format!("connect over {via:?} took over {CONNECT_TIMEOUT:?}"))?
    }

    /// Connects and authenticates asking for resume from `state`'s positions,
    /// which AuthReply's answer updates.
    async fn connect_resume(
        &self,
        client: u32,
        via: Via,
        room: u32,
        ending: Ending,
        state: &mut ResumeState,
    ) -> Result<(Conn, ResumeReply), String> {
        let connect = async {
            let mut pc = self.open(client, via, ending).await?;
            let token = self.token(client, Some(room))?;
            let reply = pc
                .auth_resume(token.as_bytes(), state)
                .await
                .map_err(|e| format!("auth with resume: {e}"))?;
            Ok((Conn::new(pc, Some(room), true), reply))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| format!("connect over {via:?} took over {CONNECT_TIMEOUT:?}"))?
    }

    fn token(&self, client: u32, room: Option<u32>) -> Result<String, String> {
        let mut claims = auth::claims_for(&key_of(client), Duration::from_secs(86_400));
        claims.mid = Some(mid_of(client));
        claims.room_id = room.map(room_name);
        auth::issue(&self.secret, &claims).map_err(|e| e.to_string())
    }

    async fn connect_inner(
        &self,
        client: u32,
        via: Via,
        room: Option<u32>,
        ending: Ending,
    ) -> Result<Conn, String> {
        let mut pc = self.open(client, via, ending).await?;
        let token = self.token(client, room)?;
        pc.auth(token).await.map_err(|e| format!("auth: {e}"))?;
        Ok(Conn::new(pc, room, false))
    }

    /// A connection, not yet authenticated.
    async fn open(&self, client: u32, via: Via, ending: Ending) -> Result<PushClient, String> {
        Ok(match via {
            Via::Tcp => {
                let stream = tokio::net::TcpStream::connect(self.tcp)
                    .await
                    .map_err(|e| format!("TCP connect: {e}"))?;
                let _ = stream.set_nodelay(true);
                if ending == Ending::Abrupt {
                    // Dropping the socket then resets the connection.
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(Duration::ZERO));
                }
                let (r, w) = stream.into_split();
                PushClient::from_parts(Box::new(r), Box::new(w), None)
            }
            Via::Quic => {
                let ep = &self.endpoints[client as usize % self.endpoints.len()];
                let conn = ep
                    .connect_with(self.quic_config.clone(), self.quic, "localhost")
                    .map_err(|e| format!("QUIC connect: {e}"))?
                    .await
                    .map_err(|e| format!("QUIC handshake: {e}"))?;
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| format!("QUIC stream: {e}"))?;
                PushClient::from_parts(Box::new(recv), Box::new(send), Some((conn, ep.clone())))
            }
        })
    }
}

impl Conn {
    /// The connection of an authenticated client.
    fn new(pc: PushClient, room: Option<u32>, resume: bool) -> Conn {
        let (reader, writer, buf, quic) = pc.into_parts();
        Conn {
            reader,
            writer,
            buf,
            quic: quic.map(|(c, _)| c),
            push_seq: 0,
            room,
            pending: None,
            // the Auth frame was 1
            seq: 1,
            resume,
        }
    }
    async fn send(&mut self, op: u32, body: impl Into<Bytes>) -> Result<(), String> {
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(op, self.seq, body).to_bytes();
        let write = async {
            self.writer.write_all(&frame).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .map_err(|_| "write timed out".to_string())?
            .map_err(|e| format!("write: {e}"))
    }

    async fn change_room(&mut self, room: Option<u32>) -> Result<(), String> {
        let name = room.map(room_name).unwrap_or_default();
        self.pending = Some(room);
        self.send(op::CHANGE_ROOM, name).await
    }

    /// Reads more bytes; `Ok(false)` at the end of the stream.
    async fn fill(&mut self) -> Result<bool, String> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.reader.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            // QUIC: the server closing the connection after the stream reads as an error.
            Err(_) if self.quic.is_some() => Ok(false),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// The next whole frame and, on a resume-capable connection, its extension. A
    /// connection that did not negotiate resume refuses an extension (headerLen 32).
    fn next_frame(&mut self) -> Result<Option<(Frame, Option<PushMeta>)>, String> {
        if self.resume {
            protocol::decode_server(&mut self.buf, MAX_BODY_LIMIT)
        } else {
            protocol::decode(&mut self.buf, MAX_BODY_LIMIT).map(|f| f.map(|f| (f, None)))
        }
        .map_err(|e| format!("bad frame: {e}"))
    }

    async fn close(mut self, ending: Ending) {
        match (ending, self.quic.take()) {
            (Ending::Graceful, quic) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), self.writer.shutdown()).await;
                if let Some(c) = quic {
                    c.close(0u32.into(), b"bye");
                }
            }
            (Ending::Abrupt, Some(c)) => c.close(7u32.into(), b"gone"),
            // zero linger: dropping resets the connection
            (Ending::Abrupt, None) => {}
        }
    }
}

/// Failures a client saw, counted by kind, with the first few described.
#[derive(Debug, Default)]
struct Failures {
    bad_seq: u64,
    out_of_order: u64,
    misrouted: u64,
    malformed: u64,
    /// Resuming clients: a push whose source offset does not follow the last one
    /// received from that source (or whose epoch changed), or one without the
    /// extension or outside history.
    offset_gap: u64,
    /// Unexpected frames, closes, connect and write failures.
    unexpected: u64,
    examples: Vec<String>,
}

impl Failures {
    fn note(&mut self, what: String) {
        if self.examples.len() < KEEP_EXAMPLES {
            self.examples.push(what);
        }
    }

    fn total(&self) -> u64 {
        self.bad_seq
            + self.out_of_order
            + self.misrouted
            + self.malformed
            + self.offset_gap
            + self.unexpected
    }
}

/// What a resuming client keeps for its whole life, and what its connections tell.
#[derive(Debug, Default)]
struct Track {
    /// Its key and last position per source: each connection resumes from it.
    state: ResumeState,
    /// Per source, the stream's top that the current connection's AuthReply named:
    /// a push at or below it is a replay.
    tops: [Option<Position>; 4],
    /// Pushes received as a replay.
    replayed: u64,
}

impl Track {
    /// Takes AuthReply's answer (which `auth_resume` already applied to `state`);
    /// `Err` if it names another key or lacks a source the client receives.
    fn connected(&mut self, me: u32, reply: &ResumeReply) -> Result<(), String> {
        if reply.key != key_of(me) {
            return Err(format!("AuthReply names key {:?}", reply.key));
        }
        for source in Source::ALL {
            let Some(st) = reply.source(source) else {
                return Err(format!(
                    "AuthReply names no {} source: {reply:?}",
                    source.name()
                ));
            };
            self.tops[source.index()] = Some(st.position());
        }
        Ok(())
    }
}

/// What a client received, over all its connections.
#[derive(Debug)]
struct Seen {
    me: u32,
    /// Message ids in the order they arrived.
    ids: Vec<u64>,
    /// Last sequence number per backend and class: synchronous pushes (0) and
    /// broadcasts (3), or, for a resuming client, each source (its index).
    last: [[u32; 4]; BACKENDS],
    failures: Failures,
    end: bool,
    heartbeat_replies: u64,
    room_changes: u64,
    /// A resuming client's positions.
    track: Option<Track>,
}

/// The source a message's kind is pushed from.
fn source_of(kind: Kind) -> Source {
    match kind {
        Kind::Key | Kind::Keys | Kind::Item => Source::Key,
        Kind::User => Source::User,
        Kind::Room => Source::Room,
        Kind::Broadcast | Kind::End => Source::All,
    }
}

/// What a frame meant to the client.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Push,
    RoomChanged,
    Disconnect,
    Other,
}

impl Seen {
    fn new(me: u32) -> Seen {
        Seen {
            me,
            ids: Vec::new(),
            last: [[0; 4]; BACKENDS],
            failures: Failures::default(),
            end: false,
            heartbeat_replies: 0,
            room_changes: 0,
            track: None,
        }
    }

    /// A resuming client's record.
    fn resuming(me: u32) -> Seen {
        Seen {
            track: Some(Track::default()),
            ..Seen::new(me)
        }
    }

    fn track(&mut self) -> &mut Track {
        self.track.get_or_insert_with(Track::default)
    }

    /// A resuming connection's push must carry the extension and be the next of its
    /// source: offset one past the last one received, in the same epoch (the
    /// position AuthReply left, if none came on this client's connections since).
    fn check_offset(&mut self, f: &Frame, meta: Option<PushMeta>) {
        let me = self.me;
        let Some(m) = meta else {
            self.failures.offset_gap += 1;
            self.failures.note(format!(
                "client {me}: push seq {} without the extension",
                f.seq
            ));
            return;
        };
        let track = self.track();
        let at = track.state.positions.get(m.source);
        let top = track.tops[m.source.index()];
        let follows =
            m.is_tracked() && at.is_some_and(|p| p.epoch == m.epoch && m.offset == p.offset + 1);
        if top.is_some_and(|t| t.epoch == m.epoch && m.offset <= t.offset) {
            track.replayed += 1;
        }
        track.state.observe(&m);
        if !follows {
            self.failures.offset_gap += 1;
            self.failures.note(format!(
                "client {me}: {} push at epoch {} offset {} after {at:?}",
                m.source.name(),
                m.epoch,
                m.offset
            ));
        }
    }

    fn unexpected(&mut self, what: String) {
        self.failures.unexpected += 1;
        self.failures.note(format!("client {}: {what}", self.me));
    }

    /// Checks a connection's push seq: 1, 2, 3, ... on each connection.
    fn check_seq(&mut self, conn: &mut Conn, f: &Frame) {
        if f.seq != conn.push_seq.wrapping_add(1) {
            self.failures.bad_seq += 1;
            self.failures.note(format!(
                "client {}: push seq {} after {}",
                self.me, f.seq, conn.push_seq
            ));
        }
        conn.push_seq = f.seq;
    }

    fn handle(&mut self, conn: &mut Conn, f: &Frame, meta: Option<PushMeta>) -> Got {
        let me = self.me;
        match f.op {
            OP => {
                self.check_seq(conn, f);
                if conn.resume {
                    self.check_offset(f, meta);
                }
                let Some(m) = parse(&f.body) else {
                    self.failures.malformed += 1;
                    self.failures
                        .note(format!("client {me}: malformed body {:?}", f.body));
                    return Got::Push;
                };
                let misrouted = match m.kind {
                    Kind::End => {
                        self.end = true;
                        return Got::Push;
                    }
                    Kind::Key | Kind::Item => m.target != me,
                    Kind::Room => {
                        Some(m.target) != conn.room && conn.pending != Some(Some(m.target))
                    }
                    Kind::Keys | Kind::User | Kind::Broadcast => false,
                } || meta.is_some_and(|x| x.source != source_of(m.kind));
                if misrouted {
                    self.failures.misrouted += 1;
                    self.failures.note(format!(
                        "client {me} in room {:?} (moving to {:?}) got {m:?}",
                        conn.room, conn.pending
                    ));
                }
                // A resume replays each source's missed pushes in turn, so a
                // resuming client keeps a backend's order within each source.
                let class = match (&self.track, m.kind) {
                    (Some(_), kind) => source_of(kind).index(),
                    (None, Kind::Broadcast) => Source::All.index(),
                    (None, _) => 0,
                };
                let last = &mut self.last[m.backend as usize][class];
                if m.seq <= *last {
                    self.failures.out_of_order += 1;
                    self.failures
                        .note(format!("client {me}: {m:?} after seq {}", *last));
                } else {
                    *last = m.seq;
                }
                self.ids.push(msg_id(m.backend, m.seq));
                Got::Push
            }
            op::CHANGE_ROOM_REPLY => match conn.pending.take() {
                Some(room) => {
                    let want = room.map(room_name).unwrap_or_default();
                    if f.body != want.as_bytes() {
                        self.unexpected(format!("ChangeRoomReply {:?} for {want:?}", f.body));
                    }
                    conn.room = room;
                    self.room_changes += 1;
                    Got::RoomChanged
                }
                None => {
                    self.unexpected("ChangeRoomReply without ChangeRoom".into());
                    Got::Other
                }
            },
            op::HEARTBEAT_REPLY => {
                self.heartbeat_replies += 1;
                Got::Other
            }
            op::DISCONNECT_REPLY => Got::Disconnect,
            other => {
                self.unexpected(format!("unexpected op {other}"));
                Got::Other
            }
        }
    }
}

/// Picks the next room: one of the rooms, or none now and then.
fn random_room(rng: &mut StdRng) -> Option<u32> {
    (rng.gen_range(0..10) > 0).then(|| rng.gen_range(0..ROOMS))
}

fn jitter(rng: &mut StdRng, lo: f64, hi: f64) -> Duration {
    Duration::from_secs_f64(rng.gen_range(lo..hi))
}

/// A room a stable client was in, from when the server had certainly moved it there
/// until it asked to leave.
#[derive(Debug, Clone, Copy)]
struct Stay {
    room: Option<u32>,
    from: Instant,
    to: Instant,
}

struct StableReport {
    seen: Seen,
    stays: Vec<Stay>,
}

/// A stable client: reads everything until the end marker, changing rooms now and
/// then until `until`, then closes.
async fn run_stable(
    me: u32,
    mut conn: Conn,
    registered: Instant,
    until: Instant,
    mut rng: StdRng,
) -> StableReport {
    let mut seen = Seen::new(me);
    let mut stays = Vec::new();
    let mut since = registered;
    let give_up = tokio::time::Instant::from_std(until + END_WAIT);
    let mut next_change = Instant::now() + jitter(&mut rng, 2.0, 10.0);
    let mut next_beat = Instant::now() + jitter(&mut rng, 10.0, 30.0);
    'run: loop {
        loop {
            match conn.next_frame() {
                Ok(Some((f, meta))) => match seen.handle(&mut conn, &f, meta) {
                    Got::RoomChanged => since = Instant::now(),
                    Got::Disconnect => {
                        seen.unexpected("DisconnectReply on a stable connection".into());
                        break 'run;
                    }
                    Got::Push | Got::Other => {}
                },
                Ok(None) => break,
                Err(e) => {
                    seen.unexpected(e);
                    break 'run;
                }
            }
        }
        if seen.end {
            break;
        }
        let wake = next_change.min(next_beat);
        tokio::select! {
            r = conn.fill() => match r {
                Ok(true) => {}
                Ok(false) => {
                    seen.unexpected("server closed a stable connection".into());
                    break;
                }
                Err(e) => {
                    seen.unexpected(e);
                    break;
                }
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                let now = Instant::now();
                if now >= next_beat {
                    next_beat = now + jitter(&mut rng, 20.0, 40.0);
                    if let Err(e) = conn.send(op::HEARTBEAT, Bytes::new()).await {
                        seen.unexpected(e);
                        break;
                    }
                }
                if now >= next_change {
                    next_change = now + jitter(&mut rng, 2.0, 10.0);
                    if now >= until {
                        // the load is over: stay put until the end marker
                        next_change = until + END_WAIT * 2;
                    } else if conn.pending.is_none() {
                        stays.push(Stay { room: conn.room, from: since, to: now });
                        if let Err(e) = conn.change_room(random_room(&mut rng)).await {
                            seen.unexpected(e);
                            break;
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(give_up) => {
                seen.unexpected("no end marker".into());
                break;
            }
        }
    }
    if conn.pending.is_none() {
        stays.push(Stay {
            room: conn.room,
            from: since,
            to: Instant::now(),
        });
    }
    conn.close(Ending::Graceful).await;
    StableReport { seen, stays }
}

#[derive(Debug, Default, Clone, Copy)]
struct ChurnCounts {
    connects: u64,
    disconnects: u64,
    replaced: u64,
    graceful: u64,
    abrupt: u64,
}

struct ChurnReport {
    seen: Seen,
    counts: ChurnCounts,
}

/// Reads a replaced connection to its end: what was queued, DisconnectReply, then
/// the end of the stream.
async fn drain_replaced(seen: &mut Seen, mut old: Conn) {
    let drain = async {
        let mut disconnect = false;
        loop {
            loop {
                match old.next_frame() {
                    Ok(Some((f, meta))) => {
                        if seen.handle(&mut old, &f, meta) == Got::Disconnect {
                            disconnect = true;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
            match old.fill().await {
                Ok(true) => {}
                Ok(false) => return Ok(disconnect),
                // a reset after the last bytes is how some replaced connections end
                Err(_) => return Ok(disconnect),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), drain).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            seen.unexpected("replaced connection ended without DisconnectReply".into())
        }
        Ok(Err(e)) => seen.unexpected(format!("replaced connection: {e}")),
        Err(_) => seen.unexpected("replaced connection still open after 10 s".into()),
    }
    old.close(Ending::Abrupt).await;
}

/// A churning client: connects, reads, changes rooms, and leaves (gracefully,
/// abruptly, or by being replaced by its own next connection) until `until`.
async fn run_churn(me: u32, dial: Arc<Dial>, until: Instant, mut rng: StdRng) -> ChurnReport {
    let mut seen = Seen::new(me);
    let mut counts = ChurnCounts::default();
    let mut live: Option<(Conn, Ending)> = None;
    tokio::time::sleep(jitter(&mut rng, 0.0, 2.0)).await;
    while Instant::now() < until {
        let via = if rng.gen_bool(0.5) {
            Via::Tcp
        } else {
            Via::Quic
        };
        let ending = if rng.gen_bool(0.5) {
            Ending::Graceful
        } else {
            Ending::Abrupt
        };
        let mut conn = match dial.connect(me, via, random_room(&mut rng), ending).await {
            Ok(c) => c,
            Err(e) => {
                seen.unexpected(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        counts.connects += 1;
        if let Some((old, _)) = live.take() {
            drain_replaced(&mut seen, old).await;
            counts.replaced += 1;
            counts.disconnects += 1;
        }
        let leave_at = (Instant::now() + jitter(&mut rng, 0.5, 10.0)).min(until);
        let mut next_change = Instant::now() + jitter(&mut rng, 0.3, 3.0);
        let mut next_beat = Instant::now() + jitter(&mut rng, 10.0, 30.0);
        let mut alive = true;
        'conn: while alive {
            loop {
                match conn.next_frame() {
                    Ok(Some((f, meta))) => {
                        if seen.handle(&mut conn, &f, meta) == Got::Disconnect {
                            seen.unexpected("DisconnectReply on a live connection".into());
                            alive = false;
                            break 'conn;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        seen.unexpected(e);
                        alive = false;
                        break 'conn;
                    }
                }
            }
            let now = Instant::now();
            if now >= leave_at {
                break;
            }
            let wake = next_change.min(next_beat).min(leave_at);
            tokio::select! {
                r = conn.fill() => match r {
                    Ok(true) => {}
                    Ok(false) => {
                        seen.unexpected("server closed a live connection".into());
                        alive = false;
                    }
                    Err(e) => {
                        seen.unexpected(e);
                        alive = false;
                    }
                },
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                    let now = Instant::now();
                    if now >= next_beat {
                        next_beat = now + jitter(&mut rng, 20.0, 40.0);
                        if let Err(e) = conn.send(op::HEARTBEAT, Bytes::new()).await {
                            seen.unexpected(e);
                            alive = false;
                        }
                    }
                    if alive && now >= next_change {
                        next_change = now + jitter(&mut rng, 0.3, 3.0);
                        if conn.pending.is_none() {
                            if let Err(e) = conn.change_room(random_room(&mut rng)).await {
                                seen.unexpected(e);
                                alive = false;
                            }
                        }
                    }
                }
            }
        }
        // One time in ten the next connection replaces this one, as when a device
        // switches networks before the old connection is noticed as gone.
        if alive && Instant::now() < until && rng.gen_bool(0.1) {
            live = Some((conn, ending));
            continue;
        }
        conn.close(ending).await;
        counts.disconnects += 1;
        match ending {
            Ending::Graceful => counts.graceful += 1,
            Ending::Abrupt => counts.abrupt += 1,
        }
        let offline = jitter(&mut rng, 0.0, 2.0);
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            (Instant::now() + offline).min(until),
        ))
        .await;
    }
    if let Some((conn, ending)) = live.take() {
        conn.close(ending).await;
        counts.disconnects += 1;
    }
    ChurnReport { seen, counts }
}

/// What a resuming client did over its life.
#[derive(Debug, Default, Clone, Copy)]
struct ResumeCounts {
    connects: u64,
    /// Connections after the first: each resumed.
    resumes: u64,
    /// Resumes whose every source was recovered.
    recovered: u64,
    /// Sources AuthReply answered "not recovered".
    not_recovered: u64,
    abrupt: u64,
    graceful: u64,
    replaced: u64,
    kicked: u64,
    /// Connections the server closed with DisconnectReply on its own (an overflow).
    server_closed: u64,
    /// Pushes received as a replay.
    replayed: u64,
    /// Pushes a replaced connection still delivered, not taken: the connection that
    /// replaced it resumed before them.
    discarded: u64,
    /// From the last frame read on a lost connection to the next AuthReply.
    outage_max: Duration,
    outage_total: Duration,
}

impl AddAssign<&ResumeCounts> for ResumeCounts {
    fn add_assign(&mut self, o: &ResumeCounts) {
        self.connects += o.connects;
        self.resumes += o.resumes;
        self.recovered += o.recovered;
        self.not_recovered += o.not_recovered;
        self.abrupt += o.abrupt;
        self.graceful += o.graceful;
        self.replaced += o.replaced;
        self.kicked += o.kicked;
        self.server_closed += o.server_closed;
        self.replayed += o.replayed;
        self.discarded += o.discarded;
        self.outage_max = self.outage_max.max(o.outage_max);
        self.outage_total += o.outage_total;
    }
}

struct ResumeReport {
    seen: Seen,
    /// The room it stayed in.
    room: u32,
    counts: ResumeCounts,
}

/// How reading a resuming connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Read {
    /// The time to stop reading came.
    Time,
    /// The end marker arrived.
    End,
    /// The server ended the stream; whether DisconnectReply came first.
    Closed { disconnect: bool },
    /// Reading failed (noted as unexpected).
    Failed,
}

/// Reads a resuming connection until `until`, the end marker, or its end.
async fn read_until(seen: &mut Seen, conn: &mut Conn, until: Instant) -> Read {
    let mut disconnect = false;
    loop {
        loop {
            match conn.next_frame() {
                Ok(Some((f, meta))) => {
                    if seen.handle(conn, &f, meta) == Got::Disconnect {
                        disconnect = true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    seen.unexpected(e);
                    return Read::Failed;
                }
            }
        }
        if seen.end {
            return Read::End;
        }
        if Instant::now() >= until {
            return Read::Time;
        }
        tokio::select! {
            r = conn.fill() => match r {
                Ok(true) => {}
                Ok(false) => return Read::Closed { disconnect },
                Err(e) => {
                    seen.unexpected(e);
                    return Read::Failed;
                }
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(until)) => {}
        }
    }
}

/// Reads a replaced resuming connection to its end, checking its push seq and
/// that it ends with DisconnectReply, without taking its pushes: the connection
/// that replaced it resumed from what had been read before, so it delivers them.
async fn drain_discarding(seen: &mut Seen, mut old: Conn) -> u64 {
    let mut discarded = 0;
    let drain = async {
        let mut disconnect = false;
        loop {
            loop {
                match old.next_frame() {
                    Ok(Some((f, _))) => match f.op {
                        OP => {
                            seen.check_seq(&mut old, &f);
                            discarded += 1;
                        }
                        op::DISCONNECT_REPLY => disconnect = true,
                        op::HEARTBEAT_REPLY => {}
                        other => seen.unexpected(format!("op {other} on a replaced connection")),
                    },
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
            match old.fill().await {
                Ok(true) => {}
                // a reset after the last bytes is how some replaced connections end
                Ok(false) | Err(_) => return Ok(disconnect),
            }
        }
    };
    let result = tokio::time::timeout(Duration::from_secs(10), drain).await;
    match result {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            seen.unexpected("replaced resuming connection ended without DisconnectReply".into())
        }
        Ok(Err(e)) => seen.unexpected(format!("replaced resuming connection: {e}")),
        Err(_) => seen.unexpected("replaced resuming connection still open after 10 s".into()),
    }
    old.close(Ending::Abrupt).await;
    discarded
}

fn random_via(rng: &mut StdRng) -> Via {
    if rng.gen_bool(0.5) {
        Via::Tcp
    } else {
        Via::Quic
    }
}

/// A resuming client's first connection: no position yet.
async fn first_resuming(dial: &Dial, me: u32, room: u32, rng: &mut StdRng) -> (Conn, Loss, Seen) {
    let loss = Loss::random(rng);
    let via = random_via(rng);
    let mut seen = Seen::resuming(me);
    let (conn, reply) = dial
        .connect_resume(me, via, room, loss.ending(), &mut seen.track().state)
        .await
        .unwrap_or_else(|e| panic!("resuming client {me}: {e}"));
    if let Err(e) = seen.track().connected(me, &reply) {
        seen.unexpected(e);
    }
    (conn, loss, seen)
}

/// Connects and resumes from the client's positions, over either transport,
/// retrying until it works or `give_up`; notes the outage since `lost_at`.
#[allow(clippy::too_many_arguments)]
async fn resume_conn(
    me: u32,
    dial: &Dial,
    room: u32,
    loss: Loss,
    seen: &mut Seen,
    counts: &mut ResumeCounts,
    lost_at: Instant,
    give_up: Instant,
    rng: &mut StdRng,
) -> Option<Conn> {
    loop {
        let via = random_via(rng);
        let state = &mut seen.track().state;
        match dial
            .connect_resume(me, via, room, loss.ending(), state)
            .await
        {
            Ok((conn, reply)) => {
                let outage = lost_at.elapsed();
                counts.connects += 1;
                counts.resumes += 1;
                counts.outage_max = counts.outage_max.max(outage);
                counts.outage_total += outage;
                if let Err(e) = seen.track().connected(me, &reply) {
                    seen.unexpected(e);
                }
                return Some(conn);
            }
            Err(e) => {
                seen.unexpected(format!("resume: {e}"));
                if Instant::now() >= give_up {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A resuming client: stays in `room` and keeps one [`ResumeState`] for its life.
/// Until `until` it reads a connection for a while, then loses it (abruptly or
/// gracefully without reading what is queued, replaced by its own next connection,
/// or kicked), and resumes on a new one over either transport; then it reads its
/// last connection until the end marker.
#[allow(clippy::too_many_arguments)]
async fn run_resuming(
    me: u32,
    dial: Arc<Dial>,
    kicker: Arc<Client>,
    room: u32,
    first: (Conn, Loss),
    mut seen: Seen,
    until: Instant,
    mut rng: StdRng,
) -> ResumeReport {
    let give_up = until + END_WAIT;
    let mut counts = ResumeCounts {
        connects: 1,
        ..ResumeCounts::default()
    };
    let (mut conn, mut loss) = first;
    loop {
        let last = Instant::now() >= until;
        let leave_at = if last {
            give_up
        } else {
            (Instant::now() + jitter(&mut rng, RESUMING_STAY.0, RESUMING_STAY.1)).min(until)
        };
        let read = read_until(&mut seen, &mut conn, leave_at).await;
        let mut lost_at = Instant::now();
        match read {
            Read::End => break,
            Read::Time if last => {
                seen.unexpected("no end marker".into());
                break;
            }
            Read::Time => match loss {
                Loss::Abrupt => counts.abrupt += 1,
                Loss::Graceful => counts.graceful += 1,
                Loss::Kicked => {
                    counts.kicked += 1;
                    match kicker.kick(key_of(me)).await {
                        Ok(true) => {}
                        r => seen.unexpected(format!("kick: {r:?}")),
                    }
                    // what was queued, DisconnectReply, the end of the stream
                    let until = Instant::now() + Duration::from_secs(10);
                    match read_until(&mut seen, &mut conn, until).await {
                        Read::Closed { disconnect: true } => {}
                        Read::End => break,
                        other => seen.unexpected(format!("kicked connection: {other:?}")),
                    }
                    lost_at = Instant::now();
                }
                Loss::Replaced => {
                    counts.replaced += 1;
                    loss = Loss::random(&mut rng);
                    let next = resume_conn(
                        me,
                        &dial,
                        room,
                        loss,
                        &mut seen,
                        &mut counts,
                        lost_at,
                        give_up,
                        &mut rng,
                    )
                    .await;
                    let Some(next) = next else { break };
                    let old = std::mem::replace(&mut conn, next);
                    counts.discarded += drain_discarding(&mut seen, old).await;
                    continue;
                }
            },
            Read::Closed { disconnect } => {
                counts.server_closed += 1;
                if !disconnect {
                    seen.unexpected("resuming connection ended without DisconnectReply".into());
                }
            }
            Read::Failed => {}
        }
        conn.close(loss.ending()).await;
        tokio::time::sleep(jitter(&mut rng, RESUMING_AWAY.0, RESUMING_AWAY.1)).await;
        loss = Loss::random(&mut rng);
        let next = resume_conn(
            me,
            &dial,
            room,
            loss,
            &mut seen,
            &mut counts,
            lost_at,
            give_up,
            &mut rng,
        )
        .await;
        match next {
            Some(next) => conn = next,
            None => {
                // never reconnected: nothing left to close
                let track = seen.track();
                counts.replayed = track.replayed;
                counts.recovered = track.state.recovered;
                counts.not_recovered = track.state.not_recovered;
                return ResumeReport { seen, room, counts };
            }
        }
    }
    conn.close(Ending::Graceful).await;
    let track = seen.track();
    counts.replayed = track.replayed;
    counts.recovered = track.state.recovered;
    counts.not_recovered = track.state.not_recovered;
    ResumeReport { seen, room, counts }
}

// ---------------------------------------------------------------------------
// The final check

/// Every message sent, by id.
struct Ledger {
    sent: Vec<Vec<Sent>>,
}

impl Ledger {
    fn get(&self, id: u64) -> Option<&Sent> {
        let backend = (id & 0xff) as usize;
        let seq = (id >> 8) as usize;
        self.sent.get(backend)?.get(seq.checked_sub(1)?)
    }

    /// Whether `client` may have received message `id`. `Some(reason)` if not.
    fn refuse(&self, client: u32, id: u64) -> Option<String> {
        let Some(s) = self.get(id) else {
            return Some(format!("message {id:#x} was never sent"));
        };
        if s.failed {
            return None;
        }
        let ok = match &s.target {
            Target::Key { client: c, outcome } => {
                *c == client && *outcome == PushOutcome::Delivered
            }
            Target::Keys(list) => list
                .iter()
                .any(|&(c, o)| c == client && o == PushOutcome::Delivered),
            Target::User { mids, tally } => mids.contains(&mid_of(client)) && tally.delivered > 0,
            Target::Room { tally, .. } => tally.delivered > 0,
            Target::Broadcast => true,
        };
        (!ok).then(|| format!("client {client} got {:?} (seq {})", s.target, id >> 8))
    }
}

/// What a stable client must have received: every message that was certainly
/// queued for it.
fn expected_for(ledger: &Ledger, client: u32, stays: &[Stay]) -> Vec<u64> {
    let mid = mid_of(client);
    let mut want = Vec::new();
    for (b, sent) in ledger.sent.iter().enumerate() {
        for (i, s) in sent.iter().enumerate() {
            if s.failed {
                continue;
            }
            let yes = match &s.target {
                Target::Key { client: c, outcome } => {
                    *c == client && *outcome == PushOutcome::Delivered
                }
                Target::Keys(list) => list
                    .iter()
                    .any(|&(c, o)| c == client && o == PushOutcome::Delivered),
                Target::User { mids, tally } => {
                    tally.queue_full == 0 && tally.filtered == 0 && mids.contains(&mid)
                }
                Target::Room { room, tally } => {
                    tally.queue_full == 0
                        && tally.filtered == 0
                        && stays.iter().any(|st| {
                            st.room == Some(*room) && st.from <= s.sent_at && s.replied_at <= st.to
                        })
                }
                Target::Broadcast => true,
            };
            if yes {
                want.push(msg_id(b as u8, i as u32 + 1));
            }
        }
    }
    want
}

/// What a resuming client in `room` for the whole round must have received, no
/// more and no less: every push to its key reported `Delivered` or `Stored`, every
/// user push to its user id, every push to its room, and every broadcast. A push
/// to its key reported anything else is lost (a description in the second list):
/// its key's stream is live all round, so every push to it is kept.
fn expected_resuming(ledger: &Ledger, client: u32, room: u32) -> (Vec<u64>, Vec<String>) {
    let mid = mid_of(client);
    let mut want = Vec::new();
    let mut lost = Vec::new();
    let kept = |o: PushOutcome| matches!(o, PushOutcome::Delivered | PushOutcome::Stored);
    for (b, sent) in ledger.sent.iter().enumerate() {
        for (i, s) in sent.iter().enumerate() {
            if s.failed {
                continue;
            }
            let id = msg_id(b as u8, i as u32 + 1);
            let outcome = match &s.target {
                Target::Key { client: c, outcome } => (*c == client).then_some(*outcome),
                Target::Keys(list) => list.iter().find(|(c, _)| *c == client).map(|x| x.1),
                Target::User { mids, .. } => mids.contains(&mid).then_some(PushOutcome::Stored),
                Target::Room { room: r, .. } => (*r == room).then_some(PushOutcome::Stored),
                Target::Broadcast => Some(PushOutcome::Stored),
            };
            match outcome {
                Some(o) if kept(o) => want.push(id),
                Some(o) => lost.push(format!(
                    "push {id:#x} to resuming client {client}'s key: {o:?}"
                )),
                None => {}
            }
        }
    }
    (want, lost)
}

/// User and room pushes whose tally shows them not appended to the streams of the
/// resuming clients they address (live all round): descriptions.
fn not_appended(ledger: &Ledger, mids: &HashSet<i64>, rooms: &HashSet<u32>) -> Vec<String> {
    let mut bad = Vec::new();
    for s in ledger.sent.iter().flatten().filter(|s| !s.failed) {
        match &s.target {
            Target::User { mids: to, tally } => {
                let live = to.iter().filter(|m| mids.contains(m)).count() as u64;
                if tally.appended < live || tally.appended > to.len() as u64 {
                    bad.push(format!(
                        "PushUser to {to:?} ({live} of resuming clients): {tally:?}"
                    ));
                }
            }
            Target::Room { room, tally } if rooms.contains(room) && tally.appended != 1 => {
                bad.push(format!("BroadcastRoom to room {room}: {tally:?}"));
            }
            _ => {}
        }
    }
    bad
}

/// What a client must have received.
enum Expect {
    /// Nothing in particular (a churning client).
    Nothing,
    /// At least these (a stable client); the rest is checked by the ledger's rules.
    AtLeast(Vec<u64>),
    /// Exactly these, besides pushes of failed calls (a resuming client).
    Exactly(Vec<u64>),
}

#[derive(Debug, Default)]
struct Verdict {
    /// Deliveries a stable client had to receive and did, exactly once.
    confirmed: u64,
    /// Deliveries a resuming client had to receive and did, exactly once.
    confirmed_resuming: u64,
    /// Received messages checked against the ledger.
    checked: u64,
    missing: u64,
    duplicated: u64,
    not_meant: u64,
    /// Pushes to a resuming client's key reported neither `Delivered` nor `Stored`.
    lost: u64,
    /// User and room pushes to resuming clients not appended to their streams.
    not_appended: u64,
    examples: Vec<String>,
}

impl Verdict {
    fn note(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }

    /// Checks one client's messages against the ledger: no duplicate, nothing not
    /// meant for it, and (stable and resuming clients) nothing missing.
    fn client(&mut self, ledger: &Ledger, seen: &Seen, expected: Expect) {
        let mut got = seen.ids.clone();
        got.sort_unstable();
        for w in got.windows(2) {
            if w[0] == w[1] {
                self.duplicated += 1;
                self.note(format!("client {}: message {:#x} twice", seen.me, w[0]));
            }
        }
        got.dedup();
        let (want, exact) = match expected {
            Expect::Nothing => (Vec::new(), false),
            Expect::AtLeast(w) => (w, false),
            Expect::Exactly(w) => (w, true),
        };
        let mut want = want;
        want.sort_unstable();
        for &id in &got {
            self.checked += 1;
            let why = if exact {
                let failed = ledger.get(id).is_some_and(|s| s.failed);
                (want.binary_search(&id).is_err() && !failed).then(|| {
                    let what = ledger.get(id).map(|s| format!("{:?}", s.target));
                    format!(
                        "resuming client {} got {id:#x}, not meant for it: {what:?}",
                        seen.me
                    )
                })
            } else {
                ledger.refuse(seen.me, id)
            };
            if let Some(why) = why {
                self.not_meant += 1;
                self.note(why);
            }
        }
        let class = if exact { "resuming" } else { "stable" };
        for id in want {
            if got.binary_search(&id).is_ok() {
                if exact {
                    self.confirmed_resuming += 1;
                } else {
                    self.confirmed += 1;
                }
            } else {
                self.missing += 1;
                let what = ledger.get(id).map(|s| format!("{:?}", s.target));
                self.note(format!(
                    "{class} client {} never got message {id:#x}: {what:?}",
                    seen.me
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The run

async fn poll_until<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn connect_backend(addr: SocketAddr, dir: &Path) -> Client {
    Client::connect(addr, "localhost", &BackendIdentity::from_dir(dir))
        .await
        .expect("backend connects")
}

/// The server and what every round uses.
struct Setup {
    dial: Arc<Dial>,
    /// Backend 0, which also asks for the online counts and sends the end marker.
    control: Arc<Client>,
    /// A backend connection of its own for the resuming clients' kicks.
    kicker: Arc<Client>,
    backends: Vec<Arc<Client>>,
    stat: ProcStat,
    clients: u32,
}

/// What one round of load did and found.
#[derive(Default)]
struct RoundReport {
    secs: u64,
    stable: u64,
    resuming: u64,
    churning: u64,
    counts: ChurnCounts,
    resumes: ResumeCounts,
    room_changes: u64,
    heartbeats: u64,
    calls: HashMap<&'static str, u64>,
    key_outcomes: HashMap<PushOutcome, u64>,
    tallies: Tally,
    received: u64,
    verdict: Verdict,
    failures: Failures,
    unfinished: u64,
    backend_errors: Vec<String>,
    peak_rss: u64,
    timeline: Vec<(u64, u64)>,
    load_secs: f64,
    emptied: bool,
    /// Seconds from the last client leaving to the server reporting none.
    empty_after: f64,
    left_online: u64,
    left_rooms: usize,
}

/// One round: stable clients connect and register, then for `secs` the churning
/// clients come and go while the backends push; then the end marker, every
/// client leaves, and every message is checked.
async fn round(setup: &Setup, secs: u64, seed: u64) -> RoundReport {
    let control = &setup.control;
    let mut rng = StdRng::seed_from_u64(seed);
    let stable: Vec<(u32, Option<u32>)> = (0..setup.clients)
        .filter(|&c| is_stable(c))
        .map(|c| (c, Some(rng.gen_range(0..ROOMS))))
        .collect();
    let conns: Vec<(u32, Conn)> = futures_util::stream::iter(stable.iter().copied())
        .map(|(c, room)| {
            let dial = setup.dial.clone();
            async move {
                let conn = dial
                    .connect(c, stable_via(c), room, Ending::Graceful)
                    .await
                    .unwrap_or_else(|e| panic!("stable client {c}: {e}"));
                (c, conn)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let n_stable = conns.len() as u64;
    // Each resuming client stays in one room and is connected before the load
    // starts, so every push of the round is meant for it.
    let resuming: Vec<(u32, u32)> = (0..setup.clients)
        .filter(|&c| is_resuming(c))
        .map(|c| (c, rng.gen_range(0..ROOMS)))
        .collect();
    let firsts: Vec<_> = futures_util::stream::iter(resuming.iter().copied())
        .map(|(c, room)| {
            let dial = setup.dial.clone();
            async move {
                let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(c) << 20));
                let (conn, loss, seen) = first_resuming(&dial, c, room, &mut rng).await;
                (c, room, conn, loss, seen, rng)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let n_resuming = firsts.len() as u64;
    // AuthReply is queued just before the channel registers: wait until all are.
    let registered = poll_until(Duration::from_secs(30), || async move {
        control.online().await.unwrap().total == n_stable + n_resuming
    })
    .await;
    assert!(
        registered,
        "the stable and resuming clients were never all online"
    );
    let registered = Instant::now();

    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let stat = setup.stat.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            let mut timeline = Vec::new();
            let mut next_mark = start + Duration::from_secs(10);
            while sampling.load(Ordering::Relaxed) {
                if let Ok(rss) = stat.rss_bytes() {
                    peak = peak.max(rss);
                    if Instant::now() >= next_mark {
                        next_mark += Duration::from_secs(10);
                        timeline.push((start.elapsed().as_secs(), rss));
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (peak, timeline)
        })
    };

    let stable_tasks: Vec<_> = conns
        .into_iter()
        .map(|(c, conn)| {
            let rng = StdRng::seed_from_u64(seed ^ (u64::from(c) << 20));
            tokio::spawn(run_stable(c, conn, registered, until, rng))
        })
        .collect();
    let resuming_tasks: Vec<_> = firsts
        .into_iter()
        .map(|(c, room, conn, loss, seen, rng)| {
            tokio::spawn(run_resuming(
                c,
                setup.dial.clone(),
                setup.kicker.clone(),
                room,
                (conn, loss),
                seen,
                until,
                rng,
            ))
        })
        .collect();
    let churn_tasks: Vec<_> = (0..setup.clients)
        .filter(|&c| !is_stable(c) && !is_resuming(c))
        .map(|c| {
            let rng = StdRng::seed_from_u64(seed ^ (u64::from(c) << 20));
            tokio::spawn(run_churn(c, setup.dial.clone(), until, rng))
        })
        .collect();
    let backend_tasks: Vec<_> = setup
        .backends
        .iter()
        .enumerate()
        .map(|(i, rpc)| {
            let b = Backend {
                id: i as u8,
                rpc: rpc.clone(),
                clients: setup.clients,
                until,
                max_calls: (CALLS_PER_SEC * secs as f64 * 1.2) as u64 + 100,
                rng: StdRng::seed_from_u64(seed.wrapping_add(1 + i as u64)),
                log: BackendLog::default(),
            };
            tokio::spawn(b.run())
        })
        .collect();

    let mut logs = Vec::new();
    for t in backend_tasks {
        logs.push(t.await.expect("backend task"));
    }
    let mut churned = Vec::new();
    for t in churn_tasks {
        churned.push(t.await.expect("churn task"));
    }
    // Every push before this one is queued, or with the broadcast workers ahead of it.
    control
        .broadcast(OP, body(Kind::End, 0, 0, NO_TARGET), 0)
        .await
        .expect("end marker");
    let mut stables = Vec::new();
    for t in stable_tasks {
        stables.push(t.await.expect("stable task"));
    }
    let mut resumers = Vec::new();
    for t in resuming_tasks {
        resumers.push(t.await.expect("resuming task"));
    }
    let load_secs = start.elapsed().as_secs_f64();

    // Every client has left: the registry must say so (sessions end asynchronously).
    let left_at = Instant::now();
    let emptied = poll_until(EMPTY_WAIT, || async move {
        control.online().await.unwrap().total == 0 && control.rooms().await.unwrap().is_empty()
    })
    .await;
    let empty_after = left_at.elapsed().as_secs_f64();
    sampling.store(false, Ordering::Relaxed);
    let (peak_rss, timeline) = sampler.await.unwrap();

    let mut r = RoundReport {
        secs,
        stable: n_stable,
        resuming: n_resuming,
        churning: churned.len() as u64,
        load_secs,
        emptied,
        empty_after,
        left_online: control.online().await.unwrap().total,
        left_rooms: control.rooms().await.unwrap().len(),
        peak_rss,
        timeline,
        ..RoundReport::default()
    };
    let mut ledger = Ledger { sent: Vec::new() };
    for log in logs {
        for (k, v) in log.calls {
            *r.calls.entry(k).or_default() += v;
        }
        r.backend_errors.extend(log.errors);
        ledger.sent.push(log.sent);
    }
    for s in ledger.sent.iter().flatten() {
        match &s.target {
            Target::Key { outcome, .. } => *r.key_outcomes.entry(*outcome).or_default() += 1,
            Target::Keys(list) => {
                for (_, o) in list {
                    *r.key_outcomes.entry(*o).or_default() += 1;
                }
            }
            Target::User { tally, .. } | Target::Room { tally, .. } => r.tallies += *tally,
            Target::Broadcast => {}
        }
    }
    for s in &stables {
        r.absorb(&s.seen);
        if !s.seen.end {
            r.unfinished += 1;
        }
        let want = expected_for(&ledger, s.seen.me, &s.stays);
        r.verdict.client(&ledger, &s.seen, Expect::AtLeast(want));
    }
    for c in &resumers {
        r.absorb(&c.seen);
        if !c.seen.end {
            r.unfinished += 1;
        }
        let (want, lost) = expected_resuming(&ledger, c.seen.me, c.room);
        r.verdict.lost += lost.len() as u64;
        for l in lost {
            r.verdict.note(l);
        }
        r.verdict.client(&ledger, &c.seen, Expect::Exactly(want));
        r.resumes += &c.counts;
    }
    let mids: HashSet<i64> = resumers.iter().map(|c| mid_of(c.seen.me)).collect();
    let rooms: HashSet<u32> = resumers.iter().map(|c| c.room).collect();
    for bad in not_appended(&ledger, &mids, &rooms) {
        r.verdict.not_appended += 1;
        r.verdict.note(bad);
    }
    for c in &churned {
        r.absorb(&c.seen);
        r.verdict.client(&ledger, &c.seen, Expect::Nothing);
        r.counts.connects += c.counts.connects;
        r.counts.disconnects += c.counts.disconnects;
        r.counts.replaced += c.counts.replaced;
        r.counts.graceful += c.counts.graceful;
        r.counts.abrupt += c.counts.abrupt;
    }
    r
}

impl RoundReport {
    fn absorb(&mut self, seen: &Seen) {
        self.received += seen.ids.len() as u64;
        self.room_changes += seen.room_changes;
        self.heartbeats += seen.heartbeat_replies;
        let f = &seen.failures;
        self.failures.bad_seq += f.bad_seq;
        self.failures.out_of_order += f.out_of_order;
        self.failures.misrouted += f.misrouted;
        self.failures.malformed += f.malformed;
        self.failures.offset_gap += f.offset_gap;
        self.failures.unexpected += f.unexpected;
        for e in &f.examples {
            self.failures.note(e.clone());
        }
    }

    fn print(&self, name: &str) {
        let calls = |m: &str| self.calls.get(m).copied().unwrap_or(0);
        let outcome = |o: PushOutcome| self.key_outcomes.get(&o).copied().unwrap_or(0);
        let c = &self.counts;
        println!("---- {name}: {} s of load ----", self.secs);
        let rs = &self.resumes;
        println!(
            "clients           {} ({} stable, {} resuming, {} churning)",
            self.stable + self.resuming + self.churning,
            self.stable,
            self.resuming,
            self.churning
        );
        println!(
            "connects          {} ({} stable + {} resuming + {} churning); stable and churning disconnects {} (graceful {}, abrupt {}, replaced by the next connection {})",
            self.stable + rs.connects + c.connects,
            self.stable,
            rs.connects,
            c.connects,
            self.stable + c.disconnects,
            self.stable + c.graceful,
            c.abrupt,
            c.replaced
        );
        let mean_outage = rs.outage_total.as_secs_f64() / rs.resumes.max(1) as f64;
        println!(
            "resuming          {} resumes ({} recovered, {} sources not recovered) after losing a connection: abrupt {}, graceful {}, replaced {}, kicked {}, closed by the server {}; {} pushes replayed, {} left on replaced connections; outage mean {:.2} s, max {:.2} s",
            rs.resumes,
            rs.recovered,
            rs.not_recovered,
            rs.abrupt,
            rs.graceful,
            rs.replaced,
            rs.kicked,
            rs.server_closed,
            rs.replayed,
            rs.discarded,
            mean_outage,
            rs.outage_max.as_secs_f64()
        );
        println!(
            "room changes      {}; heartbeat replies {}",
            self.room_changes, self.heartbeats
        );
        println!(
            "pushes (calls)    PushMsg {}, MPushMsg {}, MPushMsgs {}, PushUser {}, BroadcastRoom {}, Broadcast {} (+1 end marker)",
            calls("PushMsg"),
            calls("MPushMsg"),
            calls("MPushMsgs"),
            calls("PushUser"),
            calls("BroadcastRoom"),
            calls("Broadcast")
        );
        println!(
            "key outcomes      delivered {}, stored {}, offline {}, queue full {}, filtered {}",
            outcome(PushOutcome::Delivered),
            outcome(PushOutcome::Stored),
            outcome(PushOutcome::Offline),
            outcome(PushOutcome::QueueFull),
            outcome(PushOutcome::Filtered)
        );
        println!(
            "user+room tallies delivered {}, stored {}, queue full {}, filtered {}; appended to {} streams",
            self.tallies.delivered,
            self.tallies.stored,
            self.tallies.queue_full,
            self.tallies.filtered,
            self.tallies.appended
        );
        println!(
            "deliveries        {} received and checked against what was sent; required deliveries confirmed exactly once: {} to stable clients, {} to resuming clients",
            self.verdict.checked, self.verdict.confirmed, self.verdict.confirmed_resuming
        );
        let f = &self.failures;
        let v = &self.verdict;
        println!(
            "problems          missing {}, duplicated {}, not meant for the client {}, push seq gaps {}, out of order {}, misrouted {}, malformed {}, source offset gaps {}, not recovered {}, resuming key pushes neither delivered nor stored {}, user/room pushes not appended {}, unexpected {}, clients without end marker {}, backend errors {}",
            v.missing,
            v.duplicated,
            v.not_meant,
            f.bad_seq,
            f.out_of_order,
            f.misrouted,
            f.malformed,
            f.offset_gap,
            rs.not_recovered,
            v.lost,
            v.not_appended,
            f.unexpected,
            self.unfinished,
            self.backend_errors.len()
        );
        let timeline: Vec<String> = self
            .timeline
            .iter()
            .map(|(s, r)| format!("{s}s {:.1}", mib(*r)))
            .collect();
        println!(
            "server RSS        peak {:.1} MiB; every 10 s: {}",
            mib(self.peak_rss),
            timeline.join(", ")
        );
        println!(
            "afterwards        online {}, rooms {} ({:.1} s after the last client left); load {:.1} s",
            self.left_online, self.left_rooms, self.empty_after, self.load_secs
        );
        for e in v
            .examples
            .iter()
            .chain(&f.examples)
            .chain(&self.backend_errors)
            .take(30)
        {
            println!("  problem: {e}");
        }
    }

    fn check(&self, name: &str) {
        assert!(
            self.backend_errors.is_empty(),
            "{name}: backend calls failed"
        );
        assert_eq!(
            self.verdict.missing, 0,
            "{name}: stable or resuming clients missed deliveries"
        );
        assert_eq!(
            self.resumes.not_recovered, 0,
            "{name}: resumes answered \"not recovered\""
        );
        assert_eq!(
            self.resumes.recovered, self.resumes.resumes,
            "{name}: resumes that did not recover every source"
        );
        assert_eq!(
            self.verdict.lost, 0,
            "{name}: pushes to resuming clients' keys reported neither Delivered nor Stored"
        );
        assert_eq!(
            self.verdict.not_appended, 0,
            "{name}: user or room pushes to resuming clients not appended to their streams"
        );
        assert_eq!(
            self.verdict.duplicated, 0,
            "{name}: messages received twice"
        );
        assert_eq!(
            self.verdict.not_meant, 0,
            "{name}: messages received that were not meant for the client"
        );
        assert_eq!(
            self.failures.total(),
            0,
            "{name}: client-side checks failed"
        );
        assert_eq!(
            self.unfinished, 0,
            "{name}: stable or resuming clients saw no end marker"
        );
        assert!(self.verdict.confirmed > 0, "{name}: nothing was checked");
        assert!(
            self.verdict.confirmed_resuming > 0 && self.resumes.resumes > 0,
            "{name}: no resuming client was checked"
        );
        assert!(
            self.emptied,
            "{name}: after every client left, the server still reports {} online and {} rooms",
            self.left_online, self.left_rooms
        );
    }
}

/// The history the soak's server keeps, computed from the load.
#[derive(Debug)]
struct HistoryPlan {
    /// Seconds of pushes history holds.
    window: f64,
    /// Pushes per second to the busiest stream.
    busiest: f64,
    /// Pushes per second appended over all streams.
    total: f64,
    size: usize,
    bytes: usize,
}

/// History sized from the load. Pushes per second per stream follow from the
/// backends' rate and mix (600 calls/s; [`MIX`], [`KEYS_PER_CALL`],
/// [`MIDS_PER_CALL`]), with 2,000 clients:
///
/// - a key: (PushMsg 300 + (MPushMsg 72 + MPushMsgs 72) × 13 keys) / clients: 1.1/s;
/// - a user id: PushUser 72 × 2.5 user ids / (clients / 2): 0.18/s;
/// - a room: BroadcastRoom 78 / 16 rooms: 4.9/s;
/// - broadcasts: Broadcast 6/s;
///
/// 2,436 appends/s over all streams whatever the number of clients, each counted
/// by the store as its frame (16 + 10 + 120 bytes on average) + `ENTRY_OVERHEAD`.
/// `history.bytes` holds `window` seconds of all of them, and `history.size` twice
/// the busiest stream's pushes in that window (so the byte bound binds first).
///
/// `window` is three quarters of the warm-up (at least `MIN_HISTORY_WINDOW`):
/// history fills to its bound during the warm-up, even in shards with less than
/// their share of the load, so the RSS level the soak is measured against already
/// holds it (a history still growing would read as a leak). A resuming
/// client's outage, its time away (at most 1.5 s) plus a connect, printed by each
/// round, is far below it: the bound is split evenly over the store's 32 shards,
/// whose loads differ (the broadcast stream, a room or two, more keys than another)
/// by up to about 1.4×, so the shortest retention is about 0.7 × `window`.
fn history_plan(clients: u32, window: f64) -> HistoryPlan {
    let mean = |r: RangeInclusive<usize>| (*r.start() + *r.end()) as f64 / 2.0;
    let clients_f = f64::from(clients);
    let keys = Call::PushMsg.rate()
        + Call::MPushMsg.rate() * mean(KEYS_PER_CALL).min(clients_f)
        + Call::MPushMsgs.rate() * mean(KEYS_PER_CALL);
    let users = Call::PushUser.rate() * mean(MIDS_PER_CALL);
    let rooms = Call::BroadcastRoom.rate();
    let all = Call::Broadcast.rate();
    let busiest = [
        keys / clients_f,
        users / f64::from(clients.div_ceil(2)),
        rooms / f64::from(ROOMS),
        all,
    ]
    .into_iter()
    .fold(0.0, f64::max);
    let total = keys + users + rooms + all;
    let mean_pad = 239.0 / 2.0;
    let entry = (HEADER_LEN + BODY_HEAD + ENTRY_OVERHEAD) as f64 + mean_pad;
    HistoryPlan {
        window,
        busiest,
        total,
        size: ((2.0 * busiest * window).ceil() as usize).clamp(1, 100_000),
        bytes: ((total * entry * window).ceil() as usize).max(1 << 16),
    }
}

/// Waits `IDLE_BEFORE_RSS`, then reads the server's RSS.
async fn idle_rss(stat: &ProcStat) -> u64 {
    tokio::time::sleep(IDLE_BEFORE_RSS).await;
    stat.rss_bytes().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test, about two minutes: cargo test --release --test soak -- --ignored --nocapture"]
async fn soak() {
    let wall = Instant::now();
    let secs: u64 = env_or("QUICPUSH_SOAK_SECS", 60);
    let clients: u32 = env_or("QUICPUSH_SOAK_CLIENTS", 2000);
    let seed: u64 = env_or("QUICPUSH_SOAK_SEED", rand::random());
    assert!(clients >= 8, "QUICPUSH_SOAK_CLIENTS must be at least 8");
    assert!(secs >= 1, "QUICPUSH_SOAK_SECS must be at least 1");
    // The warm-up is as long as the soak: with history held for a window of
    // seconds beside constant connection churn, the allocator takes about 40 s of
    // this load to reach its steady state (a half-length warm-up ended below it).
    let warm_secs = secs;
    // Each client holds a socket (TCP) or shares one (QUIC).
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    println!("soak: {clients} clients, {warm_secs} s warm-up + {secs} s, seed {seed}");

    let exe = PathBuf::from(env!("CARGO_BIN_EXE_quicpush"));
    let dir = tempfile::tempdir().unwrap();
    // History for every source the resuming clients receive: their key and user id
    // (on by default), their room and broadcasts.
    let plan = history_plan(
        clients,
        ((secs / 2).max(1) as f64 * 0.75).max(MIN_HISTORY_WINDOW),
    );
    let mut config = Config::loopback(dir.path());
    config.history.enabled = true;
    config.history.key = true;
    config.history.user = true;
    config.history.room = true;
    config.history.all = true;
    config.history.size = plan.size;
    config.history.bytes = plan.bytes;
    println!(
        "history: {:.0} s of pushes: {} per stream (the busiest gets {:.1}/s), {:.1} MiB ({:.0} pushes/s)",
        plan.window,
        plan.size,
        plan.busiest,
        mib(plan.bytes as u64),
        plan.total
    );
    let mut server = tokio::task::block_in_place(|| {
        ServerProcess::quicpush_with(&exe, dir.path(), &config).expect("server starts")
    });
    let stat = ProcStat::new(server.pid);

    let control = Arc::new(connect_backend(server.control, dir.path()).await);
    let rss_cold = stat.rss_bytes().unwrap();
    let mut backends = vec![control.clone()];
    for _ in 1..BACKENDS {
        backends.push(Arc::new(connect_backend(server.control, dir.path()).await));
    }
    let kicker = Arc::new(connect_backend(server.control, dir.path()).await);
    let secret = auth::load_secret(&dir.path().join(quicpush::certs::TOKEN_SECRET)).unwrap();
    let quic_config =
        quicpush::tls::quic_client_config(&dir.path().join(quicpush::certs::CA_CERT)).unwrap();
    let endpoints = (0..QUIC_ENDPOINTS)
        .map(|_| quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap())
        .collect();
    let setup = Setup {
        dial: Arc::new(Dial {
            tcp: server.client_tcp,
            quic: server.client_quic,
            quic_config,
            endpoints,
            secret,
        }),
        control: control.clone(),
        kicker,
        backends,
        stat: stat.clone(),
        clients,
    };

    // A warm-up round with the same load, so the allocator and the long-lived pools
    // (connection tables, log spans) reach their working size; then the soak.
    let warm = round(&setup, warm_secs, seed).await;
    let rss_warm = idle_rss(&stat).await;
    let soak = round(&setup, secs, seed.wrapping_add(0x5eed)).await;
    let rss_after = stat.rss_bytes().unwrap();
    let rss_idle = idle_rss(&stat).await;

    // The server stops cleanly and logged no error.
    drop(setup);
    if let Ok(c) = Arc::try_unwrap(control) {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
    }
    server.sigterm().unwrap();
    let status = tokio::task::block_in_place(|| server.wait_exit(Duration::from_secs(30)));
    let lines = server.log_lines();
    let bad: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("ERROR") || l.contains("panicked"))
        .collect();
    let warns = lines.iter().filter(|l| l.contains(" WARN ")).count();

    warm.print("warm-up");
    soak.print("soak");
    println!("---- server ----");
    println!(
        "RSS               cold (started, one backend) {:.1} MiB; warm-up peak {:.1} MiB, after it, idle {IDLE_BEFORE_RSS:?}: {:.1} MiB; soak peak {:.1} MiB; after the soak {:.1} MiB, idle {IDLE_BEFORE_RSS:?}: {:.1} MiB ({:+.1}% over the level before the soak, {:.1}x the cold level)",
        mib(rss_cold),
        mib(warm.peak_rss),
        mib(rss_warm),
        mib(soak.peak_rss),
        mib(rss_after),
        mib(rss_idle),
        (rss_idle as f64 / rss_warm as f64 - 1.0) * 100.0,
        rss_idle as f64 / rss_cold as f64
    );
    println!(
        "log               {} lines ({} past the bound, not kept), {} error or panic, {warns} warn",
        lines.len(),
        server.log_dropped(),
        bad.len()
    );
    for l in bad.iter().take(20) {
        println!("  server: {l}");
    }
    println!("exit              {status:?}");
    println!("wall time         {:.1} s", wall.elapsed().as_secs_f64());

    warm.check("warm-up");
    soak.check("soak");
    assert!(bad.is_empty(), "the server logged errors or panicked");
    assert!(
        status.is_some_and(|s| s.success()),
        "server exit: {status:?}"
    );
    // A leak grows with the work done: the server has served twice the warm-up's
    // connections and messages by the end, so it must end near the level the
    // warm-up left it at.
    let limit = rss_warm as f64 * (1.0 + RSS_TOLERANCE);
    assert!(
        rss_idle as f64 <= limit,
        "server RSS {:.1} MiB after the soak, over {:.1} MiB (its level before the soak, {:.1} MiB, + {:.0}%)",
        mib(rss_idle),
        mib(limit as u64),
        mib(rss_warm),
        RSS_TOLERANCE * 100.0
    );
}

/// The resuming clients' checks fail when they should: a source offset gap, a push
/// twice, one missing, one not meant for the client, one to its key reported
/// `Offline`, a user push not appended to its stream.
#[test]
fn resuming_checks_can_fail() {
    let (me, room) = (1, 3);
    let now = Instant::now();
    let sent = |target| Sent {
        target,
        sent_at: now,
        replied_at: now,
        failed: false,
    };
    let ledger = Ledger {
        sent: vec![vec![
            sent(Target::Key {
                client: me,
                outcome: PushOutcome::Delivered,
            }),
            sent(Target::Key {
                client: me,
                outcome: PushOutcome::Offline,
            }),
            sent(Target::User {
                mids: vec![mid_of(me)],
                tally: Tally::default(),
            }),
            sent(Target::Room {
                room: 5,
                tally: Tally {
                    appended: 1,
                    ..Tally::default()
                },
            }),
            sent(Target::Broadcast),
        ]],
    };
    let mut seen = Seen::resuming(me);
    let mut reply = ResumeReply {
        key: key_of(me),
        ..ResumeReply::default()
    };
    for source in Source::ALL {
        let st = quicpush::resume::SourceState {
            epoch: 7,
            offset: 0,
            recovered: None,
        };
        reply.sources.insert(source.name().to_owned(), st);
    }
    seen.track().state.apply(&reply);
    seen.track().connected(me, &reply).unwrap();
    let mut conn = Conn {
        reader: Box::new(tokio::io::empty()),
        writer: Box::new(tokio::io::sink()),
        buf: BytesMut::new(),
        quic: None,
        push_seq: 0,
        room: Some(room),
        pending: None,
        seq: 1,
        resume: true,
    };
    let push = |seq, kind, msg, target, source, offset| {
        let f = Frame::new(OP, seq, body(kind, 0, msg, target));
        let m = PushMeta {
            source,
            epoch: 7,
            offset,
        };
        (f, Some(m))
    };
    for (f, m) in [
        push(1, Kind::Key, 1, me, Source::Key, 1),
        push(2, Kind::Key, 1, me, Source::Key, 2),
        push(3, Kind::User, 3, NO_TARGET, Source::User, 1),
        push(5, Kind::Room, 4, 5, Source::Room, 2),
    ] {
        assert_eq!(seen.handle(&mut conn, &f, m), Got::Push);
    }
    let f = &seen.failures;
    assert_eq!(
        (f.bad_seq, f.offset_gap, f.misrouted, f.out_of_order),
        (1, 1, 1, 1),
        "{f:?}"
    );
    let (want, lost) = expected_resuming(&ledger, me, room);
    assert_eq!(lost.len(), 1, "the push reported Offline");
    let mut v = Verdict::default();
    v.client(&ledger, &seen, Expect::Exactly(want));
    assert_eq!(
        (v.duplicated, v.missing, v.not_meant, v.confirmed_resuming),
        (1, 1, 1, 2),
        "{v:?}"
    );
    let bad = not_appended(
        &ledger,
        &HashSet::from([mid_of(me)]),
        &HashSet::from([room]),
    );
    assert_eq!(bad.len(), 1, "{bad:?}");
}

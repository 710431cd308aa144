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

#[path = "../common/mod.rs"]
mod common;

mod backend;
mod body;
mod check;
mod conn;
mod fleet;
mod report;
mod resuming;
mod round;
mod seen;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicpush::bench::process::{ProcStat, ServerProcess};
use quicpush::history::memory::ENTRY_OVERHEAD;
use quicpush::protocol::HEADER_LEN;
use quicpush::{auth, Config};

use crate::backend::Call;
use crate::body::BODY_HEAD;
use crate::common::process::connect_backend;
use crate::common::Via;
use crate::conn::Dial;
use crate::report::mib;
use crate::round::{round, Setup};

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

//! The handover scenario: clients that keep switching networks while the backend
//! pushes to their keys, user ids, rooms and everyone at a steady rate.
//!
//! Every client is a [`ResumingClient`] and switches networks on its own schedule
//! (every `switch_every`, from a seeded random phase). What a switch is depends on
//! the transport and the [`HandoverMode`]:
//!
//! - TCP, `reconnect`: the socket (`SO_LINGER` 0) is dropped, so the server gets
//!   a reset; the client reconnects at once and resumes from its positions.
//! - QUIC, `migrate`: the client's socket ([`crate::netsim::SimSocket`]) moves to
//!   a new port ([`SimHandle::switch_network`]), everything in flight is lost, and
//!   the connection carries on from the new address: no reconnect.
//! - QUIC, `reconnect`: the socket moves and the connection is dropped (its close
//!   goes out on the new network and may be lost: the new connection replaces the
//!   old one at the server either way); the client reconnects (a full handshake)
//!   from the new address and resumes.
//! - QUIC, `zero-rtt`: as `reconnect`, but the client reconnects with 0-RTT: Auth
//!   and its resume positions leave with the ClientHello, and the replay comes
//!   back as 0.5-RTT data. Each client has its own TLS configuration, so its own
//!   session tickets; the report counts 0-RTT attempts and acceptances.
//!
//! # The network
//!
//! Over QUIC each client's endpoint is a [`crate::netsim::SimSocket`] with the
//! run's loss, reordering and added round-trip time, seeded per client. TCP has no
//! packet layer in this process: only the switch (a reset connection) is
//! simulated, loss, reordering and RTT are QUIC-only, and the report says so.
//!
//! A migrated client is found at its new address only when it next sends a
//! packet. Bench QUIC clients send a keep-alive every [`KEEP_ALIVE`]: it stands
//! for what a phone does after a network change (its stack or app sends soon);
//! without it a client that only receives would stay lost until its next heartbeat.
//!
//! # The load
//!
//! Client `i` has key `bench-<i>`, user id `1 + i / 2` (two clients per user) and
//! room `i % rooms` (up to [`ROOMS`] rooms), and receives broadcasts. The backend
//! sends `rate` pushes per second, a quarter to each source kind, round-robin over
//! the streams of that kind. Each stream's pushes are sent one after the other (a
//! call is made once the previous one to that stream has returned), so their order
//! is defined; their body is `source u8 | stream u32 | seq u64 | sent_at_ns u64`,
//! `seq` counting from 1 per stream.
//!
//! A push is **reliable** when the backend was told so: `Delivered` or `Stored` for
//! a key; appended to history (so every member gets it, live or by resume) for a
//! user, a room or a broadcast. Its expected recipients are the clients of its
//! audience, connected or not at the time. Pushes reported otherwise (queue full,
//! offline, not appended) are counted apart and expected nowhere.
//!
//! # What is measured
//!
//! At the clients, per stream: lost (a reliable push never received), duplicated,
//! out of order (received after a higher seq of its stream), misrouted. Per switch:
//! - **first push**: from the switch until the first push sent after it (by its
//!   timestamp) arrives;
//! - **gap filled**: from the switch until, for each of the client's streams, the
//!   push the backend had last been told was reliable before the switch has
//!   arrived (pushes arrive in order, so everything before it has too; a loss is
//!   counted as lost). Zero when nothing was missing. One connection carries every
//!   source in order and a resume replays before any live push, so this is never
//!   longer than the first push: it is the part of the handover spent recovering
//!   what was in flight.
//!
//! A switch whose handover has not finished by the client's next switch or the
//! end of the run is counted as unfinished. Resumes that came back not recovered
//! are counted from each client's [`crate::client::ResumeState`].
//!
//! # The server
//!
//! Started with history on for every source (`history.room` and `history.all`
//! too) and `history.size` = 4 × the busiest stream's pushes (broadcasts, a quarter
//! of `rate`) in [`MAX_OUTAGE`], within 1,000 and the configuration's 100,000.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::process::{ProcStat, ServerProcess};
use super::{
    fleet, percentiles, progress_bar, BenchError, BenchOptions, BenchTransport, LatencyUs,
    Measurement, Report, Target, BENCH_OP,
};
use crate::channel::PushOutcome;
use crate::client::{Backoff, Connector, Dial, Event, PushClient, PushClientError, ResumingClient};
use crate::netsim::{sim_client_endpoint, NetSim, SimHandle};
use crate::protocol::Source;
use crate::rpc::Client;
use crate::tls::BackendIdentity;

/// Most rooms the clients are spread over.
pub const ROOMS: usize = 4;
/// Clients sharing one user id.
pub const CLIENTS_PER_USER: usize = 2;
/// How often a bench QUIC client pings when it has nothing else to send: what
/// reveals a migrated client's new address (see the [module docs](self)).
pub const KEEP_ALIVE: Duration = Duration::from_millis(250);
/// A bench QUIC client's idle timeout.
const CLIENT_IDLE: Duration = Duration::from_secs(30);
/// The longest outage `history.size` is sized for.
pub const MAX_OUTAGE: Duration = Duration::from_secs(10);
/// Body bytes the checks need: source, stream, seq, timestamp.
pub const MIN_BODY: usize = 21;
/// After the last push, how long without a new delivery before the missing ones
/// count as lost (QUIC recovers lost packets with backed-off timers).
const QUIET: Duration = Duration::from_secs(10);
/// Longest wait for one client's first connection.
const CONNECT_WAIT: Duration = Duration::from_secs(60);

/// How a client carries out a network switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HandoverMode {
    /// QUIC: the connection migrates to the new network, no reconnect.
    Migrate,
    /// The connection is dropped; the client reconnects (full handshake) and resumes.
    Reconnect,
    /// QUIC: the connection is dropped; the client reconnects with 0-RTT and resumes.
    ZeroRtt,
}

impl HandoverMode {
    /// The mode a run uses: `asked`, or the transport's default (`migrate` over
    /// QUIC, `reconnect` over TCP), if the transport can do it.
    pub fn resolve(
        transport: BenchTransport,
        asked: Option<HandoverMode>,
    ) -> Result<HandoverMode, BenchError> {
        use HandoverMode::*;
        match (transport, asked) {
            (BenchTransport::Tcp, None | Some(Reconnect)) => Ok(Reconnect),
            (BenchTransport::Tcp, Some(m)) => Err(BenchError::Options(format!(
                "--handover-mode {} needs QUIC; over TCP a switch is a reconnect",
                m.name()
            ))),
            (BenchTransport::Quic, None | Some(Migrate)) => Ok(Migrate),
            (BenchTransport::Quic, Some(Reconnect)) => Ok(Reconnect),
            (BenchTransport::Quic, Some(ZeroRtt)) => Ok(ZeroRtt),
            (BenchTransport::Ws, _) => Err(BenchError::Options(
                "the handover scenario runs over TCP or QUIC".into(),
            )),
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HandoverMode::Migrate => "migrate",
            HandoverMode::Reconnect => "reconnect",
            HandoverMode::ZeroRtt => "zero-rtt",
        }
    }
}

/// The handover scenario's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct HandoverOptions {
    /// `None`: `migrate` over QUIC, `reconnect` over TCP.
    pub mode: Option<HandoverMode>,
    /// Datagram loss per direction, 0 to 1 (QUIC only).
    pub loss: f64,
    /// Datagram reordering per direction, 0 to 1 (QUIC only).
    pub reorder: f64,
    /// Added round-trip time (QUIC only).
    pub rtt: Duration,
    /// Each client switches networks this often; zero: never.
    pub switch_every: Duration,
    /// Seeds the switch phases and each client's simulated network.
    pub seed: u64,
}

impl Default for HandoverOptions {
    fn default() -> Self {
        HandoverOptions {
            mode: None,
            loss: 0.0,
            reorder: 0.0,
            rtt: Duration::ZERO,
            switch_every: Duration::from_secs(30),
            seed: 1,
        }
    }
}

/// Handover times, milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HandoverMs {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// Handovers measured.
    pub count: u64,
}

/// A count per source kind.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BySource {
    pub key: u64,
    pub user: u64,
    pub room: u64,
    pub all: u64,
}

impl From<[u64; 4]> for BySource {
    fn from([key, user, room, all]: [u64; 4]) -> Self {
        BySource {
            key,
            user,
            room,
            all,
        }
    }
}

/// The network the clients were on.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkReport {
    /// Whether loss, reordering and RTT were applied (QUIC); over TCP only the
    /// switch is simulated.
    pub simulated: bool,
    pub loss: f64,
    pub reorder: f64,
    pub rtt_ms: f64,
    /// The QUIC clients' keep-alive interval (0 over TCP).
    pub keep_alive_ms: u64,
}

/// What the handover scenario measured (`Report::handover`).
#[derive(Debug, Clone, Serialize)]
pub struct HandoverReport {
    pub mode: HandoverMode,
    pub network: NetworkReport,
    pub switch_every_ms: u64,
    /// Backend pushes per second asked for.
    pub rate: u64,
    /// Backend pushes per second achieved.
    pub pushes_per_sec: f64,
    pub seconds: f64,
    /// `history.size` of the server started (`None`: an external server).
    pub history_size: Option<usize>,
    pub rooms: usize,
    pub users: usize,
    /// Backend calls, in all and per source kind.
    pub pushes: u64,
    pub pushes_by_source: BySource,
    /// Pushes the backend was told were Delivered or Stored (appended, for fan-outs).
    pub pushes_reliable: u64,
    /// Pushes reported otherwise (queue full, offline, not appended): expected nowhere.
    pub pushes_unreliable: u64,
    /// Per-connection outcomes the backend was told, summed.
    pub outcome_delivered: u64,
    pub outcome_stored: u64,
    pub outcome_queue_full: u64,
    pub outcome_offline: u64,
    /// Reliable deliveries expected at the clients, and those received (duplicates
    /// included).
    pub expected: u64,
    pub received: u64,
    /// Reliable pushes lost, duplicated, out of order (must all be 0).
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
    /// Pushes whose push seq did not follow the previous one on their connection.
    pub bad_seq: u64,
    /// Network switches done.
    pub switches: u64,
    /// Switches that came while the client was still reconnecting (after an
    /// earlier switch, or a lost connection): that reconnect starts over from the
    /// new network, so it makes one reconnect of two switches.
    pub switches_while_reconnecting: u64,
    /// Connections made after each client's first.
    pub reconnects: u64,
    /// Resumes whose every source was recovered, and per-source "not recovered"
    /// answers (must be 0).
    pub resumes_recovered: u64,
    pub not_recovered: u64,
    /// QUIC connections that sent Auth as 0-RTT data, and those the server
    /// accepted it on (`zero-rtt` mode; the first connection of each client has
    /// no ticket yet).
    pub zero_rtt_attempted: u64,
    pub zero_rtt_accepted: u64,
    /// Switches whose first push or gap had not arrived by the next switch or the end.
    pub handovers_unfinished: u64,
    /// From a switch to the first push sent after it arriving.
    pub first_push_ms: Option<HandoverMs>,
    /// From a switch to every push reliable before it having arrived.
    pub gap_filled_ms: Option<HandoverMs>,
}

/// A set of seqs.
#[derive(Debug, Clone, Default)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets `i`; returns whether it was set before.
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & b != 0;
        self.0[w] |= b;
        was
    }

    fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// How many of `self` are not in `other`.
    fn missing_from(&self, other: &Bits) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let o = other.0.get(i).copied().unwrap_or(0);
                u64::from((w & !o).count_ones())
            })
            .sum()
    }
}

/// Where the clients are: key, user id and room of each.
#[derive(Debug, Clone, Copy)]
struct Layout {
    clients: usize,
    users: usize,
    rooms: usize,
}

impl Layout {
    fn new(clients: usize) -> Layout {
        Layout {
            clients,
            users: clients.div_ceil(CLIENTS_PER_USER),
            rooms: clients.clamp(1, ROOMS),
        }
    }

    fn mid(&self, user: usize) -> i64 {
        1 + user as i64
    }

    fn room_name(room: usize) -> String {
        format!("bench://handover/{room}")
    }

    /// Client `i`'s stream index per source kind.
    fn streams_of(&self, i: usize) -> [u32; 4] {
        [
            i as u32,
            (i / CLIENTS_PER_USER) as u32,
            (i % self.rooms) as u32,
            0,
        ]
    }

    fn lane_count(&self) -> usize {
        self.clients + self.users + self.rooms + 1
    }

    /// The lane of stream `id` of `source`.
    fn lane(&self, source: Source, id: u32) -> usize {
        let id = id as usize;
        match source {
            Source::Key => id,
            Source::User => self.clients + id,
            Source::Room => self.clients + self.users + id,
            Source::All => self.clients + self.users + self.rooms,
        }
    }

    /// Clients a push to stream `id` of `source` is for.
    fn audience(&self, source: Source, id: u32) -> u64 {
        let (n, id) = (self.clients, id as usize);
        match source {
            Source::Key => 1,
            Source::User => (n - id * CLIENTS_PER_USER).min(CLIENTS_PER_USER) as u64,
            Source::Room => ((n - id).div_ceil(self.rooms)) as u64,
            Source::All => n as u64,
        }
    }

    fn token_claims(&self, i: usize) -> crate::auth::Claims {
        let [_, user, room, _] = self.streams_of(i);
        let mut c = crate::auth::claims_for(&format!("bench-{i}"), Duration::from_secs(86_400));
        c.mid = Some(self.mid(user as usize));
        c.room_id = Some(Self::room_name(room as usize));
        c
    }
}

/// One stream's pushes, as the backend sent them.
#[derive(Debug)]
struct Lane {
    source: Source,
    id: u32,
    /// Held across a call: a stream's pushes are sent one after the other.
    state: tokio::sync::Mutex<LaneState>,
    /// The last seq sent: a client takes a higher one as misrouted (and never
    /// tracks more seqs than were sent).
    started: AtomicU64,
    /// The last seq the backend was told was reliable.
    last_reliable: AtomicU64,
}

#[derive(Debug, Default)]
struct LaneState {
    sent: u64,
    reliable: Bits,
}

fn lanes(layout: &Layout) -> Vec<Lane> {
    let mut v = Vec::with_capacity(layout.lane_count());
    for (source, count) in [
        (Source::Key, layout.clients),
        (Source::User, layout.users),
        (Source::Room, layout.rooms),
        (Source::All, 1),
    ] {
        for id in 0..count {
            v.push(Lane {
                source,
                id: id as u32,
                state: tokio::sync::Mutex::new(LaneState::default()),
                started: AtomicU64::new(0),
                last_reliable: AtomicU64::new(0),
            });
        }
    }
    v
}

fn encode(source: Source, id: u32, seq: u64, sent_at_ns: u64, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(MIN_BODY));
    b.put_u8(source as u8);
    b.put_u32(id);
    b.put_u64(seq);
    b.put_u64(sent_at_ns);
    b.resize(size.max(MIN_BODY), b'.');
    b.freeze()
}

/// What one backend call was told.
#[derive(Debug, Default, Clone, Copy)]
struct Told {
    reliable: bool,
    delivered: u64,
    stored: u64,
    queue_full: u64,
    offline: u64,
}

impl Told {
    fn add(&mut self, o: Told) {
        self.delivered += o.delivered;
        self.stored += o.stored;
        self.queue_full += o.queue_full;
        self.offline += o.offline;
    }
}

/// Sends the next push of `lane`.
async fn push_one(
    backend: &Client,
    layout: &Layout,
    lane: &Lane,
    epoch: Instant,
    body_size: usize,
) -> Result<Told, BenchError> {
    let rpc = |e: crate::rpc::ClientError| BenchError::Rpc(e.to_string());
    let mut st = lane.state.lock().await;
    let seq = st.sent + 1;
    st.sent = seq;
    lane.started.store(seq, Ordering::Release);
    let body = encode(
        lane.source,
        lane.id,
        seq,
        epoch.elapsed().as_nanos() as u64,
        body_size,
    );
    let told = match lane.source {
        Source::Key => {
            let o = backend
                .push_msg(format!("bench-{}", lane.id), BENCH_OP, body)
                .await
                .map_err(rpc)?;
            Told {
                reliable: matches!(o, PushOutcome::Delivered | PushOutcome::Stored),
                delivered: u64::from(o == PushOutcome::Delivered),
                stored: u64::from(o == PushOutcome::Stored),
                queue_full: u64::from(o == PushOutcome::QueueFull),
                offline: u64::from(o == PushOutcome::Offline),
            }
        }
        Source::User | Source::Room => {
            let t = if lane.source == Source::User {
                let mid = layout.mid(lane.id as usize);
                backend.push_user(vec![mid], BENCH_OP, body).await
            } else {
                let room = Layout::room_name(lane.id as usize);
                backend.broadcast_room(room, BENCH_OP, body).await
            }
            .map_err(rpc)?;
            Told {
                reliable: t.appended > 0,
                delivered: t.delivered,
                stored: t.stored,
                queue_full: t.queue_full,
                offline: u64::from(t.appended == 0),
            }
        }
        Source::All => {
            // Accepted means appended to the broadcast stream (checked at connect:
            // the server keeps it) and queued on every worker, in order.
            backend.broadcast(BENCH_OP, body, 0).await.map_err(rpc)?;
            Told {
                reliable: true,
                ..Told::default()
            }
        }
    };
    if told.reliable {
        st.reliable.set(seq);
        lane.last_reliable.store(seq, Ordering::Release);
    }
    Ok(told)
}

/// What the sender did.
#[derive(Debug, Default)]
struct Sent {
    pushes: u64,
    by_source: [u64; 4],
    reliable: u64,
    told: Told,
    seconds: f64,
}

/// Sends `rate` pushes per second for `duration`, a quarter per source kind,
/// at most `in_flight` calls at once.
async fn send(
    opts: &BenchOptions,
    backend: &Client,
    layout: &Layout,
    lanes: &[Lane],
    epoch: Instant,
) -> Result<Sent, BenchError> {
    let mut sent = Sent::default();
    let period = Duration::from_secs_f64(1.0 / opts.rate.max(1) as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = FuturesUnordered::new();
    let mut next = [0usize; 4];
    let counts = [layout.clients, layout.users, layout.rooms, 1];
    let t0 = Instant::now();
    let settle = |r: Result<Told, BenchError>, sent: &mut Sent| -> Result<(), BenchError> {
        let t = r?;
        sent.reliable += u64::from(t.reliable);
        sent.told.add(t);
        Ok(())
    };
    let mut k = 0usize;
    while t0.elapsed() < opts.duration {
        loop {
            tokio::select! {
                _ = tick.tick() => break,
                Some(r) = inflight.next(), if !inflight.is_empty() => settle(r, &mut sent)?,
            }
        }
        while inflight.len() >= opts.in_flight.max(1) {
            if let Some(r) = inflight.next().await {
                settle(r, &mut sent)?;
            }
        }
        let kind = k % 4;
        k += 1;
        let id = (next[kind] % counts[kind]) as u32;
        next[kind] += 1;
        let lane = &lanes[layout.lane(Source::ALL[kind], id)];
        sent.pushes += 1;
        sent.by_source[kind] += 1;
        inflight.push(push_one(backend, layout, lane, epoch, opts.body_size));
    }
    while let Some(r) = inflight.next().await {
        settle(r, &mut sent)?;
    }
    sent.seconds = t0.elapsed().as_secs_f64();
    Ok(sent)
}

/// Connects a client over TCP; dropping it resets the connection.
struct TcpConnector {
    server: SocketAddr,
    bind: SocketAddr,
}

impl Connector for TcpConnector {
    fn connect(&self) -> BoxFuture<'_, Result<PushClient, PushClientError>> {
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            // Dropped, the connection is reset: what the server sees of a
            // network switch, and no TIME_WAIT for thousands of reconnects.
            socket.set_zero_linger()?;
            socket.set_reuseaddr(true)?;
            socket.bind(self.bind)?;
            let stream = socket.connect(self.server).await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            Ok(PushClient::from_parts(Box::new(r), Box::new(w), None))
        })
    }
}

/// Connects a client over QUIC from its endpoint on a simulated network.
struct SimQuicConnector {
    endpoint: quinn::Endpoint,
    server: SocketAddr,
    config: quinn::ClientConfig,
}

impl Connector for SimQuicConnector {
    fn connect(&self) -> BoxFuture<'_, Result<PushClient, PushClientError>> {
        Box::pin(PushClient::connect_quic_on(
            self.endpoint.clone(),
            self.server,
            "localhost",
            self.config.clone(),
        ))
    }
}

/// How one client switches networks.
enum Switcher {
    /// TCP: the connection is reset; the client reconnects and resumes.
    Reset,
    /// QUIC: the socket moves to a new port; the connection migrates.
    Migrate(SimHandle),
    /// QUIC: the socket moves and the connection is dropped; the client
    /// reconnects from the new address and resumes.
    Reconnect(SimHandle),
}

impl Switcher {
    fn switch(&self, c: &mut ResumingClient) -> Result<(), BenchError> {
        let moved = |h: &SimHandle| {
            h.switch_network()
                .map(drop)
                .map_err(|e| BenchError::Io(format!("network switch: {e}")))
        };
        match self {
            Switcher::Reset => c.drop_connection(),
            Switcher::Migrate(h) => moved(h)?,
            Switcher::Reconnect(h) => {
                moved(h)?;
                c.drop_connection();
            }
        }
        Ok(())
    }
}

/// The QUIC configuration of a bench client: [`KEEP_ALIVE`], [`CLIENT_IDLE`].
fn quic_config(ca: &Path) -> Result<quinn::ClientConfig, BenchError> {
    let mut config =
        crate::tls::quic_client_config(ca).map_err(|e| BenchError::Spawn(e.to_string()))?;
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(CLIENT_IDLE)
        .map_err(|e| BenchError::Options(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(KEEP_ALIVE));
    config.transport_config(Arc::new(t));
    Ok(config)
}

/// The source address of client `i`: 127.0.0.x, in blocks of
/// [`fleet::CLIENTS_PER_SOURCE_IP`], for a loopback server.
fn source_ip(server: SocketAddr, i: usize) -> IpAddr {
    let block = i / fleet::CLIENTS_PER_SOURCE_IP;
    if server.ip().is_loopback() && block < 250 {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + block as u8))
    } else {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
}

/// Everything a client needs to connect.
struct Setup {
    transport: BenchTransport,
    mode: HandoverMode,
    tcp: SocketAddr,
    quic: SocketAddr,
    quic_config: Option<quinn::ClientConfig>,
    /// The CA, for clients that need a configuration of their own.
    ca: std::path::PathBuf,
    sim: NetSim,
    secret: Arc<Vec<u8>>,
    layout: Layout,
}

impl Setup {
    /// Connects and authenticates client `i` (with resume).
    async fn connect(&self, i: usize) -> Result<(ResumingClient, Switcher), BenchError> {
        let (dial, switcher): (Dial, Switcher) = match self.transport {
            // refused by HandoverMode::resolve before any client connects
            BenchTransport::Ws => {
                return Err(BenchError::Options(
                    "the handover scenario runs over TCP or QUIC".into(),
                ))
            }
            BenchTransport::Tcp => (
                Dial::Custom(Arc::new(TcpConnector {
                    server: self.tcp,
                    bind: SocketAddr::new(source_ip(self.tcp, i), 0),
                })),
                Switcher::Reset,
            ),
            BenchTransport::Quic => {
                let sim = NetSim {
                    seed: self
                        .sim
                        .seed
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        .wrapping_add(i as u64),
                    ..self.sim.clone()
                };
                let bind = SocketAddr::new(source_ip(self.quic, i), 0);
                let (endpoint, handle) = sim_client_endpoint(bind, sim)
                    .map_err(|e| BenchError::Io(format!("client endpoint: {e}")))?;
                let config = self
                    .quic_config
                    .clone()
                    .ok_or_else(|| BenchError::Options("no QUIC configuration".into()))?;
                match self.mode {
                    // Its own configuration, so its own session tickets.
                    HandoverMode::ZeroRtt => (
                        Dial::QuicOn {
                            endpoint,
                            addr: self.quic,
                            server_name: "localhost".into(),
                            // A configuration of its own: a clone would share the
                            // TLS session store, so clients would take each
                            // other's single-use tickets.
                            config: quic_config(&self.ca)?,
                        },
                        Switcher::Reconnect(handle),
                    ),
                    mode => (
                        Dial::Custom(Arc::new(SimQuicConnector {
                            endpoint,
                            server: self.quic,
                            config,
                        })),
                        if mode == HandoverMode::Migrate {
                            Switcher::Migrate(handle)
                        } else {
                            Switcher::Reconnect(handle)
                        },
                    ),
                }
            }
        };
        let token = crate::auth::issue(&self.secret, &self.layout.token_claims(i))
            .map_err(|e| BenchError::Spawn(format!("token: {e}")))?;
        let backoff = Backoff {
            min: Duration::from_millis(20),
            max: Duration::from_secs(1),
        };
        let connecting = ResumingClient::connect(dial, token, backoff);
        let (c, reply) = tokio::time::timeout(CONNECT_WAIT, connecting)
            .await
            .map_err(|_| BenchError::Io(format!("client {i} did not connect")))?;
        if let Some(s) = Source::ALL.into_iter().find(|s| reply.source(*s).is_none()) {
            return Err(BenchError::Options(format!(
                "the server keeps no {} history: the handover scenario needs history on \
                 for key, user, room and all",
                s.name()
            )));
        }
        Ok((c, switcher))
    }
}

/// One stream as a client saw it.
#[derive(Debug, Default)]
struct Track {
    seen: Bits,
    highest: u64,
    duplicated: u64,
    out_of_order: u64,
}

/// A switch whose handover is being timed.
#[derive(Debug)]
struct Pending {
    at: Instant,
    at_ns: u64,
    /// Per source kind: the last seq reliable before the switch.
    targets: [u64; 4],
    first_push: bool,
    gap_filled: bool,
}

/// What every client adds to.
struct Shared {
    lanes: Arc<Vec<Lane>>,
    layout: Layout,
    epoch: Instant,
    /// Distinct pushes received, all clients.
    unique: AtomicU64,
    first_push: parking_lot::Mutex<Histogram<u64>>,
    gap_filled: parking_lot::Mutex<Histogram<u64>>,
    latencies: fleet::Latencies,
}

/// One client's run.
struct Run {
    streams: [u32; 4],
    tracks: [Track; 4],
    received: u64,
    misrouted: u64,
    /// Pushes whose push seq did not follow the previous one on its connection.
    bad_seq: u64,
    last_seq: u32,
    switches: u64,
    switches_down: u64,
    unfinished: u64,
    pending: Option<Pending>,
    latency_us: Vec<u64>,
}

/// What one client saw, at the end: its run, and what its client counted.
struct Seen {
    run: Run,
    reconnects: u64,
    recovered: u64,
    not_recovered: u64,
    zero_rtt_attempted: u64,
    zero_rtt_accepted: u64,
}

fn record(h: &parking_lot::Mutex<Histogram<u64>>, since: Instant) {
    let us = since.elapsed().as_micros() as u64;
    let _ = h.lock().record(us.max(1));
}

impl Run {
    fn new(streams: [u32; 4]) -> Run {
        Run {
            streams,
            tracks: Default::default(),
            received: 0,
            misrouted: 0,
            bad_seq: 0,
            last_seq: 0,
            switches: 0,
            switches_down: 0,
            unfinished: 0,
            pending: None,
            latency_us: Vec::new(),
        }
    }

    fn switched(&mut self, shared: &Shared) {
        if self.pending.take().is_some() {
            self.unfinished += 1;
        }
        let at = Instant::now();
        let mut targets = [0u64; 4];
        for (k, s) in Source::ALL.into_iter().enumerate() {
            let lane = &shared.lanes[shared.layout.lane(s, self.streams[k])];
            targets[k] = lane.last_reliable.load(Ordering::Acquire);
        }
        self.switches += 1;
        self.pending = Some(Pending {
            at,
            at_ns: at.duration_since(shared.epoch).as_nanos() as u64,
            targets,
            first_push: false,
            gap_filled: false,
        });
        self.check_pending(shared, 0);
    }

    /// Times the pending handover's steps that a push sent at `sent_ns` completes.
    fn check_pending(&mut self, shared: &Shared, sent_ns: u64) {
        let Some(p) = &mut self.pending else { return };
        if !p.first_push && sent_ns > p.at_ns {
            p.first_push = true;
            record(&shared.first_push, p.at);
        }
        if !p.gap_filled && (0..4).all(|k| self.tracks[k].highest >= p.targets[k]) {
            p.gap_filled = true;
            record(&shared.gap_filled, p.at);
        }
        if p.first_push && p.gap_filled {
            self.pending = None;
        }
    }

    fn push(&mut self, shared: &Shared, meta_source: Source, mut body: &[u8]) {
        if body.len() < MIN_BODY {
            self.misrouted += 1;
            return;
        }
        let source = Source::from_u8(body.get_u8());
        let id = body.get_u32();
        let seq = body.get_u64();
        let sent_ns = body.get_u64();
        let Some(source) = source.filter(|s| *s == meta_source) else {
            self.misrouted += 1;
            return;
        };
        let k = source.index();
        let lane = &shared.lanes[shared.layout.lane(source, self.streams[k])];
        if id != self.streams[k] || seq == 0 || seq > lane.started.load(Ordering::Acquire) {
            self.misrouted += 1;
            return;
        }
        self.received += 1;
        let t = &mut self.tracks[k];
        if t.seen.set(seq) {
            t.duplicated += 1;
        } else {
            shared.unique.fetch_add(1, Ordering::Relaxed);
            if seq < t.highest {
                t.out_of_order += 1;
            }
        }
        t.highest = t.highest.max(seq);
        let now = shared.epoch.elapsed().as_nanos() as u64;
        self.latency_us
            .push((now.saturating_sub(sent_ns) / 1000).max(1));
        if self.latency_us.len() >= 256 {
            self.flush_latency(shared);
        }
        self.check_pending(shared, sent_ns);
    }

    fn flush_latency(&mut self, shared: &Shared) {
        let mut h = shared.latencies.lock();
        for v in self.latency_us.drain(..) {
            let _ = h.record(v);
        }
    }
}

/// When a client switches: from `first`, every `every`, while before `until`.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    first: Option<Instant>,
    every: Duration,
    until: Instant,
}

async fn run_client(
    mut c: ResumingClient,
    switcher: Switcher,
    streams: [u32; 4],
    schedule: Schedule,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<Seen, BenchError> {
    let mut run = Run::new(streams);
    let mut next_switch = schedule.first.filter(|t| *t < schedule.until);
    let connects0 = c.connects;
    loop {
        let at = next_switch;
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep_until(at.unwrap_or_else(Instant::now).into()), if at.is_some() => {
                run.switches_down += u64::from(c.connection().is_none());
                switcher.switch(&mut c)?;
                run.switched(&shared);
                if matches!(switcher, Switcher::Migrate(_)) {
                    // As an app does when the OS reports a network change: send
                    // at once, so the server learns the new address within half
                    // a round trip instead of at the next keep-alive.
                    if let Some(conn) = c.connection() {
                        if conn.heartbeat().await.is_err() {
                            c.drop_connection();
                        }
                    }
                }
                next_switch = at
                    .map(|t| t + schedule.every)
                    .filter(|t| *t < schedule.until);
            }
            ev = c.next() => match ev {
                Event::Push(f, meta) => {
                    // Each connection numbers its pushes 1, 2, 3, ... (replays too).
                    if f.seq != run.last_seq.wrapping_add(1) {
                        run.bad_seq += 1;
                    }
                    run.last_seq = f.seq;
                    if f.op == BENCH_OP {
                        run.push(&shared, meta.source, &f.body);
                    } else {
                        run.misrouted += 1;
                    }
                }
                Event::Resumed(_) => run.last_seq = 0,
                Event::Reply(_) => {}
            },
        }
    }
    run.flush_latency(&shared);
    if run.pending.is_some() {
        run.unfinished += 1;
    }
    let seen = Seen {
        run,
        reconnects: c.connects.saturating_sub(connects0),
        recovered: c.state.recovered,
        not_recovered: c.state.not_recovered,
        zero_rtt_attempted: c.zero_rtt_attempted,
        zero_rtt_accepted: c.zero_rtt_accepted,
    };
    drop(c);
    Ok(seen)
}

fn new_histogram() -> Result<parking_lot::Mutex<Histogram<u64>>, BenchError> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .map(parking_lot::Mutex::new)
        .map_err(|e| BenchError::Options(format!("histogram: {e}")))
}

fn handover_ms(h: &Histogram<u64>) -> Option<HandoverMs> {
    let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    (!h.is_empty()).then(|| HandoverMs {
        p50: ms(h.value_at_quantile(0.50)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
        count: h.len(),
    })
}

/// The `history.size` for `rate` pushes/s: 4 × the broadcasts (a quarter of the
/// rate) in [`MAX_OUTAGE`], within 1,000 and 100,000.
pub fn history_size(rate: u64) -> usize {
    let per_stream = rate.div_ceil(4) as f64;
    ((per_stream * MAX_OUTAGE.as_secs_f64() * 4.0).ceil() as usize).clamp(1_000, 100_000)
}

fn check(opts: &BenchOptions) -> Result<HandoverMode, BenchError> {
    let h = &opts.handover;
    let mode = HandoverMode::resolve(opts.transport, h.mode)?;
    for (name, p) in [("--loss", h.loss), ("--reorder", h.reorder)] {
        if !(0.0..1.0).contains(&p) {
            return Err(BenchError::Options(format!(
                "{name} is a probability from 0 up to (not including) 1, got {p}"
            )));
        }
    }
    if opts.rate == 0 {
        return Err(BenchError::Options("--rate must be at least 1".into()));
    }
    if opts.duration < Duration::from_secs(1) {
        return Err(BenchError::Options("--duration must be at least 1s".into()));
    }
    if opts.body_size < MIN_BODY {
        return Err(BenchError::Options(format!(
            "--body-size must be at least {MIN_BODY} (source, stream, seq, timestamp)"
        )));
    }
    if opts.raw {
        return Err(BenchError::Options(
            "--raw does not apply to the handover scenario: the floor has no resume".into(),
        ));
    }
    Ok(mode)
}

/// Runs the handover scenario.
pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let mode = check(opts)?;
    let h = &opts.handover;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let tmp =
        tempfile::tempdir().map_err(|e| BenchError::Io(format!("temporary directory: {e}")))?;
    let (server, certs, history) = match &opts.target {
        Target::Spawn { exe } => {
            let mut config = super::process::bench_config(tmp.path());
            config.history.enabled = true;
            config.history.key = true;
            config.history.user = true;
            config.history.room = true;
            config.history.all = true;
            config.history.size = history_size(opts.rate);
            let size = config.history.size;
            (
                ServerProcess::quicpush_with(exe, tmp.path(), &config)?,
                tmp.path().to_owned(),
                Some(size),
            )
        }
        Target::External {
            pid,
            client_addr,
            rpc_addr,
            certs,
        } => (
            ServerProcess::external(*pid, *client_addr, *rpc_addr),
            certs.clone(),
            None,
        ),
    };
    let secret = crate::auth::load_secret(&certs.join(crate::certs::TOKEN_SECRET))
        .map_err(|e| BenchError::Spawn(e.to_string()))?;
    let backend = Client::connect(
        server.control,
        "localhost",
        &BackendIdentity::from_dir(&certs),
    )
    .await
    .map_err(|e| BenchError::Rpc(e.to_string()))?;

    let layout = Layout::new(opts.clients);
    let quic = opts.transport == BenchTransport::Quic;
    let sim = NetSim {
        seed: h.seed,
        loss: h.loss,
        reorder: h.reorder,
        rtt: h.rtt,
        ..NetSim::default()
    };
    let setup = Setup {
        transport: opts.transport,
        mode,
        tcp: server.client_tcp,
        quic: server.client_quic,
        quic_config: if quic {
            Some(quic_config(&certs.join(crate::certs::CA_CERT))?)
        } else {
            None
        },
        ca: certs.join(crate::certs::CA_CERT),
        sim,
        secret: Arc::new(secret),
        layout,
    };

    let pb = progress_bar(opts.progress, opts.clients as u64, "connect");
    let mut clients: Vec<Option<(ResumingClient, Switcher)>> =
        (0..opts.clients).map(|_| None).collect();
    {
        let setup = &setup;
        let mut connecting = futures_util::stream::iter(0..opts.clients)
            .map(|i| async move { (i, setup.connect(i).await) })
            .buffer_unordered(opts.connect_concurrency.max(1));
        while let Some((i, r)) = connecting.next().await {
            clients[i] = Some(r?);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    super::wait_online(&backend, opts.clients as u64).await?;

    let epoch = Instant::now();
    let lanes = Arc::new(lanes(&layout));
    let shared = Arc::new(Shared {
        lanes: lanes.clone(),
        layout,
        epoch,
        unique: AtomicU64::new(0),
        first_push: new_histogram()?,
        gap_filled: new_histogram()?,
        latencies: fleet::new_latencies()?,
    });
    let stop = CancellationToken::new();
    // However this returns, the clients stop.
    let _stop_clients = stop.clone().drop_guard();
    // No switch in the last third (at most 5 s) of the run: each handover gets
    // pushes sent after it.
    let tail = (opts.duration / 3).min(Duration::from_secs(5));
    let until = epoch + opts.duration.saturating_sub(tail);
    let mut rng = rand::rngs::StdRng::seed_from_u64(h.seed);
    let mut tasks = Vec::with_capacity(opts.clients);
    for (i, c) in clients.into_iter().enumerate() {
        let Some((client, switcher)) = c else {
            continue;
        };
        let first =
            (!h.switch_every.is_zero()).then(|| epoch + h.switch_every.mul_f64(rng.gen::<f64>()));
        let schedule = Schedule {
            first,
            every: h.switch_every,
            until,
        };
        tasks.push(tokio::spawn(run_client(
            client,
            switcher,
            layout.streams_of(i),
            schedule,
            shared.clone(),
            stop.clone(),
        )));
    }

    let stat = ProcStat::new(server.pid);
    let cpu0 = stat.cpu_us()?;
    let pb = progress_bar(opts.progress, opts.duration.as_secs(), "handover");
    let ticker = {
        let pb = pb.clone();
        tokio::spawn(async move {
            loop {
                pb.set_position(epoch.elapsed().as_secs());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let sent = send(opts, &backend, &layout, &lanes, epoch).await;
    ticker.abort();
    pb.finish_and_clear();
    let sent = sent?;

    // Every reliable push, to each client of its audience.
    let mut expected = 0u64;
    let mut reliable: Vec<Bits> = Vec::with_capacity(lanes.len());
    for lane in lanes.iter() {
        let st = lane.state.lock().await;
        expected += st.reliable.count() * layout.audience(lane.source, lane.id);
        reliable.push(st.reliable.clone());
    }
    wait_received(&shared.unique, expected).await;
    let cpu = stat.cpu_us()?.saturating_sub(cpu0);
    let seconds = epoch.elapsed().as_secs_f64();
    stop.cancel();
    let mut seen = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(r) => seen.push(r?),
            Err(e) => return Err(BenchError::Io(format!("client task: {e}"))),
        }
    }
    backend.close().await;
    server.stop();

    let mut r = HandoverReport {
        mode,
        network: NetworkReport {
            simulated: quic,
            loss: h.loss,
            reorder: h.reorder,
            rtt_ms: h.rtt.as_secs_f64() * 1000.0,
            keep_alive_ms: if quic {
                KEEP_ALIVE.as_millis() as u64
            } else {
                0
            },
        },
        switch_every_ms: h.switch_every.as_millis() as u64,
        rate: opts.rate,
        pushes_per_sec: sent.pushes as f64 / sent.seconds.max(1e-9),
        seconds,
        history_size: history,
        rooms: layout.rooms,
        users: layout.users,
        pushes: sent.pushes,
        pushes_by_source: sent.by_source.into(),
        pushes_reliable: sent.reliable,
        pushes_unreliable: sent.pushes - sent.reliable,
        outcome_delivered: sent.told.delivered,
        outcome_stored: sent.told.stored,
        outcome_queue_full: sent.told.queue_full,
        outcome_offline: sent.told.offline,
        expected,
        received: 0,
        lost: 0,
        duplicated: 0,
        out_of_order: 0,
        misrouted: 0,
        bad_seq: 0,
        switches: 0,
        switches_while_reconnecting: 0,
        reconnects: 0,
        resumes_recovered: 0,
        zero_rtt_attempted: 0,
        zero_rtt_accepted: 0,
        not_recovered: 0,
        handovers_unfinished: 0,
        first_push_ms: handover_ms(&shared.first_push.lock()),
        gap_filled_ms: handover_ms(&shared.gap_filled.lock()),
    };
    for s in &seen {
        for (k, source) in Source::ALL.into_iter().enumerate() {
            let t = &s.run.tracks[k];
            r.lost += reliable[layout.lane(source, s.run.streams[k])].missing_from(&t.seen);
            r.duplicated += t.duplicated;
            r.out_of_order += t.out_of_order;
        }
        r.received += s.run.received;
        r.misrouted += s.run.misrouted;
        r.bad_seq += s.run.bad_seq;
        r.switches += s.run.switches;
        r.switches_while_reconnecting += s.run.switches_down;
        r.reconnects += s.reconnects;
        r.resumes_recovered += s.recovered;
        r.not_recovered += s.not_recovered;
        r.zero_rtt_attempted += s.zero_rtt_attempted;
        r.zero_rtt_accepted += s.zero_rtt_accepted;
        r.handovers_unfinished += s.run.unfinished;
    }
    let latency: Option<LatencyUs> = {
        let hist = shared.latencies.lock();
        (!hist.is_empty()).then(|| percentiles(&hist))
    };
    let m = Measurement {
        deliveries: r.received,
        expected: r.expected,
        seconds,
        deliveries_per_sec: r.received as f64 / seconds.max(1e-9),
        lost: r.lost,
        duplicated: r.duplicated,
        misrouted: r.misrouted,
        reordered: r.out_of_order,
        bad_seq: r.bad_seq,
        dropped_queue_full: r.outcome_queue_full,
        latency_us: latency,
        server_cpu_us: cpu,
        server_cpu_us_per_delivery: (r.received > 0).then(|| cpu as f64 / r.received as f64),
        server_cpu_percent: cpu as f64 / 1e4 / seconds.max(1e-9),
        ..Measurement::default()
    };
    let mut report = Report::of(opts, m);
    report.messages = r.pushes;
    report.batch = 1;
    report.stalled = 0;
    report.server_rss_per_conn_bytes = None;
    report.connects_per_sec = None;
    report.handover = Some(r);
    Ok(report)
}

/// Waits until `want` distinct pushes arrived, or none arrived for [`QUIET`].
async fn wait_received(unique: &AtomicU64, want: u64) {
    let mut last = unique.load(Ordering::Relaxed);
    let mut last_at = Instant::now();
    loop {
        let now = unique.load(Ordering::Relaxed);
        if now >= want {
            return;
        }
        if now != last {
            last = now;
            last_at = Instant::now();
        } else if last_at.elapsed() > QUIET {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms3(h: Option<HandoverMs>) -> String {
    h.map_or_else(
        || "-".into(),
        |h| format!("{:.1} / {:.1} / {:.1}", h.p50, h.p99, h.max),
    )
}

impl HandoverReport {
    /// The handover table; `transport` names the column.
    pub fn table(&self, report: &Report) -> String {
        let n = &self.network;
        let mut s = format!(
            "scenario=handover transport={:?} mode={} clients={} rooms={} users={} rate={}/s \
             switch-every={}ms history.size={}\n",
            report.transport,
            self.mode.name(),
            report.clients,
            self.rooms,
            self.users,
            self.rate,
            self.switch_every_ms,
            self.history_size
                .map_or_else(|| "(external server)".into(), |h| h.to_string()),
        );
        if n.simulated {
            s.push_str(&format!(
                "network: simulated per client (QUIC): loss {:.1} %, reorder {:.1} %, \
                 +{:.0} ms RTT; keep-alive {} ms\n",
                n.loss * 100.0,
                n.reorder * 100.0,
                n.rtt_ms,
                n.keep_alive_ms
            ));
        } else {
            s.push_str(
                "network: TCP: only the switch (a reset connection) is simulated; \
                 --loss, --reorder and --rtt apply to QUIC only\n",
            );
        }
        let column = format!(
            "{} {}",
            format!("{:?}", report.transport).to_lowercase(),
            self.mode.name()
        );
        let lat = report.latency_us.map_or_else(
            || "-".into(),
            |l| format!("{} / {} / {}", l.p50, l.p99, l.p999),
        );
        let rows: Vec<(&str, String)> = vec![
            ("pushes sent", self.pushes.to_string()),
            ("pushes/s", format!("{:.0}", self.pushes_per_sec)),
            (
                "key / user / room / all",
                format!(
                    "{} / {} / {} / {}",
                    self.pushes_by_source.key,
                    self.pushes_by_source.user,
                    self.pushes_by_source.room,
                    self.pushes_by_source.all
                ),
            ),
            ("reliable pushes", self.pushes_reliable.to_string()),
            ("not reliable pushes", self.pushes_unreliable.to_string()),
            (
                "told queue full / offline",
                format!("{} / {}", self.outcome_queue_full, self.outcome_offline),
            ),
            ("deliveries expected", self.expected.to_string()),
            ("deliveries received", self.received.to_string()),
            ("lost", self.lost.to_string()),
            ("duplicated", self.duplicated.to_string()),
            ("out of order", self.out_of_order.to_string()),
            ("misrouted", self.misrouted.to_string()),
            ("bad push seq", self.bad_seq.to_string()),
            ("switches", self.switches.to_string()),
            (
                "switches while reconnecting",
                self.switches_while_reconnecting.to_string(),
            ),
            ("reconnects", self.reconnects.to_string()),
            ("resumes recovered", self.resumes_recovered.to_string()),
            ("not recovered", self.not_recovered.to_string()),
            (
                "0-RTT attempted / accepted",
                format!("{} / {}", self.zero_rtt_attempted, self.zero_rtt_accepted),
            ),
            (
                "handovers unfinished",
                self.handovers_unfinished.to_string(),
            ),
            ("first push p50/p99/max ms", ms3(self.first_push_ms)),
            ("gap filled p50/p99/max ms", ms3(self.gap_filled_ms)),
            ("push latency p50/p99/p999 µs", lat),
            (
                "server CPU %",
                format!("{:.0}", report.quicpush.server_cpu_percent),
            ),
            ("seconds", format!("{:.1}", self.seconds)),
        ];
        s.push_str(&format!("{:<30} {:>28}\n", "", column));
        for (k, v) in rows {
            s.push_str(&format!("{k:<30} {v:>28}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_puts_every_client_in_one_stream_of_each_kind() {
        for n in [1, 2, 3, 5, 20, 1001] {
            let l = Layout::new(n);
            let lanes = lanes(&l);
            assert_eq!(lanes.len(), l.lane_count());
            let mut members = vec![0u64; l.lane_count()];
            for i in 0..n {
                for (k, s) in Source::ALL.into_iter().enumerate() {
                    let lane = l.lane(s, l.streams_of(i)[k]);
                    assert_eq!(lanes[lane].source, s);
                    members[lane] += 1;
                }
            }
            for (lane, m) in lanes.iter().zip(&members) {
                assert_eq!(
                    l.audience(lane.source, lane.id),
                    *m,
                    "{n} clients, {lane:?}"
                );
            }
        }
    }

    #[test]
    fn modes_resolve_per_transport() {
        use BenchTransport::*;
        use HandoverMode::*;
        assert_eq!(HandoverMode::resolve(Tcp, None).unwrap(), Reconnect);
        assert_eq!(HandoverMode::resolve(Quic, None).unwrap(), Migrate);
        assert_eq!(
            HandoverMode::resolve(Quic, Some(Reconnect)).unwrap(),
            Reconnect
        );
        assert!(HandoverMode::resolve(Tcp, Some(Migrate)).is_err());
        assert_eq!(HandoverMode::resolve(Quic, Some(ZeroRtt)).unwrap(), ZeroRtt);
        assert!(HandoverMode::resolve(Tcp, Some(ZeroRtt)).is_err());
        assert!(HandoverMode::resolve(Ws, None).is_err());
    }

    #[test]
    fn bits_count_what_is_missing() {
        let mut a = Bits::default();
        let mut b = Bits::default();
        for i in [1, 2, 3, 64, 200] {
            assert!(!a.set(i));
        }
        assert!(a.set(3));
        for i in [1, 3, 200] {
            b.set(i);
        }
        assert_eq!(
            (a.count(), a.missing_from(&b), b.missing_from(&a)),
            (5, 2, 0)
        );
    }

    #[test]
    fn history_covers_the_outage() {
        assert_eq!(history_size(200), 2_000);
        assert_eq!(history_size(10), 1_000);
        assert_eq!(history_size(1_000_000), 100_000);
    }
}

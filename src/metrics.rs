//! The server's counters, gauges and histograms, in the Prometheus text format.
//!
//! Each [`Server`](crate::Server) owns one [`Metrics`] with its own registry, so
//! several servers in one process (tests) never share a counter. Every labelled
//! series is resolved into a plain handle when the metrics are built, so counting
//! is a relaxed atomic add on a handle taken from an array: no label hashing and
//! no lock on the hot path. Counting happens per RPC call, per session event and
//! per writer wake-up (with the batch's frame and byte counts), never per
//! recipient of a push. Gauges that mirror the registry's state (connections
//! online, rooms, history, paced broadcasts) are read when `/metrics` is scraped.
//!
//! With `metrics.enabled = false` every handle is absent and counting does
//! nothing.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::channel::{CloseReason, PushOutcome, Transport};
use crate::history::HistoryStats;
use crate::rpc::proto::{Online, Request, Tally};
use crate::session::{SessionEnd, SessionError, WriteError};

/// The `Content-Type` of a scrape's reply (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

type Labels = Vec<(&'static str, &'static str)>;

/// Why a connection ended before it was registered
/// (`quicpush_handshake_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No Auth frame within `client.handshake_timeout`.
    Timeout,
    /// The connection closed before sending Auth.
    ClosedBeforeAuth,
    /// The first frame was not Auth.
    NotAuth,
    /// The Auth token was refused.
    AuthRefused,
    /// A 0-RTT Auth whose handshake was never confirmed.
    Unconfirmed,
    /// The TLS handshake or the WebSocket upgrade failed or timed out (tls, ws,
    /// wss), before any frame.
    Transport,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 6] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::ClosedBeforeAuth,
        HandshakeFailure::NotAuth,
        HandshakeFailure::AuthRefused,
        HandshakeFailure::Unconfirmed,
        HandshakeFailure::Transport,
    ];

    pub fn name(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ClosedBeforeAuth => "closed_before_auth",
            HandshakeFailure::NotAuth => "not_auth",
            HandshakeFailure::AuthRefused => "auth_refused",
            HandshakeFailure::Unconfirmed => "unconfirmed",
            HandshakeFailure::Transport => "transport_handshake",
        }
    }
}

/// Why a session ended (`quicpush_disconnects_total{reason}`). A bad frame counts
/// here whether it came before or after Auth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// The client closed its side.
    Client,
    /// Reading or writing failed (the client's network, a reset).
    Lost,
    /// No frame within `client.heartbeat_timeout`.
    Heartbeat,
    /// The client took no bytes within `client.write_timeout`.
    WriteTimeout,
    SlowConsumer,
    Overflow,
    Kicked,
    Replaced,
    Shutdown,
    /// Bytes that are not a frame, or a stream cut inside one.
    BadFrame,
    /// A frame with a body invalid for its op.
    BadBody,
    RateLimited,
    RoomsFull,
    /// Anything else (the writer task failed).
    Error,
}

impl Disconnect {
    pub const ALL: [Disconnect; 14] = [
        Disconnect::Client,
        Disconnect::Lost,
        Disconnect::Heartbeat,
        Disconnect::WriteTimeout,
        Disconnect::SlowConsumer,
        Disconnect::Overflow,
        Disconnect::Kicked,
        Disconnect::Replaced,
        Disconnect::Shutdown,
        Disconnect::BadFrame,
        Disconnect::BadBody,
        Disconnect::RateLimited,
        Disconnect::RoomsFull,
        Disconnect::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Disconnect::Client => "client",
            Disconnect::Lost => "lost",
            Disconnect::Heartbeat => "heartbeat",
            Disconnect::WriteTimeout => "write_timeout",
            Disconnect::SlowConsumer => "slow_consumer",
            Disconnect::Overflow => "overflow",
            Disconnect::Kicked => "kick",
            Disconnect::Replaced => "replaced",
            Disconnect::Shutdown => "shutdown",
            Disconnect::BadFrame => "bad_frame",
            Disconnect::BadBody => "bad_body",
            Disconnect::RateLimited => "rate_limited",
            Disconnect::RoomsFull => "rooms_full",
            Disconnect::Error => "error",
        }
    }
}

/// How a session's end is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Handshake(HandshakeFailure),
    Disconnect(Disconnect),
}

impl End {
    /// Classifies how a session ended.
    pub fn of(result: &Result<SessionEnd, SessionError>) -> End {
        use Disconnect as D;
        use HandshakeFailure as H;
        match result {
            Ok(SessionEnd::ClientClosed) => End::Disconnect(D::Client),
            Ok(SessionEnd::Unconfirmed) => End::Handshake(H::Unconfirmed),
            Ok(SessionEnd::ServerClosed(r)) => End::Disconnect(match r {
                CloseReason::Replaced => D::Replaced,
                CloseReason::Kicked => D::Kicked,
                CloseReason::Shutdown => D::Shutdown,
                CloseReason::SlowConsumer => D::SlowConsumer,
                CloseReason::Overflow => D::Overflow,
            }),
            Err(e) => match e {
                SessionError::HandshakeTimeout(_) => End::Handshake(H::Timeout),
                SessionError::ClosedBeforeAuth => End::Handshake(H::ClosedBeforeAuth),
                SessionError::NotAuth(_) => End::Handshake(H::NotAuth),
                SessionError::Auth(_) => End::Handshake(H::AuthRefused),
                e if e.is_peer_close() => End::Disconnect(D::Client),
                SessionError::Read(_) | SessionError::Write(WriteError::Io(_)) => {
                    End::Disconnect(D::Lost)
                }
                SessionError::Write(WriteError::Timeout(_)) => End::Disconnect(D::WriteTimeout),
                SessionError::Write(WriteError::Task(_)) | SessionError::Tier(_) => {
                    End::Disconnect(D::Error)
                }
                SessionError::Frame(_) | SessionError::Truncated(_) => End::Disconnect(D::BadFrame),
                SessionError::HeartbeatTimeout(_) => End::Disconnect(D::Heartbeat),
                SessionError::BadBody { .. } => End::Disconnect(D::BadBody),
                SessionError::RateLimited(_) => End::Disconnect(D::RateLimited),
                SessionError::RoomsFull(_) => End::Disconnect(D::RoomsFull),
            },
        }
    }
}

/// The RPC methods, in [`method_index`] order: the `method` label.
pub const METHODS: [&str; 10] = [
    "Ping",
    "PushMsg",
    "MPushMsg",
    "MPushMsgs",
    "PushUser",
    "Broadcast",
    "BroadcastRoom",
    "Rooms",
    "Online",
    "Kick",
];

/// A request's position in [`METHODS`].
pub fn method_index(req: &Request) -> usize {
    match req {
        Request::Ping => 0,
        Request::PushMsg { .. } => 1,
        Request::MPushMsg { .. } => 2,
        Request::MPushMsgs { .. } => 3,
        Request::PushUser { .. } => 4,
        Request::Broadcast { .. } => 5,
        Request::BroadcastRoom { .. } => 6,
        Request::Rooms => 7,
        Request::Online => 8,
        Request::Kick { .. } => 9,
    }
}

/// The methods whose outcomes `quicpush_pushes_total` counts: pushes to keys,
/// user ids and rooms. A broadcast's recipients are counted by
/// `quicpush_deliveries_total` only.
const PUSH_METHODS: [usize; 5] = [1, 2, 3, 4, 6];

/// Push outcomes, in [`outcome_index`] order: the `outcome` label.
pub const OUTCOMES: [&str; 7] = [
    "delivered",
    "offline",
    "queue_full",
    "filtered",
    "stored",
    "forwarded",
    "unavailable",
];

pub fn outcome_index(o: PushOutcome) -> usize {
    match o {
        PushOutcome::Delivered => 0,
        PushOutcome::Offline => 1,
        PushOutcome::QueueFull => 2,
        PushOutcome::Filtered => 3,
        PushOutcome::Stored => 4,
        PushOutcome::Forwarded => 5,
        PushOutcome::Unavailable => 6,
    }
}

/// A call's push outcomes, tallied in the call (plain integers) and added to
/// the counters once when it ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PushCounts(pub [u64; OUTCOMES.len()]);

impl PushCounts {
    pub fn add(&mut self, o: PushOutcome) {
        self.0[outcome_index(o)] += 1;
    }

    pub fn add_tally(&mut self, t: &Tally) {
        self.0[0] += t.delivered;
        self.0[2] += t.queue_full;
        self.0[3] += t.filtered;
        self.0[4] += t.stored;
        self.0[5] += t.forwarded_nodes;
        self.0[6] += t.unavailable;
    }
}

/// Connections online over one transport, from a registry count.
pub fn online_of(online: &Online, t: Transport) -> u64 {
    match t {
        Transport::Tcp => online.tcp,
        Transport::Tls => online.tls,
        Transport::Ws => online.ws,
        Transport::Wss => online.wss,
        Transport::Quic => online.quic,
    }
}

/// Upper bounds of `quicpush_rpc_duration_seconds`, seconds.
pub const LATENCY_BUCKETS: [f64; 17] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A histogram counted with atomics only (the library's own takes a lock per
/// observation).
#[derive(Debug, Clone, Default)]
pub struct AtomicHistogram(Arc<HistogramState>);

#[derive(Debug, Default)]
struct HistogramState {
    /// Per bucket of [`LATENCY_BUCKETS`], then the overflow bucket.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl AtomicHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.partition_point(|&b| b < secs);
        let s = &self.0;
        if let Some(b) = s.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        s.sum_ns.fetch_add(ns, Ordering::Relaxed);
        s.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(s.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|b| b.1).sum();
        let sum = s.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Stripes of a [`StripedCounter`] that one thread each owns: at least the worker
/// threads of a small machine. Threads past them share one more stripe.
const STRIPES: usize = 16;

/// One stripe, on a cache line of its own (128 bytes: two lines on x86, one on
/// Apple silicon), so threads adding to different stripes never share one.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// A counter for the writers' figures (`deliveries`, `bytes_sent`), which every
/// session's writer adds to after each write: in a room fan-out that is once per
/// recipient. A plain atomic would be one cache line that every core writes to with
/// a locked instruction; here each of the first [`STRIPES`] threads owns a stripe
/// and adds to it with a plain load and store (no other thread writes it, so no
/// read-modify-write is needed), later threads share the last stripe with an atomic
/// add, and a scrape sums them.
#[derive(Debug, Clone, Default)]
pub struct StripedCounter(Arc<[Stripe; STRIPES + 1]>);

/// The stripe this thread owns, or `STRIPES` (the shared one) for threads past the
/// first [`STRIPES`]; assigned on the thread's first add, for every counter.
fn stripe_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let v = i.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT.fetch_add(1, Ordering::Relaxed).min(STRIPES);
        i.set(v);
        v
    })
}

impl StripedCounter {
    #[inline]
    pub fn inc_by(&self, n: u64) {
        self.add_at(stripe_index(), n);
    }

    /// Adds `n` to stripe `i` (from [`stripe_index`] on this thread).
    #[inline]
    fn add_at(&self, i: usize, n: u64) {
        if let Some(s) = self.0.get(i) {
            if i < STRIPES {
                // This thread is the stripe's only writer.
                let v = s.0.load(Ordering::Relaxed);
                s.0.store(v.wrapping_add(n), Ordering::Relaxed);
            } else {
                s.0.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The sum over every stripe.
    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, s| sum.wrapping_add(s.0.load(Ordering::Relaxed)))
    }
}

impl TypedMetric for StripedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for StripedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// The counters a session's writer adds to after each write.
#[derive(Debug, Clone, Default)]
pub struct WriteCounters(Option<(StripedCounter, StripedCounter)>);

impl WriteCounters {
    /// One write of `frames` frames in `bytes` bytes.
    #[inline]
    pub fn written(&self, frames: usize, bytes: usize) {
        if let Some((f, b)) = &self.0 {
            let i = stripe_index();
            f.add_at(i, frames as u64);
            b.add_at(i, bytes as u64);
        }
    }
}

/// What a scrape reads from the server's state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub online: Online,
    pub rooms: u64,
    pub history: HistoryStats,
    pub paced_running: u64,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    online: Vec<Gauge>,
    accepted: Vec<Counter>,
    deliveries: Vec<StripedCounter>,
    bytes_sent: Vec<StripedCounter>,
    handshake_failures: Vec<Counter>,
    disconnects: Vec<Counter>,
    pushes: Vec<[Counter; OUTCOMES.len()]>,
    rpc_duration: Vec<AtomicHistogram>,
    rpc_errors: Vec<Counter>,
    queue_full_drops: Counter,
    /// `recovered`, `not_recovered`.
    resume: [Counter; 2],
    rooms: Gauge,
    history_streams: Gauge,
    history_bytes: Gauge,
    paced_running: Gauge,
}

/// The server's metrics; see the module docs.
#[derive(Debug)]
pub struct Metrics {
    inner: Option<Box<Inner>>,
}

fn family<
    M: Clone + Default + EncodeMetric + TypedMetric + std::fmt::Debug + Send + Sync + 'static,
>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: &[&'static str],
) -> Vec<M> {
    let f = Family::<Labels, M>::default();
    let handles = values
        .iter()
        .map(|&v| f.get_or_create(&vec![(label, v)]).clone())
        .collect();
    registry.register(name, help, f);
    handles
}

impl Metrics {
    /// Metrics that count nothing (`metrics.enabled = false`, tests, tools).
    pub fn disabled() -> Metrics {
        Metrics { inner: None }
    }

    /// Metrics with every series registered at zero.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("quicpush");
        let transports: Vec<&'static str> = Transport::ALL.iter().map(|t| t.name()).collect();
        let online = family(
            &mut r,
            "connections_online",
            "Client connections registered now, by transport",
            "transport",
            &transports,
        );
        let accepted = family(
            &mut r,
            "connections_accepted",
            "Client connections accepted (given to a session), by transport",
            "transport",
            &transports,
        );
        let deliveries = family(
            &mut r,
            "deliveries",
            "Frames written to clients (pushes, replies, replays), by transport",
            "transport",
            &transports,
        );
        let bytes_sent = family(
            &mut r,
            "bytes_sent",
            "Bytes written to clients, by transport",
            "transport",
            &transports,
        );
        let reasons: Vec<&'static str> = HandshakeFailure::ALL.iter().map(|h| h.name()).collect();
        let handshake_failures = family(
            &mut r,
            "handshake_failures",
            "Client connections that ended before they were registered, by reason",
            "reason",
            &reasons,
        );
        let reasons: Vec<&'static str> = Disconnect::ALL.iter().map(|d| d.name()).collect();
        let disconnects = family(
            &mut r,
            "disconnects",
            "Client sessions that ended after Auth, by reason",
            "reason",
            &reasons,
        );
        let pushes_family = Family::<Labels, Counter>::default();
        let pushes = (0..METHODS.len())
            .map(|m| {
                std::array::from_fn(|o| {
                    if PUSH_METHODS.contains(&m) {
                        pushes_family
                            .get_or_create(&vec![("method", METHODS[m]), ("outcome", OUTCOMES[o])])
                            .clone()
                    } else {
                        // never counted into, never encoded
                        Counter::default()
                    }
                })
            })
            .collect();
        r.register(
            "pushes",
            "Channels a push to keys, user ids or a room reached, by method and outcome (summed per call)",
            pushes_family,
        );
        let rpc_duration = family(
            &mut r,
            "rpc_duration_seconds",
            "Time to carry out a backend call (QUIC RPC or HTTP API), by method",
            "method",
            &METHODS,
        );
        let rpc_errors = family(
            &mut r,
            "rpc_errors",
            "Backend calls refused with an error (QUIC RPC or HTTP API), by method",
            "method",
            &METHODS,
        );
        let queue_full_drops = Counter::default();
        r.register(
            "queue_full_drops",
            "Pushes to keys, user ids or rooms not queued because a client's queue was full",
            queue_full_drops.clone(),
        );
        let resume_handles = family::<Counter>(
            &mut r,
            "resume",
            "Resume-capable connections registered, by whether history had everything they missed",
            "result",
            &["recovered", "not_recovered"],
        );
        let resume = [resume_handles[0].clone(), resume_handles[1].clone()];
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let rooms = gauge(&mut r, "rooms", "Rooms with at least one member");
        let history_streams = gauge(&mut r, "history_streams", "History streams kept");
        let history_bytes = gauge(&mut r, "history_bytes", "Bytes of history kept");
        let paced_running = gauge(
            &mut r,
            "paced_broadcasts_running",
            "Paced broadcasts running now",
        );
        Metrics {
            inner: Some(Box::new(Inner {
                registry: r,
                online,
                accepted,
                deliveries,
                bytes_sent,
                handshake_failures,
                disconnects,
                pushes,
                rpc_duration,
                rpc_errors,
                queue_full_drops,
                resume,
                rooms,
                history_streams,
                history_bytes,
                paced_running,
            })),
        }
    }

    /// Built for `metrics.enabled`.
    pub fn from_enabled(enabled: bool) -> Metrics {
        if enabled {
            Metrics::new()
        } else {
            Metrics::disabled()
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// A connection was handed to a session.
    pub fn accepted(&self, t: Transport) {
        if let Some(c) = self.inner.as_ref().and_then(|i| i.accepted.get(t.index())) {
            c.inc();
        }
    }

    /// A session ended.
    pub fn session_ended(&self, result: &Result<SessionEnd, SessionError>) {
        let Some(i) = &self.inner else { return };
        let c = match End::of(result) {
            End::Handshake(h) => i.handshake_failures.get(h as usize),
            End::Disconnect(d) => i.disconnects.get(d as usize),
        };
        if let Some(c) = c {
            c.inc();
        }
    }

    /// A connection failed before its session began (see [`HandshakeFailure`]).
    pub fn handshake_failed(&self, h: HandshakeFailure) {
        if let Some(c) = self
            .inner
            .as_ref()
            .and_then(|i| i.handshake_failures.get(h as usize))
        {
            c.inc();
        }
    }

    /// A resume-capable connection registered; `recovered`: history had
    /// everything it asked for.
    pub fn resumed(&self, recovered: bool) {
        if let Some(i) = &self.inner {
            i.resume[usize::from(!recovered)].inc();
        }
    }

    /// The handles a writer over `t` counts its writes into.
    pub fn writer(&self, t: Transport) -> WriteCounters {
        WriteCounters(self.inner.as_ref().and_then(|i| {
            Some((
                i.deliveries.get(t.index())?.clone(),
                i.bytes_sent.get(t.index())?.clone(),
            ))
        }))
    }

    /// One backend call of method `method` ([`method_index`]) ended.
    pub fn call(&self, method: usize, elapsed: Duration, failed: bool, counts: &PushCounts) {
        let Some(i) = &self.inner else { return };
        if let Some(h) = i.rpc_duration.get(method) {
            h.observe(elapsed);
        }
        if failed {
            if let Some(c) = i.rpc_errors.get(method) {
                c.inc();
            }
            return;
        }
        if let Some(p) = i.pushes.get(method) {
            for (c, &n) in p.iter().zip(&counts.0) {
                if n > 0 {
                    c.inc_by(n);
                }
            }
        }
        if counts.0[2] > 0 {
            i.queue_full_drops.inc_by(counts.0[2]);
        }
    }

    /// The Prometheus text of every metric, with the gauges set from `snap`;
    /// `None` when the metrics are off.
    pub fn encode(&self, snap: &Snapshot) -> Option<String> {
        let i = self.inner.as_ref()?;
        for (t, g) in Transport::ALL.iter().zip(&i.online) {
            g.set(clamp(online_of(&snap.online, *t)));
        }
        i.rooms.set(clamp(snap.rooms));
        i.history_streams.set(clamp(snap.history.streams));
        i.history_bytes.set(clamp(snap.history.bytes));
        i.paced_running.set(clamp(snap.paced_running));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &i.registry);
        Some(out)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The samples of a Prometheus text scrape: series (name and labels, as written)
/// → value. Comments and lines that are not a sample are skipped.
pub fn parse_text(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let v = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().ok()?,
            };
            Some((series.to_owned(), v))
        })
        .collect()
}

/// The labels of a series as written (`name{a="x",b="y"}`), without the name.
pub fn labels_of(series: &str) -> Vec<(&str, &str)> {
    let Some((_, rest)) = series.split_once('{') else {
        return Vec::new();
    };
    rest.trim_end_matches('}')
        .split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k, v.trim_matches('"')))
        })
        .collect()
}

/// The `q` quantile (0..=1) estimated from a histogram's cumulative buckets
/// (upper bound, count), by linear interpolation inside the bucket it falls in,
/// as Prometheus's `histogram_quantile` does. `None` without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = count - prev.1;
            let frac = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

/// `quicpush stats`: the figures of a scrape for a person, as a short table.
pub fn summary(text: &str) -> String {
    use std::fmt::Write;
    let samples = parse_text(text);
    let get = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|(k, _)| {
                k.split('{').next() == Some(name) && {
                    let l = labels_of(k);
                    labels.iter().all(|want| l.contains(want))
                }
            })
            .map(|(_, v)| v)
            .sum()
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22}{:>12}{:>12}{:>14}{:>14}",
        "connections", "online", "accepted", "frames sent", "bytes sent"
    );
    for t in Transport::ALL {
        let l = [("transport", t.name())];
        let _ = writeln!(
            out,
            "  {:<20}{:>12}{:>12}{:>14}{:>14}",
            t.name(),
            get("quicpush_connections_online", &l),
            get("quicpush_connections_accepted_total", &l),
            get("quicpush_deliveries_total", &l),
            get("quicpush_bytes_sent_total", &l),
        );
    }
    let list = |name: &str, reasons: &mut dyn Iterator<Item = &'static str>| -> String {
        let v: Vec<String> = reasons
            .filter_map(|r| {
                let n = get(name, &[("reason", r)]);
                (n > 0.0).then(|| format!("{r} {n}"))
            })
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    };
    let _ = writeln!(
        out,
        "handshake failures: {}",
        list(
            "quicpush_handshake_failures_total",
            &mut HandshakeFailure::ALL.iter().map(|h| h.name())
        )
    );
    let _ = writeln!(
        out,
        "disconnects: {}",
        list(
            "quicpush_disconnects_total",
            &mut Disconnect::ALL.iter().map(|d| d.name())
        )
    );
    let _ = write!(out, "\n{:<22}", "pushes (channels)");
    for o in OUTCOMES {
        let _ = write!(out, "{o:>12}");
    }
    out.push('\n');
    for &m in &PUSH_METHODS {
        let counts: Vec<f64> = OUTCOMES
            .iter()
            .map(|&o| {
                get(
                    "quicpush_pushes_total",
                    &[("method", METHODS[m]), ("outcome", o)],
                )
            })
            .collect();
        if counts.iter().all(|&c| c == 0.0) {
            continue;
        }
        let _ = write!(out, "  {:<20}", METHODS[m]);
        for c in counts {
            let _ = write!(out, "{c:>12}");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "queue full drops: {}",
        get("quicpush_queue_full_drops_total", &[])
    );
    let _ = writeln!(
        out,
        "resume: recovered {}, not recovered {}",
        get("quicpush_resume_total", &[("result", "recovered")]),
        get("quicpush_resume_total", &[("result", "not_recovered")])
    );
    let _ = writeln!(
        out,
        "history: {} streams, {} bytes; rooms {}; paced broadcasts running {}",
        get("quicpush_history_streams", &[]),
        get("quicpush_history_bytes", &[]),
        get("quicpush_rooms", &[]),
        get("quicpush_paced_broadcasts_running", &[])
    );
    let _ = writeln!(
        out,
        "\n{:<22}{:>12}{:>12}{:>12}{:>12}",
        "backend calls", "calls", "errors", "p50", "p99"
    );
    for m in METHODS {
        let calls = get("quicpush_rpc_duration_seconds_count", &[("method", m)]);
        if calls == 0.0 {
            continue;
        }
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(k, _)| k.starts_with("quicpush_rpc_duration_seconds_bucket{"))
            .filter_map(|(k, &v)| {
                let l = labels_of(k);
                if !l.contains(&("method", m)) {
                    return None;
                }
                let le = l.iter().find(|(n, _)| *n == "le")?.1;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let q = |p| quantile(&buckets, p).map_or("-".to_owned(), |s| format!("{:.0} µs", s * 1e6));
        let _ = writeln!(
            out,
            "  {:<20}{:>12}{:>12}{:>12}{:>12}",
            m,
            calls,
            get("quicpush_rpc_errors_total", &[("method", m)]),
            q(0.5),
            q(0.99)
        );
    }
    out
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_series_is_there_at_zero_and_counts() {
        let m = Metrics::new();
        let text = m.encode(&Snapshot::default()).unwrap();
        assert_eq!(
            value(
                &text,
                "quicpush_connections_accepted_total{transport=\"quic\"}"
            ),
            Some(0.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "quicpush_pushes_total{method=\"PushMsg\",outcome=\"offline\"}"
            ),
            Some(0.0)
        );
        assert!(!text.contains("method=\"Ping\",outcome"), "{text}");
        m.accepted(Transport::Tcp);
        let mut c = PushCounts::default();
        c.add(PushOutcome::QueueFull);
        c.add(PushOutcome::Delivered);
        m.call(2, Duration::from_micros(30), false, &c);
        m.writer(Transport::Quic).written(3, 100);
        m.session_ended(&Err(SessionError::ClosedBeforeAuth));
        m.session_ended(&Ok(SessionEnd::ServerClosed(CloseReason::Kicked)));
        m.resumed(false);
        let text = m
            .encode(&Snapshot {
                online: Online {
                    total: 3,
                    tcp: 1,
                    quic: 2,
                    ..Default::default()
                },
                rooms: 4,
                ..Default::default()
            })
            .unwrap();
        for (series, v) in [
            (
                "quicpush_connections_accepted_total{transport=\"tcp\"}",
                1.0,
            ),
            ("quicpush_connections_online{transport=\"quic\"}", 2.0),
            (
                "quicpush_pushes_total{method=\"MPushMsg\",outcome=\"queue_full\"}",
                1.0,
            ),
            (
                "quicpush_pushes_total{method=\"MPushMsg\",outcome=\"delivered\"}",
                1.0,
            ),
            ("quicpush_queue_full_drops_total", 1.0),
            ("quicpush_deliveries_total{transport=\"quic\"}", 3.0),
            ("quicpush_bytes_sent_total{transport=\"quic\"}", 100.0),
            (
                "quicpush_handshake_failures_total{reason=\"closed_before_auth\"}",
                1.0,
            ),
            ("quicpush_disconnects_total{reason=\"kick\"}", 1.0),
            ("quicpush_resume_total{result=\"not_recovered\"}", 1.0),
            ("quicpush_rooms", 4.0),
            (
                "quicpush_rpc_duration_seconds_count{method=\"MPushMsg\"}",
                1.0,
            ),
            (
                "quicpush_rpc_duration_seconds_bucket{method=\"MPushMsg\",le=\"5e-05\"}",
                1.0,
            ),
            (
                "quicpush_rpc_duration_seconds_bucket{method=\"MPushMsg\",le=\"2.5e-05\"}",
                0.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(v), "{series} in\n{text}");
        }
    }

    #[test]
    fn disabled_metrics_count_nothing_and_encode_nothing() {
        let m = Metrics::disabled();
        m.accepted(Transport::Tcp);
        m.writer(Transport::Tcp).written(1, 1);
        m.call(1, Duration::ZERO, false, &PushCounts::default());
        assert!(m.encode(&Snapshot::default()).is_none());
    }

    #[test]
    fn scrapes_parse_back_and_quantiles_interpolate() {
        let m = Metrics::new();
        for us in [20, 40, 40, 800] {
            m.call(1, Duration::from_micros(us), false, &PushCounts::default());
        }
        let text = m.encode(&Snapshot::default()).unwrap();
        let samples = parse_text(&text);
        assert_eq!(
            samples["quicpush_rpc_duration_seconds_count{method=\"PushMsg\"}"],
            4.0
        );
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|(k, _)| {
                k.starts_with("quicpush_rpc_duration_seconds_bucket{method=\"PushMsg\"")
            })
            .map(|(k, &v)| {
                let le = labels_of(k)
                    .into_iter()
                    .find(|(n, _)| *n == "le")
                    .unwrap()
                    .1;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let p50 = quantile(&buckets, 0.5).unwrap();
        assert!((2.5e-5..=5e-5).contains(&p50), "{p50}");
        let p99 = quantile(&buckets, 0.99).unwrap();
        assert!((5e-4..=1e-3).contains(&p99), "{p99}");
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }

    #[test]
    fn the_summary_shows_the_figures() {
        let m = Metrics::new();
        m.accepted(Transport::Quic);
        let mut c = PushCounts::default();
        c.add(PushOutcome::Delivered);
        m.call(1, Duration::from_micros(40), false, &c);
        m.session_ended(&Ok(SessionEnd::ServerClosed(CloseReason::SlowConsumer)));
        let text = m
            .encode(&Snapshot {
                online: Online {
                    total: 1,
                    tcp: 0,
                    quic: 1,
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap();
        let s = summary(&text);
        assert!(s.contains("disconnects: slow_consumer 1"), "{s}");
        assert!(s.contains("handshake failures: none"), "{s}");
        let quic = s
            .lines()
            .find(|l| l.trim_start().starts_with("quic"))
            .unwrap();
        assert_eq!(
            quic.split_whitespace().collect::<Vec<_>>(),
            ["quic", "1", "1", "0", "0"]
        );
        let calls = s
            .lines()
            .rfind(|l| l.trim_start().starts_with("PushMsg "))
            .unwrap();
        assert!(calls.contains("µs"), "{s}");
        assert!(
            !s.contains("BroadcastRoom"),
            "rows with nothing are left out: {s}"
        );
    }

    #[test]
    fn a_striped_counter_sums_what_every_thread_added() {
        let c = StripedCounter::default();
        // More threads than owned stripes: the last ones share one.
        let threads: Vec<_> = (0..(STRIPES as u64 + 8))
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.inc_by(i)))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 1000 * (0..(STRIPES as u64 + 8)).sum::<u64>());
    }

    #[test]
    fn a_quic_client_closing_its_connection_counts_as_client_not_lost() {
        let closed = quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(
            quinn::ApplicationClose {
                error_code: 0u32.into(),
                reason: bytes::Bytes::from_static(b"bye"),
            },
        ));
        let read = |e: quinn::ReadError| Err(SessionError::Read(std::io::Error::from(e)));
        assert_eq!(End::of(&read(closed)), End::Disconnect(Disconnect::Client));
        let timed_out = quinn::ReadError::ConnectionLost(quinn::ConnectionError::TimedOut);
        assert_eq!(End::of(&read(timed_out)), End::Disconnect(Disconnect::Lost));
        let reset = Err(SessionError::Read(
            std::io::ErrorKind::ConnectionReset.into(),
        ));
        assert_eq!(End::of(&reset), End::Disconnect(Disconnect::Lost));
    }

    #[test]
    fn every_reason_is_at_its_index() {
        for (i, h) in HandshakeFailure::ALL.iter().enumerate() {
            assert_eq!(*h as usize, i);
        }
        for (i, d) in Disconnect::ALL.iter().enumerate() {
            assert_eq!(*d as usize, i);
        }
    }
}

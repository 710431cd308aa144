//! `quicpush bench`: measures a node the way a user would.
//!
//! The server runs as its own process (`quicpush serve`, started here on free
//! loopback ports unless an external one is named), so its CPU time and memory are
//! read from /proc for its pid alone while this process generates the load: N
//! clients over TCP or QUIC and one backend connection. Every message is checked at
//! the clients (addressee, per-client index, timestamp), so lost, duplicated and
//! misrouted messages are counted, never assumed away. With `raw`, the same load
//! runs against the floor ([`floor`]) and the report gives quicpush's ratio to it.
//!
//! - [`process`]: starting and measuring the server processes.
//! - [`fleet`]: connecting clients and checking what they receive.
//! - [`floor`]: the minimal fan-out server used as the floor.
//! - [`handover`]: the handover scenario: clients switching networks under a
//!   steady load, each push checked exactly once and in order.

pub mod fleet;
pub mod floor;
pub mod handover;
pub mod handshake;
pub mod node_loss;
pub mod process;
pub mod redis;
pub mod tier;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::channel::PushOutcome;
use crate::protocol::Frame;
use crate::rpc::proto::PushItem;
use crate::rpc::Client;
use crate::tls::BackendIdentity;
use fleet::{Dial, Login, Readers, ANY_KEY};
use process::{ProcStats, ServerProcess};

/// The op of every bench message.
pub const BENCH_OP: u32 = 1000;
/// The room the room and latency scenarios use.
pub const ROOM: &str = "bench://room";
/// How long without progress before the remaining messages count as lost.
const QUIET: Duration = Duration::from_secs(3);

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A server process could not be started or did not come up.
    #[error("cannot start the server: {0}")]
    Spawn(String),
    /// A socket, file or /proc read failed.
    #[error("I/O: {0}")]
    Io(String),
    /// A backend call failed.
    #[error("backend call failed: {0}")]
    Rpc(String),
    /// The options do not make a runnable benchmark.
    #[error("invalid options: {0}")]
    Options(String),
}

/// What load to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// All clients in one room; BroadcastRoom pushes as fast as they are accepted.
    Room,
    /// Every client addressed by key: MPushMsgs batches, or PushMsg with batch 1.
    Keys,
    /// Broadcast to every client.
    Broadcast,
    /// A steady rate of deliveries; latency from push to the client's read.
    Latency,
    /// Connected, idle clients: the server's memory per connection.
    Idle,
    /// Connect + auth rate.
    Connect,
    /// Clients switching networks on schedule under a steady rate of key, user,
    /// room and broadcast pushes: loss, duplicates, order and handover time.
    Handover,
    /// A tier with key history in Redis, its last node killed (`kill -9`) under
    /// a steady PushMsg load: loss, duplicates, order and resume time.
    NodeLoss,
}

/// Which history the started server keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchHistory {
    /// The built-in defaults: keys and user ids.
    #[default]
    Default,
    /// `history.enabled = false`.
    Off,
    /// Every source: keys, user ids, rooms and broadcasts.
    All,
}

impl BenchHistory {
    /// Applies this choice to a server configuration.
    pub fn apply(self, h: &mut crate::config::HistoryConfig) {
        match self {
            BenchHistory::Default => {}
            BenchHistory::Off => h.enabled = false,
            BenchHistory::All => {
                h.room = true;
                h.all = true;
            }
        }
    }
}

/// The metrics of the server the bench starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchMetrics {
    /// `metrics.enabled = true`, the default.
    #[default]
    On,
    /// `metrics.enabled = false`.
    Off,
    /// The scenario four times, each against its own server: metrics off, on,
    /// on, off; the report gives every rate and the ratio of the means.
    Compare,
}

/// Client transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchTransport {
    Tcp,
    Quic,
    /// WebSocket on `/sub` (`client.ws_bind`); the raw floor does not speak it.
    Ws,
}

/// Which server to measure.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start `exe serve` with a temporary config and fresh certificates.
    Spawn { exe: PathBuf },
    /// A running server: its pid, client and RPC addresses, and the certificate
    /// directory holding `ca.pem`, `backend.pem`/`.key` and `token.secret`.
    External {
        pid: u32,
        client_addr: SocketAddr,
        rpc_addr: SocketAddr,
        certs: PathBuf,
    },
}

/// A benchmark run's parameters.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub scenario: Scenario,
    pub transport: BenchTransport,
    pub clients: usize,
    /// Messages the backend sends (room, keys, broadcast).
    pub messages: u64,
    /// Messages per MPushMsgs call (keys); 1 = PushMsg calls.
    pub batch: usize,
    /// Deliveries per second (latency).
    pub rate: u64,
    /// Keys: messages per second, paced (each stamped with the time it was due),
    /// instead of as fast as the clients keep up; `None`: as fast as they do.
    pub keys_rate: Option<u64>,
    /// Nodes of a tier to start (sharing a redis-server the bench starts);
    /// 1: a single node, no Redis.
    pub nodes: usize,
    /// The tier's Redis is a three-master Redis Cluster instead of one server.
    pub redis_cluster: bool,
    /// `client.write_coalesce` of every server the bench starts.
    pub write_coalesce: Duration,
    /// The tier's `cluster.ttl`; `None`: the server's default (3 s for the
    /// node-loss scenario).
    pub cluster_ttl: Option<Duration>,
    /// How long the latency scenario runs.
    pub duration: Duration,
    pub body_size: usize,
    /// Also measure the floor server and report the ratio.
    pub raw: bool,
    /// Backend calls in flight at once.
    pub in_flight: usize,
    /// Clients connecting at once.
    pub connect_concurrency: usize,
    /// Extra clients in the same audience (room, broadcast) that authenticate and
    /// then never read: what a stalled client costs the others.
    pub stalled: usize,
    /// `client.tcp_send_buffer` of the started server (0: kernel default).
    pub tcp_send_buffer: u32,
    /// The handover scenario's network, switches and mode.
    pub handover: handover::HandoverOptions,
    /// The history of the server the bench starts (not the handover scenario's,
    /// which keeps every source).
    pub history: BenchHistory,
    /// The metrics of the server the bench starts, or a comparison of both.
    pub metrics: BenchMetrics,
    pub target: Target,
    /// Binary that serves `serve` and `bench-floor` (this one, normally).
    pub exe: PathBuf,
    pub progress: bool,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyUs {
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// What one run against one server measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measurement {
    /// Tier runs: Redis commands run while pushing, by command, less those the
    /// tier runs at rest in as long (its refreshes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_calls: Option<std::collections::BTreeMap<String, f64>>,
    pub deliveries: u64,
    pub expected: u64,
    pub seconds: f64,
    pub deliveries_per_sec: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub misrouted: u64,
    /// Messages that reached a client after a later one (concurrent calls keep no
    /// order between them).
    pub reordered: u64,
    /// Pushes whose sequence number did not follow the previous one on its connection.
    pub bad_seq: u64,
    pub dropped_queue_full: u64,
    pub latency_us: Option<LatencyUs>,
    pub server_cpu_us: u64,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_cpu_percent: f64,
    pub server_rss_per_conn_bytes: Option<f64>,
    pub connects_per_sec: Option<f64>,
    /// Connect scenario: the server's CPU per connect (and, for quicpush, Auth), µs.
    pub server_cpu_us_per_connect: Option<f64>,
    /// Stalled clients the server had disconnected by the end (quicpush only).
    pub stalled_disconnected: Option<usize>,
}

/// The report `quicpush bench` prints and writes as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    pub transport: BenchTransport,
    pub clients: usize,
    pub messages: u64,
    pub batch: usize,
    pub body_size: usize,
    pub stalled: usize,
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub misrouted: u64,
    pub dropped_queue_full: u64,
    pub latency_us: Option<LatencyUs>,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_cpu_percent: f64,
    pub server_rss_per_conn_bytes: Option<f64>,
    pub connects_per_sec: Option<f64>,
    /// Connect scenario: the server's CPU per connect + Auth, µs.
    pub server_cpu_us_per_connect: Option<f64>,
    /// Connect scenario: the server side of a full TLS 1.3 handshake in rustls
    /// alone, same certificate and settings, measured in this run (median, µs;
    /// [`handshake`]).
    pub rustls_handshake_server_us: Option<f64>,
    /// `server_cpu_us_per_connect` over `rustls_handshake_server_us`.
    pub connect_cpu_to_rustls: Option<f64>,
    pub raw_deliveries_per_sec: Option<f64>,
    pub raw_connects_per_sec: Option<f64>,
    pub raw_rss_per_conn_bytes: Option<f64>,
    pub ratio_to_raw: Option<f64>,
    /// `--metrics compare`: the same scenario against a server with metrics off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_off: Option<Measurement>,
    /// `--metrics compare`: deliveries/s of the four runs (off, on, on, off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_rates: Option<MetricsRates>,
    /// `--metrics compare`: the mean deliveries/s with metrics on over the mean with
    /// them off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_on_to_off: Option<f64>,
    pub quicpush: Measurement,
    pub raw: Option<Measurement>,
    /// The handover scenario's figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover: Option<handover::HandoverReport>,
    /// `--nodes N`: the tier beside one node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<tier::TierReport>,
    /// The node-loss scenario's figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_loss: Option<node_loss::NodeLossReport>,
}

/// How the load reaches a server: quicpush's RPC, or the floor's control socket.
enum Pusher {
    /// The backend connection, and how many stalled clients each fan-out reaches:
    /// that many `queue full` per message are theirs, not the readers'.
    Quicpush(Arc<Client>, u64),
    Floor(mpsc::Sender<Bytes>),
}

impl Pusher {
    fn floor(stream: tokio::net::TcpStream) -> Pusher {
        let (tx, rx) = mpsc::channel::<Bytes>(1024);
        tokio::spawn(floor::write_coalesced(rx, stream));
        Pusher::Floor(tx)
    }

    async fn floor_send(tx: &mpsc::Sender<Bytes>, bytes: Bytes) -> Result<u64, BenchError> {
        tx.send(bytes)
            .await
            .map_err(|_| BenchError::Io("floor control connection closed".into()))?;
        Ok(0)
    }

    /// One message to the room; returns how many deliveries the server dropped.
    async fn room(&self, body: Bytes) -> Result<u64, BenchError> {
        match self {
            Pusher::Quicpush(c, stalled) => c
                .broadcast_room(ROOM, BENCH_OP, body)
                .await
                .map(|t| t.queue_full.saturating_sub(*stalled))
                .map_err(|e| BenchError::Rpc(e.to_string())),
            Pusher::Floor(tx) => {
                Self::floor_send(tx, Frame::new(floor::CTL_ALL, 0, body).to_bytes()).await
            }
        }
    }

    async fn broadcast(&self, body: Bytes) -> Result<u64, BenchError> {
        match self {
            Pusher::Quicpush(c, _) => c
                .broadcast(BENCH_OP, body, 0)
                .await
                .map(|_| 0)
                .map_err(|e| BenchError::Rpc(e.to_string())),
            Pusher::Floor(tx) => {
                Self::floor_send(tx, Frame::new(floor::CTL_ALL, 0, body).to_bytes()).await
            }
        }
    }

    async fn keys(&self, items: Vec<(u32, Bytes)>) -> Result<u64, BenchError> {
        match self {
            Pusher::Quicpush(c, _) => {
                let rpc = |e: crate::rpc::ClientError| BenchError::Rpc(e.to_string());
                if let [(key, body)] = &items[..] {
                    let o = c
                        .push_msg(format!("bench-{key}"), BENCH_OP, body.clone())
                        .await
                        .map_err(rpc)?;
                    return Ok(u64::from(o == PushOutcome::QueueFull));
                }
                let msgs = items
                    .into_iter()
                    .map(|(key, body)| PushItem {
                        key: format!("bench-{key}"),
                        op: BENCH_OP,
                        body,
                    })
                    .collect();
                let m = c.mpush_msgs(msgs).await.map_err(rpc)?;
                Ok(m.count(PushOutcome::QueueFull) as u64)
            }
            Pusher::Floor(tx) => {
                let mut out = BytesMut::new();
                for (key, body) in items {
                    let mut b = BytesMut::with_capacity(4 + body.len());
                    b.put_u32(key);
                    b.extend_from_slice(&body);
                    Frame::new(floor::CTL_ONE, 0, b.freeze()).encode(&mut out);
                }
                Self::floor_send(tx, out.freeze()).await
            }
        }
    }
}

fn percentiles(h: &Histogram<u64>) -> LatencyUs {
    LatencyUs {
        p50: h.value_at_quantile(0.50),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

fn progress_bar(enabled: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
    ) {
        pb.set_style(style);
    }
    pb.set_message(what.to_owned());
    pb
}

/// `--metrics compare`: deliveries/s of each run, in the order off, on, on, off
/// (`off[0]`, `on[0]`, `on[1]`, `off[1]`).
#[derive(Debug, Clone, Serialize)]
pub struct MetricsRates {
    pub off: [f64; 2],
    pub on: [f64; 2],
    /// Server CPU µs per delivery of the same runs: on a machine whose cores are
    /// shared (steal time), steadier than the rates.
    pub off_cpu_us: [Option<f64>; 2],
    pub on_cpu_us: [Option<f64>; 2],
}

impl MetricsRates {
    /// Mean rate with metrics on over the mean with them off.
    pub fn ratio(&self) -> Option<f64> {
        let off = self.off[0] + self.off[1];
        (off > 0.0).then(|| (self.on[0] + self.on[1]) / off)
    }

    /// Mean server CPU per delivery with metrics off over the mean with them on:
    /// below 1 when counting costs CPU.
    pub fn cpu_ratio(&self) -> Option<f64> {
        let [Some(a), Some(b)] = self.off_cpu_us else {
            return None;
        };
        let [Some(c), Some(d)] = self.on_cpu_us else {
            return None;
        };
        (c + d > 0.0).then(|| (a + b) / (c + d))
    }
}

/// Runs the benchmark and returns its report.
pub async fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    if opts.clients == 0 {
        return Err(BenchError::Options("--clients must be at least 1".into()));
    }
    if opts.scenario == Scenario::NodeLoss {
        return node_loss::run(opts).await;
    }
    if opts.scenario == Scenario::Handover {
        if opts.metrics == BenchMetrics::Compare {
            return Err(BenchError::Options(
                "--metrics compare applies to every scenario but handover".into(),
            ));
        }
        return handover::run(opts).await;
    }
    if opts.transport == BenchTransport::Ws && opts.raw {
        return Err(BenchError::Options(
            "--raw: the raw floor speaks TCP and QUIC, not WebSocket".into(),
        ));
    }
    if opts.body_size < fleet::MIN_BODY {
        return Err(BenchError::Options(format!(
            "--body-size must be at least {} (index, timestamp, key)",
            fleet::MIN_BODY
        )));
    }
    if opts.batch == 0 {
        return Err(BenchError::Options("--batch must be at least 1".into()));
    }
    if opts.stalled > 0 && !matches!(opts.scenario, Scenario::Room | Scenario::Broadcast) {
        return Err(BenchError::Options(
            "--stalled applies to the room and broadcast scenarios".into(),
        ));
    }
    if opts.nodes > 1 {
        if !matches!(opts.scenario, Scenario::Room | Scenario::Keys) {
            return Err(BenchError::Options(
                "--nodes applies to the room and keys scenarios".into(),
            ));
        }
        if opts.raw || opts.metrics == BenchMetrics::Compare || opts.stalled > 0 {
            return Err(BenchError::Options(
                "--nodes compares with one node: it takes no --raw, --metrics compare or --stalled"
                    .into(),
            ));
        }
        let Target::Spawn { exe } = &opts.target else {
            return Err(BenchError::Options(
                "--nodes starts its own nodes: it takes no --server-pid".into(),
            ));
        };
        let tmp =
            tempfile::tempdir().map_err(|e| BenchError::Io(format!("temporary directory: {e}")))?;
        return run_tier(opts, exe, tmp.path()).await;
    }
    if opts.metrics == BenchMetrics::Compare && !matches!(opts.target, Target::Spawn { .. }) {
        return Err(BenchError::Options(
            "--metrics compare starts its own servers: it takes no --server-pid".into(),
        ));
    }
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let tmp =
        tempfile::tempdir().map_err(|e| BenchError::Io(format!("temporary directory: {e}")))?;

    // `--metrics compare` runs off, on, on, off (each against its own server), so a
    // drift of the machine over the runs weighs on both sides alike.
    let compare = opts.metrics == BenchMetrics::Compare;
    let metrics_off = if compare {
        Some(measure_quicpush(opts, tmp.path(), false, "quicpush, metrics off (1 of 2)").await?)
    } else {
        None
    };
    let (quicpush, certs) = measure_quicpush_at(
        opts,
        tmp.path(),
        opts.metrics != BenchMetrics::Off,
        if compare {
            "quicpush, metrics on (1 of 2)"
        } else {
            "quicpush"
        },
    )
    .await?;
    let metrics_rates = match &metrics_off {
        Some(off1) => {
            let on2 =
                measure_quicpush(opts, tmp.path(), true, "quicpush, metrics on (2 of 2)").await?;
            let off2 =
                measure_quicpush(opts, tmp.path(), false, "quicpush, metrics off (2 of 2)").await?;
            Some(MetricsRates {
                off: [off1.deliveries_per_sec, off2.deliveries_per_sec],
                on: [quicpush.deliveries_per_sec, on2.deliveries_per_sec],
                off_cpu_us: [
                    off1.server_cpu_us_per_delivery,
                    off2.server_cpu_us_per_delivery,
                ],
                on_cpu_us: [
                    quicpush.server_cpu_us_per_delivery,
                    on2.server_cpu_us_per_delivery,
                ],
            })
        }
        None => None,
    };
    let metrics_on_to_off = metrics_rates.as_ref().and_then(MetricsRates::ratio);

    let raw = if opts.raw {
        let floor = ServerProcess::floor(&opts.exe, &certs, opts.tcp_send_buffer)?;
        let control = tokio::net::TcpStream::connect(floor.control)
            .await
            .map_err(|e| BenchError::Io(format!("floor control: {e}")))?;
        let _ = control.set_nodelay(true);
        let m = measure(
            opts,
            std::slice::from_ref(&floor),
            0,
            None,
            &certs,
            Login::Index,
            Pusher::floor(control),
            None,
            "raw floor",
        )
        .await?;
        floor.stop();
        Some(m)
    } else {
        None
    };

    let ratio = raw.as_ref().and_then(|r| match opts.scenario {
        Scenario::Idle => Some(r.server_rss_per_conn_bytes? / quicpush.server_rss_per_conn_bytes?),
        Scenario::Connect => Some(quicpush.connects_per_sec? / r.connects_per_sec?),
        _ => {
            (r.deliveries_per_sec > 0.0).then(|| quicpush.deliveries_per_sec / r.deliveries_per_sec)
        }
    });
    let mut report = Report::of(opts, quicpush);
    report.raw_deliveries_per_sec = raw.as_ref().map(|r| r.deliveries_per_sec);
    report.raw_connects_per_sec = raw.as_ref().and_then(|r| r.connects_per_sec);
    report.raw_rss_per_conn_bytes = raw.as_ref().and_then(|r| r.server_rss_per_conn_bytes);
    report.ratio_to_raw = ratio;
    if opts.scenario == Scenario::Connect {
        // The yardstick, in this run, after the servers' load is gone.
        let dir = certs.clone();
        let us = tokio::task::spawn_blocking(move || handshake::rustls_server_us(&dir, 2000))
            .await
            .map_err(|e| BenchError::Io(format!("rustls handshake task: {e}")))??;
        report.rustls_handshake_server_us = Some(us);
        report.connect_cpu_to_rustls = report.server_cpu_us_per_connect.map(|c| c / us);
    }
    report.metrics_off = metrics_off;
    report.metrics_rates = metrics_rates;
    report.metrics_on_to_off = metrics_on_to_off;
    report.raw = raw;
    Ok(report)
}

/// `--nodes N`: one node, then a tier of N, with the same clients.
async fn run_tier(opts: &BenchOptions, exe: &Path, dir: &Path) -> Result<Report, BenchError> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let metrics = opts.metrics != BenchMetrics::Off;
    let single = measure_quicpush(opts, dir, metrics, "one node").await?;
    let t = tier::Tier::start(opts, exe, dir, opts.nodes, metrics)?;
    let secret = crate::auth::load_secret(&dir.join(crate::certs::TOKEN_SECRET))
        .map_err(|e| BenchError::Spawn(e.to_string()))?;
    let backend = Client::connect(
        t.nodes[0].control,
        "localhost",
        &BackendIdentity::from_dir(dir),
    )
    .await
    .map_err(|e| BenchError::Rpc(e.to_string()))?;
    let backend = Arc::new(backend);
    let room = (opts.scenario == Scenario::Room).then(|| ROOM.to_owned());
    let login = Login::Token {
        secret: Arc::new(secret),
        room,
    };
    // Keys: every client on a node other than the backend's, so each push is
    // forwarded.
    let clients_from = usize::from(opts.scenario == Scenario::Keys);
    let label = format!("{} nodes", opts.nodes);
    let m = measure(
        opts,
        &t.nodes,
        clients_from,
        Some(&t.redis),
        dir,
        login,
        Pusher::Quicpush(backend.clone(), 0),
        Some(&backend),
        &label,
    )
    .await?;
    if let Ok(b) = Arc::try_unwrap(backend) {
        b.close().await;
    }
    t.stop();
    // Every message is one push: a BroadcastRoom call, or one key of a call.
    let pushes = opts.messages;
    let calls = m.redis_calls.clone().unwrap_or_default();
    let per_push: std::collections::BTreeMap<String, f64> = calls
        .iter()
        .map(|(k, v)| (k.clone(), v / pushes.max(1) as f64))
        .collect();
    let tier = tier::TierReport {
        nodes: opts.nodes,
        ratio_to_single: (single.deliveries_per_sec > 0.0)
            .then(|| m.deliveries_per_sec / single.deliveries_per_sec),
        p99_delta_us: match (m.latency_us, single.latency_us) {
            (Some(a), Some(b)) => Some(a.p99 as i64 - b.p99 as i64),
            _ => None,
        },
        redis_calls_per_push_total: per_push.values().sum(),
        redis_calls_per_push: per_push,
        pushes,
        single_node: single,
    };
    let mut report = Report::of(opts, m);
    report.tier = Some(tier);
    Ok(report)
}

/// Runs the scenario against a quicpush server (started with metrics on or off,
/// unless the target is an external one).
async fn measure_quicpush(
    opts: &BenchOptions,
    dir: &Path,
    metrics: bool,
    name: &str,
) -> Result<Measurement, BenchError> {
    Ok(measure_quicpush_at(opts, dir, metrics, name).await?.0)
}

/// As [`measure_quicpush`], also returning the certificate directory used.
async fn measure_quicpush_at(
    opts: &BenchOptions,
    dir: &Path,
    metrics: bool,
    name: &str,
) -> Result<(Measurement, PathBuf), BenchError> {
    let (server, certs) = match &opts.target {
        Target::Spawn { exe } => {
            let mut config = process::bench_config(dir);
            config.client.tcp_send_buffer = opts.tcp_send_buffer;
            config.client.write_coalesce = opts.write_coalesce;
            config.metrics.enabled = metrics;
            opts.history.apply(&mut config.history);
            (
                ServerProcess::quicpush_with(exe, dir, &config)?,
                dir.to_owned(),
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
    let backend = Arc::new(backend);
    let room = matches!(opts.scenario, Scenario::Room | Scenario::Latency).then(|| ROOM.to_owned());
    let login = Login::Token {
        secret: Arc::new(secret),
        room,
    };
    let quicpush = measure(
        opts,
        std::slice::from_ref(&server),
        0,
        None,
        &certs,
        login,
        Pusher::Quicpush(backend.clone(), opts.stalled as u64),
        Some(&backend),
        name,
    )
    .await?;
    if let Ok(b) = Arc::try_unwrap(backend) {
        b.close().await;
    }
    server.stop();
    Ok((quicpush, certs))
}

/// Runs the scenario against one server, or the nodes of a tier (clients spread
/// over them in turn; CPU and memory summed over them all).
/// Clients connect to `servers[clients_from..]`; with `redis`, the Redis commands
/// run while pushing (less the rate seen over 2 s of rest just before) are counted.
#[allow(clippy::too_many_arguments)]
async fn measure(
    opts: &BenchOptions,
    servers: &[ServerProcess],
    clients_from: usize,
    redis: Option<&tier::BenchRedis>,
    certs: &Path,
    login: Login,
    pusher: Pusher,
    backend: Option<&Arc<Client>>,
    label: &str,
) -> Result<Measurement, BenchError> {
    let stat = ProcStats::new(servers.iter().map(|s| s.pid));
    let servers = servers.get(clients_from..).unwrap_or_default();
    let server = servers
        .first()
        .ok_or_else(|| BenchError::Options(format!("{label}: no server for the clients")))?;
    let n = opts.clients;
    let client_addr = |s: &ServerProcess| match opts.transport {
        BenchTransport::Tcp => Ok(s.client_tcp),
        BenchTransport::Ws => s.client_ws.ok_or_else(|| {
            BenchError::Options(format!("{label}: no WebSocket listener (client.ws_bind)"))
        }),
        BenchTransport::Quic => Ok(s.client_quic),
    };
    let first = client_addr(server)?;
    let others = servers
        .iter()
        .skip(1)
        .map(client_addr)
        .collect::<Result<Vec<_>, _>>()?;
    let dial = match opts.transport {
        BenchTransport::Tcp => Dial::tcp(first, login),
        BenchTransport::Ws => Dial::ws(first, login),
        BenchTransport::Quic => Dial::quic(first, login, &certs.join(crate::certs::CA_CERT), 16)?,
    }
    .spread_over(others);
    let mut m = Measurement::default();

    if opts.scenario == Scenario::Connect {
        let pb = progress_bar(opts.progress, n as u64, &format!("{label} connect"));
        let cpu0 = stat.cpu_us()?;
        let t0 = Instant::now();
        let clients = fleet::connect_all(&dial, n, opts.connect_concurrency, &pb).await?;
        let secs = t0.elapsed().as_secs_f64();
        let cpu = stat.cpu_us()?.saturating_sub(cpu0);
        pb.finish_and_clear();
        m.seconds = secs;
        m.connects_per_sec = Some(n as f64 / secs);
        m.server_cpu_us_per_connect = Some(cpu as f64 / n as f64);
        m.server_cpu_us = cpu;
        m.server_cpu_percent = cpu as f64 / 1e4 / secs;
        close_all(clients).await;
        return Ok(m);
    }

    if opts.scenario == Scenario::Idle {
        let rss0 = stat.rss_bytes()?;
        let pb = progress_bar(opts.progress, n as u64, &format!("{label} idle"));
        let clients = fleet::connect_all(&dial, n, opts.connect_concurrency, &pb).await?;
        pb.finish_and_clear();
        if let Some(b) = backend {
            wait_online(b, n as u64).await?;
        }
        // let allocations settle (buffers sized on first use) before reading RSS
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss1 = stat.rss_bytes()?;
        m.server_rss_per_conn_bytes = Some(rss1.saturating_sub(rss0) as f64 / n as f64);
        close_all(clients).await;
        return Ok(m);
    }

    let pb = progress_bar(opts.progress, n as u64, &format!("{label} connect"));
    let clients = fleet::connect_all(&dial, n, opts.connect_concurrency, &pb).await?;
    pb.finish_and_clear();
    // The floor has no slow-consumer handling to measure: stalled clients are
    // quicpush's alone.
    let mut stalled = Vec::new();
    if backend.is_some() {
        for i in n..n + opts.stalled {
            stalled.push(dial.connect_stalled(i).await?);
        }
    }
    if let Some(b) = backend {
        wait_online(b, (n + stalled.len()) as u64).await?;
    }
    let epoch = Instant::now();
    let latencies = fleet::new_latencies()?;
    let readers = Readers::start(clients, epoch, Some(latencies.clone()));

    // What each client should receive, and the total.
    let (per_client, total): (Vec<u64>, u64) = match opts.scenario {
        Scenario::Keys => {
            let per: Vec<u64> = (0..n as u64)
                .map(|i| opts.messages / n as u64 + u64::from(i < opts.messages % n as u64))
                .collect();
            (per, opts.messages)
        }
        Scenario::Latency => {
            let msgs = latency_messages(opts, n);
            (vec![msgs; n], msgs * n as u64)
        }
        _ => (vec![opts.messages; n], opts.messages * n as u64),
    };
    let pb = progress_bar(opts.progress, total, label);
    let received = readers.received.clone();
    let ticker = {
        let pb = pb.clone();
        let received = received.clone();
        tokio::spawn(async move {
            loop {
                pb.set_position(received.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Redis at rest (the tier's refreshes), then during the pushes.
    let rest = match redis {
        Some(r) => {
            let a = r.command_calls();
            tokio::time::sleep(Duration::from_secs(2)).await;
            Some((a, r.command_calls()))
        }
        None => None,
    };
    let cpu0 = stat.cpu_us()?;
    let t0 = Instant::now();
    let dropped = match opts.scenario {
        Scenario::Keys => send_keys(opts, &pusher, &received, epoch).await?,
        Scenario::Latency => {
            let msgs = latency_messages(opts, n);
            let pace = Duration::from_secs_f64(n as f64 / opts.rate.max(1) as f64);
            send_fanout(opts, &pusher, &received, epoch, msgs, Some(pace), false).await?
        }
        Scenario::Broadcast => {
            send_fanout(opts, &pusher, &received, epoch, opts.messages, None, true).await?
        }
        _ => send_fanout(opts, &pusher, &received, epoch, opts.messages, None, false).await?,
    };
    let done_at = wait_done(&received, total.saturating_sub(dropped), t0).await;
    let cpu = stat.cpu_us()?.saturating_sub(cpu0);
    if let (Some(r), Some((a, b))) = (redis, rest) {
        let c = r.command_calls();
        let secs = done_at.duration_since(t0).as_secs_f64();
        m.redis_calls = Some(tier::net_calls(&a, &b, 2.0, &b, &c, secs));
    }
    ticker.abort();
    pb.finish_and_clear();
    let secs = done_at.duration_since(t0).as_secs_f64().max(1e-9);
    let stats = readers.finish().await;

    m.count_clients(&stats, &per_client, dropped);
    m.expected = total;
    m.seconds = secs;
    m.deliveries_per_sec = m.deliveries as f64 / secs;
    m.server_cpu_us = cpu;
    m.server_cpu_percent = cpu as f64 / 1e4 / secs;
    m.server_cpu_us_per_delivery = (m.deliveries > 0).then(|| cpu as f64 / m.deliveries as f64);
    if let (Some(b), false) = (backend, stalled.is_empty()) {
        let mut gone = 0;
        for i in n..n + stalled.len() {
            let o = b
                .push_msg(format!("bench-{i}"), BENCH_OP, Bytes::new())
                .await
                .map_err(|e| BenchError::Rpc(e.to_string()))?;
            // gone: offline, or offline with its key's history kept
            gone += usize::from(matches!(o, PushOutcome::Offline | PushOutcome::Stored));
        }
        m.stalled_disconnected = Some(gone);
    }
    drop(stalled);
    let hist = latencies.lock();
    m.latency_us = (!hist.is_empty()).then(|| percentiles(&hist));
    Ok(m)
}

impl Measurement {
    /// Adds what the clients saw: `per_client` is what each should have received,
    /// `dropped` what the server reported it refused (queue full).
    fn count_clients(&mut self, stats: &[fleet::ClientStats], per_client: &[u64], dropped: u64) {
        let mut gaps = 0u64;
        for (s, &want) in stats.iter().zip(per_client) {
            // Unique deliveries: a duplicate is counted in `duplicated`, not here.
            self.deliveries += s.unique;
            self.duplicated += s.duplicated;
            self.misrouted += s.misrouted;
            self.reordered += s.reordered;
            self.bad_seq += s.bad_seq;
            gaps += want.saturating_sub(s.unique);
        }
        // Gaps the server reported as dropped (queue full) are not losses.
        self.lost = gaps.saturating_sub(dropped);
        self.dropped_queue_full = dropped;
    }
}

fn latency_messages(opts: &BenchOptions, n: usize) -> u64 {
    let per_sec = opts.rate as f64 / n as f64;
    (per_sec * opts.duration.as_secs_f64()).ceil().max(1.0) as u64
}

async fn close_all(clients: Vec<crate::client::PushClient>) {
    let mut closing: FuturesUnordered<_> = clients.into_iter().map(|c| c.close()).collect();
    while closing.next().await.is_some() {}
}

async fn wait_online(backend: &Client, n: u64) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let online = backend
            .online()
            .await
            .map_err(|e| BenchError::Rpc(e.to_string()))?;
        if online.total >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Rpc(format!(
                "only {} of {n} clients online",
                online.total
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `want` deliveries arrived, or nothing arrived for [`QUIET`].
/// Returns when the last delivery was seen.
async fn wait_done(received: &std::sync::atomic::AtomicU64, want: u64, t0: Instant) -> Instant {
    let mut last = received.load(Ordering::Relaxed);
    let mut last_at = if last > 0 { Instant::now() } else { t0 };
    loop {
        let now = received.load(Ordering::Relaxed);
        if now >= want {
            return Instant::now();
        }
        if now != last {
            last = now;
            last_at = Instant::now();
        } else if last_at.elapsed() > QUIET {
            return last_at;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The schedule of a paced sender: message `i` is due at `start + i × period`.
/// A sender that falls behind gets the missed due times at once (and stamps each
/// message with its due time), so being late shows as latency.
struct Pacer(tokio::time::Interval);

impl Pacer {
    fn new(period: Duration) -> Self {
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Pacer(t)
    }

    /// Waits for the next message's due time, and returns it.
    async fn due(&mut self) -> Instant {
        self.0.tick().await.into_std()
    }
}

/// Most messages the sender may be ahead of the clients' average progress.
const WINDOW: u64 = 32;

/// Sends `count` messages to the room (or to everyone), at most `in_flight` calls
/// at once and at most [`WINDOW`] messages ahead of the clients; paced if `pace`.
async fn send_fanout(
    opts: &BenchOptions,
    pusher: &Pusher,
    received: &std::sync::atomic::AtomicU64,
    epoch: Instant,
    count: u64,
    pace: Option<Duration>,
    broadcast: bool,
) -> Result<u64, BenchError> {
    let n = opts.clients as u64;
    let mut dropped = 0u64;
    let mut inflight = FuturesUnordered::new();
    let mut ticker = pace.map(Pacer::new);
    for i in 0..count {
        // A paced message is stamped with the time it was due, not the time a call
        // slot freed up: a late send counts its lateness as latency (no coordinated
        // omission). Late ticks then fire at once, each stamped with its due time.
        let mut due = None;
        if let Some(t) = &mut ticker {
            // keep completing calls while waiting for the next tick
            loop {
                tokio::select! {
                    at = t.due() => {
                        due = Some(at);
                        break;
                    }
                    Some(r) = inflight.next(), if !inflight.is_empty() => dropped += r?,
                }
            }
        }
        // Paced sends only wait for a free call slot, not for the clients.
        let window = if ticker.is_some() {
            u64::MAX
        } else {
            WINDOW * n
        };
        dropped += make_room(&mut inflight, received, i * n, window, opts.in_flight).await?;
        let sent_at = due.map_or_else(|| epoch.elapsed(), |d| d.duration_since(epoch));
        let body = fleet::body(i, sent_at.as_nanos() as u64, ANY_KEY, opts.body_size);
        if broadcast {
            inflight.push(futures_util::future::Either::Left(pusher.broadcast(body)));
        } else {
            inflight.push(futures_util::future::Either::Right(pusher.room(body)));
        }
    }
    Ok(dropped + finish_calls(&mut inflight).await?)
}

/// Waits until the clients have read all but `window` of the `sent` deliveries and
/// fewer than `in_flight` calls are pending, collecting finished calls meanwhile.
/// Returns the deliveries those calls reported dropped.
async fn make_room<F>(
    inflight: &mut FuturesUnordered<F>,
    received: &std::sync::atomic::AtomicU64,
    sent: u64,
    window: u64,
    in_flight: usize,
) -> Result<u64, BenchError>
where
    F: std::future::Future<Output = Result<u64, BenchError>>,
{
    let mut dropped = 0;
    while received.load(Ordering::Relaxed).saturating_add(window) < sent {
        if let Some(r) = futures_util::FutureExt::now_or_never(inflight.next()).flatten() {
            dropped += r?;
            continue;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    while inflight.len() >= in_flight.max(1) {
        if let Some(r) = inflight.next().await {
            dropped += r?;
        }
    }
    Ok(dropped)
}

/// Waits for every pending call; returns the deliveries they reported dropped.
async fn finish_calls<F>(inflight: &mut FuturesUnordered<F>) -> Result<u64, BenchError>
where
    F: std::future::Future<Output = Result<u64, BenchError>>,
{
    let mut dropped = 0;
    while let Some(r) = inflight.next().await {
        dropped += r?;
    }
    Ok(dropped)
}

/// Sends `messages` messages round-robin over the clients' keys, `batch` per call.
async fn send_keys(
    opts: &BenchOptions,
    pusher: &Pusher,
    received: &std::sync::atomic::AtomicU64,
    epoch: Instant,
) -> Result<u64, BenchError> {
    let n = opts.clients as u64;
    let mut next_index = vec![0u64; opts.clients];
    let mut dropped = 0u64;
    let mut inflight = FuturesUnordered::new();
    let mut sent = 0u64;
    // Paced: one call of `batch` messages per period, stamped with its due time
    // (no coordinated omission), waiting only for a free call slot.
    let mut ticker = opts
        .keys_rate
        .map(|r| Pacer::new(Duration::from_secs_f64(opts.batch as f64 / r.max(1) as f64)));
    let window = if ticker.is_some() {
        u64::MAX
    } else {
        n * WINDOW
    };
    while sent < opts.messages {
        let mut due = None;
        if let Some(t) = &mut ticker {
            loop {
                tokio::select! {
                    at = t.due() => {
                        due = Some(at);
                        break;
                    }
                    Some(r) = inflight.next(), if !inflight.is_empty() => dropped += r?,
                }
            }
        }
        dropped += make_room(&mut inflight, received, sent, window, opts.in_flight).await?;
        let end = (sent + opts.batch as u64).min(opts.messages);
        let now = due
            .map_or_else(|| epoch.elapsed(), |d| d.duration_since(epoch))
            .as_nanos() as u64;
        let items: Vec<(u32, Bytes)> = (sent..end)
            .map(|j| {
                let key = (j % n) as usize;
                let index = next_index[key];
                next_index[key] += 1;
                (
                    key as u32,
                    fleet::body(index, now, key as u32, opts.body_size),
                )
            })
            .collect();
        inflight.push(pusher.keys(items));
        sent = end;
    }
    Ok(dropped + finish_calls(&mut inflight).await?)
}

fn opt(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}{unit}"),
        Some(v) => format!("{v:.2}{unit}"),
        None => "-".into(),
    }
}

impl Report {
    /// A report of one measurement `m` of `opts`'s scenario, with nothing
    /// compared beside it (the scenario's own part is for the caller to add).
    pub fn of(opts: &BenchOptions, m: Measurement) -> Report {
        Report {
            scenario: opts.scenario,
            transport: opts.transport,
            clients: opts.clients,
            messages: opts.messages,
            batch: opts.batch,
            body_size: opts.body_size,
            stalled: opts.stalled,
            deliveries: m.deliveries,
            deliveries_per_sec: m.deliveries_per_sec,
            lost: m.lost,
            duplicated: m.duplicated,
            misrouted: m.misrouted,
            dropped_queue_full: m.dropped_queue_full,
            latency_us: m.latency_us,
            server_cpu_us_per_delivery: m.server_cpu_us_per_delivery,
            server_cpu_percent: m.server_cpu_percent,
            server_rss_per_conn_bytes: m.server_rss_per_conn_bytes,
            connects_per_sec: m.connects_per_sec,
            server_cpu_us_per_connect: m.server_cpu_us_per_connect,
            rustls_handshake_server_us: None,
            connect_cpu_to_rustls: None,
            raw_deliveries_per_sec: None,
            raw_connects_per_sec: None,
            raw_rss_per_conn_bytes: None,
            ratio_to_raw: None,
            metrics_off: None,
            metrics_rates: None,
            metrics_on_to_off: None,
            quicpush: m,
            raw: None,
            handover: None,
            tier: None,
            node_loss: None,
        }
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        if let Some(h) = &self.handover {
            return h.table(self);
        }
        if let Some(n) = &self.node_loss {
            return n.table();
        }
        type Cell = fn(&Measurement) -> String;
        let rows: [(&str, Cell); 16] = [
            ("deliveries", |m| m.deliveries.to_string()),
            ("seconds", |m| format!("{:.3}", m.seconds)),
            ("deliveries/s", |m| format!("{:.0}", m.deliveries_per_sec)),
            ("lost", |m| m.lost.to_string()),
            ("duplicated", |m| m.duplicated.to_string()),
            ("misrouted", |m| m.misrouted.to_string()),
            ("reordered", |m| m.reordered.to_string()),
            ("bad push seq", |m| m.bad_seq.to_string()),
            ("dropped (queue full)", |m| m.dropped_queue_full.to_string()),
            ("latency p50/p99/p999 µs", |m| {
                m.latency_us.map_or_else(
                    || "-".into(),
                    |l| format!("{} / {} / {}", l.p50, l.p99, l.p999),
                )
            }),
            ("server CPU µs/delivery", |m| {
                opt(m.server_cpu_us_per_delivery, "")
            }),
            ("server CPU %", |m| format!("{:.0}", m.server_cpu_percent)),
            ("server RSS/conn bytes", |m| {
                opt(m.server_rss_per_conn_bytes, "")
            }),
            ("connects/s", |m| opt(m.connects_per_sec, "")),
            ("server CPU µs/connect", |m| {
                opt(m.server_cpu_us_per_connect, "")
            }),
            ("stalled disconnected", |m| {
                m.stalled_disconnected
                    .map_or_else(|| "-".into(), |n| n.to_string())
            }),
        ];
        let rows = rows.iter().map(|(name, cell)| {
            let raw = self.raw.as_ref().map_or_else(|| "-".into(), cell);
            (name, cell(&self.quicpush), raw)
        });
        let mut s = format!(
            "scenario={:?} transport={:?} clients={} stalled={} messages={} batch={} body={}B\n",
            self.scenario,
            self.transport,
            self.clients,
            self.stalled,
            self.messages,
            self.batch,
            self.body_size
        );
        s.push_str(&format!(
            "{:<26} {:>20} {:>20}\n",
            "", "quicpush", "raw floor"
        ));
        for (k, q, r) in rows {
            s.push_str(&format!("{k:<26} {q:>20} {r:>20}\n"));
        }
        if let Some(ratio) = self.ratio_to_raw {
            s.push_str(&format!("{:<26} {:>20.2}\n", "ratio to raw", ratio));
        }
        if let (Some(us), Some(r)) = (self.rustls_handshake_server_us, self.connect_cpu_to_rustls) {
            s.push_str(&format!(
                "{:<26} {:>20.1}\n{:<26} {:>20.2}\n",
                "rustls handshake µs", us, "connect CPU / rustls", r
            ));
        }
        if let Some(t) = &self.tier {
            s.push_str(&t.table());
        }
        if let Some(m) = &self.metrics_rates {
            s.push_str(&format!(
                "{:<26} {:>20}\n{:<26} {:>20}\n",
                "deliveries/s metrics off",
                format!("{:.0}, {:.0}", m.off[0], m.off[1]),
                "deliveries/s metrics on",
                format!("{:.0}, {:.0}", m.on[0], m.on[1]),
            ));
            if let Some(r) = self.metrics_on_to_off {
                s.push_str(&format!("{:<26} {:>20.3}\n", "ratio metrics on/off", r));
            }
            let us = |v: [Option<f64>; 2]| {
                v.map(|x| x.map_or("-".to_owned(), |x| format!("{x:.3}")))
                    .join(", ")
            };
            s.push_str(&format!(
                "{:<26} {:>20}\n{:<26} {:>20}\n",
                "CPU µs/delivery off",
                us(m.off_cpu_us),
                "CPU µs/delivery on",
                us(m.on_cpu_us),
            ));
            if let Some(r) = m.cpu_ratio() {
                s.push_str(&format!("{:<26} {:>20.3}\n", "CPU ratio off/on", r));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn deliveries_count_each_message_once() {
        let epoch = Instant::now();
        let mut c = fleet::ClientStats::new(None);
        for i in [0u64, 1, 1, 2, 2, 2] {
            c.check(7, 0, &fleet::body(i, 0, 7, 0), epoch);
        }
        let mut m = Measurement::default();
        m.count_clients(&[c], &[4], 0);
        assert_eq!((m.deliveries, m.duplicated, m.lost), (3, 3, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_paced_message_is_stamped_when_it_was_due() {
        let epoch = Instant::now();
        let mut pace = Pacer::new(Duration::from_millis(10));
        let first = pace.due().await;
        // The sender is held up (waiting for a call slot) for 55 ms.
        tokio::time::sleep(Duration::from_millis(55)).await;
        let mut stamps = Vec::new();
        for _ in 0..6 {
            stamps.push(pace.due().await.duration_since(first).as_millis());
        }
        assert_eq!(stamps, [10, 20, 30, 40, 50, 60]);
        assert!(first.duration_since(epoch) < Duration::from_millis(1));
    }
}

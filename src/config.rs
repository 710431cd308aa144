//! The server's configuration: built-in defaults, overridden by a TOML file.
//!
//! Every field has a default ([`Config::default`]), so the server runs without a file;
//! `config/quicpush.toml` documents each one. [`Config::load`] parses a file and
//! [`Config::validate`]s it: unknown keys are rejected naming the key, invalid values
//! naming the field and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{self, DEFAULT_MAX_BODY, MAX_BODY_LIMIT};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (syntax, unknown key, wrong type).
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is out of its allowed range.
    #[error("invalid config value `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub client: ClientConfig,
    pub quic: QuicConfig,
    pub rpc: RpcConfig,
    pub registry: RegistryConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub shutdown: ShutdownConfig,
    pub history: HistoryConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    /// Several nodes as one push tier over Redis; off unless `cluster.redis` is set.
    pub cluster: ClusterConfig,
    /// The async runtime `quicpush serve` runs on.
    pub runtime: RuntimeConfig,
}

/// The async runtime's size.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads; 0 = one per core. Several nodes on one machine do best
    /// with about cores ÷ nodes each.
    pub worker_threads: usize,
}

impl RuntimeConfig {
    /// The worker threads to start: `worker_threads`, or one per core.
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }
}

/// Client-facing listeners and per-connection behaviour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// TCP addresses for goim v2 clients.
    pub tcp_bind: Vec<SocketAddr>,
    /// UDP addresses for QUIC clients (ALPN `quicpush/1`).
    pub quic_bind: Vec<SocketAddr>,
    /// TCP addresses for goim v2 clients inside TLS (the server certificate from
    /// `tls.dir`, no client certificate). Empty: none.
    pub tls_bind: Vec<SocketAddr>,
    /// TCP addresses for WebSocket clients (goim's port 3102): HTTP path `/sub`,
    /// one goim frame (or one Raw frame of several) per binary message.
    pub ws_bind: Vec<SocketAddr>,
    /// TCP addresses for WebSocket clients over TLS (goim uses 3103), with the
    /// server certificate from `tls.dir`. Empty: none.
    pub wss_bind: Vec<SocketAddr>,
    /// Origins (`scheme://host[:port]`) a WebSocket upgrade may come from; an
    /// upgrade with another `Origin` header gets 403, one without (a non-browser
    /// client) is let in. Empty: any origin.
    pub ws_allowed_origins: Vec<String>,
    /// Largest frame body accepted from or sent to a client.
    pub max_body: usize,
    /// Time allowed between accept and the Auth frame.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A client that sends no frame for this long is disconnected.
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Duration,
    /// A client that accepts no bytes for this long is disconnected.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Frames queued per client before pushes to it report `queue full`.
    pub queue_size: usize,
    /// Bytes per client, a hard bound: frames queued (pushes and replies) plus
    /// those its writer has taken and not finished writing. A push that does not
    /// fit reports `queue full`; a reply that does not fit waits, and the client's
    /// reader stops reading until it does. Only what the server must queue at
    /// once goes beyond it: AuthReply and a resume replay at Auth (at most
    /// `history.size` pushes per source), and one resume-capable ChangeRoomReply.
    /// The default, 256 KiB, is a quarter of what `queue_size` full-size frames
    /// take (256 × 4112 bytes ≈ 1 MiB at the defaults): 64 full-size frames or
    /// 256 of 1 KiB, about a second of a busy room for a client that is behind,
    /// and 2.5 GiB for 10,000 stalled clients instead of 10.
    pub queue_bytes: usize,
    /// Kernel send buffer of each client TCP socket, bytes; 0 keeps the
    /// kernel's default and autotuning. Small values bound a stalled client's
    /// memory in the kernel and make its queue fill sooner.
    pub tcp_send_buffer: u32,
    /// A client whose queue refuses a push and does not get back to half full (a
    /// write finishing with at most half the queue queued) for this long is
    /// disconnected (a slow consumer).
    #[serde(with = "humantime_serde")]
    pub slow_consumer_timeout: Duration,
    /// Most client connections open at once, over all transports.
    pub max_connections: usize,
    /// Most client connections from one source IP address.
    pub max_connections_per_ip: usize,
    /// Frames a client may send per second (a burst of twice as many is allowed);
    /// beyond, the connection is closed.
    pub max_frames_per_sec: u32,
    /// How long a client's writer waits, once something is queued, for more to
    /// write in the same call (0 = write at once). A fan-out then costs fewer
    /// writes per delivery; every push waits up to this long.
    #[serde(with = "humantime_serde")]
    pub write_coalesce: Duration,
}

/// Longest `client.write_coalesce` allowed.
pub const MAX_WRITE_COALESCE: Duration = Duration::from_millis(100);

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            tcp_bind: vec![SocketAddr::from(([0, 0, 0, 0], 3101))],
            quic_bind: vec![SocketAddr::from(([0, 0, 0, 0], 3101))],
            tls_bind: Vec::new(),
            ws_bind: vec![SocketAddr::from(([0, 0, 0, 0], 3102))],
            wss_bind: Vec::new(),
            ws_allowed_origins: Vec::new(),
            max_body: DEFAULT_MAX_BODY,
            handshake_timeout: Duration::from_secs(8),
            heartbeat_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
            queue_size: 256,
            queue_bytes: 256 * 1024,
            tcp_send_buffer: 0,
            slow_consumer_timeout: Duration::from_secs(5),
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            max_frames_per_sec: 100,
            write_coalesce: Duration::ZERO,
        }
    }
}

/// Most unvalidated QUIC handshakes `quic.retry_threshold` may allow.
pub const MAX_RETRY_THRESHOLD: usize = 100_000;

/// Most bytes `client.queue_bytes` may allow one client.
pub const MAX_QUEUE_BYTES: usize = 1 << 30;

/// Most sessions `quic.session_cache` may remember.
pub const MAX_SESSION_CACHE: usize = 10_000_000;

/// QUIC transport settings, sized for many mostly idle clients.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QuicConfig {
    /// A QUIC connection with no packets for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Interval of server-sent keep-alive packets; 0 disables them.
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// Per-stream receive window, bytes.
    pub stream_receive_window: u32,
    /// Per-connection receive window, bytes.
    pub receive_window: u32,
    /// Per-connection send window, bytes.
    pub send_window: u64,
    /// Returning clients resume their TLS session and send Auth as 0-RTT data:
    /// each connection gets one single-use session ticket. `false`: no tickets,
    /// every connection does a full handshake.
    pub zero_rtt: bool,
    /// Sessions remembered for returning clients (one per connection that got a
    /// ticket; the oldest is forgotten first, and its client does a full
    /// handshake). About 300 bytes each.
    pub session_cache: usize,
    /// Handshakes from addresses not yet validated that may be in progress at
    /// once (they hold no connection permit); beyond, each new one is answered
    /// with a Retry, which costs its client one round trip and a forger its
    /// handshake. 0: every address is validated with a Retry. At most 100,000.
    /// Unvalidated handshakes hold no connection permit, so this is a bound of
    /// its own on the server's work for addresses that may be forged.
    pub retry_threshold: usize,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            // Phones sit behind NATs and carrier firewalls that forget a UDP
            // mapping after as little as 30 s of silence: a keep-alive every 15 s
            // keeps it with room for one lost packet, and a dead path is noticed
            // within a minute (4 keep-alives), after which the client resumes.
            idle_timeout: Duration::from_secs(60),
            keep_alive_interval: Duration::from_secs(15),
            stream_receive_window: 64 * 1024,
            receive_window: 128 * 1024,
            send_window: 1024 * 1024,
            zero_rtt: true,
            session_cache: 100_000,
            // A burst of this many new clients costs no extra round trip; a flood
            // of forged Initials holds at most this many handshakes (for
            // client.handshake_timeout each) and gets Retries beyond.
            retry_threshold: 64,
        }
    }
}

/// The backend RPC listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RpcConfig {
    /// UDP addresses for backends (ALPN `quicpush-rpc/4`, mutual TLS); one accept task each.
    pub bind: Vec<SocketAddr>,
    /// Largest request accepted; a larger one gets an error reply.
    pub max_request_bytes: usize,
    /// Most keys, user ids or messages in one call.
    pub max_keys: usize,
    /// Streams a backend connection may have open at once.
    pub max_streams: u32,
    /// A backend connection with no packets for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Longest a paced broadcast may run: one whose speed would take longer over
    /// the channels online is refused, and one still running this long is stopped.
    #[serde(with = "humantime_serde")]
    pub paced_max_duration: Duration,
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            bind: vec![SocketAddr::from(([0, 0, 0, 0], 3109))],
            max_request_bytes: 4 << 20,
            max_keys: 100_000,
            max_streams: 64,
            idle_timeout: Duration::from_secs(60),
            paced_max_duration: Duration::from_secs(600),
        }
    }
}

/// The sharded registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Number of buckets; a power of two.
    pub buckets: usize,
    /// Most rooms with members at once; joining one more is refused.
    pub max_rooms: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            buckets: 32,
            max_rooms: 100_000,
        }
    }
}

/// Push history per source, for clients that resume after losing their connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// `false`: no history, no resume; pushes to offline keys report `Offline`.
    pub enabled: bool,
    /// Pushes kept per stream (one stream per key, user id, room, and broadcasts).
    pub size: usize,
    /// Bytes kept over all streams, a hard cap: the oldest pushes go first.
    pub bytes: usize,
    /// A stream no one pushed to or resumed from for this long is dropped.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Keep pushes to keys (PushMsg, MPushMsg, MPushMsgs).
    pub key: bool,
    /// Keep pushes to user ids (PushUser).
    pub user: bool,
    /// Keep room pushes (BroadcastRoom): one entry per push in the room's stream.
    pub room: bool,
    /// Keep broadcasts (Broadcast without a speed; paced broadcasts are never kept).
    pub all: bool,
    /// Where key, user, room and broadcast streams live: `memory` (this node's process) or
    /// `redis` (the tier's Redis, shared by every node, so a client resumes on
    /// any node; needs `cluster.redis`), and with `all` the broadcast stream too.
    pub store: HistoryStoreKind,
}

/// Where key history is kept.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistoryStoreKind {
    /// In this node's memory.
    #[default]
    Memory,
    /// In the tier's Redis (`cluster.redis`).
    Redis,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            enabled: true,
            size: 100,
            bytes: 64 << 20,
            ttl: Duration::from_secs(600),
            key: true,
            user: true,
            room: false,
            all: false,
            store: HistoryStoreKind::Memory,
        }
    }
}

/// How the Auth frame's body is checked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// An HS256 JWT signed with the secret in `secret_file`.
    Jwt,
    /// goim's plain JSON token, not verified: for goim compatibility and local tests.
    Open,
}

/// Client authentication.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// The HS256 secret; relative paths are taken from the working directory.
    pub secret_file: PathBuf,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Jwt,
            secret_file: PathBuf::from("certs/token.secret"),
        }
    }
}

/// Certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Directory holding `ca.pem`, `server.pem`, `server.key`.
    pub dir: PathBuf,
    /// Generate a CA, certificates and the token secret when `dir` has none.
    pub generate_if_missing: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            dir: PathBuf::from("certs"),
            generate_if_missing: true,
        }
    }
}

/// goim-logic's HTTP push API and `GET /metrics`, on one listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// TCP addresses of the HTTP listener; empty disables it.
    pub bind: Vec<SocketAddr>,
    /// Every request needs `Authorization: Bearer <token>` with the token in
    /// this file (generated with the certificates when missing).
    pub api_token_file: PathBuf,
    /// `false`: no token needed; only allowed when every `bind` address is loopback.
    pub require_token: bool,
    /// Largest request body (the message) read; a larger one is answered 413.
    /// A body within it but over `client.max_body` gets code -400.
    pub max_body_bytes: usize,
    /// Longest query string (the keys or user ids of a push are in it); a
    /// longer one is answered 414.
    pub max_query_bytes: usize,
    /// Longest a request may take, body read included; then it is answered -500.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Most HTTP connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
}

/// Largest `http.max_query_bytes`: the HTTP parser's own buffer holds the
/// request line and headers in about 400 KiB.
pub const MAX_HTTP_QUERY_BYTES: usize = 256 * 1024;

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: vec![SocketAddr::from(([127, 0, 0, 1], 3111))],
            api_token_file: PathBuf::from("certs/api.token"),
            require_token: true,
            max_body_bytes: 64 * 1024,
            max_query_bytes: 64 * 1024,
            timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// The server's counters (see the README's "Metrics").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `false`: nothing is counted and `GET /metrics` answers 404.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true }
    }
}

/// Several nodes as one push tier, sharing a Redis (see [`crate::cluster`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The shared Redis: one `redis://` or `rediss://` URL, or a list of a Redis
    /// Cluster's nodes (any of its masters; the rest are discovered); unset: a
    /// single node, nothing connects to Redis.
    pub redis: Option<RedisTarget>,
    /// This node's id; unset: random hex drawn at start.
    pub node_id: Option<String>,
    /// How long this node's records and directory entries live unrefreshed: a node
    /// that stops refreshing is dead for every other node within it.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How often the records are refreshed; unset: a third of `ttl`.
    #[serde(with = "humantime_serde")]
    pub refresh: Option<Duration>,
    /// The client address `quicpush nodes` shows; unset: the first bound one.
    pub advertise_client: Option<String>,
    /// The backend RPC address `quicpush nodes` shows; unset: the first bound one.
    pub advertise_rpc: Option<String>,
}

/// Where the tier's Redis is: `cluster.redis = "redis://…"` (one server) or
/// `cluster.redis = ["redis://…", …]` (a Redis Cluster).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RedisTarget {
    /// One Redis server.
    One(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// Every URL given.
    pub fn urls(&self) -> &[String] {
        match self {
            RedisTarget::One(u) => std::slice::from_ref(u),
            RedisTarget::Cluster(v) => v,
        }
    }

    /// Whether this names a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster(_))
    }
}

impl From<String> for RedisTarget {
    fn from(url: String) -> Self {
        RedisTarget::One(url)
    }
}

impl From<Vec<String>> for RedisTarget {
    fn from(urls: Vec<String>) -> Self {
        RedisTarget::Cluster(urls)
    }
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls().join(","))
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            redis: None,
            node_id: None,
            ttl: Duration::from_secs(10),
            refresh: None,
            advertise_client: None,
            advertise_rpc: None,
        }
    }
}

impl ClusterConfig {
    /// The refresh period: `refresh`, or a third of `ttl`.
    pub fn refresh_every(&self) -> Duration {
        self.refresh.unwrap_or(self.ttl / 3)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(target) = &self.redis {
            if target.urls().is_empty() {
                return Err(invalid(
                    "cluster.redis",
                    "an empty list: give one URL, or the Redis Cluster's nodes",
                ));
            }
            for url in target.urls() {
                let unix = url.starts_with("redis+unix://") || url.starts_with("unix://");
                if !(url.starts_with("redis://") || url.starts_with("rediss://") || unix) {
                    return Err(invalid(
                        "cluster.redis",
                        format!("{url:?} is not a redis:// or rediss:// URL"),
                    ));
                }
                if unix && target.is_cluster() {
                    return Err(invalid(
                        "cluster.redis",
                        format!("{url:?}: a Redis Cluster is reached over TCP, not a unix socket"),
                    ));
                }
            }
        }
        if self.ttl < Duration::from_secs(1) {
            return Err(invalid("cluster.ttl", "must be at least 1s"));
        }
        let refresh = self.refresh_every();
        if refresh.is_zero() || refresh >= self.ttl {
            return Err(invalid(
                "cluster.refresh",
                format!(
                    "{refresh:?} must be above 0 and below cluster.ttl ({:?})",
                    self.ttl
                ),
            ));
        }
        if let Some(id) = &self.node_id {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(invalid(
                    "cluster.node_id",
                    "must be 1 to 64 letters, digits, '-' or '_'",
                ));
            }
        }
        Ok(())
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Longest wait for clients to drain and QUIC endpoints to go idle.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(10),
        }
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Checks that `s` looks like a browser's `Origin` header: `http://` or
/// `https://`, a host, an optional port, nothing after.
fn check_origin(s: &str) -> Result<(), &'static str> {
    let (scheme, rest) = s.split_once("://").ok_or("no \"://\"")?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err("the scheme is not http or https");
    }
    if rest
        .chars()
        .any(|ch| matches!(ch, '/' | '?' | '#' | '@' | '*') || ch.is_whitespace())
    {
        return Err("only a host and a port may follow the scheme (no path, no trailing /)");
    }
    let port = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("an IPv6 host without its ]")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("not an IPv6 address inside [ ]");
        }
        match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("junk after the IPv6 host")?),
        }
    } else {
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        };
        if host.is_empty() || host.contains([':', '[', ']']) {
            return Err("no valid host");
        }
        port
    };
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {}
            _ => return Err("the port is not a number in 1..=65535"),
        }
    }
    Ok(())
}

impl Config {
    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.message().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The defaults, with every listener on loopback port 0 (the kernel picks) and
    /// certificates and the token secret in `dir`: for tests and benchmarks.
    pub fn loopback(dir: &Path) -> Config {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut c = Config::default();
        c.client.tcp_bind = vec![any];
        c.client.quic_bind = vec![any];
        c.client.ws_bind = vec![any];
        c.rpc.bind = vec![any];
        c.tls.dir = dir.to_owned();
        c.auth.secret_file = dir.join("token.secret");
        c.http.bind = vec![any];
        c.http.api_token_file = dir.join("api.token");
        c
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.client;
        if c.tcp_bind.is_empty()
            && c.quic_bind.is_empty()
            && c.tls_bind.is_empty()
            && c.ws_bind.is_empty()
            && c.wss_bind.is_empty()
        {
            return Err(invalid(
                "client.tcp_bind",
                "no client listener: set client.tcp_bind, quic_bind, tls_bind, ws_bind or wss_bind",
            ));
        }
        for origin in &c.ws_allowed_origins {
            check_origin(origin).map_err(|reason| {
                invalid(
                    "client.ws_allowed_origins",
                    format!("{origin:?} is not an origin (scheme://host[:port]): {reason}"),
                )
            })?;
        }
        if c.max_body == 0 || c.max_body > MAX_BODY_LIMIT {
            return Err(invalid(
                "client.max_body",
                format!("{} is outside 1..={MAX_BODY_LIMIT}", c.max_body),
            ));
        }
        for (field, d) in [
            ("client.handshake_timeout", c.handshake_timeout),
            ("client.heartbeat_timeout", c.heartbeat_timeout),
            ("client.write_timeout", c.write_timeout),
            ("client.slow_consumer_timeout", c.slow_consumer_timeout),
            ("quic.idle_timeout", self.quic.idle_timeout),
            ("rpc.idle_timeout", self.rpc.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        if c.write_coalesce > MAX_WRITE_COALESCE {
            return Err(invalid(
                "client.write_coalesce",
                format!(
                    "{:?} is above {MAX_WRITE_COALESCE:?}: every push would wait that long",
                    c.write_coalesce
                ),
            ));
        }
        if c.queue_size == 0 || c.queue_size > 1 << 20 {
            return Err(invalid(
                "client.queue_size",
                format!("{} is outside 1..=1048576", c.queue_size),
            ));
        }
        // one frame of the largest body, with the resume extension, must fit
        let one_frame = c.max_body + protocol::EXT_HEADER_LEN;
        if c.queue_bytes < one_frame || c.queue_bytes > MAX_QUEUE_BYTES {
            return Err(invalid(
                "client.queue_bytes",
                format!(
                    "{} is outside {one_frame}..={MAX_QUEUE_BYTES} (at least one frame of \
                     client.max_body plus its {}-byte header must fit)",
                    c.queue_bytes,
                    protocol::EXT_HEADER_LEN
                ),
            ));
        }
        if c.max_connections == 0 {
            return Err(invalid("client.max_connections", "must be at least 1"));
        }
        if c.max_connections_per_ip == 0 {
            return Err(invalid(
                "client.max_connections_per_ip",
                "must be at least 1",
            ));
        }
        if c.max_frames_per_sec == 0 {
            return Err(invalid("client.max_frames_per_sec", "must be at least 1"));
        }
        let q = &self.quic;
        if !q.keep_alive_interval.is_zero() && q.keep_alive_interval >= q.idle_timeout {
            return Err(invalid(
                "quic.keep_alive_interval",
                "must be shorter than quic.idle_timeout (or 0 to disable)",
            ));
        }
        if q.idle_timeout > Duration::from_secs(3600) {
            return Err(invalid("quic.idle_timeout", "must be at most 1h"));
        }
        if self.rpc.idle_timeout > Duration::from_secs(3600) {
            return Err(invalid("rpc.idle_timeout", "must be at most 1h"));
        }
        if q.stream_receive_window < 1024 {
            return Err(invalid(
                "quic.stream_receive_window",
                "must be at least 1024",
            ));
        }
        if q.receive_window < q.stream_receive_window {
            return Err(invalid(
                "quic.receive_window",
                "must be at least quic.stream_receive_window",
            ));
        }
        if q.send_window < 1024 {
            return Err(invalid("quic.send_window", "must be at least 1024"));
        }
        if q.zero_rtt && (q.session_cache == 0 || q.session_cache > MAX_SESSION_CACHE) {
            return Err(invalid(
                "quic.session_cache",
                format!(
                    "{} is outside 1..={MAX_SESSION_CACHE} (or set quic.zero_rtt = false)",
                    q.session_cache
                ),
            ));
        }
        if q.retry_threshold > MAX_RETRY_THRESHOLD {
            return Err(invalid(
                "quic.retry_threshold",
                format!(
                    "{} is over {MAX_RETRY_THRESHOLD} unvalidated handshakes",
                    q.retry_threshold
                ),
            ));
        }
        let r = &self.rpc;
        if r.bind.is_empty() {
            return Err(invalid("rpc.bind", "needs at least one address"));
        }
        if r.max_request_bytes < 1024 || r.max_request_bytes > crate::codec::MAX_PAYLOAD {
            return Err(invalid(
                "rpc.max_request_bytes",
                format!(
                    "{} is outside 1024..={}",
                    r.max_request_bytes,
                    crate::codec::MAX_PAYLOAD
                ),
            ));
        }
        if r.max_keys == 0 {
            return Err(invalid("rpc.max_keys", "must be at least 1"));
        }
        if r.max_streams == 0 {
            return Err(invalid("rpc.max_streams", "must be at least 1"));
        }
        if r.paced_max_duration < Duration::from_secs(1)
            || r.paced_max_duration > Duration::from_secs(24 * 3600)
        {
            return Err(invalid("rpc.paced_max_duration", "must be within 1s..=24h"));
        }
        let b = self.registry.buckets;
        if b == 0 || !b.is_power_of_two() || b > 65536 {
            return Err(invalid(
                "registry.buckets",
                format!("{b} is not a power of two in 1..=65536"),
            ));
        }
        if self.registry.max_rooms == 0 {
            return Err(invalid("registry.max_rooms", "must be at least 1"));
        }
        if self.shutdown.grace.is_zero() {
            return Err(invalid("shutdown.grace", "must be greater than zero"));
        }
        let h = &self.history;
        if h.size == 0 || h.size > 100_000 {
            return Err(invalid(
                "history.size",
                format!("{} is outside 1..=100000", h.size),
            ));
        }
        if h.bytes < 64 * 1024 {
            return Err(invalid("history.bytes", "must be at least 65536"));
        }
        if h.ttl < Duration::from_secs(1) || h.ttl > Duration::from_secs(7 * 86400) {
            return Err(invalid("history.ttl", "must be between 1s and 7 days"));
        }
        if h.store == HistoryStoreKind::Redis {
            if self.cluster.redis.is_none() {
                return Err(invalid(
                    "history.store",
                    "\"redis\" needs cluster.redis (the tier's Redis)",
                ));
            }
            if !h.enabled || !h.key {
                return Err(invalid(
                    "history.store",
                    "\"redis\" keeps key streams: it needs history.enabled and history.key",
                ));
            }
        }
        if self.runtime.worker_threads > 1024 {
            return Err(invalid(
                "runtime.worker_threads",
                format!("{} is over 1024", self.runtime.worker_threads),
            ));
        }
        self.cluster.validate()?;
        self.http.validate()
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.require_token {
            if let Some(a) = self.bind.iter().find(|a| !a.ip().is_loopback()) {
                return Err(invalid(
                    "http.require_token",
                    format!("false is only allowed on loopback, and http.bind has {a}"),
                ));
            }
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > 64 << 20 {
            return Err(invalid(
                "http.max_body_bytes",
                format!("{} is outside 1..={}", self.max_body_bytes, 64 << 20),
            ));
        }
        if self.max_query_bytes < 256 || self.max_query_bytes > MAX_HTTP_QUERY_BYTES {
            return Err(invalid(
                "http.max_query_bytes",
                format!(
                    "{} is outside 256..={MAX_HTTP_QUERY_BYTES}",
                    self.max_query_bytes
                ),
            ));
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err(invalid("http.timeout", "must be within (0s, 1h]"));
        }
        if self.max_connections == 0 {
            return Err(invalid("http.max_connections", "must be at least 1"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(text: &str) -> &'static str {
        match Config::parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid value, got {other:?}"),
        }
    }

    #[test]
    fn cluster_is_off_by_default_and_refresh_is_a_third_of_ttl() {
        let c = Config::parse("[cluster]\nredis = \"redis://127.0.0.1:6379\"\nttl = \"6s\"\n")
            .expect("valid");
        assert_eq!(c.cluster.refresh_every(), Duration::from_secs(2));
        assert_eq!(Config::default().cluster.redis, None);
        assert!(!c.cluster.redis.unwrap().is_cluster());
    }

    #[test]
    fn write_coalesce_is_off_by_default_and_bounded() {
        assert_eq!(Config::default().client.write_coalesce, Duration::ZERO);
        let c = Config::parse("[client]\nwrite_coalesce = \"1ms\"\n").expect("valid");
        assert_eq!(c.client.write_coalesce, Duration::from_millis(1));
        assert_eq!(
            field_of("[client]\nwrite_coalesce = \"101ms\"\n"),
            "client.write_coalesce"
        );
    }

    #[test]
    fn cluster_takes_a_list_of_redis_cluster_nodes() {
        let c = Config::parse(
            "[cluster]\nredis = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]\n",
        )
        .expect("valid");
        let t = c.cluster.redis.unwrap();
        assert!(t.is_cluster());
        assert_eq!(t.urls().len(), 2);
        assert_eq!(t.to_string(), "redis://10.0.0.1:7000,redis://10.0.0.2:7000");
    }

    #[test]
    fn cluster_rejects_an_empty_list_a_bad_member_and_a_unix_socket_cluster() {
        for bad in [
            "redis = []",
            "redis = [\"redis://127.0.0.1:7000\", \"http://127.0.0.1:7001\"]",
            "redis = [\"unix:///run/redis.sock\"]",
        ] {
            assert_eq!(
                field_of(&format!("[cluster]\n{bad}\n")),
                "cluster.redis",
                "{bad}"
            );
        }
    }

    #[test]
    fn cluster_rejects_a_url_that_is_not_redis() {
        assert_eq!(
            field_of("[cluster]\nredis = \"http://127.0.0.1:6379\"\n"),
            "cluster.redis"
        );
    }

    #[test]
    fn cluster_rejects_refresh_not_below_ttl() {
        assert_eq!(
            field_of("[cluster]\nttl = \"5s\"\nrefresh = \"5s\"\n"),
            "cluster.refresh"
        );
    }

    #[test]
    fn cluster_rejects_ttl_zero() {
        assert_eq!(field_of("[cluster]\nttl = \"0s\"\n"), "cluster.ttl");
    }

    #[test]
    fn cluster_rejects_a_bad_node_id() {
        assert_eq!(
            field_of("[cluster]\nnode_id = \"a:b\"\n"),
            "cluster.node_id"
        );
    }

    #[test]
    fn defaults_are_valid_and_match_goim_ports() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.client.tcp_bind[0].port(), 3101);
        assert_eq!(c.client.quic_bind[0].port(), 3101);
        assert_eq!(c.rpc.bind[0].port(), 3109);
        assert_eq!(c.client.max_body, 4096);
        assert_eq!(c.client.handshake_timeout, Duration::from_secs(8));
        assert_eq!(c.auth.mode, AuthMode::Jwt);
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn shipped_config_file_is_the_defaults() {
        let text = include_str!("../config/quicpush.toml");
        assert_eq!(Config::parse(text).unwrap(), Config::default());
    }

    #[test]
    fn overrides_apply() {
        let c = Config::parse(
            "[client]\nmax_body = 65536\nheartbeat_timeout = \"30s\"\n[auth]\nmode = \"open\"\n",
        )
        .unwrap();
        assert_eq!(c.client.max_body, 65536);
        assert_eq!(c.client.heartbeat_timeout, Duration::from_secs(30));
        assert_eq!(c.auth.mode, AuthMode::Open);
        assert_eq!(c.rpc, RpcConfig::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse("[client]\nmax_bodyy = 1\n").unwrap_err();
        assert!(err.to_string().contains("max_bodyy"), "{err}");
        let err = Config::parse("colour = 1\n").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn wrong_types_are_parse_errors() {
        assert!(matches!(
            Config::parse("[client]\nmax_body = \"big\"\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("[client]\nhandshake_timeout = \"soon\"\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("[auth]\nmode = \"maybe\"\n"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("[rpc]\nbind = [\"nowhere\"]\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn each_rejection() {
        let cases: &[(&str, &str)] = &[
            (
                "[client]\ntcp_bind = []\nquic_bind = []\nws_bind = []\n",
                "client.tcp_bind",
            ),
            (
                "[client]\nws_allowed_origins = [\"example.com\"]\n",
                "client.ws_allowed_origins",
            ),
            (
                "[client]\nws_allowed_origins = [\"https://example.com/\"]\n",
                "client.ws_allowed_origins",
            ),
            (
                "[client]\nws_allowed_origins = [\"ftp://example.com\"]\n",
                "client.ws_allowed_origins",
            ),
            (
                "[client]\nws_allowed_origins = [\"https://example.com:0\"]\n",
                "client.ws_allowed_origins",
            ),
            (
                "[client]\nws_allowed_origins = [\"https://\"]\n",
                "client.ws_allowed_origins",
            ),
            (
                "[client]\nws_allowed_origins = [\"https://*.example.com\"]\n",
                "client.ws_allowed_origins",
            ),
            ("[client]\nmax_body = 0\n", "client.max_body"),
            ("[client]\nmax_body = 1048577\n", "client.max_body"),
            (
                "[client]\nhandshake_timeout = \"0s\"\n",
                "client.handshake_timeout",
            ),
            (
                "[client]\nheartbeat_timeout = \"0s\"\n",
                "client.heartbeat_timeout",
            ),
            ("[client]\nwrite_timeout = \"0s\"\n", "client.write_timeout"),
            ("[client]\nqueue_size = 0\n", "client.queue_size"),
            (
                "[client]\nslow_consumer_timeout = \"0s\"\n",
                "client.slow_consumer_timeout",
            ),
            ("[registry]\nmax_rooms = 0\n", "registry.max_rooms"),
            ("[client]\nqueue_size = 2000000\n", "client.queue_size"),
            ("[client]\nqueue_bytes = 0\n", "client.queue_bytes"),
            // one 4096-byte body plus the 32-byte header with the extension: 4128
            ("[client]\nqueue_bytes = 4127\n", "client.queue_bytes"),
            ("[client]\nmax_body = 1048576\n", "client.queue_bytes"),
            ("[client]\nqueue_bytes = 1073741825\n", "client.queue_bytes"),
            ("[client]\nmax_connections = 0\n", "client.max_connections"),
            (
                "[client]\nmax_connections_per_ip = 0\n",
                "client.max_connections_per_ip",
            ),
            (
                "[client]\nmax_frames_per_sec = 0\n",
                "client.max_frames_per_sec",
            ),
            ("[quic]\nidle_timeout = \"0s\"\n", "quic.idle_timeout"),
            ("[quic]\nidle_timeout = \"2h\"\n", "quic.idle_timeout"),
            (
                "[quic]\nidle_timeout = \"10s\"\nkeep_alive_interval = \"10s\"\n",
                "quic.keep_alive_interval",
            ),
            (
                "[quic]\nstream_receive_window = 10\n",
                "quic.stream_receive_window",
            ),
            (
                "[quic]\nstream_receive_window = 8192\nreceive_window = 4096\n",
                "quic.receive_window",
            ),
            ("[quic]\nsend_window = 1\n", "quic.send_window"),
            ("[quic]\nsession_cache = 0\n", "quic.session_cache"),
            ("[quic]\nsession_cache = 10000001\n", "quic.session_cache"),
            ("[quic]\nretry_threshold = 100001\n", "quic.retry_threshold"),
            ("[rpc]\nbind = []\n", "rpc.bind"),
            ("[rpc]\nmax_request_bytes = 10\n", "rpc.max_request_bytes"),
            (
                "[rpc]\nmax_request_bytes = 1000000000\n",
                "rpc.max_request_bytes",
            ),
            ("[rpc]\nmax_keys = 0\n", "rpc.max_keys"),
            ("[rpc]\nmax_streams = 0\n", "rpc.max_streams"),
            ("[rpc]\nidle_timeout = \"0s\"\n", "rpc.idle_timeout"),
            ("[rpc]\nidle_timeout = \"2h\"\n", "rpc.idle_timeout"),
            (
                "[rpc]\npaced_max_duration = \"500ms\"\n",
                "rpc.paced_max_duration",
            ),
            (
                "[rpc]\npaced_max_duration = \"2d\"\n",
                "rpc.paced_max_duration",
            ),
            ("[registry]\nbuckets = 0\n", "registry.buckets"),
            ("[registry]\nbuckets = 12\n", "registry.buckets"),
            ("[registry]\nbuckets = 131072\n", "registry.buckets"),
            ("[shutdown]\ngrace = \"0s\"\n", "shutdown.grace"),
            ("[history]\nsize = 0\n", "history.size"),
            ("[history]\nsize = 100001\n", "history.size"),
            ("[history]\nbytes = 1000\n", "history.bytes"),
            ("[history]\nttl = \"500ms\"\n", "history.ttl"),
            ("[history]\nttl = \"8days\"\n", "history.ttl"),
            ("[history]\nstore = \"redis\"\n", "history.store"),
            ("[runtime]\nworker_threads = 5000\n", "runtime.worker_threads"),
            (
                "[history]\nstore = \"redis\"\nkey = false\n[cluster]\nredis = \"redis://127.0.0.1:6379\"\n",
                "history.store",
            ),
            (
                "[history]\nstore = \"redis\"\nenabled = false\n[cluster]\nredis = \"redis://127.0.0.1:6379\"\n",
                "history.store",
            ),
            (
                "[http]\nbind = [\"0.0.0.0:3111\"]\nrequire_token = false\n",
                "http.require_token",
            ),
            (
                "[http]\nbind = [\"127.0.0.1:3111\", \"[::]:3111\"]\nrequire_token = false\n",
                "http.require_token",
            ),
            ("[http]\nmax_body_bytes = 0\n", "http.max_body_bytes"),
            ("[http]\nmax_body_bytes = 67108865\n", "http.max_body_bytes"),
            ("[http]\nmax_query_bytes = 10\n", "http.max_query_bytes"),
            ("[http]\nmax_query_bytes = 262145\n", "http.max_query_bytes"),
            ("[http]\ntimeout = \"0s\"\n", "http.timeout"),
            ("[http]\ntimeout = \"2h\"\n", "http.timeout"),
            ("[http]\nmax_connections = 0\n", "http.max_connections"),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(text), *field, "for {text:?}");
        }
    }

    #[test]
    fn websocket_and_tls_listeners_default_to_goims_ws_port_only() {
        let c = Config::default();
        assert_eq!(
            c.client.ws_bind,
            vec![SocketAddr::from(([0, 0, 0, 0], 3102))]
        );
        assert!(c.client.wss_bind.is_empty() && c.client.tls_bind.is_empty());
        assert!(c.client.ws_allowed_origins.is_empty());
        // any one listener is enough
        let c = Config::parse("[client]\ntcp_bind = []\nquic_bind = []\n").unwrap();
        assert_eq!(c.client.ws_bind.len(), 1);
        let c = Config::parse(
            "[client]\ntcp_bind = []\nquic_bind = []\nws_bind = []\nwss_bind = [\"127.0.0.1:3103\"]\n",
        )
        .unwrap();
        assert_eq!(c.client.wss_bind[0].port(), 3103);
        let loopback = Config::loopback(Path::new("/tmp"));
        assert!(loopback.client.ws_bind.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn allowed_origins_take_scheme_host_and_port() {
        let c = Config::parse(
            "[client]\nws_allowed_origins = [\"https://app.example.com\", \"http://localhost:8080\", \"http://[::1]:3000\", \"https://[2001:db8::1]\"]\n",
        )
        .unwrap();
        assert_eq!(c.client.ws_allowed_origins.len(), 4);
    }

    #[test]
    fn queue_bytes_fits_one_frame_of_max_body() {
        let c = Config::parse("[client]\nqueue_bytes = 4128\n").unwrap();
        assert_eq!(c.client.queue_bytes, 4128);
        let c = Config::parse("[client]\nmax_body = 1048576\nqueue_bytes = 1048608\n").unwrap();
        assert_eq!(c.client.queue_bytes, 1048608);
        assert_eq!(Config::default().client.queue_bytes, 256 * 1024);
    }

    #[test]
    fn session_cache_is_only_checked_with_zero_rtt_on() {
        let c = Config::parse("[quic]\nzero_rtt = false\nsession_cache = 0\n").unwrap();
        assert!(!c.quic.zero_rtt);
        assert!(Config::default().quic.zero_rtt);
    }

    #[test]
    fn retry_threshold_zero_means_always_retry_and_is_valid() {
        let c = Config::parse("[quic]\nretry_threshold = 0\n").unwrap();
        assert_eq!(c.quic.retry_threshold, 0);
        assert_eq!(Config::default().quic.retry_threshold, 64);
        // Independent of the connection cap: unvalidated handshakes hold no permit.
        let c = Config::parse("[client]\nmax_connections = 10\n[quic]\nretry_threshold = 1024\n")
            .unwrap();
        assert_eq!(c.quic.retry_threshold, 1024);
    }

    #[test]
    fn no_token_is_allowed_on_loopback_only_and_an_empty_bind_disables_http() {
        let c = Config::parse(
            "[http]\nbind = [\"127.0.0.1:3111\", \"[::1]:3111\"]\nrequire_token = false\n",
        )
        .unwrap();
        assert!(!c.http.require_token);
        let c = Config::parse("[http]\nbind = []\nrequire_token = false\n").unwrap();
        assert!(c.http.bind.is_empty());
        assert!(Config::default().http.require_token);
        assert_eq!(Config::default().http.bind[0].port(), 3111);
        let c = Config::parse("[metrics]\nenabled = false\n").unwrap();
        assert!(!c.metrics.enabled);
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let err = Config::load(Path::new("/nonexistent/quicpush.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/quicpush.toml"));
    }
}

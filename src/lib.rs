//! quicpush: a goim-compatible push server.
//!
//! Backends push messages over a QUIC RPC with mutual TLS; clients hold long-lived
//! connections over TCP or QUIC and speak goim's v2 frame protocol, so goim clients
//! connect unchanged.
//!
//! # Data flow
//!
//! ```text
//! backend ──QUIC+mTLS──▶ rpc::server ─┐
//!                                      ├─▶ rpc::dispatch ──▶ registry (buckets) ──▶ Channel queue
//! backend ──HTTP (goim-logic API)──▶ http ─┘                                             │ (bounded)
//! client ◀── TCP / TLS / QUIC stream / WebSocket message ◀── session writer ◀────────────┘
//! client ──▶ session reader ──▶ registry (rooms, ops) / replies via the same queue
//! Prometheus ──GET /metrics──▶ http ──▶ metrics (counters aggregated per call / per write)
//! ```
//!
//! With `cluster.redis` set, several nodes are one push tier ([`cluster`]):
//!
//! ```text
//! rpc::dispatch ─ local part ─▶ registry (as above)
//!      └─ keys / users / room not here ─▶ one Redis script: read the directory, PUBLISH quicpush:node:<id>
//!                                   (Redis Cluster: SPUBLISH to the key's / user's / room's sharded channel)
//!                                   other node: cluster::bus ─▶ its dispatcher, local only
//! registry register / unregister / room change ─▶ DirectoryHook ─▶ bounded queue ─▶ directory writer ─▶ Redis
//! ```
//!
//! With `history.store = "redis"` as well, key and user streams are the tier's,
//! in Redis ([`cluster::shared`]): a key or user push is not fanned out locally
//! but appended and routed by one script, and every node holding it (this one
//! too) queues it from the bus with its position; a connecting client claims its
//! key and user in the directory and reads its streams there before registering.
//!
//! ```text
//! rpc::dispatch ─▶ Redis script: append to the stream, find holders, PUBLISH position + frame
//!                  └─▶ each holder's cluster::bus ─▶ registry::push_*_at ─▶ channel (next offset only)
//! session: Auth ─▶ claim key / user (Redis) ─▶ read since (Redis) ─▶ registry::register_with
//! ```
//!
//! Every front door is an adapter: client transports hand a reader and a writer to
//! the one [`session`] loop; the HTTP API turns goim-logic's routes into the same
//! [`rpc::Request`]s the QUIC RPC carries and calls the same dispatcher.
//!
//! Data flows one way: backend → rpc → registry → channel queue → writer → socket.
//! A push never awaits: it encodes the frame once, then copies it, stamped with the
//! connection's push sequence, into each recipient's bounded queue under the
//! bucket's lock, which is a plain (non-async) mutex never held across an `.await`.
//! A writer swaps its queue's bytes out and sends them in one write.
//!
//! # Resume without loss (history)
//!
//! ```text
//! backend ─▶ rpc::dispatch ─▶ registry ──append once──▶ history (per source stream)
//!                               │  (offset, epoch)            ▲ read since position
//!                               ▼                             │
//!               channel queue: frame + resume extension ◀── session: Auth{resume}
//! ```
//!
//! Every push has a source: the key (`K`), the user id (`M`), the room (`R`) or
//! broadcast (`A`). With history on for that kind, the registry appends the encoded
//! frame **once** to the source's stream (epoch + offset) before it fans out, in the
//! same order it fans out: a key push appends and pushes under the key's bucket
//! lock; a user or room push takes the stream's ordering lock (sync, never across an
//! `.await`) around append + fan-out; broadcasts append in their ordered submit.
//! Lock order: ordering lock → bucket → history shard → channel queue.
//!
//! A connection that negotiated resume in Auth gets each push with a 16-byte header
//! extension (headerLen 32: kind, epoch, offset) that goim clients skip, since they
//! take the body at headerLen. The extension is stamped while the frame is copied
//! into the queue, as the seq is: a push is still encoded once. After registering,
//! its session reads each stream since the client's position and places AuthReply
//! (JSON: epoch, top offset, recovered per source) and the replay at the front of
//! the queue; live pushes that arrived meanwhile stay behind them, and a per-source
//! floor drops live copies of what was replayed. A resume-capable connection whose
//! queue refuses a history-backed push is closed (nothing is skipped silently): its
//! client resumes and gets it from history.
//!
//! Over QUIC a returning client sends that Auth as 0-RTT data: AuthReply and the
//! replay leave at once as 0.5-RTT data, while registering (and so replacing
//! another connection of the key, joining a room) waits until the handshake is
//! confirmed, so a replayed 0-RTT flight changes nothing ([`transport::quic`],
//! [`session`]). Session tickets are issued on the client port only ([`tls`]).
//!
//! # Layout
//!
//! - [`protocol`]: goim v2 frames (16-byte header + body), ops, encode/decode, and
//!   the resume header extension. No I/O.
//! - [`history`]: the [`history::HistoryStore`] trait (streams with epoch and offset,
//!   retention by size, bytes and TTL) and its in-memory implementation;
//!   `history::redis_store`, the same streams in Redis (used by
//!   [`cluster::shared`] for key and user streams with `history.store = "redis"`).
//! - [`resume`]: the resume negotiation: what Auth asks for and AuthReply answers.
//! - [`netsim`]: a lossy network in the process: a wrapping `quinn::AsyncUdpSocket`
//!   with seeded loss, reordering, delay, a bandwidth cap and network switches.
//! - [`codec`]: the RPC wire encoding (bincode); every use of bincode lives here.
//! - [`config`]: the server's TOML configuration: serde defaults, `load → validate`.
//! - [`certs`]: generating the CA, server, backend certificates and the token secret.
//! - [`tls`]: rustls/quinn configurations built from `certs/` (ring provider only).
//! - [`auth`]: the Auth frame's token: HS256 JWT or goim's open JSON, plus the
//!   optional resume request.
//! - [`channel`]: one connected client as the registry sees it: key, outbound queue
//!   bounded in frames and in bytes (replies included; stamping seq and, when
//!   negotiated, the resume extension), the slow-consumer lag, and a close signal.
//! - [`registry`]: the sharded buckets: key → channel, room → members, user id → keys;
//!   every push fans out from here, appending to history first. `registry::filter`
//!   holds a client's op filter: Sub/Unsub lists are parsed, capped and sorted
//!   before the bucket's lock, and merged in one linear pass under it.
//! - [`session`]: the one reader/writer loop for a client, generic over
//!   `AsyncRead`/`AsyncWrite`, shared by every transport; it runs the recovery.
//! - [`transport`]: accept loops that adapt TCP sockets (plain or TLS, `transport::tls`),
//!   WebSocket connections (`transport::ws`: ws and wss on `/sub`, one goim frame or
//!   one Raw frame of several per binary message, origin checks) and QUIC streams to a
//!   session;
//!   QUIC counts a connection (global and per-IP permits) only once its address is
//!   validated, answering with Retry past `quic.retry_threshold` unvalidated handshakes;
//!   the server's QUIC endpoints draw 12-byte connection IDs (8 random bytes and a tag).
//! - [`rpc`]: the backend API: every wire type in `rpc::proto` (pinned by golden
//!   bytes; a change bumps the ALPN `quicpush-rpc/N`), the QUIC server (each
//!   stream pipelines its calls: started in stream order, up to
//!   `rpc::server::MAX_PENDING` running, answered in order), broadcast workers and
//!   tracked paced broadcasts, and the client library backends use.
//! - [`http`]: one axum listener (`http.bind`) for goim-logic's HTTP API
//!   (`/goim/push/*`, `/goim/online/*`, bearer token unless loopback and
//!   `http.require_token = false`) and `GET /metrics`.
//! - [`metrics`]: the server's counters, gauges and histograms (Prometheus text),
//!   owned by the [`Server`] and counted per RPC call, per session event and per
//!   writer wake-up, never per recipient of a push; `metrics.enabled = false` turns
//!   them off.
//! - [`client`]: a goim client over TCP, TLS, WebSocket or QUIC, for examples, tests
//!   and load tools; it keeps its last offsets and resumes.
//! - `bench` (cargo feature `bench`, on in the binary's default `cli` feature):
//!   `quicpush bench`, the load generator and the raw floor it compares against
//!   (and `bench::handshake`, rustls's own handshake cost as the connect
//!   scenario's yardstick).
//! - [`cluster`]: several nodes as one tier on a shared Redis: node records with a
//!   TTL (`cluster::nodes`, `quicpush nodes`), the directory of keys, users and
//!   rooms per node (`cluster::directory`, written by one task from the
//!   registry's hook, refreshed whole every tick), and the pub/sub bus
//!   (`cluster::bus`, `cluster::envelope`) that hands forwarded pushes and kicks
//!   to the owning node's dispatcher; `cluster::route` forwards a call with one
//!   script (lookup and PUBLISH together, queued in call order). Pushes that leave the node answer
//!   `Forwarded` (not a delivery) or `Unavailable` (Redis down). `cluster::shared`:
//!   key and user history in Redis (append-and-route scripts, claims at connect).
//! - [`server`]: binds every listener, runs them, and shuts them down gracefully.
//! - [`shutdown`]: the shared shutdown signal.
//!
//! # Where later work fits
//!
//! - Several nodes: [`cluster`] speaks to one Redis server or a Redis Cluster
//!   ([`cluster::Backend`]; on a cluster the bus is sharded pub/sub, one channel
//!   per held key, user and room, see [`cluster::subs`]). With `history.store =
//!   "redis"` every kept source's stream is the tier's, the broadcast stream
//!   (`{a}`) too.
//!

pub mod auth;
#[cfg(feature = "bench")]
pub mod bench;
pub mod certs;
pub mod channel;
pub mod client;
pub mod cluster;
pub mod codec;
pub mod config;
pub mod history;
pub mod http;
pub mod metrics;
pub mod netsim;
pub mod protocol;
pub mod registry;
pub mod resume;
pub mod rpc;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod transport;

pub use config::Config;
pub use server::Server;

//! quicpush: a goim-compatible push server.
//!
//! Backends push messages over a QUIC RPC with mutual TLS; clients hold long-lived
//! connections over TCP or QUIC and speak goim's v2 frame protocol, so goim clients
//! connect unchanged.
//!
//! # Data flow
//!
//! ```text
//! backend ──QUIC+mTLS──▶ rpc::server ──▶ registry (buckets) ──▶ Channel queue
//!                                                                   │ (bounded)
//! client ◀── TCP / QUIC stream ◀── session writer ◀─────────────────┘
//! client ──▶ session reader ──▶ registry (rooms, ops) / replies via the same queue
//! ```
//!
//! Data flows one way: backend → rpc → registry → channel queue → writer → socket.
//! A push never awaits: it encodes the frame once, then copies it, stamped with the
//! connection's push sequence, into each recipient's bounded queue under the
//! bucket's lock, which is a plain (non-async) mutex never held across an `.await`.
//! A writer swaps its queue's bytes out and sends them in one write.
//!
//! # Layout
//!
//! - [`protocol`]: goim v2 frames (16-byte header + body), ops, encode/decode. No I/O.
//! - [`codec`]: the RPC wire encoding (bincode); every use of bincode lives here.
//! - [`config`]: the server's TOML configuration: serde defaults, `load → validate`.
//! - [`certs`]: generating the CA, server, backend certificates and the token secret.
//! - [`tls`]: rustls/quinn configurations built from `certs/` (ring provider only).
//! - [`auth`]: the Auth frame's token: HS256 JWT or goim's open JSON.
//! - [`channel`]: one connected client as the registry sees it: key, bounded outbound
//!   queue and a close signal.
//! - [`registry`]: the sharded buckets: key → channel, room → members, user id → keys;
//!   every push fans out from here.
//! - [`session`]: the one reader/writer loop for a client, generic over
//!   `AsyncRead`/`AsyncWrite`, shared by every transport.
//! - [`transport`]: accept loops that adapt TCP sockets and QUIC streams to a session.
//! - [`rpc`]: the backend API: request/reply types, the QUIC server and the client
//!   library backends use.
//! - [`client`]: a minimal goim client over TCP or QUIC, for examples, tests and load tools.
//! - [`netsim`]: a simulated lossy network (loss, reordering, delay, bandwidth,
//!   network switches) in a UDP socket wrapper, for tests and the benchmark.
//! - [`bench`]: `quicpush bench`, the load generator and the raw floor it compares against.
//! - [`server`]: binds every listener, runs them, and shuts them down gracefully.
//! - [`shutdown`]: the shared shutdown signal.
//!
//! # Where later work fits
//!
//! - Resume without loss: each channel's queue stamps a per-connection push
//!   sequence as it accepts a push; a per-key replay buffer belongs beside it.
//! - Several nodes: the registry is the presence directory to mirror into Redis.
//! - WebSocket clients: another adapter in `transport` feeding the same session.
//! - A goim-compatible HTTP API: another front end calling the same
//!   `rpc::dispatch` that the QUIC RPC server calls.

pub mod auth;
pub mod bench;
pub mod certs;
pub mod channel;
pub mod client;
pub mod codec;
pub mod config;
pub mod netsim;
pub mod protocol;
pub mod registry;
pub mod rpc;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tls;
pub mod transport;

pub use config::Config;
pub use server::Server;

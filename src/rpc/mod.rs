//! The backend API over QUIC with mutual TLS.
//!
//! - [`proto`]: every type on the wire (request, reply, error and the values they
//!   carry; serde, encoded by [`crate::codec`]) and the ALPN that versions them.
//! - [`dispatch`]: validates a request and carries it out against the registry.
//! - [`broadcast`]: the ordered, bounded workers that fan a Broadcast out over buckets.
//! - [`server`]: accepts backend connections and serves calls on their streams.
//! - [`client`]: the library client backends use.
//!
//! Each call is one message on a long-lived bidirectional stream:
//! `len u32 BE | call id u64 BE | bincode payload`. A client keeps several streams
//! open and many calls in flight on each; the server answers each stream's calls in
//! order, coalescing replies into one write per batch.

pub mod broadcast;
pub mod client;
pub mod dispatch;
pub mod proto;
pub mod server;

pub use client::{Client, ClientError};
pub use proto::{Reply, Request, RpcError};

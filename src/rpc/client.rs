//! The client backends use to call the server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), quicpush::rpc::ClientError> {
//! use quicpush::rpc::Client;
//! use quicpush::tls::BackendIdentity;
//! let id = BackendIdentity::from_dir("certs".as_ref());
//! let client = Client::connect("127.0.0.1:3109".parse().unwrap(), "localhost", &id).await?;
//! let outcome = client.push_msg("some-key", 1000, "hello").await?;
//! println!("{outcome:?}");
//! # Ok(()) }
//! ```
//!
//! One QUIC connection, several long-lived streams; calls are spread over them and
//! many may be in flight at once. `Client` is cheap to share behind an `Arc`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use super::proto::{MultiOutcome, PushItem, Reply, Request, Response, RoomCount, RpcError};
use crate::channel::PushOutcome;
use crate::codec::{self, CodecError};
use crate::registry::{Online, Tally};
use crate::tls::{self, BackendIdentity, TlsError};

/// Streams a client opens.
const STREAMS: usize = 4;
/// Calls waiting to be written per stream before callers wait.
const QUEUE: usize = 1024;
/// Most calls a stream task takes per wake-up.
const BATCH: usize = 256;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The certificates could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The local UDP socket could not be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
    /// The connection could not be started (e.g. an invalid server name).
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    /// The connection failed or was closed (handshake, certificate, timeout).
    #[error("connection to {addr} failed: {source}")]
    Connection {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    /// A stream failed while the call was in flight.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The request could not be encoded or the reply decoded.
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// The server refused the call.
    #[error("server refused the call: {0}")]
    Rpc(#[from] RpcError),
    /// The server did not answer the connection attempt in time.
    #[error("no answer from {addr} within {after:?} (is the server running there?)")]
    ConnectTimeout {
        addr: SocketAddr,
        after: std::time::Duration,
    },
    /// No reply within the client's call timeout.
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    /// The server replied with a reply type that does not fit the method.
    #[error("unexpected reply to {method}: {reply:?}")]
    UnexpectedReply { method: &'static str, reply: Reply },
}

struct Call {
    message: BytesMut,
    id: u64,
    reply: oneshot::Sender<Result<Response, ClientError>>,
}

/// A connection to a quicpush server's RPC endpoint.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    streams: Vec<mpsc::Sender<Call>>,
    /// Per stream, the calls written and not yet answered.
    pending: Vec<Pending>,
    next_stream: AtomicUsize,
    next_id: AtomicU64,
    addr: SocketAddr,
    call_timeout: std::time::Duration,
}

/// How long connecting may take before it is given up.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a call waits for its reply by default.
pub const DEFAULT_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish()
    }
}

impl Client {
    /// Connects with the certificates of `identity`, checks the server's name, and
    /// confirms with a Ping that the server accepted this backend's certificate.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        identity: &BackendIdentity,
    ) -> Result<Client, ClientError> {
        let config = tls::rpc_client_config(identity)?;
        Self::connect_with(addr, server_name, config).await
    }

    /// Connects with a ready client configuration.
    pub async fn connect_with(
        addr: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> Result<Client, ClientError> {
        let endpoint = tls::client_endpoint(addr).map_err(ClientError::Socket)?;
        let connecting = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| ClientError::Connect {
                addr,
                reason: e.to_string(),
            })?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::ConnectTimeout {
                addr,
                after: CONNECT_TIMEOUT,
            })?
            .map_err(|source| ClientError::Connection { addr, source })?;
        let mut streams = Vec::with_capacity(STREAMS);
        let mut pending = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|source| ClientError::Connection { addr, source })?;
            let (tx, rx) = mpsc::channel(QUEUE);
            let p = Pending::default();
            tokio::spawn(run_stream(send, recv, rx, p.clone(), conn.clone(), addr));
            streams.push(tx);
            pending.push(p);
        }
        let client = Client {
            endpoint,
            conn,
            streams,
            pending,
            next_stream: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            addr,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        };
        // With TLS 1.3 the server checks the client certificate after the client
        // considers the handshake done: a round trip tells whether it was accepted.
        client.ping().await?;
        Ok(client)
    }

    /// Sets how long each call waits for its reply.
    pub fn set_call_timeout(&mut self, timeout: std::time::Duration) {
        self.call_timeout = timeout;
    }

    /// Calls sent and still waiting for their reply, over every stream.
    #[doc(hidden)]
    pub fn pending_calls(&self) -> usize {
        self.pending.iter().map(|p| p.lock().len()).sum()
    }

    /// The server's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends any request and waits for its reply.
    pub async fn call(&self, req: &Request) -> Result<Reply, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut message = BytesMut::new();
        codec::write_message(&mut message, id, req)?;
        let (tx, rx) = oneshot::channel();
        let i = self.next_stream.fetch_add(1, Ordering::Relaxed) % self.streams.len();
        // From here on, however the call ends (reply, timeout, or the caller
        // dropping this future), its entry leaves the stream's pending map.
        let mut waiting = Waiting {
            rx,
            pending: &self.pending[i],
            id,
        };
        let call = Call {
            message,
            id,
            reply: tx,
        };
        if self.streams[i].send(call).await.is_err() {
            return Err(self.lost());
        }
        match tokio::time::timeout(self.call_timeout, &mut waiting.rx).await {
            Ok(Ok(r)) => Ok(r??),
            Ok(Err(_)) => Err(self.lost()),
            Err(_) => Err(ClientError::Timeout(self.call_timeout)),
        }
    }

    fn lost(&self) -> ClientError {
        match self.conn.close_reason() {
            Some(source) => ClientError::Connection {
                addr: self.addr,
                source,
            },
            None => ClientError::Stream("stream task ended".into()),
        }
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.call(&Request::Ping).await? {
            Reply::Pong => Ok(()),
            reply => Err(ClientError::UnexpectedReply {
                method: "Ping",
                reply,
            }),
        }
    }

    pub async fn push_msg(
        &self,
        key: impl Into<String>,
        op: u32,
        body: impl Into<Bytes>,
    ) -> Result<PushOutcome, ClientError> {
        let req = Request::PushMsg {
            key: key.into(),
            op,
            body: body.into(),
        };
        match self.call(&req).await? {
            Reply::Pushed(o) => Ok(o),
            reply => Err(ClientError::UnexpectedReply {
                method: "PushMsg",
                reply,
            }),
        }
    }

    pub async fn mpush_msg(
        &self,
        keys: Vec<String>,
        op: u32,
        body: impl Into<Bytes>,
    ) -> Result<MultiOutcome, ClientError> {
        let req = Request::MPushMsg {
            keys,
            op,
            body: body.into(),
        };
        self.multi("MPushMsg", &req).await
    }

    pub async fn mpush_msgs(&self, msgs: Vec<PushItem>) -> Result<MultiOutcome, ClientError> {
        self.multi("MPushMsgs", &Request::MPushMsgs { msgs }).await
    }

    async fn multi(
        &self,
        method: &'static str,
        req: &Request,
    ) -> Result<MultiOutcome, ClientError> {
        match self.call(req).await? {
            Reply::Multi(m) => Ok(m),
            reply => Err(ClientError::UnexpectedReply { method, reply }),
        }
    }

    async fn tally(&self, method: &'static str, req: &Request) -> Result<Tally, ClientError> {
        match self.call(req).await? {
            Reply::Tally(t) => Ok(t),
            reply => Err(ClientError::UnexpectedReply { method, reply }),
        }
    }

    pub async fn push_user(
        &self,
        mids: Vec<i64>,
        op: u32,
        body: impl Into<Bytes>,
    ) -> Result<Tally, ClientError> {
        let req = Request::PushUser {
            mids,
            op,
            body: body.into(),
        };
        self.tally("PushUser", &req).await
    }

    pub async fn broadcast_room(
        &self,
        room: impl Into<String>,
        op: u32,
        body: impl Into<Bytes>,
    ) -> Result<Tally, ClientError> {
        let req = Request::BroadcastRoom {
            room: room.into(),
            op,
            body: body.into(),
        };
        self.tally("BroadcastRoom", &req).await
    }

    /// Returns the number of channels online when the broadcast was accepted.
    pub async fn broadcast(
        &self,
        op: u32,
        body: impl Into<Bytes>,
        speed: u32,
    ) -> Result<u64, ClientError> {
        let req = Request::Broadcast {
            op,
            body: body.into(),
            speed,
        };
        match self.call(&req).await? {
            Reply::BroadcastAccepted { online } => Ok(online),
            reply => Err(ClientError::UnexpectedReply {
                method: "Broadcast",
                reply,
            }),
        }
    }

    pub async fn rooms(&self) -> Result<Vec<RoomCount>, ClientError> {
        match self.call(&Request::Rooms).await? {
            Reply::Rooms(r) => Ok(r),
            reply => Err(ClientError::UnexpectedReply {
                method: "Rooms",
                reply,
            }),
        }
    }

    pub async fn online(&self) -> Result<Online, ClientError> {
        match self.call(&Request::Online).await? {
            Reply::Online(o) => Ok(o),
            reply => Err(ClientError::UnexpectedReply {
                method: "Online",
                reply,
            }),
        }
    }

    pub async fn kick(&self, key: impl Into<String>) -> Result<bool, ClientError> {
        match self.call(&Request::Kick { key: key.into() }).await? {
            Reply::Kicked(k) => Ok(k),
            reply => Err(ClientError::UnexpectedReply {
                method: "Kick",
                reply,
            }),
        }
    }

    /// Closes the connection and waits until the server has been told.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.wait_idle().await;
    }
}

type Pending =
    Arc<parking_lot::Mutex<HashMap<u64, oneshot::Sender<Result<Response, ClientError>>>>>;

/// A caller waiting for its reply. Dropped, it closes the receiver and then takes
/// the call out of the pending map: a reply that comes later is discarded, and a
/// call still queued for the writer is never written (the writer sees the receiver
/// closed under the same lock), so no entry outlives its caller.
struct Waiting<'a> {
    rx: oneshot::Receiver<Result<Response, ClientError>>,
    pending: &'a Pending,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        self.pending.lock().remove(&self.id);
    }
}

/// One stream: a writer task sends queued calls, a reader task hands each reply to
/// its caller. Separate tasks, so a large burst of calls never stops replies from
/// being read.
async fn run_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut calls: mpsc::Receiver<Call>,
    pending: Pending,
    conn: quinn::Connection,
    addr: SocketAddr,
) {
    let reader_pending = pending.clone();
    let mut reader = tokio::spawn(async move {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            match recv.read_buf(&mut buf).await {
                Ok(0) => return "server finished the stream".to_string(),
                Ok(_) => {}
                Err(e) => return e.to_string(),
            }
            loop {
                let (id, len) = match codec::peek_prefix(&buf) {
                    Ok(Some(p)) => p,
                    Ok(None) => break,
                    Err(e) => return e.to_string(),
                };
                if len > codec::MAX_PAYLOAD as u64 {
                    return format!("reply of {len} bytes exceeds {} bytes", codec::MAX_PAYLOAD);
                }
                let total = codec::PREFIX_LEN + len as usize;
                if buf.len() < total {
                    buf.reserve(total - buf.len());
                    break;
                }
                let msg = buf.split_to(total);
                let result = codec::decode_payload::<Response>(&msg[codec::PREFIX_LEN..])
                    .map_err(ClientError::from);
                if let Some(tx) = reader_pending.lock().remove(&id) {
                    let _ = tx.send(result);
                }
            }
        }
    });
    let mut batch = Vec::with_capacity(BATCH);
    let mut out = BytesMut::new();
    let failure = loop {
        tokio::select! {
            n = calls.recv_many(&mut batch, BATCH) => {
                if n == 0 {
                    // The client was dropped: let the server see the stream end.
                    let _ = send.finish();
                    break match (&mut reader).await {
                        Ok(reason) => reason,
                        Err(e) => e.to_string(),
                    };
                }
                {
                    let mut p = pending.lock();
                    for call in batch.drain(..) {
                        // Its caller gave up while it was queued: nothing to send.
                        if call.reply.is_closed() {
                            continue;
                        }
                        out.extend_from_slice(&call.message);
                        p.insert(call.id, call.reply);
                    }
                }
                if out.is_empty() {
                    continue;
                }
                if let Err(e) = send.write_all(&out).await {
                    reader.abort();
                    break e.to_string();
                }
                out.clear();
            }
            r = &mut reader => {
                break match r {
                    Ok(reason) => reason,
                    Err(e) => e.to_string(),
                };
            }
        }
    };
    let failed: Vec<_> = pending.lock().drain().collect();
    for (_, tx) in failed {
        let err = match conn.close_reason() {
            Some(source) => ClientError::Connection { addr, source },
            None => ClientError::Stream(failure.clone()),
        };
        let _ = tx.send(Err(err));
    }
}

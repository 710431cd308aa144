//! The benchmark's clients: connecting many of them (TCP or QUIC), and checking
//! every message they receive.
//!
//! A bench message's body is `index u64 | sent_at_ns u64 | key u32 | padding`:
//! `index` counts the messages meant for this client (0, 1, 2, ...), `sent_at_ns` is
//! when the load generator sent it (for latency), `key` the client it was addressed
//! to (`u32::MAX` for room and broadcast messages).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use super::{BenchError, BENCH_OP};
use crate::client::PushClient;
use crate::protocol::{self, MAX_BODY_LIMIT};

/// Clients per source address. One address has ~28,000 ephemeral ports, and the
/// kernel's search for a free one grows costly long before they run out, so the
/// load generator spreads its clients over 127.0.0.x in blocks of this size.
pub const CLIENTS_PER_SOURCE_IP: usize = 1_000;
/// The `key` field of messages sent to a room or to everyone.
pub const ANY_KEY: u32 = u32::MAX;
/// Body bytes the checks need.
pub const MIN_BODY: usize = 20;

/// Encodes a bench message body of `size` bytes.
pub fn body(index: u64, sent_at_ns: u64, key: u32, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(MIN_BODY));
    b.put_u64(index);
    b.put_u64(sent_at_ns);
    b.put_u32(key);
    b.resize(size.max(MIN_BODY), b'.');
    b.freeze()
}

/// Highest message index a client tracks; beyond, a message counts as misrouted.
const MAX_INDEX: u64 = 1 << 30;

/// What one client saw.
#[derive(Debug, Clone)]
pub struct ClientStats {
    /// Messages received (duplicates included).
    pub received: u64,
    /// Distinct message indexes received.
    pub unique: u64,
    pub duplicated: u64,
    /// Messages that arrived after one with a higher index.
    pub reordered: u64,
    pub misrouted: u64,
    /// Frames whose push sequence number did not follow the previous one's
    /// (quicpush numbers each connection's pushes 1, 2, 3, ...; 0 = unnumbered).
    pub bad_seq: u64,
    last_seq: u32,
    /// Latency samples not yet added to the shared histogram.
    pending_us: Vec<u64>,
    latency: Option<Latencies>,
    seen: Vec<u64>,
    highest: Option<u64>,
}

impl ClientStats {
    pub(crate) fn new(latency: Option<Latencies>) -> Self {
        ClientStats {
            received: 0,
            unique: 0,
            duplicated: 0,
            reordered: 0,
            misrouted: 0,
            bad_seq: 0,
            last_seq: 0,
            seen: Vec::new(),
            highest: None,
            pending_us: Vec::new(),
            latency,
        }
    }

    pub(crate) fn check(&mut self, me: u32, seq: u32, body: &[u8], epoch: Instant) {
        if seq != 0 {
            if seq != self.last_seq.wrapping_add(1) {
                self.bad_seq += 1;
            }
            self.last_seq = seq;
        }
        if body.len() < MIN_BODY {
            self.misrouted += 1;
            return;
        }
        let mut b = body;
        let index = b.get_u64();
        let sent = b.get_u64();
        let key = b.get_u32();
        if (key != ANY_KEY && key != me) || index >= MAX_INDEX {
            self.misrouted += 1;
            return;
        }
        self.received += 1;
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if self.seen.len() <= word {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicated += 1;
        } else {
            self.seen[word] |= bit;
            self.unique += 1;
        }
        match self.highest {
            Some(h) if index < h => self.reordered += 1,
            _ => self.highest = Some(index),
        }
        if self.latency.is_some() {
            let now = epoch.elapsed().as_nanos() as u64;
            self.pending_us
                .push((now.saturating_sub(sent) / 1000).max(1));
            if self.pending_us.len() >= 256 {
                self.flush_latency();
            }
        }
    }
}

/// The latency histogram all clients add to (in batches, to keep the lock rare).
pub type Latencies = Arc<parking_lot::Mutex<Histogram<u64>>>;

/// A histogram of 1 µs to 60 s at 3 significant digits.
pub fn new_latencies() -> Result<Latencies, BenchError> {
    let h = Histogram::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| BenchError::Options(format!("latency histogram: {e}")))?;
    Ok(Arc::new(parking_lot::Mutex::new(h)))
}

impl ClientStats {
    fn flush_latency(&mut self) {
        if let Some(h) = &self.latency {
            let mut h = h.lock();
            for v in self.pending_us.drain(..) {
                let _ = h.record(v);
            }
        }
    }
}

/// How the fleet authenticates.
#[derive(Clone)]
pub enum Login {
    /// quicpush: an HS256 token for key `bench-<i>` (in `room`, if any).
    Token {
        secret: Arc<Vec<u8>>,
        room: Option<String>,
    },
    /// The floor: the Auth body is the client's index.
    Index,
}

/// Where and how the fleet connects.
#[derive(Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    /// Other nodes of a tier: client `i` dials `[addr, others…][i % (1 + len)]`.
    pub others: Vec<SocketAddr>,
    pub quic: Option<(Vec<quinn::Endpoint>, quinn::ClientConfig)>,
    /// Over TCP: upgrade to WebSocket on `/sub` first.
    pub ws: bool,
    pub login: Login,
}

impl Dial {
    pub fn tcp(addr: SocketAddr, login: Login) -> Dial {
        Dial {
            addr,
            others: Vec::new(),
            quic: None,
            ws: false,
            login,
        }
    }

    /// WebSocket to `ws://addr/sub`, from the same sockets as [`Dial::tcp`].
    pub fn ws(addr: SocketAddr, login: Login) -> Dial {
        Dial {
            ws: true,
            ..Dial::tcp(addr, login)
        }
    }

    /// QUIC through `endpoints` shared client endpoints, trusting `ca`.
    pub fn quic(
        addr: SocketAddr,
        login: Login,
        ca: &Path,
        endpoints: usize,
    ) -> Result<Dial, BenchError> {
        let config =
            crate::tls::quic_client_config(ca).map_err(|e| BenchError::Spawn(e.to_string()))?;
        let eps = (0..endpoints.max(1))
            .map(|_| quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BenchError::Io(format!("client endpoint: {e}")))?;
        Ok(Dial {
            addr,
            others: Vec::new(),
            quic: Some((eps, config)),
            ws: false,
            login,
        })
    }

    /// The same dial, spreading clients over `others` too.
    pub fn spread_over(mut self, others: Vec<SocketAddr>) -> Dial {
        self.others = others;
        self
    }

    /// The node client `i` connects to.
    pub fn addr_for(&self, i: usize) -> SocketAddr {
        match i % (1 + self.others.len()) {
            0 => self.addr,
            k => self.others[k - 1],
        }
    }

    fn auth_body(&self, i: usize) -> Result<Bytes, BenchError> {
        match &self.login {
            Login::Index => Ok(Bytes::from(i.to_string())),
            Login::Token { secret, room } => {
                let mut claims = crate::auth::claims_for(
                    &format!("bench-{i}"),
                    std::time::Duration::from_secs(86_400),
                );
                claims.room_id = room.clone();
                crate::auth::issue(secret, &claims)
                    .map(Bytes::from)
                    .map_err(|e| BenchError::Spawn(format!("token: {e}")))
            }
        }
    }

    /// Connects and authenticates client `i`.
    pub async fn connect(&self, i: usize) -> Result<PushClient, BenchError> {
        self.connect_with(i, None).await
    }

    /// Connects and authenticates client `i`, meant never to be read: over TCP
    /// its receive buffer is small, so the server's queue for it fills soon.
    pub async fn connect_stalled(&self, i: usize) -> Result<PushClient, BenchError> {
        self.connect_with(i, Some(4096)).await
    }

    async fn connect_with(
        &self,
        i: usize,
        recv_buffer: Option<u32>,
    ) -> Result<PushClient, BenchError> {
        let addr = self.addr_for(i);
        let mut client = match &self.quic {
            None => {
                let socket =
                    tokio::net::TcpSocket::new_v4().map_err(|e| BenchError::Io(e.to_string()))?;
                if let Some(size) = recv_buffer {
                    socket
                        .set_recv_buffer_size(size)
                        .map_err(|e| BenchError::Io(format!("receive buffer: {e}")))?;
                }
                // Close with a reset: thousands of bench clients closing normally
                // would leave their ports in TIME_WAIT for the next run. (A zero
                // linger never blocks, which is what the deprecation is about.)
                #[allow(deprecated)]
                let _ = socket.set_linger(Some(std::time::Duration::ZERO));
                let block = i / CLIENTS_PER_SOURCE_IP;
                if addr.ip().is_loopback() && block < 250 {
                    // Spread over 127.0.0.1 ..= 127.0.0.250.
                    let _ = socket.set_reuseaddr(true);
                    let host = 1 + block as u8;
                    let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0);
                    socket
                        .bind(src)
                        .map_err(|e| BenchError::Io(format!("bind {src}: {e}")))?;
                }
                let stream = socket
                    .connect(addr)
                    .await
                    .map_err(|e| BenchError::Io(format!("connect {addr}: {e}")))?;
                let _ = stream.set_nodelay(true);
                if self.ws {
                    let url = format!("ws://{addr}{}", crate::transport::ws::PATH);
                    PushClient::ws_over(stream, &url, None)
                        .await
                        .map_err(|e| BenchError::Io(format!("client {i} upgrade: {e}")))?
                } else {
                    let (r, w) = stream.into_split();
                    PushClient::from_parts(Box::new(r), Box::new(w), None)
                }
            }
            Some((eps, config)) => {
                let ep = &eps[i % eps.len()];
                let conn = ep
                    .connect_with(config.clone(), addr, "localhost")
                    .map_err(|e| BenchError::Io(e.to_string()))?
                    .await
                    .map_err(|e| BenchError::Io(format!("QUIC connect: {e}")))?;
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| BenchError::Io(e.to_string()))?;
                PushClient::from_parts(Box::new(recv), Box::new(send), Some((conn, ep.clone())))
            }
        };
        client
            .auth(self.auth_body(i)?)
            .await
            .map_err(|e| BenchError::Io(format!("client {i} auth: {e}")))?;
        Ok(client)
    }
}

/// Connects `n` clients, `concurrency` at a time. Returns them in index order.
pub async fn connect_all(
    dial: &Dial,
    n: usize,
    concurrency: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<PushClient>, BenchError> {
    let mut out: Vec<Option<PushClient>> = (0..n).map(|_| None).collect();
    let mut stream = futures_util::stream::iter(0..n)
        .map(|i| async move { (i, dial.connect(i).await) })
        .buffer_unordered(concurrency.max(1));
    while let Some((i, r)) = stream.next().await {
        out[i] = Some(r?);
        progress.inc(1);
    }
    Ok(out.into_iter().flatten().collect())
}

/// Clients reading and checking until stopped.
pub struct Readers {
    pub received: Arc<AtomicU64>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<ClientStats>>,
}

impl Readers {
    /// Starts a reader task per client.
    pub fn start(clients: Vec<PushClient>, epoch: Instant, latency: Option<Latencies>) -> Readers {
        let received = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                tokio::spawn(read(
                    i as u32,
                    c,
                    epoch,
                    latency.clone(),
                    received.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Readers {
            received,
            stop,
            tasks,
        }
    }

    /// Stops every reader and gathers what they saw.
    pub async fn finish(self) -> Vec<ClientStats> {
        self.stop.cancel();
        let mut all = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            if let Ok(s) = t.await {
                all.push(s);
            }
        }
        all
    }
}

async fn read(
    me: u32,
    client: PushClient,
    epoch: Instant,
    latency: Option<Latencies>,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
) -> ClientStats {
    let mut stats = ClientStats::new(latency);
    let (mut reader, _writer, mut buf, quic) = client.into_parts();
    loop {
        let mut n = 0u64;
        loop {
            match protocol::decode(&mut buf, MAX_BODY_LIMIT) {
                Ok(Some(f)) => {
                    if f.op == BENCH_OP {
                        stats.check(me, f.seq, &f.body, epoch);
                        n += 1;
                    }
                }
                Ok(None) => break,
                Err(_) => return stats,
            }
        }
        if n > 0 {
            received.fetch_add(n, Ordering::Relaxed);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        tokio::select! {
            r = reader.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            _ = stop.cancelled() => break,
        }
    }
    if let Some((conn, _)) = quic {
        conn.close(0u32.into(), b"bench done");
    }
    stats.flush_latency();
    stats
}

//! The raw floor: the least a fan-out server can do, written straight on tokio and
//! quinn, to put quicpush's figures in proportion. No registry, no token check, no
//! RPC: a client's Auth body is just its index; a control connection (plain TCP)
//! sends goim frames: op 1 = this body to every client, op 2 = `u32 index | body`
//! to one client. Each outgoing frame is encoded once and written to every socket
//! through a bounded queue and a writer that coalesces, as quicpush does.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::info;

use super::{BenchError, BENCH_OP};
use crate::config::QuicConfig;
use crate::protocol::{self, op, Frame, MAX_BODY_LIMIT};

/// Control op: the body goes to every client.
pub const CTL_ALL: u32 = 1;
/// Control op: `u32 index | body` goes to one client.
pub const CTL_ONE: u32 = 2;

const QUEUE: usize = 1024;

/// Clients that authenticated since the control loop last looked.
type Senders = Arc<Mutex<Vec<(usize, mpsc::Sender<Bytes>)>>>;

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Runs the floor until SIGINT/SIGTERM, logging its three addresses. Its client
/// sockets are bound as the server binds its own (backlog, QUIC receive buffer,
/// `tcp_send_buffer`), so a comparison is like for like.
pub async fn run(certs: &Path, tcp_send_buffer: u32) -> Result<(), BenchError> {
    crate::certs::ensure(certs, &[]).map_err(|e| BenchError::Spawn(e.to_string()))?;
    let tcp = crate::server::bind_tcp(local(), tcp_send_buffer)
        .map_err(|e| BenchError::Io(format!("floor TCP bind: {e}")))?;
    let quic_cfg = crate::tls::client_server_config(certs, &QuicConfig::default())
        .map_err(|e| BenchError::Spawn(e.to_string()))?;
    let quic = crate::server::quic_endpoint(quic_cfg, local())
        .map_err(|e| BenchError::Io(format!("floor QUIC bind: {e}")))?;
    let control = tokio::net::TcpListener::bind(local())
        .await
        .map_err(|e| BenchError::Io(e.to_string()))?;
    let addr = |r: std::io::Result<SocketAddr>| r.map_err(|e| BenchError::Io(e.to_string()));
    info!(addr = %addr(tcp.local_addr())?, "floor TCP listening");
    info!(addr = %addr(quic.local_addr())?, "floor QUIC listening");
    info!(addr = %addr(control.local_addr())?, "floor control listening");

    let senders: Senders = Arc::default();
    let s = senders.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = tcp.accept().await {
            let _ = sock.set_nodelay(true);
            let (r, w) = sock.into_split();
            tokio::spawn(client(r, w, s.clone()));
        }
    });
    let s = senders.clone();
    let q = quic.clone();
    tokio::spawn(async move {
        while let Some(incoming) = q.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok((send, recv)) = conn.accept_bi().await else {
                    return;
                };
                client(recv, send, s).await;
                conn.close(0u32.into(), b"");
            });
        }
    });
    let s = senders.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = control.accept().await {
            let _ = sock.set_nodelay(true);
            control_loop(sock, s.clone()).await;
        }
    });
    crate::shutdown::signal().await;
    quic.close(0u32.into(), b"");
    Ok(())
}

async fn client<R, W>(mut r: R, mut w: W, senders: Senders)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(4096);
    let auth = loop {
        match protocol::decode(&mut buf, MAX_BODY_LIMIT) {
            Ok(Some(f)) => break f,
            Ok(None) => {}
            Err(_) => return,
        }
        match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    };
    let Some(index) = std::str::from_utf8(&auth.body)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    else {
        return;
    };
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let reply = Frame::new(op::AUTH_REPLY, auth.seq, Bytes::new()).to_bytes();
    if w.write_all(&reply).await.is_err() {
        return;
    }
    match senders.lock() {
        Ok(mut g) => g.push((index, tx)),
        Err(p) => p.into_inner().push((index, tx)),
    }
    let writer = tokio::spawn(write_coalesced(rx, w));
    // Read and drop whatever the client sends until it leaves.
    let mut sink = vec![0u8; 512];
    while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
    writer.abort();
}

/// Writes everything queued, one write per wake-up, until the queue closes.
pub async fn write_coalesced<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Bytes>, mut w: W) {
    let mut batch = Vec::new();
    let mut out = BytesMut::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        for b in batch.drain(..) {
            out.extend_from_slice(&b);
        }
        if w.write_all(&out).await.is_err() {
            return;
        }
        out.clear();
    }
}

async fn control_loop(mut sock: tokio::net::TcpStream, senders: Senders) {
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut all: Vec<Option<mpsc::Sender<Bytes>>> = Vec::new();
    loop {
        match sock.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let frame = match protocol::decode(&mut buf, MAX_BODY_LIMIT) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return,
            };
            {
                let mut pending = match senders.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                for (index, tx) in pending.drain(..) {
                    if all.len() <= index {
                        all.resize(index + 1, None);
                    }
                    all[index] = Some(tx);
                }
            }
            match frame.op {
                CTL_ALL => {
                    let out = Frame::new(BENCH_OP, 0, frame.body).to_bytes();
                    for tx in all.iter().flatten() {
                        // never drop: wait for room instead
                        if let Err(mpsc::error::TrySendError::Full(b)) = tx.try_send(out.clone()) {
                            let _ = tx.send(b).await;
                        }
                    }
                }
                CTL_ONE if frame.body.len() >= 4 => {
                    let mut body = frame.body;
                    let index = body.get_u32() as usize;
                    let out = Frame::new(BENCH_OP, 0, body).to_bytes();
                    if let Some(Some(tx)) = all.get(index) {
                        if let Err(mpsc::error::TrySendError::Full(b)) = tx.try_send(out) {
                            let _ = tx.send(b).await;
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

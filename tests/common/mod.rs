//! A server started in-process on port 0 with fresh certificates, and helpers to
//! connect clients and backends to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use quicpush::auth::{self, Claims};
use quicpush::client::PushClient;
use quicpush::client::ResumeState;
use quicpush::protocol::{op, Frame, PushMeta};
use quicpush::registry::Registry;
use quicpush::rpc::proto::Response;
use quicpush::rpc::Client;
use quicpush::tls::BackendIdentity;
use quicpush::transport::ConnLimits;
use quicpush::{codec, Config, Server};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

pub mod process;
pub mod redis;

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub tcp: SocketAddr,
    pub quic: SocketAddr,
    pub rpc: SocketAddr,
    /// The WebSocket, WebSocket-over-TLS and TLS listeners, unless a test's
    /// config turned them off.
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    /// The HTTP API's address, unless `http.bind` was emptied.
    pub http: Option<SocketAddr>,
    /// The HTTP API's bearer token (in `<dir>/api.token`).
    pub api_token: String,
    pub metrics: Arc<quicpush::metrics::Metrics>,
    pub dir: tempfile::TempDir,
    pub registry: Arc<Registry>,
    /// The server's client connection limits and their per-IP counts.
    pub limits: ConnLimits,
    /// This node's part in a tier, when `cluster.redis` was set.
    pub cluster: Option<std::sync::Arc<quicpush::cluster::Cluster>>,
    secret: Vec<u8>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Quic,
    /// WebSocket on `/sub`.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// goim frames in TLS over TCP.
    Tls,
}

pub const BOTH: [Via; 2] = [Via::Tcp, Via::Quic];

/// The transports over TCP besides plain TCP: WebSocket, WebSocket over TLS, TLS.
pub const FRONT_DOORS: [Via; 3] = [Via::Ws, Via::Wss, Via::Tls];

pub fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_in(tempfile::tempdir().unwrap(), tweak).await
    }

    /// Another node of `first`'s tier: a copy of its certificates, token secret
    /// and API token, so the same tokens and backend identity work on both.
    pub async fn start_beside(first: &TestServer, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(first.dir.path()).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
            }
        }
        Self::start_in(dir, tweak).await
    }

    async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::default();
        config.client.tcp_bind = vec![local()];
        config.client.quic_bind = vec![local()];
        config.client.ws_bind = vec![local()];
        config.client.wss_bind = vec![local()];
        config.client.tls_bind = vec![local()];
        config.rpc.bind = vec![local()];
        config.tls.dir = dir.path().to_owned();
        config.auth.secret_file = dir.path().join("token.secret");
        config.http.bind = vec![local()];
        config.http.api_token_file = dir.path().join("api.token");
        tweak(&mut config);
        config.validate().unwrap();
        let server = Server::bind(config).await.unwrap();
        let secret = auth::load_secret(&dir.path().join("token.secret")).unwrap();
        let tcp = server.tcp_addrs()[0];
        let quic = server.quic_addrs()[0];
        let rpc = server.rpc_addrs()[0];
        let ws = server.ws_addrs().first().copied();
        let wss = server.wss_addrs().first().copied();
        let tls = server.tls_addrs().first().copied();
        let http = server.http_addrs().first().copied();
        let api_token = std::fs::read_to_string(dir.path().join("api.token"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_default();
        let metrics = server.metrics();
        let registry = server.registry();
        let limits = server.conn_limits();
        let cluster = server.cluster();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let handle = tokio::spawn(async move { server.run(s.cancelled_owned()).await });
        TestServer {
            tcp,
            quic,
            rpc,
            ws,
            wss,
            tls,
            http,
            api_token,
            metrics,
            dir,
            registry,
            limits,
            cluster,
            secret,
            stop,
            handle,
        }
    }

    pub fn claims(&self, key: &str) -> Claims {
        auth::claims_for(key, Duration::from_secs(3600))
    }

    pub fn sign(&self, claims: &Claims) -> String {
        auth::issue(&self.secret, claims).unwrap()
    }

    pub fn token(&self, key: &str) -> String {
        self.sign(&self.claims(key))
    }

    /// A connected client that has not authenticated yet.
    pub async fn raw_client(&self, via: Via) -> PushClient {
        match via {
            Via::Tcp => PushClient::connect_tcp(self.tcp).await.unwrap(),
            Via::Quic => {
                PushClient::connect_quic(self.quic, "localhost", &self.dir.path().join("ca.pem"))
                    .await
                    .unwrap()
            }
            Via::Ws => PushClient::connect_ws(self.ws.expect("ws bound"))
                .await
                .unwrap(),
            Via::Wss => {
                PushClient::connect_wss(self.wss.expect("wss bound"), "localhost", &self.ca())
                    .await
                    .unwrap()
            }
            Via::Tls => {
                PushClient::connect_tls(self.tls.expect("tls bound"), "localhost", &self.ca())
                    .await
                    .unwrap()
            }
        }
    }

    /// The accept loops over TCP (tcp, and ws, wss, tls when bound): each holds
    /// a connection permit for its next connection.
    pub fn tcp_accept_loops(&self) -> usize {
        1 + [self.ws, self.wss, self.tls]
            .iter()
            .filter(|a| a.is_some())
            .count()
    }

    /// The CA certificate clients verify the server with.
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A client authenticated with `claims`; it is registered when this returns.
    pub async fn client_with(&self, via: Via, claims: &Claims) -> PushClient {
        let mut c = self.raw_client(via).await;
        c.auth(self.sign(claims)).await.unwrap();
        c
    }

    pub async fn client(&self, via: Via, key: &str) -> PushClient {
        self.client_with(via, &self.claims(key)).await
    }

    pub async fn backend(&self) -> Client {
        Client::connect(
            self.rpc,
            "localhost",
            &BackendIdentity::from_dir(self.dir.path()),
        )
        .await
        .unwrap()
    }

    /// Waits until the registry reports `n` connections online.
    pub async fn wait_online(&self, n: u64) {
        let reg = self.registry.clone();
        tokio::time::timeout(WAIT, async move {
            while reg.online().total != n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("online never reached {n}: {:?}", self.registry.online()));
    }

    /// A raw backend connection (the right certificate) to this server's RPC
    /// endpoint, for writing calls as bytes; the endpoint is returned to close.
    pub async fn rpc_connection(&self) -> (quinn::Endpoint, quinn::Connection) {
        let config =
            quicpush::tls::rpc_client_config(&BackendIdentity::from_dir(self.dir.path())).unwrap();
        let endpoint = quinn::Endpoint::client(local()).unwrap();
        let conn = endpoint
            .connect_with(config, self.rpc, "localhost")
            .unwrap()
            .await
            .unwrap();
        (endpoint, conn)
    }

    /// Signals shutdown and waits for the server to finish.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("server did not shut down")
            .unwrap();
    }
}

/// A client of a `quicpush serve` child process, authenticated with `token`.
pub async fn connect_to(
    server: &quicpush::bench::process::ServerProcess,
    via: Via,
    ca: &std::path::Path,
    token: String,
) -> PushClient {
    let mut c = match via {
        Via::Tcp => PushClient::connect_tcp(server.client_tcp).await.unwrap(),
        Via::Quic => PushClient::connect_quic(server.client_quic, "localhost", ca)
            .await
            .unwrap(),
        other => panic!("child servers are reached over TCP or QUIC here, not {other:?}"),
    };
    c.auth(token).await.unwrap();
    c
}

/// Reads RPC replies from a raw backend stream until `want` arrived or the
/// stream ended (`true`); fails the test after [`WAIT`].
pub async fn read_replies(
    recv: &mut quinn::RecvStream,
    want: usize,
) -> (Vec<(u64, Response)>, bool) {
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        while let Some((id, len)) = codec::peek_prefix(&buf).unwrap() {
            let end = codec::PREFIX_LEN + len as usize;
            if buf.len() < end {
                break;
            }
            let msg = buf.split_to(end);
            replies.push((
                id,
                codec::decode_payload(&msg[codec::PREFIX_LEN..]).unwrap(),
            ));
        }
        if replies.len() >= want {
            return (replies, false);
        }
        match tokio::time::timeout_at(deadline, recv.read_buf(&mut buf)).await {
            Err(_) => panic!("no reply within {WAIT:?}; got {replies:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (replies, true),
            Ok(Ok(_)) => {}
        }
    }
}

/// The next frame, failing the test after a timeout.
pub async fn next(c: &mut PushClient) -> Frame {
    tokio::time::timeout(WAIT, c.next_frame())
        .await
        .expect("timed out waiting for a frame")
        .expect("read failed")
        .expect("connection closed")
}

/// The next pushed frame (ops the server pushes on behalf of backends).
pub async fn next_push(c: &mut PushClient) -> Frame {
    loop {
        let f = next(c).await;
        if f.op != op::HEARTBEAT_REPLY {
            return f;
        }
    }
}

/// The next push on a resume-capable connection (heartbeat replies skipped), with
/// its resume extension; `state` moves to it.
pub async fn next_resume_push(c: &mut PushClient, state: &mut ResumeState) -> (Frame, PushMeta) {
    loop {
        let (f, meta) = tokio::time::timeout(WAIT, c.next_frame_meta())
            .await
            .expect("timed out waiting for a push")
            .unwrap()
            .expect("connection closed");
        assert_ne!(
            f.op,
            op::DISCONNECT_REPLY,
            "the server closed the connection"
        );
        if f.op == op::HEARTBEAT_REPLY {
            continue;
        }
        let meta = meta.expect("a resume-capable connection gets the extension");
        state.observe(&meta);
        return (f, meta);
    }
}

/// Asserts that the server closes the connection (EOF or a reset), without having
/// sent anything but possibly a DisconnectReply.
pub async fn assert_closed(c: &mut PushClient) {
    loop {
        match tokio::time::timeout(WAIT, c.next_frame()).await {
            Err(_) => panic!("connection still open"),
            Ok(Ok(None)) | Ok(Err(_)) => return,
            Ok(Ok(Some(f))) if f.op == op::DISCONNECT_REPLY => continue,
            Ok(Ok(Some(f))) => panic!("expected the connection to close, got {f:?}"),
        }
    }
}

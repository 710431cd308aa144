//! Binding and running every listener, and shutting them down gracefully.
//!
//! [`Server::bind`] prepares everything that can fail (certificates, token secret,
//! sockets) and returns with the sockets bound, so callers (and tests, binding
//! port 0) can read the addresses before anything runs. [`Server::run`] serves until
//! the shutdown future resolves, then:
//! 1. stops every accept loop;
//! 2. closes every client channel: each writer drains its queue, sends
//!    DisconnectReply and finishes its stream; cancels the paced broadcasts and
//!    waits for their tasks to end, at most `shutdown.grace`;
//! 3. waits for the sessions, at most `shutdown.grace`;
//! 4. closes the QUIC endpoints with code 1 and waits for them to go idle, at most
//!    `shutdown.grace` again.
//!
//! With `cluster.redis` set, `bind` joins the tier without waiting for Redis: a
//! Redis that is down at start is logged and retried (the node serves its own
//! clients meanwhile); only a URL the client cannot parse fails `bind`. `run`
//! starts the node, directory and bus tasks, and at shutdown, before step 2, the
//! node leaves the tier: it deletes its record and directory entries (best effort,
//! what remains expires within `cluster.ttl`).
//!
//! The HTTP listener stops accepting in step 1 and answers the requests in flight
//! by step 3, waited for with the backend RPC streams.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::{Authenticator, SecretError};
use crate::certs::{self, CertError};
use crate::channel::CloseReason;
use crate::cluster::Cluster;
use crate::config::{AuthMode, Config};
use crate::history::History;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::rpc::broadcast::Broadcaster;
use crate::rpc::dispatch::{Dispatcher, RpcLimits};
use crate::session::{SessionContext, SessionLimits};
use crate::shutdown::Shutdown;
use crate::tls::{self, TlsError};
use crate::transport;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Generating missing certificates failed.
    #[error("certificates: {0}")]
    Certs(#[from] CertError),
    /// Certificates or keys could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// The token secret could not be loaded.
    #[error("auth: {0}")]
    Secret(#[from] SecretError),
    /// `cluster.redis` is not a usable Redis URL. (A Redis that is down is no
    /// error: the node starts, logs, and retries.)
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A TCP listener whose accepted sockets inherit a send buffer of `send_buffer`
/// bytes (0: the kernel's default and autotuning), with a backlog of 4,096. The
/// bench's raw floor binds its listener here too, so both have the same sockets.
pub fn bind_tcp(addr: SocketAddr, send_buffer: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if send_buffer > 0 {
        socket.set_send_buffer_size(send_buffer)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// A server with every socket bound, ready to [`run`](Server::run).
pub struct Server {
    config: Config,
    tcp: Vec<TcpListener>,
    tls: Vec<TcpListener>,
    ws: Vec<TcpListener>,
    wss: Vec<TcpListener>,
    /// TLS for `tls` (no ALPN) and `wss` (http/1.1), when either is bound.
    tcp_tls: Option<(tokio_rustls::TlsAcceptor, tokio_rustls::TlsAcceptor)>,
    quic: Vec<quinn::Endpoint>,
    rpc: Vec<quinn::Endpoint>,
    http: Vec<TcpListener>,
    /// The HTTP API's bearer token, unless none is required.
    api_token: Option<String>,
    registry: Arc<Registry>,
    auth: Authenticator,
    limits: transport::ConnLimits,
    metrics: Arc<Metrics>,
    cluster: Option<Arc<Cluster>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("tcp", &self.tcp_addrs())
            .field("tls", &self.tls_addrs())
            .field("ws", &self.ws_addrs())
            .field("wss", &self.wss_addrs())
            .field("quic", &self.quic_addrs())
            .field("rpc", &self.rpc_addrs())
            .field("http", &self.http_addrs())
            .finish()
    }
}

fn bind_err(what: &'static str, addr: SocketAddr) -> impl FnOnce(std::io::Error) -> ServerError {
    move |source| ServerError::Bind { what, addr, source }
}

/// Receive buffer asked for on each QUIC socket. The kernel's default (about
/// 200 KiB) overflows when many clients send at once: with 1,000 QUIC clients the
/// client socket dropped thousands of datagrams a minute, among them connection
/// closes, so a client that left stayed registered until a retransmission got an
/// answer. The kernel grants at most `net.core.rmem_max`.
const QUIC_RECV_BUFFER: usize = 4 << 20;

/// A QUIC server endpoint on `addr`, with a larger receive buffer than the default
/// (the bench's raw floor uses it too).
pub fn quic_endpoint(
    config: quinn::ServerConfig,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if let Err(e) = socket.set_recv_buffer_size(QUIC_RECV_BUFFER) {
        warn!(%addr, error = %e, "cannot enlarge the QUIC receive buffer");
    }
    socket.bind(&addr.into())?;
    debug!(%addr, bytes = socket.recv_buffer_size().unwrap_or(0), "QUIC receive buffer");
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.cid_generator(|| Box::new(crate::transport::quic::CidGenerator::new()));
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
}

impl Server {
    /// Generates certificates if the directory has none (and the config allows),
    /// loads them and the token secret, and binds every listener.
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let dir = config.tls.dir.clone();
        if config.tls.generate_if_missing && certs::ensure(&dir, &[])? {
            info!(dir = %dir.display(), "no certificates found: generated a CA, server and backend certificates and a token secret");
        }
        let auth = Authenticator::from_mode(config.auth.mode, &config.auth.secret_file)?;
        let client_tls = tls::client_server_config(&dir, &config.quic)?;
        let rpc_tls = tls::rpc_server_config(&dir, &config.rpc)?;

        let mut tcp = Vec::new();
        for &addr in &config.client.tcp_bind {
            tcp.push(
                bind_tcp(addr, config.client.tcp_send_buffer)
                    .map_err(bind_err("client TCP", addr))?,
            );
        }
        let bind_all = |addrs: &[SocketAddr], what: &'static str| {
            addrs
                .iter()
                .map(|&addr| {
                    bind_tcp(addr, config.client.tcp_send_buffer).map_err(bind_err(what, addr))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let tls = bind_all(&config.client.tls_bind, "client TLS")?;
        let ws = bind_all(&config.client.ws_bind, "client WebSocket")?;
        let wss = bind_all(&config.client.wss_bind, "client WebSocket over TLS")?;
        let tcp_tls = if tls.is_empty() && wss.is_empty() {
            None
        } else {
            Some((
                tokio_rustls::TlsAcceptor::from(tls::client_tcp_server_config(&dir, &[])?),
                tokio_rustls::TlsAcceptor::from(tls::client_tcp_server_config(
                    &dir,
                    &[tls::WSS_ALPN],
                )?),
            ))
        };
        if config.client.ws_allowed_origins.is_empty() {
            let public: Vec<_> = config
                .client
                .ws_bind
                .iter()
                .chain(&config.client.wss_bind)
                .filter(|a| !a.ip().is_loopback())
                .collect();
            if !public.is_empty() {
                warn!(addrs = ?public, "WebSocket listeners off loopback accept any Origin: set client.ws_allowed_origins to the pages that may connect");
            }
        }
        let mut quic = Vec::new();
        for &addr in &config.client.quic_bind {
            quic.push(
                quic_endpoint(client_tls.clone(), addr).map_err(bind_err("client QUIC", addr))?,
            );
        }
        let mut rpc = Vec::new();
        for &addr in &config.rpc.bind {
            rpc.push(quic_endpoint(rpc_tls.clone(), addr).map_err(bind_err("backend RPC", addr))?);
        }
        let mut http = Vec::new();
        for &addr in &config.http.bind {
            http.push(bind_tcp(addr, 0).map_err(bind_err("HTTP API", addr))?);
        }
        let api_token = if !http.is_empty() && config.http.require_token {
            let path = &config.http.api_token_file;
            if config.tls.generate_if_missing && certs::ensure_api_token(path)? {
                info!(path = %path.display(), "no HTTP API token found: generated one");
            }
            Some(certs::load_api_token(path)?)
        } else {
            None
        };
        if config.auth.mode == AuthMode::Open {
            let public: Vec<_> = config
                .client
                .tcp_bind
                .iter()
                .chain(&config.client.quic_bind)
                .chain(&config.client.tls_bind)
                .chain(&config.client.ws_bind)
                .chain(&config.client.wss_bind)
                .filter(|a| !a.ip().is_loopback())
                .collect();
            if !public.is_empty() {
                warn!(addrs = ?public, "auth.mode = \"open\" accepts unverified tokens on non-loopback addresses");
            }
        }
        let registry = Arc::new(Registry::with_history(
            config.registry.buckets,
            config.registry.max_rooms,
            History::from_config(&config.history),
        ));
        let limits = transport::ConnLimits::new(
            config.client.max_connections,
            config.client.max_connections_per_ip,
        );
        let metrics = Arc::new(Metrics::from_enabled(config.metrics.enabled));
        let first = |v: Vec<SocketAddr>| v.first().map(|a| a.to_string()).unwrap_or_default();
        let cluster = match &config.cluster.redis {
            Some(url) => {
                let client_addr = tcp
                    .iter()
                    .chain(&ws)
                    .chain(&tls)
                    .chain(&wss)
                    .filter_map(|l| l.local_addr().ok())
                    .chain(quic.iter().filter_map(|e| e.local_addr().ok()))
                    .collect();
                let rpc_addr = rpc.iter().filter_map(|e| e.local_addr().ok()).collect();
                let c = Cluster::new(
                    &config.cluster,
                    &config.history,
                    url,
                    registry.clone(),
                    first(client_addr),
                    first(rpc_addr),
                )?;
                info!(node = %c.id, ttl = ?config.cluster.ttl, "joining the tier on Redis");
                Some(c)
            }
            None => None,
        };
        Ok(Server {
            config,
            tcp,
            tls,
            ws,
            wss,
            tcp_tls,
            quic,
            rpc,
            http,
            api_token,
            registry,
            auth,
            limits,
            metrics,
            cluster,
        })
    }

    /// This node's part in the tier, when `cluster.redis` is set.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cluster.clone()
    }

    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The addresses of the goim-over-TLS listeners (`client.tls_bind`).
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.tls
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The addresses of the WebSocket listeners (`client.ws_bind`).
    pub fn ws_addrs(&self) -> Vec<SocketAddr> {
        self.ws.iter().filter_map(|l| l.local_addr().ok()).collect()
    }

    /// The addresses of the WebSocket-over-TLS listeners (`client.wss_bind`).
    pub fn wss_addrs(&self) -> Vec<SocketAddr> {
        self.wss
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    pub fn quic_addrs(&self) -> Vec<SocketAddr> {
        self.quic
            .iter()
            .filter_map(|e| e.local_addr().ok())
            .collect()
    }

    pub fn rpc_addrs(&self) -> Vec<SocketAddr> {
        self.rpc
            .iter()
            .filter_map(|e| e.local_addr().ok())
            .collect()
    }

    /// The HTTP API's addresses (goim-logic's routes and `/metrics`).
    pub fn http_addrs(&self) -> Vec<SocketAddr> {
        self.http
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The server's metrics, for inspection.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The registry, for inspection.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// The client connection limits and their counts, for inspection.
    pub fn conn_limits(&self) -> transport::ConnLimits {
        self.limits.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            config,
            tcp,
            tls,
            ws,
            wss,
            tcp_tls,
            quic,
            rpc,
            http,
            api_token,
            registry,
            auth,
            limits,
            metrics,
            cluster,
        } = self;
        let stop = Shutdown::new();
        let c = &config.client;
        let ctx = Arc::new(SessionContext {
            registry: registry.clone(),
            auth,
            limits: SessionLimits {
                max_body: c.max_body,
                handshake_timeout: c.handshake_timeout,
                heartbeat_timeout: c.heartbeat_timeout,
                write_timeout: c.write_timeout,
                queue_size: c.queue_size,
                queue_bytes: c.queue_bytes,
                slow_consumer_timeout: c.slow_consumer_timeout,
                max_frames_per_sec: c.max_frames_per_sec,
                write_coalesce: c.write_coalesce,
            },
            shutdown: stop.clone(),
            metrics: metrics.clone(),
            shared_keys: cluster.clone().filter(|c| c.shares_key_history()),
        });
        let workers = config.runtime.workers();
        let broadcaster = Broadcaster::start(
            registry.clone(),
            workers,
            config.rpc.paced_max_duration,
            stop.clone(),
        );
        let dispatcher = Arc::new(Dispatcher {
            registry: registry.clone(),
            broadcaster: broadcaster.clone(),
            limits: RpcLimits {
                max_body: c.max_body,
                max_keys: config.rpc.max_keys,
            },
            metrics: metrics.clone(),
            cluster: cluster.clone(),
        });
        if let Some(c) = &cluster {
            c.spawn((*dispatcher).clone());
        }

        let sessions = TaskTracker::new();
        let backends = TaskTracker::new();
        // Backend calls are answered until the clients have drained.
        let rpc_drain = Shutdown::new();
        for l in tcp {
            if let Ok(addr) = l.local_addr() {
                info!(%addr, "client TCP listening");
            }
            sessions.spawn(transport::tcp::serve(
                l,
                ctx.clone(),
                limits.clone(),
                sessions.clone(),
            ));
        }
        let ws_opts = transport::ws::WsOptions::new(&c.ws_allowed_origins, c.max_body);
        if let Some((tls_acceptor, wss_acceptor)) = &tcp_tls {
            for l in tls {
                if let Ok(addr) = l.local_addr() {
                    info!(%addr, "client TLS listening");
                }
                sessions.spawn(transport::tls::serve(
                    l,
                    ctx.clone(),
                    limits.clone(),
                    sessions.clone(),
                    tls_acceptor.clone(),
                ));
            }
            for l in wss {
                if let Ok(addr) = l.local_addr() {
                    info!(%addr, path = transport::ws::PATH, "client WebSocket over TLS listening");
                }
                sessions.spawn(transport::ws::serve(
                    l,
                    ctx.clone(),
                    limits.clone(),
                    sessions.clone(),
                    ws_opts.clone(),
                    Some(wss_acceptor.clone()),
                ));
            }
        }
        for l in ws {
            if let Ok(addr) = l.local_addr() {
                info!(%addr, path = transport::ws::PATH, "client WebSocket listening");
            }
            sessions.spawn(transport::ws::serve(
                l,
                ctx.clone(),
                limits.clone(),
                sessions.clone(),
                ws_opts.clone(),
                None,
            ));
        }
        let unvalidated = Arc::new(transport::quic::Unvalidated::new(
            config.quic.retry_threshold,
        ));
        for e in &quic {
            if let Ok(addr) = e.local_addr() {
                info!(%addr, alpn = "quicpush/1", "client QUIC listening");
            }
            sessions.spawn(transport::quic::serve(
                e.clone(),
                ctx.clone(),
                limits.clone(),
                unvalidated.clone(),
                sessions.clone(),
            ));
        }
        for e in &rpc {
            if let Ok(addr) = e.local_addr() {
                info!(%addr, alpn = %String::from_utf8_lossy(tls::RPC_ALPN), "backend RPC listening (mutual TLS)");
            }
            backends.spawn(crate::rpc::server::serve(
                e.clone(),
                dispatcher.clone(),
                config.rpc.max_request_bytes,
                backends.clone(),
                stop.clone(),
                rpc_drain.clone(),
            ));
        }
        if !http.is_empty() {
            let h = &config.http;
            let state = Arc::new(crate::http::HttpState {
                dispatcher: dispatcher.clone(),
                conn_limits: limits.clone(),
                token: api_token,
                max_body: h.max_body_bytes,
                max_query: h.max_query_bytes,
                timeout: h.timeout,
            });
            for l in http {
                if let Ok(addr) = l.local_addr() {
                    info!(%addr, token = state.token.is_some(), "HTTP API listening");
                }
                backends.spawn(crate::http::serve(
                    l,
                    state.clone(),
                    h.max_connections,
                    stop.clone(),
                ));
            }
        }
        drop(dispatcher);
        if let Some(h) = registry.history().cloned() {
            sessions.spawn(expire_history(h, config.history.ttl, stop.clone()));
        }

        shutdown.await;
        let grace = config.shutdown.grace;
        info!(
            ?grace,
            "shutting down: no new connections; draining clients"
        );
        stop.cancel();
        if let Some(c) = &cluster {
            c.leave().await;
        }
        let closing = registry.close_all(CloseReason::Shutdown);
        // Paced broadcasts were cancelled with `stop`: their recipients are closing.
        if tokio::time::timeout(grace, broadcaster.paced_stopped())
            .await
            .is_err()
        {
            warn!(
                remaining = broadcaster.paced_running(),
                "grace period over: some paced broadcasts did not stop"
            );
        }
        drop(broadcaster);
        sessions.close();
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            warn!(
                remaining = sessions.len(),
                "grace period over: some client sessions did not drain"
            );
        }
        info!(
            clients = closing,
            "clients disconnected; answering the backend calls already read"
        );
        rpc_drain.cancel();
        backends.close();
        if tokio::time::timeout(grace, backends.wait()).await.is_err() {
            warn!(
                remaining = backends.len(),
                "grace period over: some backend streams did not finish"
            );
        }
        info!("closing QUIC endpoints");
        let code = transport::quic::code::SHUTDOWN.into();
        for e in quic.iter().chain(&rpc) {
            e.close(code, b"server shutting down");
        }
        let idle = async {
            for e in quic.iter().chain(&rpc) {
                e.wait_idle().await;
            }
        };
        if tokio::time::timeout(grace, idle).await.is_err() {
            warn!("grace period over: QUIC endpoints not idle");
        }
        info!("shutdown complete");
    }
}

/// Drops history streams unused for `ttl`, checking every eighth of it (at least
/// every second, at most every minute), until shutdown.
async fn expire_history(history: Arc<History>, ttl: std::time::Duration, stop: Shutdown) {
    let every = (ttl / 8).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let dropped = history.store().expire(std::time::Instant::now());
        if dropped > 0 {
            debug!(dropped, "history streams expired");
        }
    }
}

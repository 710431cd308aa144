//! Helpers for tests against a `quicpush serve` child process: a backend
//! connection to it, and waiting for a condition or a connection count.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use quicpush::rpc::Client;
use quicpush::tls::BackendIdentity;

use super::WAIT;

/// Calls `f` every 50 ms until it returns true (then true) or `limit` has passed
/// (then false).
pub async fn poll_until<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A backend connection to the RPC port `addr`, with the backend identity in `dir`.
pub async fn connect_backend(addr: SocketAddr, dir: &Path) -> Client {
    Client::connect(addr, "localhost", &BackendIdentity::from_dir(dir))
        .await
        .expect("backend connects")
}

/// Waits until the server counts `n` client connections.
pub async fn wait_online(backend: &Client, n: u64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let online = backend.online().await.unwrap();
        if online.total == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {online:?} online, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A `quicpush serve` child process with its own certificates and token secret.
pub struct ChildServer {
    pub server: quicpush::bench::process::ServerProcess,
    pub dir: tempfile::TempDir,
    secret: Vec<u8>,
}

impl ChildServer {
    /// Starts the binary under test on loopback ports with `tweak`'s changes to
    /// the loopback configuration.
    pub fn start(tweak: impl FnOnce(&mut quicpush::Config)) -> ChildServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = quicpush::Config::loopback(dir.path());
        tweak(&mut config);
        let server = quicpush::bench::process::ServerProcess::quicpush_with(
            Path::new(env!("CARGO_BIN_EXE_quicpush")),
            dir.path(),
            &config,
        )
        .unwrap();
        let secret = quicpush::auth::load_secret(&dir.path().join("token.secret")).unwrap();
        ChildServer {
            server,
            dir,
            secret,
        }
    }

    /// A token for `key`, in `room` if given.
    pub fn token(&self, key: &str, room: Option<&str>) -> String {
        let mut claims = quicpush::auth::claims_for(key, Duration::from_secs(3600));
        claims.room_id = room.map(str::to_owned);
        quicpush::auth::issue(&self.secret, &claims).unwrap()
    }

    /// The CA certificate QUIC clients verify the server with.
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A backend connection to the child's RPC port.
    pub async fn backend(&self) -> Client {
        connect_backend(self.server.control, self.dir.path()).await
    }
}

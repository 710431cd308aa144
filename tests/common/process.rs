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

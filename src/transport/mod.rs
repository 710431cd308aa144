//! Transports only adapt sockets: each accept loop turns a connection into a reader
//! and a writer and hands them to [`crate::session::run`].
//!
//! Every connection gets one tracing span (`conn`, with transport, remote address
//! and, after Auth, the key) and a permit from the shared connection limit: a
//! connection over TCP (plain, [`tls`], [`ws`] and wss) before it is accepted, a
//! QUIC connection once its address is validated (see [`quic`]). Transport labels:
//! `tcp`, `tls`, `ws`, `wss`, `quic`.
//!
//! Refusals are logged at warn, at most once a second per reason, with the number
//! of refusals left out since the last line (`refused`): a flood of refused
//! connections costs a line a second, not a line each.

pub mod quic;
pub mod tcp;
pub mod tls;
pub mod ws;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::channel::CloseReason;
use crate::metrics::Metrics;
use crate::session::{SessionEnd, SessionError, WriteError};

/// Connection limits shared by every client transport: in total, and per source IP.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub total: Arc<Semaphore>,
    pub per_ip: Arc<IpLimiter>,
}

impl ConnLimits {
    pub fn new(total: usize, per_ip: usize) -> Self {
        ConnLimits {
            total: Arc::new(Semaphore::new(total)),
            per_ip: Arc::new(IpLimiter::new(per_ip)),
        }
    }
}

/// Counts connections per source IP address.
#[derive(Debug)]
pub struct IpLimiter {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in the per-IP count, given back on drop.
#[derive(Debug)]
pub struct IpPermit {
    limiter: Arc<IpLimiter>,
    ip: IpAddr,
}

impl IpLimiter {
    pub fn new(max: usize) -> Self {
        IpLimiter {
            max,
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one more connection from `ip`, unless it has `max` already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpPermit> {
        let mut counts = self.counts.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit {
            limiter: self.clone(),
            ip,
        })
    }

    /// Connections counted for `ip`.
    pub fn count(&self, ip: IpAddr) -> usize {
        self.counts.lock().get(&ip).copied().unwrap_or(0)
    }

    /// Whether `ip` has `max` connections already.
    pub fn is_full(&self, ip: IpAddr) -> bool {
        self.count(ip) >= self.max
    }

    /// Distinct source addresses with at least one connection counted
    /// (goim-logic's `ip_count`).
    pub fn distinct(&self) -> usize {
        self.counts.lock().len()
    }
}

impl IpPermit {
    /// The address this permit is counted for.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    /// Counts the connection for `ip` instead, unless `ip` has `max` connections
    /// already; then nothing changes and this returns false.
    pub fn move_to(&mut self, ip: IpAddr) -> bool {
        if ip == self.ip {
            return true;
        }
        let mut counts = self.limiter.counts.lock();
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.limiter.max {
            if *n == 0 {
                counts.remove(&ip);
            }
            return false;
        }
        *n += 1;
        if let Some(old) = counts.get_mut(&self.ip) {
            *old = old.saturating_sub(1);
            if *old == 0 {
                counts.remove(&self.ip);
            }
        }
        self.ip = ip;
        true
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts.lock();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What a connection holds while it lives.
#[derive(Debug)]
pub(crate) struct ConnPermits {
    _total: OwnedSemaphorePermit,
    ip: IpPermit,
}

impl ConnPermits {
    pub(crate) fn new(total: OwnedSemaphorePermit, ip: IpPermit) -> Self {
        ConnPermits { _total: total, ip }
    }
}

/// Why a client connection was turned away, for [`refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A QUIC handshake was refused: the connection limit is reached.
    QuicLimit,
    /// A QUIC handshake was refused: its address is at its per-IP limit.
    QuicPerIp,
    /// A QUIC handshake from an unvalidated address was answered with a Retry:
    /// `quic.retry_threshold` such handshakes are in progress. Logged at info.
    QuicRetry,
    /// A TCP connection was closed: its address is at its per-IP limit.
    TcpPerIp,
}

impl Refusal {
    const ALL: usize = 4;
}

/// At most one log line per [`LogThrottle::INTERVAL_MS`]; counts the lines it
/// held back. Lock-free: the accept loops call it for every refusal.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    /// When the next line may go out, in [`now_ms`] time.
    next_ms: AtomicU64,
    /// Lines held back since the last one that went out.
    suppressed: AtomicU64,
}

impl LogThrottle {
    pub(crate) const INTERVAL_MS: u64 = 1000;

    pub(crate) const fn new() -> Self {
        LogThrottle {
            next_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may go out at `now_ms`; if so, how many were held back
    /// since the last one.
    pub(crate) fn allow(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + Self::INTERVAL_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Milliseconds since the first call, for [`LogThrottle`].
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let ms = START.get_or_init(Instant::now).elapsed().as_millis();
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Logs a refusal of a connection from `remote`, at most once a second per
/// reason; `suppressed` counts the refusals for that reason not logged since.
pub(crate) fn refused(reason: Refusal, remote: SocketAddr) {
    static THROTTLES: [LogThrottle; Refusal::ALL] = [const { LogThrottle::new() }; Refusal::ALL];
    let Some(suppressed) = THROTTLES[reason as usize].allow(now_ms()) else {
        return;
    };
    match reason {
        Refusal::QuicLimit => {
            warn!(%remote, suppressed, "QUIC connection refused: connection limit reached")
        }
        Refusal::QuicPerIp => {
            warn!(%remote, suppressed, "QUIC connection refused: per-IP connection limit reached")
        }
        Refusal::QuicRetry => info!(
            %remote,
            suppressed,
            "QUIC handshakes from unvalidated addresses over quic.retry_threshold: validating with Retry"
        ),
        Refusal::TcpPerIp => {
            warn!(%remote, suppressed, "TCP connection refused: per-IP connection limit reached")
        }
    }
}

/// Logs how a session ended, in the connection's span, and counts it in the
/// server's metrics (every transport calls this once per session).
pub(crate) fn log_end(metrics: &Metrics, result: &Result<SessionEnd, SessionError>) {
    metrics.session_ended(result);
    match result {
        Ok(SessionEnd::ClientClosed) => debug!("connection closed by client"),
        Ok(SessionEnd::Unconfirmed) => {
            debug!("handshake never confirmed after a 0-RTT Auth: nothing registered")
        }
        Ok(SessionEnd::ServerClosed(reason @ CloseReason::SlowConsumer)) => {
            warn!(%reason, "connection closed by server")
        }
        Ok(SessionEnd::ServerClosed(reason)) => info!(%reason, "connection closed by server"),
        Err(e) if e.is_peer_close() => debug!("connection closed by client"),
        // The client hanging up or its network failing is no server problem, whether
        // the reader or the writer notices it first.
        Err(e @ (SessionError::Read(_) | SessionError::Write(WriteError::Io(_)))) => {
            info!(error = %e, "connection lost")
        }
        Err(e) => warn!(error = %e, "connection closed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_limit_counts_and_releases() {
        let l = Arc::new(IpLimiter::new(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        assert!(l.try_acquire(a).is_none(), "third from the same address");
        assert!(l.try_acquire(b).is_some(), "other addresses are unaffected");
        drop(p1);
        assert_eq!(l.count(a), 1);
        assert!(l.try_acquire(a).is_some());
    }

    #[test]
    fn the_log_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let t = LogThrottle::new();
        assert_eq!(t.allow(5), Some(0), "the first line goes out");
        assert_eq!(t.allow(6), None);
        assert_eq!(t.allow(1004), None);
        assert_eq!(
            t.allow(1005),
            Some(2),
            "a second later, with the two held back"
        );
        assert_eq!(t.allow(1006), None);
        assert_eq!(t.allow(60_000), Some(1));
        assert_eq!(t.allow(60_000), None);
    }

    #[test]
    fn is_full_at_the_limit() {
        let l = Arc::new(IpLimiter::new(1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(!l.is_full(a));
        let _p = l.try_acquire(a).unwrap();
        assert!(l.is_full(a));
        assert_eq!(l.distinct(), 1);
    }

    #[test]
    fn a_permit_moves_to_an_address_with_room() {
        let l = Arc::new(IpLimiter::new(1));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let c: IpAddr = "10.0.0.3".parse().unwrap();
        let mut p = l.try_acquire(a).unwrap();
        assert!(p.move_to(b));
        assert_eq!((p.ip(), l.count(a), l.count(b)), (b, 0, 1));
        let _on_a = l.try_acquire(a).unwrap();
        assert!(!p.move_to(a), "a is full");
        assert_eq!((p.ip(), l.count(a), l.count(b)), (b, 1, 1));
        assert!(p.move_to(c));
        drop(p);
        assert_eq!((l.count(b), l.count(c)), (0, 0));
    }
}

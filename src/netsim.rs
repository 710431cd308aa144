//! A lossy network inside the process, for tests and the benchmark.
//!
//! The kernel here has no `tc netem`, so the network is simulated in the UDP
//! socket a quinn endpoint reads and writes: [`SimSocket`] implements
//! [`quinn::AsyncUdpSocket`] over a real socket and, datagram by datagram, drops,
//! holds back, delays and rate-limits what passes through it, in both directions.
//! [`SimHandle`] changes the settings while the endpoint runs and moves the socket
//! to another network ([`SimHandle::switch_network`]): a new socket on a new port
//! (or another loopback address), everything in flight lost, and the endpoint none
//! the wiser. The peer simply sees packets from a new address, which is what a
//! phone changing from Wi-Fi to mobile data looks like.
//!
//! # What a datagram goes through
//!
//! Each datagram, sent or received, meets in order:
//! 1. **loss**: dropped with probability [`NetSim::loss`];
//! 2. **the queue**: dropped if the direction already holds [`NetSim::queue`]
//!    datagrams (delayed, held back or waiting for bandwidth);
//! 3. **bandwidth**: a token bucket of [`NetSim::bandwidth`] bytes/s with a burst
//!    of [`burst_bytes`]; a datagram waits for its tokens, and is dropped if it
//!    would wait longer than [`MAX_BANDWIDTH_WAIT`] (a router's tail drop);
//! 4. **delay**: half of [`NetSim::rtt`] (see below);
//! 5. **reordering**: with probability [`NetSim::reorder`] it is held back and
//!    released right behind the next datagram in the same direction, or after
//!    [`REORDER_HOLD`] more if none comes.
//!
//! Loss, reordering and bandwidth apply to each direction independently, so a
//! round trip loses about `1 - (1 - loss)²` of its exchanges.
//!
//! # Round-trip time
//!
//! The added [`NetSim::rtt`] is split in two: half delays each datagram sent, half
//! each datagram received. Wrapping one endpoint (normally the client) therefore
//! adds the whole `rtt` to every round trip; wrapping both adds it twice.
//!
//! # Reproducibility
//!
//! Every decision is drawn from a [`rand::rngs::StdRng`] seeded from
//! [`NetSim::seed`], one per direction, so the same sequence of datagrams meets
//! the same fate on every run. (Which datagrams a QUIC connection sends depends on
//! timing, so a whole connection is reproducible only as far as its timing is.)
//!
//! # Mechanics
//!
//! Sending never blocks the endpoint: a datagram that is due at once is sent
//! inline; a delayed one is queued with its deadline, and a Tokio task sends it
//! when due. Received datagrams are drained from the socket into a queue on every
//! poll and handed to the endpoint when due, a timer waking the endpoint for the
//! next one. Both queues are bounded. GSO and GRO are off through the wrapper (one
//! datagram per transmit and per receive), which keeps every datagram's fate its own.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::Mutex;
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// How long a datagram held back for reordering waits for a later one to overtake it.
pub const REORDER_HOLD: Duration = Duration::from_millis(10);
/// The longest a datagram waits for bandwidth before it is dropped instead.
pub const MAX_BANDWIDTH_WAIT: Duration = Duration::from_millis(100);
/// Datagrams read from the real socket in one poll at most, before yielding.
const RECV_DRAIN: usize = 64;
/// Room for one datagram read from the real socket (the largest UDP payload).
const RECV_BUF: usize = 65_536;
/// Mixed into the seed for the receiving direction, so it draws its own stream.
const RECV_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// How the simulated network treats datagrams. [`Default`] is a perfect network.
#[derive(Debug, Clone, PartialEq)]
pub struct NetSim {
    /// Seeds the random decisions; the same seed gives the same decisions.
    pub seed: u64,
    /// Probability that a datagram is dropped, 0 to 1, in each direction.
    pub loss: f64,
    /// Probability that a datagram is held back and released after the next one,
    /// 0 to 1, in each direction.
    pub reorder: f64,
    /// Added round-trip time: half on sending, half on receiving.
    pub rtt: Duration,
    /// Bytes per second each direction carries at most; `None` for no limit.
    pub bandwidth: Option<u64>,
    /// Datagrams each direction holds at most (delayed, held back or waiting for
    /// bandwidth); beyond that a datagram is dropped.
    pub queue: usize,
}

impl Default for NetSim {
    fn default() -> Self {
        NetSim {
            seed: 0,
            loss: 0.0,
            reorder: 0.0,
            rtt: Duration::ZERO,
            bandwidth: None,
            queue: 4096,
        }
    }
}

/// The token bucket's burst for `bandwidth` bytes/s: 10 ms worth, at least two
/// full-size datagrams.
pub fn burst_bytes(bandwidth: u64) -> u64 {
    (bandwidth / 100).max(3000)
}

/// What the simulated network did, counted over both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Datagrams handed to the real socket.
    pub sent: u64,
    /// Datagrams handed to the endpoint.
    pub received: u64,
    /// Datagrams dropped by [`NetSim::loss`].
    pub lost: u64,
    /// Datagrams held back by [`NetSim::reorder`].
    pub reordered: u64,
    /// Datagrams dropped because the queue was full or the bandwidth wait too long.
    pub overflowed: u64,
    /// Datagrams in flight (delayed or held back) dropped by a network switch.
    pub switch_dropped: u64,
    /// Network switches.
    pub switches: u64,
}

/// One datagram in flight.
#[derive(Debug)]
struct Datagram {
    /// When it leaves the simulated network.
    due: Instant,
    /// Destination when sending, source when receiving.
    peer: SocketAddr,
    ecn: Option<EcnCodepoint>,
    /// Local address it was received on (receiving only).
    dst_ip: Option<IpAddr>,
    data: Vec<u8>,
}

/// What happened to a datagram entering a [`Pipe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Queued,
    Held,
    Lost,
    Overflowed,
}

/// One direction of the simulated network.
#[derive(Debug)]
struct Pipe {
    rng: StdRng,
    /// Ordered by `due`; equal deadlines keep their arrival order.
    queue: VecDeque<Datagram>,
    /// A datagram held back for reordering; its `due` is its release by timeout.
    held: Option<Datagram>,
    /// When the link has finished the bytes accepted so far (bandwidth).
    free_at: Option<Instant>,
}

fn roll(rng: &mut StdRng, p: f64) -> bool {
    p > 0.0 && rng.gen::<f64>() < p
}

impl Pipe {
    fn new(seed: u64) -> Self {
        Pipe {
            rng: StdRng::seed_from_u64(seed),
            queue: VecDeque::new(),
            held: None,
            free_at: None,
        }
    }

    fn len(&self) -> usize {
        self.queue.len() + usize::from(self.held.is_some())
    }

    /// Takes `d` into the network at `now`, `delay` from its destination.
    fn admit(
        &mut self,
        sim: &NetSim,
        delay: Duration,
        now: Instant,
        mut d: Datagram,
        stats: &mut SimStats,
    ) -> Fate {
        if roll(&mut self.rng, sim.loss) {
            stats.lost += 1;
            return Fate::Lost;
        }
        if self.len() >= sim.queue {
            stats.overflowed += 1;
            return Fate::Overflowed;
        }
        let mut due = now + delay;
        if let Some(bw) = sim.bandwidth.filter(|&b| b > 0) {
            let per_byte = 1.0 / bw as f64;
            let burst = Duration::from_secs_f64(burst_bytes(bw) as f64 * per_byte);
            // Unused tokens accumulate up to the burst: the link's clock never lags
            // `now` by more than the burst's worth.
            let floor = now.checked_sub(burst).unwrap_or(now);
            let start = self.free_at.map_or(floor, |f| f.max(floor));
            let end = start + Duration::from_secs_f64(d.data.len() as f64 * per_byte);
            let wait = end.saturating_duration_since(now);
            if wait > MAX_BANDWIDTH_WAIT {
                stats.overflowed += 1;
                return Fate::Overflowed;
            }
            self.free_at = Some(end);
            due += wait;
        }
        d.due = due;
        if self.held.is_none() && roll(&mut self.rng, sim.reorder) {
            stats.reordered += 1;
            d.due = due + REORDER_HOLD;
            self.held = Some(d);
            return Fate::Held;
        }
        self.insert(d);
        // The held datagram follows the one that overtook it.
        if let Some(mut h) = self.held.take() {
            h.due = due;
            self.insert(h);
        }
        Fate::Queued
    }

    /// Inserts by deadline, after every datagram due at the same time or earlier.
    fn insert(&mut self, d: Datagram) {
        let at = self
            .queue
            .iter()
            .rposition(|q| q.due <= d.due)
            .map_or(0, |i| i + 1);
        self.queue.insert(at, d);
    }

    /// The first datagram due by `now`, left in place.
    fn peek_due(&mut self, now: Instant) -> Option<&Datagram> {
        if self.held.as_ref().is_some_and(|h| h.due <= now) {
            if let Some(h) = self.held.take() {
                self.insert(h);
            }
        }
        self.queue.front().filter(|d| d.due <= now)
    }

    /// Takes the first datagram due by `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Datagram> {
        self.peek_due(now)?;
        self.queue.pop_front()
    }

    /// When the next datagram is due.
    fn next_due(&self) -> Option<Instant> {
        let q = self.queue.front().map(|d| d.due);
        let h = self.held.as_ref().map(|d| d.due);
        match (q, h) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops everything in flight; returns how many datagrams that was.
    fn clear(&mut self) -> u64 {
        let n = self.len() as u64;
        self.queue.clear();
        self.held = None;
        self.free_at = None;
        n
    }
}

/// What the sender should wait for.
enum Flush {
    /// Nothing is due before this (or nothing is queued).
    Idle(Option<Instant>),
    /// The real socket is full: wait until it is writable.
    Blocked(Arc<dyn AsyncUdpSocket>),
}

struct State {
    sim: NetSim,
    inner: Arc<dyn AsyncUdpSocket>,
    send: Pipe,
    recv: Pipe,
    stats: SimStats,
    /// The endpoint task waiting in `poll_recv`, woken when the socket is replaced.
    recv_waker: Option<Waker>,
    /// Wakes the endpoint when the next received datagram is due.
    recv_timer: Option<Pin<Box<Sleep>>>,
    recv_buf: Vec<u8>,
    closed: bool,
}

impl State {
    fn half_rtt(&self) -> Duration {
        self.sim.rtt / 2
    }

    /// Sends every datagram due by `now`.
    fn flush_send(&mut self, now: Instant) -> Flush {
        loop {
            let Some(d) = self.send.peek_due(now) else {
                return Flush::Idle(self.send.next_due());
            };
            let transmit = Transmit {
                destination: d.peer,
                ecn: d.ecn,
                contents: &d.data,
                segment_size: None,
                src_ip: None,
            };
            match self.inner.try_send(&transmit) {
                Ok(()) => self.stats.sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Flush::Blocked(self.inner.clone());
                }
                // The datagram is lost, as a real network would lose it.
                Err(e) => debug!(error = %e, "simulated network: send failed"),
            }
            self.send.queue.pop_front();
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the sender task: a datagram was queued, the socket replaced or closed.
    wake_sender: Notify,
}

impl Shared {
    fn wake_sender(&self) {
        self.wake_sender.notify_one();
    }
}

/// A UDP socket that passes datagrams through a simulated network; see the
/// [module docs](self).
pub struct SimSocket {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.state.lock();
        f.debug_struct("SimSocket")
            .field("local", &st.inner.local_addr().ok())
            .field("sim", &st.sim)
            .field("stats", &st.stats)
            .finish()
    }
}

/// Changes a [`SimSocket`]'s network while its endpoint runs. Clones control the
/// same socket.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle").finish_non_exhaustive()
    }
}

fn wrap(socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    socket.set_nonblocking(true)?;
    quinn::TokioRuntime.wrap_udp_socket(socket)
}

impl SimSocket {
    /// Wraps `socket`. Must be called within a Tokio runtime: a task sends the
    /// delayed datagrams.
    pub fn new(socket: std::net::UdpSocket, sim: NetSim) -> io::Result<SimSocket> {
        let inner = wrap(socket)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                send: Pipe::new(sim.seed),
                recv: Pipe::new(sim.seed ^ RECV_SEED),
                sim,
                inner,
                stats: SimStats::default(),
                recv_waker: None,
                recv_timer: None,
                recv_buf: vec![0; RECV_BUF],
                closed: false,
            }),
            wake_sender: Notify::new(),
        });
        tokio::spawn(run_sender(shared.clone()));
        Ok(SimSocket { shared })
    }

    /// A handle to change this socket's network.
    pub fn handle(&self) -> SimHandle {
        SimHandle {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        self.shared.state.lock().closed = true;
        self.shared.wake_sender();
    }
}

/// Sends queued datagrams as they fall due, until the socket is dropped.
async fn run_sender(shared: Arc<Shared>) {
    loop {
        let flush = {
            let mut st = shared.state.lock();
            if st.closed {
                return;
            }
            st.flush_send(Instant::now())
        };
        match flush {
            Flush::Idle(None) => shared.wake_sender.notified().await,
            Flush::Idle(Some(due)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = shared.wake_sender.notified() => {}
                }
            }
            Flush::Blocked(inner) => {
                let mut poller = inner.create_io_poller();
                tokio::select! {
                    r = poll_fn(|cx| poller.as_mut().poll_writable(cx)) => {
                        if let Err(e) = r {
                            debug!(error = %e, "simulated network: socket not writable");
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    _ = shared.wake_sender.notified() => {}
                }
            }
        }
    }
}

/// Never waits: [`SimSocket::try_send`] never reports `WouldBlock`, it queues.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for SimSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let now = Instant::now();
        let mut st = self.shared.state.lock();
        let st = &mut *st;
        let delay = st.half_rtt();
        let size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for chunk in transmit.contents.chunks(size) {
            let d = Datagram {
                due: now,
                peer: transmit.destination,
                ecn: transmit.ecn,
                dst_ip: None,
                data: chunk.to_vec(),
            };
            st.send.admit(&st.sim, delay, now, d, &mut st.stats);
        }
        if st.send.len() > 0 && !matches!(st.flush_send(now), Flush::Idle(None)) {
            self.shared.wake_sender();
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let now = Instant::now();
        let mut guard = self.shared.state.lock();
        let st = &mut *guard;
        if !st
            .recv_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            st.recv_waker = Some(cx.waker().clone());
        }
        let delay = st.half_rtt();
        // Drain the real socket, stamping each datagram with its arrival.
        let mut drained = false;
        for _ in 0..RECV_DRAIN {
            let mut m = [RecvMeta::default()];
            let mut b = [IoSliceMut::new(&mut st.recv_buf)];
            match st.inner.poll_recv(cx, &mut b, &mut m) {
                Poll::Ready(Ok(n)) => {
                    for m in &m[..n.min(1)] {
                        let len = m.len.min(st.recv_buf.len());
                        let stride = if m.stride == 0 { len } else { m.stride };
                        for chunk in st.recv_buf[..len].chunks(stride.max(1)) {
                            let d = Datagram {
                                due: now,
                                peer: m.addr,
                                ecn: m.ecn,
                                dst_ip: m.dst_ip,
                                data: chunk.to_vec(),
                            };
                            st.recv.admit(&st.sim, delay, now, d, &mut st.stats);
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    drained = true;
                    break;
                }
            }
        }
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some(d) = st.recv.pop_due(now) else { break };
            let len = d.data.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&d.data[..len]);
            meta[n] = RecvMeta {
                addr: d.peer,
                len,
                stride: len,
                ecn: d.ecn,
                dst_ip: d.dst_ip,
            };
            n += 1;
        }
        if n > 0 {
            st.stats.received += n as u64;
            return Poll::Ready(Ok(n));
        }
        if let Some(due) = st.recv.next_due() {
            let timer = st
                .recv_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            timer.as_mut().reset(due);
            if timer.as_mut().poll(cx).is_ready() {
                drained = false;
            }
        }
        if !drained {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.state.lock().inner.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.shared.state.lock().inner.may_fragment()
    }
}

impl SimHandle {
    /// The current settings.
    pub fn sim(&self) -> NetSim {
        self.shared.state.lock().sim.clone()
    }

    /// Replaces the settings for every datagram from now on. The random streams
    /// go on: [`NetSim::seed`] is read only when the socket is created.
    pub fn set(&self, sim: NetSim) {
        self.shared.state.lock().sim = sim;
        self.shared.wake_sender();
    }

    /// Changes some settings in place.
    pub fn update(&self, f: impl FnOnce(&mut NetSim)) {
        f(&mut self.shared.state.lock().sim);
        self.shared.wake_sender();
    }

    /// What the network did so far.
    pub fn stats(&self) -> SimStats {
        self.shared.state.lock().stats
    }

    /// The real socket's current address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.state.lock().inner.local_addr()
    }

    /// Moves to a new network on the same IP address: a new socket on a new port;
    /// returns its address. See [`SimHandle::switch_network_to`].
    pub fn switch_network(&self) -> io::Result<SocketAddr> {
        let ip = self.local_addr()?.ip();
        self.switch_network_to(ip)
    }

    /// Moves to a new network: binds a new socket on `ip` (port chosen by the
    /// system), puts it in place of the current one and drops every datagram in
    /// flight, both ways. The endpoint is not told; its peers see packets from the
    /// new address, starting with the next one the endpoint sends (an
    /// acknowledgement, a keep-alive, data): until then they keep sending to the
    /// old address, and that is lost. Must be called within a Tokio runtime.
    pub fn switch_network_to(&self, ip: IpAddr) -> io::Result<SocketAddr> {
        let socket = wrap(std::net::UdpSocket::bind((ip, 0))?)?;
        let local = socket.local_addr()?;
        let (old, waker) = {
            let mut guard = self.shared.state.lock();
            let st = &mut *guard;
            let dropped = st.send.clear() + st.recv.clear();
            st.stats.switch_dropped += dropped;
            st.stats.switches += 1;
            st.recv_timer = None;
            let old = std::mem::replace(&mut st.inner, socket);
            (old, st.recv_waker.take())
        };
        drop(old);
        // The endpoint waits on the old socket's readiness: make it poll the new one.
        if let Some(w) = waker {
            w.wake();
        }
        self.shared.wake_sender();
        debug!(%local, "simulated network: switched");
        Ok(local)
    }
}

/// A client endpoint on `bind` whose socket is a [`SimSocket`] with `sim`, and the
/// handle to its network. Must be called within a Tokio runtime.
pub fn sim_client_endpoint(
    bind: SocketAddr,
    sim: NetSim,
) -> io::Result<(quinn::Endpoint, SimHandle)> {
    let socket = SimSocket::new(std::net::UdpSocket::bind(bind)?, sim)?;
    let handle = socket.handle();
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(socket),
        Arc::new(quinn::TokioRuntime),
    )?;
    Ok((endpoint, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1)), 9);

    fn dgram(len: usize) -> Datagram {
        Datagram {
            due: Instant::now(),
            peer: PEER,
            ecn: None,
            dst_ip: None,
            data: vec![0; len],
        }
    }

    fn fates(sim: &NetSim, n: usize) -> (Vec<Fate>, SimStats) {
        let mut pipe = Pipe::new(sim.seed);
        let mut stats = SimStats::default();
        let now = Instant::now();
        let fates = (0..n)
            .map(|_| {
                let f = pipe.admit(sim, Duration::ZERO, now, dgram(100), &mut stats);
                while pipe.pop_due(now + REORDER_HOLD).is_some() {}
                f
            })
            .collect();
        (fates, stats)
    }

    #[test]
    fn seeded_loss_drops_about_the_right_fraction_reproducibly() {
        let sim = NetSim {
            seed: 42,
            loss: 0.1,
            ..NetSim::default()
        };
        let (a, stats) = fates(&sim, 10_000);
        assert!(
            (800..=1200).contains(&stats.lost),
            "lost {} of 10000 at 10%",
            stats.lost
        );
        let (b, _) = fates(&sim, 10_000);
        assert_eq!(a, b, "the same seed drops the same datagrams");
        let (c, _) = fates(&NetSim { seed: 43, ..sim }, 10_000);
        assert_ne!(a, c, "another seed drops others");
    }

    #[test]
    fn a_held_datagram_follows_the_next_one() {
        let sim = NetSim {
            reorder: 1.0,
            ..NetSim::default()
        };
        let mut pipe = Pipe::new(1);
        let mut stats = SimStats::default();
        let now = Instant::now();
        for len in [1, 2, 3] {
            pipe.admit(&sim, Duration::ZERO, now, dgram(len), &mut stats);
        }
        // 1 is held, 2 overtakes it, 3 is held and released by timeout.
        let order: Vec<usize> = std::iter::from_fn(|| pipe.pop_due(now))
            .map(|d| d.data.len())
            .collect();
        assert_eq!(order, [2, 1]);
        assert_eq!(pipe.next_due(), Some(now + REORDER_HOLD));
        assert!(pipe
            .pop_due(now + REORDER_HOLD)
            .is_some_and(|d| d.data.len() == 3));
        assert_eq!(stats.reordered, 2);
    }

    #[test]
    fn bandwidth_spaces_datagrams_and_drops_beyond_the_wait() {
        // 100 kB/s: a 1,000-byte datagram takes 10 ms; the burst is 3,000 bytes.
        let sim = NetSim {
            bandwidth: Some(100_000),
            ..NetSim::default()
        };
        let mut pipe = Pipe::new(1);
        let mut stats = SimStats::default();
        let now = Instant::now();
        let fates: Vec<Fate> = (0..20)
            .map(|_| pipe.admit(&sim, Duration::ZERO, now, dgram(1000), &mut stats))
            .collect();
        let queued = fates.iter().filter(|f| **f == Fate::Queued).count();
        // The burst (30 ms) and 100 ms of waiting: about 13 datagrams.
        assert!((12..=14).contains(&queued), "{queued} queued: {fates:?}");
        assert_eq!(stats.overflowed, 20 - queued as u64);
        let dues: Vec<Duration> = pipe.queue.iter().map(|d| d.due - now).collect();
        assert_eq!(dues[0], Duration::ZERO, "within the burst");
        let gap = dues[queued - 1] - dues[queued - 2];
        assert!(
            gap.abs_diff(Duration::from_millis(10)) < Duration::from_micros(100),
            "{gap:?}"
        );
    }

    #[test]
    fn the_queue_is_bounded() {
        let sim = NetSim {
            rtt: Duration::from_secs(1),
            queue: 5,
            ..NetSim::default()
        };
        let mut pipe = Pipe::new(1);
        let mut stats = SimStats::default();
        let now = Instant::now();
        for _ in 0..8 {
            pipe.admit(&sim, sim.rtt / 2, now, dgram(10), &mut stats);
        }
        assert_eq!((pipe.len(), stats.overflowed), (5, 3));
    }

    fn localhost() -> SocketAddr {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0)
    }

    async fn recv_one(sim: &SimSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = vec![0u8; 2048];
        let mut meta = [RecvMeta::default()];
        let n = poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            sim.poll_recv(cx, &mut bufs, &mut meta)
        })
        .await
        .unwrap();
        assert_eq!(n, 1);
        (buf[..meta[0].len].to_vec(), meta[0].addr)
    }

    #[tokio::test]
    async fn delay_is_applied_half_each_way() {
        let rtt = Duration::from_millis(200);
        let sim = SimSocket::new(
            std::net::UdpSocket::bind(localhost()).unwrap(),
            NetSim {
                rtt,
                ..NetSim::default()
            },
        )
        .unwrap();
        let peer = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
        let peer_addr = peer.local_addr().unwrap();
        let start = std::time::Instant::now();
        sim.try_send(&Transmit {
            destination: peer_addr,
            ecn: None,
            contents: b"ping",
            segment_size: None,
            src_ip: None,
        })
        .unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).await.unwrap();
        let there = start.elapsed();
        assert_eq!(&buf[..n], b"ping");
        assert!(there >= rtt / 2, "sent after {there:?}");
        peer.send_to(b"pong", from).await.unwrap();
        let (body, src) = recv_one(&sim).await;
        let back = start.elapsed();
        assert_eq!((&body[..], src), (&b"pong"[..], peer_addr));
        assert!(back >= rtt, "round trip {back:?}");
        assert!(back < rtt * 3, "round trip {back:?}");
        let stats = sim.handle().stats();
        assert_eq!((stats.sent, stats.received), (1, 1));
    }

    #[tokio::test]
    async fn switch_network_moves_the_socket_and_drops_what_is_in_flight() {
        let sim = SimSocket::new(
            std::net::UdpSocket::bind(localhost()).unwrap(),
            NetSim {
                rtt: Duration::from_secs(2),
                ..NetSim::default()
            },
        )
        .unwrap();
        let h = sim.handle();
        let before = sim.local_addr().unwrap();
        sim.try_send(&Transmit {
            destination: PEER,
            ecn: None,
            contents: b"in flight",
            segment_size: None,
            src_ip: None,
        })
        .unwrap();
        let after = h.switch_network().unwrap();
        assert_eq!(after.ip(), before.ip());
        assert_ne!(after.port(), before.port());
        assert_eq!(sim.local_addr().unwrap(), after);
        let other = h.switch_network_to("127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(other.ip(), "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(h.local_addr().unwrap(), other);
        let stats = h.stats();
        assert_eq!((stats.switches, stats.switch_dropped), (2, 1));

        // The new socket receives.
        h.set(NetSim::default());
        let peer = tokio::net::UdpSocket::bind(localhost()).await.unwrap();
        peer.send_to(b"hello", other).await.unwrap();
        let (body, _) = tokio::time::timeout(Duration::from_secs(5), recv_one(&sim))
            .await
            .unwrap();
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn quic_connects_and_exchanges_data_through_loss_and_reordering() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::generate(dir.path(), &[]).unwrap();
        let server_config =
            crate::tls::client_server_config(dir.path(), &crate::config::QuicConfig::default())
                .unwrap();
        let server = quinn::Endpoint::server(server_config, localhost()).unwrap();
        let server_addr = server.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let data = recv.read_to_end(1 << 20).await.unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            let _ = send.stopped().await;
        });

        let (client, h) = sim_client_endpoint(
            localhost(),
            NetSim {
                seed: 7,
                loss: 0.1,
                reorder: 0.2,
                rtt: Duration::from_millis(10),
                ..NetSim::default()
            },
        )
        .unwrap();
        let config =
            crate::tls::quic_client_config(&dir.path().join(crate::certs::CA_CERT)).unwrap();
        let exchange = async {
            let conn = client
                .connect_with(config, server_addr, "localhost")
                .unwrap()
                .await
                .unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            let back = recv.read_to_end(1 << 20).await.unwrap();
            assert_eq!(back, data);
            conn.close(0u32.into(), b"done");
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), echo)
            .await
            .unwrap()
            .unwrap();
        let stats = h.stats();
        assert!(stats.lost > 0, "{stats:?}");
        assert!(stats.reordered > 0, "{stats:?}");
        assert!(stats.sent > 50 && stats.received > 50, "{stats:?}");
    }
}

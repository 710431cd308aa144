//! Lag means a sustained backlog. A client whose queue refused pushes in one burst
//! and which then keeps up under a steady push load, with a standing backlog well
//! under the queue's low-water mark, is never closed as a slow consumer, however
//! long ago the burst was and even when it refuses pushes again later for a moment;
//! a client that stops reading in the same run still is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::{TestServer, WAIT};
use parking_lot::Mutex;
use quicpush::channel::PushOutcome;
use quicpush::client::PushClient;
use quicpush::protocol;
use quicpush::registry::Registry;
use tokio::io::AsyncReadExt;

const SLOW_AFTER: Duration = Duration::from_millis(500);
const QUEUE: usize = 64;
/// The healthy client reads only while more than this many frames wait in its
/// queue (well under the low-water mark, half of `QUEUE`): its writer is always
/// in the middle of a write when more pushes arrive, so no write ever finishes
/// with the queue empty, as under a steady load.
const BACKLOG: usize = 12;
/// Between pushes to each client.
const TICK: Duration = Duration::from_millis(2);
/// Bounds on the whole run.
const DEADLINE: Duration = Duration::from_secs(60);

fn body(i: usize) -> String {
    // 2000 bytes: a batch of BACKLOG frames is more than the socket buffers hold
    format!("{i:<2000}")
}

fn index_of(body: &[u8]) -> usize {
    std::str::from_utf8(body)
        .unwrap()
        .trim_end()
        .parse()
        .unwrap()
}

/// A TCP client with 4 KiB socket buffers, authenticated as `key`.
async fn small_client(server: &TestServer, key: &str) -> PushClient {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.tcp).await.unwrap();
    let (r, w) = stream.into_split();
    let mut c = PushClient::from_parts(Box::new(r), Box::new(w), None);
    c.auth(server.token(key)).await.unwrap();
    c
}

/// What the pusher saw for one client.
#[derive(Default)]
struct Seen {
    /// Indices of the pushes reported `Delivered`, in order.
    delivered: Vec<usize>,
    /// When the first push that was refused was sent.
    first_full: Option<Instant>,
    /// Pushes refused.
    refused: usize,
    /// The first push reported neither `Delivered` nor `QueueFull`: the channel
    /// was closed. Its index and when.
    gone: Option<(usize, Instant, PushOutcome)>,
}

impl Seen {
    /// `sent` is when the call went out: the server refused it after that, so a
    /// gap measured from it to the close is never shorter than the server's.
    fn record(&mut self, i: usize, outcome: PushOutcome, sent: Instant) {
        match outcome {
            PushOutcome::Delivered => self.delivered.push(i),
            PushOutcome::QueueFull => {
                self.refused += 1;
                self.first_full.get_or_insert(sent);
            }
            other => {
                self.gone.get_or_insert((i, Instant::now(), other));
            }
        }
    }
}

/// Frames waiting in `key`'s queue on the server (0 once it is gone).
fn queued(registry: &Registry, key: &str) -> usize {
    registry.get(key).map_or(0, |c| c.queue_level().frames)
}

/// Reads `c`'s socket 1 KiB at a time while more than [`BACKLOG`] frames wait in
/// its queue, until `until` says stop; appends the push indices it decodes.
async fn read_paced(
    c: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    got: &mut Vec<usize>,
    registry: &Registry,
    until: impl Fn() -> bool,
) {
    let mut chunk = [0u8; 1024];
    while !until() {
        assert!(
            !registry.get("healthy").is_none_or(|c| c.is_closed()),
            "the healthy client was closed after {} pushes",
            got.len()
        );
        if queued(registry, "healthy") <= BACKLOG {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let n = tokio::time::timeout(WAIT, c.read(&mut chunk))
            .await
            .expect("no bytes although frames are queued")
            .unwrap();
        assert!(n > 0, "the healthy client's connection ended");
        buf.extend_from_slice(&chunk[..n]);
        decode(buf, got);
    }
}

fn decode(buf: &mut BytesMut, got: &mut Vec<usize>) {
    while let Some(f) = protocol::decode(buf, protocol::MAX_BODY_LIMIT).unwrap() {
        assert_eq!(f.op, 1000, "unexpected frame {f:?}");
        got.push(index_of(&f.body));
    }
}

/// Waits for `cond`, at most [`DEADLINE`].
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    tokio::time::timeout(DEADLINE, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_long_ago_is_not_lag_but_a_stalled_client_still_is() {
    let server = TestServer::start_with(|c| {
        c.client.slow_consumer_timeout = SLOW_AFTER;
        c.client.queue_size = QUEUE;
        // the frame bound is the one this test is about
        c.client.queue_bytes = 1 << 20;
        c.client.tcp_send_buffer = 4096;
        // longer than the run: only the slow-consumer limit closes a client here
        c.client.write_timeout = Duration::from_secs(60);
    })
    .await;
    let healthy = small_client(&server, "healthy").await;
    let stalled = small_client(&server, "stalled").await;
    server.wait_online(2).await;
    let backend = server.backend().await;

    let healthy_seen = Arc::new(Mutex::new(Seen::default()));
    let stalled_seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let pusher = {
        let (hs, ss, stop) = (healthy_seen.clone(), stalled_seen.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let sent = Instant::now();
                let h = backend.push_msg("healthy", 1000, body(i)).await.unwrap();
                hs.lock().record(i, h, sent);
                let sent = Instant::now();
                let s = backend.push_msg("stalled", 1000, body(i)).await.unwrap();
                ss.lock().record(i, s, sent);
                i += 1;
            }
        })
    };

    let start = Instant::now();
    let (mut reader, _writer, mut buf, _) = healthy.into_parts();
    let mut got = Vec::new();
    decode(&mut buf, &mut got);
    let refusals = || healthy_seen.lock().first_full.is_some();

    // 1. A burst: the healthy client does not read until its queue refuses a push.
    wait_for("the healthy client's first refusal", refusals).await;
    let burst_at = Instant::now();
    // 2. It keeps up, with a standing backlog, for three times the limit.
    read_paced(&mut reader, &mut buf, &mut got, &server.registry, || {
        burst_at.elapsed() > 3 * SLOW_AFTER
    })
    .await;
    // 3. A second, short burst, long after the first: it stops reading until a
    //    push is refused again.
    let before = healthy_seen.lock().refused;
    let refused_again = || {
        let s = healthy_seen.lock();
        s.gone.is_some() || s.refused > before
    };
    wait_for("a second refusal", refused_again).await;
    let second_at = Instant::now();
    // 4. It keeps up again for three times the limit.
    read_paced(&mut reader, &mut buf, &mut got, &server.registry, || {
        second_at.elapsed() > 3 * SLOW_AFTER
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(WAIT, pusher).await.unwrap().unwrap();
    assert!(start.elapsed() < DEADLINE);

    // The healthy client was never closed, and reads every push it was reported
    // Delivered, in order.
    // the pusher is done: take what it saw out of the locks
    let hs = std::mem::take(&mut *healthy_seen.lock());
    assert!(
        hs.gone.is_none(),
        "the healthy client was closed: push {:?}, {:?} after its first refusal (the \
         second burst began {:?} after the first)",
        hs.gone.map(|(i, _, o)| (i, o)),
        hs.gone.map(|(_, at, _)| at - burst_at),
        second_at - burst_at,
    );
    let chan = server.registry.get("healthy").expect("healthy is online");
    assert!(!chan.is_closed(), "{:?}", chan.close_reason());
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while got.len() < hs.delivered.len() {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {} pushes", got.len());
            buf.extend_from_slice(&chunk[..n]);
            decode(&mut buf, &mut got);
        }
    })
    .await
    .expect("the healthy client did not get every delivered push");
    assert_eq!(got, hs.delivered, "every delivered push, once, in order");

    // The stalled client was closed, no sooner than the limit after its queue
    // first refused a push.
    let ss = std::mem::take(&mut *stalled_seen.lock());
    let full = ss
        .first_full
        .expect("the stalled client's queue never filled");
    let (at, when, outcome) = ss.gone.expect("the stalled client was not closed");
    assert_eq!(outcome, PushOutcome::Stored, "its key's history is kept");
    assert!(
        when - full >= SLOW_AFTER,
        "closed {:?} after its first refusal",
        when - full
    );
    eprintln!(
        "healthy: {} pushes delivered, {} refused, the second burst {:?} after the \
         first; stalled: closed at push {at}, {:?} after its first refusal",
        hs.delivered.len(),
        hs.refused,
        second_at - burst_at,
        when - full,
    );
    drop(stalled);
    server.stop().await;
}

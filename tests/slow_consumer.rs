//! Slow consumers: one client that stops reading, among 1,000 that read, in one
//! room. Pushes to it report `queue full`, it is disconnected after
//! `client.slow_consumer_timeout` with a log line, and every reading client
//! receives every message, in order, exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{connect_to, Via};
use futures_util::future::join_all;
use quicpush::channel::PushOutcome;
use quicpush::client::PushClient;
use quicpush::protocol::op;

const TCP_CLIENTS: usize = 900;
const QUIC_CLIENTS: usize = 100;
const ACTIVE: u64 = (TCP_CLIENTS + QUIC_CLIENTS) as u64;
const ROOM: &str = "live://slow";
/// Messages a reading client may be behind before the backend waits for it:
/// well under the queue size, so no reading client's queue ever fills.
const WINDOW: usize = 4;
const SLOW_AFTER: Duration = Duration::from_millis(500);
/// Bounds on the whole run.
const MAX_MESSAGES: usize = 20_000;
const DEADLINE: Duration = Duration::from_secs(90);

fn body(i: usize) -> String {
    // 200 bytes: the stalled client's socket buffers fill after a few hundred
    format!("m{i:<199}")
}

/// Reads pushes until "end"; checks each is the next message with the next push
/// sequence and counts it in `got`. Returns how many arrived.
async fn read_all(mut c: PushClient, got: Arc<Vec<AtomicU32>>) -> Result<usize, String> {
    let mut next = 0usize;
    loop {
        let f = match c.next_frame().await {
            Ok(Some(f)) => f,
            other => return Err(format!("after {next} messages: {other:?}")),
        };
        if f.op == op::HEARTBEAT_REPLY {
            continue;
        }
        if &f.body[..] == b"end" {
            return Ok(next);
        }
        if f.body != body(next).as_bytes() || f.seq as usize != next + 1 {
            return Err(format!(
                "expected message {next} with seq {}, got seq {} body {:?}",
                next + 1,
                f.seq,
                String::from_utf8_lossy(&f.body[..12.min(f.body.len())])
            ));
        }
        got[next].fetch_add(1, Ordering::Relaxed);
        next += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_is_disconnected_and_costs_the_others_nothing() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let child = common::process::ChildServer::start(|config| {
        config.client.slow_consumer_timeout = SLOW_AFTER;
        config.client.queue_size = 64;
        // so the stalled client's kernel buffers fill after a few dozen messages
        config.client.tcp_send_buffer = 4096;
        // longer than the slow-consumer limit, so that limit is what closes it
        config.client.write_timeout = Duration::from_secs(30);
    });
    let server = &child.server;
    let token = |key: &str| child.token(key, Some(ROOM));
    let ca = child.ca();

    // The reading clients, connected 50 at a time.
    let got: Arc<Vec<AtomicU32>> = Arc::new((0..MAX_MESSAGES).map(|_| AtomicU32::new(0)).collect());
    let mut readers = Vec::new();
    let ids: Vec<usize> = (0..TCP_CLIENTS + QUIC_CLIENTS).collect();
    for chunk in ids.chunks(50) {
        let clients = join_all(chunk.iter().map(|&i| {
            let via = if i < TCP_CLIENTS { Via::Tcp } else { Via::Quic };
            connect_to(server, via, &ca, token(&format!("active-{i}")))
        }))
        .await;
        for c in clients {
            readers.push(tokio::spawn(read_all(c, got.clone())));
        }
    }

    // The stalled client: a small receive buffer, authenticated, then never read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.client_tcp).await.unwrap();
    let (r, w) = stream.into_split();
    let mut stalled = PushClient::from_parts(Box::new(r), Box::new(w), None);
    stalled.auth(token("stalled")).await.unwrap();

    let backend = child.backend().await;

    let start = Instant::now();
    let mut first_full: Option<(usize, Instant)> = None;
    let mut dropped: Option<(usize, Instant)> = None;
    let mut sent = 0usize;
    while dropped.is_none_or(|(i, _)| sent < i + 20) {
        assert!(
            sent < MAX_MESSAGES && start.elapsed() < DEADLINE,
            "the stalled client was not disconnected after {sent} messages in {:?}",
            start.elapsed()
        );
        // Wait for every reading client to have message sent - WINDOW.
        if sent >= WINDOW {
            while u64::from(got[sent - WINDOW].load(Ordering::Relaxed)) < ACTIVE {
                assert!(
                    start.elapsed() < DEADLINE,
                    "reading clients stopped at {sent}"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        // The refusal happens after this instant and the disconnect is seen after
        // it happened, so the measured gap is never shorter than the server's.
        let sending = Instant::now();
        let t = backend
            .broadcast_room(ROOM, 1000, body(sent))
            .await
            .unwrap();
        let now = Instant::now();
        // Reading clients always get it; only the stalled one ever refuses.
        assert!(t.delivered >= ACTIVE, "message {sent}: {t:?}");
        assert!(t.queue_full <= 1, "message {sent}: {t:?}");
        match t.delivered + t.queue_full {
            n if n == ACTIVE + 1 => {
                assert!(
                    dropped.is_none(),
                    "message {sent}: the stalled client is back"
                );
                if t.queue_full == 1 && first_full.is_none() {
                    first_full = Some((sent, sending));
                }
            }
            n if n == ACTIVE => {
                assert_eq!(t.queue_full, 0, "message {sent}: {t:?}");
                dropped.get_or_insert((sent, now));
            }
            _ => panic!("message {sent}: unexpected tally {t:?}"),
        }
        sent += 1;
    }
    backend.broadcast_room(ROOM, 1000, "end").await.unwrap();

    let (full_at, full_time) = first_full.expect("the stalled client's queue never filled");
    let (dropped_at, dropped_time) = dropped.unwrap();
    assert!(
        dropped_time.duration_since(full_time) >= SLOW_AFTER,
        "disconnected {:?} after its queue first refused a push, before the {SLOW_AFTER:?} limit",
        dropped_time.duration_since(full_time)
    );
    // Gone, but its key's history stream is live (history is on for keys).
    assert_eq!(
        backend.push_msg("stalled", 1000, "gone?").await.unwrap(),
        PushOutcome::Stored
    );

    // Every reading client has every message, once, in order.
    let results = join_all(readers).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), Ok(sent), "client {i}");
    }
    for (i, n) in got.iter().take(sent).enumerate() {
        assert_eq!(u64::from(n.load(Ordering::Relaxed)), ACTIVE, "message {i}");
    }

    // The stalled client gets an in-order prefix of the messages, then the
    // connection ends.
    let mut prefix = 0usize;
    let end = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stalled.next_frame().await {
                Ok(Some(f)) if f.op == op::DISCONNECT_REPLY => {}
                Ok(Some(f)) => {
                    assert_eq!(f.body, body(prefix).as_bytes(), "stalled client's message");
                    prefix += 1;
                }
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stalled client's connection is still open");
    assert!(prefix <= full_at, "it received {prefix} messages");

    let log = server.log_lines();
    let line = log
        .iter()
        .find(|l| l.contains("slow consumer"))
        .unwrap_or_else(|| panic!("no log line names the slow consumer:\n{}", log.join("\n")));
    assert!(line.contains("key=\"stalled\""), "{line}");
    assert!(!log.iter().any(|l| l.contains("panicked")));
    eprintln!(
        "{sent} messages to {ACTIVE} reading clients; the stalled client's queue first \
         refused message {full_at}, it was disconnected at message {dropped_at} \
         ({:?} later) having received {prefix}",
        dropped_time.duration_since(full_time)
    );
    child.server.stop();
}

//! Graceful drain: SIGTERM to a real `quicpush serve` during a push storm from
//! four backends. Every push the RPC reported delivered reaches its client before
//! the client's DisconnectReply, every call sent before the signal is answered,
//! and the process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{connect_to, Via};
use futures_util::future::join_all;
use parking_lot::Mutex;
use quicpush::bench::process::ServerProcess;
use quicpush::channel::PushOutcome;
use quicpush::client::PushClient;
use quicpush::protocol::op;
use quicpush::rpc::Client;
use quicpush::tls::BackendIdentity;
use quicpush::Config;
use rand::Rng;

const TCP_CLIENTS: usize = 60;
const QUIC_CLIENTS: usize = 40;
const CLIENTS: usize = TCP_CLIENTS + QUIC_CLIENTS;
const ROOMS: usize = 4;
const BACKENDS: usize = 4;
const CALLS_IN_FLIGHT: usize = 8;
/// Calls completed before the signal is sent.
const CALLS_BEFORE_SIGNAL: u64 = 2_000;

/// What one call was and what it returned.
enum Sent {
    /// PushMsg / MPushMsg: per key, delivered or not.
    Keys(Vec<(usize, bool)>),
    /// BroadcastRoom: how many it reached.
    Room(usize, u64),
}

struct Call {
    body: Bytes,
    sent: Option<Sent>,
    /// Sent before SIGTERM was.
    before_signal: bool,
    error: Option<String>,
}

/// Reads until the connection ends; returns the bodies received and whether the
/// last frame was a DisconnectReply.
async fn read_all(mut c: PushClient) -> (Vec<Bytes>, bool) {
    let mut bodies = Vec::new();
    let mut last_was_disconnect = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(60), c.next_frame()).await {
            Ok(Ok(Some(f))) => {
                last_was_disconnect = f.op == op::DISCONNECT_REPLY;
                if f.op == 1000 {
                    bodies.push(f.body);
                }
            }
            Ok(Ok(None)) | Ok(Err(_)) => return (bodies, last_was_disconnect),
            Err(_) => panic!("client still open a minute after SIGTERM"),
        }
    }
}

async fn storm(
    backend: Arc<Client>,
    b: usize,
    worker: usize,
    signalled: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    calls: Arc<Mutex<Vec<Call>>>,
) {
    let mut n = 0u64;
    let mut errors = 0;
    // Bounded: the server stops answering within its grace period.
    let deadline = Instant::now() + Duration::from_secs(60);
    while errors < 3 && Instant::now() < deadline {
        n += 1;
        let body = Bytes::from(format!("b{b}-w{worker}-{n}"));
        let before_signal = !signalled.load(Ordering::SeqCst);
        let choice = rand::thread_rng().gen_range(0..3);
        let result = match choice {
            0 => {
                let k = rand::thread_rng().gen_range(0..CLIENTS);
                backend
                    .push_msg(format!("k{k}"), 1000, body.clone())
                    .await
                    .map(|o| Sent::Keys(vec![(k, o == PushOutcome::Delivered)]))
            }
            1 => {
                let ks: Vec<usize> = (0..3)
                    .map(|_| rand::thread_rng().gen_range(0..CLIENTS))
                    .collect::<std::collections::BTreeSet<_>>()
                    .into_iter()
                    .collect();
                backend
                    .mpush_msg(
                        ks.iter().map(|k| format!("k{k}")).collect(),
                        1000,
                        body.clone(),
                    )
                    .await
                    .map(|m| {
                        Sent::Keys(
                            ks.iter()
                                .zip(&m.outcomes)
                                .map(|(&k, &o)| (k, o == PushOutcome::Delivered))
                                .collect(),
                        )
                    })
            }
            _ => {
                let r = rand::thread_rng().gen_range(0..ROOMS);
                backend
                    .broadcast_room(format!("r{r}"), 1000, body.clone())
                    .await
                    .map(|t| Sent::Room(r, t.delivered))
            }
        };
        let (sent, error) = match result {
            Ok(s) => (Some(s), None),
            Err(e) => {
                errors += 1;
                (None, Some(e.to_string()))
            }
        };
        calls.lock().push(Call {
            body,
            sent,
            before_signal,
            error,
        });
        done.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_push_storm_loses_nothing_reported_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::loopback(dir.path());
    let mut server = ServerProcess::quicpush_with(
        std::path::Path::new(env!("CARGO_BIN_EXE_quicpush")),
        dir.path(),
        &config,
    )
    .unwrap();
    let secret = quicpush::auth::load_secret(&dir.path().join("token.secret")).unwrap();
    let ca = dir.path().join("ca.pem");

    let clients = join_all((0..CLIENTS).map(|i| {
        let mut claims = quicpush::auth::claims_for(&format!("k{i}"), Duration::from_secs(600));
        claims.room_id = Some(format!("r{}", i % ROOMS));
        let token = quicpush::auth::issue(&secret, &claims).unwrap();
        let via = if i < TCP_CLIENTS { Via::Tcp } else { Via::Quic };
        connect_to(&server, via, &ca, token)
    }))
    .await;
    let readers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(read_all(c)))
        .collect();

    let identity = BackendIdentity::from_dir(dir.path());
    let signalled = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for b in 0..BACKENDS {
        let backend = Arc::new(
            Client::connect(server.control, "localhost", &identity)
                .await
                .unwrap(),
        );
        for w in 0..CALLS_IN_FLIGHT {
            workers.push(tokio::spawn(storm(
                backend.clone(),
                b,
                w,
                signalled.clone(),
                done.clone(),
                calls.clone(),
            )));
        }
    }

    // The storm is on: send SIGTERM in the middle of it.
    tokio::time::timeout(Duration::from_secs(60), async {
        while done.load(Ordering::Relaxed) < CALLS_BEFORE_SIGNAL {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the storm never got going");
    signalled.store(true, Ordering::SeqCst);
    server.sigterm().unwrap();
    let signal_at = Instant::now();

    let received: Vec<(Vec<Bytes>, bool)> = join_all(readers)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    join_all(workers).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(Duration::from_secs(60));
        (status, server.log_lines())
    })
    .await
    .unwrap();
    let (status, log) = status;
    let took = signal_at.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert!(log.iter().any(|l| l.contains("shutdown complete")));
    assert!(
        !log.iter()
            .any(|l| l.contains("ERROR") || l.contains("panicked")),
        "{}",
        log.join("\n")
    );

    // Which client got which body, and how often.
    let mut got: HashMap<Bytes, Vec<usize>> = HashMap::new();
    for (i, (bodies, last_was_disconnect)) in received.iter().enumerate() {
        assert!(
            *last_was_disconnect,
            "client k{i} did not end with DisconnectReply"
        );
        for b in bodies {
            got.entry(b.clone()).or_default().push(i);
        }
    }
    let calls = calls.lock();
    let (mut delivered_checked, mut ok_calls, mut before, mut failed_after) = (0, 0, 0, 0);
    for call in calls.iter() {
        let mut to = got.get(&call.body).cloned().unwrap_or_default();
        to.sort_unstable();
        if call.before_signal {
            before += 1;
            assert!(
                call.error.is_none(),
                "a call sent before SIGTERM failed: {:?}",
                call.error
            );
        }
        match &call.sent {
            None => failed_after += 1,
            Some(Sent::Keys(outcomes)) => {
                ok_calls += 1;
                let mut want: Vec<usize> = outcomes
                    .iter()
                    .filter(|(_, delivered)| *delivered)
                    .map(|(k, _)| *k)
                    .collect();
                want.sort_unstable();
                delivered_checked += want.len();
                assert_eq!(to, want, "body {:?}: receivers", call.body);
            }
            Some(Sent::Room(r, delivered)) => {
                ok_calls += 1;
                delivered_checked += *delivered as usize;
                assert_eq!(to.len() as u64, *delivered, "body {:?}", call.body);
                assert!(to.iter().all(|i| i % ROOMS == *r), "body {:?}", call.body);
                let mut dedup = to.clone();
                dedup.dedup();
                assert_eq!(dedup, to, "body {:?} arrived twice", call.body);
            }
        }
    }
    eprintln!(
        "{} calls ({before} before SIGTERM, all answered; {ok_calls} answered in all; \
         {failed_after} refused after it), {delivered_checked} deliveries reported and \
         received; exit 0 after {took:?}",
        calls.len()
    );
}

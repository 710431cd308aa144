//! Sub/Unsub cost is bounded by the server, not by the client: a flood of huge op
//! lists against a server that accepts 1 MiB bodies costs it little CPU, and
//! clients of the same bucket keep receiving pushes meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{connect_to, next_push, Via};
use quicpush::bench::process::{ProcStat, ServerProcess};
use quicpush::channel::PushOutcome;
use quicpush::client::PushClient;
use quicpush::protocol::op;
use quicpush::rpc::Client;

/// Flooding clients, and the Unsub/Sub rounds each one sends (72 Subs in all, the
/// count of the measurement that found the defect).
const FLOODERS: usize = 4;
const ROUNDS: usize = 18;
const UNSUB_OPS: u32 = 1_000;
const SUB_OPS: u32 = 165_000;
const BYSTANDERS: usize = 2;
/// Pushes to each bystander, one every `PUSH_EVERY`, while the flood runs.
const PUSH_EVERY: Duration = Duration::from_millis(10);

fn op_list(from: u32, n: u32) -> Vec<u8> {
    let mut s = String::with_capacity(n as usize * 7);
    for o in from..from + n {
        if o > from {
            s.push(',');
        }
        s.push_str(&o.to_string());
    }
    s.into_bytes()
}

/// One flooding client's rounds: an Unsub of 1,000 ops, then a Sub of 165,000. The
/// server may refuse the Sub by closing the connection; the client then reconnects.
/// Returns the Subs the server accepted.
async fn flood(server: &ServerProcess, ca: &std::path::Path, token: String) -> usize {
    // The Sub list holds none of the unsubscribed ops: a naive `retain` scans all
    // of it for each of them.
    let unsub = op_list(200_000, UNSUB_OPS);
    let sub = op_list(1, SUB_OPS);
    let mut accepted = 0;
    let mut c: Option<PushClient> = None;
    for _ in 0..ROUNDS {
        if c.is_none() {
            c = Some(connect_to(server, Via::Tcp, ca, token.clone()).await);
        }
        let cl = c.as_mut().unwrap();
        cl.send(op::UNSUB, unsub.clone()).await.unwrap();
        let f = reply(cl).await.expect("an Unsub of 1,000 ops is answered");
        assert_eq!(f, op::UNSUB_REPLY);
        if cl.send(op::SUB, sub.clone()).await.is_err() {
            c = None;
            continue;
        }
        match reply(cl).await {
            Some(op::SUB_REPLY) => accepted += 1,
            Some(other) => panic!("a Sub answered with op {other}"),
            None => c = None,
        }
    }
    accepted
}

/// The op of the next reply, or `None` once the server has closed the connection.
async fn reply(c: &mut PushClient) -> Option<u32> {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(30), c.next_frame())
            .await
            .expect("no reply within 30 s");
        match f {
            Ok(Some(f)) if f.op == op::DISCONNECT_REPLY => continue,
            Ok(Some(f)) => return Some(f.op),
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn push_all(backend: &Client, keys: &[String], n: u64) {
    for k in keys {
        let outcome = backend
            .push_msg(k.clone(), 1000, n.to_string())
            .await
            .unwrap();
        assert_eq!(outcome, PushOutcome::Delivered, "push {n} to {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_huge_sub_lists_costs_little_and_stalls_no_bystander() {
    let child = common::process::ChildServer::start(|config| {
        config.client.max_body = 1_048_576;
        config.client.queue_bytes = 4 << 20;
        // One bucket: every flooder and every bystander share its lock.
        config.registry.buckets = 1;
        config.client.max_frames_per_sec = 10_000;
    });
    let server = &child.server;
    let token = |key: &str| child.token(key, None);
    let ca = child.ca();
    let backend = child.backend().await;

    let mut bystanders = Vec::new();
    for i in 0..BYSTANDERS {
        bystanders.push(connect_to(server, Via::Tcp, &ca, token(&format!("bystander-{i}"))).await);
    }
    // Bystanders read every push and keep the longest gap between two of them.
    let readers: Vec<_> = bystanders
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut last = Instant::now();
                let mut longest = Duration::ZERO;
                loop {
                    let f = next_push(&mut c).await;
                    assert_ne!(f.op, op::DISCONNECT_REPLY, "a bystander was disconnected");
                    if f.op == op::RAW {
                        continue;
                    }
                    let now = Instant::now();
                    longest = longest.max(now - last);
                    last = now;
                    let n: u64 = std::str::from_utf8(&f.body).unwrap().parse().unwrap();
                    if n == u64::MAX {
                        return (seen, longest);
                    }
                    seen.push(n);
                }
            })
        })
        .collect();

    let stat = ProcStat::new(server.pid);
    let cpu_before = stat.cpu_us().unwrap();
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|i| flood(server, &ca, token(&format!("flooder-{i}"))))
        .collect();
    let keys: Vec<String> = (0..BYSTANDERS).map(|i| format!("bystander-{i}")).collect();
    let flood_started = Instant::now();
    let pusher = async {
        let mut n = 0u64;
        let mut tick = tokio::time::interval(PUSH_EVERY);
        let mut flood = std::pin::pin!(futures_util::future::join_all(flooders));
        loop {
            tokio::select! {
                accepted = &mut flood => break (n, accepted),
                _ = tick.tick() => {
                    push_all(&backend, &keys, n).await;
                    n += 1;
                }
            }
        }
    };
    let (pushed, accepted) = tokio::time::timeout(Duration::from_secs(120), pusher)
        .await
        .expect("the flood finished within 120 s");
    let cpu_us = stat.cpu_us().unwrap() - cpu_before;
    // Pushes made to the bystanders against the ticks that fell due meanwhile: a
    // stalled bucket (and so a stalled pusher) shows as a ratio well under 1.
    let due = flood_started.elapsed().as_secs_f64() / PUSH_EVERY.as_secs_f64();
    let rate_ratio = pushed as f64 / due.max(1.0);
    push_all(&backend, &keys, u64::MAX).await;

    let accepted: usize = accepted.into_iter().sum();
    eprintln!(
        "{} rounds: {accepted} huge Subs accepted, server CPU {:.3} s, {pushed} pushes to each bystander ({rate_ratio:.2} of the pushes due every {PUSH_EVERY:?})",
        FLOODERS * ROUNDS,
        cpu_us as f64 / 1e6
    );
    for r in readers {
        let (seen, longest) = tokio::time::timeout(Duration::from_secs(30), r)
            .await
            .expect("a bystander got its last push")
            .unwrap();
        assert_eq!(
            seen,
            (0..pushed).collect::<Vec<_>>(),
            "every push, in order"
        );
        eprintln!("bystander: longest gap between pushes {longest:?}");
        assert!(
            longest < Duration::from_secs(1),
            "a bystander waited {longest:?} for a push sent every {PUSH_EVERY:?}"
        );
    }
    assert_eq!(accepted, 0, "a Sub longer than the filter's cap is refused");
    assert!(
        cpu_us < 1_000_000,
        "the flood cost the server {cpu_us} µs of CPU"
    );
}

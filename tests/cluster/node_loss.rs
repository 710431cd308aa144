//! (f) Node loss: three `quicpush serve` processes on one Redis (and on a
//! three-master Redis Cluster) with shared key history; `kill -9` of the node holding the clients in the middle of a steady
//! push load. Every client reconnects to another node and resumes: each gets
//! every push that was accepted (Forwarded or Stored), once, in order, and the
//! dead node's record and directory entries are gone within the TTL.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quicpush::bench::process::ServerProcess;
use quicpush::client::{Backoff, Dial, Event, ResumingClient};
use quicpush::cluster::names;
use quicpush::config::{HistoryStoreKind, RedisTarget};
use quicpush::protocol::Source;
use quicpush::rpc::proto::PushOutcome;

use crate::common::process::connect_backend;
use crate::common::redis::{RedisCluster, RedisServer};
use crate::tier::{wait_for, TierRedis};

const KEYS: usize = 20;
/// Push rounds (one PushMsg per key each) and the round after which node 2 dies.
const ROUNDS: usize = 150;
const KILL_AFTER: usize = 50;
const TTL: Duration = Duration::from_secs(2);

/// Three child nodes sharing one directory of certificates and token secret.
struct ChildTier {
    redis: TierRedis,
    dir: tempfile::TempDir,
    _configs: Vec<tempfile::TempDir>,
    nodes: Vec<ServerProcess>,
}

impl ChildTier {
    fn start(n: usize, redis: TierRedis) -> ChildTier {
        let dir = tempfile::tempdir().unwrap();
        let mut configs = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut c = quicpush::Config::loopback(dir.path());
            c.cluster.redis = Some(redis.target());
            c.cluster.node_id = Some(format!("n{i}"));
            c.cluster.ttl = TTL;
            c.cluster.refresh = Some(Duration::from_millis(400));
            c.history.store = HistoryStoreKind::Redis;
            let cfg = tempfile::tempdir().unwrap();
            // One at a time: the first generates the certificates the others use.
            nodes.push(
                ServerProcess::quicpush_with(
                    Path::new(env!("CARGO_BIN_EXE_quicpush")),
                    cfg.path(),
                    &c,
                )
                .expect("node starts"),
            );
            configs.push(cfg);
        }
        ChildTier {
            redis,
            dir,
            _configs: configs,
            nodes,
        }
    }

    fn token(&self, key: &str) -> String {
        let secret = quicpush::auth::load_secret(&self.dir.path().join("token.secret")).unwrap();
        let claims = quicpush::auth::claims_for(key, Duration::from_secs(3600));
        quicpush::auth::issue(&secret, &claims).unwrap()
    }
}

/// What one client saw: bodies in arrival order, offsets, resume outcomes, and
/// when its first resume after the kill finished.
#[derive(Default)]
struct Seen {
    bodies: Vec<String>,
    offsets: Vec<u64>,
    recovered: Vec<Option<bool>>,
    resumed_at: Option<Instant>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_node_loses_no_accepted_push() {
    kill_9_loses_nothing(ChildTier::start(3, TierRedis::One(RedisServer::start()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_kill_9_of_a_node_loses_no_accepted_push() {
    kill_9_loses_nothing(ChildTier::start(
        3,
        TierRedis::Cluster(RedisCluster::start()),
    ))
    .await;
}

async fn kill_9_loses_nothing(mut t: ChildTier) {
    let redis_url = t.redis.target();
    let n1 = t.nodes[1].client_tcp;
    let n2 = t.nodes[2].client_tcp;
    let a = connect_backend(t.nodes[0].control, t.dir.path()).await;

    // Every client on node 2, with node 1 to move to.
    let killed = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for k in 0..KEYS {
        let key = format!("mk{k}");
        let dials = vec![Dial::Tcp(n2), Dial::Tcp(n1)];
        let (c, reply) = ResumingClient::connect_any(dials, t.token(&key), Backoff::default())
            .await
            .unwrap();
        assert!(reply.source(Source::Key).is_some(), "{reply:?}");
        let killed = killed.clone();
        clients.push(tokio::spawn(async move {
            let mut c = c;
            let mut seen = Seen::default();
            loop {
                match tokio::time::timeout(Duration::from_secs(30), c.next()).await {
                    Ok(Event::Push(f, meta)) => {
                        let body = String::from_utf8_lossy(&f.body).into_owned();
                        if body == "end" {
                            break;
                        }
                        seen.bodies.push(body);
                        seen.offsets.push(meta.offset);
                    }
                    Ok(Event::Resumed(r)) => {
                        if killed.load(Ordering::SeqCst) && seen.resumed_at.is_none() {
                            seen.resumed_at = Some(Instant::now());
                        }
                        seen.recovered
                            .push(r.source(Source::Key).and_then(|s| s.recovered));
                    }
                    Ok(Event::Reply(_)) => {}
                    Err(_) => panic!("client {key}: nothing for 30 s"),
                }
            }
            let on_n1 = matches!(c.dial(), Dial::Tcp(addr) if *addr == n1);
            (seen, on_n1)
        }));
    }

    // The steady load, from node 0: one PushMsg per key per round, 2 ms apart.
    let mut accepted: Vec<Vec<String>> = vec![Vec::new(); KEYS];
    let mut kill_time = None;
    let mut expired = None;
    // Pushes to a key whose node had died and whose client was not back yet.
    let mut stored = 0u32;
    for round in 0..ROUNDS {
        if round == KILL_AFTER {
            killed.store(true, Ordering::SeqCst);
            t.nodes[2].kill();
            let at = Instant::now();
            kill_time = Some(at);
            expired = Some(tokio::spawn(record_gone(redis_url.clone(), at)));
        }
        for (k, acc) in accepted.iter_mut().enumerate() {
            let body = format!("r{round}");
            match a
                .push_msg(&format!("mk{k}"), 1000, body.clone())
                .await
                .unwrap()
            {
                PushOutcome::Forwarded => acc.push(body),
                PushOutcome::Stored => {
                    stored += 1;
                    acc.push(body)
                }
                other => panic!("round {round} key {k}: {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let kill_time = kill_time.unwrap();
    assert!(stored > 0, "no push fell between the kill and the resumes");
    for k in 0..KEYS {
        // Once every client is back, the end marker reaches it live.
        wait_for("the client is back", || async {
            a.push_msg(&format!("mk{k}"), 1000, "end").await.unwrap() == PushOutcome::Forwarded
        })
        .await;
    }

    let mut resumes = Vec::new();
    for (k, h) in clients.into_iter().enumerate() {
        let (seen, on_n1) = h.await.unwrap();
        assert!(on_n1, "mk{k} did not end on n1");
        // "end" pushes that answered Stored before the client was back are in
        // history and replayed too: drop them from what was seen.
        assert_eq!(
            seen.bodies, accepted[k],
            "mk{k}: lost, duplicated or reordered"
        );
        let want: Vec<u64> = (1..=seen.offsets.len() as u64).collect();
        let got: Vec<u64> = seen.offsets.clone();
        assert_eq!(got, want, "mk{k}: offsets");
        assert!(
            seen.recovered.iter().skip(1).all(|r| *r == Some(true)),
            "mk{k}: {:?}",
            seen.recovered
        );
        resumes.push(seen.resumed_at.expect("resumed after the kill") - kill_time);
    }
    resumes.sort();
    let p99 = resumes[(resumes.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "node loss: {stored} pushes stored while their node was dead; {KEYS} clients resumed on another node; resume after kill: median {:?}, p99 {:?}",
        resumes[resumes.len() / 2],
        p99
    );

    // The dead node's record expired within the TTL of its death.
    let gone_after = expired.unwrap().await.unwrap();
    assert!(
        gone_after <= TTL + Duration::from_millis(500),
        "n2's record lived {gone_after:?} after the kill"
    );
    let (_, backend) = quicpush::cluster::connect(&redis_url).unwrap();
    let mut con = backend.con();
    for k in 0..KEYS {
        let owner: Option<String> = redis::cmd("GET")
            .arg(names::key(&format!("mk{k}")))
            .query_async(&mut con)
            .await
            .unwrap();
        // n1's (the client's last connection, closed by now) or none: never n2's.
        assert!(
            !owner.as_deref().is_some_and(|o| o.starts_with("n2/")),
            "mk{k}: {owner:?}"
        );
    }
}

/// How long after `killed_at` node n2's record and rooms hash were gone.
async fn record_gone(target: RedisTarget, killed_at: Instant) -> Duration {
    let (_, backend) = quicpush::cluster::connect(&target).unwrap();
    let mut con = backend.con();
    loop {
        let n: u64 = redis::cmd("EXISTS")
            .arg(names::node("n2"))
            .arg(names::node_rooms("n2"))
            .query_async(&mut con)
            .await
            .unwrap_or(1);
        if n == 0 {
            return killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "n2's record never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

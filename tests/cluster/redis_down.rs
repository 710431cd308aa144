//! (e) Redis killed mid-run: local pushes are still Delivered, remote ones
//! Unavailable; Redis back on the same port (empty): within a few TTLs the nodes
//! have re-registered and rewritten their entries, and remote pushes are
//! Forwarded again and arrive.

use std::time::Duration;

use quicpush::rpc::proto::PushOutcome;

use crate::common::Via;
use crate::tier::{drain_bodies_quiet, wait_for, Tier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_survive_a_redis_restart() {
    survives_a_redis_restart(Tier::start(2).await).await;
}

/// The body, on `t`'s Redis (one server, or every master of a Redis Cluster).
pub async fn survives_a_redis_restart(mut t: Tier) {
    let _ka = t.nodes[0].client(Via::Tcp, "ka").await;
    let mut kb = t.nodes[1].client(Via::Tcp, "kb").await;
    t.wait_owner("kb", 1).await;
    let a = t.nodes[0].backend().await;
    assert_eq!(
        a.push_msg("kb", 1000, "before").await.unwrap(),
        PushOutcome::Forwarded
    );

    t.redis.kill();
    assert_eq!(
        a.push_msg("ka", 1000, "local").await.unwrap(),
        PushOutcome::Delivered
    );
    assert_eq!(
        a.push_msg("kb", 1000, "lost").await.unwrap(),
        PushOutcome::Unavailable
    );
    let m = a
        .mpush_msg(vec!["ka".into(), "kb".into()], 1000, "half")
        .await
        .unwrap();
    assert_eq!(
        m.outcomes,
        vec![PushOutcome::Delivered, PushOutcome::Unavailable]
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    t.redis.restart();
    wait_for("kb forwarded again", || async {
        a.push_msg("kb", 1000, "after").await.unwrap() == PushOutcome::Forwarded
    })
    .await;
    // "before" once; "lost" and "half" never (Redis was down); "after" from the
    // push that answered Forwarded, and possibly from a retry that timed out
    // after Redis had run it (answered Unavailable, see PushOutcome).
    // A long quiet: a loaded machine may be slow to hand the last one over.
    let got = drain_bodies_quiet(&mut kb, Duration::from_secs(2)).await;
    let count = |b: &str| got.iter().filter(|x| &x[..] == b.as_bytes()).count();
    assert_eq!(count("before"), 1, "{got:?}");
    assert_eq!(count("lost") + count("half"), 0, "{got:?}");
    assert!(count("after") >= 1, "{got:?}");
    assert_eq!(got.len(), 1 + count("after"), "{got:?}");
    t.stop().await;
}

//! (d) A node that stops refreshing (its cluster tasks halted, as a crash would)
//! is gone within the TTL: its record and directory entries expire, and pushes to
//! its keys answer Offline, not Forwarded.

use quicpush::cluster::names;
use quicpush::rpc::proto::PushOutcome;

use crate::common::Via;
use crate::tier::{wait_for, Tier, TTL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_vanishes_within_the_ttl() {
    let t = Tier::start(3).await;
    let s = &t.nodes[2];
    let mut claims = s.claims("kc");
    claims.mid = Some(7);
    claims.room_id = Some("live://d".into());
    let _c = s.client_with(Via::Tcp, &claims).await;
    t.wait_owner("kc", 2).await;
    let a = t.nodes[0].backend().await;
    assert_eq!(
        a.push_msg("kc", 1000, "x").await.unwrap(),
        PushOutcome::Forwarded
    );

    s.cluster.as_ref().unwrap().halt().await;
    let halted = std::time::Instant::now();
    let mut con = t.redis().await;
    wait_for("n2's record and entries expire", || {
        let mut con = con.clone();
        async move {
            let n: u64 = redis::cmd("EXISTS")
                .arg(names::node("n2"))
                .arg(names::key("kc"))
                .arg(names::user(7, "n2"))
                .arg(names::room("live://d", "n2"))
                .arg(names::node_rooms("n2"))
                .query_async(&mut con)
                .await
                .unwrap();
            n == 0
        }
    })
    .await;
    assert!(
        halted.elapsed() <= TTL + std::time::Duration::from_millis(500),
        "gone only after {:?}",
        halted.elapsed()
    );
    wait_for("A no longer sees n2", || async {
        t.nodes[0].cluster.as_ref().unwrap().others() == vec!["n1".to_string()]
    })
    .await;
    let live: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(names::NODES)
        .arg(quicpush_now_ms())
        .arg("+inf")
        .query_async(&mut con)
        .await
        .unwrap();
    assert!(!live.contains(&"n2".to_string()), "{live:?}");
    assert_eq!(
        a.push_msg("kc", 1000, "y").await.unwrap(),
        PushOutcome::Offline
    );
    let tally = a.push_user(vec![7], 1000, "u").await.unwrap();
    assert_eq!(tally.forwarded_nodes, 0);
    t.stop().await;
}

fn quicpush_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

//! (b) A room spanning three nodes: BroadcastRoom reaches every member once, and
//! the Heartbeat's room count, `Rooms` and `Online` are tier-wide.

use quicpush::rpc::proto::RoomCount;

use crate::common::{next, Via};
use crate::tier::{bodies, drain_bodies, wait_for, Tier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_across_the_tier() {
    across(Tier::start(3).await).await;
}

/// The body, on `t`'s Redis (one server, or a Redis Cluster).
pub async fn across(t: Tier) {
    let mut clients = Vec::new();
    for (i, s) in t.nodes.iter().enumerate() {
        let mut claims = s.claims(&format!("r{i}"));
        claims.room_id = Some("live://x".into());
        clients.push(s.client_with(Via::Tcp, &claims).await);
    }
    for i in 0..3 {
        t.wait_owner(&format!("r{i}"), i).await;
    }
    let a = t.nodes[0].backend().await;
    wait_for("Rooms is tier-wide", || async {
        a.rooms().await.unwrap()
            == vec![RoomCount {
                room: "live://x".into(),
                online: 3,
            }]
    })
    .await;
    wait_for("Online is tier-wide", || async {
        a.online().await.unwrap().total == 3
    })
    .await;
    let tally = a.broadcast_room("live://x", 1000, "hello").await.unwrap();
    assert_eq!((tally.delivered, tally.forwarded_nodes), (1, 2));
    for c in &mut clients {
        assert_eq!(drain_bodies(c).await, bodies(&["hello"]));
    }
    // every member's heartbeat counts the three nodes' members
    for c in &mut clients {
        let mut count = 0;
        for _ in 0..40 {
            c.heartbeat().await.unwrap();
            let f = next(c).await;
            count = u32::from_be_bytes(f.body[..4].try_into().unwrap());
            if count == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(count, 3);
    }
    t.stop().await;
}

//! (a) Every push from a backend on node A reaches clients on B and C exactly
//! once: Forwarded for remote keys, Delivered for local ones.

use quicpush::rpc::proto::{PushItem, PushOutcome};

use crate::tier::{bodies, drain_bodies, Tier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_reaches_every_node_once() {
    reach_once(Tier::start(3).await).await;
}

/// The body, on `t`'s Redis (one server, or a Redis Cluster).
pub async fn reach_once(t: Tier) {
    let mut clients = Vec::new();
    for (i, key) in ["ka", "kb", "kc"].into_iter().enumerate() {
        let s = &t.nodes[i];
        let mut claims = s.claims(key);
        claims.mid = Some(i as i64 + 1);
        claims.room_id = Some("live://r".into());
        clients.push(s.client_with(crate::common::Via::Tcp, &claims).await);
    }
    for (i, key) in ["ka", "kb", "kc"].into_iter().enumerate() {
        t.wait_owner(key, i).await;
    }
    // users and rooms are in the directory once their writer ran: wait until a
    // room push from A is forwarded to both other nodes.
    let a = t.nodes[0].backend().await;

    assert_eq!(
        a.push_msg("kb", 1000, "one").await.unwrap(),
        PushOutcome::Forwarded
    );
    assert_eq!(
        a.push_msg("ka", 1000, "local").await.unwrap(),
        PushOutcome::Delivered
    );
    assert_eq!(
        a.push_msg("nobody", 1000, "x").await.unwrap(),
        PushOutcome::Offline
    );
    let m = a
        .mpush_msg(vec!["ka".into(), "kb".into(), "kc".into()], 1000, "multi")
        .await
        .unwrap();
    assert_eq!(
        m.outcomes,
        vec![
            PushOutcome::Delivered,
            PushOutcome::Forwarded,
            PushOutcome::Forwarded
        ]
    );
    let m = a
        .mpush_msgs(
            ["ka", "kb", "kc"]
                .iter()
                .map(|k| PushItem {
                    key: (*k).into(),
                    op: 1000,
                    body: bytes::Bytes::from(format!("each-{k}")),
                })
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(m.count(PushOutcome::Forwarded), 2);
    assert_eq!(m.count(PushOutcome::Delivered), 1);
    let tally = a.push_user(vec![1, 2, 3], 1000, "user").await.unwrap();
    assert_eq!(
        (tally.delivered, tally.forwarded_nodes),
        (1, 2),
        "{tally:?}"
    );
    let tally = a.broadcast_room("live://r", 1000, "room").await.unwrap();
    assert_eq!(
        (tally.delivered, tally.forwarded_nodes),
        (1, 2),
        "{tally:?}"
    );
    // Broadcast's `online` is the tier's, from the node records' last refresh.
    crate::tier::wait_for("the records count every client", || async {
        a.online().await.unwrap().total == 3
    })
    .await;
    assert_eq!(a.broadcast(1000, "all", 0).await.unwrap(), 3);

    let want = [
        vec!["local", "multi", "each-ka", "user", "room", "all"],
        vec!["one", "multi", "each-kb", "user", "room", "all"],
        vec!["multi", "each-kc", "user", "room", "all"],
    ];
    for (c, want) in clients.iter_mut().zip(want) {
        assert_eq!(drain_bodies(c).await, bodies(&want));
    }
    t.stop().await;
}

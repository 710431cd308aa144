//! (c) The same key on B, then on C: B's connection is closed as replaced (the
//! client gets DisconnectReply) and pushes reach C; with key history in memory
//! (the directory writer's `SET … GET`) and in Redis (the claim at connect).

use quicpush::config::HistoryStoreKind;
use quicpush::protocol::op;
use quicpush::rpc::proto::PushOutcome;

use crate::common::{next, Via};
use crate::tier::{bodies, drain_bodies, Tier};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_on_another_node_replaces_the_first() {
    replaces(HistoryStoreKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_on_another_node_replaces_the_first_with_shared_history() {
    replaces(HistoryStoreKind::Redis).await;
}

async fn replaces(store: HistoryStoreKind) {
    let t = Tier::start_with(3, |c| c.history.store = store).await;
    let mut on_b = t.nodes[1].client(Via::Tcp, "same").await;
    t.wait_owner("same", 1).await;
    let mut on_c = t.nodes[2].client(Via::Tcp, "same").await;
    let f = next(&mut on_b).await;
    assert_eq!(f.op, op::DISCONNECT_REPLY, "{f:?}");
    t.wait_owner("same", 2).await;
    let a = t.nodes[0].backend().await;
    assert_eq!(
        a.push_msg("same", 1000, "to-c").await.unwrap(),
        PushOutcome::Forwarded
    );
    assert_eq!(drain_bodies(&mut on_c).await, bodies(&["to-c"]));
    assert_eq!(t.nodes[1].registry.online().total, 0);
    t.stop().await;
}

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
    replaces(Tier::start(3).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_on_another_node_replaces_the_first_with_shared_history() {
    replaces(Tier::start_with(3, |c| c.history.store = HistoryStoreKind::Redis).await).await;
}

/// The body, on `t`'s Redis (one server, or a Redis Cluster) and history store.
pub async fn replaces(t: Tier) {
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

/// With memory history, a key whose client left node B keeps its stream there;
/// once the client is on C, a push through B is forwarded to C, not kept on B
/// only (`Stored`) out of its client's reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_history_left_on_its_old_node_is_forwarded_to_its_new_one() {
    let t = Tier::start(3).await;
    let on_b = t.nodes[1].client(Via::Tcp, "moved").await;
    t.wait_owner("moved", 1).await;
    on_b.close().await;
    let b = t.nodes[1].backend().await;
    crate::tier::wait_for("the key left B", || async {
        b.push_msg("moved", 1000, "kept").await.unwrap() == PushOutcome::Stored
    })
    .await;
    let mut on_c = t.nodes[2].client(Via::Tcp, "moved").await;
    t.wait_owner("moved", 2).await;
    assert_eq!(
        b.push_msg("moved", 1000, "to-c").await.unwrap(),
        PushOutcome::Forwarded
    );
    assert_eq!(drain_bodies(&mut on_c).await, bodies(&["to-c"]));
    t.stop().await;
}

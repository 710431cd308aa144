//! (g) The same tier on a three-master Redis Cluster: the directory and the
//! bus on sharded pub/sub, with the bodies of the one-server tests: every kind
//! of push reaches its clients on other nodes once, a room spans the tier,
//! a second connection on another node replaces the first (key history in
//! memory and in Redis), and clients resume on another node with everything
//! they missed from the shared key, user, room and broadcast streams; and the
//! whole cluster killed and restarted mid-run, with memory and shared history.

use quicpush::config::HistoryStoreKind;

use crate::tier::Tier;

fn shared(c: &mut quicpush::Config) {
    c.history.store = HistoryStoreKind::Redis;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_every_push_reaches_every_node_once() {
    crate::pushes::reach_once(Tier::start_cluster_with(3, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_room_spans_the_tier() {
    crate::rooms::across(Tier::start_cluster_with(3, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_same_key_on_another_node_replaces_the_first() {
    crate::replace::replaces(Tier::start_cluster_with(3, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_the_same_key_replaces_the_first_with_shared_history() {
    crate::replace::replaces(Tier::start_cluster_with(3, shared).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_client_resumes_on_another_node_with_every_push_it_missed() {
    crate::shared::resumes_elsewhere(Tier::start_cluster_with(3, shared).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_user_resumes_on_another_node_with_every_user_push_it_missed() {
    crate::shared::user_resumes_elsewhere(Tier::start_cluster_with(3, shared).await).await;
}

/// Calls of `command` summed over the cluster's masters.
fn calls(t: &Tier, command: &str) -> u64 {
    let crate::tier::TierRedis::Cluster(rc) = &t.redis else {
        panic!("a Redis Cluster test");
    };
    rc.nodes()
        .iter()
        .map(|n| n.command_calls().get(command).copied().unwrap_or(0))
        .sum()
}

/// Subscribers of the sharded `channel`, summed over the masters (only the
/// slot's owner has any).
fn shard_subscribers(t: &Tier, channel: &str) -> u64 {
    let crate::tier::TierRedis::Cluster(rc) = &t.redis else {
        panic!("a Redis Cluster test");
    };
    rc.nodes()
        .iter()
        .map(|n| {
            let out = n.cli(&["PUBSUB", "SHARDNUMSUB", channel]);
            out.lines()
                .nth(1)
                .and_then(|l| l.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// The holder of a key subscribes to its sharded channel, a push by key to
/// another node is one `SPUBLISH` there (no plain `PUBLISH`, which a cluster
/// sends to every node), and leaving the key leaves the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_key_push_is_one_sharded_publish_to_its_holder() {
    use quicpush::rpc::proto::PushOutcome;
    let t = Tier::start_cluster_with(2, |_| {}).await;
    let on_b = t.nodes[1].client(crate::common::Via::Tcp, "held").await;
    let channel = quicpush::cluster::names::key_channel("held");
    crate::tier::wait_for("n1 subscribes to the key's channel", || async {
        shard_subscribers(&t, &channel) == 1
    })
    .await;
    let a = t.nodes[0].backend().await;
    let (spublish, publish) = (calls(&t, "spublish"), calls(&t, "publish"));
    for i in 0..10 {
        assert_eq!(
            a.push_msg("held", 1000, format!("p{i}")).await.unwrap(),
            PushOutcome::Forwarded
        );
    }
    assert_eq!(calls(&t, "spublish") - spublish, 10);
    assert_eq!(calls(&t, "publish") - publish, 0);
    assert_eq!(
        a.push_msg("nobody", 1000, "x").await.unwrap(),
        PushOutcome::Offline
    );
    on_b.close().await;
    crate::tier::wait_for("n1 leaves the key's channel", || async {
        shard_subscribers(&t, &channel) == 0
    })
    .await;
    assert_eq!(
        a.push_msg("held", 1000, "gone").await.unwrap(),
        PushOutcome::Offline
    );
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_room_member_resumes_on_another_node_with_every_room_push_it_missed() {
    crate::shared::room_resumes_elsewhere(
        Tier::start_cluster_with(3, |c| {
            shared(c);
            c.history.room = true;
        })
        .await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_a_client_resumes_broadcasts_on_another_node_with_every_one_it_missed() {
    let t = crate::shared::broadcast_resumes_elsewhere(
        Tier::start_cluster_with(3, |c| {
            shared(c);
            c.history.all = true;
        })
        .await,
    )
    .await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_pushes_survive_a_restart_of_every_master() {
    crate::redis_down::survives_a_redis_restart(Tier::start_cluster_with(2, |_| {}).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_down_key_pushes_are_unavailable_and_connects_are_refused() {
    crate::shared::redis_down_with_shared_history(Tier::start_cluster_with(2, shared).await).await;
}

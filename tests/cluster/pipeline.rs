//! Calls on one backend stream are pipelined: a call waiting on Redis does not
//! hold back the calls read after it, and the replies still come in call order.

use bytes::BytesMut;
use quicpush::codec;
use quicpush::rpc::proto::{PushOutcome, Reply};
use quicpush::rpc::Request;
use tokio::io::AsyncReadExt;

use crate::common::{next_push, read_replies, Via, WAIT};
use crate::tier::{Tier, TierRedis};

fn push(id: u64, key: &str, body: &'static str) -> BytesMut {
    let mut b = BytesMut::new();
    let req = Request::PushMsg {
        key: key.into(),
        op: 1000,
        body: body.into(),
    };
    codec::write_message(&mut b, id, &req).unwrap();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_on_redis_does_not_hold_back_the_next_call_on_its_stream() {
    let t = Tier::start(2).await;
    let mut ka = t.nodes[0].client(Via::Tcp, "ka").await;
    let mut kb = t.nodes[1].client(Via::Tcp, "kb").await;
    t.wait_owner("kb", 1).await;

    let (endpoint, conn) = t.nodes[0].rpc_connection().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();

    // Scripts and PUBLISH wait while Redis is paused for writes: the remote
    // push (call 1) cannot be forwarded until the pause ends.
    let TierRedis::One(redis) = &t.redis else {
        unreachable!("one server")
    };
    assert_eq!(
        redis.cli(&["CLIENT", "PAUSE", "60000", "WRITE"]).trim(),
        "OK"
    );
    let mut calls = push(1, "kb", "remote");
    calls.extend_from_slice(&push(2, "ka", "local"));
    send.write_all(&calls).await.unwrap();

    // Call 2, a local key, is carried out while call 1 still waits on Redis.
    let f = next_push(&mut ka).await;
    assert_eq!(&f.body[..], b"local");
    let mut early = BytesMut::new();
    let nothing = tokio::time::timeout(
        std::time::Duration::from_millis(100),
        recv.read_buf(&mut early),
    )
    .await;
    assert!(
        nothing.is_err(),
        "no reply may come before call 1's: {early:?}"
    );

    assert_eq!(redis.cli(&["CLIENT", "UNPAUSE"]).trim(), "OK");
    // Replies in call order, each honest.
    let (got, ended) = read_replies(&mut recv, 2).await;
    assert!(!ended, "stream ended after {got:?}");
    assert!(
        matches!(
            got.as_slice(),
            [
                (1, Ok(Reply::Pushed(PushOutcome::Forwarded))),
                (2, Ok(Reply::Pushed(PushOutcome::Delivered)))
            ]
        ),
        "{got:?}"
    );
    let f = next_push(&mut kb).await;
    assert_eq!(&f.body[..], b"remote");

    send.finish().unwrap();
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(WAIT, endpoint.wait_idle()).await;
}

/// The refresh loads the tier's scripts, so calls started together (as a
/// pipelined stream starts them) find them loaded and none runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_calls_find_their_scripts_loaded() {
    let t = Tier::start(2).await;
    let mut kb = t.nodes[1].client(Via::Tcp, "kb").await;
    t.wait_owner("kb", 1).await;
    let TierRedis::One(redis) = &t.redis else {
        unreachable!("one server")
    };
    let loads = || {
        redis
            .0
            .command_calls()
            .get("script|load")
            .copied()
            .unwrap_or(0)
    };
    // Both nodes' first refreshes: route, shared-history and directory scripts.
    crate::tier::wait_for("both nodes loaded the scripts", || async {
        loads() >= 2 * 5
    })
    .await;
    let before = loads();
    let a = t.nodes[0].backend().await;
    let calls = (0..32).map(|i| a.push_msg("kb", 1000, format!("m{i}")));
    let outcomes = futures_util::future::join_all(calls).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Ok(PushOutcome::Forwarded))),
        "{outcomes:?}"
    );
    assert_eq!(loads(), before, "a call loaded a script");
    let mut got = Vec::new();
    while got.len() < 32 {
        got.push(next_push(&mut kb).await.body);
    }
    for i in 0..32 {
        let want = format!("m{i}");
        assert_eq!(
            got.iter().filter(|b| b[..] == *want.as_bytes()).count(),
            1,
            "{want}: {got:?}"
        );
    }
}

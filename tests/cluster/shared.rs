//! (e) Key history in the tier's Redis (`history.store = "redis"`): a client
//! whose node goes away resumes on another node and gets every push it missed,
//! in order, then live ones; outcomes say what happened to each push.

use std::time::Duration;

use quicpush::client::{Backoff, Dial, Event, ResumingClient};
use quicpush::config::HistoryStoreKind;
use quicpush::protocol::{PushMeta, Source};
use quicpush::rpc::proto::PushOutcome;

use crate::common::{Via, WAIT};
use crate::tier::{wait_for, Tier};

async fn next_push(c: &mut ResumingClient) -> (String, PushMeta) {
    match tokio::time::timeout(WAIT, c.next())
        .await
        .expect("a push in time")
    {
        Event::Push(f, meta) => (String::from_utf8_lossy(&f.body).into_owned(), meta),
        other => panic!("expected a push, got {other:?}"),
    }
}

/// Until the client's next resume (replies before it skipped).
async fn resumed(c: &mut ResumingClient) -> quicpush::resume::ResumeReply {
    loop {
        match tokio::time::timeout(WAIT, c.next())
            .await
            .expect("resumed in time")
        {
            Event::Resumed(r) => return r,
            Event::Reply(_) => continue,
            other => panic!("expected a resume, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_with_every_push_it_missed() {
    resumes_elsewhere(Tier::start_with(3, |c| c.history.store = HistoryStoreKind::Redis).await)
        .await;
}

/// The body, on `t`'s Redis (one server, or a Redis Cluster).
pub async fn resumes_elsewhere(mut t: Tier) {
    let dials = vec![Dial::Tcp(t.nodes[1].tcp), Dial::Tcp(t.nodes[2].tcp)];
    let (mut c, reply) =
        ResumingClient::connect_any(dials, t.nodes[1].token("mob"), Backoff::default())
            .await
            .expect("a node");
    let key = reply.source(Source::Key).expect("key history is on");
    assert_eq!(key.offset, 0);
    // The key is claimed before AuthReply: no wait for the directory writer.
    let a = t.nodes[0].backend().await;
    for i in 0..30 {
        assert_eq!(
            a.push_msg("mob", 1000, format!("m{i}")).await.unwrap(),
            PushOutcome::Forwarded,
            "push {i}"
        );
    }
    for i in 0..30u64 {
        let (body, meta) = next_push(&mut c).await;
        assert_eq!(body, format!("m{i}"));
        assert_eq!((meta.epoch, meta.offset), (key.epoch, i + 1));
    }

    // n1 drains and leaves (its directory entries deleted); pushes meanwhile
    // are kept in Redis and answer Stored.
    t.nodes.remove(1).stop().await;
    wait_for("n1's entry for the key is gone", || async {
        t.owner("mob").await.is_none()
    })
    .await;
    let mut stored = 0;
    for i in 30..40 {
        let o = a.push_msg("mob", 1000, format!("m{i}")).await.unwrap();
        assert!(
            matches!(o, PushOutcome::Stored | PushOutcome::Forwarded),
            "push {i}: {o:?}"
        );
        stored += u32::from(o == PushOutcome::Stored);
    }
    // The client resumes on n2: recovered, the 10 missed, then live ones.
    let reply = resumed(&mut c).await;
    let state = reply.source(Source::Key).unwrap();
    assert_eq!(state.recovered, Some(true), "{reply:?}");
    assert_eq!((state.epoch, state.offset), (key.epoch, 40));
    assert!(matches!(c.dial(), Dial::Tcp(addr) if *addr == t.nodes[1].tcp));
    for i in 30..40u64 {
        let (body, meta) = next_push(&mut c).await;
        assert_eq!(body, format!("m{i}"));
        assert_eq!(meta.offset, i + 1);
    }
    assert_eq!(
        a.push_msg("mob", 1000, "live").await.unwrap(),
        PushOutcome::Forwarded
    );
    let (body, meta) = next_push(&mut c).await;
    assert_eq!((body.as_str(), meta.offset), ("live", 41));
    assert!(
        stored > 0,
        "every push while away was Forwarded to a leaving node"
    );

    // A key nobody holds and that has no stream keeps nothing.
    assert_eq!(
        a.push_msg("nobody", 1000, "x").await.unwrap(),
        PushOutcome::Offline
    );
    // The pushes were one stream in Redis, whichever node took them.
    let b = t.nodes[1].backend().await;
    assert_eq!(
        b.push_msg("mob", 1000, "from n2").await.unwrap(),
        PushOutcome::Forwarded
    );
    let (body, meta) = next_push(&mut c).await;
    assert_eq!((body.as_str(), meta.offset), ("from n2", 42));
    tokio::time::sleep(Duration::from_millis(100)).await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_key_pushes_are_unavailable_and_connects_are_refused() {
    redis_down_with_shared_history(
        Tier::start_with(2, |c| c.history.store = HistoryStoreKind::Redis).await,
    )
    .await;
}

/// The body, on `t`'s Redis (one server, or every master of a Redis Cluster).
pub async fn redis_down_with_shared_history(mut t: Tier) {
    let mut kd = t.nodes[1].client(Via::Tcp, "kd").await;
    let a = t.nodes[0].backend().await;
    assert_eq!(
        a.push_msg("kd", 1000, "before").await.unwrap(),
        PushOutcome::Forwarded
    );
    assert_eq!(
        crate::tier::drain_bodies(&mut kd).await,
        crate::tier::bodies(&["before"])
    );

    t.redis.kill();
    // Not kept anywhere, so not accepted: the backend is told.
    assert_eq!(
        a.push_msg("kd", 1000, "lost").await.unwrap(),
        PushOutcome::Unavailable
    );
    // A new connection cannot claim its key: it is closed before AuthReply
    // (the client retries), rather than registered where no push can find it.
    let mut refused = t.nodes[1].raw_client(Via::Tcp).await;
    let token = t.nodes[1].token("kx");
    assert!(refused.auth(token).await.is_err());

    t.redis.restart();
    wait_for("kd forwarded again", || async {
        a.push_msg("kd", 1000, "after").await.unwrap() == PushOutcome::Forwarded
    })
    .await;
    let got = crate::tier::drain_bodies_quiet(&mut kd, Duration::from_secs(2)).await;
    assert!(got.iter().all(|b| &b[..] == b"after"), "{got:?}");
    assert!(!got.is_empty());
    let _kx = t.nodes[1].client(Via::Tcp, "kx").await;
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_resumes_on_another_node_with_every_user_push_it_missed() {
    user_resumes_elsewhere(
        Tier::start_with(3, |c| c.history.store = HistoryStoreKind::Redis).await,
    )
    .await;
}

/// The body, on `t`'s Redis (one server, or a Redis Cluster).
pub async fn user_resumes_elsewhere(mut t: Tier) {
    let mut claims = t.nodes[1].claims("phone");
    claims.mid = Some(77);
    let token = t.nodes[1].sign(&claims);
    let dials = vec![Dial::Tcp(t.nodes[1].tcp), Dial::Tcp(t.nodes[2].tcp)];
    let (mut c, reply) = ResumingClient::connect_any(dials, token, Backoff::default())
        .await
        .expect("a node");
    let user = reply.source(Source::User).expect("user history is on");
    let a = t.nodes[0].backend().await;
    for i in 0..5 {
        let tally = a.push_user(vec![77], 1000, format!("u{i}")).await.unwrap();
        assert_eq!((tally.appended, tally.forwarded_nodes), (1, 1), "{tally:?}");
    }
    for i in 0..5u64 {
        let (body, meta) = next_push(&mut c).await;
        assert_eq!(body, format!("u{i}"));
        assert_eq!(
            (meta.source, meta.epoch, meta.offset),
            (Source::User, user.epoch, i + 1)
        );
    }
    t.nodes.remove(1).stop().await;
    for i in 5..10 {
        let tally = a.push_user(vec![77], 1000, format!("u{i}")).await.unwrap();
        assert_eq!(tally.appended, 1, "{tally:?}");
    }
    // A key push in between: both sources replay, each in its own order.
    assert_eq!(
        a.push_msg("phone", 1000, "k").await.unwrap(),
        PushOutcome::Stored
    );
    let reply = resumed(&mut c).await;
    let state = reply.source(Source::User).unwrap();
    assert_eq!(
        (state.recovered, state.offset),
        (Some(true), 10),
        "{reply:?}"
    );
    assert_eq!(reply.source(Source::Key).unwrap().recovered, Some(true));
    let mut users = Vec::new();
    let mut keys = Vec::new();
    for _ in 0..6 {
        let (body, meta) = next_push(&mut c).await;
        match meta.source {
            Source::User => users.push((body, meta.offset)),
            _ => keys.push(body),
        }
    }
    let want: Vec<(String, u64)> = (5..10).map(|i| (format!("u{i}"), i + 1)).collect();
    assert_eq!(users, want);
    assert_eq!(keys, vec!["k".to_string()]);
    // Live again, on n2.
    crate::tier::wait_for("n2 holds the user", || async {
        a.push_user(vec![77], 1000, "probe")
            .await
            .unwrap()
            .forwarded_nodes
            == 1
    })
    .await;
    let (body, meta) = next_push(&mut c).await;
    assert_eq!((meta.source, meta.offset), (Source::User, 11));
    assert_eq!(body, "probe");
    t.stop().await;
}

fn shared_rooms(c: &mut quicpush::Config) {
    c.history.store = HistoryStoreKind::Redis;
    c.history.room = true;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_member_resumes_on_another_node_with_every_room_push_it_missed() {
    room_resumes_elsewhere(Tier::start_with(3, shared_rooms).await).await;
}

/// With `history.room` as well, the room's stream is the tier's: a member whose
/// node left resumes its room on another node, recovered, in order.
pub async fn room_resumes_elsewhere(mut t: Tier) {
    let mut claims = t.nodes[1].claims("viewer");
    claims.room_id = Some("live://m".into());
    let token = t.nodes[1].sign(&claims);
    let dials = vec![Dial::Tcp(t.nodes[1].tcp), Dial::Tcp(t.nodes[2].tcp)];
    let (mut c, reply) = ResumingClient::connect_any(dials, token, Backoff::default())
        .await
        .expect("a node");
    let room = reply.source(Source::Room).expect("room history is on");
    let a = t.nodes[0].backend().await;
    for i in 0..5 {
        let tally = a
            .broadcast_room("live://m", 1000, format!("r{i}"))
            .await
            .unwrap();
        // Claimed at connect: no wait for the directory writer.
        assert_eq!((tally.appended, tally.forwarded_nodes), (1, 1), "{tally:?}");
    }
    for i in 0..5u64 {
        let (body, meta) = next_push(&mut c).await;
        assert_eq!(body, format!("r{i}"));
        assert_eq!(
            (meta.source, meta.epoch, meta.offset),
            (Source::Room, room.epoch, i + 1)
        );
    }
    t.nodes.remove(1).stop().await;
    for i in 5..10 {
        let tally = a
            .broadcast_room("live://m", 1000, format!("r{i}"))
            .await
            .unwrap();
        assert_eq!(
            tally.appended, 1,
            "kept while no node has members: {tally:?}"
        );
    }
    let reply = resumed(&mut c).await;
    let state = reply.source(Source::Room).unwrap();
    assert_eq!(
        (state.recovered, state.epoch, state.offset),
        (Some(true), room.epoch, 10),
        "{reply:?}"
    );
    for i in 5..10u64 {
        let (body, meta) = next_push(&mut c).await;
        assert_eq!(
            (body, meta.source, meta.offset),
            (format!("r{i}"), Source::Room, i + 1)
        );
    }
    let tally = a.broadcast_room("live://m", 1000, "live").await.unwrap();
    assert_eq!(tally.forwarded_nodes, 1, "{tally:?}");
    let (body, meta) = next_push(&mut c).await;
    assert_eq!((body.as_str(), meta.offset), ("live", 11));
    // ChangeRoom claims the new room here before it answers: the next push to
    // it reaches this node at once, first in the new room's stream.
    c.connection()
        .expect("connected")
        .send(quicpush::protocol::op::CHANGE_ROOM, "live://n")
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, c.next()).await.expect("a reply") {
        Event::Reply(f) => {
            assert_eq!(f.op, quicpush::protocol::op::CHANGE_ROOM_REPLY)
        }
        other => panic!("expected ChangeRoomReply, got {other:?}"),
    }
    let tally = a.broadcast_room("live://n", 1000, "new").await.unwrap();
    assert_eq!((tally.appended, tally.forwarded_nodes), (1, 1), "{tally:?}");
    let (body, meta) = next_push(&mut c).await;
    assert_eq!(
        (body.as_str(), meta.source, meta.offset),
        ("new", Source::Room, 1)
    );
    t.stop().await;
}

fn shared_broadcasts(c: &mut quicpush::Config) {
    c.history.store = HistoryStoreKind::Redis;
    c.history.all = true;
}

/// The next `n` push bodies `c` receives, in arrival order.
async fn bodies_in_order(c: &mut quicpush::client::PushClient, n: usize) -> Vec<String> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let f = tokio::time::timeout(WAIT, c.next_frame())
            .await
            .expect("a push in time")
            .expect("a frame")
            .expect("still connected");
        if f.op == 1000 {
            v.push(String::from_utf8_lossy(&f.body).into_owned());
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_broadcasts_on_another_node_with_every_one_it_missed() {
    let mut t = broadcast_resumes_elsewhere(Tier::start_with(3, shared_broadcasts).await).await;
    // Redis down: a broadcast needs the shared stream, so it is refused with
    // the reason, never fanned out unkept.
    t.redis.kill();
    let a = t.nodes[0].backend().await;
    let err = a.broadcast(1000, "lost", 0).await.unwrap_err().to_string();
    assert!(
        err.contains("broadcast not appended to the shared history"),
        "{err}"
    );
    t.redis.restart();
    t.stop().await;
}

/// With `history.all`, the broadcast stream is the tier's: every node fans a
/// broadcast out once, in the stream's order, and a client whose node left
/// resumes its broadcasts on another node, recovered, in order. Returns the
/// tier, still running.
pub async fn broadcast_resumes_elsewhere(mut t: Tier) -> Tier {
    let dials = vec![Dial::Tcp(t.nodes[1].tcp), Dial::Tcp(t.nodes[2].tcp)];
    let (mut c, reply) =
        ResumingClient::connect_any(dials, t.nodes[1].token("mob"), Backoff::default())
            .await
            .expect("a node");
    let all = reply.source(Source::All).expect("broadcast history is on");
    // goim clients on the two other nodes (the backend's node included).
    let mut on0 = t.nodes[0].client(Via::Tcp, "g0").await;
    let mut on2 = t.nodes[2].client(Via::Tcp, "g2").await;
    let a = t.nodes[0].backend().await;
    t.wait_all_live().await;
    for i in 0..5 {
        a.broadcast(1000, format!("b{i}"), 0).await.unwrap();
    }
    let want: Vec<String> = (0..5).map(|i| format!("b{i}")).collect();
    for i in 0..5u64 {
        let (body, meta) = next_push(&mut c).await;
        assert_eq!(body, want[i as usize]);
        assert_eq!(
            (meta.source, meta.epoch, meta.offset),
            (Source::All, all.epoch, all.offset + i + 1)
        );
    }
    assert_eq!(bodies_in_order(&mut on0, 5).await, want);
    assert_eq!(bodies_in_order(&mut on2, 5).await, want);
    t.nodes.remove(1).stop().await;
    for i in 5..10 {
        a.broadcast(1000, format!("b{i}"), 0).await.unwrap();
    }
    let reply = resumed(&mut c).await;
    let state = reply.source(Source::All).unwrap();
    assert_eq!(
        (state.recovered, state.epoch, state.offset),
        (Some(true), all.epoch, all.offset + 10),
        "{reply:?}"
    );
    for i in 5..10u64 {
        let (body, meta) = next_push(&mut c).await;
        assert_eq!(
            (body, meta.source, meta.offset),
            (format!("b{i}"), Source::All, all.offset + i + 1)
        );
    }
    // `online` counts the other nodes as of their last refresh (tested in
    // `pushes`); this node's own client is always in it.
    let online = a.broadcast(1000, "live", 0).await.unwrap();
    assert!(online >= 1, "online {online}");
    let (body, meta) = next_push(&mut c).await;
    assert_eq!((body.as_str(), meta.offset), ("live", all.offset + 11));
    // Exactly once on the nodes that stayed: the five before, the five after
    // and the live one, in order, and nothing else.
    let want: Vec<String> = (5..10)
        .map(|i| format!("b{i}"))
        .chain(["live".to_owned()])
        .collect();
    assert_eq!(bodies_in_order(&mut on0, 6).await, want);
    assert_eq!(bodies_in_order(&mut on2, 6).await, want);
    assert!(crate::tier::drain_bodies(&mut on0).await.is_empty());
    t
}

//! Every push method reaches TCP and QUIC clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use quicpush::channel::PushOutcome;
use quicpush::rpc::proto::PushItem;

#[tokio::test]
async fn push_msg_reaches_tcp_and_quic_clients() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    for via in BOTH {
        let key = format!("k-{via:?}");
        let mut c = s.client(via, &key).await;
        assert_eq!(
            backend.push_msg(key.as_str(), 1000, "hello").await.unwrap(),
            PushOutcome::Delivered
        );
        let f = next_push(&mut c).await;
        assert_eq!((f.op, &f.body[..]), (1000, &b"hello"[..]), "{via:?}");
        assert_eq!(f.seq, 1, "first push carries push sequence 1");
        backend.push_msg(key.as_str(), 1001, "again").await.unwrap();
        let f = next_push(&mut c).await;
        assert_eq!((f.op, f.seq, &f.body[..]), (1001, 2, &b"again"[..]));
    }
    assert_eq!(
        backend.push_msg("nobody", 1000, "x").await.unwrap(),
        PushOutcome::Offline
    );
    s.stop().await;
}

#[tokio::test]
async fn mpush_msg_gives_per_key_outcomes_and_index() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut a = s.client(Via::Tcp, "a").await;
    let mut b = s.client(Via::Quic, "b").await;
    let m = backend
        .mpush_msg(vec!["a".into(), "b".into(), "gone".into()], 1000, "multi")
        .await
        .unwrap();
    assert_eq!(
        m.outcomes,
        vec![
            PushOutcome::Delivered,
            PushOutcome::Delivered,
            PushOutcome::Offline
        ]
    );
    assert_eq!(m.index, 1);
    for c in [&mut a, &mut b] {
        let f = next_push(c).await;
        assert_eq!(&f.body[..], b"multi");
    }
    let none = backend
        .mpush_msg(vec!["x".into(), "y".into()], 1000, "m")
        .await
        .unwrap();
    assert_eq!(none.index, -1);
    s.stop().await;
}

#[tokio::test]
async fn mpush_msgs_delivers_each_message_to_its_key_in_order() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut a = s.client(Via::Tcp, "a").await;
    let mut b = s.client(Via::Quic, "b").await;
    let msgs = vec![
        PushItem {
            key: "a".into(),
            op: 1000,
            body: "a1".into(),
        },
        PushItem {
            key: "b".into(),
            op: 1001,
            body: "b1".into(),
        },
        PushItem {
            key: "a".into(),
            op: 1002,
            body: "a2".into(),
        },
        PushItem {
            key: "zz".into(),
            op: 1000,
            body: "lost".into(),
        },
    ];
    let m = backend.mpush_msgs(msgs).await.unwrap();
    assert_eq!(m.count(PushOutcome::Delivered), 3);
    assert_eq!(m.outcomes[3], PushOutcome::Offline);
    assert_eq!(m.index, 2);
    let f = next_push(&mut a).await;
    assert_eq!((f.op, &f.body[..]), (1000, &b"a1"[..]));
    let f = next_push(&mut a).await;
    assert_eq!((f.op, &f.body[..]), (1002, &b"a2"[..]));
    let f = next_push(&mut b).await;
    assert_eq!((f.op, &f.body[..]), (1001, &b"b1"[..]));
    s.stop().await;
}

#[tokio::test]
async fn push_user_reaches_every_connection_of_the_user() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut c1 = s.claims("u7-phone");
    c1.mid = Some(7);
    let mut c2 = s.claims("u7-laptop");
    c2.mid = Some(7);
    let mut c3 = s.claims("u8");
    c3.mid = Some(8);
    let mut phone = s.client_with(Via::Quic, &c1).await;
    let mut laptop = s.client_with(Via::Tcp, &c2).await;
    let mut other = s.client_with(Via::Tcp, &c3).await;
    let t = backend.push_user(vec![7], 1000, "for 7").await.unwrap();
    assert_eq!(t.delivered, 2);
    for c in [&mut phone, &mut laptop] {
        assert_eq!(&next_push(c).await.body[..], b"for 7");
    }
    backend.push_user(vec![8], 1000, "for 8").await.unwrap();
    // user 8's first push is the one meant for it: the one for 7 never arrived
    assert_eq!(&next_push(&mut other).await.body[..], b"for 8");
    s.stop().await;
}

#[tokio::test]
async fn broadcast_room_reaches_only_the_room() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut members = Vec::new();
    for (i, via) in [Via::Tcp, Via::Quic, Via::Tcp, Via::Quic]
        .into_iter()
        .enumerate()
    {
        let mut c = s.claims(&format!("m{i}"));
        c.room_id = Some("live://1".into());
        members.push(s.client_with(via, &c).await);
    }
    let mut outsider = s.client(Via::Tcp, "outsider").await;
    let t = backend
        .broadcast_room("live://1", 1000, "room!")
        .await
        .unwrap();
    assert_eq!(t.delivered, 4);
    for m in &mut members {
        assert_eq!(&next_push(m).await.body[..], b"room!");
    }
    backend.push_msg("outsider", 1000, "direct").await.unwrap();
    assert_eq!(&next_push(&mut outsider).await.body[..], b"direct");
    let rooms = backend.rooms().await.unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!((rooms[0].room.as_str(), rooms[0].online), ("live://1", 4));
    s.stop().await;
}

#[tokio::test]
async fn broadcast_reaches_everyone_in_order() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let via = if i % 2 == 0 { Via::Tcp } else { Via::Quic };
        clients.push(s.client(via, &format!("c{i}")).await);
    }
    let online = backend.online().await.unwrap();
    assert_eq!((online.total, online.tcp, online.quic), (10, 5, 5));
    for n in 0..20 {
        assert_eq!(
            backend.broadcast(1000, format!("b{n}"), 0).await.unwrap(),
            10
        );
    }
    for c in &mut clients {
        for n in 0..20 {
            let f = next_push(c).await;
            assert_eq!(f.body, format!("b{n}").as_bytes());
            assert_eq!(f.seq, n + 1);
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn paced_broadcast_delivers_everything() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(s.client(Via::Tcp, &format!("c{i}")).await);
    }
    backend.broadcast(1000, "slow", 200).await.unwrap();
    for c in &mut clients {
        assert_eq!(&next_push(c).await.body[..], b"slow");
    }
    s.stop().await;
}

#[tokio::test]
async fn op_filter_applies_to_every_push_method() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    for via in BOTH {
        let key = format!("picky-{via:?}");
        let mut claims = s.claims(&key);
        claims.accepts = vec![1000];
        claims.room_id = Some(format!("room-{via:?}"));
        claims.mid = Some(42);
        let mut c = s.client_with(via, &claims).await;
        assert_eq!(
            backend.push_msg(key.as_str(), 1001, "no").await.unwrap(),
            PushOutcome::Filtered
        );
        let t = backend
            .broadcast_room(format!("room-{via:?}"), 1001, "no")
            .await
            .unwrap();
        assert_eq!((t.delivered, t.filtered), (0, 1));
        backend.broadcast(1001, "no", 0).await.unwrap();
        assert_eq!(
            backend
                .push_user(vec![42], 1001, "no")
                .await
                .unwrap()
                .filtered,
            1
        );
        assert_eq!(
            backend.push_msg(key.as_str(), 1000, "yes").await.unwrap(),
            PushOutcome::Delivered
        );
        // nothing filtered arrived before the accepted op
        let f = next_push(&mut c).await;
        assert_eq!((f.op, &f.body[..]), (1000, &b"yes"[..]));
        // broadcasts keep their order: a leaked op 1001 broadcast would come first
        backend.broadcast(1000, "end", 0).await.unwrap();
        let f = next_push(&mut c).await;
        assert_eq!((f.op, &f.body[..]), (1000, &b"end"[..]));
        c.close().await;
        s.wait_online(0).await;
    }
    s.stop().await;
}

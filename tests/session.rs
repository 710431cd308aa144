//! Client sessions: auth, heartbeats, rooms, subscriptions, replacement, bad frames.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::*;
use quicpush::channel::PushOutcome;
use quicpush::client::PushClientError;
use quicpush::protocol::{op, Frame};

fn count_of(f: &Frame) -> u32 {
    assert_eq!(f.op, op::HEARTBEAT_REPLY);
    u32::from_be_bytes(f.body[..].try_into().expect("4-byte count"))
}

#[tokio::test]
async fn auth_reply_echoes_seq_and_has_an_empty_body() {
    let s = TestServer::start().await;
    for via in BOTH {
        let mut c = s.raw_client(via).await;
        let seq = c.send(op::AUTH, s.token("k")).await.unwrap();
        let f = next(&mut c).await;
        assert_eq!((f.op, f.seq, f.body.len()), (op::AUTH_REPLY, seq, 0));
        c.close().await;
    }
    s.stop().await;
}

#[tokio::test]
async fn heartbeat_reply_carries_the_room_online_count() {
    let s = TestServer::start().await;
    let mut clients = Vec::new();
    for (i, via) in [Via::Tcp, Via::Quic, Via::Tcp].into_iter().enumerate() {
        let mut c = s.claims(&format!("h{i}"));
        c.room_id = Some("live://7".into());
        clients.push(s.client_with(via, &c).await);
    }
    let mut lonely = s.client(Via::Quic, "no-room").await;
    for c in &mut clients {
        let seq = c.heartbeat().await.unwrap();
        let f = next(c).await;
        assert_eq!(f.seq, seq);
        assert_eq!(count_of(&f), 3);
    }
    lonely.heartbeat().await.unwrap();
    assert_eq!(count_of(&next(&mut lonely).await), 0);
    s.stop().await;
}

#[tokio::test]
async fn rooms_beyond_the_limit_are_refused() {
    let s = TestServer::start_with(|c| c.registry.max_rooms = 2).await;
    let backend = s.backend().await;
    let in_room = |key: &str, room: &str| {
        let mut claims = s.claims(key);
        claims.room_id = Some(room.into());
        claims
    };
    let mut a = s.client_with(Via::Tcp, &in_room("a", "r1")).await;
    let _b = s.client_with(Via::Quic, &in_room("b", "r2")).await;
    for via in BOTH {
        // Auth into a third room: closed before AuthReply
        let mut c = s.raw_client(via).await;
        c.send(op::AUTH, s.sign(&in_room("c", "r3"))).await.unwrap();
        assert_closed(&mut c).await;
    }
    // an existing room can still be joined
    let mut d = s.client_with(Via::Tcp, &in_room("d", "r1")).await;
    // ChangeRoom into a third room closes the client; it stays counted nowhere
    a.send(op::CHANGE_ROOM, "r3").await.unwrap();
    assert_closed(&mut a).await;
    s.wait_online(2).await;
    let rooms: Vec<(String, u64)> = backend
        .rooms()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.room, r.online))
        .collect();
    assert_eq!(rooms, vec![("r1".into(), 1), ("r2".into(), 1)]);
    backend
        .broadcast_room("r1", 1000, "still here")
        .await
        .unwrap();
    assert_eq!(&next_push(&mut d).await.body[..], b"still here");
    s.stop().await;
}

#[tokio::test]
async fn change_room_moves_the_client() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    for via in BOTH {
        let mut claims = s.claims("mover");
        claims.room_id = Some("live://a".into());
        let mut c = s.client_with(via, &claims).await;
        let seq = c.send(op::CHANGE_ROOM, "live://b").await.unwrap();
        let f = next(&mut c).await;
        assert_eq!(
            (f.op, f.seq, &f.body[..]),
            (op::CHANGE_ROOM_REPLY, seq, &b"live://b"[..])
        );
        assert_eq!(
            backend
                .broadcast_room("live://a", 1000, "old")
                .await
                .unwrap()
                .delivered,
            0
        );
        assert_eq!(
            backend
                .broadcast_room("live://b", 1000, "new")
                .await
                .unwrap()
                .delivered,
            1
        );
        assert_eq!(&next_push(&mut c).await.body[..], b"new");
        let rooms = backend.rooms().await.unwrap();
        assert_eq!(rooms.len(), 1, "the empty room is gone: {rooms:?}");
        assert_eq!(rooms[0].room, "live://b");
        c.heartbeat().await.unwrap();
        assert_eq!(count_of(&next(&mut c).await), 1);
        c.close().await;
        s.wait_online(0).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn sub_and_unsub_change_the_accepted_ops() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut claims = s.claims("subber");
    claims.accepts = vec![1000];
    let mut c = s.client_with(Via::Tcp, &claims).await;
    let seq = c.send(op::SUB, "1001,1002").await.unwrap();
    let f = next(&mut c).await;
    assert_eq!((f.op, f.seq), (op::SUB_REPLY, seq));
    assert_eq!(
        backend.push_msg("subber", 1002, "x").await.unwrap(),
        PushOutcome::Delivered
    );
    assert_eq!(next_push(&mut c).await.op, 1002);
    c.send(op::UNSUB, "1002").await.unwrap();
    assert_eq!(next(&mut c).await.op, op::UNSUB_REPLY);
    assert_eq!(
        backend.push_msg("subber", 1002, "x").await.unwrap(),
        PushOutcome::Filtered
    );
    assert_eq!(
        backend.push_msg("subber", 1001, "x").await.unwrap(),
        PushOutcome::Delivered
    );
    s.stop().await;
}

#[tokio::test]
async fn send_msg_is_echoed_and_raw_frames_are_split() {
    let s = TestServer::start().await;
    let mut c = s.client(Via::Quic, "talker").await;
    let seq = c.send(op::SEND_MSG, "ping?").await.unwrap();
    let f = next(&mut c).await;
    assert_eq!(
        (f.op, f.seq, &f.body[..]),
        (op::SEND_MSG_REPLY, seq, &b"ping?"[..])
    );
    let inner = [
        Frame::new(op::HEARTBEAT, 50, Bytes::new()),
        Frame::new(op::SEND_MSG, 51, "in raw"),
    ];
    c.send(op::RAW, quicpush::protocol::join_raw(&inner))
        .await
        .unwrap();
    assert_eq!((next(&mut c).await.seq), 50);
    let f = next(&mut c).await;
    assert_eq!(
        (f.op, f.seq, &f.body[..]),
        (op::SEND_MSG_REPLY, 51, &b"in raw"[..])
    );
    s.stop().await;
}

#[tokio::test]
async fn a_second_connection_with_the_same_key_replaces_the_first() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    for (first, second) in [(Via::Tcp, Via::Quic), (Via::Quic, Via::Tcp)] {
        let mut old = s.client(first, "dup").await;
        let mut new = s.client(second, "dup").await;
        let f = next(&mut old).await;
        assert_eq!(f.op, op::DISCONNECT_REPLY);
        let why = quicpush::client::Disconnect::parse(&f.body).expect("a JSON body");
        assert_eq!((why.reason.as_str(), why.reconnect), ("replaced", false));
        assert_closed(&mut old).await;
        assert_eq!(s.registry.online().total, 1);
        backend
            .push_msg("dup", 1000, "to the new one")
            .await
            .unwrap();
        assert_eq!(&next_push(&mut new).await.body[..], b"to the new one");
        new.close().await;
        s.wait_online(0).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn auth_failures_close_the_connection() {
    let s = TestServer::start().await;
    let expired = {
        let mut c = s.claims("late");
        c.exp = quicpush::auth::now_secs() - 3600;
        s.sign(&c)
    };
    let foreign =
        quicpush::auth::issue(b"not-the-server-secret-0123456789", &s.claims("forger")).unwrap();
    for via in BOTH {
        for (what, token) in [
            ("bad signature", foreign.clone()),
            ("expired", expired.clone()),
            ("missing", String::new()),
            ("garbage", "not.a.jwt".to_string()),
        ] {
            let mut c = s.raw_client(via).await;
            match c.auth(token).await {
                Err(PushClientError::Closed) | Err(PushClientError::Io(_)) => {}
                other => panic!("{what} over {via:?}: expected a closed connection, got {other:?}"),
            }
        }
        // a first frame that is not Auth
        let mut c = s.raw_client(via).await;
        c.heartbeat().await.unwrap();
        assert_closed(&mut c).await;
    }
    assert_eq!(s.registry.online().total, 0);
    s.stop().await;
}

#[tokio::test]
async fn handshake_timeout_closes_a_silent_client() {
    let s = TestServer::start_with(|c| {
        c.client.handshake_timeout = std::time::Duration::from_millis(200)
    })
    .await;
    let mut c = s.raw_client(Via::Tcp).await;
    assert_closed(&mut c).await;
    s.stop().await;
}

#[tokio::test]
async fn heartbeat_timeout_closes_an_idle_client() {
    let s = TestServer::start_with(|c| {
        c.client.heartbeat_timeout = std::time::Duration::from_millis(300)
    })
    .await;
    for via in BOTH {
        let mut c = s.client(via, "idle").await;
        assert_closed(&mut c).await;
    }
    s.wait_online(0).await;
    s.stop().await;
}

fn bad_header(pack_len: u32, header_len: u16) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u32(pack_len);
    b.put_u16(header_len);
    b.put_u16(1);
    b.put_u32(op::SEND_MSG);
    b.put_u32(1);
    b.freeze()
}

#[tokio::test]
async fn bad_frames_close_only_that_connection() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut bystanders = Vec::new();
    for via in BOTH {
        bystanders.push(s.client(via, &format!("bystander-{via:?}")).await);
    }
    let cases: Vec<(&str, Bytes)> = vec![
        ("oversize body", bad_header(16 + 4097, 16)),
        ("4 GiB packLen", bad_header(u32::MAX, 16)),
        ("headerLen 17", bad_header(16, 17)),
        ("packLen below 16", bad_header(8, 16)),
        (
            "oversize frame with body",
            Frame::new(op::SEND_MSG, 1, vec![b'x'; 5000]).to_bytes(),
        ),
    ];
    for via in BOTH {
        for (what, bytes) in &cases {
            let mut c = s.client(via, "offender").await;
            c.send_raw(bytes).await.unwrap();
            assert_closed(&mut c).await;
            let _ = what;
            for (i, b) in bystanders.iter_mut().enumerate() {
                let key = format!("bystander-{:?}", BOTH[i]);
                assert_eq!(
                    backend
                        .push_msg(key.as_str(), 1000, "still here")
                        .await
                        .unwrap(),
                    PushOutcome::Delivered
                );
                assert_eq!(
                    &next_push(b).await.body[..],
                    b"still here",
                    "after {what} over {via:?}"
                );
            }
        }
    }
    s.wait_online(2).await;
    s.stop().await;
}

#[tokio::test]
async fn kick_disconnects_with_disconnect_reply() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut c = s.client(Via::Quic, "kickme").await;
    assert!(backend.kick("kickme").await.unwrap());
    assert_eq!(next(&mut c).await.op, op::DISCONNECT_REPLY);
    assert_closed(&mut c).await;
    s.wait_online(0).await;
    assert!(!backend.kick("kickme").await.unwrap());
    s.stop().await;
}

#[tokio::test]
async fn open_mode_accepts_goim_json_tokens() {
    let s = TestServer::start_with(|c| c.auth.mode = quicpush::config::AuthMode::Open).await;
    let backend = s.backend().await;
    let mut c = s.raw_client(Via::Tcp).await;
    c.auth(r#"{"mid":123,"key":"goim-key","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002]}"#)
        .await
        .unwrap();
    let t = backend.push_user(vec![123], 1000, "hi goim").await.unwrap();
    assert_eq!(t.delivered, 1);
    assert_eq!(&next_push(&mut c).await.body[..], b"hi goim");
    s.stop().await;
}

#[tokio::test]
async fn a_flood_of_frames_closes_only_the_flooder() {
    let s = TestServer::start_with(|c| c.client.max_frames_per_sec = 10).await;
    let backend = s.backend().await;
    let mut calm = s.client(Via::Quic, "calm").await;
    for via in BOTH {
        let mut flooder = s.client(via, "flooder").await;
        let mut flood = BytesMut::new();
        for seq in 0..1000 {
            Frame::new(op::HEARTBEAT, seq, Bytes::new()).encode(&mut flood);
        }
        // The writes may fail once the server has closed the connection.
        let _ = flooder.send_raw(&flood).await;
        let mut replies = 0;
        loop {
            match tokio::time::timeout(WAIT, flooder.next_frame()).await {
                Ok(Ok(Some(f))) if f.op == op::HEARTBEAT_REPLY => replies += 1,
                Ok(Ok(Some(f))) => panic!("unexpected {f:?}"),
                Ok(Ok(None)) | Ok(Err(_)) => break,
                Err(_) => panic!("the flooder was not disconnected"),
            }
        }
        assert!(
            replies <= 21,
            "{replies} heartbeats answered past a burst of 20"
        );
        assert_eq!(
            backend.push_msg("calm", 1000, "unaffected").await.unwrap(),
            PushOutcome::Delivered
        );
        assert_eq!(&next_push(&mut calm).await.body[..], b"unaffected");
    }
    s.stop().await;
}

#[tokio::test]
async fn connections_per_source_ip_are_limited() {
    let s = TestServer::start_with(|c| c.client.max_connections_per_ip = 2).await;
    let first = s.client(Via::Tcp, "one").await;
    let _second = s.client(Via::Quic, "two").await;
    // a third from 127.0.0.1 is refused, over either transport
    let mut third = s.raw_client(Via::Tcp).await;
    assert_closed(&mut third).await;
    let quic = quicpush::client::PushClient::connect_quic(
        s.quic,
        "localhost",
        &s.dir.path().join("ca.pem"),
    )
    .await;
    assert!(quic.is_err(), "a QUIC connection over the limit is refused");
    // once one leaves, there is room again
    first.close().await;
    s.wait_online(1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut c = s.raw_client(Via::Tcp).await;
        if c.auth(s.token("three")).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a client left"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.stop().await;
}

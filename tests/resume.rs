//! Resume without loss: a client that lost its connection (closed abruptly, kicked,
//! closed as a slow consumer) comes back with its last positions and gets every
//! push it missed, once, in per-source order, before any live one; or an honest
//! "not recovered". goim clients that do not ask for resume see no change.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use quicpush::auth::Claims;
use quicpush::channel::PushOutcome;
use quicpush::client::{PushClient, ResumeState};
use quicpush::protocol::{op, Frame, PushMeta, Source};
use quicpush::resume::ResumeReply;

/// The next frame with its resume extension.
async fn next_meta(c: &mut PushClient) -> (Frame, Option<PushMeta>) {
    tokio::time::timeout(WAIT, c.next_frame_meta())
        .await
        .expect("timed out waiting for a frame")
        .expect("read failed")
        .expect("connection closed")
}

/// Reads `n` pushes, noting each in `state`; returns (source, offset, body).
async fn pushes(
    c: &mut PushClient,
    state: &mut ResumeState,
    n: usize,
) -> Vec<(Source, u64, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let (f, m) = next_meta(c).await;
        if f.op == op::HEARTBEAT_REPLY {
            continue;
        }
        let m = m.unwrap_or_else(|| panic!("push without extension: {f:?}"));
        state.observe(&m);
        out.push((
            m.source,
            m.offset,
            String::from_utf8(f.body.to_vec()).unwrap(),
        ));
    }
    out
}

fn claims(s: &TestServer, key: &str, mid: Option<i64>, room: Option<&str>) -> Claims {
    let mut c = s.claims(key);
    c.mid = mid;
    c.room_id = room.map(str::to_owned);
    c
}

async fn resume(
    s: &TestServer,
    via: Via,
    claims: &Claims,
    state: &mut ResumeState,
) -> (PushClient, ResumeReply) {
    let mut c = s.raw_client(via).await;
    let reply = c
        .auth_resume(s.sign(claims).as_bytes(), state)
        .await
        .unwrap();
    (c, reply)
}

fn bodies(v: &[(Source, u64, String)]) -> Vec<&str> {
    v.iter().map(|x| x.2.as_str()).collect()
}

#[tokio::test]
async fn abrupt_close_loses_nothing_from_key_and_user_over_tcp_and_quic() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    for (i, via) in BOTH.into_iter().enumerate() {
        let key = format!("phone-{via:?}");
        let mid = 100 + i as i64;
        let cl = claims(&s, &key, Some(mid), None);
        let mut state = ResumeState::default();
        let (mut c, reply) = resume(&s, via, &cl, &mut state).await;
        assert_eq!(reply.key, key);
        let k0 = reply.source(Source::Key).unwrap();
        assert_eq!((k0.offset, k0.recovered), (0, None), "a first connection");
        assert!(reply.source(Source::User).is_some());
        assert!(
            reply.source(Source::Room).is_none(),
            "room history is off by default"
        );

        backend.push_msg(key.as_str(), 1000, "k1").await.unwrap();
        backend.push_user(vec![mid], 1000, "u1").await.unwrap();
        backend.push_msg(key.as_str(), 1000, "k2").await.unwrap();
        let got = pushes(&mut c, &mut state, 3).await;
        assert_eq!(
            got,
            vec![
                (Source::Key, 1, "k1".into()),
                (Source::User, 1, "u1".into()),
                (Source::Key, 2, "k2".into())
            ]
        );
        // the network goes away without a word
        drop(c);
        s.wait_online(0).await;
        for b in ["k3", "k4"] {
            assert_eq!(
                backend.push_msg(key.as_str(), 1000, b).await.unwrap(),
                PushOutcome::Stored,
                "offline with live history"
            );
        }
        let t = backend.push_user(vec![mid], 1000, "u2").await.unwrap();
        assert_eq!((t.delivered, t.appended), (0, 1));

        let (mut c, reply) = resume(&s, via, &cl, &mut state).await;
        let k = reply.source(Source::Key).unwrap();
        assert_eq!((k.offset, k.recovered), (4, Some(true)));
        let u = reply.source(Source::User).unwrap();
        assert_eq!((u.offset, u.recovered), (2, Some(true)));
        backend.push_msg(key.as_str(), 1000, "k5").await.unwrap();
        let got = pushes(&mut c, &mut state, 4).await;
        assert_eq!(
            bodies(&got),
            ["k3", "k4", "u2", "k5"],
            "replay before live, {via:?}"
        );
        assert_eq!(got[3].1, 5);
        c.close().await;
    }
    s.stop().await;
}

#[tokio::test]
async fn a_gap_larger_than_history_or_another_epoch_is_not_recovered() {
    let s = TestServer::start_with(|c| c.history.size = 2).await;
    let backend = s.backend().await;
    let cl = claims(&s, "k", None, None);
    let mut state = ResumeState::default();
    let (c, _) = resume(&s, Via::Tcp, &cl, &mut state).await;
    drop(c);
    s.wait_online(0).await;
    for i in 1..=3 {
        backend.push_msg("k", 1000, format!("m{i}")).await.unwrap();
    }
    let (mut c, reply) = resume(&s, Via::Tcp, &cl, &mut state).await;
    let k = reply.source(Source::Key).unwrap();
    assert_eq!(
        (k.offset, k.recovered),
        (3, Some(false)),
        "push 1 was dropped"
    );
    assert_eq!(state.not_recovered, 1);
    // nothing is replayed, not even the two that history still holds
    backend.push_msg("k", 1000, "live").await.unwrap();
    let got = pushes(&mut c, &mut state, 1).await;
    assert_eq!(got, vec![(Source::Key, 4, "live".into())]);
    drop(c);
    s.wait_online(0).await;

    // a position in another epoch (a stream that was lost and made anew)
    let mut forged = state.clone();
    let mut p = forged.positions.key.unwrap();
    p.epoch ^= 1;
    forged.positions.key = Some(p);
    let (_c, reply) = resume(&s, Via::Tcp, &cl, &mut forged).await;
    assert_eq!(reply.source(Source::Key).unwrap().recovered, Some(false));
    s.stop().await;
}

#[tokio::test]
async fn a_resume_for_another_keys_position_is_refused() {
    let s = TestServer::start().await;
    let mut state = ResumeState {
        key: Some("victim".into()),
        ..ResumeState::default()
    };
    for via in BOTH {
        let mut c = s.raw_client(via).await;
        let err = c
            .auth_resume(s.token("attacker").as_bytes(), &mut state)
            .await
            .unwrap_err();
        assert!(
            matches!(err, quicpush::client::PushClientError::Closed),
            "{via:?}: {err}"
        );
    }
    assert_eq!(s.registry.online().total, 0);
    s.stop().await;
}

#[tokio::test]
async fn kick_and_slow_consumer_closes_lose_nothing() {
    let s = TestServer::start_with(|c| {
        c.client.queue_size = 4;
        c.client.tcp_send_buffer = 4096;
    })
    .await;
    let backend = s.backend().await;
    for via in BOTH {
        let key = format!("k-{via:?}");
        let cl = claims(&s, &key, None, None);
        let mut state = ResumeState::default();
        let (mut c, _) = resume(&s, via, &cl, &mut state).await;
        backend.push_msg(key.as_str(), 1000, "1").await.unwrap();
        assert_eq!(pushes(&mut c, &mut state, 1).await[0].1, 1);
        assert!(backend.kick(key.as_str()).await.unwrap());
        assert_closed(&mut c).await;
        s.wait_online(0).await;
        backend.push_msg(key.as_str(), 1000, "2").await.unwrap();
        let (mut c, reply) = resume(&s, via, &cl, &mut state).await;
        assert_eq!(reply.source(Source::Key).unwrap().recovered, Some(true));
        assert_eq!(bodies(&pushes(&mut c, &mut state, 1).await), ["2"]);

        // stop reading: once the socket's buffers and the queue of 4 are full, a
        // push kept in history closes the connection instead of being skipped
        let body = |i: u64| format!("{i:04}{}", "x".repeat(3000));
        let mut outcomes = Vec::new();
        let mut i = 2;
        while !outcomes.contains(&PushOutcome::Stored) && i < 3000 {
            i += 1;
            outcomes.push(backend.push_msg(key.as_str(), 1000, body(i)).await.unwrap());
        }
        for _ in 0..3 {
            i += 1;
            outcomes.push(backend.push_msg(key.as_str(), 1000, body(i)).await.unwrap());
        }
        let last = i;
        assert!(outcomes.contains(&PushOutcome::Stored), "{via:?}");
        assert!(!outcomes.contains(&PushOutcome::QueueFull), "{outcomes:?}");
        assert!(!outcomes.contains(&PushOutcome::Offline), "{outcomes:?}");
        // read what the dying connection delivered, then resume
        loop {
            match tokio::time::timeout(WAIT, c.next_frame_meta())
                .await
                .unwrap()
            {
                Ok(Some((f, Some(m)))) if f.op == 1000 => state.observe(&m),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        s.wait_online(0).await;
        let seen = state.positions.key.unwrap().offset;
        let (mut c, reply) = resume(&s, via, &cl, &mut state).await;
        assert_eq!(reply.source(Source::Key).unwrap().recovered, Some(true));
        let rest = pushes(&mut c, &mut state, (last - seen) as usize).await;
        let want: Vec<String> = (seen + 1..=last).map(body).collect();
        assert!(
            bodies(&rest) == want,
            "{via:?}: replay after a slow-consumer close"
        );
        c.close().await;
    }
    s.stop().await;
}

#[tokio::test]
async fn room_and_broadcast_sources_resume_and_change_room_reports_the_new_room() {
    let s = TestServer::start_with(|c| {
        c.history.room = true;
        c.history.all = true;
    })
    .await;
    let backend = s.backend().await;
    let cl = claims(&s, "k", None, Some("live://1"));
    let mut state = ResumeState::default();
    let (mut c, reply) = resume(&s, Via::Quic, &cl, &mut state).await;
    assert!(reply.source(Source::Room).is_some() && reply.source(Source::All).is_some());
    let t = backend
        .broadcast_room("live://1", 1000, "r1")
        .await
        .unwrap();
    assert_eq!((t.delivered, t.appended), (1, 1));
    backend.broadcast(1000, "a1", 0).await.unwrap();
    let got = pushes(&mut c, &mut state, 2).await;
    assert_eq!(
        got,
        vec![
            (Source::Room, 1, "r1".into()),
            (Source::All, 1, "a1".into())
        ]
    );
    drop(c);
    s.wait_online(0).await;
    // a room push with no member online is kept once in the room's stream
    let t = backend
        .broadcast_room("live://1", 1000, "r2")
        .await
        .unwrap();
    assert_eq!((t.delivered, t.appended), (0, 1));
    backend.broadcast(1000, "a2", 0).await.unwrap();
    let (mut c, reply) = resume(&s, Via::Quic, &cl, &mut state).await;
    assert_eq!(reply.source(Source::Room).unwrap().recovered, Some(true));
    assert_eq!(reply.source(Source::All).unwrap().recovered, Some(true));
    let mut got = bodies(&pushes(&mut c, &mut state, 2).await)
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    got.sort();
    assert_eq!(got, ["a2", "r2"]);

    // ChangeRoom: the reply carries the new room's epoch and top offset; a room
    // that no one is in and that has no stream keeps nothing
    let t = backend
        .broadcast_room("live://2", 1000, "lost")
        .await
        .unwrap();
    assert_eq!(t.appended, 0);
    let seq = c.send(op::CHANGE_ROOM, "live://2").await.unwrap();
    let (f, m) = next_meta(&mut c).await;
    let m = m.unwrap();
    assert_eq!(
        (f.op, f.seq, &f.body[..]),
        (op::CHANGE_ROOM_REPLY, seq, &b"live://2"[..])
    );
    assert_eq!((m.source, m.offset), (Source::Room, 0));
    assert_ne!(m.epoch, 0);
    backend
        .broadcast_room("live://2", 1000, "next")
        .await
        .unwrap();
    let (f, m2) = next_meta(&mut c).await;
    let m2 = m2.unwrap();
    assert_eq!(&f.body[..], b"next");
    assert_eq!((m2.epoch, m2.offset), (m.epoch, 1));
    c.close().await;
    s.stop().await;
}

#[tokio::test]
async fn op_filters_apply_to_replayed_pushes() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut cl = claims(&s, "k", None, None);
    cl.accepts = vec![1000];
    let mut state = ResumeState::default();
    let (c, _) = resume(&s, Via::Tcp, &cl, &mut state).await;
    drop(c);
    s.wait_online(0).await;
    backend.push_msg("k", 1001, "filtered").await.unwrap();
    backend.push_msg("k", 1000, "wanted").await.unwrap();
    let (mut c, reply) = resume(&s, Via::Tcp, &cl, &mut state).await;
    assert_eq!(reply.source(Source::Key).unwrap().recovered, Some(true));
    let got = pushes(&mut c, &mut state, 1).await;
    assert_eq!(got, vec![(Source::Key, 2, "wanted".into())]);
    s.stop().await;
}

#[tokio::test]
async fn goim_clients_without_resume_see_todays_bytes() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut c = s.raw_client(Via::Tcp).await;
    c.send(op::AUTH, s.token("goim")).await.unwrap();
    let (reply, m) = next_meta(&mut c).await;
    assert_eq!(
        (reply.op, &reply.body[..], m),
        (op::AUTH_REPLY, &b""[..], None)
    );
    backend.push_msg("goim", 1000, "hi").await.unwrap();
    let (f, m) = next_meta(&mut c).await;
    assert!(m.is_none(), "no extension for a client that did not ask");
    // byte for byte: a 16-byte header, push seq 1
    assert_eq!(
        f.to_bytes(),
        Frame::new(1000, 1, Bytes::from_static(b"hi")).to_bytes()
    );
    s.stop().await;
}

#[tokio::test]
async fn history_off_gives_offline_and_resume_reports_no_source() {
    let s = TestServer::start_with(|c| c.history.enabled = false).await;
    let backend = s.backend().await;
    let cl = claims(&s, "k", None, None);
    let mut state = ResumeState::default();
    let (c, reply) = resume(&s, Via::Tcp, &cl, &mut state).await;
    assert!(reply.sources.is_empty());
    drop(c);
    s.wait_online(0).await;
    assert_eq!(
        backend.push_msg("k", 1000, "x").await.unwrap(),
        PushOutcome::Offline
    );
    s.stop().await;
}

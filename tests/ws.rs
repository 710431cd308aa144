//! The front doors over TCP: WebSocket (ws on `/sub`), WebSocket over TLS (wss)
//! and goim frames in TLS. Each is an adapter onto the one session loop, so what
//! holds over TCP holds here: auth, heartbeats, pushes, resume, limits. Over
//! WebSocket the client checks every message holds one frame or one Raw frame of
//! whole frames (a read fails otherwise), and counts them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use quicpush::channel::PushOutcome;
use quicpush::client::{PushClient, PushClientError, ResumeState};
use quicpush::config::AuthMode;
use quicpush::protocol::{op, Frame, Source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const GOIM_AUTH: &str =
    r#"{"mid":7,"key":"web-1","room_id":"live://1000","platform":"web","accepts":[1000,1001]}"#;

fn goim_auth(key: &str, mid: i64) -> String {
    format!(
        r#"{{"mid":{mid},"key":"{key}","room_id":"live://1000","platform":"web","accepts":[1000,1001]}}"#
    )
}

fn count_of(f: &Frame) -> u32 {
    assert_eq!(f.op, op::HEARTBEAT_REPLY);
    u32::from_be_bytes(f.body[..].try_into().expect("4-byte count"))
}

async fn open_server() -> TestServer {
    TestServer::start_with(|c| c.auth.mode = AuthMode::Open).await
}

/// Waits until a read on `stream` ends (EOF or an error): the server closed it.
async fn assert_socket_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn auth_heartbeat_and_every_push_kind_over_ws_wss_and_tls() {
    let s = open_server().await;
    let backend = s.backend().await;
    for (i, via) in FRONT_DOORS.into_iter().enumerate() {
        let key = format!("web-{via:?}");
        let mid = 100 + i as i64;
        let mut c = s.raw_client(via).await;
        let seq = c.send(op::AUTH, goim_auth(&key, mid)).await.unwrap();
        let f = next(&mut c).await;
        assert_eq!((f.op, f.seq, f.body.len()), (op::AUTH_REPLY, seq, 0));
        s.wait_online(1).await;

        let seq = c.heartbeat().await.unwrap();
        let f = next(&mut c).await;
        assert_eq!(f.seq, seq);
        assert_eq!(count_of(&f), 1, "the room's online count");

        assert_eq!(
            backend
                .push_msg(key.as_str(), 1000, "to the key")
                .await
                .unwrap(),
            PushOutcome::Delivered
        );
        assert_eq!(&next_push(&mut c).await.body[..], b"to the key");
        let t = backend
            .push_user(vec![mid], 1001, "to the mid")
            .await
            .unwrap();
        assert_eq!(t.delivered, 1);
        assert_eq!(&next_push(&mut c).await.body[..], b"to the mid");
        let t = backend
            .broadcast_room("live://1000", 1000, "to the room")
            .await
            .unwrap();
        assert_eq!(t.delivered, 1);
        assert_eq!(&next_push(&mut c).await.body[..], b"to the room");
        backend.broadcast(1000, "to everyone", 0).await.unwrap();
        let f = next_push(&mut c).await;
        assert_eq!((f.op, &f.body[..]), (1000, &b"to everyone"[..]));

        let online = backend.online().await.unwrap();
        let per = match via {
            Via::Ws => online.ws,
            Via::Wss => online.wss,
            _ => online.tls,
        };
        assert_eq!((online.total, per), (1, 1), "{online:?}");
        if via != Via::Tls {
            let (single, raw, _, _) = c.ws_stats().unwrap().counts();
            assert_eq!(single + raw, 6, "six messages, each one frame or one Raw");
        }
        c.close().await;
        s.wait_online(0).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn a_burst_of_room_pushes_arrives_in_order_with_raw_batches() {
    // A small send buffer, and a client that reads only after the burst: the
    // writer blocks and pushes pile up in the queue, to go out together.
    let s = TestServer::start_with(|c| {
        c.auth.mode = AuthMode::Open;
        c.client.tcp_send_buffer = 4096;
    })
    .await;
    let backend = s.backend().await;
    let mut c = s.raw_client(Via::Ws).await;
    c.auth(GOIM_AUTH).await.unwrap();
    const N: usize = 200;
    let body = "x".repeat(900);
    for i in 0..N {
        let t = backend
            .broadcast_room("live://1000", 1000, format!("{i:05}{body}"))
            .await
            .unwrap();
        assert_eq!(t.delivered, 1, "push {i} was not queued");
    }
    for i in 0..N {
        let f = next_push(&mut c).await;
        assert_eq!(
            &f.body[..5],
            format!("{i:05}").as_bytes(),
            "push {i} out of order"
        );
    }
    let (single, raw, raw_frames, most) = c.ws_stats().unwrap().counts();
    assert!(
        raw >= 1,
        "no Raw batch among {single} single-frame messages"
    );
    assert_eq!(
        single + raw_frames,
        N as u64 + 1,
        "every frame once (AuthReply too)"
    );
    // at most 32 KiB a Raw message: fewer than 36 of these 921-byte frames
    assert!(most <= 35, "{most} frames in one Raw message");
    c.close().await;
    s.stop().await;
}

#[tokio::test]
async fn resume_over_ws_wss_and_tls_recovers_missed_pushes() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    for via in FRONT_DOORS {
        let key = format!("phone-{via:?}");
        let token = s.token(&key);
        let mut state = ResumeState::default();
        let mut c = s.raw_client(via).await;
        let reply = c.auth_resume(token.as_bytes(), &mut state).await.unwrap();
        assert_eq!(reply.source(Source::Key).unwrap().recovered, None);
        backend.push_msg(key.as_str(), 1000, "k1").await.unwrap();
        let (f, m) = next_resume_push(&mut c, &mut state).await;
        assert_eq!((&f.body[..], m.offset), (&b"k1"[..], 1));
        // the network goes away without a word
        drop(c);
        s.wait_online(0).await;
        for b in ["k2", "k3", "k4"] {
            assert_eq!(
                backend.push_msg(key.as_str(), 1000, b).await.unwrap(),
                PushOutcome::Stored
            );
        }
        let mut c = s.raw_client(via).await;
        let reply = c.auth_resume(token.as_bytes(), &mut state).await.unwrap();
        let k = reply.source(Source::Key).unwrap();
        assert_eq!((k.offset, k.recovered), (4, Some(true)));
        let mut got = Vec::new();
        for _ in 0..3 {
            let (f, m) = next_resume_push(&mut c, &mut state).await;
            got.push((String::from_utf8(f.body.to_vec()).unwrap(), m.offset));
        }
        assert_eq!(
            got,
            vec![("k2".into(), 2), ("k3".into(), 3), ("k4".into(), 4)]
        );
        backend.push_msg(key.as_str(), 1000, "k5").await.unwrap();
        let (f, m) = next_resume_push(&mut c, &mut state).await;
        assert_eq!(
            (&f.body[..], m.offset),
            (&b"k5"[..], 5),
            "live after the replay"
        );
        if via != Via::Tls {
            // AuthReply alone, then the replay, queued at once: one Raw message
            let (_, raw, raw_frames, _) = c.ws_stats().unwrap().counts();
            assert!(
                raw >= 1 && raw_frames >= 3,
                "the replay went out as a Raw batch"
            );
        }
        c.close().await;
        s.wait_online(0).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn the_upgrade_is_refused_off_sub_and_from_origins_not_allowed() {
    let s = TestServer::start_with(|c| {
        c.auth.mode = AuthMode::Open;
        c.client.ws_allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let ws = s.ws.unwrap();
    for path in ["/", "/subscribe", "/sub/x"] {
        match PushClient::connect_ws_with(ws, path, None).await {
            Err(PushClientError::WsRefused(404)) => {}
            other => panic!("{path}: expected 404, got {other:?}"),
        }
    }
    for origin in ["https://evil.example", "http://app.example", "null"] {
        match PushClient::connect_ws_with(ws, "/sub", Some(origin)).await {
            Err(PushClientError::WsRefused(403)) => {}
            other => panic!("{origin}: expected 403, got {other:?}"),
        }
    }
    // the allowed origin, and a client that sends none, get in
    let mut browser = PushClient::connect_ws_with(ws, "/sub?x=1", Some("https://app.example"))
        .await
        .unwrap();
    browser.auth(goim_auth("browser", 1)).await.unwrap();
    let mut native = PushClient::connect_ws(ws).await.unwrap();
    native.auth(goim_auth("native", 2)).await.unwrap();
    s.wait_online(2).await;
    s.stop().await;
}

#[tokio::test]
async fn an_oversize_message_closes_only_that_connection() {
    let s = open_server().await;
    let backend = s.backend().await;
    let mut calm = s.raw_client(Via::Ws).await;
    calm.auth(goim_auth("calm", 1)).await.unwrap();
    for authed in [false, true] {
        let mut big = s.raw_client(Via::Ws).await;
        if authed {
            big.auth(goim_auth("big", 2)).await.unwrap();
        }
        // one message of max_body + 17 bytes: one more than a frame may be
        let frame = Frame::new(op::SEND_MSG, 9, vec![b'x'; 4097]).to_bytes();
        let _ = big.send_raw(&frame).await;
        assert_closed(&mut big).await;
    }
    assert_eq!(
        backend.push_msg("calm", 1000, "fine").await.unwrap(),
        PushOutcome::Delivered
    );
    assert_eq!(&next_push(&mut calm).await.body[..], b"fine");
    s.stop().await;
}

#[tokio::test]
async fn a_text_message_is_refused_with_a_close_frame() {
    let s = open_server().await;
    let addr = s.ws.unwrap();
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/sub"), socket)
        .await
        .unwrap();
    let auth = Frame::new(op::AUTH, 1, GOIM_AUTH.as_bytes().to_vec()).to_bytes();
    ws.send(Message::Binary(auth)).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Binary(b))) => {
            assert_eq!(
                u32::from_be_bytes(b[8..12].try_into().unwrap()),
                op::AUTH_REPLY
            )
        }
        other => panic!("expected AuthReply, got {other:?}"),
    }
    ws.send(Message::Text("hello".into())).await.unwrap();
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(f)))) => break Some(f.code),
            None | Some(Ok(Message::Close(None))) | Some(Err(_)) => break None,
            Some(Ok(_)) => continue,
        }
    };
    assert_eq!(code, Some(CloseCode::Unsupported));
    s.wait_online(0).await;
    s.stop().await;
}

#[tokio::test]
async fn the_handshake_timeout_covers_the_upgrade_and_the_tls_handshake() {
    let s =
        TestServer::start_with(|c| c.client.handshake_timeout = Duration::from_millis(300)).await;
    for addr in [s.ws.unwrap(), s.wss.unwrap(), s.tls.unwrap()] {
        // opens TCP and sends nothing
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_socket_closed(&mut silent).await;
    }
    // a slow, partial upgrade
    let mut slow = tokio::net::TcpStream::connect(s.ws.unwrap()).await.unwrap();
    slow.write_all(b"GET /sub HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert_socket_closed(&mut slow).await;
    // upgraded, then no Auth: the session's own handshake timeout
    let mut c = PushClient::connect_ws(s.ws.unwrap()).await.unwrap();
    assert_closed(&mut c).await;
    assert_eq!(s.limits.per_ip.count("127.0.0.1".parse().unwrap()), 0);
    // counted: four connections that never got past TLS or the upgrade, one
    // that never sent Auth
    let scrape = || async {
        let r = quicpush::http::client::request(
            s.http.unwrap(),
            "GET",
            "/metrics",
            Some(&s.api_token),
            b"",
        )
        .await
        .unwrap();
        let m = quicpush::metrics::parse_text(&r.text());
        let failures =
            |reason: &str| m[&format!("quicpush_handshake_failures_total{{reason=\"{reason}\"}}")];
        (failures("transport_handshake"), failures("timeout"))
    };
    let counted = common::process::poll_until(Duration::from_secs(5), || async {
        scrape().await == (4.0, 1.0)
    })
    .await;
    assert!(counted, "handshake failures counted: {:?}", scrape().await);
    s.stop().await;
}

#[tokio::test]
async fn the_per_ip_limit_refuses_the_extra_ws_connection() {
    let s = TestServer::start_with(|c| {
        c.auth.mode = AuthMode::Open;
        c.client.max_connections_per_ip = 1;
    })
    .await;
    let mut first = s.raw_client(Via::Ws).await;
    first.auth(goim_auth("first", 1)).await.unwrap();
    for via in FRONT_DOORS {
        // refused at accept, before the upgrade or the TLS handshake
        let extra = match via {
            Via::Ws => PushClient::connect_ws(s.ws.unwrap()).await,
            Via::Wss => PushClient::connect_wss(s.wss.unwrap(), "localhost", &s.ca()).await,
            _ => PushClient::connect_tls(s.tls.unwrap(), "localhost", &s.ca()).await,
        };
        match extra {
            Err(_) => {}
            // a TLS handshake may complete from the client's side before the
            // server's close arrives: then the connection ends at once
            Ok(mut c) => {
                let _ = c.send(op::AUTH, goim_auth("extra", 2)).await;
                assert_closed(&mut c).await;
            }
        }
    }
    assert_eq!(s.registry.online().total, 1);
    first.close().await;
    s.wait_online(0).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut c) = PushClient::connect_ws(s.ws.unwrap()).await {
            if c.auth(goim_auth("again", 3)).await.is_ok() {
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no room after a client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn plain_clients_against_the_tls_ports_fail_cleanly() {
    let s = open_server().await;
    // plain WebSocket against the wss port: the server wanted a ClientHello
    let plain_ws = tokio::time::timeout(WAIT, PushClient::connect_ws(s.wss.unwrap()))
        .await
        .expect("no answer");
    assert!(plain_ws.is_err(), "a plain upgrade on the wss port");
    // a plain goim client against the TLS port
    let mut plain = PushClient::connect_tcp(s.tls.unwrap()).await.unwrap();
    let _ = plain.send(op::AUTH, GOIM_AUTH).await;
    match tokio::time::timeout(WAIT, plain.next_frame())
        .await
        .expect("no answer")
    {
        Ok(None) | Err(_) => {}
        Ok(Some(f)) => panic!("a frame on a TLS port without TLS: {f:?}"),
    }
    // a WebSocket-over-TLS client against the plain TLS port: no HTTP there
    let wss_on_tls = tokio::time::timeout(
        WAIT,
        PushClient::connect_wss(s.tls.unwrap(), "localhost", &s.ca()),
    )
    .await
    .expect("no answer");
    assert!(wss_on_tls.is_err());
    // the server carries on, on every port
    for via in FRONT_DOORS {
        let mut c = s.raw_client(via).await;
        c.auth(goim_auth(&format!("ok-{via:?}"), 1)).await.unwrap();
        c.close().await;
    }
    s.stop().await;
}

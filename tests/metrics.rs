//! `GET /metrics` after a known sequence of connections, pushes, a kick, failed
//! handshakes and resumes: exact values. With metrics off: 404, nothing counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{next_push, TestServer, Via};
use quicpush::client::{PushClient, ResumeState};
use quicpush::history::Position;
use quicpush::http::client;
use quicpush::protocol::{op, Frame, Source};
use quicpush::rpc::proto::{Reply, Request};

async fn scrape(s: &TestServer) -> BTreeMap<String, f64> {
    let r = client::request(s.http.unwrap(), "GET", "/metrics", Some(&s.api_token), b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    quicpush::metrics::parse_text(&r.text())
}

/// Scrapes until every series has its value (counters settle once the sessions
/// and writers have caught up), failing with the last scrape after a while.
async fn expect(s: &TestServer, want: &[(&str, f64)]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = scrape(s).await;
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: want {v}, got {:?}", got.get(*k)))
            .collect();
        if wrong.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("metrics differ:\n{}", wrong.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn in_room(s: &TestServer, key: &str, room: &str) -> quicpush::auth::Claims {
    let mut c = s.claims(key);
    c.room_id = Some(room.to_owned());
    c
}

#[tokio::test]
async fn a_known_sequence_gives_exact_values() {
    // No history: pushes to absent keys are plainly offline.
    let s = TestServer::start_with(|c| c.history.enabled = false).await;
    let mut t: Vec<PushClient> = Vec::new();
    for i in 0..3 {
        t.push(
            s.client_with(Via::Tcp, &in_room(&s, &format!("t{i}"), "live://m"))
                .await,
        );
    }
    let mut q: Vec<PushClient> = Vec::new();
    for i in 0..2 {
        q.push(
            s.client_with(Via::Quic, &in_room(&s, &format!("q{i}"), "live://m"))
                .await,
        );
    }
    s.wait_online(5).await;

    // Two handshake failures over TCP: a first frame that is not Auth, and a
    // connection closed before Auth.
    let mut bad = PushClient::connect_tcp(s.tcp).await.unwrap();
    bad.send(op::HEARTBEAT, &b""[..]).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), bad.next_frame()).await;
    let early = tokio::net::TcpStream::connect(s.tcp).await.unwrap();
    drop(early);

    // 4 keys by the QUIC RPC, 2 of them offline
    let backend = s.backend().await;
    let r = backend
        .call(&Request::MPushMsg {
            keys: vec!["t0".into(), "nobody".into(), "q0".into(), "none".into()],
            op: 1000,
            body: "k".into(),
        })
        .await
        .unwrap();
    assert!(matches!(r, Reply::Multi(ref m) if m.index == 2), "{r:?}");
    next_push(&mut t[0]).await;
    next_push(&mut q[0]).await;

    // a room broadcast over HTTP: 5 members
    let r = client::request(
        s.http.unwrap(),
        "POST",
        "/goim/push/room?operation=1001&type=live&room=m",
        Some(&s.api_token),
        b"r",
    )
    .await
    .unwrap();
    assert!(r.text().contains("\"delivered\":5"), "{}", r.text());
    for c in t.iter_mut().chain(q.iter_mut()) {
        next_push(c).await;
    }

    // a kick, and a client that leaves by itself (a clean end of its TCP stream)
    backend
        .call(&Request::Kick { key: "t1".into() })
        .await
        .unwrap();
    let gone = t.remove(2);
    let kicked = t.remove(1);
    gone.close().await;
    s.wait_online(3).await;
    drop(kicked);

    let tcp_bytes_before = scrape(&s).await["quicpush_bytes_sent_total{transport=\"tcp\"}"];
    expect(
        &s,
        &[
            (
                "quicpush_connections_accepted_total{transport=\"tcp\"}",
                5.0,
            ),
            (
                "quicpush_connections_accepted_total{transport=\"quic\"}",
                2.0,
            ),
            ("quicpush_connections_online{transport=\"tcp\"}", 1.0),
            ("quicpush_connections_online{transport=\"quic\"}", 2.0),
            (
                "quicpush_handshake_failures_total{reason=\"not_auth\"}",
                1.0,
            ),
            (
                "quicpush_handshake_failures_total{reason=\"closed_before_auth\"}",
                1.0,
            ),
            (
                "quicpush_handshake_failures_total{reason=\"auth_refused\"}",
                0.0,
            ),
            ("quicpush_disconnects_total{reason=\"kick\"}", 1.0),
            ("quicpush_disconnects_total{reason=\"client\"}", 1.0),
            (
                "quicpush_pushes_total{method=\"MPushMsg\",outcome=\"delivered\"}",
                2.0,
            ),
            (
                "quicpush_pushes_total{method=\"MPushMsg\",outcome=\"offline\"}",
                2.0,
            ),
            (
                "quicpush_pushes_total{method=\"BroadcastRoom\",outcome=\"delivered\"}",
                5.0,
            ),
            (
                "quicpush_pushes_total{method=\"BroadcastRoom\",outcome=\"queue_full\"}",
                0.0,
            ),
            ("quicpush_queue_full_drops_total", 0.0),
            (
                "quicpush_rpc_duration_seconds_count{method=\"MPushMsg\"}",
                1.0,
            ),
            (
                "quicpush_rpc_duration_seconds_count{method=\"BroadcastRoom\"}",
                1.0,
            ),
            ("quicpush_rpc_duration_seconds_count{method=\"Kick\"}", 1.0),
            ("quicpush_rpc_errors_total{method=\"MPushMsg\"}", 0.0),
            // AuthReply, a key push (t0 of the tcp ones), the room push: frames
            // written, DisconnectReply aside
            (
                "quicpush_deliveries_total{transport=\"tcp\"}",
                3.0 + 1.0 + 3.0,
            ),
            (
                "quicpush_deliveries_total{transport=\"quic\"}",
                2.0 + 1.0 + 2.0,
            ),
            ("quicpush_rooms", 1.0),
            ("quicpush_paced_broadcasts_running", 0.0),
            ("quicpush_history_streams", 0.0),
        ],
    )
    .await;
    // every frame of the sequence: 16-byte headers and their bodies (1 byte),
    // plus the kicked client's DisconnectReply, whose body says why
    let frame = |body: usize| (16 + body) as f64;
    let kicked = quicpush::channel::CloseReason::Kicked
        .disconnect_body()
        .len();
    assert_eq!(
        tcp_bytes_before,
        3.0 * frame(0) + frame(1) + 3.0 * frame(1) + frame(kicked),
        "AuthReply ×3, the key push, the room push ×3, DisconnectReply"
    );

    // A push refused by the RPC is an error, counted once.
    let refused = backend
        .call(&Request::MPushMsg {
            keys: vec![],
            op: 1,
            body: "x".into(),
        })
        .await;
    assert!(refused.is_err());
    expect(
        &s,
        &[
            ("quicpush_rpc_errors_total{method=\"MPushMsg\"}", 1.0),
            (
                "quicpush_rpc_duration_seconds_count{method=\"MPushMsg\"}",
                2.0,
            ),
            (
                "quicpush_pushes_total{method=\"MPushMsg\",outcome=\"delivered\"}",
                2.0,
            ),
        ],
    )
    .await;
    backend.close().await;
    s.stop().await;
}

#[tokio::test]
async fn resumes_are_counted_recovered_or_not() {
    let s = TestServer::start().await;
    // a fresh resume: nothing to recover, so recovered
    let mut c = s.raw_client(Via::Tcp).await;
    let mut state = ResumeState::default();
    c.auth_resume(s.token("r1").as_bytes(), &mut state)
        .await
        .unwrap();
    // a position history never had: not recovered
    let mut c2 = s.raw_client(Via::Quic).await;
    let mut lost = ResumeState::default();
    lost.positions.set(
        Source::Key,
        Some(Position {
            epoch: 12345,
            offset: 7,
        }),
    );
    c2.auth_resume(s.token("r2").as_bytes(), &mut lost)
        .await
        .unwrap();
    expect(
        &s,
        &[
            ("quicpush_resume_total{result=\"recovered\"}", 1.0),
            ("quicpush_resume_total{result=\"not_recovered\"}", 1.0),
            ("quicpush_history_streams", 2.0),
        ],
    )
    .await;
    // a push to r1's key goes to its stream: history bytes grow
    let before = scrape(&s).await["quicpush_history_bytes"];
    let backend = s.backend().await;
    backend
        .call(&Request::PushMsg {
            key: "r1".into(),
            op: 1000,
            body: "h".into(),
        })
        .await
        .unwrap();
    let got = scrape(&s).await;
    let frame = Frame::new(1000, 0, "h").to_bytes().len() as f64;
    assert!(
        got["quicpush_history_bytes"] >= before + frame,
        "{before} then {}",
        got["quicpush_history_bytes"]
    );
    backend.close().await;
    s.stop().await;
}

#[tokio::test]
async fn metrics_off_answer_404_and_count_nothing() {
    let s = TestServer::start_with(|c| c.metrics.enabled = false).await;
    assert!(!s.metrics.is_enabled());
    let mut c = s.client(Via::Tcp, "k").await;
    let r = client::request(
        s.http.unwrap(),
        "POST",
        "/goim/push/keys?operation=1000&keys=k",
        Some(&s.api_token),
        b"x",
    )
    .await
    .unwrap();
    assert!(r.text().contains("\"code\":0"), "{}", r.text());
    next_push(&mut c).await;
    let r = client::request(s.http.unwrap(), "GET", "/metrics", Some(&s.api_token), b"")
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert!(r.text().contains("metrics.enabled = false"), "{}", r.text());
    assert!(s.metrics.encode(&Default::default()).is_none());
    s.stop().await;
}

/// Every metric the Grafana dashboard queries is one the server exports.
#[tokio::test]
async fn the_dashboard_queries_only_exported_metrics() {
    let s = TestServer::start().await;
    let got = scrape(&s).await;
    let names: std::collections::BTreeSet<&str> =
        got.keys().map(|k| k.split('{').next().unwrap()).collect();
    let dashboard = include_str!("../config/grafana-dashboard.json");
    let mut checked = 0;
    for (i, _) in dashboard.match_indices("quicpush_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            names.contains(name.as_str()),
            "the dashboard queries {name}, which /metrics does not have"
        );
        checked += 1;
    }
    assert!(checked >= 15, "{checked}");
    s.stop().await;
}

/// A client that never reads: its queue refuses room pushes (counted per call as
/// `queue_full`, the same number the replies report) until it is closed as a slow
/// consumer.
#[tokio::test]
async fn a_slow_consumer_is_counted_with_its_refused_pushes() {
    let s = TestServer::start_with(|c| {
        c.client.queue_size = 8;
        c.client.tcp_send_buffer = 4096;
        c.client.slow_consumer_timeout = Duration::from_millis(200);
        c.client.write_timeout = Duration::from_secs(30);
    })
    .await;
    let _stalled = s
        .client_with(Via::Tcp, &in_room(&s, "stalled", "live://slow"))
        .await;
    s.wait_online(1).await;
    let backend = s.backend().await;
    let body = bytes::Bytes::from(vec![b's'; 2000]);
    let mut refused = 0u64;
    let mut calls = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while s.registry.online().total > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never closed");
        let r = backend
            .call(&Request::BroadcastRoom {
                room: "live://slow".into(),
                op: 1000,
                body: body.clone(),
            })
            .await
            .unwrap();
        calls += 1;
        if let Reply::Tally(t) = r {
            refused += t.queue_full;
        }
        if refused > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert!(refused > 0);
    let calls = calls as f64;
    expect(
        &s,
        &[
            ("quicpush_disconnects_total{reason=\"slow_consumer\"}", 1.0),
            (
                "quicpush_pushes_total{method=\"BroadcastRoom\",outcome=\"queue_full\"}",
                refused as f64,
            ),
            ("quicpush_queue_full_drops_total", refused as f64),
            (
                "quicpush_rpc_duration_seconds_count{method=\"BroadcastRoom\"}",
                calls,
            ),
            ("quicpush_connections_online{transport=\"tcp\"}", 0.0),
        ],
    )
    .await;
    backend.close().await;
    s.stop().await;
}

//! Graceful shutdown: clients get DisconnectReply, the process exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use quicpush::client::{Backoff, Dial, Event, PushClient, ResumingClient};
use quicpush::protocol::op;

#[tokio::test]
async fn in_process_shutdown_sends_disconnect_reply_after_queued_pushes() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let mut clients = Vec::new();
    for via in BOTH {
        clients.push(s.client(via, &format!("c-{via:?}")).await);
    }
    for via in BOTH {
        backend
            .push_msg(format!("c-{via:?}"), 1000, "last words")
            .await
            .unwrap();
    }
    let reg = s.registry.clone();
    s.stop().await;
    for c in &mut clients {
        // everything queued before the shutdown still arrives, then DisconnectReply
        assert_eq!(&next(c).await.body[..], b"last words");
        let bye = next(c).await;
        assert_eq!(bye.op, op::DISCONNECT_REPLY);
        // It says why, and that the client should resume (on another node).
        let why = quicpush::client::Disconnect::parse(&bye.body).expect("a JSON body");
        assert_eq!((why.reason.as_str(), why.reconnect), ("shutdown", true));
        assert_closed(c).await;
    }
    assert_eq!(reg.online().total, 0);
}

#[tokio::test]
async fn shutdown_stops_a_running_paced_broadcast_within_the_grace() {
    let grace = Duration::from_secs(5);
    let s = TestServer::start_with(|c| c.shutdown.grace = grace).await;
    let backend = s.backend().await;
    let mut clients = Vec::new();
    for i in 0..10 {
        clients.push(s.client(Via::Tcp, &format!("paced-{i}")).await);
    }
    // 10 channels at 1/s: runs for about 10 s, longer than the grace
    backend.broadcast(1000, "slow", 1).await.unwrap();
    let mut first = None;
    for (i, c) in clients.iter_mut().enumerate() {
        if let Ok(f) = tokio::time::timeout(Duration::from_millis(100), next_push(c)).await {
            first = Some((i, f));
            break;
        }
    }
    assert!(first.is_some(), "the paced broadcast never started");
    let reg = s.registry.clone();
    let started = std::time::Instant::now();
    s.stop().await;
    assert!(
        started.elapsed() < grace,
        "shutdown took {:?}",
        started.elapsed()
    );
    // the paced task is gone: nothing but this test holds the registry any more
    tokio::time::timeout(Duration::from_secs(2), async {
        while std::sync::Arc::strong_count(&reg) > 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a task still holds the registry after shutdown: the paced broadcast runs on");
}

use quicpush::bench::process::listening_addr;

#[tokio::test]
async fn sigterm_disconnects_clients_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("quicpush.toml");
    std::fs::write(
        &config,
        format!(
            "[client]\ntcp_bind = [\"127.0.0.1:0\"]\nquic_bind = [\"127.0.0.1:0\"]\nws_bind = []\n\
             [rpc]\nbind = [\"127.0.0.1:0\"]\n[tls]\ndir = {:?}\n[auth]\nsecret_file = {:?}\n",
            dir.path(),
            dir.path().join("token.secret")
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_quicpush"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // The server logs each bound address; read them as they come (no sleeping).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut tcp, mut quic) = (None, None);
    while tcp.is_none() || quic.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server did not start");
        tcp = tcp.or(listening_addr(&line, "client TCP listening"));
        quic = quic.or(listening_addr(&line, "client QUIC listening"));
    }
    let secret = quicpush::auth::load_secret(&dir.path().join("token.secret")).unwrap();
    let token = |k: &str| {
        quicpush::auth::issue(
            &secret,
            &quicpush::auth::claims_for(k, Duration::from_secs(60)),
        )
        .unwrap()
    };
    let mut a = PushClient::connect_tcp(tcp.unwrap()).await.unwrap();
    a.auth(token("a")).await.unwrap();
    let mut b = PushClient::connect_quic(quic.unwrap(), "localhost", &dir.path().join("ca.pem"))
        .await
        .unwrap();
    b.auth(token("b")).await.unwrap();

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    for c in [&mut a, &mut b] {
        assert_eq!(next(c).await.op, op::DISCONNECT_REPLY);
        assert_closed(c).await;
    }
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("shutdown complete")),
        "{rest:#?}"
    );
}

#[tokio::test]
async fn a_draining_node_sends_its_resuming_clients_to_another_node() {
    let a = TestServer::start().await;
    let b = TestServer::start_beside(&a, |_| {}).await;
    let dials = vec![Dial::Tcp(a.tcp), Dial::Tcp(b.tcp)];
    let (mut c, _) = ResumingClient::connect_any(dials, a.token("mover"), Backoff::default())
        .await
        .expect("a node to dial");
    assert!(matches!(c.dial(), Dial::Tcp(addr) if *addr == a.tcp));
    let on_a = a.backend().await;
    on_a.push_msg("mover", 1000, "from a").await.unwrap();
    match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
        Event::Push(f, _) => assert_eq!(&f.body[..], b"from a"),
        other => panic!("expected the push from a, got {other:?}"),
    }
    a.stop().await;
    // The DisconnectReply says "shutdown": the client resumes on b.
    match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
        Event::Resumed(_) => {}
        other => panic!("expected a resume, got {other:?}"),
    }
    let why = c
        .last_disconnect
        .clone()
        .expect("a DisconnectReply with a reason");
    assert_eq!((why.reason.as_str(), why.reconnect), ("shutdown", true));
    assert!(matches!(c.dial(), Dial::Tcp(addr) if *addr == b.tcp));
    let on_b = b.backend().await;
    common::process::wait_online(&on_b, 1, "the moved client").await;
    on_b.push_msg("mover", 1000, "from b").await.unwrap();
    match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
        Event::Push(f, _) => assert_eq!(&f.body[..], b"from b"),
        other => panic!("expected the push from b, got {other:?}"),
    }
}

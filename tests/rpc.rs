//! The backend RPC: mutual TLS, typed errors, framing limits, concurrency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::{BufMut, BytesMut};
use common::*;
use quicpush::channel::PushOutcome;
use quicpush::rpc::proto::{PushItem, Response};
use quicpush::rpc::{Client, ClientError, Request, RpcError};
use quicpush::tls::{self, BackendIdentity};

#[tokio::test]
async fn backend_without_a_client_certificate_is_refused() {
    let s = TestServer::start().await;
    let id = BackendIdentity {
        ca: s.dir.path().join("ca.pem"),
        cert: None,
    };
    let err = Client::connect(s.rpc, "localhost", &id).await.unwrap_err();
    assert!(matches!(err, ClientError::Connection { .. }), "{err}");
    s.stop().await;
}

#[tokio::test]
async fn backend_with_a_certificate_from_another_ca_is_refused() {
    let s = TestServer::start().await;
    let other = tempfile::tempdir().unwrap();
    quicpush::certs::generate(other.path(), &[]).unwrap();
    let id = BackendIdentity {
        ca: s.dir.path().join("ca.pem"),
        cert: Some((
            other.path().join("backend.pem"),
            other.path().join("backend.key"),
        )),
    };
    let err = Client::connect(s.rpc, "localhost", &id).await.unwrap_err();
    assert!(matches!(err, ClientError::Connection { .. }), "{err}");
    // and a backend that trusts another CA refuses the server
    let err = Client::connect(s.rpc, "localhost", &BackendIdentity::from_dir(other.path()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connection { .. }), "{err}");
    // the right certificate still works
    s.backend().await.ping().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn invalid_arguments_get_typed_errors() {
    let s = TestServer::start_with(|c| c.rpc.max_keys = 3).await;
    let b = s.backend().await;
    let rpc_err = |r: Result<_, ClientError>| match r {
        Err(ClientError::Rpc(e)) => e,
        other => panic!("expected an RPC error, got {other:?}"),
    };
    assert_eq!(
        rpc_err(b.push_msg("", 1000, "x").await.map(|_| ())),
        RpcError::EmptyKeys
    );
    assert_eq!(
        rpc_err(b.mpush_msg(vec![], 1000, "x").await.map(|_| ())),
        RpcError::EmptyKeys
    );
    assert_eq!(
        rpc_err(
            b.mpush_msg(vec!["a".into(), "".into()], 1000, "x")
                .await
                .map(|_| ())
        ),
        RpcError::EmptyKeys
    );
    assert_eq!(
        rpc_err(b.mpush_msgs(vec![]).await.map(|_| ())),
        RpcError::EmptyKeys
    );
    assert_eq!(
        rpc_err(b.push_user(vec![], 1000, "x").await.map(|_| ())),
        RpcError::EmptyMids
    );
    assert_eq!(
        rpc_err(b.broadcast_room("", 1000, "x").await.map(|_| ())),
        RpcError::EmptyRoom
    );
    assert_eq!(
        rpc_err(b.push_msg("k", 1000, vec![0u8; 4097]).await.map(|_| ())),
        RpcError::BodyTooLarge {
            len: 4097,
            max: 4096
        }
    );
    assert_eq!(
        rpc_err(b.broadcast(1000, vec![0u8; 5000], 0).await.map(|_| ())),
        RpcError::BodyTooLarge {
            len: 5000,
            max: 4096
        }
    );
    let items = (0..4)
        .map(|i| PushItem {
            key: format!("k{i}"),
            op: 1,
            body: "x".into(),
        })
        .collect();
    assert_eq!(
        rpc_err(b.mpush_msgs(items).await.map(|_| ())),
        RpcError::TooManyKeys { len: 4, max: 3 }
    );
    // the connection is still fine after every refusal
    b.ping().await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn oversize_and_malformed_requests_get_error_replies_on_the_same_stream() {
    let s = TestServer::start_with(|c| c.rpc.max_request_bytes = 1024).await;
    let (endpoint, conn) = s.rpc_connection().await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();

    let mut out = BytesMut::new();
    // 1: a request over the limit, body sent in full (skipped by the server)
    out.put_u32(8 + 2000);
    out.put_u64(1);
    out.put_bytes(0, 2000);
    // 2: a payload that is not a request (an unknown variant tag)
    out.put_u32(8 + 1);
    out.put_u64(2);
    out.put_u8(200);
    // 3: a valid Ping after both
    quicpush::codec::write_message(&mut out, 3, &Request::Ping).unwrap();
    send.write_all(&out).await.unwrap();
    send.finish().unwrap();

    let data = tokio::time::timeout(WAIT, recv.read_to_end(1 << 20))
        .await
        .unwrap()
        .unwrap();
    let mut replies = Vec::new();
    let mut rest = &data[..];
    while let Some((id, len)) = quicpush::codec::peek_prefix(rest).unwrap() {
        let end = quicpush::codec::PREFIX_LEN + len as usize;
        let r: Response =
            quicpush::codec::decode_payload(&rest[quicpush::codec::PREFIX_LEN..end]).unwrap();
        replies.push((id, r));
        rest = &rest[end..];
    }
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_eq!(
        replies[0],
        (
            1,
            Err(RpcError::RequestTooLarge {
                len: 2000,
                max: 1024
            })
        )
    );
    assert!(
        matches!(replies[1], (2, Err(RpcError::Malformed(_)))),
        "{:?}",
        replies[1]
    );
    assert_eq!(replies[2], (3, Ok(quicpush::rpc::Reply::Pong)));
    conn.close(0u32.into(), b"");
    endpoint.wait_idle().await;
    s.stop().await;
}

#[tokio::test]
async fn many_concurrent_calls_on_one_connection() {
    let s = TestServer::start().await;
    let b = std::sync::Arc::new(s.backend().await);
    let mut c = s.client(Via::Tcp, "busy").await;
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200u32 {
        let b = b.clone();
        calls.spawn(async move { b.push_msg("busy", 1000 + i, format!("m{i}")).await });
    }
    while let Some(r) = calls.join_next().await {
        assert_eq!(r.unwrap().unwrap(), PushOutcome::Delivered);
    }
    let mut seen: Vec<u32> = Vec::new();
    for _ in 0..200 {
        seen.push(next_push(&mut c).await.op - 1000);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..200).collect::<Vec<_>>());
    s.stop().await;
}

#[tokio::test]
async fn a_full_queue_is_reported_and_the_rest_of_the_push_carries_on() {
    let s = TestServer::start_with(|c| {
        c.client.queue_size = 4;
        c.client.write_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let b = s.backend().await;
    // a client that never reads: its socket buffers, then its queue, fill up
    let _stalled = s.client(Via::Tcp, "stalled").await;
    let mut active = s.client(Via::Quic, "active").await;
    let body = vec![b'x'; 4096];
    let mut full = false;
    for _ in 0..100_000 {
        if b.push_msg("stalled", 1000, body.clone()).await.unwrap() == PushOutcome::QueueFull {
            full = true;
            break;
        }
    }
    assert!(full, "the stalled client's queue never filled");
    let m = b
        .mpush_msg(vec!["stalled".into(), "active".into()], 1000, "after")
        .await
        .unwrap();
    assert_eq!(
        m.outcomes,
        vec![PushOutcome::QueueFull, PushOutcome::Delivered]
    );
    assert_eq!(m.index, 1);
    assert_eq!(&next_push(&mut active).await.body[..], b"after");
    s.stop().await;
}

/// An RPC endpoint with the server's mutual TLS that answers the client's connect
/// Ping and nothing else: every other call is read and never answered.
struct SilentServer {
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    endpoint: quinn::Endpoint,
}

impl SilentServer {
    fn start() -> SilentServer {
        let dir = tempfile::tempdir().unwrap();
        quicpush::certs::generate(dir.path(), &[]).unwrap();
        let config =
            tls::rpc_server_config(dir.path(), &quicpush::config::RpcConfig::default()).unwrap();
        let endpoint = quinn::Endpoint::server(config, local()).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let e = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = e.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(answer_pings_only(send, recv));
                    }
                });
            }
        });
        SilentServer {
            addr,
            dir,
            endpoint,
        }
    }
}

async fn answer_pings_only(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = BytesMut::new();
    while let Ok(n) = recv.read_buf(&mut buf).await {
        if n == 0 {
            return;
        }
        while let Ok(Some((id, len))) = quicpush::codec::peek_prefix(&buf) {
            let total = quicpush::codec::PREFIX_LEN + len as usize;
            if buf.len() < total {
                break;
            }
            let msg = buf.split_to(total);
            let req: Request =
                quicpush::codec::decode_payload(&msg[quicpush::codec::PREFIX_LEN..]).unwrap();
            if req == Request::Ping {
                let mut out = BytesMut::new();
                let pong: Response = Ok(quicpush::rpc::Reply::Pong);
                quicpush::codec::write_message(&mut out, id, &pong).unwrap();
                send.write_all(&out).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn calls_that_time_out_or_are_dropped_are_forgotten() {
    let fake = SilentServer::start();
    let mut client = Client::connect(
        fake.addr,
        "localhost",
        &BackendIdentity::from_dir(fake.dir.path()),
    )
    .await
    .unwrap();
    let short = std::time::Duration::from_millis(20);
    client.set_call_timeout(short);
    for _ in 0..50 {
        let r = client.push_msg("k", 1000, "x").await;
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    }
    let many = (0..500).map(|_| client.push_msg("k", 1000, "x"));
    for r in futures_util::future::join_all(many).await {
        assert!(matches!(r, Err(ClientError::Timeout(_))), "{r:?}");
    }
    // callers that give up before the client's own timeout: the call future is dropped
    client.set_call_timeout(std::time::Duration::from_secs(30));
    let many = (0..200).map(|_| tokio::time::timeout(short, client.push_msg("k", 1000, "x")));
    for r in futures_util::future::join_all(many).await {
        assert!(r.is_err(), "{r:?}");
    }
    // the connection still works for calls that are answered
    client.ping().await.unwrap();
    assert_eq!(client.pending_calls(), 0);
    client.close().await;
    fake.endpoint.close(0u32.into(), b"");
}

#[tokio::test]
async fn a_paced_broadcast_longer_than_the_cap_is_refused() {
    let s = TestServer::start_with(|c| {
        c.rpc.paced_max_duration = std::time::Duration::from_secs(2);
    })
    .await;
    let b = s.backend().await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(s.client(Via::Tcp, &format!("p{i}")).await);
    }
    // 3 channels at 1/s: 3 s, over the 2 s cap
    match b.broadcast(1000, "slow", 1).await {
        Err(ClientError::Rpc(e)) => assert_eq!(
            e,
            RpcError::PacedTooLong {
                online: 3,
                speed: 1,
                secs: 3,
                max_secs: 2
            }
        ),
        other => panic!("expected PacedTooLong, got {other:?}"),
    }
    // 3 channels at 2/s fit in the cap
    assert_eq!(b.broadcast(1000, "ok", 2).await.unwrap(), 3);
    for c in &mut clients {
        assert_eq!(&next_push(c).await.body[..], b"ok");
    }
    s.stop().await;
}

#[tokio::test]
async fn online_reports_a_running_paced_broadcast_and_its_progress() {
    let s = TestServer::start().await;
    let b = s.backend().await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(s.client(Via::Tcp, &format!("p{i}")).await);
    }
    assert!(b.online().await.unwrap().paced.is_empty());
    b.broadcast(1000, "slow", 1).await.unwrap();
    // at 1/s the first channel gets it at once, the others a second apart
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let o = b.online().await.unwrap();
            if let Some(p) = o.paced.first() {
                if p.delivered >= 1 && p.remaining >= 1 {
                    return o;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("Online never showed the paced broadcast under way");
    assert_eq!(seen.paced.len(), 1, "{seen:?}");
    let p = &seen.paced[0];
    assert_eq!((p.op, p.speed), (1000, 1));
    assert_eq!(p.delivered + p.remaining, 3, "{p:?}");
    for c in &mut clients {
        assert_eq!(&next_push(c).await.body[..], b"slow");
    }
    // once done, it is no longer listed
    tokio::time::timeout(WAIT, async {
        while !b.online().await.unwrap().paced.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the finished paced broadcast is still listed");
    s.stop().await;
}

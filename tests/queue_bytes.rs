//! `client.queue_bytes`: a client that floods requests whose replies echo its own
//! bytes (SendMsg, Sub, ChangeRoom) as fast as it can and never reads cannot make
//! the server hold more than `client.queue_bytes` for it, queued or being written.
//! Its reader stops reading instead, and other clients are served meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::BytesMut;
use common::{next_push, TestServer, Via, WAIT};
use quicpush::channel::PushOutcome;
use quicpush::client::{PushClient, ResumeState};
use quicpush::protocol::{op, Frame, EXT_HEADER_LEN, HEADER_LEN};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

/// How long the flood lasts.
const FLOOD: Duration = Duration::from_secs(2);
/// A SendMsg body: nearly `client.max_body` (4096).
const ECHO: usize = 4000;

/// A TCP client with a 4 KiB receive buffer, authenticated as `key` (asking for
/// resume when `resume`), that will never read again.
async fn stalled_client(server: &TestServer, key: &str, resume: bool) -> PushClient {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.tcp).await.unwrap();
    let (r, w) = stream.into_split();
    let mut c = PushClient::from_parts(Box::new(r), Box::new(w), None);
    if resume {
        let mut state = ResumeState::default();
        c.auth_resume(server.token(key).as_bytes(), &mut state)
            .await
            .unwrap();
    } else {
        c.auth(server.token(key)).await.unwrap();
    }
    c
}

type Halves = (quicpush::client::Reader, quicpush::client::Writer);

/// Writes `batch` again and again until `stop`; the write in progress is given up
/// then (the server's reader has long stopped reading). Returns the batches
/// written whole, and the connection, still open.
fn flood(
    c: PushClient,
    batch: BytesMut,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(u64, Halves)> {
    tokio::spawn(async move {
        let (r, mut w, _, _) = c.into_parts();
        let mut n = 0;
        loop {
            tokio::select! {
                res = w.write_all(&batch) => {
                    assert!(res.is_ok(), "the server closed the flooding client: {res:?}");
                    n += 1;
                }
                _ = stop.cancelled() => return (n, (r, w)),
            }
        }
    })
}

/// 16 SendMsg frames of [`ECHO`] bytes and a Sub.
fn echo_batch() -> BytesMut {
    let mut b = BytesMut::new();
    for i in 0..16 {
        Frame::new(op::SEND_MSG, i, vec![b'e'; ECHO]).encode(&mut b);
    }
    Frame::new(op::SUB, 16, &b"1000,1001"[..]).encode(&mut b);
    b
}

/// 64 ChangeRoom frames, to rooms with ids of 200 bytes.
fn change_room_batch() -> BytesMut {
    let mut b = BytesMut::new();
    for i in 0..64u32 {
        let room = format!("{:<200}", i % 2);
        Frame::new(op::CHANGE_ROOM, i, room.into_bytes()).encode(&mut b);
    }
    b
}

/// Lets `floods` run for [`FLOOD`] while a reading client is served, then stops
/// them; returns the pushes the bystander got and each flood's result.
async fn run_floods<T: Send + 'static>(
    server: &TestServer,
    stop: &CancellationToken,
    floods: impl IntoIterator<Item = tokio::task::JoinHandle<T>>,
) -> (usize, Vec<T>) {
    let stopper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(FLOOD).await;
            stop.cancel();
        })
    };
    let served = tokio::time::timeout(FLOOD + 2 * WAIT, bystander_served(server, stop))
        .await
        .expect("the bystander was not served");
    stopper.await.unwrap();
    let mut done = Vec::new();
    for f in floods {
        done.push(tokio::time::timeout(WAIT, f).await.unwrap().unwrap());
    }
    (served, done)
}

/// A reading client keeps getting pushes and heartbeat replies while the flood
/// goes on; returns how many pushes it got.
async fn bystander_served(server: &TestServer, stop: &CancellationToken) -> usize {
    let mut c = server.client(Via::Tcp, "bystander").await;
    let backend = server.backend().await;
    let mut n = 0;
    while !stop.is_cancelled() {
        let body = format!("b{n}");
        assert_eq!(
            backend
                .push_msg("bystander", 1000, body.clone())
                .await
                .unwrap(),
            PushOutcome::Delivered
        );
        assert_eq!(next_push(&mut c).await.body, body.as_bytes());
        c.heartbeat().await.unwrap();
        let f = common::next(&mut c).await;
        assert_eq!(f.op, op::HEARTBEAT_REPLY);
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// The peak bytes the server held for `key`; asserts it is still online (the
/// flood only stopped its reader).
fn peak_of(server: &TestServer, key: &str) -> usize {
    let chan = server
        .registry
        .get(key)
        .unwrap_or_else(|| panic!("{key} is gone"));
    assert!(!chan.is_closed(), "{key}: {:?}", chan.close_reason());
    chan.queue_level().peak_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_msg_and_sub_echoes_are_held_to_queue_bytes() {
    let server = TestServer::start_with(|c| {
        // as fast as it can: the rate limit would close the flooders
        c.client.max_frames_per_sec = 1_000_000;
        c.client.tcp_send_buffer = 4096;
        c.client.write_timeout = Duration::from_secs(60);
    })
    .await;
    let queue_bytes = quicpush::Config::default().client.queue_bytes;
    let keys = ["flood-0", "flood-1", "flood-2"];
    let stop = CancellationToken::new();
    let mut floods = Vec::new();
    for key in keys {
        let c = stalled_client(&server, key, false).await;
        floods.push(flood(c, echo_batch(), stop.clone()));
    }
    let (served, done) = run_floods(&server, &stop, floods).await;
    let (sent, conns): (Vec<_>, Vec<_>) = done.into_iter().unzip();
    let one = HEADER_LEN + ECHO;
    for (key, sent) in keys.iter().zip(&sent) {
        let peak = peak_of(&server, key);
        eprintln!(
            "{key}: {sent} batches of 17 frames sent; peak {peak} bytes held (queue_bytes \
             {queue_bytes}); the bystander got {served} pushes meanwhile"
        );
        assert!(
            peak <= queue_bytes,
            "{key}: {peak} bytes held, over client.queue_bytes = {queue_bytes}"
        );
        assert!(
            peak + one > queue_bytes,
            "{key}: the queue never filled ({peak} bytes)"
        );
    }
    assert!(served > 0);
    drop(conns);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_room_echoes_are_held_to_queue_bytes_on_goim_and_resume_connections() {
    const QUEUE_BYTES: usize = 64 * 1024;
    let server = TestServer::start_with(|c| {
        c.client.max_frames_per_sec = 1_000_000;
        // so the byte bound is the one that applies
        c.client.queue_size = 1 << 20;
        c.client.queue_bytes = QUEUE_BYTES;
        c.client.tcp_send_buffer = 4096;
        c.client.write_timeout = Duration::from_secs(60);
    })
    .await;
    let stop = CancellationToken::new();
    let goim = stalled_client(&server, "rooms-goim", false).await;
    let resume = stalled_client(&server, "rooms-resume", true).await;
    let floods = [
        flood(goim, change_room_batch(), stop.clone()),
        flood(resume, change_room_batch(), stop.clone()),
    ];
    let (served, conns) = run_floods(&server, &stop, floods).await;
    // A goim ChangeRoomReply waits for room like any reply; a resume-capable one
    // is forced in under the registry's lock after waiting for room, so at most
    // that one frame (the extended header and the 200-byte room id) over.
    let reply = EXT_HEADER_LEN + 200;
    for (key, bound) in [
        ("rooms-goim", QUEUE_BYTES),
        ("rooms-resume", QUEUE_BYTES + reply),
    ] {
        let peak = peak_of(&server, key);
        eprintln!("{key}: peak {peak} bytes held (queue_bytes {QUEUE_BYTES}, bound {bound})");
        assert!(peak <= bound, "{key}: {peak} bytes held, over {bound}");
        assert!(
            peak + reply > QUEUE_BYTES,
            "{key}: the queue never filled ({peak} bytes)"
        );
    }
    assert!(served > 0);
    drop(conns);
    server.stop().await;
}

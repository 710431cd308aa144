//! QUIC 0-RTT resume: a returning client sends Auth (+ resume) as 0-RTT data, gets
//! AuthReply and its replay before the handshake ends, and a replayed 0-RTT
//! flight changes nothing on the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use quicpush::channel::PushOutcome;
use quicpush::client::{
    resume_auth_body, Backoff, Dial, Event, PushClient, ResumeState, ResumingClient, ZeroRtt,
};
use quicpush::protocol::{op, PushMeta, Source};
use quicpush::tls;
use tokio::net::UdpSocket;

/// Kept short so the tests that wait for a handshake to time out stay quick.
const HANDSHAKE: Duration = Duration::from_secs(1);

fn client_config(s: &TestServer) -> quinn::ClientConfig {
    tls::quic_client_config(&s.dir.path().join("ca.pem")).unwrap()
}

/// Connects to `addr` with `config` (0-RTT when it holds a ticket) and sends Auth
/// asking for resume from `state`.
/// What a returning client keeps: its TLS configuration (with the tickets), its
/// endpoint, its token (key `k`) and its resume state.
struct Returning {
    config: quinn::ClientConfig,
    endpoint: quinn::Endpoint,
    token: String,
    state: ResumeState,
}

impl Returning {
    fn new(s: &TestServer) -> Self {
        Returning {
            config: client_config(s),
            endpoint: tls::client_endpoint(s.quic).unwrap(),
            token: s.token("k"),
            state: ResumeState::default(),
        }
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    config: &quinn::ClientConfig,
    token: &str,
    state: &ResumeState,
) -> (PushClient, ZeroRtt) {
    let body = resume_auth_body(token.as_bytes(), &state.request()).unwrap();
    tokio::time::timeout(
        WAIT,
        PushClient::connect_quic_0rtt(endpoint, addr, "localhost", config.clone(), body),
    )
    .await
    .expect("connect timed out")
    .unwrap()
}

/// The next push with its resume extension; `state` moves to it.
async fn push(c: &mut PushClient, state: &mut ResumeState) -> (Bytes, u32, PushMeta) {
    let (f, meta) = next_resume_push(c, state).await;
    (f.body, f.seq, meta)
}

/// A heartbeat round trip: the connection is alive and anything the server sent
/// with or after the handshake (its session ticket) has arrived.
async fn round_trip(c: &mut PushClient) {
    c.heartbeat().await.unwrap();
    loop {
        let f = next(c).await;
        assert_ne!(
            f.op,
            op::DISCONNECT_REPLY,
            "the server closed the connection"
        );
        if f.op == op::HEARTBEAT_REPLY {
            return;
        }
    }
}

#[tokio::test]
async fn zero_rtt_resume_is_accepted_and_loses_nothing() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let Returning {
        config,
        endpoint,
        token,
        mut state,
    } = Returning::new(&s);

    // First connection: no ticket yet, a full handshake.
    let (mut c, z) = connect(&endpoint, s.quic, &config, &token, &state).await;
    assert_eq!(z, ZeroRtt::default(), "no ticket: no 0-RTT attempt");
    let reply = c.resume_reply(&mut state).await.unwrap();
    assert_eq!(reply.key, "k");
    s.wait_online(1).await;
    let mut got = Vec::new();
    for i in 1..=3 {
        let o = backend.push_msg("k", 1000, format!("m{i}")).await.unwrap();
        assert_eq!(o, PushOutcome::Delivered);
        got.push(push(&mut c, &mut state).await);
    }
    c.close().await;
    s.wait_online(0).await;

    // Missed while away.
    for i in 4..=6 {
        let o = backend.push_msg("k", 1000, format!("m{i}")).await.unwrap();
        assert_eq!(o, PushOutcome::Stored);
    }

    // Returning with the same client config: Auth goes out as 0-RTT data.
    let (mut c, z) = connect(&endpoint, s.quic, &config, &token, &state).await;
    assert_eq!(
        z,
        ZeroRtt {
            attempted: true,
            accepted: true
        }
    );
    let reply = c.resume_reply(&mut state).await.unwrap();
    let key = reply.source(Source::Key).unwrap();
    assert_eq!(key.recovered, Some(true), "{reply:?}");
    let mut again = Vec::new();
    for _ in 4..=6 {
        again.push(push(&mut c, &mut state).await);
    }
    s.wait_online(1).await;
    for i in 7..=8 {
        let o = backend.push_msg("k", 1000, format!("m{i}")).await.unwrap();
        assert_eq!(o, PushOutcome::Delivered);
        again.push(push(&mut c, &mut state).await);
    }
    let bodies: Vec<_> = got
        .iter()
        .chain(&again)
        .map(|(b, _, _)| b.clone())
        .collect();
    let want: Vec<Bytes> = (1..=8).map(|i| Bytes::from(format!("m{i}"))).collect();
    assert_eq!(bodies, want, "every push once, in order");
    let offsets: Vec<u64> = got.iter().chain(&again).map(|(_, _, m)| m.offset).collect();
    assert_eq!(offsets, (1..=8).collect::<Vec<u64>>());
    let seqs: Vec<u32> = again.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "replay first, then live pushes");
    assert_eq!(s.registry.online().quic, 1);
    c.close().await;
    s.stop().await;
}

#[tokio::test]
async fn rejected_zero_rtt_falls_back_and_still_resumes() {
    // One stored session: a second client's ticket makes the server forget the first's.
    let s = TestServer::start_with(|c| c.quic.session_cache = 1).await;
    let backend = s.backend().await;
    let Returning {
        config,
        endpoint,
        token,
        mut state,
    } = Returning::new(&s);

    let (mut c, _) = connect(&endpoint, s.quic, &config, &token, &state).await;
    c.resume_reply(&mut state).await.unwrap();
    s.wait_online(1).await;
    backend.push_msg("k", 1000, "m1").await.unwrap();
    assert_eq!(push(&mut c, &mut state).await.0, "m1");
    c.close().await;
    s.wait_online(0).await;

    // Its own endpoint: closing one client waits for its endpoint to go idle.
    let other = client_config(&s);
    let other_endpoint = tls::client_endpoint(s.quic).unwrap();
    let mut o = ResumeState::default();
    let (mut oc, _) = connect(&other_endpoint, s.quic, &other, &s.token("other"), &o).await;
    oc.resume_reply(&mut o).await.unwrap();
    round_trip(&mut oc).await;

    assert_eq!(
        backend.push_msg("k", 1000, "m2").await.unwrap(),
        PushOutcome::Stored
    );
    let (mut c, z) = connect(&endpoint, s.quic, &config, &token, &state).await;
    assert_eq!(
        z,
        ZeroRtt {
            attempted: true,
            accepted: false
        },
        "the server no longer holds the ticket"
    );
    let reply = c.resume_reply(&mut state).await.unwrap();
    assert_eq!(reply.source(Source::Key).unwrap().recovered, Some(true));
    let (body, seq, meta) = push(&mut c, &mut state).await;
    assert_eq!((&body[..], seq, meta.offset), (&b"m2"[..], 1, 2));
    s.wait_online(2).await;
    backend.push_msg("k", 1000, "m3").await.unwrap();
    assert_eq!(push(&mut c, &mut state).await.0, "m3");
    c.close().await;
    oc.close().await;
    s.stop().await;
}

/// A UDP relay on loopback between one client and the server. It records what
/// the client sends before the server's first answer (the client's first flight)
/// and forwards everything, or nothing (an attacker that intercepts the flight).
struct Relay {
    addr: SocketAddr,
    first_flight: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(server: SocketAddr, forward: bool) -> Relay {
        let front = UdpSocket::bind(local()).await.unwrap();
        let back = UdpSocket::bind(local()).await.unwrap();
        let addr = front.local_addr().unwrap();
        let first_flight = Arc::new(Mutex::new(Vec::new()));
        let flight = first_flight.clone();
        let task = tokio::spawn(async move {
            let mut client = None;
            let mut answered = false;
            let mut up = vec![0u8; 65536];
            let mut down = vec![0u8; 65536];
            loop {
                tokio::select! {
                    r = front.recv_from(&mut up) => {
                        let (n, from) = r.unwrap();
                        client = Some(from);
                        if !answered {
                            flight.lock().unwrap().push(up[..n].to_vec());
                        }
                        if forward {
                            let _ = back.send_to(&up[..n], server).await;
                        }
                    }
                    r = back.recv_from(&mut down) => {
                        let (n, _) = r.unwrap();
                        answered = true;
                        if let Some(c) = client {
                            let _ = front.send_to(&down[..n], c).await;
                        }
                    }
                }
            }
        });
        Relay {
            addr,
            first_flight,
            task,
        }
    }

    fn flight(&self) -> Vec<Vec<u8>> {
        self.first_flight.lock().unwrap().clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let len = 1usize << (b[*i] >> 6);
    let mut v = u64::from(b[*i] & 0x3f);
    for k in 1..len {
        v = (v << 8) | u64::from(b[*i + k]);
    }
    *i += len;
    v
}

/// The long-header packet types (0 Initial, 1 0-RTT, 2 Handshake) coalesced in
/// one QUIC v1 datagram.
fn packet_types(d: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut i = 0;
    while i < d.len() && d[i] & 0x80 != 0 {
        let ty = (d[i] >> 4) & 0x3;
        types.push(ty);
        let mut j = i + 5;
        j += 1 + d[j] as usize; // destination connection id
        j += 1 + d[j] as usize; // source connection id
        if ty == 0 {
            let token = varint(d, &mut j) as usize;
            j += token;
        }
        let len = varint(d, &mut j) as usize;
        i = j + len;
    }
    types
}

/// Asserts that `flight` opens a handshake and carries 0-RTT data.
fn assert_zero_rtt_flight(flight: &[Vec<u8>]) {
    let types: Vec<u8> = flight.iter().flat_map(|d| packet_types(d)).collect();
    assert_eq!(types.first(), Some(&0), "starts with an Initial: {types:?}");
    assert!(types.contains(&1), "carries 0-RTT packets: {types:?}");
}

/// Sends `flight` to `server` `times` times, each from a new socket (a new port).
async fn replay(flight: &[Vec<u8>], server: SocketAddr, times: usize) -> Vec<UdpSocket> {
    let mut sockets = Vec::new();
    for _ in 0..times {
        let socket = UdpSocket::bind(local()).await.unwrap();
        for d in flight {
            socket.send_to(d, server).await.unwrap();
        }
        sockets.push(socket);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sockets
}

/// Watches the registry for `d`: `key` stays registered under channel `id`, and
/// nothing else comes online.
async fn assert_untouched_for(s: &TestServer, key: &str, id: u64, d: Duration) {
    let until = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < until {
        assert_eq!(s.registry.get(key).map(|c| c.id), Some(id), "replaced");
        assert_eq!(s.registry.online().total, 1, "a second registration");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The live connection still works: it gets a new push, then a heartbeat reply,
/// and nothing else (no DisconnectReply).
async fn assert_alive(
    backend: &quicpush::rpc::Client,
    c: &mut PushClient,
    state: &mut ResumeState,
    body: &str,
) {
    assert_eq!(
        backend.push_msg("k", 1000, body.to_owned()).await.unwrap(),
        PushOutcome::Delivered
    );
    assert_eq!(push(c, state).await.0, body);
    round_trip(c).await;
}

#[tokio::test]
async fn replayed_first_flight_leaves_the_live_session_untouched() {
    let s = TestServer::start_with(|c| c.client.handshake_timeout = HANDSHAKE).await;
    let backend = s.backend().await;
    let Returning {
        config,
        endpoint,
        token,
        mut state,
    } = Returning::new(&s);

    // A first connection leaves a ticket in the client config.
    let (mut c, _) = connect(&endpoint, s.quic, &config, &token, &state).await;
    c.resume_reply(&mut state).await.unwrap();
    round_trip(&mut c).await;
    c.close().await;
    s.wait_online(0).await;

    // The returning client's 0-RTT flight passes a relay that records it; the
    // connection finishes and registers.
    let relay = Relay::start(s.quic, true).await;
    let (mut live, z) = connect(&endpoint, relay.addr, &config, &token, &state).await;
    assert!(z.attempted && z.accepted, "{z:?}");
    live.resume_reply(&mut state).await.unwrap();
    s.wait_online(1).await;
    let id = s.registry.get("k").unwrap().id;
    let flight = relay.flight();
    assert_zero_rtt_flight(&flight);

    // The same datagrams again, from other ports, several times.
    let _sockets = replay(&flight, s.quic, 4).await;
    assert_untouched_for(&s, "k", id, HANDSHAKE + Duration::from_millis(300)).await;
    assert_alive(&backend, &mut live, &mut state, "after the replay").await;
    assert_eq!(s.registry.get("k").unwrap().id, id);
    live.close().await;
    s.stop().await;
}

#[tokio::test]
async fn intercepted_zero_rtt_auth_is_read_but_registers_nothing() {
    let s = TestServer::start_with(|c| c.client.handshake_timeout = HANDSHAKE).await;
    let backend = s.backend().await;
    let Returning {
        config,
        endpoint,
        token,
        mut state,
    } = Returning::new(&s);

    // The live session; its connection leaves a ticket in the client config.
    let (mut live, _) = connect(&endpoint, s.quic, &config, &token, &state).await;
    live.resume_reply(&mut state).await.unwrap();
    round_trip(&mut live).await;
    s.wait_online(1).await;
    let id = s.registry.get("k").unwrap().id;

    // Another connection of the client, with that ticket: its first flight never
    // reaches the server, an attacker keeps it.
    let relay = Relay::start(s.quic, false).await;
    let attempt_endpoint = tls::client_endpoint(s.quic).unwrap();
    let attempt = {
        let (e, addr, config, token, state) = (
            attempt_endpoint.clone(),
            relay.addr,
            config.clone(),
            token.clone(),
            state.clone(),
        );
        tokio::spawn(async move { connect(&e, addr, &config, &token, &state).await })
    };
    let flight = tokio::time::timeout(WAIT, async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let f = relay.flight();
            if !f.is_empty() {
                return f;
            }
        }
    })
    .await
    .unwrap();
    attempt.abort();
    drop(relay);
    assert_zero_rtt_flight(&flight);

    // The attacker sends it first: the server takes the ticket, accepts the 0-RTT
    // data and reads the Auth, but the sender cannot finish the handshake.
    let mut last = s.registry.next_id();
    let _sockets = replay(&flight, s.quic, 3).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let n = s.registry.next_id();
            if n > last + 1 {
                return; // a session built a channel from the replayed Auth
            }
            last = n;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the replayed 0-RTT Auth was never read");
    assert_untouched_for(&s, "k", id, HANDSHAKE + Duration::from_millis(300)).await;
    assert_alive(&backend, &mut live, &mut state, "after the replay").await;
    live.close().await;
    s.stop().await;
}

#[tokio::test]
async fn resuming_client_reconnects_with_zero_rtt() {
    let s = TestServer::start().await;
    let backend = s.backend().await;
    let dial = Dial::Quic {
        addr: s.quic,
        server_name: "localhost".into(),
        config: client_config(&s),
    };
    let (mut c, reply) = ResumingClient::connect(dial, s.token("k"), Backoff::default()).await;
    assert_eq!(reply.key, "k");
    assert_eq!(c.zero_rtt_attempted, 0, "no ticket yet");
    s.wait_online(1).await;
    backend.push_msg("k", 1000, "m1").await.unwrap();
    match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
        Event::Push(f, _) => assert_eq!(&f.body[..], b"m1"),
        e => panic!("expected a push, got {e:?}"),
    }
    // the ticket arrived long before the push; a round trip to be sure
    c.connection().unwrap().heartbeat().await.unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, c.next()).await.unwrap(),
        Event::Reply(f) if f.op == op::HEARTBEAT_REPLY
    ));

    c.drop_connection();
    s.wait_online(0).await;
    assert_eq!(
        backend.push_msg("k", 1000, "m2").await.unwrap(),
        PushOutcome::Stored
    );
    match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
        Event::Resumed(r) => {
            assert_eq!(r.source(Source::Key).unwrap().recovered, Some(true))
        }
        e => panic!("expected a resume, got {e:?}"),
    }
    assert_eq!((c.zero_rtt_attempted, c.zero_rtt_accepted), (1, 1));
    match tokio::time::timeout(WAIT, c.next()).await.unwrap() {
        Event::Push(f, meta) => assert_eq!((&f.body[..], meta.offset), (&b"m2"[..], 2)),
        e => panic!("expected the replay, got {e:?}"),
    }
    assert_eq!(c.connects, 2);
    c.close().await;
    s.stop().await;
}

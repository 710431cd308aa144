//! QUIC connection migration against the real server: a client whose socket moves
//! to a new network (a new port, or another address) keeps its connection and its
//! pushes, and the per-IP connection count follows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use quicpush::channel::PushOutcome;
use quicpush::client::{PushClient, PushClientError};
use quicpush::netsim::{sim_client_endpoint, NetSim, SimHandle};
use quicpush::protocol::op;

const PUSHES: u32 = 100;
const PUSH_EVERY: Duration = Duration::from_millis(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// How often a test client's QUIC stack pings when it has nothing else to send.
///
/// The endpoint does not know its socket moved, so nothing tells the server the new
/// address until the client sends a packet: acknowledgements of what arrives
/// before the move are lost with it, and the server's packets go to the old
/// address meanwhile. A phone's stack sends a keep-alive (or the app a heartbeat)
/// soon after a network change; these pings stand for that, without them a move
/// during a lull stalls until the client's next heartbeat.
const KEEP_ALIVE: Duration = Duration::from_millis(200);

/// A QUIC client on `from` whose socket is a simulated network, not yet
/// authenticated.
async fn try_sim_client(
    s: &TestServer,
    from: IpAddr,
    sim: NetSim,
) -> (Result<PushClient, PushClientError>, SimHandle) {
    let (endpoint, handle) = sim_client_endpoint(SocketAddr::new(from, 0), sim).unwrap();
    let mut config = quicpush::tls::quic_client_config(&s.dir.path().join("ca.pem")).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(Duration::from_secs(30).try_into().unwrap()))
        .keep_alive_interval(Some(KEEP_ALIVE));
    config.transport_config(Arc::new(transport));
    let c = tokio::time::timeout(
        WAIT,
        PushClient::connect_quic_on(endpoint, s.quic, "localhost", config),
    )
    .await
    .expect("connecting timed out");
    (c, handle)
}

/// An authenticated QUIC client on `from` over a simulated network.
async fn sim_client(
    s: &TestServer,
    from: IpAddr,
    sim: NetSim,
    key: &str,
) -> (PushClient, SimHandle) {
    let (c, h) = try_sim_client(s, from, sim).await;
    let mut c = c.unwrap();
    c.auth(s.token(key)).await.unwrap();
    (c, h)
}

/// Sends a heartbeat and waits for its reply, skipping pushes.
async fn heartbeat(c: &mut PushClient) {
    c.heartbeat().await.unwrap();
    while next(c).await.op != op::HEARTBEAT_REPLY {}
}

/// Waits until the server counts `n` connections for `addr`.
async fn wait_ip_count(s: &TestServer, addr: IpAddr, n: usize) {
    let per_ip = s.limits.per_ip.clone();
    tokio::time::timeout(WAIT, async {
        while per_ip.count(addr) != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{addr} never counted {n}, counts {}", per_ip.count(addr)));
}

/// Pushes numbered messages to `key` at a steady rate, calling `switch` halfway;
/// asserts each was delivered to the same single channel and that the client
/// received them all, once each, in order, on the same connection.
async fn push_through_a_switch(
    s: &TestServer,
    c: PushClient,
    key: &str,
    switch: impl FnOnce(),
) -> PushClient {
    let backend = s.backend().await;
    let id = s.registry.get(key).unwrap().id;
    let reader = tokio::spawn(async move {
        let mut c = c;
        let mut got = Vec::new();
        for _ in 0..PUSHES {
            let f = next_push(&mut c).await;
            let n: u32 = std::str::from_utf8(&f.body).unwrap().parse().unwrap();
            // The push sequence runs on from the connection's first push: the
            // session never restarted.
            assert_eq!(f.seq, n + 1, "push sequence of message {n}");
            got.push(n);
        }
        (c, got)
    });
    let mut switch = Some(switch);
    let mut tick = tokio::time::interval(PUSH_EVERY);
    for i in 0..PUSHES {
        tick.tick().await;
        if i == PUSHES / 2 {
            if let Some(f) = switch.take() {
                f();
            }
        }
        let outcome = backend.push_msg(key, 1000, i.to_string()).await.unwrap();
        assert_eq!(outcome, PushOutcome::Delivered, "push {i}");
        let chan = s.registry.get(key).expect("client left the registry");
        assert_eq!(chan.id, id, "the client reconnected before push {i}");
        assert_eq!(s.registry.online().total, 1, "at push {i}");
    }
    let (c, got) = tokio::time::timeout(WAIT, reader)
        .await
        .expect("pushes not all received")
        .unwrap();
    assert_eq!(got, (0..PUSHES).collect::<Vec<_>>());
    assert_eq!(s.registry.get(key).unwrap().id, id);
    assert_eq!(s.registry.online().total, 1);
    backend.close().await;
    c
}

#[tokio::test]
async fn pushes_survive_a_switch_to_a_new_port() {
    let s = TestServer::start().await;
    let lossy = NetSim {
        seed: 1,
        loss: 0.02,
        reorder: 0.05,
        rtt: Duration::from_millis(10),
        ..NetSim::default()
    };
    let (c, h) = sim_client(&s, ip("127.0.0.1"), lossy, "phone").await;
    let before = h.local_addr().unwrap();
    let mut moved = None;
    let c = push_through_a_switch(&s, c, "phone", || {
        moved = Some(h.switch_network().unwrap());
    })
    .await;
    let after = moved.unwrap();
    assert_ne!(after.port(), before.port());
    assert_eq!(h.local_addr().unwrap(), after);
    assert_eq!(h.stats().switches, 1);
    c.close().await;
    s.stop().await;
}

#[tokio::test]
async fn pushes_survive_a_switch_to_another_address() {
    let s = TestServer::start().await;
    let (one, two) = (ip("127.0.0.1"), ip("127.0.0.2"));
    let lossy = NetSim {
        seed: 2,
        loss: 0.05,
        reorder: 0.1,
        rtt: Duration::from_millis(10),
        ..NetSim::default()
    };
    let (c, h) = sim_client(&s, one, lossy, "phone").await;
    assert_eq!(
        (s.limits.per_ip.count(one), s.limits.per_ip.count(two)),
        (1, 0)
    );
    let mut c = push_through_a_switch(&s, c, "phone", || {
        h.switch_network_to(two).unwrap();
    })
    .await;
    assert_eq!(h.local_addr().unwrap().ip(), two);
    let stats = h.stats();
    assert!(stats.lost > 0, "{stats:?}");
    // The client spoke from its new address: it is counted there.
    heartbeat(&mut c).await;
    wait_ip_count(&s, two, 1).await;
    assert_eq!(s.limits.per_ip.count(one), 0);
    c.close().await;
    s.stop().await;
}

#[tokio::test]
async fn the_per_ip_count_follows_a_migrated_connection() {
    let s = TestServer::start_with(|c| c.client.max_connections_per_ip = 1).await;
    let (one, two) = (ip("127.0.0.1"), ip("127.0.0.2"));
    let (mut a, h) = sim_client(&s, one, NetSim::default(), "a").await;
    let id = s.registry.get("a").unwrap().id;
    assert_eq!(s.limits.per_ip.count(one), 1);

    h.switch_network_to(two).unwrap();
    heartbeat(&mut a).await;
    wait_ip_count(&s, two, 1).await;
    assert_eq!(s.limits.per_ip.count(one), 0);

    // 127.0.0.1 has room again; 127.0.0.2 is full.
    let mut b = s.client(Via::Quic, "b").await;
    assert_eq!(s.limits.per_ip.count(one), 1);
    let (refused, _) = try_sim_client(&s, two, NetSim::default()).await;
    assert!(
        refused.is_err(),
        "a second connection from 127.0.0.2 was accepted"
    );
    assert_eq!(s.limits.per_ip.count(two), 1);

    // Both clients still work, on their first connections.
    let backend = s.backend().await;
    for (c, key) in [(&mut a, "a"), (&mut b, "b")] {
        assert_eq!(
            backend.push_msg(key, 1000, key).await.unwrap(),
            PushOutcome::Delivered
        );
        assert_eq!(&next_push(c).await.body[..], key.as_bytes());
    }
    assert_eq!(s.registry.get("a").unwrap().id, id);
    assert_eq!(s.registry.online().total, 2);
    backend.close().await;
    a.close().await;
    b.close().await;
    s.stop().await;
}

#[tokio::test]
async fn a_connection_moving_to_a_full_address_is_closed() {
    let s = TestServer::start_with(|c| c.client.max_connections_per_ip = 1).await;
    let (one, three) = (ip("127.0.0.1"), ip("127.0.0.3"));
    let mut a = s.client(Via::Quic, "a").await;
    let (mut d, h) = sim_client(&s, three, NetSim::default(), "d").await;
    s.wait_online(2).await;
    assert_eq!(
        (s.limits.per_ip.count(one), s.limits.per_ip.count(three)),
        (1, 1)
    );

    h.switch_network_to(one).unwrap();
    d.heartbeat().await.unwrap();
    assert_closed(&mut d).await;
    s.wait_online(1).await;
    wait_ip_count(&s, three, 0).await;
    assert_eq!(
        s.limits.per_ip.count(one),
        1,
        "a alone is counted for 127.0.0.1"
    );
    assert!(s.registry.get("d").is_none());

    // The client that was there first is unaffected.
    heartbeat(&mut a).await;
    a.close().await;
    s.stop().await;
}

/// A phone whose network changes under loss and whose connection does not survive
/// it (the OS dropped the socket: a TCP reset, or a QUIC path abandoned): it
/// reconnects, over a new lossy network for QUIC, and resumes. Pushes flow at a
/// steady rate throughout; every one arrives once, in order.
#[tokio::test]
async fn a_network_switch_under_loss_that_kills_the_connection_loses_nothing() {
    use quicpush::client::ResumeState;
    let s = TestServer::start().await;
    let backend = Arc::new(s.backend().await);
    for via in BOTH {
        let key = format!("roaming-{via:?}");
        let token = s.token(&key);
        let mut state = ResumeState::default();
        let lossy = NetSim {
            seed: 7,
            loss: 0.10,
            reorder: 0.20,
            rtt: Duration::from_millis(20),
            ..NetSim::default()
        };
        let connect = |state: &mut ResumeState, seed: u64| {
            let token = token.clone();
            let mut state2 = state.clone();
            let sim = NetSim {
                seed,
                ..lossy.clone()
            };
            let s = &s;
            async move {
                let mut c = match via {
                    Via::Quic => {
                        let (c, _h) = try_sim_client(s, ip("127.0.0.1"), sim).await;
                        c.unwrap()
                    }
                    other => s.raw_client(other).await,
                };
                c.auth_resume(token.as_bytes(), &mut state2).await.unwrap();
                (c, state2)
            }
        };
        let (mut c, st) = connect(&mut state, 1).await;
        state = st;
        let pusher = {
            let backend = backend.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 1..=PUSHES {
                    outcomes.push(
                        backend
                            .push_msg(key.as_str(), 1000, i.to_string())
                            .await
                            .unwrap(),
                    );
                    tokio::time::sleep(PUSH_EVERY).await;
                }
                outcomes
            })
        };
        let mut got: Vec<u32> = Vec::new();
        let mut switches = 0u64;
        while got.len() < PUSHES as usize {
            // every 20 pushes the network goes away with whatever was in flight
            if got.len() >= 20 * (switches as usize + 1) {
                switches += 1;
                drop(c);
                let (c2, st) = connect(&mut state, 1 + switches).await;
                c = c2;
                state = st;
                continue;
            }
            let (f, m) = tokio::time::timeout(WAIT, c.next_frame_meta())
                .await
                .expect("timed out")
                .unwrap()
                .expect("closed");
            if f.op != 1000 {
                continue;
            }
            state.observe(&m.unwrap());
            got.push(std::str::from_utf8(&f.body).unwrap().parse().unwrap());
        }
        let outcomes = pusher.await.unwrap();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, PushOutcome::Delivered | PushOutcome::Stored)),
            "{outcomes:?}"
        );
        assert_eq!(
            got,
            (1..=PUSHES).collect::<Vec<_>>(),
            "{via:?}: each once, in order"
        );
        assert_eq!(switches, 4);
        assert_eq!(state.not_recovered, 0);
        drop(c);
        s.wait_online(0).await;
    }
    s.stop().await;
}

//! Spoofed QUIC Initials (issue 9, defect 2): a flood of client Initial datagrams
//! from many forged loopback addresses, none of which ever answers the handshake,
//! must not hold the connection permits that real clients need, nor use up the
//! per-IP quota of an address it forges.
//!
//! On Linux every address of 127/8 is local, so the flood's sockets bind
//! 127.0.0.2 ..= 127.0.0.250 and send real Initials (each the first datagram of
//! a fresh connection attempt, built by a sans-IO QUIC client) while TCP and QUIC
//! clients, some of them from a forged address, connect, authenticate and get
//! pushes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use quicpush::channel::PushOutcome;
use quicpush::client::{resume_auth_body, PushClient, ResumeState, ZeroRtt};
use quicpush::protocol::Source;
use quicpush::tls;
use tokio::net::{TcpSocket, UdpSocket};

/// The flood's source hosts: 127.0.0.2 ..= 127.0.0.250.
const FLOOD_HOSTS: std::ops::RangeInclusive<u8> = 2..=250;
/// An address the flood forges that real clients use too.
const VICTIM: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
/// An address the flood leaves alone.
const BYSTANDER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// Initials sent, evenly over [`FLOOD_FOR`]; every fourth from [`VICTIM`].
const INITIALS: usize = 3000;
const FLOOD_FOR: Duration = Duration::from_secs(3);
/// A small per-IP limit, so that a flood counted per address would use it up.
const PER_IP: usize = 4;
/// What one client is given to connect and authenticate.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// `n` client Initials for `server`, each the first datagram of its own
/// connection attempt (its own connection ids and ClientHello).
fn initials(server: SocketAddr, config: quinn::ClientConfig, n: usize) -> Vec<Vec<u8>> {
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    (0..n)
        .map(|_| {
            let (_, mut conn) = endpoint
                .connect(now, config.clone(), server, "localhost")
                .unwrap();
            let mut buf = Vec::new();
            let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
            buf.truncate(t.size);
            assert!(
                buf.len() >= 1200 && buf[0] & 0xf0 == 0xc0,
                "a padded Initial"
            );
            buf
        })
        .collect()
}

/// One socket per flood host; they never read what the server answers.
async fn flood_sockets() -> Vec<UdpSocket> {
    let mut socks = Vec::new();
    for h in FLOOD_HOSTS {
        socks.push(
            UdpSocket::bind((Ipv4Addr::new(127, 0, 0, h), 0))
                .await
                .unwrap(),
        );
    }
    socks
}

/// Sends `datagrams` to `server` over [`FLOOD_FOR`], round-robin over the hosts,
/// every fourth from [`VICTIM`]; returns how many were sent.
async fn flood(socks: &[UdpSocket], server: SocketAddr, datagrams: Vec<Vec<u8>>) -> usize {
    let victim = usize::from(VICTIM.octets()[3] - FLOOD_HOSTS.start());
    let start = tokio::time::Instant::now();
    let every = FLOOD_FOR / datagrams.len() as u32;
    let mut sent = 0;
    for (i, d) in datagrams.iter().enumerate() {
        tokio::time::sleep_until(start + every * i as u32).await;
        if start.elapsed() > FLOOD_FOR * 2 {
            break;
        }
        let s = if i % 4 == 0 {
            &socks[victim]
        } else {
            &socks[i % socks.len()]
        };
        if s.send_to(d, server).await.is_ok() {
            sent += 1;
        }
    }
    sent
}

/// Connects over `via` from `from` and authenticates as `key`.
async fn connect(
    s: &TestServer,
    via: Via,
    from: Ipv4Addr,
    key: &str,
) -> Result<PushClient, String> {
    let mut c = match via {
        Via::Tcp => {
            let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
            socket.bind((from, 0).into()).map_err(|e| e.to_string())?;
            let stream = socket.connect(s.tcp).await.map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (r, w) = stream.into_split();
            PushClient::from_parts(Box::new(r), Box::new(w), None)
        }
        Via::Quic => {
            let endpoint = quinn::Endpoint::client((from, 0).into()).map_err(|e| e.to_string())?;
            let config = tls::quic_client_config(&s.dir.path().join("ca.pem")).unwrap();
            PushClient::connect_quic_on(endpoint, s.quic, "localhost", config)
                .await
                .map_err(|e| e.to_string())?
        }
        other => {
            return Err(format!(
                "this test binds clients over TCP or QUIC, not {other:?}"
            ))
        }
    };
    c.auth(s.token(key)).await.map_err(|e| e.to_string())?;
    Ok(c)
}

/// One real client's attempt under the flood.
struct Attempt {
    via: Via,
    from: Ipv4Addr,
    key: String,
    took: Duration,
    result: Result<PushClient, String>,
}

async fn attempt(s: &TestServer, via: Via, from: Ipv4Addr, key: String) -> Attempt {
    let start = Instant::now();
    let result = match tokio::time::timeout(CONNECT_WITHIN, connect(s, via, from, &key)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no AuthReply within {CONNECT_WITHIN:?}")),
    };
    Attempt {
        via,
        from,
        key,
        took: start.elapsed(),
        result,
    }
}

/// Floods the server (connection cap `max_connections`, [`PER_IP`] per address)
/// while four TCP and four QUIC clients, half of them from [`VICTIM`], connect,
/// authenticate and get a push each; every one must.
async fn clients_connect_under_a_flood(max_connections: usize) {
    let s = TestServer::start_with(|c| {
        c.client.max_connections = max_connections;
        c.client.max_connections_per_ip = PER_IP;
    })
    .await;
    let config = tls::quic_client_config(&s.dir.path().join("ca.pem")).unwrap();
    let server = s.quic;
    let datagrams = tokio::task::spawn_blocking(move || initials(server, config, INITIALS))
        .await
        .unwrap();
    let socks = flood_sockets().await;

    let flooding = flood(&socks, s.quic, datagrams);
    let clients = async {
        // Let the flood get going first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut plan = Vec::new();
        for (i, from) in [BYSTANDER, VICTIM].into_iter().enumerate() {
            for (j, via) in [Via::Tcp, Via::Tcp, Via::Quic, Via::Quic]
                .into_iter()
                .enumerate()
            {
                plan.push(attempt(&s, via, from, format!("k{i}-{j}")));
            }
        }
        futures_util::future::join_all(plan).await
    };
    let (sent, attempts) = tokio::join!(flooding, clients);

    println!(
        "flood: {sent} Initials from {} addresses over {FLOOD_FOR:?}",
        socks.len()
    );
    for a in &attempts {
        println!(
            "{:?} client from {}: {} in {:?}",
            a.via,
            a.from,
            match &a.result {
                Ok(_) => "connected and authenticated".to_owned(),
                Err(e) => format!("FAILED ({e})"),
            },
            a.took
        );
    }
    let ok = attempts.iter().filter(|a| a.result.is_ok()).count();
    let slowest = attempts.iter().map(|a| a.took).max().unwrap();
    println!(
        "{ok} of {} clients connected under the flood; slowest {slowest:?}",
        attempts.len()
    );
    assert_eq!(sent, INITIALS, "the whole flood was sent");
    assert_eq!(ok, attempts.len(), "every client connects under the flood");

    // Only the real clients are counted: the forged address's quota is theirs,
    // and the connection cap holds connections, not handshakes from nowhere.
    let victim = IpAddr::V4(VICTIM);
    assert_eq!(s.limits.per_ip.count(victim), 4);
    assert_eq!(s.limits.per_ip.count(IpAddr::V4(BYSTANDER)), 4);
    // (Each accept loop over TCP holds one more permit, for its next connection.)
    assert_eq!(
        s.limits.total.available_permits(),
        max_connections - attempts.len() - s.tcp_accept_loops()
    );

    // And they get their pushes.
    s.wait_online(attempts.len() as u64).await;
    let backend = s.backend().await;
    for a in attempts {
        let mut c = a.result.unwrap();
        let o = backend
            .push_msg(a.key.as_str(), 1000, a.key.clone())
            .await
            .unwrap();
        assert_eq!(o, PushOutcome::Delivered, "{:?} from {}", a.via, a.from);
        let f = next_push(&mut c).await;
        assert_eq!(f.body, a.key.as_bytes());
        c.close().await;
    }
    drop(socks);
    s.stop().await;
}

/// The flood alone would fill the connection cap many times over: it must hold
/// none of it, so neither the QUIC nor the TCP accept loop is starved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_initials_leave_the_connection_cap_to_real_clients() {
    clients_connect_under_a_flood(200).await;
}

/// With the default connection cap: the forged address keeps its per-IP quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_initials_leave_a_forged_address_its_quota() {
    clients_connect_under_a_flood(quicpush::Config::default().client.max_connections).await;
}

/// The next push's body; `state` moves to it.
async fn push(c: &mut PushClient, state: &mut ResumeState) -> bytes::Bytes {
    next_resume_push(c, state).await.0.body
}

/// `quic.retry_threshold = 0`: every connection is validated with a Retry first;
/// it is counted from accept, gets its pushes, and a returning client still
/// sends its Auth as 0-RTT data, accepted, and resumes.
#[tokio::test]
async fn with_retry_for_every_address_clients_connect_and_resume_with_0rtt() {
    let s = TestServer::start_with(|c| c.quic.retry_threshold = 0).await;
    let backend = s.backend().await;
    let config = tls::quic_client_config(&s.dir.path().join("ca.pem")).unwrap();
    let endpoint = tls::client_endpoint(s.quic).unwrap();
    let token = s.token("k");
    let mut state = ResumeState::default();
    let connect = |state: &ResumeState| {
        let body = resume_auth_body(token.as_bytes(), &state.request()).unwrap();
        let (endpoint, config) = (endpoint.clone(), config.clone());
        async move {
            tokio::time::timeout(
                WAIT,
                PushClient::connect_quic_0rtt(&endpoint, s.quic, "localhost", config, body),
            )
            .await
            .expect("connect timed out")
            .unwrap()
        }
    };

    let (mut c, z) = connect(&state).await;
    assert_eq!(z, ZeroRtt::default(), "no ticket yet");
    c.resume_reply(&mut state).await.unwrap();
    s.wait_online(1).await;
    assert_eq!(s.limits.per_ip.count(BYSTANDER.into()), 1);
    let o = backend.push_msg("k", 1000, "m1").await.unwrap();
    assert_eq!(o, PushOutcome::Delivered);
    assert_eq!(push(&mut c, &mut state).await, "m1".as_bytes());
    c.close().await;
    s.wait_online(0).await;
    assert_eq!(
        backend.push_msg("k", 1000, "m2").await.unwrap(),
        PushOutcome::Stored
    );

    let (mut c, z) = connect(&state).await;
    assert_eq!(
        z,
        ZeroRtt {
            attempted: true,
            accepted: true
        },
        "0-RTT survives the Retry"
    );
    let reply = c.resume_reply(&mut state).await.unwrap();
    assert_eq!(
        reply.source(Source::Key).unwrap().recovered,
        Some(true),
        "{reply:?}"
    );
    assert_eq!(
        push(&mut c, &mut state).await,
        "m2".as_bytes(),
        "the replay"
    );
    s.wait_online(1).await;
    assert_eq!(s.limits.per_ip.count(BYSTANDER.into()), 1);
    c.close().await;
    s.stop().await;
}

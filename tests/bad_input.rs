//! The bad-input table: malformed, hostile and misconfigured input from clients and
//! backends, run against a real `quicpush serve` process.
//!
//! Each case does one bad thing and says what must happen: an error reply (or an
//! error value at the offending side), the connection closed with a server log line
//! naming the reason, or, for input that never makes a connection, nothing accepting
//! it. After every case the server must not have panicked, must still be running,
//! must hold no connection but the bystanders', and two bystander clients (TCP and
//! QUIC, connected before the first case) must still receive pushes. The table runs
//! several rounds: at the end the registry is empty once every client has left, and
//! the server's memory in the last round is within a stated tolerance of its level
//! after the warm-up rounds (see `check_memory`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use common::{next, next_push, Via, BOTH, WAIT};
use futures_util::future::BoxFuture;
use quicpush::auth;
use quicpush::bench::process::{ProcStat, ServerProcess};
use quicpush::channel::PushOutcome;
use quicpush::client::PushClient;
use quicpush::codec;
use quicpush::protocol::{self, op, Frame};
use quicpush::rpc::proto::Response;
use quicpush::rpc::{Client, Request};
use quicpush::tls::{self, BackendIdentity};
use quicpush::Config;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Rounds of the whole table.
const ROUNDS: usize = 6;
/// Rounds that warm the server up before its memory level is taken.
const WARMUP_ROUNDS: usize = 2;
/// How much the server's memory level may grow from the first round after the
/// warm-up to the last, as a fraction. See [`check_memory`].
const RSS_TOLERANCE: f64 = 0.15;
/// The room the bystanders (and the well-behaved part of some cases) are in.
const ROOM: &str = "live://bystanders";
/// How long datagram cases listen for anything coming back.
const DATAGRAM_WINDOW: Duration = Duration::from_millis(150);

/// What the cases need to know about the server under test.
struct Ctx {
    /// The server's certificate directory (CA, backend certificate, token secret).
    dir: PathBuf,
    config: Config,
    secret: Vec<u8>,
    tcp: SocketAddr,
    quic: SocketAddr,
    rpc: SocketAddr,
    /// Client certificates the server must refuse.
    expired: BackendIdentity,
    other_ca: BackendIdentity,
    _certs: tempfile::TempDir,
}

impl Ctx {
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn token(&self, key: &str, room: Option<&str>) -> String {
        let mut claims = auth::claims_for(key, Duration::from_secs(3600));
        claims.room_id = room.map(Into::into);
        auth::issue(&self.secret, &claims).unwrap()
    }
}

/// What the offending side saw.
#[derive(Debug)]
enum Seen {
    /// A reply or an error value, as text.
    Reply(String),
    /// The server ended the connection (or the stream); what came before, if anything.
    Closed(String),
    /// No connection was made: refused, or datagrams dropped (what came back, if anything).
    NoConnection(String),
}

/// A case's result: what the offending side saw, and its local port, by which the
/// server's log lines name the connection (`remote=127.0.0.1:<port>`).
struct Observed {
    seen: Seen,
    peer: Option<u16>,
}

/// What a case must lead to.
#[derive(Debug)]
enum Expect {
    /// The offending side gets a reply or error containing `reply`, and the server
    /// logs a line containing every string in `log` (for that peer, when known).
    Reply { reply: String, log: Vec<String> },
    /// The connection or stream ends, and the server logs a line containing every
    /// string in `log` (for that peer, when known).
    Closed { log: Vec<String> },
    /// Nothing accepts the input: the kernel refuses it or QUIC drops it.
    NoConnection,
}

type Action = Box<dyn for<'a> Fn(&'a Ctx) -> BoxFuture<'a, Observed> + Send + Sync>;

fn act<F>(f: F) -> Action
where
    F: for<'a> Fn(&'a Ctx) -> BoxFuture<'a, Observed> + Send + Sync + 'static,
{
    Box::new(f)
}

struct Case {
    name: String,
    action: Action,
    expect: Expect,
}

fn closed(log: &[&str]) -> Expect {
    Expect::Closed {
        log: log.iter().map(|s| s.to_string()).collect(),
    }
}

fn reply(reply: impl Into<String>, log: &[&str]) -> Expect {
    Expect::Reply {
        reply: reply.into(),
        log: log.iter().map(|s| s.to_string()).collect(),
    }
}

// ---------------------------------------------------------------------------
// Client connections

fn header(pack_len: u32, header_len: u16, op: u32) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(pack_len);
    b.put_u16(header_len);
    b.put_u16(1);
    b.put_u32(op);
    b.put_u32(1);
    b.to_vec()
}

fn frame(op: u32, body: impl Into<Bytes>) -> Vec<u8> {
    Frame::new(op, 1, body).to_bytes().to_vec()
}

/// A client connection that has not authenticated, and its local port.
async fn connect(c: &Ctx, via: Via) -> (PushClient, u16) {
    match via {
        Via::Tcp => {
            let s = tokio::net::TcpStream::connect(c.tcp).await.unwrap();
            s.set_nodelay(true).unwrap();
            let port = s.local_addr().unwrap().port();
            let (r, w) = s.into_split();
            (PushClient::from_parts(Box::new(r), Box::new(w), None), port)
        }
        Via::Quic => {
            let client = PushClient::connect_quic(c.quic, "localhost", &c.ca())
                .await
                .unwrap();
            let (r, w, _, quic) = client.into_parts();
            let port = quic.as_ref().unwrap().1.local_addr().unwrap().port();
            (PushClient::from_parts(r, w, quic), port)
        }
    }
}

/// A client authenticated as `key` (in `room`, if any), and its local port.
async fn connect_authed(c: &Ctx, via: Via, key: &str, room: Option<&str>) -> (PushClient, u16) {
    let (mut client, port) = connect(c, via).await;
    tokio::time::timeout(WAIT, client.auth(c.token(key, room)))
        .await
        .expect("no AuthReply in time")
        .expect("a valid token is accepted");
    (client, port)
}

/// Ends the client's sending side (TCP FIN, QUIC stream FIN); reading goes on.
async fn half_close(client: PushClient) -> PushClient {
    let (r, mut w, _, quic) = client.into_parts();
    let _ = tokio::time::timeout(WAIT, w.shutdown()).await;
    PushClient::from_parts(r, w, quic)
}

/// Reads until the server ends the connection; the ops of the frames that came first.
async fn until_closed(client: &mut PushClient) -> Vec<u32> {
    let mut ops = Vec::new();
    let read = async {
        loop {
            match client.next_frame().await {
                Ok(Some(f)) => ops.push(f.op),
                Ok(None) | Err(_) => return,
            }
        }
    };
    let in_time = tokio::time::timeout(WAIT, read).await.is_ok();
    assert!(
        in_time,
        "the server did not close the connection within {WAIT:?} (frames: {ops:?})"
    );
    ops
}

/// Sends `bytes` (after a valid Auth as `key`, if given), then, with `eof`, ends the
/// sending side, and waits for the server to close the connection.
async fn send_bad(c: &Ctx, via: Via, key: Option<&str>, bytes: &[u8], eof: bool) -> Observed {
    let (mut client, port) = match key {
        Some(key) => connect_authed(c, via, key, None).await,
        None => connect(c, via).await,
    };
    // The server may close while this is still being written: that is the case's point.
    let _ = tokio::time::timeout(WAIT, client.send_raw(bytes)).await;
    if eof {
        client = half_close(client).await;
    }
    let ops = until_closed(&mut client).await;
    let before = ops.iter().filter(|&&o| o == op::HEARTBEAT_REPLY).count();
    assert_eq!(
        before,
        ops.len(),
        "only HeartbeatReplies may come before the close: {ops:?}"
    );
    Observed {
        seen: Seen::Closed(format!("{before} HeartbeatReplies first")),
        peer: Some(port),
    }
}

/// A client-frame case: `bytes` from a fresh connection over `via`.
fn frames(name: &str, via: Via, authed: bool, bytes: Vec<u8>, eof: bool, log: &str) -> Case {
    let key = format!("bad-{name}-{via:?}");
    Case {
        name: format!("{name} ({via:?})"),
        action: act(move |c| {
            let bytes = bytes.clone();
            let key = key.clone();
            Box::pin(async move {
                let key = authed.then_some(key.as_str());
                send_bad(c, via, key, &bytes, eof).await
            })
        }),
        expect: closed(&[log]),
    }
}

/// After Auth, an op the server does not handle, then a Heartbeat: the first is
/// ignored, the second answered with the room's online count.
async fn unknown_op(c: &Ctx, via: Via) -> Observed {
    let (mut client, port) =
        connect_authed(c, via, &format!("bad-unknown-op-{via:?}"), Some(ROOM)).await;
    client.send(55, "what is this").await.unwrap();
    let seq = client.heartbeat().await.unwrap();
    let f = next(&mut client).await;
    let count = if f.body.len() == 4 {
        u32::from_be_bytes(f.body[..].try_into().unwrap())
    } else {
        u32::MAX
    };
    let text = format!(
        "op={} seq_echoed={} room_online={count}",
        f.op,
        f.seq == seq
    );
    let mut client = half_close(client).await;
    until_closed(&mut client).await;
    Observed {
        seen: Seen::Reply(text),
        peer: Some(port),
    }
}

/// A TLS ClientHello, as a TLS client would open, sent to the plain TCP client port.
async fn client_hello_to_tcp(c: &Ctx) -> Observed {
    let cfg = rustls_client(&c.ca(), None, b"quicpush/1");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    send_bad(c, Via::Tcp, None, &hello, false).await
}

// ---------------------------------------------------------------------------
// Backend RPC

/// A raw backend connection with the right certificate, for sending bytes as they are.
struct RawRpc {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    port: u16,
}

impl RawRpc {
    async fn connect(c: &Ctx) -> RawRpc {
        let config = tls::rpc_client_config(&BackendIdentity::from_dir(&c.dir)).unwrap();
        let endpoint = tls::client_endpoint(c.rpc).unwrap();
        let conn = endpoint
            .connect_with(config, c.rpc, "localhost")
            .unwrap()
            .await
            .unwrap();
        let port = endpoint.local_addr().unwrap().port();
        RawRpc {
            endpoint,
            conn,
            port,
        }
    }

    /// Sends `bytes` on a new stream (then finishes it) and reads replies until
    /// `want` arrived or the server ended the stream.
    async fn exchange(&self, bytes: &[u8], want: usize) -> (Vec<(u64, Response)>, bool) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        send.finish().unwrap();
        read_replies(&mut recv, want).await
    }

    /// Closes the connection; the endpoint tells the server and drains in the background.
    fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let endpoint = self.endpoint;
        tokio::spawn(async move { tokio::time::timeout(WAIT, endpoint.wait_idle()).await });
    }
}

/// Reads replies until `want` arrived or the stream ended (`true`).
async fn read_replies(recv: &mut quinn::RecvStream, want: usize) -> (Vec<(u64, Response)>, bool) {
    let mut buf = BytesMut::new();
    let mut replies = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        while let Some((id, len)) = codec::peek_prefix(&buf).unwrap() {
            let end = codec::PREFIX_LEN + len as usize;
            if buf.len() < end {
                break;
            }
            let msg = buf.split_to(end);
            replies.push((
                id,
                codec::decode_payload(&msg[codec::PREFIX_LEN..]).unwrap(),
            ));
        }
        if replies.len() >= want {
            return (replies, false);
        }
        match tokio::time::timeout_at(deadline, recv.read_buf(&mut buf)).await {
            Err(_) => panic!("no reply within {WAIT:?}; got {replies:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (replies, true),
            Ok(Ok(_)) => {}
        }
    }
}

fn message(id: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(8 + payload.len() as u32);
    b.put_u64(id);
    b.put_slice(payload);
    b.to_vec()
}

fn ping(id: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    codec::write_message(&mut b, id, &Request::Ping).unwrap();
    b.to_vec()
}

/// Sends `bytes` (then a Ping with call id 9, unless `then_ping` is false) on one
/// stream of a fresh backend connection; what came back, as text.
async fn rpc_bytes(c: &Ctx, mut bytes: Vec<u8>, then_ping: bool, want: usize) -> Observed {
    let rpc = RawRpc::connect(c).await;
    if then_ping {
        bytes.extend_from_slice(&ping(9));
    }
    let (replies, ended) = rpc.exchange(&bytes, want).await;
    let port = rpc.port;
    rpc.close();
    let seen = if replies.is_empty() && ended {
        Seen::Closed("stream ended without a reply".into())
    } else {
        Seen::Reply(format!("{replies:?}"))
    };
    Observed {
        seen,
        peer: Some(port),
    }
}

/// A valid PushMsg whose payload is cut short by 3 bytes, its length field matching the cut.
fn truncated_bincode() -> Vec<u8> {
    let mut full = BytesMut::new();
    let req = Request::PushMsg {
        key: "nobody".into(),
        op: 1000,
        body: Bytes::from_static(b"hello"),
    };
    codec::write_message(&mut full, 1, &req).unwrap();
    message(1, &full[codec::PREFIX_LEN..full.len() - 3])
}

/// A request over `rpc.max_request_bytes`, sent in full, then a Ping.
async fn over_request_limit(c: &Ctx) -> Observed {
    let over = c.config.rpc.max_request_bytes + 1;
    let mut bytes = BytesMut::new();
    bytes.put_u32(8 + over as u32);
    bytes.put_u64(1);
    bytes.put_bytes(0, over);
    rpc_bytes(c, bytes.to_vec(), true, 2).await
}

/// 1,000,000 one-letter keys in one MPushMsg (2 MB: under the request limit).
async fn million_keys(c: &Ctx) -> Observed {
    let b = Client::connect(c.rpc, "localhost", &BackendIdentity::from_dir(&c.dir))
        .await
        .unwrap();
    let keys = vec!["k".to_string(); 1_000_000];
    let result = b.mpush_msg(keys, 1000, "x").await;
    let after = b.ping().await;
    b.close().await;
    Observed {
        seen: Seen::Reply(format!("{result:?}; then ping: {after:?}")),
        peer: None,
    }
}

/// A Ping, then half a request, then the stream is reset.
async fn reset_mid_request(c: &Ctx) -> Observed {
    let rpc = RawRpc::connect(c).await;
    let (mut send, mut recv) = rpc.conn.open_bi().await.unwrap();
    let mut bytes = ping(1);
    let mut half = message(2, &[0u8; 100]);
    half.truncate(60);
    bytes.extend_from_slice(&half);
    send.write_all(&bytes).await.unwrap();
    let (replies, _) = read_replies(&mut recv, 1).await;
    assert_eq!(replies, vec![(1, Ok(quicpush::rpc::Reply::Pong))]);
    send.reset(7u32.into()).unwrap();
    let (more, ended) = read_replies(&mut recv, 1).await;
    assert!(ended && more.is_empty(), "{more:?}");
    let port = rpc.port;
    rpc.close();
    Observed {
        seen: Seen::Closed("the server finished its side".into()),
        peer: Some(port),
    }
}

/// Calls written on four streams, and the connection closed before any reply is read.
async fn close_with_calls_in_flight(c: &Ctx) -> Observed {
    let rpc = RawRpc::connect(c).await;
    let mut out = BytesMut::new();
    for id in 0..100u64 {
        let req = match id % 4 {
            0 => Request::Ping,
            1 => Request::Online,
            2 => Request::Rooms,
            _ => Request::PushMsg {
                key: "nobody".into(),
                op: 1000,
                body: Bytes::from_static(b"in flight"),
            },
        };
        codec::write_message(&mut out, id, &req).unwrap();
    }
    // Both halves of each stream stay open until the connection closes: dropping a
    // receive half would tell the server to stop sending on it first.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = rpc.conn.open_bi().await.unwrap();
        send.write_all(&out).await.unwrap();
        streams.push((send, recv));
    }
    let port = rpc.port;
    rpc.close();
    drop(streams);
    Observed {
        seen: Seen::Closed("closed by the backend with 400 calls unanswered".into()),
        peer: Some(port),
    }
}

// ---------------------------------------------------------------------------
// TLS and transport

/// A TLS 1.3 client configuration trusting `ca`, with an optional client certificate
/// and the given ALPN.
fn rustls_client(ca: &Path, cert: Option<(&Path, &Path)>, alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(tls::load_certs(c).unwrap(), tls::load_key(k).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

fn quic_client(cfg: rustls::ClientConfig) -> quinn::ClientConfig {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

/// Connects to `addr` with `config` and tries a Ping: the reply, or why the
/// connection failed (the close reason the server sent, when it sent one).
async fn quic_attempt(addr: SocketAddr, config: quinn::ClientConfig) -> Observed {
    let endpoint = tls::client_endpoint(addr).unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let attempt = async {
        let conn = endpoint
            .connect_with(config, addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&ping(1)).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            let data = recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())?;
            codec::decode_payload::<Response>(&data[codec::PREFIX_LEN..]).map_err(|e| e.to_string())
        };
        exchange
            .await
            .map_err(|e| conn.close_reason().map_or(e, |reason| reason.to_string()))
    };
    let result = tokio::time::timeout(WAIT, attempt)
        .await
        .expect("the attempt neither failed nor succeeded in time");
    Observed {
        seen: Seen::Reply(format!("{result:?}")),
        peer: Some(port),
    }
}

fn backend_config(id: &BackendIdentity) -> quinn::ClientConfig {
    tls::rpc_client_config(id).unwrap()
}

/// A TCP connection to a port where only UDP listens.
async fn tcp_to(addr: SocketAddr) -> Observed {
    let seen = match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Seen::NoConnection("connect timed out".into()),
        Ok(Err(e)) => Seen::NoConnection(format!("connect: {e}")),
        Ok(Ok(_)) => Seen::Reply("a TCP listener accepted the connection".into()),
    };
    Observed { seen, peer: None }
}

/// Sends datagrams to `addr` and counts what comes back within a short window.
async fn datagrams(addr: SocketAddr, payloads: Vec<Vec<u8>>) -> Observed {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for p in &payloads {
        socket.send_to(p, addr).await.unwrap();
    }
    let mut answers = 0;
    let mut buf = vec![0u8; 2048];
    while let Ok(Ok(_)) = tokio::time::timeout(DATAGRAM_WINDOW, socket.recv_from(&mut buf)).await {
        answers += 1;
    }
    Observed {
        seen: Seen::NoConnection(format!(
            "{} datagrams sent, {answers} answered",
            payloads.len()
        )),
        peer: None,
    }
}

fn random_datagrams() -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    (0..64)
        .map(|i| {
            let len = if i % 4 == 0 {
                1200 + rng.gen_range(0..200)
            } else {
                rng.gen_range(1..1500)
            };
            (0..len).map(|_| rng.gen()).collect()
        })
        .collect()
}

fn plain_datagrams() -> Vec<Vec<u8>> {
    vec![
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        b"hello\n".to_vec(),
        frame(op::AUTH, "not over UDP"),
    ]
}

/// Writes a backend certificate and key signed by `issuer`, valid until `not_after`.
fn write_backend_cert(
    dir: &Path,
    name: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    not_after: (i32, u8, u8),
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["backend".to_owned()]).unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("quicpush backend ({name})"),
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let cert = params.signed_by(&key, issuer).unwrap();
    let pem = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&pem, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (pem, key_path)
}

/// CA parameters like the project's own (`src/certs.rs`), with this common name.
fn ca_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// An expired backend certificate from the server's own CA, and a current one from
/// another CA.
fn bad_backend_certs(server_dir: &Path, out: &Path) -> (BackendIdentity, BackendIdentity) {
    let ca = server_dir.join("ca.pem");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(server_dir.join("ca.key")).unwrap())
            .unwrap();
    let ours = rcgen::Issuer::new(ca_params("quicpush CA"), ca_key);
    let expired = write_backend_cert(out, "expired", &ours, (2021, 1, 1));
    let other_key = rcgen::KeyPair::generate().unwrap();
    let theirs = rcgen::Issuer::new(ca_params("another CA"), other_key);
    let other = write_backend_cert(out, "other-ca", &theirs, (4096, 1, 1));
    (
        BackendIdentity {
            ca: ca.clone(),
            cert: Some(expired),
        },
        BackendIdentity {
            ca,
            cert: Some(other),
        },
    )
}

// ---------------------------------------------------------------------------
// The table

fn table(c: &Ctx) -> Vec<Case> {
    let max_body = c.config.client.max_body;
    let mut t = Vec::new();
    let wrong_key_token = {
        let claims = auth::claims_for("wrong-key", Duration::from_secs(3600));
        auth::issue(b"not-the-server-secret-0123456789", &claims).unwrap()
    };
    let expired_token = {
        let mut claims = auth::claims_for("expired", Duration::ZERO);
        claims.exp = auth::now_secs() - 3600;
        auth::issue(&c.secret, &claims).unwrap()
    };
    // header {"alg":"none","typ":"JWT"}, claims {"key":"k","exp":9999999999}, no signature
    let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJrZXkiOiJrIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
    let raw_cut = {
        let inner = protocol::join_raw(&[Frame::new(op::HEARTBEAT, 2, Bytes::new())]);
        inner.slice(..inner.len() - 1)
    };
    let mut flood = Vec::with_capacity(10_000 * 16);
    for _ in 0..10_000 {
        flood.extend_from_slice(&frame(op::HEARTBEAT, Bytes::new()));
    }
    for via in BOTH {
        t.push(frames(
            "short header then EOF",
            via,
            false,
            header(16, 16, op::AUTH)[..8].to_vec(),
            true,
            "connection closed in the middle of a frame (8 bytes buffered)",
        ));
        t.push(frames(
            "headerLen 17",
            via,
            false,
            header(16, 17, op::AUTH),
            false,
            "bad frame: header length 17 is not 16",
        ));
        t.push(frames(
            "packLen 15",
            via,
            false,
            header(15, 16, op::AUTH),
            false,
            "bad frame: packet length 15 is shorter than the 16-byte header",
        ));
        t.push(frames(
            "packLen over client.max_body",
            via,
            false,
            header(16 + max_body as u32 + 1, 16, op::AUTH),
            false,
            &format!(
                "bad frame: body of {} bytes exceeds the limit of {max_body} bytes",
                max_body + 1
            ),
        ));
        t.push(frames(
            "packLen 4 GiB",
            via,
            false,
            header(u32::MAX, 16, op::AUTH),
            false,
            &format!(
                "bad frame: body of {} bytes exceeds the limit of {max_body} bytes",
                u32::MAX - 16
            ),
        ));
        let mut cut = header(16 + 100, 16, op::AUTH);
        cut.extend_from_slice(&[b'x'; 40]);
        t.push(frames(
            "body cut off by EOF",
            via,
            false,
            cut,
            true,
            "connection closed in the middle of a frame (56 bytes buffered)",
        ));
        t.push(frames(
            "Heartbeat before Auth",
            via,
            false,
            frame(op::HEARTBEAT, Bytes::new()),
            false,
            "first frame has op 2, expected Auth (7)",
        ));
        t.push(frames(
            "SendMsg before Auth",
            via,
            false,
            frame(op::SEND_MSG, "hi"),
            false,
            "first frame has op 4, expected Auth (7)",
        ));
        t.push(frames(
            "Auth body empty",
            via,
            false,
            frame(op::AUTH, Bytes::new()),
            false,
            "auth failed: missing token",
        ));
        t.push(frames(
            "Auth body garbage",
            via,
            false,
            frame(op::AUTH, "this is not a token"),
            false,
            "auth failed: malformed token",
        ));
        t.push(frames(
            "Auth body 1 MiB",
            via,
            false,
            frame(op::AUTH, vec![b'a'; 1 << 20]),
            false,
            &format!(
                "bad frame: body of {} bytes exceeds the limit of {max_body} bytes",
                1 << 20
            ),
        ));
        t.push(frames(
            "Auth body invalid UTF-8",
            via,
            false,
            frame(op::AUTH, vec![0xff, 0xfe, 0xfd]),
            false,
            "auth failed: malformed token: token is not UTF-8",
        ));
        t.push(frames(
            "JWT alg none",
            via,
            false,
            frame(op::AUTH, alg_none),
            false,
            "auth failed: malformed token",
        ));
        t.push(frames(
            "JWT signed with a wrong key",
            via,
            false,
            frame(op::AUTH, wrong_key_token.clone()),
            false,
            "auth failed: bad token signature",
        ));
        t.push(frames(
            "JWT expired",
            via,
            false,
            frame(op::AUTH, expired_token.clone()),
            false,
            "auth failed: token expired",
        ));
        t.push(frames(
            "second Auth",
            via,
            true,
            frame(op::AUTH, c.token("again", None)),
            false,
            "invalid body for op 7: already authenticated",
        ));
        t.push(frames(
            "Raw frame with a cut inner frame",
            via,
            true,
            frame(op::RAW, raw_cut.clone()),
            false,
            "bad frame: raw frame body holds a truncated frame",
        ));
        t.push(frames(
            "10,000 Heartbeats at once",
            via,
            true,
            flood.clone(),
            false,
            &format!(
                "more than {} frames per second (inbound rate limit)",
                c.config.client.max_frames_per_sec
            ),
        ));
        t.push(Case {
            name: format!("unknown op after Auth ({via:?})"),
            action: act(move |c| Box::pin(unknown_op(c, via))),
            expect: reply(
                "op=3 seq_echoed=true room_online=3",
                &["ignoring a frame with an op the server does not handle op=55"],
            ),
        });
    }
    t.push(Case {
        name: "TLS ClientHello to the TCP client port".into(),
        action: act(|c| Box::pin(client_hello_to_tcp(c))),
        expect: closed(&["bad frame: header length"]),
    });

    // Backend RPC, raw bytes with the right certificate.
    let max_req = c.config.rpc.max_request_bytes;
    t.push(Case {
        name: "RPC truncated bincode".into(),
        action: act(|c| Box::pin(rpc_bytes(c, truncated_bincode(), true, 2))),
        expect: reply(
            "[(1, Err(Malformed(\"malformed payload: ",
            &["malformed request call=1", "malformed payload"],
        ),
    });
    t.push(Case {
        name: "RPC unknown variant tag".into(),
        action: act(|c| Box::pin(rpc_bytes(c, message(1, &[200]), true, 2))),
        expect: reply(
            "[(1, Err(Malformed(\"malformed payload: ",
            &["malformed request call=1", "malformed payload"],
        ),
    });
    t.push(Case {
        name: "RPC length prefix of 4 GiB".into(),
        action: act(|c| {
            let mut b = BytesMut::new();
            b.put_u32(u32::MAX);
            b.put_u64(1);
            Box::pin(rpc_bytes(c, b.to_vec(), true, 1))
        }),
        expect: reply(
            format!(
                "[(1, Err(RequestTooLarge {{ len: {}, max: {max_req} }}))]",
                u32::MAX - 8
            ),
            &["request too large; refused call=1"],
        ),
    });
    t.push(Case {
        name: "RPC body over rpc.max_request_bytes".into(),
        action: act(|c| Box::pin(over_request_limit(c))),
        expect: reply(
            format!(
                "[(1, Err(RequestTooLarge {{ len: {}, max: {max_req} }})), (9, Ok(Pong))]",
                max_req + 1
            ),
            &["request too large; refused call=1"],
        ),
    });
    t.push(Case {
        name: "RPC 1,000,000 keys in one call".into(),
        action: act(|c| Box::pin(million_keys(c))),
        expect: reply(
            format!(
                "Err(Rpc(TooManyKeys {{ len: 1000000, max: {} }})); then ping: Ok(())",
                c.config.rpc.max_keys
            ),
            &[],
        ),
    });
    t.push(Case {
        name: "RPC length shorter than the call id".into(),
        action: act(|c| {
            let mut b = BytesMut::new();
            b.put_u32(7);
            b.put_u64(1);
            Box::pin(rpc_bytes(c, b.to_vec(), false, 1))
        }),
        expect: closed(&[
            "stream out of step; closing it",
            "message length 7 is shorter than the 8-byte call id",
        ]),
    });
    t.push(Case {
        name: "RPC stream reset in the middle of a request".into(),
        action: act(|c| Box::pin(reset_mid_request(c))),
        expect: closed(&["backend reset the stream", "stream reset by peer: error 7"]),
    });
    t.push(Case {
        name: "RPC connection closed with calls in flight".into(),
        action: act(|c| Box::pin(close_with_calls_in_flight(c))),
        expect: closed(&["backend disconnected"]),
    });

    // TLS and transport.
    t.push(Case {
        name: "backend without a client certificate".into(),
        action: act(|c| {
            let id = BackendIdentity {
                ca: c.ca(),
                cert: None,
            };
            Box::pin(quic_attempt(c.rpc, backend_config(&id)))
        }),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 116",
            &["backend handshake failed", "peer sent no certificates"],
        ),
    });
    t.push(Case {
        name: "backend with an expired client certificate".into(),
        action: act(|c| Box::pin(quic_attempt(c.rpc, backend_config(&c.expired)))),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 45",
            &["backend handshake failed", "certificate expired"],
        ),
    });
    t.push(Case {
        name: "backend with a certificate from another CA".into(),
        action: act(|c| Box::pin(quic_attempt(c.rpc, backend_config(&c.other_ca)))),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 48",
            &[
                "backend handshake failed",
                "invalid peer certificate: UnknownIssuer",
            ],
        ),
    });
    t.push(Case {
        name: "wrong ALPN on the RPC port".into(),
        action: act(|c| {
            let dir = &c.dir;
            let cfg = rustls_client(
                &c.ca(),
                Some((&dir.join("backend.pem"), &dir.join("backend.key"))),
                b"h3",
            );
            Box::pin(quic_attempt(c.rpc, quic_client(cfg)))
        }),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 120",
            &[
                "backend handshake failed",
                "peer doesn't support any known protocol",
            ],
        ),
    });
    t.push(Case {
        name: "wrong ALPN on the client QUIC port".into(),
        action: act(|c| {
            let cfg = rustls_client(&c.ca(), None, b"h3");
            Box::pin(quic_attempt(c.quic, quic_client(cfg)))
        }),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 120",
            &[
                "QUIC handshake failed",
                "peer doesn't support any known protocol",
            ],
        ),
    });
    for (what, port) in [("client QUIC", c.quic), ("RPC", c.rpc)] {
        if port.port() == c.tcp.port() {
            // The kernel gave the TCP listener the same number: nothing to refuse.
            eprintln!("skipping TCP to the {what} port: the TCP client port has its number");
        } else {
            t.push(Case {
                name: format!("TCP connection to the {what} port"),
                action: act(move |_| Box::pin(tcp_to(port))),
                expect: Expect::NoConnection,
            });
        }
        t.push(Case {
            name: format!("plain bytes as UDP datagrams to the {what} port"),
            action: act(move |_| Box::pin(datagrams(port, plain_datagrams()))),
            expect: Expect::NoConnection,
        });
        t.push(Case {
            name: format!("random UDP datagrams to the {what} port"),
            action: act(move |_| Box::pin(datagrams(port, random_datagrams()))),
            expect: Expect::NoConnection,
        });
    }
    t
}

// ---------------------------------------------------------------------------
// The checks around every case

/// Whether `line` names the connection from local port `port`.
fn names_peer(line: &str, port: u16) -> bool {
    let tag = format!("remote=127.0.0.1:{port}");
    line.match_indices(&tag).any(|(i, _)| {
        !line[i + tag.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

/// Waits for a log line, written since line `start`, that contains every string in
/// `needles` (and names `peer`, if given).
async fn wait_log(
    p: &ServerProcess,
    start: usize,
    needles: &[String],
    peer: Option<u16>,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = p.log_lines();
        let found = lines[start..].iter().find(|l| {
            needles.iter().all(|n| l.contains(n.as_str()))
                && peer.is_none_or(|port| names_peer(l, port))
        });
        if let Some(l) = found {
            return l.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?} (peer {peer:?}) within {WAIT:?}; lines since the case began:\n{}",
            lines[start..].join("\n")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The bystanders: one TCP and one QUIC client, connected before the first case.
struct Bystanders {
    clients: Vec<(String, PushClient)>,
}

impl Bystanders {
    async fn connect(c: &Ctx) -> Bystanders {
        let mut clients = Vec::new();
        for via in BOTH {
            let key = format!("bystander-{via:?}");
            let (client, _) = connect_authed(c, via, &key, Some(ROOM)).await;
            clients.push((key, client));
        }
        Bystanders { clients }
    }

    /// Pushes `tag` to each bystander by key and checks that it arrives.
    async fn check(&mut self, backend: &Client, tag: &str) {
        for (key, client) in &mut self.clients {
            let outcome = backend.push_msg(key.as_str(), 1000, tag.to_owned()).await;
            assert_eq!(
                outcome.unwrap(),
                PushOutcome::Delivered,
                "{tag}: push to {key}"
            );
            let f = next_push(client).await;
            assert_eq!(
                &f.body[..],
                tag.as_bytes(),
                "{tag}: {key} got another message"
            );
        }
    }

    async fn leave(self) {
        for (_, client) in self.clients {
            let mut client = half_close(client).await;
            until_closed(&mut client).await;
        }
    }
}

/// Waits until the server counts `n` client connections.
async fn wait_online(backend: &Client, n: u64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let online = backend.online().await.unwrap();
        if online.total == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {online:?} online, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs one case and every check around it; returns the observed outcome as text.
async fn run_case(
    p: &mut ServerProcess,
    c: &Ctx,
    backend: &Client,
    bystanders: &mut Bystanders,
    case: &Case,
    round: usize,
) -> String {
    let start = p.log_lines().len();
    let began = Instant::now();
    let observed = (case.action)(c).await;
    let name = &case.name;
    let outcome = match (&case.expect, &observed.seen) {
        (Expect::Reply { reply, log }, Seen::Reply(got)) => {
            assert!(
                got.contains(reply.as_str()),
                "{name}: expected a reply containing {reply:?}, got {got:?}"
            );
            if log.is_empty() {
                format!("reply {got}")
            } else {
                let line = wait_log(p, start, log, observed.peer).await;
                format!("reply {got}; log: {}", after_level(&line))
            }
        }
        (Expect::Closed { log }, Seen::Closed(detail)) => {
            let line = wait_log(p, start, log, observed.peer).await;
            format!("closed ({detail}); log: {}", after_level(&line))
        }
        (Expect::NoConnection, Seen::NoConnection(detail)) => format!("no connection: {detail}"),
        (expect, seen) => panic!("{name}: expected {expect:?}, saw {seen:?}"),
    };
    let lines = p.log_lines();
    if let Some(l) = lines[start..].iter().find(|l| l.contains("panicked")) {
        panic!("{name}: the server panicked: {l}");
    }
    assert!(
        p.wait_exit(Duration::ZERO).is_none(),
        "{name}: the server exited"
    );
    wait_online(backend, 2, name).await;
    bystanders
        .check(backend, &format!("round {round}: after {name}"))
        .await;
    format!("{outcome} [{} ms]", began.elapsed().as_millis())
}

/// The part of a log line after its timestamp and level.
fn after_level(line: &str) -> &str {
    ["ERROR ", " WARN ", " INFO ", "DEBUG "]
        .iter()
        .find_map(|lvl| line.find(lvl).map(|i| line[i..].trim_start()))
        .unwrap_or(line)
}

/// Checks that the server's memory level in the last round is within
/// [`RSS_TOLERANCE`] of its level in the first round after the warm-up.
///
/// A round's level is the lowest of the RSS samples taken after each of its cases:
/// the memory the server holds between cases. Single samples say little: the server
/// decodes the 1,000,000-key call (about 30 MB of strings) before refusing it, and
/// the allocator keeps a varying part of that for a while (once 54 MiB right after
/// that case, back to 23 MiB a few cases later).
///
/// Measured on the debug build, three runs of 8 rounds: the first two rounds are a
/// warm-up (RSS climbs from 19 to 23 MiB while the allocator's arenas and the
/// server's tables reach their working size); after it, round levels stayed within
/// 22.7..25.4 MiB with no trend, and moved by up to +10.6% between two rounds of one
/// run: whether the allocator still holds ~2 MiB from the large decode when a round
/// begins. So the tolerance is 15%: ~3.5 MiB over the three rounds after the first
/// measured one. A leak of ~20 KB per case (58 cases a round; a leaked QUIC
/// connection is more) fails it; smaller leaks of connection state show in the
/// online counts checked after every case instead. Slower growth is not a leak:
/// over 40 rounds the level crept ~30 KB a round for ~20 rounds, then levelled off
/// (the long-lived backend connection alone grows ~250 KB over its first ~20,000
/// calls, then stays flat).
fn check_memory(levels: &[(u64, u64)]) {
    let kib = |b: u64| b / 1024;
    let base = levels[WARMUP_ROUNDS].0;
    let last = levels[levels.len() - 1].0;
    let grew = (last as f64 - base as f64) / base as f64;
    eprintln!(
        "server RSS per round, lowest / at the end (KiB): {:?}; last vs first after warm-up: {:+.1}%",
        levels.iter().map(|&(l, e)| (kib(l), kib(e))).collect::<Vec<_>>(),
        grew * 100.0
    );
    assert!(
        grew <= RSS_TOLERANCE,
        "server memory grew {:.1}% from round {} to the last ({} -> {} KiB); tolerance {:.0}%",
        grew * 100.0,
        WARMUP_ROUNDS + 1,
        kib(base),
        kib(last),
        RSS_TOLERANCE * 100.0
    );
}

async fn run_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::loopback(dir.path());
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_quicpush"));
    let mut p = ServerProcess::quicpush_with(&exe, dir.path(), &config).unwrap();
    let certs = tempfile::tempdir().unwrap();
    let (expired, other_ca) = bad_backend_certs(dir.path(), certs.path());
    let c = Ctx {
        dir: dir.path().to_owned(),
        secret: auth::load_secret(&dir.path().join("token.secret")).unwrap(),
        config,
        tcp: p.client_tcp,
        quic: p.client_quic,
        rpc: p.control,
        expired,
        other_ca,
        _certs: certs,
    };
    let backend = Client::connect(c.rpc, "localhost", &BackendIdentity::from_dir(&c.dir))
        .await
        .unwrap();
    let mut bystanders = Bystanders::connect(&c).await;
    wait_online(&backend, 2, "bystanders").await;
    bystanders.check(&backend, "before the first case").await;

    let cases = table(&c);
    let stat = ProcStat::new(p.pid);
    let mut levels = Vec::new();
    for round in 1..=ROUNDS {
        let t0 = Instant::now();
        let mut level = u64::MAX;
        for case in &cases {
            let outcome = run_case(&mut p, &c, &backend, &mut bystanders, case, round).await;
            level = level.min(stat.rss_bytes().unwrap());
            if round == 1 {
                eprintln!("{} → {outcome}", case.name);
            }
        }
        let end = stat.rss_bytes().unwrap();
        eprintln!(
            "round {round}: {} cases in {:.1} s; server RSS lowest {} KiB, at the end {} KiB",
            cases.len(),
            t0.elapsed().as_secs_f64(),
            level / 1024,
            end / 1024
        );
        levels.push((level, end));
    }

    bystanders.leave().await;
    wait_online(&backend, 0, "after every client left").await;
    let rooms = backend.rooms().await.unwrap();
    assert!(rooms.is_empty(), "rooms left over: {rooms:?}");
    assert_eq!(backend.online().await.unwrap().total, 0);
    backend.close().await;

    check_memory(&levels);

    let lines = p.log_lines();
    assert!(!lines.iter().any(|l| l.contains("panicked")));
    // Tokens and keys never reach the log, even at debug: every JWT starts with
    // `eyJ` (base64 of `{"`), and the secret and private keys are files here.
    let secret_text = std::fs::read_to_string(c.dir.join("token.secret")).unwrap();
    for l in &lines {
        assert!(!l.contains("eyJ"), "a token in the log: {l}");
        assert!(!l.contains("PRIVATE KEY"), "a private key in the log: {l}");
        assert!(
            !l.contains(secret_text.trim()),
            "the token secret in the log: {l}"
        );
    }
    p.sigterm().unwrap();
    let status = p
        .wait_exit(Duration::from_secs(30))
        .expect("no exit after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn bad_input_table() {
    // The reasons are logged at info and debug; set before any thread starts.
    std::env::set_var("QUICPUSH_CHILD_LOG", "info,quicpush=debug");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run_table());
}

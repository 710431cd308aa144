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

#[path = "../common/mod.rs"]
mod common;

mod checks;
mod client;
mod rpc;
mod transport;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use quicpush::bench::process::{ProcStat, ServerProcess};
use quicpush::tls::BackendIdentity;
use quicpush::{auth, Config};

use crate::checks::{check_memory, run_case, Bystanders};
use crate::client::client_cases;
use crate::common::process::{connect_backend, wait_online};
use crate::rpc::rpc_cases;
use crate::transport::{bad_backend_certs, transport_cases};

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

/// Every case, in order: client connections, backend RPC, TLS and transport.
fn table(c: &Ctx) -> Vec<Case> {
    let mut t = client_cases(c);
    t.extend(rpc_cases(c));
    t.extend(transport_cases(c));
    t
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
    let backend = connect_backend(c.rpc, &c.dir).await;
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

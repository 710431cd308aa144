//! The `quicpush` command: serve, generate certificates, issue tokens, and call the
//! backend API from the shell.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use quicpush::rpc::proto::{MultiOutcome, Reply};
use quicpush::rpc::{Client, Request};
use quicpush::tls::BackendIdentity;
use quicpush::{auth, bench, certs, Config, Server};

#[derive(Parser)]
#[command(
    name = "quicpush",
    version,
    about = "A goim-compatible push server over QUIC and TCP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (built-in defaults without --config).
    Serve {
        /// TOML configuration file; see config/quicpush.toml.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Generate a CA, server and backend certificates, a token secret and the HTTP
    /// API's bearer token.
    Certs {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Extra subject alternative name for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Print a client token signed with the token secret.
    Token {
        #[arg(long)]
        key: String,
        #[arg(long)]
        mid: Option<i64>,
        #[arg(long)]
        room: Option<String>,
        /// Ops the client accepts, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        accepts: Vec<u32>,
        /// Validity, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The HS256 secret file.
        #[arg(long, default_value = "certs/token.secret")]
        secret: PathBuf,
    },
    /// Push a message and print the outcome.
    Push(PushArgs),
    /// List the live nodes of a tier sharing one Redis.
    Nodes {
        /// The tier's Redis URL (a Redis Cluster: its nodes' URLs, comma-separated).
        #[arg(long, conflicts_with = "config")]
        redis: Option<String>,
        /// A node's configuration file, for its `cluster.redis`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List rooms with their online counts.
    Rooms(Remote),
    /// Show connections online, in total and per transport.
    Online(Remote),
    /// Check that the server answers.
    Ping(Remote),
    /// Fetch the server's /metrics and print its figures: connections, pushes,
    /// deliveries, drops, disconnects, resume, history and backend call latency.
    Stats {
        /// The server's HTTP listener (http.bind).
        #[arg(long, default_value = "http://127.0.0.1:3111")]
        server: String,
        /// The HTTP API's bearer token (http.api_token_file); not sent if the
        /// file does not exist (a loopback server with http.require_token = false).
        #[arg(long, default_value = "certs/api.token")]
        token_file: PathBuf,
    },
    /// Disconnect the client with a key.
    Kick {
        #[arg(long)]
        key: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Measure a node: fan-out rate, latency, CPU and memory, checked at the clients.
    Bench(BenchArgs),
    /// The raw floor server that `bench --raw` compares against (started by bench).
    #[command(hide = true)]
    BenchFloor {
        #[arg(long)]
        certs: PathBuf,
        /// Send buffer of accepted TCP sockets, as the bench's server has it.
        #[arg(long, default_value_t = 0)]
        tcp_send_buffer: u32,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, value_enum, default_value = "room")]
    scenario: bench::Scenario,
    #[arg(long, value_enum, default_value = "tcp")]
    transport: bench::BenchTransport,
    /// Clients to connect (above 25,000 they spread over 127.0.0.x source addresses).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Messages the backend sends (room, keys, broadcast).
    #[arg(long, default_value_t = 100)]
    messages: u64,
    /// Messages per MPushMsgs call in the keys scenario; 1 = single PushMsg calls.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Deliveries per second in the latency scenario (default 100000); backend
    /// pushes per second in the handover scenario (default 200); in the keys
    /// scenario, messages per second, paced (default: as fast as clients read);
    /// PushMsg calls per second in the node-loss scenario (default 10000).
    #[arg(long)]
    rate: Option<u64>,
    /// Nodes of a tier to start, sharing a redis-server the bench starts (room
    /// and keys scenarios); the report compares with one node and the same
    /// clients, started in the same run. The node-loss scenario needs 2 or more.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// With --nodes: the tier shares a three-master Redis Cluster the bench
    /// starts (sharded pub/sub) instead of one redis-server.
    #[arg(long, requires = "nodes")]
    redis_cluster: bool,
    /// `client.write_coalesce` of the servers the bench starts (e.g. 1ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    write_coalesce: Duration,
    /// With --nodes: the tier's `cluster.ttl` (default: the server's default,
    /// 10s, for room and keys; 3s for node-loss, so the dead node's record
    /// expires within the run).
    #[arg(long, requires = "nodes", value_parser = humantime::parse_duration)]
    cluster_ttl: Option<Duration>,
    /// How long the latency, handover and node-loss scenarios run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Handover: how a switch is carried out (default: migrate over QUIC,
    /// reconnect over TCP).
    #[arg(long, value_enum)]
    handover_mode: Option<bench::handover::HandoverMode>,
    /// Handover: each client switches networks this often (0: never).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    switch_every: Duration,
    /// Handover: datagram loss per direction, 0 to 1 (QUIC only).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Handover: datagram reordering per direction, 0 to 1 (QUIC only).
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Handover: added round-trip time, e.g. 100ms (QUIC only).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    rtt: Duration,
    /// Handover: seeds the switch schedule and each client's simulated network.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Message body size in bytes (at least 20).
    #[arg(long, default_value_t = 32)]
    body_size: usize,
    /// Also run the load against the raw floor server and report the ratio.
    #[arg(long)]
    raw: bool,
    /// Backend calls in flight at once.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// Clients connecting at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Extra clients in the room (room, broadcast) that never read.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// The history of the server the bench starts: the defaults (keys and user
    /// ids), off, or all sources (rooms and broadcasts too).
    #[arg(long, value_enum, default_value = "default")]
    history: bench::BenchHistory,
    /// `metrics.enabled` of the server the bench starts; `compare` runs the
    /// scenario four times (metrics off, on, on, off), and reports every rate and
    /// the ratio of the means.
    #[arg(long, value_enum, default_value = "on")]
    metrics: bench::BenchMetrics,
    /// `client.tcp_send_buffer` of the server the bench starts, bytes (0: kernel default).
    #[arg(long, default_value_t = 0)]
    tcp_send_buffer: u32,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure a running server with this pid instead of starting one.
    #[arg(long, requires_all = ["client_addr", "rpc_addr"])]
    server_pid: Option<u32>,
    /// The running server's client address (TCP and QUIC).
    #[arg(long)]
    client_addr: Option<SocketAddr>,
    /// The running server's backend RPC address.
    #[arg(long)]
    rpc_addr: Option<SocketAddr>,
    /// With --server-pid: directory with ca.pem, backend.pem/.key and token.secret.
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// The socket address of `http://host:port` (or `host:port`).
async fn http_addr(server: &str) -> Result<SocketAddr> {
    if server.starts_with("https://") {
        bail!("{server}: the HTTP listener speaks plain HTTP only");
    }
    let hostport = server.trim_start_matches("http://").trim_end_matches('/');
    tokio::net::lookup_host(hostport)
        .await
        .with_context(|| format!("cannot resolve {server} (want http://host:port)"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))
}

#[derive(Args)]
struct Remote {
    /// The server's backend RPC address.
    #[arg(long, default_value = "127.0.0.1:3109")]
    server: SocketAddr,
    /// Directory with ca.pem, backend.pem and backend.key.
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// Name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("target").required(true).multiple(false))]
struct PushArgs {
    /// One connection key.
    #[arg(long, group = "target")]
    key: Option<String>,
    /// Several keys, comma-separated.
    #[arg(long, group = "target", value_delimiter = ',')]
    keys: Option<Vec<String>>,
    /// Every connection of these user ids, comma-separated.
    #[arg(
        long,
        group = "target",
        value_delimiter = ',',
        allow_negative_numbers = true
    )]
    mid: Option<Vec<i64>>,
    /// Every member of a room.
    #[arg(long, group = "target")]
    room: Option<String>,
    /// Every connected client.
    #[arg(long, group = "target")]
    all: bool,
    /// The message's op (backends usually use 1000 and up).
    #[arg(long)]
    op: u32,
    /// The message's body, as text.
    #[arg(long)]
    body: String,
    /// With --all: node-wide limit in messages per second (0 = none).
    #[arg(long, default_value_t = 0)]
    speed: u32,
    #[command(flatten)]
    remote: Remote,
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = Cli::parse();
    // `serve` reads its configuration first: it sizes the runtime.
    let serve_config = match &cli.command {
        Command::Serve { config } => {
            let loaded = match config {
                Some(p) => Config::load(p),
                None => Ok(Config::default()),
            };
            match loaded {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("error: {}", one_line(&anyhow::Error::new(e)));
                    std::process::exit(1);
                }
            }
        }
        _ => None,
    };
    let workers = serve_config.as_ref().map(|c| c.runtime.workers());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli, serve_config)) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// The error and its causes on one line, leaving out causes that the message
/// before them already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

async fn run(cli: Cli, serve_config: Option<Config>) -> Result<()> {
    match cli.command {
        Command::Serve { .. } => {
            init_tracing("info");
            serve(serve_config.unwrap_or_default()).await
        }
        Command::Certs { dir, sans } => {
            certs::generate(&dir, &sans)?;
            println!(
                "wrote ca, server and backend certificates, token.secret and api.token to {}",
                dir.display()
            );
            Ok(())
        }
        Command::Token {
            key,
            mid,
            room,
            accepts,
            ttl,
            secret,
        } => {
            let secret = auth::load_secret(&secret)?;
            let mut claims = auth::claims_for(&key, ttl);
            claims.mid = mid;
            claims.room_id = room;
            claims.accepts = accepts;
            println!(
                "{}",
                auth::issue(&secret, &claims).context("cannot sign the token")?
            );
            Ok(())
        }
        Command::Push(args) => {
            init_tracing("warn");
            push(args).await
        }
        Command::Rooms(remote) => {
            init_tracing("warn");
            let client = connect(&remote).await?;
            let rooms = client.rooms().await?;
            if rooms.is_empty() {
                println!("no rooms");
            }
            for r in rooms {
                println!("{}\t{}", r.room, r.online);
            }
            client.close().await;
            Ok(())
        }
        Command::Online(remote) => {
            init_tracing("warn");
            let client = connect(&remote).await?;
            let o = client.online().await?;
            println!(
                "total={} tcp={} tls={} ws={} wss={} quic={}",
                o.total, o.tcp, o.tls, o.ws, o.wss, o.quic
            );
            for p in &o.paced {
                println!(
                    "paced broadcast op={} speed={}/s delivered={} remaining={} elapsed={}ms",
                    p.op, p.speed, p.delivered, p.remaining, p.elapsed_ms
                );
            }
            client.close().await;
            Ok(())
        }
        Command::Stats { server, token_file } => {
            init_tracing("warn");
            let addr = http_addr(&server).await?;
            let token = if token_file.exists() {
                Some(certs::load_api_token(&token_file)?)
            } else {
                None
            };
            let r = quicpush::http::client::request(addr, "GET", "/metrics", token.as_deref(), b"")
                .await?;
            match r.status {
                200 => print!("{}", quicpush::metrics::summary(&r.text())),
                401 if token.is_none() => bail!(
                    "{server} wants a bearer token and {} does not exist: pass --token-file",
                    token_file.display()
                ),
                status => bail!("{server}/metrics answered {status}: {}", r.text().trim()),
            }
            Ok(())
        }
        Command::Nodes { redis, config } => {
            init_tracing("warn");
            let url = match (redis, config) {
                // Several comma-separated URLs: a Redis Cluster's nodes.
                (Some(url), _) if url.contains(',') => quicpush::config::RedisTarget::Cluster(
                    url.split(',').map(str::to_owned).collect(),
                ),
                (Some(url), _) => quicpush::config::RedisTarget::One(url),
                (None, Some(path)) => Config::load(&path)?
                    .cluster
                    .redis
                    .ok_or_else(|| anyhow::anyhow!("{} sets no cluster.redis", path.display()))?,
                (None, None) => anyhow::bail!("give --redis URL or --config FILE"),
            };
            let nodes = quicpush::cluster::nodes::list(&url).await?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            println!(
                "{:<18} {:<22} {:<22} {:>8} {:>10}",
                "id", "client", "rpc", "online", "expires in"
            );
            for n in &nodes {
                let left = std::time::Duration::from_millis(n.expires_ms.saturating_sub(now));
                println!(
                    "{:<18} {:<22} {:<22} {:>8} {:>9.1}s",
                    n.id,
                    n.client,
                    n.rpc,
                    n.online,
                    left.as_secs_f64()
                );
            }
            println!("{} live node(s)", nodes.len());
            Ok(())
        }
        Command::Ping(remote) => {
            init_tracing("warn");
            let start = std::time::Instant::now();
            let client = connect(&remote).await?;
            client.ping().await?;
            println!("pong from {} in {:?}", remote.server, start.elapsed());
            client.close().await;
            Ok(())
        }
        Command::Bench(args) => {
            init_tracing("warn");
            run_bench(args).await
        }
        Command::BenchFloor {
            certs,
            tcp_send_buffer,
        } => {
            init_tracing("info");
            bench::floor::run(&certs, tcp_send_buffer).await?;
            Ok(())
        }
        Command::Kick { key, remote } => {
            init_tracing("warn");
            let client = connect(&remote).await?;
            let kicked = client.kick(key.clone()).await?;
            println!("{}", if kicked { "kicked" } else { "offline" });
            client.close().await;
            Ok(())
        }
    }
}

async fn serve(config: Config) -> Result<()> {
    tracing::info!(worker_threads = config.runtime.workers(), "runtime");
    raise_nofile_limit();
    let server = Server::bind(config).await?;
    server.run(quicpush::shutdown::signal()).await;
    Ok(())
}

/// Raises the open-file soft limit to the hard limit: each client costs a descriptor.
fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

async fn connect(remote: &Remote) -> Result<Client> {
    let id = BackendIdentity::from_dir(&remote.certs);
    Client::connect(remote.server, &remote.server_name, &id)
        .await
        .with_context(|| format!("cannot reach the quicpush RPC at {}", remote.server))
}

fn print_multi(keys: &[String], m: &MultiOutcome) {
    for (k, o) in keys.iter().zip(&m.outcomes) {
        println!("{k}\t{o:?}");
    }
    println!("index={}", m.index);
}

async fn push(a: PushArgs) -> Result<()> {
    let client = connect(&a.remote).await?;
    let body = bytes::Bytes::from(a.body.into_bytes());
    let req = if let Some(key) = a.key.clone() {
        Request::PushMsg {
            key,
            op: a.op,
            body,
        }
    } else if let Some(keys) = a.keys.clone() {
        Request::MPushMsg {
            keys,
            op: a.op,
            body,
        }
    } else if let Some(mids) = a.mid.clone() {
        Request::PushUser {
            mids,
            op: a.op,
            body,
        }
    } else if let Some(room) = a.room.clone() {
        Request::BroadcastRoom {
            room,
            op: a.op,
            body,
        }
    } else if a.all {
        Request::Broadcast {
            op: a.op,
            body,
            speed: a.speed,
        }
    } else {
        bail!("choose one of --key, --keys, --mid, --room, --all");
    };
    let reply = client.call(&req).await?;
    match reply {
        Reply::Pushed(o) => println!("{o:?}"),
        Reply::Multi(m) => print_multi(a.keys.as_deref().unwrap_or_default(), &m),
        Reply::Tally(t) => println!(
            "delivered={} queue_full={} filtered={}",
            t.delivered, t.queue_full, t.filtered
        ),
        Reply::BroadcastAccepted { online } => println!("accepted; {online} clients online"),
        other => println!("{other:?}"),
    }
    client.close().await;
    Ok(())
}

async fn run_bench(a: BenchArgs) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let target = match (a.server_pid, a.client_addr, a.rpc_addr) {
        (Some(pid), Some(client_addr), Some(rpc_addr)) => bench::Target::External {
            pid,
            client_addr,
            rpc_addr,
            certs: a.certs.clone(),
        },
        _ => bench::Target::Spawn { exe: exe.clone() },
    };
    let opts = bench::BenchOptions {
        scenario: a.scenario,
        transport: a.transport,
        clients: a.clients,
        messages: a.messages,
        batch: a.batch,
        rate: a.rate.unwrap_or(match a.scenario {
            bench::Scenario::Handover => 200,
            bench::Scenario::NodeLoss => 10_000,
            _ => 100_000,
        }),
        keys_rate: a.rate.filter(|_| a.scenario == bench::Scenario::Keys),
        nodes: a.nodes,
        redis_cluster: a.redis_cluster,
        write_coalesce: a.write_coalesce,
        cluster_ttl: a.cluster_ttl,
        duration: a.duration,
        body_size: a.body_size,
        raw: a.raw,
        in_flight: a.in_flight,
        connect_concurrency: a.connect_concurrency,
        stalled: a.stalled,
        tcp_send_buffer: a.tcp_send_buffer,
        history: a.history,
        metrics: a.metrics,
        handover: bench::handover::HandoverOptions {
            mode: a.handover_mode,
            loss: a.loss,
            reorder: a.reorder,
            rtt: a.rtt,
            switch_every: a.switch_every,
            seed: a.seed,
        },
        target,
        exe,
        progress: !a.quiet,
    };
    let report = bench::run(&opts).await?;
    print!("{}", report.table());
    if let Some(path) = &a.json {
        let json = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

//! Run with:
//!     cargo run --example tcp_client -- --token "$(cargo run -q -- token --key demo)"
//!
//! A goim v2 client over TCP: connects, authenticates with the token, sends a
//! Heartbeat every 30 s, and prints each pushed message as
//! `op=<op> seq=<seq> body=<body>`. With `--count N` it exits 0 after N messages.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use quicpush::client::PushClient;

#[derive(Parser)]
struct Args {
    /// The token for the Auth frame (`quicpush token --key KEY`).
    #[arg(long)]
    token: String,
    #[arg(long, default_value = "127.0.0.1:3101")]
    addr: SocketAddr,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Interval between Heartbeats.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = PushClient::connect_tcp(args.addr).await?;
    common::receive(client, &args.token, args.count, args.heartbeat).await
}

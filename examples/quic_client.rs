//! Run with:
//!     cargo run --example quic_client -- --token "$(cargo run -q -- token --key demo)"
//!
//! The same client as `tcp_client`, over QUIC (ALPN `quicpush/1`, one bidirectional
//! stream), trusting the CA in `certs/ca.pem`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// The CA that signed the server's certificate.
    #[arg(long, default_value = "certs/ca.pem")]
    ca: PathBuf,
    /// Name the server's certificate must carry.
    #[arg(long, default_value = "localhost")]
    server_name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = PushClient::connect_quic(args.addr, &args.server_name, &args.ca).await?;
    common::receive(client, &args.token, args.count, args.heartbeat).await
}

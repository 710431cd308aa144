//! Run with:
//!     cargo run --example quic_client -- --token "$(cargo run -q -- token --key demo)"
//!
//! The same client as `tcp_client`, over QUIC (ALPN `quicpush/1`, one bidirectional
//! stream), trusting the CA in `certs/ca.pem`.

mod common;

use std::path::PathBuf;

use clap::Parser;
use quicpush::client::PushClient;

/// A goim v2 client over QUIC that prints each pushed message.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    client: common::ClientArgs,
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
    let client = PushClient::connect_quic(args.client.addr, &args.server_name, &args.ca).await?;
    common::receive(client, &args.client).await
}

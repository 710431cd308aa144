//! Run with:
//!     cargo run --example quic_client -- --token "$(cargo run -q -- token --key demo)"
//!
//! The same client as `tcp_client`, over QUIC (ALPN `quicpush/1`, one bidirectional
//! stream), trusting the CA in `certs/ca.pem`. `--resume` as for `tcp_client`.

mod common;

use std::path::PathBuf;

use clap::Parser;
use quicpush::client::{Dial, PushClient};

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
    if args.client.resume {
        let config = quicpush::tls::quic_client_config(&args.ca)?;
        let dial = Dial::Quic {
            addr: args.client.addr,
            server_name: args.server_name.clone(),
            config,
        };
        return common::receive_resuming(dial, &args.client).await;
    }
    let client = PushClient::connect_quic(args.client.addr, &args.server_name, &args.ca).await?;
    common::receive(client, &args.client).await
}

//! Run with:
//!     cargo run --example tcp_client -- --token "$(cargo run -q -- token --key demo)"
//!
//! A goim v2 client over TCP: connects, authenticates with the token, sends a
//! Heartbeat every 30 s, and prints each pushed message as
//! `op=<op> seq=<seq> body=<body>`. With `--count N` it exits 0 after N messages.
//! With `--resume` it reconnects whenever the connection is lost and resumes, so
//! no push is missed (each line then also names the push's source and offset).

mod common;

use clap::Parser;
use quicpush::client::{Dial, PushClient};

/// A goim v2 client over TCP that prints each pushed message.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    client: common::ClientArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.client.resume {
        return common::receive_resuming(Dial::Tcp(args.client.addr), &args.client).await;
    }
    let client = PushClient::connect_tcp(args.client.addr).await?;
    common::receive(client, &args.client).await
}

//! Run with:
//!     cargo run --example backend -- --key demo
//!
//! A backend in a few lines: connect to the RPC endpoint with the backend's client
//! certificate (`certs/backend.pem`), push to one key, then to its room, and print
//! what happened.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use quicpush::rpc::Client;
use quicpush::tls::BackendIdentity;

#[derive(Parser)]
struct Args {
    /// The key to push to.
    #[arg(long)]
    key: String,
    /// A room to broadcast to as well.
    #[arg(long)]
    room: Option<String>,
    #[arg(long, default_value = "127.0.0.1:3109")]
    server: SocketAddr,
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::connect(
        args.server,
        "localhost",
        &BackendIdentity::from_dir(&args.certs),
    )
    .await?;

    let online = client.online().await?;
    println!(
        "online: {} ({} tcp, {} quic)",
        online.total, online.tcp, online.quic
    );

    let outcome = client
        .push_msg(args.key.as_str(), 1000, "hello from the backend")
        .await?;
    println!("PushMsg to {}: {outcome:?}", args.key);

    // Many calls in flight on one connection.
    let calls = (0..10).map(|i| client.push_msg(args.key.as_str(), 1001, format!("message {i}")));
    let outcomes = futures_util::future::join_all(calls).await;
    println!(
        "10 concurrent PushMsg: {:?}",
        outcomes.into_iter().collect::<Result<Vec<_>, _>>()?
    );

    if let Some(room) = args.room {
        let tally = client
            .broadcast_room(room.as_str(), 1002, "hello, room")
            .await?;
        println!("BroadcastRoom {room}: {tally:?}");
    }
    client.close().await;
    Ok(())
}

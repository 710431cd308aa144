//! What the example clients share: the receive loop.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use quicpush::client::{Backoff, Dial, Event, PushClient, ResumingClient};
use quicpush::protocol::{self, op, Frame};

/// The options both example clients take.
#[derive(clap::Args)]
pub struct ClientArgs {
    /// The token for the Auth frame (`quicpush token --key KEY`).
    #[arg(long)]
    pub token: String,
    #[arg(long, default_value = "127.0.0.1:3101")]
    pub addr: SocketAddr,
    /// Exit after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Interval between Heartbeats.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Negotiate resume: keep the last offsets, reconnect with backoff and jitter
    /// when the connection is lost, and get every missed push.
    #[arg(long)]
    pub resume: bool,
}

fn print(f: &Frame) {
    println!(
        "op={} seq={} body={}",
        f.op,
        f.seq,
        String::from_utf8_lossy(&f.body)
    );
}

/// Authenticates, then prints every pushed message as one line, sending a
/// Heartbeat every `heartbeat`. Returns after `count` messages, or when the server
/// closes the connection if no count was given.
pub async fn receive(mut client: PushClient, args: &ClientArgs) -> Result<()> {
    let (token, count, heartbeat) = (&args.token, args.count, args.heartbeat);
    client.auth(token.as_bytes().to_vec()).await?;
    eprintln!("authenticated; waiting for messages");
    let mut seen = 0u64;
    let mut tick = tokio::time::interval(heartbeat);
    tick.tick().await;
    loop {
        if count.is_some_and(|n| seen >= n) {
            client.close().await;
            return Ok(());
        }
        let frame = tokio::select! {
            f = client.next_frame() => f?,
            _ = tick.tick() => {
                client.heartbeat().await?;
                continue;
            }
        };
        let Some(frame) = frame else {
            if count.is_some() {
                bail!("server closed the connection after {seen} messages");
            }
            return Ok(());
        };
        match frame.op {
            op::HEARTBEAT_REPLY => {}
            op::DISCONNECT_REPLY => {
                eprintln!("server sent DisconnectReply");
                if count.is_some() {
                    bail!("disconnected by the server after {seen} messages");
                }
                return Ok(());
            }
            op::RAW => {
                for f in protocol::split_raw(&frame.body, protocol::MAX_BODY_LIMIT)? {
                    print(&f);
                    seen += 1;
                }
            }
            _ => {
                print(&frame);
                seen += 1;
            }
        }
    }
}

/// With `--resume`: prints every push (with its source and offset) across
/// reconnects, each once, and each resume's answer on stderr.
pub async fn receive_resuming(dial: Dial, args: &ClientArgs) -> Result<()> {
    let (mut client, reply) =
        ResumingClient::connect(dial, args.token.as_bytes().to_vec(), Backoff::default()).await;
    eprintln!("authenticated as {}; waiting for messages", reply.key);
    let mut seen = 0u64;
    let mut tick = tokio::time::interval(args.heartbeat);
    tick.tick().await;
    loop {
        if args.count.is_some_and(|n| seen >= n) {
            client.close().await;
            return Ok(());
        }
        let event = tokio::select! {
            e = client.next() => e,
            _ = tick.tick() => {
                if let Some(c) = client.connection() {
                    if c.heartbeat().await.is_err() {
                        client.drop_connection();
                    }
                }
                continue;
            }
        };
        match event {
            Event::Push(f, meta) => {
                println!(
                    "op={} seq={} source={} offset={} body={}",
                    f.op,
                    f.seq,
                    meta.source.name(),
                    meta.offset,
                    String::from_utf8_lossy(&f.body)
                );
                seen += 1;
            }
            Event::Reply(_) => {}
            Event::Resumed(reply) => {
                let states: Vec<String> = reply
                    .sources
                    .iter()
                    .map(|(name, s)| match s.recovered {
                        Some(true) => format!("{name}: recovered"),
                        Some(false) => format!("{name}: NOT recovered (resync)"),
                        None => format!("{name}: from {}", s.offset),
                    })
                    .collect();
                eprintln!("reconnected and resumed: {}", states.join(", "));
            }
        }
    }
}

//! The bus between nodes: each node subscribes to `quicpush:node:<id>` and
//! `quicpush:all` on a pub/sub connection of its own, re-subscribing in a loop
//! with backoff whenever it is lost. On a Redis Cluster the node's channel is a
//! sharded one (`SSUBSCRIBE` / `SPUBLISH`: a message goes to the one shard
//! owning the channel, not to every cluster node, and its receiver count is
//! exact), and the node also subscribes to the sharded channels of what it
//! holds ([`super::subs`]), which is where pushes for them arrive.
//!
//! Plain pub/sub rather than streams: a push is live traffic, and PUBLISH
//! answers how many subscribers got the message, so the sender can say honestly
//! that it was handed to the owning node ([`PushOutcome::Forwarded`]) or that
//! nobody listened; a node that was away has nothing to catch up on (its
//! clients reconnect and resume from history on whichever node they reach).
//!
//! [`PushOutcome::Forwarded`]: crate::rpc::proto::PushOutcome::Forwarded

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tracing::{debug, info, warn};

use super::envelope::{self, Envelope, KickReason};
use super::{names, shared, Backend, Cluster, ClusterBackend, ClusterError};
use crate::channel::CloseReason;
use crate::protocol::{PushMeta, Source};
use crate::registry::Registry;
use crate::rpc::dispatch::Dispatcher;
use crate::rpc::proto::Request;

/// The publish command for a channel only its subscriber's shard needs:
/// `SPUBLISH` on a Redis Cluster (sharded pub/sub), `PUBLISH` on one server.
pub(crate) fn publish_cmd(c: &Cluster) -> &'static str {
    if c.backend.is_cluster() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

/// Publishes each envelope to its node's channel; how many subscribers each
/// reached (on a Redis Cluster the channel is sharded, so the count is exact).
pub async fn publish(
    c: &Cluster,
    batch: Vec<(String, Envelope)>,
) -> Result<Vec<u64>, ClusterError> {
    let batch = batch
        .into_iter()
        .map(|(node, e)| Ok((names::node_channel(&node), envelope::encode(&c.id, e)?)))
        .collect::<Result<Vec<_>, ClusterError>>()?;
    publish_to(c, batch).await
}

/// Publishes each message to its channel (sharded on a Redis Cluster); how many
/// subscribers each reached.
pub async fn publish_to(
    c: &Cluster,
    batch: Vec<(String, Vec<u8>)>,
) -> Result<Vec<u64>, ClusterError> {
    let cmds = batch
        .into_iter()
        .map(|(channel, m)| {
            let mut cmd = redis::cmd(publish_cmd(c));
            cmd.arg(channel).arg(m);
            cmd
        })
        .collect();
    counts(c.backend.each(cmds).await?)
}

fn counts(v: Vec<redis::Value>) -> Result<Vec<u64>, ClusterError> {
    v.into_iter()
        .map(|v| match v {
            redis::Value::Int(n) => Ok(u64::try_from(n).unwrap_or(0)),
            other => Err(ClusterError::BadReply(format!(
                "a publish answered {other:?}, not a count"
            ))),
        })
        .collect()
}

/// Publishes to every node (`quicpush:all`); receivers skip their own messages.
pub async fn publish_all(c: &Cluster, e: Envelope) -> Result<u64, ClusterError> {
    let n: u64 = redis::cmd("PUBLISH")
        .arg(names::ALL)
        .arg(envelope::encode(&c.id, e)?)
        .query_async(&mut c.backend.con())
        .await?;
    Ok(n)
}

/// Receives what other nodes ask of this one and carries it out through
/// `local` (a dispatcher without the cluster), until the cluster halts.
pub async fn subscriber(c: Arc<Cluster>, local: Dispatcher) {
    if let Backend::Cluster(b) = &c.backend {
        let b = b.clone();
        return cluster_subscriber(c, b, local).await;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let run = async {
            let mut ps = c.client.get_async_pubsub().await?;
            ps.subscribe(names::node_channel(&c.id)).await?;
            ps.subscribe(names::ALL).await?;
            info!(node = %c.id, "bus subscribed");
            let mut stream = ps.on_message();
            while let Some(msg) = stream.next().await {
                handle(&c, &local, msg.get_payload_bytes()).await;
            }
            Ok::<(), ClusterError>(())
        };
        tokio::select! {
            r = run => match r {
                Ok(()) => {
                    warn!(node = %c.id, "bus connection lost; re-subscribing");
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    debug!(node = %c.id, error = %e, ?backoff, "bus cannot subscribe; retrying");
                }
            },
            _ = c.halted().cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = c.halted().cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The bus on a Redis Cluster: the cluster client's pub/sub messages, from
/// this node's sharded channel, the sharded channels of the keys, users and
/// rooms it holds ([`super::subs`]) and the plain `quicpush:all`. The client
/// subscribes again by itself after a reconnection or a slot move; this only
/// retries the first subscription while the cluster is unreachable.
async fn cluster_subscriber(c: Arc<Cluster>, b: Arc<ClusterBackend>, local: Dispatcher) {
    let Some(mut rx) = b.take_pushes() else {
        return;
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let r = async {
            b.subscribe(&[names::node_channel(&c.id)], true).await?;
            b.subscribe(&[names::ALL.to_owned()], false).await
        };
        match r.await {
            Ok(()) => break,
            Err(e) => debug!(node = %c.id, error = %e, ?backoff, "bus cannot subscribe; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = c.halted().cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    info!(node = %c.id, "bus subscribed (Redis Cluster, sharded)");
    let mut reported = 0;
    loop {
        let info = tokio::select! {
            i = rx.recv() => match i { Some(i) => i, None => return },
            _ = c.halted().cancelled() => return,
        };
        let dropped = b.dropped.load(std::sync::atomic::Ordering::Relaxed);
        if dropped > reported {
            warn!(node = %c.id, dropped, "the bus fell behind: pub/sub messages were dropped");
            reported = dropped;
        }
        if !matches!(
            info.kind,
            redis::PushKind::Message | redis::PushKind::SMessage
        ) {
            continue;
        }
        if let Some(redis::Value::BulkString(payload)) = info.data.get(1) {
            handle(&c, &local, payload).await;
        }
    }
}

/// Carries out another node's Kick of `key`'s connection `conn`: closes the
/// connection registered here under `key` only if it is `conn` or older, so a
/// client that came straight back here keeps its new connection. What it closed
/// it with, if it closed one.
fn kick(registry: &Registry, key: &str, reason: KickReason, conn: u64) -> Option<CloseReason> {
    let ch = registry.get(key)?;
    if ch.id > conn {
        return None;
    }
    let why = match reason {
        KickReason::Replaced => CloseReason::Replaced,
        KickReason::Kicked => CloseReason::Kicked,
    };
    ch.close(why);
    Some(why)
}

async fn handle(c: &Cluster, local: &Dispatcher, bytes: &[u8]) {
    // A key, user, room or broadcast push the shared history appended (from
    // any node, this one included): queued with its position, nothing
    // appended here.
    let meta = |source, p: crate::history::Position| PushMeta {
        source,
        epoch: p.epoch,
        offset: p.offset,
    };
    match bytes.first() {
        Some(&marker @ (shared::MARKER | shared::ROOM_MARKER)) => {
            // A named stream's push: a key's, or a room's.
            match shared::KeyPush::parse_named(bytes, marker) {
                Some(p) if marker == shared::MARKER => {
                    c.registry
                        .push_key_at(&p.key, &p.frame, meta(Source::Key, p.position));
                }
                Some(p) => {
                    c.registry
                        .push_room_at(&p.key, &p.frame, meta(Source::Room, p.position));
                }
                None => {
                    warn!(node = %c.id, len = bytes.len(), marker, "ignoring a bad key or room push on the bus")
                }
            }
            return;
        }
        Some(&shared::ALL_MARKER) => {
            // A broadcast the shared history appended: fanned out by this
            // node's broadcast workers, in the order the bus brings them.
            match shared::parse_all(bytes) {
                Some(p) => {
                    let m = meta(Source::All, p.position);
                    if let Err(e) = local.broadcaster.submit_at(p.frame, m).await {
                        debug!(node = %c.id, error = %e, "a shared broadcast was not fanned out");
                    }
                }
                None => {
                    warn!(node = %c.id, len = bytes.len(), "ignoring a bad broadcast on the bus")
                }
            }
            return;
        }
        Some(&shared::USER_MARKER) => {
            match shared::UserPush::parse(bytes) {
                Some(p) => {
                    c.registry
                        .push_user_at(p.mid, &p.frame, meta(Source::User, p.position));
                }
                None => {
                    warn!(node = %c.id, len = bytes.len(), "ignoring a bad user push on the bus")
                }
            }
            return;
        }
        _ => {}
    }
    let w = match envelope::decode(bytes) {
        Ok(w) => w,
        Err(e) => {
            warn!(node = %c.id, error = %e, "ignoring a bad bus message");
            return;
        }
    };
    if w.from == c.id {
        return;
    }
    let req = match w.body {
        Envelope::PushKeys { keys, op, body } => Request::MPushMsg { keys, op, body },
        Envelope::PushItems { msgs } => Request::MPushMsgs { msgs },
        Envelope::PushUsers { mids, op, body } => Request::PushUser { mids, op, body },
        Envelope::Room { room, op, body } => Request::BroadcastRoom { room, op, body },
        Envelope::Broadcast { op, body, speed } => Request::Broadcast { op, body, speed },
        Envelope::Kick {
            key,
            reason,
            conn,
            new_node,
        } => {
            if let Some(why) = kick(&c.registry, &key, reason, conn) {
                debug!(key = %key, from = %w.from, new_node = %new_node, ?why, "closed a connection on another node's request");
            }
            return;
        }
    };
    let method = req.method();
    if let Err(e) = local.dispatch_local(req).await {
        debug!(node = %c.id, from = %w.from, method, error = %e, "a forwarded call was refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{Channel, QueueLimits, Transport};

    fn connect(r: &Registry, key: &str) -> Arc<Channel> {
        let (ch, _rx) = Channel::open(
            r.next_id(),
            key.into(),
            None,
            Transport::Tcp,
            QueueLimits {
                frames: 8,
                bytes: 64 * 1024,
                slow_after: Duration::from_secs(5),
            },
            false,
        );
        r.register(ch.clone(), None, Default::default()).unwrap();
        ch
    }

    #[test]
    fn a_kick_about_an_older_connection_leaves_the_new_one_open() {
        let r = Registry::new(4);
        let old = connect(&r, "k");
        // The client moved to another node, then came straight back here: the
        // other node's kick names the old connection, which this one replaced.
        let new = connect(&r, "k");
        assert!(new.id > old.id);
        assert_eq!(kick(&r, "k", KickReason::Replaced, old.id), None);
        assert!(!new.is_closed());
        // A kick about this connection (or a backend's, u64::MAX) closes it.
        assert_eq!(
            kick(&r, "k", KickReason::Kicked, new.id),
            Some(CloseReason::Kicked)
        );
        assert!(new.is_closed());
        assert_eq!(kick(&r, "nobody", KickReason::Kicked, u64::MAX), None);
    }
}

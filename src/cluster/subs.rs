//! On a Redis Cluster, the sharded channels a node holds: one per key it
//! holds (`quicpush:{k:<key>}:to`), per user with a connection here
//! (`quicpush:{u:<mid>}:to`) and per room with members here
//! (`quicpush:{r:<room>}:to`).
//!
//! A push for a key, user or room is `SPUBLISH`ed to its channel, in the slot
//! of its directory entries and history stream, so the append script can
//! publish from inside Redis, every push for one key keeps the script's order,
//! and the publish's receiver count says how many nodes took it. (Plain
//! `PUBLISH` on a cluster goes to every cluster node and counts only the
//! receiving shard's subscribers, so it could neither scale nor say honestly
//! that a push was handed over.)
//!
//! What a node holds changes with its registry: the directory writer keeps
//! the subscriptions in step ([`sync`]), a connecting client with shared
//! history subscribes before its stream is read ([`hold`]), and every refresh
//! puts right what a failed command left out of step ([`reconcile`]).

use std::collections::HashSet;

use tracing::debug;

use super::{names, Backend, Cluster, ClusterError, Dirty};

/// The channel of a directory entry.
fn channel(d: &Dirty) -> String {
    match d {
        Dirty::Key(k) => names::key_channel(k),
        Dirty::User(mid) => names::user_channel(*mid),
        Dirty::Room(r) => names::room_channel(r),
    }
}

/// Whether this node should be subscribed to `d`'s channel now: a key held or
/// being connected, a user with a connection, a room with members.
fn wanted(c: &Cluster, d: &Dirty) -> bool {
    match d {
        Dirty::Key(k) => c.registry.get(k).is_some() || c.registry.is_pending(k),
        Dirty::User(mid) => {
            c.registry.user_online(*mid) > 0 || c.registry.pending_for(Some(*mid), None)
        }
        Dirty::Room(r) => c.registry.room_online(r) > 0 || c.registry.pending_for(None, Some(r)),
    }
}

/// Subscribes to `channels` now (before a connecting client's stream is read,
/// so nothing appended after the read is missed). A no-op on one Redis server.
pub async fn hold(c: &Cluster, channels: Vec<String>) -> Result<(), ClusterError> {
    let Backend::Cluster(b) = &c.backend else {
        return Ok(());
    };
    // Sent even when already held: a concurrent `sync` may be leaving it.
    c.subs.lock().extend(channels.iter().cloned());
    b.subscribe(&channels, true).await
}

/// Brings the subscriptions of `dirty` entries in step with the registry.
pub async fn sync<'a>(
    c: &Cluster,
    dirty: impl Iterator<Item = &'a Dirty>,
) -> Result<(), ClusterError> {
    let Backend::Cluster(b) = &c.backend else {
        return Ok(());
    };
    let (mut join, mut leave) = (Vec::new(), Vec::new());
    {
        let mut subs = c.subs.lock();
        for d in dirty {
            let ch = channel(d);
            match (wanted(c, d), subs.contains(&ch)) {
                (true, false) => {
                    subs.insert(ch.clone());
                    join.push(ch);
                }
                (false, true) => {
                    subs.remove(&ch);
                    leave.push(ch);
                }
                _ => {}
            }
        }
    }
    let r = tokio::join!(b.subscribe(&join, true), b.unsubscribe(&leave));
    if r.0.is_err() {
        // Not held after all: the next refresh tries again.
        let mut subs = c.subs.lock();
        for ch in &join {
            subs.remove(ch);
        }
    }
    r.0.and(r.1)
}

/// Subscribes to every channel the registry wants and leaves every other one;
/// run at every refresh.
pub async fn reconcile(c: &Cluster) -> Result<(), ClusterError> {
    if !c.backend.is_cluster() {
        return Ok(());
    }
    let (keys, users) = c.registry.directory_snapshot();
    let mut want: HashSet<String> = keys
        .iter()
        .map(|(k, _)| names::key_channel(k))
        .chain(users.keys().map(|mid| names::user_channel(*mid)))
        .chain(
            c.registry
                .rooms()
                .iter()
                .map(|(r, _)| names::room_channel(r)),
        )
        .collect();
    let stale: Vec<Dirty> = {
        let subs = c.subs.lock();
        want.retain(|ch| !subs.contains(ch));
        subs.iter().filter_map(|ch| parse(ch)).collect()
    };
    let fresh: Vec<String> = want.into_iter().collect();
    if !fresh.is_empty() {
        debug!(node = %c.id, n = fresh.len(), "subscribing to channels a failed update left out");
        hold(c, fresh).await?;
    }
    sync(c, stale.iter()).await
}

/// Subscribes again to every channel this node needs: its own, `quicpush:all`
/// and each one the registry wants. Run by the refresh once Redis answers
/// after a failure: a restarted cluster node has no subscriptions, and the
/// Redis client's own resubscription is not relied on. Subscribing to a channel
/// already held changes nothing. A no-op on one Redis server (the bus
/// subscribes again on its own connection).
pub async fn resubscribe(c: &Cluster) -> Result<(), ClusterError> {
    let Backend::Cluster(b) = &c.backend else {
        return Ok(());
    };
    b.subscribe(&[names::node_channel(&c.id)], true).await?;
    b.subscribe(&[names::ALL.to_owned()], false).await?;
    let held: Vec<String> = c.subs.lock().drain().collect();
    debug!(node = %c.id, n = held.len(), "subscribing again to every held channel");
    let r = reconcile(c).await;
    if r.is_err() {
        // Still believed held: the next recovery sends them again.
        c.subs.lock().extend(held);
    }
    r
}

/// The entry a channel of ours names.
fn parse(ch: &str) -> Option<Dirty> {
    let inner = ch.strip_prefix("quicpush:{")?.strip_suffix("}:to")?;
    let (kind, id) = inner.split_once(':')?;
    Some(match kind {
        "k" => Dirty::Key(id.into()),
        "u" => Dirty::User(id.parse().ok()?),
        "r" => Dirty::Room(id.into()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_names_its_entry_back() {
        for d in [
            Dirty::Key("user:7/phone".into()),
            Dirty::User(-3),
            Dirty::Room("live://1".into()),
        ] {
            assert_eq!(parse(&channel(&d)), Some(d));
        }
        assert_eq!(parse("quicpush:node:n1"), None);
        assert_eq!(parse("quicpush:{x:1}:to"), None);
    }
}

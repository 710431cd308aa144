//! The tier's directory in Redis, every entry owned by one node and living `ttl`
//! unless that node refreshes it:
//!
//! - `quicpush:{k:<key>}:owner` = `<node>/<conn>`: which node (and which of its
//!   connections) holds the key. Registration is `SET … EX ttl GET`, so it
//!   learns the previous owner and asks it to close its connection (replaced).
//!   Unregistering deletes the entry only if it is still this node's.
//! - `quicpush:{u:<mid>}:on:<node>` = the user's connections on the node.
//! - `quicpush:{r:<room>}:on:<node>` = the room's members on the node, and
//!   `quicpush:{nodes}:node:<id>:rooms`, a hash room → count, for the tier's `Rooms`.
//!
//! Changes come from the registry's hook through a bounded queue to one writer
//! task, which coalesces what queued up and writes it in one pipeline (on a
//! Redis Cluster: every command at once, each to its slot's master), and keeps
//! the node's sharded subscriptions in step ([`super::subs`]). A full
//! queue drops the change: the refresh rewrites every entry each tick (with "set
//! if missing or mine", so after a Redis restart the entries come back and a
//! key another node took since is left alone).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use redis::Script;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::envelope::{Envelope, KickReason};
use super::{names, Cluster, ClusterError, Dirty};
use crate::registry::DirectoryHook;

/// Entries rewritten per pipeline by the refresh.
const CHUNK: usize = 100;
/// Longest pause between two of the refresh's pipelines.
const MAX_PAUSE: Duration = Duration::from_millis(20);
/// Changes the writer takes from its queue per pipeline.
const BATCH: usize = 1024;

/// Sets KEYS[1] to ARGV[1] for ARGV[3] ms if it is missing or its value starts
/// with ARGV[2] (this node's prefix).
const SET_IF_MINE: &str = "local v = redis.call('GET', KEYS[1]) \
if (not v) or string.sub(v, 1, #ARGV[2]) == ARGV[2] then \
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3]) return 1 end return 0";
fn set_if_mine_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(SET_IF_MINE))
}

/// The scripts this module runs by hash, for [`super::load_scripts`].
pub(super) fn scripts() -> [&'static Script; 1] {
    [set_if_mine_script()]
}

/// Deletes KEYS[1] if its value starts with ARGV[1].
const DEL_IF_MINE: &str = "local v = redis.call('GET', KEYS[1]) \
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then \
return redis.call('DEL', KEYS[1]) end return 0";

/// The registry's hook: queues changes for the writer, never waits.
#[derive(Debug)]
pub struct Hook(pub Weak<Cluster>);

impl Hook {
    fn send(&self, d: Dirty) {
        if let Some(c) = self.0.upgrade() {
            // Full: dropped; the next refresh rewrites it.
            let _ = c.dirty.try_send(d);
        }
    }
}

impl DirectoryHook for Hook {
    fn key_changed(&self, key: &Arc<str>) {
        self.send(Dirty::Key(key.clone()));
    }
    fn user_changed(&self, mid: i64) {
        self.send(Dirty::User(mid));
    }
    fn room_changed(&self, room: &Arc<str>) {
        self.send(Dirty::Room(room.clone()));
    }
    fn remote_room_online(&self, room: &str) -> u64 {
        self.0
            .upgrade()
            .and_then(|c| c.remote_rooms.read().get(room).copied())
            .unwrap_or(0)
    }
}

/// A key entry's value: `<node>/<conn>`.
pub fn owner_value(node: &str, conn: u64) -> String {
    format!("{node}/{conn}")
}

/// Splits a key entry's value into node and connection id.
pub fn parse_owner(v: &str) -> Option<(&str, u64)> {
    let (node, conn) = v.rsplit_once('/')?;
    Some((node, conn.parse().ok()?))
}

/// When a key entry's previous value `prev` names another live node: that node
/// and the Kick asking it to close its (older) connection of `key`.
pub fn kick_previous(c: &Cluster, key: &str, prev: &str) -> Option<(String, Envelope)> {
    let (node, conn) = parse_owner(prev)?;
    if node == c.id || !c.is_live(node) {
        return None;
    }
    debug!(key = %key, old_node = node, "key moved here from another node: asking it to close its connection");
    Some((
        node.to_owned(),
        Envelope::Kick {
            key: key.to_owned(),
            reason: KickReason::Replaced,
            conn,
            new_node: c.id.clone(),
        },
    ))
}

/// `SET name value PX ttl`.
fn set_px(name: String, value: impl redis::ToRedisArgs, ttl: u64) -> redis::Cmd {
    redis::cmd("SET")
        .arg(name)
        .arg(value)
        .arg("PX")
        .arg(ttl)
        .to_owned()
}

/// Deletes a key entry if this node (`prefix`: `<node>/`) still owns it.
fn del_if_mine(name: String, prefix: &str) -> redis::Cmd {
    redis::cmd("EVAL")
        .arg(DEL_IF_MINE)
        .arg(1)
        .arg(name)
        .arg(prefix)
        .to_owned()
}

pub(crate) fn ttl_ms(c: &Cluster) -> u64 {
    c.ttl.as_millis() as u64
}

/// Writes the registry's changes, coalesced, until the cluster halts.
pub async fn writer(c: Arc<Cluster>, mut rx: mpsc::Receiver<Dirty>) {
    loop {
        let first = tokio::select! {
            d = rx.recv() => match d { Some(d) => d, None => return },
            _ = c.halted().cancelled() => return,
        };
        let mut set = HashSet::new();
        set.insert(first);
        while set.len() < BATCH {
            match rx.try_recv() {
                Ok(d) => {
                    set.insert(d);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = super::subs::sync(&c, set.iter()).await {
            debug!(node = %c.id, error = %e, "subscription update failed; the refresh redoes it");
        }
        if let Err(e) = write(&c, set).await {
            debug!(node = %c.id, error = %e, "directory update failed; the refresh rewrites it");
        }
    }
}

async fn write(c: &Cluster, dirty: HashSet<Dirty>) -> Result<(), ClusterError> {
    let ttl = ttl_ms(c);
    let prefix = format!("{}/", c.id);
    let mut p: Vec<redis::Cmd> = Vec::new();
    // Positions of SET … GET replies, with their key.
    let mut gets = Vec::new();
    let rooms_key = names::node_rooms(&c.id);
    for d in dirty {
        match d {
            Dirty::Key(key) => match c.registry.get(&key) {
                Some(ch) => {
                    gets.push((p.len(), key.clone()));
                    p.push(
                        set_px(names::key(&key), owner_value(&c.id, ch.id), ttl)
                            .arg("GET")
                            .to_owned(),
                    );
                }
                None => p.push(del_if_mine(names::key(&key), &prefix)),
            },
            Dirty::User(mid) => {
                let count = c.registry.user_online(mid);
                if count > 0 {
                    p.push(set_px(names::user(mid, &c.id), count, ttl));
                } else {
                    p.push(redis::cmd("DEL").arg(names::user(mid, &c.id)).to_owned());
                }
            }
            Dirty::Room(room) => {
                let count = c.registry.room_online(&room);
                if count > 0 {
                    p.push(set_px(names::room(&room, &c.id), count, ttl));
                    p.push(
                        redis::cmd("HSET")
                            .arg(&rooms_key)
                            .arg(&*room)
                            .arg(count)
                            .to_owned(),
                    );
                    p.push(redis::cmd("PEXPIRE").arg(&rooms_key).arg(ttl).to_owned());
                } else {
                    p.push(redis::cmd("DEL").arg(names::room(&room, &c.id)).to_owned());
                    p.push(redis::cmd("HDEL").arg(&rooms_key).arg(&*room).to_owned());
                }
            }
        }
    }
    let replies = c.backend.each(p).await?;
    let mut kicks: HashMap<String, Vec<Envelope>> = HashMap::new();
    for (i, key) in gets {
        let Some(redis::Value::BulkString(prev)) = replies.get(i) else {
            continue;
        };
        if let Some((node, kick)) = kick_previous(c, &key, &String::from_utf8_lossy(prev)) {
            kicks.entry(node).or_default().push(kick);
        }
    }
    if !kicks.is_empty() {
        let batch: Vec<(String, Envelope)> = kicks
            .into_iter()
            .flat_map(|(n, es)| es.into_iter().map(move |e| (n.clone(), e)))
            .collect();
        super::bus::publish(c, batch).await?;
    }
    Ok(())
}

/// Rewrites every directory entry of this node (the refresh): keys with "set if
/// missing or mine", users and rooms as they are now, the rooms hash anew.
///
/// The entries go in pipelines of [`CHUNK`], with pauses that add up to at
/// most a quarter of the refresh interval (at most [`MAX_PAUSE`] each, and the
/// refresh must end within the interval): Redis runs one
/// client's pipeline in a burst, so a whole directory at once held back the
/// pushes queued behind it (a key push's p99 in a tier grew by milliseconds at
/// every refresh). Keys go by `EVALSHA`, one call per key (the script loaded
/// once, not sent with each call), so Redis can serve other clients between
/// them.
pub async fn rewrite(c: &Cluster) -> Result<(), ClusterError> {
    let ttl = ttl_ms(c);
    let prefix = format!("{}/", c.id);
    let (keys, users) = c.registry.directory_snapshot();
    let users: Vec<_> = users.into_iter().collect();
    let rooms = c.registry.rooms();
    let chunks =
        keys.len().div_ceil(CHUNK) + users.len().div_ceil(CHUNK) + rooms.len().div_ceil(CHUNK);
    let pause = (c.refresh / 4)
        .checked_div(chunks.max(1) as u32)
        .unwrap_or_default()
        .min(MAX_PAUSE);
    let mut first = true;
    let mut paced = || {
        let wait = !std::mem::take(&mut first);
        async move {
            if wait {
                tokio::time::sleep(pause).await;
            }
        }
    };
    let con = c.backend.con();
    let set_key = |(key, conn): &(Arc<str>, u64)| {
        let mut con = con.clone();
        let mut inv = set_if_mine_script().prepare_invoke();
        inv.key(names::key(key))
            .arg(owner_value(&c.id, *conn))
            .arg(&prefix)
            .arg(ttl);
        async move { inv.invoke_async::<i64>(&mut con).await }
    };
    if let Some(first) = keys.first() {
        // Alone, so a Redis without the script (restarted) loads it once,
        // not once per call of the chunk.
        set_key(first).await?;
    }
    for chunk in keys[keys.len().min(1)..].chunks(CHUNK) {
        paced().await;
        futures_util::future::try_join_all(chunk.iter().map(set_key)).await?;
    }
    for chunk in users.chunks(CHUNK) {
        paced().await;
        let cmds = chunk
            .iter()
            .map(|(mid, n)| set_px(names::user(*mid, &c.id), n, ttl))
            .collect();
        c.backend.each(cmds).await?;
    }
    let rooms_key = names::node_rooms(&c.id);
    let mut p = redis::pipe();
    p.atomic().cmd("DEL").arg(&rooms_key).ignore();
    for (room, n) in &rooms {
        p.cmd("HSET").arg(&rooms_key).arg(room).arg(n).ignore();
    }
    p.cmd("PEXPIRE").arg(&rooms_key).arg(ttl).ignore();
    p.query_async::<()>(&mut con.clone()).await?;
    for chunk in rooms.chunks(CHUNK) {
        paced().await;
        let cmds = chunk
            .iter()
            .map(|(room, n)| set_px(names::room(room, &c.id), n, ttl))
            .collect();
        c.backend.each(cmds).await?;
    }
    Ok(())
}

/// Reads the other live nodes' counts of each room with members here, for the
/// Heartbeat's tier-wide room count.
pub async fn read_remote_rooms(c: &Cluster) -> Result<(), ClusterError> {
    let others = c.others();
    let rooms: Vec<String> = c.registry.rooms().into_iter().map(|(r, _)| r).collect();
    let mut counts = HashMap::new();
    if !others.is_empty() {
        for chunk in rooms.chunks(CHUNK) {
            // One MGET per room: a room's entries share its slot.
            let cmds = chunk
                .iter()
                .map(|room| {
                    let mut cmd = redis::cmd("MGET");
                    for n in &others {
                        cmd.arg(names::room(room, n));
                    }
                    cmd
                })
                .collect();
            let r = c.backend.each(cmds).await?;
            for (room, v) in chunk.iter().zip(r) {
                let v: Vec<Option<u64>> = redis::from_redis_value(v).map_err(|e| {
                    ClusterError::BadReply(format!("MGET of room {room}'s counts: {e}"))
                })?;
                counts.insert(room.clone(), v.into_iter().flatten().sum());
            }
        }
    }
    *c.remote_rooms.write() = counts;
    Ok(())
}

/// The node each key is held on (with its connection), `None` where no live node
/// holds it: one `MGET`.
pub async fn owners(c: &Cluster, keys: &[&str]) -> Result<Vec<Option<String>>, ClusterError> {
    let mut cmd = redis::cmd("MGET");
    for k in keys {
        cmd.arg(names::key(k));
    }
    let v: Vec<Option<String>> = cmd.query_async(&mut c.backend.con()).await?;
    Ok(v.into_iter()
        .map(|v| {
            let v = v?;
            let (node, _) = parse_owner(&v)?;
            (node != c.id && c.is_live(node)).then(|| node.to_owned())
        })
        .collect())
}

/// The other live nodes' records' online counts and rooms.
pub async fn others_online_and_rooms(
    c: &Cluster,
) -> Result<(Vec<HashMap<String, u64>>, HashMap<String, u64>), ClusterError> {
    let others = c.others();
    if others.is_empty() {
        return Ok((Vec::new(), HashMap::new()));
    }
    let mut p = redis::pipe();
    for n in &others {
        p.cmd("HGETALL").arg(names::node(n));
        p.cmd("HGETALL").arg(names::node_rooms(n));
    }
    let r: Vec<HashMap<String, String>> = p.query_async(&mut c.backend.con()).await?;
    let mut records = Vec::new();
    let mut rooms: HashMap<String, u64> = HashMap::new();
    for pair in r.chunks(2) {
        if let Some(rec) = pair.first() {
            records.push(
                rec.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?)))
                    .collect(),
            );
        }
        if let Some(rs) = pair.get(1) {
            for (room, n) in rs {
                *rooms.entry(room.clone()).or_default() += n.parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok((records, rooms))
}

/// Deletes this node's record and directory entries (leaving the tier).
pub async fn remove_all(c: &Cluster) -> Result<(), ClusterError> {
    let prefix = format!("{}/", c.id);
    let (keys, users) = c.registry.directory_snapshot();
    let del = |name: String| redis::cmd("DEL").arg(name).to_owned();
    let mut p = vec![
        del(names::node(&c.id)),
        redis::cmd("ZREM").arg(names::NODES).arg(&c.id).to_owned(),
        del(names::node_rooms(&c.id)),
    ];
    for (room, _) in c.registry.rooms() {
        p.push(del(names::room(&room, &c.id)));
    }
    for mid in users.keys() {
        p.push(del(names::user(*mid, &c.id)));
    }
    for (key, _) in &keys {
        p.push(del_if_mine(names::key(key), &prefix));
    }
    if let Err(e) = c.backend.each(p).await {
        warn!(node = %c.id, error = %e, "removing this node's directory entries failed");
        return Err(e);
    }
    Ok(())
}

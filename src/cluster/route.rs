//! Forwarding a push to the nodes that need it, in one Redis script per call:
//! the directory lookup and the PUBLISHes run together inside Redis.
//!
//! Why a script rather than `MGET`, then PUBLISH: the dispatcher submits the
//! script right after the call's local part, with no `.await` between, so calls
//! reach Redis in the order the node took them, and Redis runs each script
//! whole. A node's subscriber therefore gets one backend's pushes in the order it
//! sent them. With a lookup awaited first, concurrent calls overtook each other
//! between lookup and publish. It is also one Redis operation per call.
//!
//! Both scripts read several directory keys, so they need one Redis server. On
//! a Redis Cluster there is no lookup: each key, user or room has a sharded
//! channel its holders subscribe to ([`super::subs`]), and a push is one
//! `SPUBLISH` per key, user or room ([`to_channels`]); one key's pushes keep
//! their order because they all go to that key's shard on one connection.

use std::sync::OnceLock;

use redis::Script;

use super::{names, Cluster, ClusterError};

/// KEYS: directory entries of keys (`<node>/<conn>`); ARGV[1]: this node's id,
/// ARGV[2]: the channel prefix, ARGV[2+i]: the message for key i. Per key: the
/// PUBLISH's receiver count, or -1 when no other node holds it.
const TO_OWNERS: &str = r"
local out = {}
for i, k in ipairs(KEYS) do
  local v = redis.call('GET', k)
  local node = v and (string.match(v, '^(.*)/') or v)
  if node and node ~= ARGV[1] then
    out[i] = redis.call('PUBLISH', ARGV[2] .. node, ARGV[2 + i])
  else
    out[i] = -1
  end
end
return out
";

/// KEYS: for each candidate node in turn, `ARGV[1]` count entries (a user's or a
/// room's per-node entries); ARGV[2]: the message; ARGV[3..]: each node's
/// channel. Per node: the PUBLISH's receiver count when any of its entries
/// counts above zero, else -1.
const WHERE_PRESENT: &str = r"
local m = tonumber(ARGV[1])
local out = {}
local nodes = #ARGV - 2
for j = 1, nodes do
  local present = false
  for k = 1, m do
    local v = redis.call('GET', KEYS[(j - 1) * m + k])
    if v and tonumber(v) > 0 then present = true break end
  end
  if present then
    out[j] = redis.call('PUBLISH', ARGV[2 + j], ARGV[2])
  else
    out[j] = -1
  end
end
return out
";

fn to_owners_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(TO_OWNERS))
}

fn where_present_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(WHERE_PRESENT))
}

/// The scripts this module runs, for [`super::load_scripts`].
pub(super) fn scripts() -> [&'static Script; 2] {
    [to_owners_script(), where_present_script()]
}

/// What forwarding one push to one destination did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Published; this many subscribers got it (0: the owner is gone).
    Published(u64),
    /// No other node needed it.
    NotThere,
}

fn routed(v: i64) -> Routed {
    u64::try_from(v).map_or(Routed::NotThere, Routed::Published)
}

/// Publishes `messages[i]` to the node holding `keys[i]`, for every key another
/// node holds. Call it right after the call's local part, with no `.await`
/// between: its first poll queues the script, which keeps calls in order.
pub async fn to_owners_of(
    c: &Cluster,
    keys: &[&str],
    messages: Vec<Vec<u8>>,
) -> Result<Vec<Routed>, ClusterError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    if c.backend.is_cluster() {
        let batch = keys
            .iter()
            .map(|k| names::key_channel(k))
            .zip(messages)
            .collect();
        return Ok(to_channels(c, batch)
            .await?
            .into_iter()
            .map(Routed::Published)
            .collect());
    }
    let mut inv = to_owners_script().prepare_invoke();
    for k in keys {
        inv.key(names::key(k));
    }
    inv.arg(&c.id).arg(names::node_channel(""));
    for m in messages {
        inv.arg(m);
    }
    let v: Vec<i64> = inv.invoke_async(&mut c.backend.con()).await?;
    Ok(v.into_iter().map(routed).collect())
}

/// Publishes `message` to every other live node where one of `entries` counts
/// members (entry `e` on node `n` is named `name(e, n)`); per node, what it did.
pub async fn where_present<T>(
    c: &Cluster,
    entries: &[T],
    name: impl Fn(&T, &str) -> String,
    message: Vec<u8>,
) -> Result<Vec<(String, Routed)>, ClusterError> {
    let others = c.others();
    if others.is_empty() || entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut inv = where_present_script().prepare_invoke();
    for n in &others {
        for e in entries {
            inv.key(name(e, n));
        }
    }
    inv.arg(entries.len()).arg(message);
    for n in &others {
        inv.arg(names::node_channel(n));
    }
    let v: Vec<i64> = inv.invoke_async(&mut c.backend.con()).await?;
    Ok(others.into_iter().zip(v.into_iter().map(routed)).collect())
}

/// On a Redis Cluster: publishes each message to its sharded channel; per
/// message, how many other nodes took it (this node's own subscription, whose
/// messages its bus skips, is not counted).
pub async fn to_channels(
    c: &Cluster,
    batch: Vec<(String, Vec<u8>)>,
) -> Result<Vec<u64>, ClusterError> {
    let mine: Vec<bool> = {
        let subs = c.subs.lock();
        batch.iter().map(|(ch, _)| subs.contains(ch)).collect()
    };
    let n = super::bus::publish_to(c, batch).await?;
    Ok(n.into_iter()
        .zip(mine)
        .map(|(n, mine)| n.saturating_sub(u64::from(mine)))
        .collect())
}

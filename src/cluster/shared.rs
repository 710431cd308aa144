//! History shared by the tier (`history.store = "redis"`): every key's and user
//! id's stream (and with `history.room` every room's) lives in Redis
//! ([`crate::history::redis_store`]'s layout), so a client whose node died
//! resumes on any other node with nothing lost; with `history.all` the
//! broadcast stream (`{a}`) lives there too, and every node fans a broadcast
//! out from the bus in the stream's order.
//!
//! ```text
//! backend ─▶ any node: one script per call ─▶ per key / user: append to its stream,
//!                         read who holds it, PUBLISH (position + frame) to each such node
//!            those nodes (this one too) ─▶ bus ─▶ registry::push_*_at ─▶ channels (in order)
//! client connects ─▶ claim key (SET owner … GET; kick the old node) and user presence
//!                 ─▶ read since ─▶ register
//! ```
//!
//! - **One order.** Every push to a key or user, whichever node took it, is
//!   appended and published by one atomic script, and always travels through the
//!   holding nodes' subscriptions, this node's included: a stream's order is the
//!   order its clients get. A channel takes such a push only if it is its
//!   source's next offset; a gap (a lost pub/sub message) closes it with
//!   `Overflow`, and the client resumes.
//! - **Outcomes.** Keys: `Forwarded`: appended and handed to the owner's
//!   subscriber (not yet written). `Stored`: appended, and no live node holds the
//!   key (its client gets it when it resumes). `Offline`: no stream and no owner,
//!   so nothing kept (as on one node). `Unavailable`: Redis did not answer; the
//!   push may or may not have been appended. Users: `appended` user streams and
//!   `forwarded_nodes` reached, `unavailable` when Redis did not answer.
//! - **Connecting.** The session first marks the connection pending (pushes
//!   arriving for its key or user are buffered), claims its key and its user's
//!   presence on this node in the directory, then reads the streams since the
//!   client's positions, and registers: replay, then the buffered pushes after
//!   it. A push appended before the claim is in the read; one after it reaches
//!   this node; both once.

use bytes::Bytes;
use redis::Script;
use std::sync::OnceLock;

use super::{directory, names, Cluster, ClusterError};
use crate::history::redis_store::{stream_keys, Published};
use crate::history::{History, Position, Recovery, StreamRef};

/// First byte of a positioned key push on the bus (bincode envelopes start with
/// their version, 1).
pub const MARKER: u8 = 0xfe;
/// First byte of a positioned user push on the bus.
pub const USER_MARKER: u8 = 0xfd;
/// First byte of a positioned room push on the bus.
pub const ROOM_MARKER: u8 = 0xfc;
/// First byte of a positioned broadcast on the bus (`quicpush:all`).
pub const ALL_MARKER: u8 = 0xfb;

/// The append both scripts share, inside their per-stream loop: with `meta`,
/// `log`, `frame`, `new_epoch` and `epoch` (nil for a missing stream) in scope
/// and ARGV[1] the size, ARGV[2] the ttl, it creates the stream if missing,
/// appends `frame` at `top` and leaves `e` (the epoch) and `msg` (the bus
/// message: `prefix`, epoch u32 BE, offset u64 BE, frame) set.
macro_rules! append_lua {
    () => {
        r"
    if not epoch then
      epoch = new_epoch
      redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
      redis.call('DEL', log)
    end
    local top = redis.call('HINCRBY', meta, 'top', 1)
    redis.call('XADD', log, 'MAXLEN', ARGV[1], top .. '-0', 'f', frame)
    redis.call('EXPIRE', meta, ARGV[2])
    redis.call('EXPIRE', log, ARGV[2])
    local e = tonumber(epoch)
    local hi = math.floor(top / 4294967296)
    local lo = top - hi * 4294967296
    local msg = prefix .. struct.pack('>I4>I4>I4', e, hi, lo) .. frame
"
    };
}

/// KEYS: per key, its stream's meta and log and its directory entry. ARGV[1]:
/// stream size, ARGV[2]: ttl (s), ARGV[3]: node channel prefix, ARGV[4]: the
/// key's sharded channel on a Redis Cluster (one key per call there; empty on
/// one server: publish to the owner's node channel); per key i, from
/// ARGV[4 + 3(i-1) + 1]: frame, new epoch, message prefix. Per key: `{epoch,
/// offset, receivers}`, epoch 0 when nothing was kept (no stream, no owner) and
/// receivers -1 when no node holds the key.
const APPEND_ROUTE: &str = concat!(
    r"
local out = {}
for i = 1, #KEYS / 3 do
  local meta, log, owner = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local frame, new_epoch, prefix = ARGV[3 * i + 2], ARGV[3 * i + 3], ARGV[3 * i + 4]
  local v = redis.call('GET', owner)
  local epoch = redis.call('HGET', meta, 'epoch')
  if (not epoch) and (not v) then
    table.insert(out, 0) table.insert(out, 0) table.insert(out, -1)
  else
",
    append_lua!(),
    r"
    local n = -1
    if ARGV[4] ~= '' then
      n = redis.call('SPUBLISH', ARGV[4], msg)
    elseif v then
      local node = string.match(v, '^(.*)/') or v
      n = redis.call('PUBLISH', ARGV[3] .. node, msg)
    end
    table.insert(out, e) table.insert(out, top) table.insert(out, n)
  end
end
return out
"
);

/// KEYS: per user id, its stream's meta and log, then its count entry on each
/// of the `ARGV[3]` live nodes. ARGV[1]: stream size, ARGV[2]: ttl (s),
/// ARGV[3]: node count n, ARGV[4]: the user's sharded channel on a Redis
/// Cluster (one user per call there; empty on one server), ARGV[5 .. 4+n]: each
/// node's channel; per user i, from ARGV[4 + n + 3(i-1) + 1]: frame, new epoch,
/// message prefix. Per user:
/// `{epoch, offset, nodes reached}`, epoch 0 when nothing was kept (no stream
/// and no connection anywhere).
const USER_APPEND_ROUTE: &str = concat!(
    r"
local n = tonumber(ARGV[3])
local per = 2 + n
local out = {}
for i = 1, #KEYS / per do
  local base = (i - 1) * per
  local meta, log = KEYS[base + 1], KEYS[base + 2]
  local a = 4 + n + 3 * (i - 1)
  local frame, new_epoch, prefix = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local present = {}
  for j = 1, n do
    local v = redis.call('GET', KEYS[base + 2 + j])
    if v and tonumber(v) > 0 then table.insert(present, j) end
  end
  local epoch = redis.call('HGET', meta, 'epoch')
  if (not epoch) and #present == 0 then
    table.insert(out, 0) table.insert(out, 0) table.insert(out, 0)
  else
",
    append_lua!(),
    r"
    local reached = 0
    if ARGV[4] ~= '' then
      reached = redis.call('SPUBLISH', ARGV[4], msg)
    else
      for _, j in ipairs(present) do
        if redis.call('PUBLISH', ARGV[4 + j], msg) > 0 then reached = reached + 1 end
      end
    end
    table.insert(out, e) table.insert(out, top) table.insert(out, reached)
  end
end
return out
"
);

fn user_append_route_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(USER_APPEND_ROUTE))
}

fn append_route_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(APPEND_ROUTE))
}

/// The scripts this module runs, for [`super::load_scripts`].
pub(super) fn scripts() -> [&'static Script; 2] {
    [append_route_script(), user_append_route_script()]
}

/// What the script did with one key's push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAppended {
    /// Where it was appended; `None`: not kept (no stream and no owner).
    pub position: Option<Position>,
    /// Subscribers the PUBLISH reached; `None`: no node holds the key.
    pub receivers: Option<u64>,
}

/// A positioned key push as it travels on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPush {
    pub key: String,
    pub position: Position,
    /// The encoded frame (16-byte header), as stored in the stream.
    pub frame: Bytes,
}

/// The bus message's start for `key`: marker, key length (u32 BE), key.
pub fn message_prefix(key: &str) -> Vec<u8> {
    named_message_prefix(MARKER, key)
}

/// The bus message's start for a named stream (a key's, or with
/// [`ROOM_MARKER`] a room's): marker, name length (u32 BE), name.
pub fn named_message_prefix(marker: u8, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + name.len());
    v.push(marker);
    v.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// A positioned user push as it travels on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPush {
    pub mid: i64,
    pub position: Position,
    /// The encoded frame (16-byte header), as stored in the stream.
    pub frame: Bytes,
}

/// The bus message's start for user `mid`: marker, mid (i64 BE).
pub fn user_message_prefix(mid: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(USER_MARKER);
    v.extend_from_slice(&mid.to_be_bytes());
    v
}

impl UserPush {
    /// Parses a bus message that starts with [`USER_MARKER`]; `None` for anything
    /// else or anything cut short.
    pub fn parse(msg: &[u8]) -> Option<UserPush> {
        if *msg.first()? != USER_MARKER {
            return None;
        }
        let mid = i64::from_be_bytes(msg.get(1..9)?.try_into().ok()?);
        let p = Published::parse(msg.get(9..)?)?;
        if p.position.offset == 0 {
            return None;
        }
        Some(UserPush {
            mid,
            position: p.position,
            frame: p.frame,
        })
    }
}

impl KeyPush {
    /// Parses a bus message that starts with [`MARKER`]; `None` for anything else
    /// or anything cut short.
    pub fn parse(msg: &[u8]) -> Option<KeyPush> {
        Self::parse_named(msg, MARKER)
    }

    /// Parses a named stream's push starting with `marker` (a room's with
    /// [`ROOM_MARKER`]: `key` is then the room).
    pub fn parse_named(msg: &[u8], marker: u8) -> Option<KeyPush> {
        if *msg.first()? != marker {
            return None;
        }
        let len = u32::from_be_bytes(msg.get(1..5)?.try_into().ok()?) as usize;
        let end = 5usize.checked_add(len)?;
        let key = std::str::from_utf8(msg.get(5..end)?).ok()?.to_owned();
        let p = Published::parse(msg.get(end..)?)?;
        if p.position.offset == 0 {
            return None;
        }
        Some(KeyPush {
            key,
            position: p.position,
            frame: p.frame,
        })
    }
}

/// Appends `frames[i]` to `keys[i]`'s stream and publishes it to the node holding
/// the key, for every key, in one script. Call it with no `.await` before it in
/// the call's handling, so calls keep their order.
pub async fn append_route(
    c: &Cluster,
    keys: &[&str],
    frames: &[&Bytes],
) -> Result<Vec<KeyAppended>, ClusterError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let h = c.keys.as_ref().ok_or(ClusterError::NoSharedHistory)?;
    let invoke = |keys: &[&str], frames: &[&Bytes], channel: String| {
        let mut inv = append_route_script().prepare_invoke();
        for k in keys {
            let (meta, log) = stream_keys(StreamRef::Key(k));
            inv.key(meta).key(log).key(names::key(k));
        }
        inv.arg(h.size())
            .arg(h.ttl_secs())
            .arg(names::node_channel(""))
            .arg(channel);
        for (k, f) in keys.iter().zip(frames) {
            inv.arg(f.as_ref())
                .arg(History::new_epoch())
                .arg(message_prefix(k));
        }
        let mut con = c.backend.con();
        async move { inv.invoke_async::<Vec<i64>>(&mut con).await }
    };
    let v: Vec<i64> = if c.backend.is_cluster() {
        // One script per key (each in its own slot), all sent at once; each
        // publishes to its key's sharded channel.
        let calls = keys
            .iter()
            .zip(frames)
            .map(|(k, f)| invoke(&[k], &[f], names::key_channel(k)));
        concat(calls).await?
    } else {
        invoke(keys, frames, String::new()).await?
    };
    Ok(appended(v, keys.len(), "key")?
        .into_iter()
        .map(|(position, n)| KeyAppended {
            position,
            receivers: u64::try_from(n).ok(),
        })
        .collect())
}

fn appended(
    v: Vec<i64>,
    n: usize,
    what: &str,
) -> Result<Vec<(Option<Position>, i64)>, ClusterError> {
    if v.len() != n * 3 {
        return Err(ClusterError::BadReply(format!(
            "append and route: {} values for {n} {what} streams",
            v.len()
        )));
    }
    Ok(v.chunks(3)
        .map(|r| {
            let position = (r[0] > 0 && r[1] > 0).then(|| Position {
                epoch: r[0] as u32,
                offset: r[1] as u64,
            });
            (position, r[2])
        })
        .collect())
}

/// What the user script did with one user's push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserAppended {
    /// Where it was appended; `None`: not kept (no stream, no connection anywhere).
    pub position: Option<Position>,
    /// Nodes whose subscriber got it (this one included).
    pub reached: u64,
}

/// Appends `frame` to each user's stream and publishes it to every live node
/// holding one of the user's connections (this one included), in one script.
/// Call it with no `.await` before it in the call's handling.
pub async fn append_route_users(
    c: &Cluster,
    mids: &[i64],
    frame: &Bytes,
) -> Result<Vec<UserAppended>, ClusterError> {
    let streams: Vec<Present> = mids
        .iter()
        .map(|&mid| Present {
            stream: StreamRef::User(mid),
            on: Box::new(move |n: &str| names::user(mid, n)),
            prefix: user_message_prefix(mid),
            channel: names::user_channel(mid),
        })
        .collect();
    append_route_present(c, streams, frame).await
}

/// Appends `frame` to `room`'s stream (shared room history) and publishes it to
/// every live node with members of the room (this one included), in one
/// script. What it did, as for a user.
pub async fn append_route_room(
    c: &Cluster,
    room: &str,
    frame: &Bytes,
) -> Result<UserAppended, ClusterError> {
    let owned = room.to_owned();
    let streams = vec![Present {
        stream: StreamRef::Room(room),
        on: Box::new(move |n: &str| names::room(&owned, n)),
        prefix: named_message_prefix(ROOM_MARKER, room),
        channel: names::room_channel(room),
    }];
    let mut v = append_route_present(c, streams, frame).await?;
    v.pop()
        .ok_or_else(|| ClusterError::BadReply("room append: no reply".into()))
}

/// Appends a broadcast's `frame` to the tier's broadcast stream (`{a}`, shared
/// broadcast history) and publishes it with its position on `quicpush:all`, in
/// one script: every node (this one too) fans it out from the bus, so the
/// stream's order is every node's delivery order. Call it with no `.await`
/// before it in the call's handling. On a Redis Cluster the script runs on
/// `{a}`'s master and its PUBLISH reaches every cluster node.
pub async fn append_route_all(c: &Cluster, frame: &Bytes) -> Result<Position, ClusterError> {
    let h = c.keys.as_ref().ok_or(ClusterError::NoSharedHistory)?;
    let a = h
        .append_publish(
            &mut c.backend.con(),
            StreamRef::All,
            frame,
            names::ALL,
            &[ALL_MARKER],
        )
        .await?;
    Ok(a.position)
}

/// Parses a positioned broadcast (it starts with [`ALL_MARKER`]); `None` for
/// anything else or anything cut short.
pub fn parse_all(msg: &[u8]) -> Option<Published> {
    if *msg.first()? != ALL_MARKER {
        return None;
    }
    Published::parse(msg.get(1..)?).filter(|p| p.position.offset > 0)
}

/// The replies of scripts run one per slot (a Redis Cluster), all sent at
/// once, in the order of `calls`.
async fn concat<F>(calls: impl IntoIterator<Item = F>) -> redis::RedisResult<Vec<i64>>
where
    F: std::future::Future<Output = redis::RedisResult<Vec<i64>>>,
{
    Ok(futures_util::future::try_join_all(calls)
        .await?
        .into_iter()
        .flatten()
        .collect())
}

/// A stream whose pushes go to the nodes where it has a presence entry (a
/// user's connections, a room's members).
struct Present<'a> {
    stream: StreamRef<'a>,
    /// Its presence entry on a node.
    on: Box<dyn Fn(&str) -> String + Send + Sync + 'a>,
    /// The bus message's prefix (marker and name).
    prefix: Vec<u8>,
    /// Its sharded channel (a Redis Cluster).
    channel: String,
}

async fn append_route_present(
    c: &Cluster,
    streams: Vec<Present<'_>>,
    frame: &Bytes,
) -> Result<Vec<UserAppended>, ClusterError> {
    if streams.is_empty() {
        return Ok(Vec::new());
    }
    let h = c.keys.as_ref().ok_or(ClusterError::NoSharedHistory)?;
    let nodes: Vec<String> = c.live.read().iter().cloned().collect();
    let n = streams.len();
    let invoke = |streams: &[Present<'_>], channel: &str| {
        let mut inv = user_append_route_script().prepare_invoke();
        for s in streams {
            let (meta, log) = stream_keys(s.stream);
            inv.key(meta).key(log);
            for node in &nodes {
                inv.key((s.on)(node));
            }
        }
        inv.arg(h.size())
            .arg(h.ttl_secs())
            .arg(nodes.len())
            .arg(channel);
        for node in &nodes {
            inv.arg(names::node_channel(node));
        }
        for s in streams {
            inv.arg(frame.as_ref())
                .arg(History::new_epoch())
                .arg(&s.prefix[..]);
        }
        let mut con = c.backend.con();
        async move { inv.invoke_async::<Vec<i64>>(&mut con).await }
    };
    let v: Vec<i64> = if c.backend.is_cluster() {
        // One script per stream (each in its own slot), all sent at once; each
        // publishes to the stream's sharded channel.
        let calls = streams
            .iter()
            .map(|s| invoke(std::slice::from_ref(s), &s.channel));
        concat(calls).await?
    } else {
        invoke(&streams, "").await?
    };
    Ok(appended(v, n, "user or room")?
        .into_iter()
        .map(|(position, n)| UserAppended {
            position,
            reached: u64::try_from(n).unwrap_or(0),
        })
        .collect())
}

/// Claims `room`'s presence on this node (at least `at_least` members) before
/// a resuming member's room stream is read, so every push appended after the
/// read reaches this node; the directory writer rewrites the real count.
pub async fn claim_room(c: &Cluster, room: &str, at_least: u64) -> Result<(), ClusterError> {
    claim_presence(
        c,
        names::room_channel(room),
        names::room(room, &c.id),
        at_least,
    )
    .await
}

/// Subscribes to `channel` (a Redis Cluster) and sets the count entry `entry`
/// to at least `at_least`, living the node's TTL.
async fn claim_presence(
    c: &Cluster,
    channel: String,
    entry: String,
    at_least: u64,
) -> Result<(), ClusterError> {
    super::subs::hold(c, vec![channel]).await?;
    redis::cmd("SET")
        .arg(entry)
        .arg(at_least.max(1))
        .arg("PX")
        .arg(directory::ttl_ms(c))
        .query_async::<()>(&mut c.backend.con())
        .await?;
    Ok(())
}

/// Marks user `mid` present on this node at once (its count entry at least
/// `at_least`), rather than through the directory writer's queue, so user
/// pushes find this node before the connection registers.
pub async fn claim_user(c: &Cluster, mid: i64, at_least: u64) -> Result<(), ClusterError> {
    claim_presence(
        c,
        names::user_channel(mid),
        names::user(mid, &c.id),
        at_least,
    )
    .await
}

/// Makes this node the holder of `key` (connection `conn`) at once, rather than
/// through the directory writer's queue, and asks the node that held it before
/// to close its connection.
pub async fn claim(c: &Cluster, key: &str, conn: u64) -> Result<(), ClusterError> {
    super::subs::hold(c, vec![names::key_channel(key)]).await?;
    let prev: Option<String> = redis::cmd("SET")
        .arg(names::key(key))
        .arg(directory::owner_value(&c.id, conn))
        .arg("PX")
        .arg(directory::ttl_ms(c))
        .arg("GET")
        .query_async(&mut c.backend.con())
        .await?;
    if let Some(kick) = prev.and_then(|p| directory::kick_previous(c, key, &p)) {
        super::bus::publish(c, vec![kick]).await?;
    }
    Ok(())
}

/// Every push to `stream` after `since` (or only the stream's top when `since`
/// is `None`), creating the stream if missing.
pub async fn read(
    c: &Cluster,
    stream: StreamRef<'_>,
    since: Option<Position>,
) -> Result<Recovery, ClusterError> {
    let h = c.keys.as_ref().ok_or(ClusterError::NoSharedHistory)?;
    // Epoch 0 is never a stream's: the read answers the top, not recovered.
    let pos = since.unwrap_or_default();
    Ok(h.since(&mut c.backend.con(), stream, pos).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_push_message_round_trips_and_garbage_is_refused() {
        let mut msg = message_prefix("user-7");
        msg.extend_from_slice(&7u32.to_be_bytes());
        msg.extend_from_slice(&1u32.to_be_bytes());
        msg.extend_from_slice(&2u32.to_be_bytes());
        msg.extend_from_slice(b"frame");
        let p = KeyPush::parse(&msg).expect("parses");
        assert_eq!(p.key, "user-7");
        assert_eq!(
            p.position,
            Position {
                epoch: 7,
                offset: (1 << 32) | 2
            }
        );
        assert_eq!(&p.frame[..], b"frame");
        for cut in 0..msg.len() - 5 {
            assert_eq!(KeyPush::parse(&msg[..cut]), None, "cut at {cut}");
        }
        let mut wrong = msg.clone();
        wrong[0] = 1;
        assert_eq!(KeyPush::parse(&wrong), None);
    }

    #[test]
    fn a_user_push_message_round_trips_and_garbage_is_refused() {
        let mut msg = user_message_prefix(-42);
        msg.extend_from_slice(&9u32.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        msg.extend_from_slice(&3u32.to_be_bytes());
        msg.extend_from_slice(b"f");
        let p = UserPush::parse(&msg).expect("parses");
        assert_eq!((p.mid, p.position.epoch, p.position.offset), (-42, 9, 3));
        assert_eq!(&p.frame[..], b"f");
        for cut in 0..msg.len() - 1 {
            assert_eq!(UserPush::parse(&msg[..cut]), None, "cut at {cut}");
        }
        assert_eq!(UserPush::parse(&message_prefix("k")), None);
    }

    #[test]
    fn a_broadcast_message_round_trips_and_garbage_is_refused() {
        let mut msg = vec![ALL_MARKER];
        msg.extend_from_slice(&5u32.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        msg.extend_from_slice(&8u32.to_be_bytes());
        msg.extend_from_slice(b"frame");
        let p = parse_all(&msg).expect("parses");
        assert_eq!((p.position.epoch, p.position.offset), (5, 8));
        assert_eq!(&p.frame[..], b"frame");
        for cut in 0..13 {
            assert_eq!(parse_all(&msg[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse_all(&message_prefix("k")), None);
        let mut zero = msg.clone();
        zero[12] = 0;
        assert_eq!(parse_all(&zero), None, "offset 0 is never a push's");
    }
}

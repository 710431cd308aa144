//! Key history shared by the tier (`history.store = "redis"`): every key's
//! stream lives in Redis ([`crate::history::redis_store`]'s layout), so a client
//! whose node died resumes on any other node with nothing lost.
//!
//! ```text
//! backend ─▶ any node: one script per call ─▶ per key: append to its stream,
//!                                             GET its owner, PUBLISH (position + frame)
//!            owning node (this one too) ─▶ bus ─▶ registry::push_key_at ─▶ channel (in order)
//! client connects ─▶ claim (SET owner … GET; kick the old node) ─▶ read since ─▶ register
//! ```
//!
//! - **One order.** Every push to a key, whichever node took it, is appended and
//!   published by one atomic script, and always travels through the owner's
//!   subscription, this node's included: the stream's order is the order its
//!   client gets. A channel takes a key push only if it is the next offset; a gap
//!   (a lost pub/sub message) closes it with `Overflow`, and the client resumes.
//! - **Outcomes.** `Forwarded`: appended and handed to the owner's subscriber
//!   (not yet written). `Stored`: appended, and no live node holds the key (its
//!   client gets it when it resumes). `Offline`: no stream and no owner, so
//!   nothing kept (as on one node). `Unavailable`: Redis did not answer; the push
//!   may or may not have been appended.
//! - **Connecting.** The session first marks the key pending (pushes arriving for
//!   it are buffered), claims the key in the directory, then reads the stream
//!   since the client's position, and registers: replay, then the buffered pushes
//!   after it. A push appended before the claim is in the read; one after it
//!   reaches this node; both once.

use bytes::Bytes;
use redis::Script;
use std::sync::OnceLock;

use super::{directory, names, Cluster, ClusterError};
use crate::history::redis_store::{stream_keys, Published};
use crate::history::{History, Position, Recovery, StreamRef};

/// First byte of a positioned key push on the bus (bincode envelopes start with
/// their version, 1).
pub const MARKER: u8 = 0xfe;

/// KEYS: per key, its stream's meta and log and its directory entry. ARGV[1]:
/// stream size, ARGV[2]: ttl (s), ARGV[3]: channel prefix; per key i, from
/// ARGV[3 + 3(i-1) + 1]: frame, new epoch, message prefix. Per key: `{epoch,
/// offset, receivers}`, epoch 0 when nothing was kept (no stream, no owner) and
/// receivers -1 when no node holds the key.
const APPEND_ROUTE: &str = r"
local out = {}
for i = 1, #KEYS / 3 do
  local meta, log, owner = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local frame, new_epoch, prefix = ARGV[3 * i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3]
  local v = redis.call('GET', owner)
  local epoch = redis.call('HGET', meta, 'epoch')
  if (not epoch) and (not v) then
    table.insert(out, 0) table.insert(out, 0) table.insert(out, -1)
  else
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
    local n = -1
    if v then
      local node = string.match(v, '^(.*)/') or v
      local hi = math.floor(top / 4294967296)
      local lo = top - hi * 4294967296
      n = redis.call('PUBLISH', ARGV[3] .. node,
        prefix .. struct.pack('>I4>I4>I4', e, hi, lo) .. frame)
    end
    table.insert(out, e) table.insert(out, top) table.insert(out, n)
  end
end
return out
";

fn append_route_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::new(APPEND_ROUTE))
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

/// The bus message's start for `key`: marker, key length (u16 BE), key.
pub fn message_prefix(key: &str) -> Vec<u8> {
    let len = u16::try_from(key.len()).unwrap_or(u16::MAX);
    let mut v = Vec::with_capacity(3 + key.len());
    v.push(MARKER);
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(&key.as_bytes()[..usize::from(len)]);
    v
}

impl KeyPush {
    /// Parses a bus message that starts with [`MARKER`]; `None` for anything else
    /// or anything cut short.
    pub fn parse(msg: &[u8]) -> Option<KeyPush> {
        if *msg.first()? != MARKER {
            return None;
        }
        let len = usize::from(u16::from_be_bytes(msg.get(1..3)?.try_into().ok()?));
        let key = std::str::from_utf8(msg.get(3..3 + len)?).ok()?.to_owned();
        let p = Published::parse(msg.get(3 + len..)?)?;
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
    let mut inv = append_route_script().prepare_invoke();
    for k in keys {
        let (meta, log) = stream_keys(StreamRef::Key(k));
        inv.key(meta).key(log).key(names::key(k));
    }
    inv.arg(h.size()).arg(h.ttl_secs()).arg(names::node(""));
    for (k, f) in keys.iter().zip(frames) {
        inv.arg(f.as_ref())
            .arg(History::new_epoch())
            .arg(message_prefix(k));
    }
    let v: Vec<i64> = inv.invoke_async(&mut c.backend.con()).await?;
    if v.len() != keys.len() * 3 {
        return Err(ClusterError::BadReply(format!(
            "append_route: {} values for {} keys",
            v.len(),
            keys.len()
        )));
    }
    Ok(v.chunks(3)
        .map(|r| KeyAppended {
            position: (r[0] > 0 && r[1] > 0).then(|| Position {
                epoch: r[0] as u32,
                offset: r[1] as u64,
            }),
            receivers: u64::try_from(r[2]).ok(),
        })
        .collect())
}

/// Makes this node the holder of `key` (connection `conn`) at once, rather than
/// through the directory writer's queue, and asks the node that held it before
/// to close its connection.
pub async fn claim(c: &Cluster, key: &str, conn: u64) -> Result<(), ClusterError> {
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

/// Every push to `key` after `since` (or only the stream's top when `since` is
/// `None`), creating the stream if missing.
pub async fn read(
    c: &Cluster,
    key: &str,
    since: Option<Position>,
) -> Result<Recovery, ClusterError> {
    let h = c.keys.as_ref().ok_or(ClusterError::NoSharedHistory)?;
    // Epoch 0 is never a stream's: the read answers the top, not recovered.
    let pos = since.unwrap_or_default();
    Ok(h.since(&mut c.backend.con(), StreamRef::Key(key), pos)
        .await?)
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
}

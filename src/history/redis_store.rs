//! Push history in Redis: one stream per source with epoch and offset, shared by
//! every node of a tier, so a client whose node died resumes on another.
//!
//! Each source stream is two Redis keys in one hash slot (the `{…}` tag, which
//! the tier's directory entries of the same key, user or room share), so each
//! script touches one slot and works on a Redis Cluster too:
//!
//! - `quicpush:{<source>}:meta` (`{k:<key>}`, `{u:<mid>}`, `{r:<room>}`, `{a}`), a hash: `epoch` (random, new whenever the stream
//!   is created, including after it expired) and `top` (the offset of its last push);
//! - `quicpush:{<source>}:log`, a Redis stream whose entry IDs are `<offset>-0`,
//!   each entry holding the encoded frame in field `f`, trimmed to `history.size`
//!   entries (exactly, so a gap is always seen).
//!
//! Both keys expire `history.ttl` after the last append or read. An append is one
//! atomic script (create if asked, `HINCRBY top`, `XADD`, trim, expire), and
//! [`RedisHistory::append_publish`] also publishes the frame with its position in
//! the same script, so the order of a stream is the order every subscriber sees.
//! A read ([`RedisHistory::since`]) returns every push after a position or an honest
//! "not recovered", as the in-memory store does. `history.bytes` is not enforced
//! here: bound Redis's memory with its own `maxmemory` (an evicted stream only turns
//! a later resume into "not recovered").

use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionLike;
use redis::{Script, Value};

use super::{History, Position, Recovery, StreamRef};

/// What went wrong talking to Redis about history.
#[derive(Debug, thiserror::Error)]
pub enum RedisHistoryError {
    /// Redis could not be reached or refused the command.
    #[error("history {op} on {stream}: {source}")]
    Redis {
        op: &'static str,
        stream: String,
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered something the script never returns.
    #[error("history {op} on {stream}: unexpected reply: {detail}")]
    BadReply {
        op: &'static str,
        stream: String,
        detail: String,
    },
}

/// The start of both append scripts: KEYS meta, log; ARGV frame, size, ttl (s),
/// create (0/1), new epoch. Leaves `epoch` and `top` set, or returns nil when
/// the stream is missing and `create` is 0.
macro_rules! append_lua {
    () => {
        r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if ARGV[4] == '0' then return false end
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('DEL', KEYS[2])
end
local top = redis.call('HINCRBY', KEYS[1], 'top', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], top .. '-0', 'f', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
"
    };
}

/// Appends one frame. Returns `{epoch, offset}`, or nil when the stream is
/// missing and `create` is 0.
const APPEND: &str = concat!(append_lua!(), "return {tonumber(epoch), top}\n");

/// Appends, then `PUBLISH ARGV[6] (ARGV[7] .. epoch u32 BE .. offset u64 BE ..
/// frame)`. Returns `{epoch, offset, receivers}`.
const APPEND_PUBLISH: &str = concat!(
    append_lua!(),
    r"
local e = tonumber(epoch)
local hi = math.floor(top / 4294967296)
local lo = top - hi * 4294967296
local n = redis.call('PUBLISH', ARGV[6],
  ARGV[7] .. struct.pack('>I4>I4>I4', e, hi, lo) .. ARGV[1])
return {e, top, n}
"
);

/// Reads a stream since a position: KEYS meta, log; ARGV epoch, offset, ttl (s),
/// new epoch (used if the stream is missing). Returns `{epoch, top, recovered,
/// offset1, frame1, …}`.
const SINCE: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local top
if not epoch then
  epoch = ARGV[4]
  top = 0
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'top', 0)
  redis.call('DEL', KEYS[2])
else
  top = tonumber(redis.call('HGET', KEYS[1], 'top'))
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local e = tonumber(epoch)
local since = tonumber(ARGV[2])
if tostring(e) ~= ARGV[1] or since > top then return {e, top, 0} end
if since == top then return {e, top, 1} end
local entries = redis.call('XRANGE', KEYS[2], '(' .. since .. '-0', '+')
local out = {e, top, 1}
local want = since + 1
for _, entry in ipairs(entries) do
  local id = tonumber(string.match(entry[1], '^(%d+)-'))
  if id ~= want then return {e, top, 0} end
  want = want + 1
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'f' then
      table.insert(out, id)
      table.insert(out, fields[i + 1])
    end
  end
end
if want ~= top + 1 then return {e, top, 0} end
return out
";

/// The Redis history of a tier: the scripts and the retention they apply.
#[derive(Debug, Clone)]
pub struct RedisHistory {
    size: usize,
    ttl_secs: u64,
    append: Script,
    append_publish: Script,
    since: Script,
}

/// The hash tag of a stream's keys.
pub fn stream_tag(stream: StreamRef<'_>) -> String {
    match stream {
        StreamRef::Key(k) => format!("k:{k}"),
        StreamRef::User(m) => format!("u:{m}"),
        StreamRef::Room(r) => format!("r:{r}"),
        StreamRef::All => "a".to_owned(),
    }
}

/// The stream's two keys: meta hash and log stream.
pub fn stream_keys(stream: StreamRef<'_>) -> (String, String) {
    let tag = stream_tag(stream);
    (
        format!("quicpush:{{{tag}}}:meta"),
        format!("quicpush:{{{tag}}}:log"),
    )
}

/// A published push as [`RedisHistory::append_publish`] sends it, after the
/// caller's prefix: its position, then the encoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub position: Position,
    pub frame: Bytes,
}

/// Bytes of the position after the prefix: epoch (u32), offset high and low
/// halves (u32 each), big-endian.
pub const POSITION_LEN: usize = 12;

impl Published {
    /// Splits a message published with an empty prefix; `None` if it is too short.
    pub fn parse(msg: &[u8]) -> Option<Published> {
        let head = msg.get(..POSITION_LEN)?;
        let word = |i: usize| -> Option<u32> {
            Some(u32::from_be_bytes(head.get(i..i + 4)?.try_into().ok()?))
        };
        let epoch = word(0)?;
        let offset = (u64::from(word(4)?) << 32) | u64::from(word(8)?);
        Some(Published {
            position: Position { epoch, offset },
            frame: Bytes::copy_from_slice(msg.get(POSITION_LEN..)?),
        })
    }
}

/// What [`RedisHistory::append_publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendPublished {
    pub position: Position,
    /// Subscribers the message reached (Redis's `PUBLISH` reply).
    pub receivers: u64,
}

impl RedisHistory {
    /// History keeping `size` pushes per stream for `ttl` after last use.
    pub fn new(size: usize, ttl: Duration) -> RedisHistory {
        RedisHistory {
            size: size.max(1),
            ttl_secs: ttl.as_secs().max(1),
            append: Script::new(APPEND),
            append_publish: Script::new(APPEND_PUBLISH),
            since: Script::new(SINCE),
        }
    }

    /// Appends `frame` to `stream`; a missing stream is created with a new epoch
    /// when `create`, else nothing is kept and `None` returned.
    /// Pushes kept per stream.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Seconds a stream lives after its last append or read.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    pub async fn append<C: ConnectionLike>(
        &self,
        con: &mut C,
        stream: StreamRef<'_>,
        frame: &[u8],
        create: bool,
    ) -> Result<Option<Position>, RedisHistoryError> {
        let (meta, log) = stream_keys(stream);
        let reply: Value = self
            .append
            .key(&meta)
            .key(&log)
            .arg(frame)
            .arg(self.size)
            .arg(self.ttl_secs)
            .arg(u8::from(create))
            .arg(History::new_epoch())
            .invoke_async(con)
            .await
            .map_err(|source| RedisHistoryError::Redis {
                op: "append",
                stream: meta.clone(),
                source,
            })?;
        match reply {
            Value::Nil => Ok(None),
            v => {
                let n = ints(&v, 2).ok_or_else(|| bad("append", &meta, &v))?;
                Ok(Some(
                    position(n[0], n[1]).ok_or_else(|| bad("append", &meta, &v))?,
                ))
            }
        }
    }

    /// Appends `frame` to `stream` (creating it) and, in the same atomic script,
    /// publishes `prefix`, the position ([`POSITION_LEN`] bytes) and the frame on
    /// `channel`.
    pub async fn append_publish<C: ConnectionLike>(
        &self,
        con: &mut C,
        stream: StreamRef<'_>,
        frame: &[u8],
        channel: &str,
        prefix: &[u8],
    ) -> Result<AppendPublished, RedisHistoryError> {
        let (meta, log) = stream_keys(stream);
        let reply: Value = self
            .append_publish
            .key(&meta)
            .key(&log)
            .arg(frame)
            .arg(self.size)
            .arg(self.ttl_secs)
            .arg(1u8)
            .arg(History::new_epoch())
            .arg(channel)
            .arg(prefix)
            .invoke_async(con)
            .await
            .map_err(|source| RedisHistoryError::Redis {
                op: "append and publish",
                stream: meta.clone(),
                source,
            })?;
        let n = ints(&reply, 3).ok_or_else(|| bad("append and publish", &meta, &reply))?;
        Ok(AppendPublished {
            position: position(n[0], n[1])
                .ok_or_else(|| bad("append and publish", &meta, &reply))?,
            receivers: u64::try_from(n[2]).unwrap_or(0),
        })
    }

    /// Everything after `since`, or an honest "not recovered"; creates the stream
    /// if missing and marks it used.
    pub async fn since<C: ConnectionLike>(
        &self,
        con: &mut C,
        stream: StreamRef<'_>,
        since: Position,
    ) -> Result<Recovery, RedisHistoryError> {
        let (meta, log) = stream_keys(stream);
        let reply: Value = self
            .since
            .key(&meta)
            .key(&log)
            .arg(since.epoch)
            .arg(since.offset)
            .arg(self.ttl_secs)
            .arg(History::new_epoch())
            .invoke_async(con)
            .await
            .map_err(|source| RedisHistoryError::Redis {
                op: "read",
                stream: meta.clone(),
                source,
            })?;
        let Value::Array(items) = &reply else {
            return Err(bad("read", &meta, &reply));
        };
        let head = ints(&reply, 3).ok_or_else(|| bad("read", &meta, &reply))?;
        let top = position(head[0], head[1]).ok_or_else(|| bad("read", &meta, &reply))?;
        let recovered = head[2] == 1;
        let mut entries = Vec::new();
        let mut rest = items.iter().skip(3);
        while let Some(off) = rest.next() {
            let (Some(off), Some(Value::BulkString(frame))) = (int(off), rest.next()) else {
                return Err(bad("read", &meta, &reply));
            };
            let off = u64::try_from(off).map_err(|_| bad("read", &meta, &reply))?;
            entries.push((off, Bytes::copy_from_slice(frame)));
        }
        Ok(Recovery {
            top,
            recovered,
            entries: if recovered { entries } else { Vec::new() },
        })
    }
}

fn bad(op: &'static str, stream: &str, v: &Value) -> RedisHistoryError {
    let mut detail = format!("{v:?}");
    detail.truncate(200);
    RedisHistoryError::BadReply {
        op,
        stream: stream.to_owned(),
        detail,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        _ => None,
    }
}

/// The first `n` items of an array reply, as integers.
fn ints(v: &Value, n: usize) -> Option<Vec<i64>> {
    let Value::Array(items) = v else { return None };
    items
        .iter()
        .take(n)
        .map(int)
        .collect::<Option<Vec<_>>>()
        .filter(|x| x.len() == n)
}

fn position(epoch: i64, offset: i64) -> Option<Position> {
    Some(Position {
        epoch: u32::try_from(epoch).ok()?,
        offset: u64::try_from(offset).ok()?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_published_message_parses_back() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&7u32.to_be_bytes());
        msg.extend_from_slice(&1u32.to_be_bytes());
        msg.extend_from_slice(&5u32.to_be_bytes());
        msg.extend_from_slice(b"frame");
        let p = Published::parse(&msg).unwrap();
        assert_eq!(
            p.position,
            Position {
                epoch: 7,
                offset: (1 << 32) | 5
            }
        );
        assert_eq!(&p.frame[..], b"frame");
    }

    #[test]
    fn a_short_message_is_refused_not_a_panic() {
        for n in 0..POSITION_LEN {
            assert!(Published::parse(&vec![0u8; n]).is_none(), "{n} bytes");
        }
        assert!(Published::parse(&[0u8; POSITION_LEN]).is_some());
    }

    #[test]
    fn a_streams_keys_share_one_hash_slot() {
        let (m, l) = stream_keys(StreamRef::Room("live://1"));
        assert_eq!(m, "quicpush:{r:live://1}:meta");
        assert_eq!(l, "quicpush:{r:live://1}:log");
        assert_eq!(m.replace(":meta", ""), l.replace(":log", ""));
    }
}

//! Carries out one validated request against the registry. Transport-free: the
//! QUIC RPC server and the HTTP API call the same [`Dispatcher::dispatch`], which
//! counts each call once into the server's metrics.

use std::sync::Arc;

use bytes::Bytes;

use super::broadcast::Broadcaster;
use super::proto::{MultiOutcome, PushItem, Reply, Request, RoomCount, RpcError};
use crate::channel::PushOutcome;
use crate::metrics::{self, Metrics, PushCounts};
use crate::protocol::Frame;
use crate::registry::Registry;

/// Limits applied to every call.
#[derive(Debug, Clone)]
pub struct RpcLimits {
    /// Largest message body (the client body limit).
    pub max_body: usize,
    /// Most keys, user ids or messages per call.
    pub max_keys: usize,
}

/// What dispatch works on.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pub registry: Arc<Registry>,
    pub broadcaster: Broadcaster,
    pub limits: RpcLimits,
    pub metrics: Arc<Metrics>,
}

/// The frame a push sends: encoded once, shared by every recipient. Its seq is
/// stamped per connection by the writer.
fn push_frame(op: u32, body: Bytes) -> Bytes {
    Frame::new(op, 0, body).to_bytes()
}

impl Dispatcher {
    fn check_body(&self, body: &Bytes) -> Result<(), RpcError> {
        if body.len() > self.limits.max_body {
            return Err(RpcError::BodyTooLarge {
                len: body.len() as u64,
                max: self.limits.max_body as u64,
            });
        }
        Ok(())
    }

    fn check_count(&self, n: usize) -> Result<(), RpcError> {
        if n > self.limits.max_keys {
            return Err(RpcError::TooManyKeys {
                len: n as u64,
                max: self.limits.max_keys as u64,
            });
        }
        Ok(())
    }

    fn check_keys<'a>(&self, keys: impl ExactSizeIterator<Item = &'a str>) -> Result<(), RpcError> {
        let n = keys.len();
        if n == 0 {
            return Err(RpcError::EmptyKeys);
        }
        self.check_count(n)?;
        let mut keys = keys;
        if keys.any(str::is_empty) {
            return Err(RpcError::EmptyKeys);
        }
        Ok(())
    }

    /// Validates and carries out a request, and counts it.
    pub async fn dispatch(&self, req: Request) -> Result<Reply, RpcError> {
        if !self.metrics.is_enabled() {
            return self.run(req, &mut PushCounts::default()).await;
        }
        let method = metrics::method_index(&req);
        let t0 = std::time::Instant::now();
        let mut counts = PushCounts::default();
        let result = self.run(req, &mut counts).await;
        self.metrics
            .call(method, t0.elapsed(), result.is_err(), &counts);
        result
    }

    async fn run(&self, req: Request, counts: &mut PushCounts) -> Result<Reply, RpcError> {
        let r = &self.registry;
        match req {
            Request::Ping => Ok(Reply::Pong),
            Request::PushMsg { key, op, body } => {
                self.check_keys(std::iter::once(key.as_str()))?;
                self.check_body(&body)?;
                let outcome = r.push_key(&key, op, &push_frame(op, body));
                counts.add(outcome);
                Ok(Reply::Pushed(outcome))
            }
            Request::MPushMsg { keys, op, body } => {
                self.check_keys(keys.iter().map(String::as_str))?;
                self.check_body(&body)?;
                let frame = push_frame(op, body);
                Ok(Reply::Multi(multi(
                    keys.iter().map(|k| r.push_key(k, op, &frame)),
                    keys.len(),
                    counts,
                )))
            }
            Request::MPushMsgs { msgs } => {
                self.check_keys(msgs.iter().map(|m| m.key.as_str()))?;
                for m in &msgs {
                    self.check_body(&m.body)?;
                }
                let n = msgs.len();
                Ok(Reply::Multi(multi(
                    msgs.into_iter().map(|PushItem { key, op, body }| {
                        r.push_key(&key, op, &push_frame(op, body))
                    }),
                    n,
                    counts,
                )))
            }
            Request::PushUser { mids, op, body } => {
                if mids.is_empty() {
                    return Err(RpcError::EmptyMids);
                }
                self.check_count(mids.len())?;
                self.check_body(&body)?;
                let tally = r.push_users(&mids, op, &push_frame(op, body));
                counts.add_tally(&tally);
                Ok(Reply::Tally(tally))
            }
            Request::Broadcast { op, body, speed } => {
                self.check_body(&body)?;
                let online = r.online().total;
                self.broadcaster
                    .submit(op, push_frame(op, body), speed)
                    .await?;
                Ok(Reply::BroadcastAccepted { online })
            }
            Request::BroadcastRoom { room, op, body } => {
                if room.is_empty() {
                    return Err(RpcError::EmptyRoom);
                }
                self.check_body(&body)?;
                let tally = r.push_room(&room, op, &push_frame(op, body));
                counts.add_tally(&tally);
                Ok(Reply::Tally(tally))
            }
            Request::Rooms => Ok(Reply::Rooms(
                r.rooms()
                    .into_iter()
                    .map(|(room, online)| RoomCount { room, online })
                    .collect(),
            )),
            Request::Online => {
                let mut online = r.online();
                online.paced = self.broadcaster.paced_progress();
                Ok(Reply::Online(online))
            }
            Request::Kick { key } => {
                self.check_keys(std::iter::once(key.as_str()))?;
                Ok(Reply::Kicked(r.kick(&key)))
            }
        }
    }
}

/// Collects per-key outcomes; a full queue never stops the rest of the push.
fn multi(
    outcomes: impl Iterator<Item = PushOutcome>,
    n: usize,
    counts: &mut PushCounts,
) -> MultiOutcome {
    let mut v = Vec::with_capacity(n);
    let mut index = -1;
    for (i, o) in outcomes.enumerate() {
        if o == PushOutcome::Delivered {
            index = i as i64;
        }
        counts.add(o);
        v.push(o);
    }
    MultiOutcome { outcomes: v, index }
}

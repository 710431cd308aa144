//! Carries out one validated request against the registry. Transport-free: the
//! QUIC RPC server and the HTTP API call the same [`Dispatcher::dispatch`], which
//! counts each call once into the server's metrics.

use std::sync::Arc;

use bytes::Bytes;

use super::broadcast::Broadcaster;
use super::proto::{MultiOutcome, PushItem, Reply, Request, RoomCount, RpcError, Tally};
use crate::channel::PushOutcome;
use crate::cluster::envelope::{self, Envelope, KickReason};
use crate::cluster::{bus, directory, names, route, shared, Cluster};
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
    /// The tier this node is part of: every call then works tier-wide. `None`:
    /// this node only (and for calls other nodes forward here).
    pub cluster: Option<Arc<Cluster>>,
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

    /// Carries out a request on this node only, uncounted: what another node of
    /// the tier forwarded here.
    pub async fn dispatch_local(&self, req: Request) -> Result<Reply, RpcError> {
        self.run_node(req, &mut PushCounts::default()).await
    }

    async fn run(&self, req: Request, counts: &mut PushCounts) -> Result<Reply, RpcError> {
        match &self.cluster {
            Some(c) => self.run_tier(c, req, counts).await,
            None => self.run_node(req, counts).await,
        }
    }

    /// A call on this node only.
    async fn run_node(&self, req: Request, counts: &mut PushCounts) -> Result<Reply, RpcError> {
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

impl Dispatcher {
    /// The other nodes' online counts as of their last refresh (0, logged, when
    /// they cannot be read): a Broadcast's `online` for the tier.
    async fn others_online(&self, c: &Cluster) -> u64 {
        match directory::others_online_and_rooms(c).await {
            Ok((records, _)) => records
                .iter()
                .map(|r| r.get("online").copied().unwrap_or(0))
                .sum(),
            Err(e) => {
                tracing::debug!(error = %e, "broadcast online: this node's count only");
                0
            }
        }
    }

    /// `outcomes` for the keys this node did not hold (Offline, or Stored: kept
    /// in this node's history, the key's client may be on another node now):
    /// each forwarded to the node holding it, lookup and PUBLISH in one Redis
    /// script ([`route::to_owners_of`]), so calls keep their order. A Stored key
    /// that no other node takes, or that Redis cannot forward, stays Stored: it
    /// is kept here.
    async fn forward_keys(
        &self,
        c: &Cluster,
        keys: &[&str],
        outcomes: &mut [PushOutcome],
        envelope_for: impl Fn(usize) -> Envelope,
    ) {
        let missing: Vec<usize> = (0..keys.len())
            .filter(|&i| matches!(outcomes[i], PushOutcome::Offline | PushOutcome::Stored))
            .collect();
        // Not kept anywhere when it cannot be forwarded.
        let unavailable = |outcomes: &mut [PushOutcome], missing: &[usize]| {
            for &i in missing {
                if outcomes[i] == PushOutcome::Offline {
                    outcomes[i] = PushOutcome::Unavailable;
                }
            }
        };
        if missing.is_empty() {
            return;
        }
        let names: Vec<&str> = missing.iter().map(|&i| keys[i]).collect();
        let messages = match missing
            .iter()
            .map(|&i| envelope::encode(&c.id, envelope_for(i)))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a forwarded push: remote keys unavailable");
                unavailable(outcomes, &missing);
                return;
            }
        };
        match route::to_owners_of(c, &names, messages).await {
            Ok(routed) => {
                for (&i, r) in missing.iter().zip(routed) {
                    if matches!(r, route::Routed::Published(n) if n > 0) {
                        outcomes[i] = PushOutcome::Forwarded;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "forwarding failed: remote keys unavailable");
                unavailable(outcomes, &missing);
            }
        }
    }

    /// Forwards to every other node holding an entry: lookup and PUBLISH in one
    /// Redis script ([`route::where_present`]), the whole call in one envelope;
    /// on a Redis Cluster one envelope per entry, to the entry's sharded
    /// channel ([`route::to_channels`]), so `forwarded_nodes` then counts
    /// (entry, node) handovers.
    async fn forward_entries<T: Clone>(
        &self,
        c: &Cluster,
        entries: &[T],
        name: impl Fn(&T, &str) -> String,
        channel: impl Fn(&T) -> String,
        envelope_for: impl Fn(&[T]) -> Envelope,
        tally: &mut Tally,
    ) {
        let encode = |e: &[T]| envelope::encode(&c.id, envelope_for(e));
        let forwarded = if c.backend.is_cluster() {
            let batch = entries
                .iter()
                .map(|e| Ok((channel(e), encode(std::slice::from_ref(e))?)))
                .collect::<Result<Vec<_>, crate::cluster::ClusterError>>();
            match batch {
                Ok(batch) => route::to_channels(c, batch).await.map(|n| n.iter().sum()),
                Err(e) => Err(e),
            }
        } else {
            match encode(entries) {
                Ok(message) => {
                    route::where_present(c, entries, name, message)
                        .await
                        .map(|routed| {
                            routed
                                .iter()
                                .filter(|(_, r)| matches!(r, route::Routed::Published(n) if *n > 0))
                                .count() as u64
                        })
                }
                Err(e) => Err(e),
            }
        };
        match forwarded {
            Ok(n) => tally.forwarded_nodes += n,
            Err(e) => {
                tracing::debug!(error = %e, "forwarding failed: remote part unavailable");
                tally.unavailable += 1;
            }
        }
    }

    /// Key pushes with shared key history ([`shared`]): appended and routed by one
    /// script for the whole call, this node's keys included, so the stream order
    /// is the delivery order. `Forwarded`: handed to the owner's subscriber;
    /// `Stored`: kept, no live node holds the key; `Offline`: nothing kept.
    async fn shared_keys(&self, c: &Cluster, keys: &[&str], frames: &[&Bytes]) -> Vec<PushOutcome> {
        match shared::append_route(c, keys, frames).await {
            Ok(v) => v
                .into_iter()
                .map(|a| match (a.position, a.receivers) {
                    (None, _) => PushOutcome::Offline,
                    (Some(_), Some(n)) if n > 0 => PushOutcome::Forwarded,
                    (Some(_), _) => PushOutcome::Stored,
                })
                .collect(),
            Err(e) => {
                tracing::debug!(error = %e, keys = keys.len(), "shared key history unavailable");
                vec![PushOutcome::Unavailable; keys.len()]
            }
        }
    }

    /// Every call, tier-wide: the local part as on one node, the rest forwarded.
    async fn run_tier(
        &self,
        c: &Cluster,
        req: Request,
        counts: &mut PushCounts,
    ) -> Result<Reply, RpcError> {
        let mut scratch = PushCounts::default();
        match req {
            Request::PushMsg { key, op, body } if c.shares_key_history() => {
                self.check_keys(std::iter::once(key.as_str()))?;
                self.check_body(&body)?;
                let frame = push_frame(op, body);
                let o = self.shared_keys(c, &[key.as_str()], &[&frame]).await[0];
                counts.add(o);
                Ok(Reply::Pushed(o))
            }
            Request::MPushMsg { keys, op, body } if c.shares_key_history() => {
                self.check_keys(keys.iter().map(String::as_str))?;
                self.check_body(&body)?;
                let frame = push_frame(op, body);
                let names: Vec<&str> = keys.iter().map(String::as_str).collect();
                let outcomes = self
                    .shared_keys(c, &names, &vec![&frame; names.len()])
                    .await;
                Ok(Reply::Multi(multi(
                    outcomes.into_iter(),
                    names.len(),
                    counts,
                )))
            }
            Request::PushUser { mids, op, body } if c.shares_user_history() => {
                if mids.is_empty() {
                    return Err(RpcError::EmptyMids);
                }
                self.check_count(mids.len())?;
                self.check_body(&body)?;
                let frame = push_frame(op, body);
                let mut t = Tally::default();
                match shared::append_route_users(c, &mids, &frame).await {
                    Ok(v) => {
                        for a in v {
                            t.appended += u64::from(a.position.is_some());
                            t.forwarded_nodes += a.reached;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, users = mids.len(), "shared user history unavailable");
                        t.unavailable += 1;
                    }
                }
                counts.add_tally(&t);
                Ok(Reply::Tally(t))
            }
            Request::MPushMsgs { msgs } if c.shares_key_history() => {
                self.check_keys(msgs.iter().map(|m| m.key.as_str()))?;
                for m in &msgs {
                    self.check_body(&m.body)?;
                }
                let names: Vec<&str> = msgs.iter().map(|m| m.key.as_str()).collect();
                let frames: Vec<Bytes> = msgs
                    .iter()
                    .map(|m| push_frame(m.op, m.body.clone()))
                    .collect();
                let refs: Vec<&Bytes> = frames.iter().collect();
                let outcomes = self.shared_keys(c, &names, &refs).await;
                Ok(Reply::Multi(multi(
                    outcomes.into_iter(),
                    names.len(),
                    counts,
                )))
            }
            Request::PushMsg { key, op, body } => {
                let Reply::Pushed(o) = self
                    .run_node(
                        Request::PushMsg {
                            key: key.clone(),
                            op,
                            body: body.clone(),
                        },
                        &mut scratch,
                    )
                    .await?
                else {
                    return Err(RpcError::Internal("unexpected local reply".into()));
                };
                let mut outcomes = [o];
                self.forward_keys(c, &[key.as_str()], &mut outcomes, |_| Envelope::PushKeys {
                    keys: vec![key.clone()],
                    op,
                    body: body.clone(),
                })
                .await;
                counts.add(outcomes[0]);
                Ok(Reply::Pushed(outcomes[0]))
            }
            Request::MPushMsg { keys, op, body } => {
                let Reply::Multi(m) = self
                    .run_node(
                        Request::MPushMsg {
                            keys: keys.clone(),
                            op,
                            body: body.clone(),
                        },
                        &mut scratch,
                    )
                    .await?
                else {
                    return Err(RpcError::Internal("unexpected local reply".into()));
                };
                let mut outcomes = m.outcomes;
                let names: Vec<&str> = keys.iter().map(String::as_str).collect();
                self.forward_keys(c, &names, &mut outcomes, |i| Envelope::PushKeys {
                    keys: vec![keys[i].clone()],
                    op,
                    body: body.clone(),
                })
                .await;
                let n = outcomes.len();
                Ok(Reply::Multi(multi(outcomes.into_iter(), n, counts)))
            }
            Request::MPushMsgs { msgs } => {
                let Reply::Multi(m) = self
                    .run_node(Request::MPushMsgs { msgs: msgs.clone() }, &mut scratch)
                    .await?
                else {
                    return Err(RpcError::Internal("unexpected local reply".into()));
                };
                let mut outcomes = m.outcomes;
                let names: Vec<&str> = msgs.iter().map(|m| m.key.as_str()).collect();
                self.forward_keys(c, &names, &mut outcomes, |i| Envelope::PushItems {
                    msgs: vec![msgs[i].clone()],
                })
                .await;
                let n = outcomes.len();
                Ok(Reply::Multi(multi(outcomes.into_iter(), n, counts)))
            }
            Request::PushUser { mids, op, body } => {
                let Reply::Tally(mut t) = self
                    .run_node(
                        Request::PushUser {
                            mids: mids.clone(),
                            op,
                            body: body.clone(),
                        },
                        &mut scratch,
                    )
                    .await?
                else {
                    return Err(RpcError::Internal("unexpected local reply".into()));
                };
                self.forward_entries(
                    c,
                    &mids,
                    |mid, node| names::user(*mid, node),
                    |mid| names::user_channel(*mid),
                    |mids| Envelope::PushUsers {
                        mids: mids.to_vec(),
                        op,
                        body: body.clone(),
                    },
                    &mut t,
                )
                .await;
                counts.add_tally(&t);
                Ok(Reply::Tally(t))
            }
            Request::BroadcastRoom { room, op, body } if c.shares_room_history() => {
                if room.is_empty() {
                    return Err(RpcError::EmptyRoom);
                }
                self.check_body(&body)?;
                // Appended to the room's shared stream and routed by one script;
                // every node with members (this one too) queues it from the bus.
                let frame = push_frame(op, body);
                let mut t = Tally::default();
                match shared::append_route_room(c, &room, &frame).await {
                    Ok(a) => {
                        t.appended = u64::from(a.position.is_some());
                        t.forwarded_nodes = a.reached;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, room = %room, "shared room history unavailable");
                        t.unavailable += 1;
                    }
                }
                counts.add_tally(&t);
                Ok(Reply::Tally(t))
            }
            Request::BroadcastRoom { room, op, body } => {
                let Reply::Tally(mut t) = self
                    .run_node(
                        Request::BroadcastRoom {
                            room: room.clone(),
                            op,
                            body: body.clone(),
                        },
                        &mut scratch,
                    )
                    .await?
                else {
                    return Err(RpcError::Internal("unexpected local reply".into()));
                };
                self.forward_entries(
                    c,
                    std::slice::from_ref(&room),
                    |room, node| names::room(room, node),
                    |room| names::room_channel(room),
                    |_| Envelope::Room {
                        room: room.clone(),
                        op,
                        body: body.clone(),
                    },
                    &mut t,
                )
                .await;
                counts.add_tally(&t);
                Ok(Reply::Tally(t))
            }
            Request::Broadcast { op, body, speed: 0 } if c.shares_all_history() => {
                self.check_body(&body)?;
                // Appended to the tier's broadcast stream and published by one
                // script; every node (this one too) fans it out from the bus.
                let frame = push_frame(op, body);
                shared::append_route_all(c, &frame)
                    .await
                    .map_err(|e| RpcError::Cluster {
                        reason: format!("broadcast not appended to the shared history: {e}"),
                    })?;
                let online = self.registry.online().total + self.others_online(c).await;
                Ok(Reply::BroadcastAccepted { online })
            }
            Request::Broadcast { op, body, speed } => {
                let reply = self
                    .run_node(
                        Request::Broadcast {
                            op,
                            body: body.clone(),
                            speed,
                        },
                        &mut scratch,
                    )
                    .await?;
                if let Err(e) = bus::publish_all(c, Envelope::Broadcast { op, body, speed }).await {
                    tracing::warn!(error = %e, "broadcast reached this node only: Redis unavailable");
                    return Ok(reply);
                }
                // `online` for the tier: the other nodes' counts as of their last
                // refresh (this node's alone if they cannot be read).
                let Reply::BroadcastAccepted { online } = reply else {
                    return Ok(reply);
                };
                Ok(Reply::BroadcastAccepted {
                    online: online + self.others_online(c).await,
                })
            }
            Request::Rooms => {
                let mut rooms: std::collections::HashMap<String, u64> =
                    self.registry.rooms().into_iter().collect();
                let (_, remote) =
                    directory::others_online_and_rooms(c)
                        .await
                        .map_err(|e| RpcError::Cluster {
                            reason: e.to_string(),
                        })?;
                for (room, n) in remote {
                    *rooms.entry(room).or_default() += n;
                }
                let mut v: Vec<RoomCount> = rooms
                    .into_iter()
                    .map(|(room, online)| RoomCount { room, online })
                    .collect();
                v.sort_by(|a, b| a.room.cmp(&b.room));
                Ok(Reply::Rooms(v))
            }
            Request::Online => {
                let Reply::Online(mut o) = self.run_node(Request::Online, &mut scratch).await?
                else {
                    return Err(RpcError::Internal("unexpected local reply".into()));
                };
                let (records, _) =
                    directory::others_online_and_rooms(c)
                        .await
                        .map_err(|e| RpcError::Cluster {
                            reason: e.to_string(),
                        })?;
                for rec in records {
                    let n = |k: &str| rec.get(k).copied().unwrap_or(0);
                    o.total += n("online");
                    o.tcp += n("tcp");
                    o.quic += n("quic");
                    o.tls += n("tls");
                    o.ws += n("ws");
                    o.wss += n("wss");
                }
                Ok(Reply::Online(o))
            }
            Request::Kick { key } => {
                let reply = self
                    .run_node(Request::Kick { key: key.clone() }, &mut scratch)
                    .await?;
                if reply == Reply::Kicked(true) {
                    return Ok(reply);
                }
                let owner =
                    directory::owners(c, &[key.as_str()])
                        .await
                        .map_err(|e| RpcError::Cluster {
                            reason: e.to_string(),
                        })?;
                let Some(Some(node)) = owner.into_iter().next() else {
                    return Ok(Reply::Kicked(false));
                };
                let e = Envelope::Kick {
                    key,
                    reason: KickReason::Kicked,
                    conn: u64::MAX,
                    new_node: String::new(),
                };
                let n = bus::publish(c, vec![(node, e)])
                    .await
                    .map_err(|e| RpcError::Cluster {
                        reason: e.to_string(),
                    })?;
                Ok(Reply::Kicked(n.first().is_some_and(|&n| n > 0)))
            }
            other => self.run_node(other, counts).await,
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

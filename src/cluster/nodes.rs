//! Node records: `quicpush:{nodes}:node:<id>` (a hash: id, addresses,
//! started-at, online counts) with `EXPIRE ttl`, and the sorted set
//! `quicpush:{nodes}` (member id, score = the record's expiry in unix ms; one
//! hash tag, so a refresh's pipeline is one slot on a Redis Cluster), so the live nodes are
//! `ZRANGEBYSCORE now +inf`. A node that stops refreshing is dead for everyone
//! within the TTL. The refresher also rewrites the directory and reads the
//! other nodes' room counts each tick.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{directory, names, now_ms, Cluster, ClusterError};

/// One live node, as `quicpush nodes` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub client: String,
    pub rpc: String,
    pub started_ms: u64,
    pub online: u64,
    /// Unix ms at which the record expires unless refreshed.
    pub expires_ms: u64,
    /// Every field, for the online counts per transport.
    pub fields: HashMap<String, String>,
}

/// Writes this node's record and reads the live nodes: one pipeline.
pub async fn register(c: &Cluster) -> Result<Vec<String>, ClusterError> {
    let now = now_ms();
    let expires = now + c.ttl.as_millis() as u64;
    let o = c.registry.online();
    let key = names::node(&c.id);
    let mut p = redis::pipe();
    p.cmd("HSET")
        .arg(&key)
        .arg("id")
        .arg(&c.id)
        .arg("client")
        .arg(&c.advertise_client)
        .arg("rpc")
        .arg(&c.advertise_rpc)
        .arg("started_ms")
        .arg(c.started_ms)
        .arg("online")
        .arg(o.total)
        .arg("tcp")
        .arg(o.tcp)
        .arg("quic")
        .arg(o.quic)
        .arg("tls")
        .arg(o.tls)
        .arg("ws")
        .arg(o.ws)
        .arg("wss")
        .arg(o.wss)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(c.ttl.as_millis() as u64)
        .ignore()
        .cmd("ZADD")
        .arg(names::NODES)
        .arg(expires)
        .arg(&c.id)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(names::NODES)
        .arg("-inf")
        .arg(format!("({now}"))
        .ignore()
        .cmd("ZRANGEBYSCORE")
        .arg(names::NODES)
        .arg(now)
        .arg("+inf");
    let (live,): (Vec<String>,) = p.query_async(&mut c.backend.con()).await?;
    Ok(live)
}

/// Every `refresh`: the node record, the live nodes, the whole directory, the
/// other nodes' room counts. Failures are logged and retried at the next tick.
pub async fn refresher(c: Arc<Cluster>) {
    let mut tick = tokio::time::interval(c.refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    // Scripts are loaded by the first refresh and by the first after a failure.
    let mut scripts_loaded = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = c.halted().cancelled() => return,
        }
        let r = async {
            let live = register(&c).await?;
            *c.live.write() = Arc::new(live);
            if !scripts_loaded || !healthy {
                super::load_scripts(&c).await?;
            }
            directory::rewrite(&c).await?;
            if healthy {
                super::subs::reconcile(&c).await?;
            } else {
                super::subs::resubscribe(&c).await?;
            }
            directory::read_remote_rooms(&c).await
        };
        match tokio::time::timeout(c.refresh.max(Duration::from_secs(1)), r).await {
            Ok(Ok(())) => {
                scripts_loaded = true;
                if !healthy {
                    info!(node = %c.id, "Redis reachable again: node record and directory rewritten");
                }
                healthy = true;
            }
            Ok(Err(e)) => {
                if healthy {
                    warn!(node = %c.id, error = %e, "cluster refresh failed; retrying every refresh");
                }
                healthy = false;
            }
            Err(_) => {
                if healthy {
                    warn!(node = %c.id, "cluster refresh timed out; retrying every refresh");
                }
                healthy = false;
            }
        }
    }
}

/// The live nodes of the tier on the Redis at `target`, oldest first.
pub async fn list(target: &crate::config::RedisTarget) -> Result<Vec<NodeRecord>, ClusterError> {
    let (_, backend) = super::connect(target)?;
    let mut con = backend.con();
    let now = now_ms();
    let ids: Vec<(String, u64)> = redis::cmd("ZRANGEBYSCORE")
        .arg(names::NODES)
        .arg(now)
        .arg("+inf")
        .arg("WITHSCORES")
        .query_async(&mut con)
        .await?;
    let mut p = redis::pipe();
    for (id, _) in &ids {
        p.cmd("HGETALL").arg(names::node(id));
    }
    let records: Vec<HashMap<String, String>> = if ids.is_empty() {
        Vec::new()
    } else {
        p.query_async(&mut con).await?
    };
    let mut out: Vec<NodeRecord> = ids
        .into_iter()
        .zip(records)
        .filter(|(_, f)| !f.is_empty())
        .map(|((id, expires_ms), fields)| {
            let num = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
            NodeRecord {
                client: fields.get("client").cloned().unwrap_or_default(),
                rpc: fields.get("rpc").cloned().unwrap_or_default(),
                started_ms: num("started_ms"),
                online: num("online"),
                expires_ms,
                id,
                fields,
            }
        })
        .collect();
    out.sort_by_key(|n| n.started_ms);
    Ok(out)
}

//! Three nodes on one Redis, and waiting for the tier to settle.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use quicpush::client::PushClient;

use quicpush::config::RedisTarget;

use crate::common::redis::{RedisCluster, RedisServer};
use crate::common::TestServer;

pub const TTL: Duration = Duration::from_secs(2);
pub const REFRESH: Duration = Duration::from_millis(400);

/// The tier's Redis: one server, or a three-master Redis Cluster.
pub enum TierRedis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl TierRedis {
    /// What the nodes' `cluster.redis` names.
    pub fn target(&self) -> RedisTarget {
        match self {
            TierRedis::One(r) => RedisTarget::One(r.url()),
            TierRedis::Cluster(c) => RedisTarget::Cluster(c.urls()),
        }
    }

    /// Kills the server, or every master of the cluster (SIGKILL).
    pub fn kill(&mut self) {
        match self {
            TierRedis::One(r) => r.kill(),
            TierRedis::Cluster(c) => c.kill(),
        }
    }

    /// Starts it again on the same port(s), empty.
    pub fn restart(&mut self) {
        match self {
            TierRedis::One(r) => r.restart(),
            TierRedis::Cluster(c) => c.restart(),
        }
    }
}

pub struct Tier {
    pub redis: TierRedis,
    pub nodes: Vec<TestServer>,
}

impl Tier {
    pub async fn start(n: usize) -> Tier {
        Self::start_with(n, |_| {}).await
    }

    /// `n` nodes, each with `tweak`'s changes to its configuration.
    pub async fn start_with(n: usize, tweak: impl Fn(&mut quicpush::Config)) -> Tier {
        Self::start_on(TierRedis::One(RedisServer::start()), n, tweak).await
    }

    /// `n` nodes on a three-master Redis Cluster.
    pub async fn start_cluster_with(n: usize, tweak: impl Fn(&mut quicpush::Config)) -> Tier {
        Self::start_on(TierRedis::Cluster(RedisCluster::start()), n, tweak).await
    }

    async fn start_on(redis: TierRedis, n: usize, tweak: impl Fn(&mut quicpush::Config)) -> Tier {
        let mut nodes = Vec::new();
        for i in 0..n {
            let url = redis.target();
            let tweak = &tweak;
            let config = move |c: &mut quicpush::Config| {
                c.cluster.redis = Some(url);
                c.cluster.node_id = Some(format!("n{i}"));
                c.cluster.ttl = TTL;
                c.cluster.refresh = Some(REFRESH);
                tweak(c);
            };
            // One token secret and CA for the tier: a client's token works on
            // every node.
            let node = match nodes.first() {
                None => TestServer::start_with(config).await,
                Some(first) => TestServer::start_beside(first, config).await,
            };
            nodes.push(node);
        }
        let t = Tier { redis, nodes };
        t.wait_all_live().await;
        t
    }

    /// Until every node sees every other node live.
    pub async fn wait_all_live(&self) {
        let n = self.nodes.len();
        wait_for("every node sees the others", || async {
            self.nodes
                .iter()
                .all(|s| s.cluster.as_ref().unwrap().others().len() == n - 1)
        })
        .await;
    }

    /// A command connection to the test's Redis.
    pub async fn redis(&self) -> quicpush::cluster::Con {
        let (_, b) = quicpush::cluster::connect(&self.redis.target()).unwrap();
        b.con()
    }

    /// The directory entry of `key` (`<node>/<conn>`), if any.
    pub async fn owner(&self, key: &str) -> Option<String> {
        let mut con = self.redis().await;
        redis::cmd("GET")
            .arg(quicpush::cluster::names::key(key))
            .query_async(&mut con)
            .await
            .unwrap_or(None)
    }

    /// Until the directory says node `node` holds `key`.
    pub async fn wait_owner(&self, key: &str, node: usize) {
        let want = format!("n{node}/");
        wait_for(&format!("{key} on n{node}"), || async {
            self.owner(key).await.is_some_and(|v| v.starts_with(&want))
        })
        .await;
    }

    pub async fn stop(self) {
        for n in self.nodes {
            n.stop().await;
        }
    }
}

/// Polls `cond` every 50 ms for at most 10 s.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let t0 = std::time::Instant::now();
    while !cond().await {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every push body `c` receives until it is quiet for 600 ms, sorted.
pub async fn drain_bodies(c: &mut PushClient) -> Vec<Bytes> {
    drain_bodies_quiet(c, Duration::from_millis(600)).await
}

/// Every push body `c` receives until it is quiet for `quiet`, sorted.
pub async fn drain_bodies_quiet(c: &mut PushClient, quiet: Duration) -> Vec<Bytes> {
    let mut v = Vec::new();
    while let Ok(f) = tokio::time::timeout(quiet, c.next_frame()).await {
        match f {
            Ok(Some(f)) if f.op == 1000 => v.push(f.body),
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    v.sort();
    v
}

pub fn bodies(v: &[&'static str]) -> Vec<Bytes> {
    let mut v: Vec<Bytes> = v.iter().map(|s| Bytes::from_static(s.as_bytes())).collect();
    v.sort();
    v
}

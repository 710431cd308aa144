//! `quicpush bench --nodes N`: a tier of N nodes on this machine, sharing a
//! redis-server the bench starts, measured beside one node with the same clients
//! in the same run.
//!
//! - room: clients spread over every node in turn; the backend pushes through
//!   node 0, which fans out to its own members and publishes to the others.
//! - keys: clients on nodes 1.. only, so every push by key goes to a remote node;
//!   `--rate` paces it, for the latency of a forwarded push.
//!
//! The Redis commands the tier ran during the pushes (`INFO commandstats`,
//! before and after) are reported per push, by command.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::process::{bench_config, ServerProcess};
use super::redis::{RedisCluster, RedisServer};
use super::{BenchError, BenchOptions, Measurement};

/// What a tier run adds to the report.
#[derive(Debug, Clone, Serialize)]
pub struct TierReport {
    pub nodes: usize,
    /// The same scenario and clients against one node, in the same run.
    pub single_node: Measurement,
    /// Tier deliveries/s over the single node's.
    pub ratio_to_single: Option<f64>,
    /// Tier p99 latency minus the single node's, µs (when both have latencies).
    pub p99_delta_us: Option<i64>,
    /// Redis commands per backend push during the tier's pushes, by command.
    pub redis_calls_per_push: BTreeMap<String, f64>,
    /// All Redis commands per backend push.
    pub redis_calls_per_push_total: f64,
    /// Backend pushes (calls' messages) the tier run sent.
    pub pushes: u64,
}

/// The tier's Redis: one server, or a three-master Redis Cluster.
pub enum BenchRedis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl BenchRedis {
    /// What the nodes' `cluster.redis` names.
    pub fn target(&self) -> crate::config::RedisTarget {
        match self {
            BenchRedis::One(r) => r.url().into(),
            BenchRedis::Cluster(c) => c.urls().into(),
        }
    }

    /// Calls of each command so far, summed over the cluster's masters.
    pub fn command_calls(&self) -> std::collections::BTreeMap<String, u64> {
        match self {
            BenchRedis::One(r) => r.command_calls(),
            BenchRedis::Cluster(c) => {
                let mut sum = std::collections::BTreeMap::new();
                for n in &c.nodes {
                    for (k, v) in n.command_calls() {
                        *sum.entry(k).or_default() += v;
                    }
                }
                sum
            }
        }
    }
}

/// The nodes of a tier and their Redis.
pub struct Tier {
    pub redis: BenchRedis,
    pub nodes: Vec<ServerProcess>,
}

impl Tier {
    /// Starts redis-server and `n` nodes sharing `dir`'s certificates (each with
    /// its own config file in `dir/node-<i>`).
    pub fn start(
        opts: &BenchOptions,
        exe: &Path,
        dir: &Path,
        n: usize,
        metrics: bool,
    ) -> Result<Tier, BenchError> {
        let redis = if opts.redis_cluster {
            BenchRedis::Cluster(RedisCluster::start()?)
        } else {
            BenchRedis::One(RedisServer::start()?)
        };
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mut config = bench_config(dir);
            config.client.tcp_send_buffer = opts.tcp_send_buffer;
            config.client.write_coalesce = opts.write_coalesce;
            config.metrics.enabled = metrics;
            opts.history.apply(&mut config.history);
            if opts.scenario == super::Scenario::NodeLoss {
                config.history.store = crate::config::HistoryStoreKind::Redis;
            }
            config.cluster.redis = Some(redis.target());
            config.cluster.node_id = Some(format!("bench-{i}"));
            config.cluster.ttl = match (opts.cluster_ttl, opts.scenario) {
                (Some(ttl), _) => ttl,
                (None, super::Scenario::NodeLoss) => Duration::from_secs(3),
                (None, _) => config.cluster.ttl,
            };
            // The nodes share this machine's cores: about cores ÷ nodes each
            // (README › Running several nodes › Sizing).
            config.runtime.worker_threads =
                (crate::config::RuntimeConfig::default().workers() / n).max(1);
            let node_dir = dir.join(format!("node-{i}"));
            std::fs::create_dir_all(&node_dir)
                .map_err(|e| BenchError::Io(format!("{}: {e}", node_dir.display())))?;
            nodes.push(ServerProcess::quicpush_with(exe, &node_dir, &config)?);
        }
        Ok(Tier { redis, nodes })
    }

    pub fn stop(self) {
        for n in self.nodes {
            n.stop();
        }
    }
}

impl TierReport {
    /// The rows the report's table adds.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<26} {:>20.0}\n",
            "one node: deliveries/s", self.single_node.deliveries_per_sec
        );
        if let Some(l) = self.single_node.latency_us {
            s.push_str(&format!(
                "{:<26} {:>20}\n",
                "one node: p50/p99 µs",
                format!("{} / {}", l.p50, l.p99)
            ));
        }
        if let Some(r) = self.ratio_to_single {
            s.push_str(&format!(
                "{:<26} {:>20.3}\n",
                format!("{} nodes / one node", self.nodes),
                r
            ));
        }
        if let Some(d) = self.p99_delta_us {
            s.push_str(&format!("{:<26} {:>20}\n", "p99 tier - one node µs", d));
        }
        let calls: Vec<String> = self
            .redis_calls_per_push
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        s.push_str(&format!(
            "{:<26} {:>20.2}  ({})\n",
            "Redis calls per push",
            self.redis_calls_per_push_total,
            calls.join(", ")
        ));
        s
    }
}

/// Commands run between `push_before` and `push_after` (over `push_secs`), less
/// what ran at rest between `rest_before` and `rest_after` (over `rest_secs`)
/// scaled to as long; never below zero.
pub fn net_calls(
    rest_before: &BTreeMap<String, u64>,
    rest_after: &BTreeMap<String, u64>,
    rest_secs: f64,
    push_before: &BTreeMap<String, u64>,
    push_after: &BTreeMap<String, u64>,
    push_secs: f64,
) -> BTreeMap<String, f64> {
    let delta = |a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>, name: &str| {
        b.get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(a.get(name).copied().unwrap_or(0)) as f64
    };
    push_after
        .keys()
        .filter(|name| *name != "info")
        .filter_map(|name| {
            let busy = delta(push_before, push_after, name);
            let idle = delta(rest_before, rest_after, name) * push_secs / rest_secs.max(1e-9);
            let net = (busy - idle).max(0.0);
            (net > 0.0).then(|| (name.clone(), net))
        })
        .collect()
}

/// Redis command calls between two `INFO commandstats` readings, per push.
pub fn calls_per_push(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    pushes: u64,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .filter_map(|(name, &n)| {
            let d = n.saturating_sub(before.get(name).copied().unwrap_or(0));
            // `info` itself is the reading, not the tier's work.
            (d > 0 && name != "info").then(|| (name.clone(), d as f64 / pushes.max(1) as f64))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_rate_is_taken_off() {
        let r0 = BTreeMap::from([("evalsha".to_owned(), 100)]);
        let r1 = BTreeMap::from([("evalsha".to_owned(), 120)]);
        let p1 = BTreeMap::from([("evalsha".to_owned(), 200), ("mget".to_owned(), 50)]);
        // 20 at rest in 2 s = 10/s; 80 during 4 s of pushing, 40 of them rest.
        let n = net_calls(&r0, &r1, 2.0, &r1, &p1, 4.0);
        assert_eq!(n.get("evalsha"), Some(&40.0));
        assert_eq!(n.get("mget"), Some(&50.0));
    }

    #[test]
    fn counts_only_what_ran_between_the_readings() {
        let before = BTreeMap::from([("get".to_owned(), 5), ("publish".to_owned(), 1)]);
        let after = BTreeMap::from([
            ("get".to_owned(), 25),
            ("publish".to_owned(), 11),
            ("info".to_owned(), 2),
            ("mget".to_owned(), 10),
        ]);
        let m = calls_per_push(&before, &after, 10);
        assert_eq!(m.get("get"), Some(&2.0));
        assert_eq!(m.get("publish"), Some(&1.0));
        assert_eq!(m.get("mget"), Some(&1.0));
        assert!(!m.contains_key("info"));
    }
}

//! Redis for tests: the bench's redis-server child ([`quicpush::bench::redis`]),
//! started on a free loopback port and stopped (its own pid) when dropped. The
//! tests need the `redis-server` package; `.ci/run` installs it.
#![allow(dead_code)]

use quicpush::bench::redis as child;

/// One redis-server; a failure to start it fails the test with the reason.
pub struct RedisServer(pub child::RedisServer);

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer(child::RedisServer::start().expect("redis-server starts"))
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    /// Kills it (SIGKILL), as a crash.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.0.restart().expect("redis-server restarts");
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.0.cli(args)
    }
}

/// A three-master Redis Cluster.
pub struct RedisCluster(pub child::RedisCluster);

impl RedisCluster {
    pub fn start() -> RedisCluster {
        RedisCluster(child::RedisCluster::start().expect("a Redis Cluster starts"))
    }

    pub fn urls(&self) -> Vec<String> {
        self.0.urls()
    }

    pub fn nodes(&self) -> &[child::RedisServer] {
        &self.0.nodes
    }

    /// Kills every master (SIGKILL), as a crash.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Starts every master again on its port, empty, and waits for state ok.
    pub fn restart(&mut self) {
        self.0.restart().expect("the Redis Cluster restarts");
    }
}

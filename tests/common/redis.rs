//! Redis for tests: the bench's redis-server child ([`quicpush::bench::redis`]),
//! started on a free loopback port and stopped when dropped. `.ci/run` installs
//! the `redis-server` package.

#[allow(unused_imports)]
pub use quicpush::bench::redis::{RedisCluster, RedisServer};

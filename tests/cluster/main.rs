//! Several nodes as one push tier on one Redis: three in-process nodes (servers
//! bound on port 0) sharing a `redis-server` started for the test, with a short
//! TTL so dead nodes vanish quickly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../common/mod.rs"]
mod common;

mod tier;

mod dead;
mod node_loss;
mod pipeline;
mod pushes;
mod redis_cluster;
mod redis_down;
mod replace;
mod rooms;
mod shared;

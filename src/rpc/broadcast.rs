//! Broadcast fan-out: a fixed set of workers, each owning a stride of buckets and a
//! bounded, ordered job queue. A broadcast is accepted once every worker has queued
//! it, so two broadcasts reach each client in the order they were accepted, and a
//! backend that broadcasts faster than the node can deliver waits instead of
//! growing a queue.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use crate::registry::Registry;

/// Broadcasts queued per worker before a caller waits.
const QUEUE: usize = 64;
/// Channels pushed per tick of a paced broadcast.
const PACE_CHUNK: usize = 64;

#[derive(Clone)]
struct Job {
    op: u32,
    frame: Bytes,
    /// Messages per second for this worker; 0 = no limit.
    rate: f64,
}

/// Handle to the broadcast workers.
#[derive(Clone, Debug)]
pub struct Broadcaster {
    workers: Vec<mpsc::Sender<Job>>,
}

impl Broadcaster {
    /// Starts `workers` workers over the registry's buckets. They stop when every
    /// handle is dropped and their queues are drained.
    pub fn start(registry: Arc<Registry>, workers: usize) -> Self {
        let n = workers.clamp(1, registry.bucket_count());
        let mut senders = Vec::with_capacity(n);
        for w in 0..n {
            let (tx, rx) = mpsc::channel(QUEUE);
            senders.push(tx);
            let buckets: Vec<usize> = (w..registry.bucket_count()).step_by(n).collect();
            tokio::spawn(run_worker(registry.clone(), buckets, rx));
        }
        Broadcaster { workers: senders }
    }

    /// Queues a broadcast on every worker. `speed` is the node-wide limit in
    /// messages per second (0 = none). Returns false if the workers are gone.
    pub async fn submit(&self, op: u32, frame: Bytes, speed: u32) -> bool {
        let rate = if speed == 0 {
            0.0
        } else {
            speed as f64 / self.workers.len() as f64
        };
        let job = Job { op, frame, rate };
        for w in &self.workers {
            if w.send(job.clone()).await.is_err() {
                return false;
            }
        }
        true
    }
}

async fn run_worker(registry: Arc<Registry>, buckets: Vec<usize>, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.recv().await {
        if job.rate <= 0.0 {
            let mut delivered = 0;
            for &b in &buckets {
                delivered += registry.push_bucket(b, job.op, &job.frame).delivered;
            }
            debug!(op = job.op, delivered, "broadcast slice done");
            continue;
        }
        // Paced: snapshot each bucket's channels (never hold its lock while waiting).
        let tick = Duration::from_secs_f64(PACE_CHUNK as f64 / job.rate);
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for &b in &buckets {
            let chans = registry.bucket_channels(b, job.op);
            for chunk in chans.chunks(PACE_CHUNK) {
                interval.tick().await;
                for ch in chunk {
                    ch.try_push(&job.frame);
                }
            }
        }
    }
}

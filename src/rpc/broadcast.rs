//! Broadcast fan-out: a fixed set of workers, each owning a stride of buckets and a
//! bounded, ordered job queue. A broadcast is accepted once every worker has queued
//! it, so two broadcasts reach each client in the order they were accepted, and a
//! backend that broadcasts faster than the node can deliver waits instead of
//! growing a queue. Paced broadcasts (a messages/s limit) run on tasks of their own,
//! at most 16 at once.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tracing::debug;

use super::proto::RpcError;
use crate::protocol::{PushMeta, Source};
use crate::registry::Registry;

/// Broadcasts queued per worker before a caller waits.
const QUEUE: usize = 64;
/// Channels pushed per tick of a paced broadcast.
const PACE_CHUNK: usize = 64;
/// Paced broadcasts running at once; beyond, a paced broadcast is refused as busy.
const MAX_PACED: usize = 16;

#[derive(Clone)]
struct Job {
    op: u32,
    frame: Bytes,
    meta: PushMeta,
}

/// Handle to the broadcast workers.
#[derive(Clone, Debug)]
pub struct Broadcaster {
    workers: Vec<mpsc::Sender<Job>>,
    registry: Arc<Registry>,
    paced: Arc<Semaphore>,
    /// Held from a broadcast's history append until every worker has queued it, so
    /// broadcast offsets are delivery order on every worker.
    order: Arc<tokio::sync::Mutex<()>>,
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
        Broadcaster {
            workers: senders,
            registry,
            paced: Arc::new(Semaphore::new(MAX_PACED)),
            order: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Queues a broadcast on every worker, waiting for room. With a `speed` (node-wide
    /// messages per second) the broadcast instead runs on a task of its own, so a
    /// slow broadcast never holds up the others; it then keeps no order with them,
    /// and so is never kept in history either.
    pub async fn submit(&self, op: u32, frame: Bytes, speed: u32) -> Result<(), RpcError> {
        if speed > 0 {
            let permit = self.paced.clone().try_acquire_owned().map_err(|_| {
                RpcError::Busy(format!("{MAX_PACED} paced broadcasts are already running"))
            })?;
            let registry = self.registry.clone();
            tokio::spawn(async move {
                paced(&registry, op, &frame, speed as f64).await;
                drop(permit);
            });
            return Ok(());
        }
        // An async mutex: waiting for a worker's queue is the point of holding it.
        let _order = self.order.lock().await;
        let meta = self.registry.append_broadcast(&frame);
        let job = Job { op, frame, meta };
        for w in &self.workers {
            if w.send(job.clone()).await.is_err() {
                return Err(RpcError::ShuttingDown);
            }
        }
        Ok(())
    }
}

/// Pushes to every channel at `rate` messages per second, snapshotting each bucket's
/// channels so that no lock is held while it waits.
async fn paced(registry: &Registry, op: u32, frame: &Bytes, rate: f64) {
    let tick = Duration::from_secs_f64(PACE_CHUNK as f64 / rate);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut delivered = 0u64;
    for b in 0..registry.bucket_count() {
        let chans = registry.bucket_channels(b, op);
        for chunk in chans.chunks(PACE_CHUNK) {
            interval.tick().await;
            for ch in chunk {
                if ch.try_push(frame, PushMeta::untracked(Source::All))
                    == crate::channel::PushOutcome::Delivered
                {
                    delivered += 1;
                }
            }
        }
    }
    debug!(op, delivered, "paced broadcast done");
}

async fn run_worker(registry: Arc<Registry>, buckets: Vec<usize>, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.recv().await {
        let mut delivered = 0;
        for &b in &buckets {
            delivered += registry
                .push_bucket(b, job.op, &job.frame, job.meta)
                .delivered;
        }
        debug!(op = job.op, delivered, "broadcast slice done");
    }
}

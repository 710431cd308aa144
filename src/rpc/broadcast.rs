//! Broadcast fan-out: a fixed set of workers, each owning a stride of buckets and a
//! bounded, ordered job queue. A broadcast is accepted once every worker has queued
//! it, so two broadcasts reach each client in the order they were accepted, and a
//! backend that broadcasts faster than the node can deliver waits instead of
//! growing a queue.
//!
//! Paced broadcasts (a messages/s limit) run on tasks of their own, at most 16 at
//! once, each bounded in time: one whose speed would take longer than
//! `rpc.paced_max_duration` over the channels online is refused, and one still
//! running that long (clients joined meanwhile) is stopped. They run on a task
//! tracker the server waits for at shutdown, and shutdown *cancels* them: the
//! channels they have yet to reach are being closed anyway, so finishing would only
//! delay the exit. `Online` lists the ones running with their progress.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use super::proto::{PacedProgress, PushOutcome, RpcError};
use crate::protocol::{PushMeta, Source};
use crate::registry::Registry;
use crate::shutdown::Shutdown;

/// Broadcasts queued per worker before a caller waits.
const QUEUE: usize = 64;
/// Most channels pushed per tick of a paced broadcast; slower ones push fewer per
/// tick (a tenth of their speed, at least one) so they stay smooth.
const PACE_CHUNK: u32 = 64;
/// Paced broadcasts running at once; beyond, a paced broadcast is refused as busy.
const MAX_PACED: usize = 16;

#[derive(Clone)]
struct Job {
    op: u32,
    frame: Bytes,
    meta: PushMeta,
    /// Appended by the tier's shared history: channels take it only as their
    /// broadcast stream's next offset ([`Registry::push_bucket_at`]).
    shared: bool,
}

/// One running paced broadcast, as `Online` reports it.
#[derive(Debug)]
struct PacedRun {
    op: u32,
    speed: u32,
    /// Channels online when it was accepted.
    planned: u64,
    visited: AtomicU64,
    delivered: AtomicU64,
    started: Instant,
}

impl PacedRun {
    fn progress(&self) -> PacedProgress {
        PacedProgress {
            op: self.op,
            speed: self.speed,
            delivered: self.delivered.load(Ordering::Relaxed),
            remaining: self
                .planned
                .saturating_sub(self.visited.load(Ordering::Relaxed)),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        }
    }
}

/// Handle to the broadcast workers.
#[derive(Clone, Debug)]
pub struct Broadcaster {
    workers: Vec<mpsc::Sender<Job>>,
    registry: Arc<Registry>,
    paced: Arc<Semaphore>,
    /// The paced broadcasts running (at most [`MAX_PACED`]), oldest first. A plain
    /// mutex, held only to add, remove or list; never across an `.await`.
    running: Arc<parking_lot::Mutex<Vec<Arc<PacedRun>>>>,
    paced_tasks: TaskTracker,
    paced_max: Duration,
    /// Cancels the paced broadcasts (server shutdown).
    stop: Shutdown,
    /// Held from a broadcast's history append until every worker has queued it, so
    /// broadcast offsets are delivery order on every worker.
    order: Arc<tokio::sync::Mutex<()>>,
}

impl Broadcaster {
    /// Starts `workers` workers over the registry's buckets. They stop when every
    /// handle is dropped and their queues are drained. Paced broadcasts run at most
    /// `paced_max` each and are cancelled when `stop` is.
    pub fn start(
        registry: Arc<Registry>,
        workers: usize,
        paced_max: Duration,
        stop: Shutdown,
    ) -> Self {
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
            running: Arc::default(),
            paced_tasks: TaskTracker::new(),
            paced_max,
            stop,
            order: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The paced broadcasts running, oldest first.
    pub fn paced_progress(&self) -> Vec<PacedProgress> {
        self.running.lock().iter().map(|r| r.progress()).collect()
    }

    /// Waits until every paced broadcast has ended; call after `stop` is cancelled,
    /// which makes them end at their next tick. No paced broadcast starts after.
    pub async fn paced_stopped(&self) {
        self.paced_tasks.close();
        self.paced_tasks.wait().await;
    }

    /// Paced broadcasts still running (tasks not yet ended).
    pub fn paced_running(&self) -> usize {
        self.paced_tasks.len()
    }

    /// Refuses a paced broadcast that would outlast `rpc.paced_max_duration` over
    /// the `online` channels.
    fn check_pace(&self, online: u64, speed: u32) -> Result<(), RpcError> {
        let secs = online.div_ceil(u64::from(speed));
        let takes = Duration::from_secs_f64(online as f64 / f64::from(speed));
        if takes > self.paced_max {
            return Err(RpcError::PacedTooLong {
                online,
                speed,
                secs,
                max_secs: self.paced_max.as_secs(),
            });
        }
        Ok(())
    }

    /// Queues a broadcast on every worker, waiting for room. With a `speed` (node-wide
    /// messages per second) the broadcast instead runs on a task of its own, so a
    /// slow broadcast never holds up the others; it then keeps no order with them,
    /// and so is never kept in history either.
    pub async fn submit(&self, op: u32, frame: Bytes, speed: u32) -> Result<(), RpcError> {
        if speed > 0 {
            if self.stop.is_cancelled() || self.paced_tasks.is_closed() {
                return Err(RpcError::ShuttingDown);
            }
            let online = self.registry.online().total;
            self.check_pace(online, speed)?;
            let permit = self.paced.clone().try_acquire_owned().map_err(|_| {
                RpcError::Busy(format!("{MAX_PACED} paced broadcasts are already running"))
            })?;
            let run = Arc::new(PacedRun {
                op,
                speed,
                planned: online,
                visited: AtomicU64::new(0),
                delivered: AtomicU64::new(0),
                started: Instant::now(),
            });
            self.running.lock().push(run.clone());
            let registry = self.registry.clone();
            let running = self.running.clone();
            let stop = self.stop.clone();
            let max = self.paced_max;
            self.paced_tasks.spawn(async move {
                let end = tokio::select! {
                    r = tokio::time::timeout(max, paced(&registry, &frame, &run)) => match r {
                        Ok(()) => "done",
                        Err(_) => "stopped at rpc.paced_max_duration",
                    },
                    _ = stop.cancelled() => "cancelled by shutdown",
                };
                running.lock().retain(|r| !Arc::ptr_eq(r, &run));
                drop(permit);
                let p = run.progress();
                if end == "done" {
                    debug!(op, speed, delivered = p.delivered, "paced broadcast done");
                } else {
                    let visited = run.visited.load(Ordering::Relaxed);
                    if end == "stopped at rpc.paced_max_duration" {
                        warn!(
                            op,
                            speed,
                            visited,
                            delivered = p.delivered,
                            remaining = p.remaining,
                            ?max,
                            "paced broadcast {end}"
                        );
                    } else {
                        info!(
                            op,
                            speed,
                            visited,
                            delivered = p.delivered,
                            remaining = p.remaining,
                            "paced broadcast {end}"
                        );
                    }
                }
            });
            return Ok(());
        }
        // An async mutex: waiting for a worker's queue is the point of holding it.
        let _order = self.order.lock().await;
        let meta = self.registry.append_broadcast(&frame);
        self.queue(Job {
            op,
            frame,
            meta,
            shared: false,
        })
        .await
    }

    /// Queues a broadcast the tier's shared history appended at `meta`'s
    /// position (it arrived on the bus, in the stream's order) on every worker,
    /// waiting for room.
    pub async fn submit_at(&self, frame: Bytes, meta: PushMeta) -> Result<(), RpcError> {
        let op = crate::registry::op_of(&frame);
        let _order = self.order.lock().await;
        self.queue(Job {
            op,
            frame,
            meta,
            shared: true,
        })
        .await
    }

    async fn queue(&self, job: Job) -> Result<(), RpcError> {
        for w in &self.workers {
            if w.send(job.clone()).await.is_err() {
                return Err(RpcError::ShuttingDown);
            }
        }
        Ok(())
    }
}

/// Pushes to every channel at the run's speed (messages per second, node-wide),
/// in chunks that span buckets, snapshotting each bucket's channels so that no lock
/// is held while it waits; counts its progress in `run`.
async fn paced(registry: &Registry, frame: &Bytes, run: &PacedRun) {
    let chunk = (run.speed / 10).clamp(1, PACE_CHUNK);
    let tick = Duration::from_secs_f64(f64::from(chunk) / f64::from(run.speed));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate.
    let mut left_in_chunk = 0;
    for b in 0..registry.bucket_count() {
        for ch in registry.bucket_channels(b, run.op) {
            if left_in_chunk == 0 {
                interval.tick().await;
                left_in_chunk = chunk;
            }
            left_in_chunk -= 1;
            if ch.try_push(frame, PushMeta::untracked(Source::All)) == PushOutcome::Delivered {
                run.delivered.fetch_add(1, Ordering::Relaxed);
            }
            run.visited.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn run_worker(registry: Arc<Registry>, buckets: Vec<usize>, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.recv().await {
        let mut delivered = 0;
        for &b in &buckets {
            let t = if job.shared {
                registry.push_bucket_at(b, &job.frame, job.meta)
            } else {
                registry.push_bucket(b, job.op, &job.frame, job.meta)
            };
            delivered += t.delivered;
        }
        debug!(op = job.op, delivered, "broadcast slice done");
    }
}

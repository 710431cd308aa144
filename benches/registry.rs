//! Run with: `cargo bench --bench registry` (quick pass: `cargo bench --bench registry -- --quick`)
//!
//! Compares the sharded `quicpush::registry::Registry` with a naive baseline (one
//! `std::sync::Mutex<HashMap<..>>` for keys, one for rooms, pushing with
//! `Channel::try_push`):
//!
//! - `push_key`: look up and push to one key among 10,000 registered;
//! - `push_room`: push one frame to a room of 1,000 members (10,000 registered);
//! - `broadcast`: push one frame to all 10,000 (`push_bucket` over every bucket);
//! - `concurrent_push_key`: 2 threads each doing 10,000 pushes to random keys.
//!
//! Every channel's queue holds 1<<16 frames, and the queues are drained outside the
//! timed region (`iter_custom`), so every push measures `PushOutcome::Delivered`;
//! each timed loop counts its deliveries and asserts that all were delivered.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quicpush::channel::OutReceiver as Receiver;
use quicpush::channel::{Channel, PushOutcome, Transport};
use quicpush::protocol::{Frame, PushMeta, Source};
use quicpush::registry::{OpFilter, Registry};

/// Pushes in this bench keep no history (the registry has none).
const META: PushMeta = PushMeta {
    source: Source::Key,
    epoch: 0,
    offset: 0,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Channels registered in every fixture.
const CHANNELS: usize = 10_000;
/// Rooms the channels are spread over: 1,000 members each.
const ROOMS: usize = 10;
/// Each channel's queue size: large enough that no timed chunk fills it.
const QUEUE: usize = 1 << 16;
/// Buckets of the registry (the server's default).
const BUCKETS: usize = 32;
/// The op pushed (a business op every default filter accepts).
const OP: u32 = 1000;
/// Pushes per thread in the concurrent benchmark.
const PER_THREAD: usize = 10_000;
const THREADS: usize = 2;

/// The baseline: one mutex over key → channel, one over room → members.
#[derive(Default)]
struct Naive {
    keys: Mutex<HashMap<String, Arc<Channel>>>,
    rooms: Mutex<HashMap<String, Vec<Arc<Channel>>>>,
}

impl Naive {
    fn register(&self, chan: Arc<Channel>, room: &str) {
        self.rooms
            .lock()
            .unwrap()
            .entry(room.to_string())
            .or_default()
            .push(chan.clone());
        self.keys.lock().unwrap().insert(chan.key.to_string(), chan);
    }

    fn push_key(&self, key: &str, frame: &Bytes) -> PushOutcome {
        match self.keys.lock().unwrap().get(key) {
            Some(c) => c.try_push(frame, META),
            None => PushOutcome::Offline,
        }
    }

    /// Delivered count.
    fn push_room(&self, room: &str, frame: &Bytes) -> u64 {
        let rooms = self.rooms.lock().unwrap();
        let mut n = 0;
        if let Some(members) = rooms.get(room) {
            for c in members {
                n += (c.try_push(frame, META) == PushOutcome::Delivered) as u64;
            }
        }
        n
    }

    /// Delivered count.
    fn broadcast(&self, frame: &Bytes) -> u64 {
        let keys = self.keys.lock().unwrap();
        let mut n = 0;
        for c in keys.values() {
            n += (c.try_push(frame, META) == PushOutcome::Delivered) as u64;
        }
        n
    }
}

/// Both implementations over the same 10,000 channels, plus their receivers.
struct Fixture {
    registry: Registry,
    naive: Naive,
    keys: Vec<String>,
    rxs: Vec<Receiver>,
    frame: Bytes,
}

fn room_of(i: usize) -> String {
    format!("room{}", i % ROOMS)
}

impl Fixture {
    fn new() -> Self {
        let registry = Registry::new(BUCKETS);
        let naive = Naive::default();
        let mut keys = Vec::with_capacity(CHANNELS);
        let mut rxs = Vec::with_capacity(CHANNELS);
        for i in 0..CHANNELS {
            let key = format!("key-{i:05}");
            let (chan, rx) = Channel::new(
                registry.next_id(),
                key.as_str().into(),
                Some(i as i64),
                Transport::Tcp,
                QUEUE,
            );
            let room = room_of(i);
            assert!(registry
                .register(
                    chan.clone(),
                    Some(room.as_str().into()),
                    OpFilter::default()
                )
                .is_ok_and(|old| old.is_none()));
            naive.register(chan, &room);
            keys.push(key);
            rxs.push(rx);
        }
        let frame = Frame::new(OP, 0, Bytes::from(vec![0x5au8; 32])).to_bytes();
        let mut f = Fixture {
            registry,
            naive,
            keys,
            rxs,
            frame,
        };
        // Once at setup: a push through either path is delivered, not QueueFull.
        assert_eq!(
            f.registry.push_key(&f.keys[0], OP, &f.frame),
            PushOutcome::Delivered
        );
        assert_eq!(
            f.naive.push_key(&f.keys[0], &f.frame),
            PushOutcome::Delivered
        );
        assert_eq!(
            f.registry.room_online(&room_of(0)),
            (CHANNELS / ROOMS) as u64
        );
        assert_eq!(f.drain(), 2);
        f
    }

    /// Empties every queue; returns how many frames were taken.
    fn drain(&mut self) -> usize {
        let mut n = 0;
        for rx in &mut self.rxs {
            n += rx.drain();
        }
        n
    }

    /// Empties the queues of the members of `room` only.
    fn drain_room(&mut self, room: usize) -> usize {
        let mut n = 0;
        for rx in self.rxs.iter_mut().skip(room).step_by(ROOMS) {
            n += rx.drain();
        }
        n
    }
}

/// A fixed pseudo-random sequence of key indexes.
fn random_indexes(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..CHANNELS)).collect()
}

/// Runs `iters` timed calls of `push` in chunks of `chunk`, draining the queues
/// between chunks without timing it; asserts every push was delivered.
fn chunked(
    fx: &mut Fixture,
    iters: u64,
    chunk: u64,
    per_call: u64,
    mut drain: impl FnMut(&mut Fixture) -> usize,
    mut push: impl FnMut(&Fixture, u64) -> u64,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0u64;
    while done < iters {
        let n = chunk.min(iters - done);
        let mut delivered = 0u64;
        let start = Instant::now();
        for i in done..done + n {
            delivered += push(fx, i);
        }
        total += start.elapsed();
        assert_eq!(delivered, n * per_call, "every push must be delivered");
        assert_eq!(drain(fx) as u64, delivered);
        done += n;
    }
    total
}

fn push_key(c: &mut Criterion, fx: &mut Fixture) {
    let idx = random_indexes(1 << 14, 1);
    let mut g = c.benchmark_group("push_key_10k");
    g.throughput(Throughput::Elements(1));
    g.bench_function("registry", |b| {
        b.iter_custom(|iters| {
            chunked(fx, iters, 10_000, 1, Fixture::drain, |fx, i| {
                let key = &fx.keys[idx[i as usize % idx.len()]];
                (fx.registry.push_key(black_box(key), OP, &fx.frame) == PushOutcome::Delivered)
                    as u64
            })
        })
    });
    g.bench_function("naive_mutex_hashmap", |b| {
        b.iter_custom(|iters| {
            chunked(fx, iters, 10_000, 1, Fixture::drain, |fx, i| {
                let key = &fx.keys[idx[i as usize % idx.len()]];
                (fx.naive.push_key(black_box(key), &fx.frame) == PushOutcome::Delivered) as u64
            })
        })
    });
    g.finish();
}

fn push_room(c: &mut Criterion, fx: &mut Fixture) {
    let room = room_of(3);
    let members = (CHANNELS / ROOMS) as u64;
    let drain = |fx: &mut Fixture| fx.drain_room(3);
    let mut g = c.benchmark_group("push_room_1k");
    g.throughput(Throughput::Elements(members));
    g.bench_function("registry", |b| {
        b.iter_custom(|iters| {
            chunked(fx, iters, 64, members, drain, |fx, _| {
                fx.registry
                    .push_room(black_box(&room), OP, &fx.frame)
                    .delivered
            })
        })
    });
    g.bench_function("naive_mutex_hashmap", |b| {
        b.iter_custom(|iters| {
            chunked(fx, iters, 64, members, drain, |fx, _| {
                fx.naive.push_room(black_box(&room), &fx.frame)
            })
        })
    });
    g.finish();
}

fn broadcast(c: &mut Criterion, fx: &mut Fixture) {
    let all = CHANNELS as u64;
    let mut g = c.benchmark_group("broadcast_10k");
    g.throughput(Throughput::Elements(all));
    g.bench_function("registry_push_bucket", |b| {
        b.iter_custom(|iters| {
            chunked(fx, iters, 16, all, Fixture::drain, |fx, _| {
                (0..fx.registry.bucket_count())
                    .map(|b| fx.registry.push_bucket(b, OP, &fx.frame, META).delivered)
                    .sum()
            })
        })
    });
    g.bench_function("naive_mutex_hashmap", |b| {
        b.iter_custom(|iters| {
            chunked(fx, iters, 16, all, Fixture::drain, |fx, _| {
                fx.naive.broadcast(&fx.frame)
            })
        })
    });
    g.finish();
}

/// One iteration: `THREADS` scoped threads each push to `PER_THREAD` random keys;
/// the wall time from spawning to joining is measured (thread spawn included).
fn concurrent(
    fx: &mut Fixture,
    iters: u64,
    idx: &[Vec<usize>],
    push: impl Fn(&Fixture, &str) -> PushOutcome + Sync,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let shared: &Fixture = fx;
        let start = Instant::now();
        let delivered: usize = std::thread::scope(|s| {
            let handles: Vec<_> = idx
                .iter()
                .map(|mine| {
                    let push = &push;
                    s.spawn(move || {
                        mine.iter()
                            .filter(|&&i| push(shared, &shared.keys[i]) == PushOutcome::Delivered)
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        total += start.elapsed();
        assert_eq!(
            delivered,
            THREADS * PER_THREAD,
            "every push must be delivered"
        );
        assert_eq!(fx.drain(), delivered);
    }
    total
}

fn concurrent_push_key(c: &mut Criterion, fx: &mut Fixture) {
    let idx: Vec<Vec<usize>> = (0..THREADS)
        .map(|t| random_indexes(PER_THREAD, 100 + t as u64))
        .collect();
    let mut g = c.benchmark_group("concurrent_push_key_2x10k");
    g.throughput(Throughput::Elements((THREADS * PER_THREAD) as u64));
    g.bench_function("registry", |b| {
        b.iter_custom(|iters| {
            concurrent(fx, iters, &idx, |fx, key| {
                fx.registry.push_key(key, OP, &fx.frame)
            })
        })
    });
    g.bench_function("naive_mutex_hashmap", |b| {
        b.iter_custom(|iters| {
            concurrent(fx, iters, &idx, |fx, key| fx.naive.push_key(key, &fx.frame))
        })
    });
    g.finish();
}

fn registry_benches(c: &mut Criterion) {
    let mut fx = Fixture::new();
    push_key(c, &mut fx);
    push_room(c, &mut fx);
    broadcast(c, &mut fx);
    concurrent_push_key(c, &mut fx);
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = registry_benches
}
criterion_main!(benches);

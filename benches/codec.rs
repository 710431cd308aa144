//! Run with: `cargo bench --bench codec` (quick pass: `cargo bench --bench codec -- --quick`)
//!
//! Micro-benchmarks of the goim v2 frame codec in `quicpush::protocol`: encoding a
//! frame (`Frame::to_bytes`, `Frame::encode`), decoding one frame and a buffer of
//! 100 back-to-back frames (`protocol::decode`), and the writer's per-delivery seq
//! stamping (`protocol::put_with_seq`).
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use quicpush::protocol::{self, Frame, DEFAULT_MAX_BODY};

/// Body sizes under test: a small chat-sized message and goim's body limit.
const SIZES: [usize; 2] = [32, 4096];
/// Frames in the back-to-back decode buffer.
const BATCH: usize = 100;

fn frame(body_len: usize) -> Frame {
    Frame::new(1000, 7, Bytes::from(vec![0xa5u8; body_len]))
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for size in SIZES {
        let f = frame(size);
        g.throughput(Throughput::Bytes(f.encoded_len() as u64));
        g.bench_function(format!("to_bytes/{size}"), |b| {
            b.iter(|| black_box(&f).to_bytes())
        });
        // Appending into a reused buffer, as a writer does.
        let mut dst = BytesMut::with_capacity(f.encoded_len());
        g.bench_function(format!("encode_reuse/{size}"), |b| {
            b.iter(|| {
                dst.clear();
                black_box(&f).encode(&mut dst);
                black_box(dst.len());
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for size in SIZES {
        let f = frame(size);
        let one = f.to_bytes();
        // Sanity check once: the buffer decodes back to the frame.
        let mut check = BytesMut::from(&one[..]);
        assert_eq!(
            protocol::decode(&mut check, DEFAULT_MAX_BODY).unwrap(),
            Some(f.clone())
        );

        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("single/{size}"), |b| {
            b.iter_batched(
                || BytesMut::from(&one[..]),
                |mut buf| protocol::decode(&mut buf, DEFAULT_MAX_BODY).unwrap(),
                BatchSize::SmallInput,
            )
        });

        let mut many = BytesMut::with_capacity(BATCH * f.encoded_len());
        for seq in 0..BATCH as u32 {
            Frame::new(1000, seq, f.body.clone()).encode(&mut many);
        }
        let many = many.freeze();
        g.throughput(Throughput::Elements(BATCH as u64));
        g.bench_function(format!("x{BATCH}/{size}"), |b| {
            b.iter_batched(
                || BytesMut::from(&many[..]),
                |mut buf| {
                    let mut n = 0usize;
                    while let Some(fr) = protocol::decode(&mut buf, DEFAULT_MAX_BODY).unwrap() {
                        black_box(&fr);
                        n += 1;
                    }
                    assert_eq!(n, BATCH);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn put_with_seq(c: &mut Criterion) {
    let mut g = c.benchmark_group("put_with_seq");
    for size in SIZES {
        let encoded = frame(size).to_bytes();
        let mut dst = BytesMut::with_capacity(encoded.len());
        let mut seq = 0u32;
        g.throughput(Throughput::Bytes(encoded.len() as u64));
        g.bench_function(format!("{size}"), |b| {
            b.iter(|| {
                dst.clear();
                seq = seq.wrapping_add(1);
                protocol::put_with_seq(&mut dst, black_box(&encoded), seq);
                black_box(dst.len());
            })
        });
    }
    g.finish();
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
    targets = encode, decode, put_with_seq
}
criterion_main!(benches);

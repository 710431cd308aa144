//! A small run of every bench scenario on both transports: checks that nothing is
//! lost, duplicated or misrouted, never how fast.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use quicpush::bench::{self, BenchOptions, BenchTransport, Scenario, Target};

fn options(scenario: Scenario, transport: BenchTransport) -> BenchOptions {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_quicpush"));
    BenchOptions {
        scenario,
        transport,
        clients: 200,
        messages: 50,
        batch: 10,
        rate: 4_000,
        duration: Duration::from_secs(1),
        body_size: 32,
        raw: false,
        in_flight: 16,
        connect_concurrency: 64,
        stalled: 0,
        tcp_send_buffer: 0,
        handover: Default::default(),
        target: Target::Spawn { exe: exe.clone() },
        exe,
        progress: false,
    }
}

async fn check_deliveries(opts: BenchOptions) -> bench::Report {
    let what = format!("{:?} over {:?}", opts.scenario, opts.transport);
    let r = bench::run(&opts).await.unwrap();
    for m in std::iter::once(&r.quicpush).chain(r.raw.as_ref()) {
        assert_eq!(m.lost, 0, "{what}: lost");
        assert_eq!(m.duplicated, 0, "{what}: duplicated");
        assert_eq!(m.misrouted, 0, "{what}: misrouted");
        assert_eq!(m.bad_seq, 0, "{what}: push sequence");
        assert_eq!(m.dropped_queue_full, 0, "{what}: dropped");
        assert_eq!(m.deliveries, m.expected, "{what}: every delivery arrived");
        assert!(m.latency_us.is_some(), "{what}: latency measured");
    }
    if opts.raw {
        assert!(r.ratio_to_raw.is_some(), "{what}: ratio to raw");
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_broadcast_keys_and_latency_lose_nothing() {
    for transport in [BenchTransport::Tcp, BenchTransport::Quic] {
        for scenario in [
            Scenario::Room,
            Scenario::Broadcast,
            Scenario::Keys,
            Scenario::Latency,
        ] {
            check_deliveries(options(scenario, transport)).await;
        }
        let mut single = options(Scenario::Keys, transport);
        single.batch = 1;
        check_deliveries(single).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_in_the_room_costs_the_readers_nothing() {
    let mut opts = options(Scenario::Room, BenchTransport::Tcp);
    opts.stalled = 1;
    opts.tcp_send_buffer = 4096;
    opts.raw = true;
    let r = check_deliveries(opts).await;
    assert_eq!(r.stalled, 1);
    assert!(r.quicpush.stalled_disconnected.is_some());
    assert!(r.raw.unwrap().stalled_disconnected.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raw_floor_loses_nothing_either() {
    for transport in [BenchTransport::Tcp, BenchTransport::Quic] {
        let mut opts = options(Scenario::Room, transport);
        opts.raw = true;
        check_deliveries(opts).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_connect_report_their_figures() {
    for transport in [BenchTransport::Tcp, BenchTransport::Quic] {
        let mut idle = options(Scenario::Idle, transport);
        idle.raw = true;
        let r = bench::run(&idle).await.unwrap();
        assert!(r.server_rss_per_conn_bytes.is_some());
        assert!(r.raw_rss_per_conn_bytes.is_some());
        let r = bench::run(&options(Scenario::Connect, transport))
            .await
            .unwrap();
        assert!(r.connects_per_sec.unwrap() > 0.0);
    }
}

//! A small run of every bench scenario on both transports (room and broadcast
//! over WebSocket too): checks that nothing is
//! lost, duplicated or misrouted, never how fast.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use quicpush::bench::handover::{HandoverMode, HandoverOptions};
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
        keys_rate: None,
        nodes: 1,
        redis_cluster: false,
        write_coalesce: Duration::ZERO,
        cluster_ttl: None,
        duration: Duration::from_secs(1),
        body_size: 32,
        raw: false,
        in_flight: 16,
        connect_concurrency: 64,
        stalled: 0,
        tcp_send_buffer: 0,
        history: quicpush::bench::BenchHistory::Default,
        metrics: quicpush::bench::BenchMetrics::On,
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
async fn room_and_broadcast_over_websocket_lose_nothing() {
    for scenario in [Scenario::Room, Scenario::Broadcast] {
        check_deliveries(options(scenario, BenchTransport::Ws)).await;
    }
    // the raw floor has no WebSocket listener to compare with
    let mut raw = options(Scenario::Room, BenchTransport::Ws);
    raw.raw = true;
    assert!(bench::run(&raw).await.is_err());
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

/// A short handover run: 20 clients, 8 s, a switch every 3 s (5 % loss over QUIC).
fn handover(transport: BenchTransport, mode: HandoverMode) -> BenchOptions {
    let mut opts = options(Scenario::Handover, transport);
    opts.clients = 20;
    opts.rate = 200;
    opts.duration = Duration::from_secs(8);
    opts.handover = HandoverOptions {
        mode: Some(mode),
        loss: if transport == BenchTransport::Quic {
            0.05
        } else {
            0.0
        },
        switch_every: Duration::from_secs(3),
        seed: 7,
        ..HandoverOptions::default()
    };
    opts
}

async fn check_handover(opts: BenchOptions) -> bench::handover::HandoverReport {
    let what = format!("handover over {:?}", opts.transport);
    let r = bench::run(&opts).await.unwrap();
    println!("{}", r.table());
    let h = r.handover.as_ref().expect("a handover report");
    let what = format!("{what}, {}: {h:?}", h.mode.name());
    assert!(h.switches > 0, "{what}: no switch happened");
    assert!(
        h.pushes_reliable > 0 && h.expected > 0,
        "{what}: nothing sent"
    );
    assert_eq!(h.pushes_unreliable, 0, "{what}: pushes not reliable");
    assert_eq!(h.lost, 0, "{what}: lost");
    assert_eq!(h.duplicated, 0, "{what}: duplicated");
    assert_eq!(h.out_of_order, 0, "{what}: out of order");
    assert_eq!(h.misrouted, 0, "{what}: misrouted");
    assert_eq!(h.bad_seq, 0, "{what}: push sequence");
    assert_eq!(h.not_recovered, 0, "{what}: not recovered");
    assert_eq!(
        h.received, h.expected,
        "{what}: every delivery arrived once"
    );
    match h.mode {
        HandoverMode::Migrate => assert_eq!(h.reconnects, 0, "{what}: migrated, never reconnected"),
        _ => {
            // A switch during a reconnect (a handshake that lost packets twice)
            // restarts that reconnect: one reconnect for the two.
            let connected = h.switches - h.switches_while_reconnecting;
            assert!(h.reconnects >= connected, "{what}: a reconnect per switch");
            assert!(h.resumes_recovered >= connected, "{what}: resumed");
        }
    }
    let first = h.first_push_ms.expect("first push after a switch measured");
    let gap = h.gap_filled_ms.expect("gap filled measured");
    assert!(first.count > 0 && gap.count > 0, "{what}");
    assert_eq!(r.lost, 0);
    let json = serde_json::to_value(&r).unwrap();
    assert!(
        json["handover"]["first_push_ms"]["p99"].is_number(),
        "{json}"
    );
    h.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_loses_nothing_over_tcp_reconnect_quic_migration_and_quic_reconnect() {
    // The three runs are light (20 clients, 200 pushes/s each): side by side.
    tokio::join!(
        check_handover(handover(BenchTransport::Tcp, HandoverMode::Reconnect)),
        check_handover(handover(BenchTransport::Quic, HandoverMode::Migrate)),
        check_handover(handover(BenchTransport::Quic, HandoverMode::Reconnect)),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_over_quic_zero_rtt_resume_loses_nothing_and_uses_0rtt() {
    let h = check_handover(handover(BenchTransport::Quic, HandoverMode::ZeroRtt)).await;
    // every reconnect after a client's first connection had a ticket
    assert!(h.zero_rtt_attempted > 0, "{h:?}");
    assert!(h.zero_rtt_accepted > 0, "{h:?}");
}

#[tokio::test]
async fn handover_refuses_what_it_cannot_do() {
    for mode in [HandoverMode::Migrate, HandoverMode::ZeroRtt] {
        let e = bench::run(&handover(BenchTransport::Tcp, mode))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("needs QUIC"), "{e}");
    }
}

/// `--metrics compare`: the room fan-out against a server with metrics off, then
/// one with them on; both lose nothing and the report has their ratio.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_compare_runs_the_room_twice_and_gives_the_ratio() {
    let mut opts = options(Scenario::Room, BenchTransport::Tcp);
    opts.metrics = quicpush::bench::BenchMetrics::Compare;
    let r = check_deliveries(opts).await;
    let off = r.metrics_off.as_ref().expect("the metrics-off run");
    assert_eq!((off.lost, off.duplicated, off.misrouted), (0, 0, 0));
    assert_eq!(off.deliveries, off.expected);
    assert!(r.metrics_on_to_off.is_some_and(|x| x > 0.0));
    assert!(r.table().contains("ratio metrics on/off"), "{}", r.table());
}

//! Run with: `cargo bench --bench handshake` (quick pass: add `-- --quick`)
//!
//! A full TLS 1.3 handshake over memory, client and server, with the
//! client-facing listener's settings (`tls::client_server_tls`): the server's
//! suite order (AES-128-GCM first) beside rustls's default order (AES-256-GCM
//! first), so the key schedule's cost stays visible.
#![allow(clippy::expect_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use quicpush::bench::handshake::{configs, handshake_once};

fn handshakes(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    quicpush::certs::ensure(dir.path(), &[]).expect("certificates");
    let (server, client) = configs(dir.path()).expect("configs");
    let mut g = c.benchmark_group("tls13_handshake");
    g.bench_function("server_order_aes128", |b| {
        b.iter(|| handshake_once(&server, &client).expect("handshake"))
    });
    // The same certificate and ALPN, rustls's default suite order.
    let certs = quicpush::tls::load_certs(&dir.path().join(quicpush::certs::SERVER_CERT))
        .expect("server certificate");
    let key =
        quicpush::tls::load_key(&dir.path().join(quicpush::certs::SERVER_KEY)).expect("server key");
    let mut default_order = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("certificate and key");
    default_order.alpn_protocols = server.alpn_protocols.clone();
    default_order.ignore_client_order = true;
    default_order.send_tls13_tickets = server.send_tls13_tickets;
    default_order.session_storage = server.session_storage.clone();
    default_order.max_early_data_size = server.max_early_data_size;
    let default_order = Arc::new(default_order);
    g.bench_function("default_order_aes256", |b| {
        b.iter(|| handshake_once(&default_order, &client).expect("handshake"))
    });
    g.finish();
}

criterion_group!(benches, handshakes);
criterion_main!(benches);

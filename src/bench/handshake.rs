//! What a TLS 1.3 handshake costs rustls alone, as a yardstick for the
//! server's CPU per connect: the connect scenario measures the server's CPU
//! per QUIC connect + Auth, and this measures, in the bench's own process and
//! in the same run, the server side of a full handshake with the same
//! certificate, key and rustls settings (`tls::client_server_tls`), client and
//! server talking over memory. What QUIC adds on top (packet protection,
//! connection state, ACKs, the session's Auth) is the difference.
//!
//! Only the server's calls are timed, with the thread's CPU clock, so the
//! client's half of the handshake does not count.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::BenchError;
use crate::config::QuicConfig;

/// The thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    cpu_time::ThreadTime::try_now().map_or(0, |t| t.as_duration().as_nanos() as u64)
}

/// Moves every TLS byte the client has to send into the server.
fn to_server(
    client: &mut rustls::ClientConnection,
    server: &mut rustls::ServerConnection,
) -> Result<(), BenchError> {
    let mut buf = Vec::new();
    while client.wants_write() {
        client
            .write_tls(&mut buf)
            .map_err(|e| BenchError::Io(format!("rustls handshake: write_tls: {e}")))?;
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        server
            .read_tls(&mut rd)
            .map_err(|e| BenchError::Io(format!("rustls handshake: read_tls: {e}")))?;
    }
    Ok(())
}

/// The server and client configurations of the yardstick: the client-facing
/// QUIC listener's rustls settings and certificate from `dir`, and a client
/// trusting its CA.
pub fn configs(
    dir: &Path,
) -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>), BenchError> {
    let tls = |e: crate::tls::TlsError| BenchError::Io(format!("rustls handshake config: {e}"));
    let server = crate::tls::client_server_tls(dir, &QuicConfig::default()).map_err(tls)?;
    let client =
        crate::tls::tcp_client_config(&dir.join(crate::certs::CA_CERT), &[crate::tls::CLIENT_ALPN])
            .map_err(tls)?;
    Ok((Arc::new(server), client))
}

/// One full handshake over memory; the server side's CPU, ns.
pub fn handshake_once(
    server_cfg: &Arc<rustls::ServerConfig>,
    client_cfg: &Arc<rustls::ClientConfig>,
) -> Result<u64, BenchError> {
    let rustls_err = |e: rustls::Error| BenchError::Io(format!("rustls handshake: {e}"));
    let io_err = |e: std::io::Error| BenchError::Io(format!("rustls handshake: {e}"));
    let name = ServerName::try_from("localhost")
        .map_err(|e| BenchError::Io(format!("rustls handshake: server name: {e}")))?;
    let mut client = rustls::ClientConnection::new(client_cfg.clone(), name).map_err(rustls_err)?;
    let t = thread_cpu_ns();
    let mut server = rustls::ServerConnection::new(server_cfg.clone()).map_err(rustls_err)?;
    let mut server_ns = thread_cpu_ns() - t;
    let mut rounds = 0;
    while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
        rounds += 1;
        if rounds > 16 {
            return Err(BenchError::Io(
                "rustls handshake: not done after 16 rounds".into(),
            ));
        }
        to_server(&mut client, &mut server)?;
        let t = thread_cpu_ns();
        server.process_new_packets().map_err(rustls_err)?;
        let mut out = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut out).map_err(io_err)?;
        }
        server_ns += thread_cpu_ns() - t;
        let mut rd = &out[..];
        while !rd.is_empty() {
            client.read_tls(&mut rd).map_err(io_err)?;
        }
        client.process_new_packets().map_err(rustls_err)?;
    }
    Ok(server_ns)
}

/// The median server-side CPU of `n` full TLS 1.3 handshakes with the server
/// certificate in `dir`, in µs. Blocking: run it off the async workers.
pub fn rustls_server_us(dir: &Path, n: usize) -> Result<f64, BenchError> {
    let (server_cfg, client_cfg) = configs(dir)?;
    let mut each = (0..n.max(1))
        .map(|_| handshake_once(&server_cfg, &client_cfg))
        .collect::<Result<Vec<u64>, _>>()?;
    each.sort_unstable();
    Ok(each[each.len() / 2] as f64 / 1e3)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_handshake_completes_and_costs_the_server_something() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::ensure(dir.path(), &[]).unwrap();
        let us = rustls_server_us(dir.path(), 5).unwrap();
        assert!(us > 0.0, "{us}");
    }
}

//! TLS and QUIC configurations, built from a certificate directory.
//!
//! ring is the only crypto provider: every rustls config here is built with
//! [`provider`], never with a process-wide default.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::certs;
use crate::config::{QuicConfig, RpcConfig};

/// ALPN of client QUIC connections.
pub const CLIENT_ALPN: &[u8] = b"quicpush/1";
/// ALPN of backend RPC connections.
pub const RPC_ALPN: &[u8] = b"quicpush-rpc/1";

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    /// A PEM file holds no private key.
    #[error("{path} holds no private key")]
    NoKey { path: String },
    /// A private key file can be read by other users.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")]
    KeyPermissions { path: String, mode: u32 },
    /// rustls refused the certificates or keys.
    #[error("{what}: {source}")]
    Rustls {
        what: &'static str,
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA.
    #[error("cannot build the client certificate verifier from {path}: {reason}")]
    Verifier { path: String, reason: String },
    /// rustls' config does not fit QUIC (e.g. no TLS 1.3 suite).
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(String),
}

/// A client endpoint on an ephemeral port of `remote`'s address family.
pub fn client_endpoint(remote: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let bind: std::net::SocketAddr = if remote.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    quinn::Endpoint::client(bind)
}

/// The ring crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file, refusing files readable by other users.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TlsError::KeyPermissions {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    rustls_pemfile::private_key(&mut &data[..])
        .map_err(|source| TlsError::Read {
            path: path.display().to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.display().to_string(),
        })
}

fn roots(ca_path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_path)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            what: "invalid CA certificate",
            source,
        })?;
    }
    Ok(roots)
}

fn server_builder(
) -> Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 with ring",
            source,
        })
}

fn client_builder(
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, TlsError> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "TLS 1.3 with ring",
            source,
        })
}

fn to_quic_server(cfg: rustls::ServerConfig) -> Result<quinn::ServerConfig, TlsError> {
    let quic = QuicServerConfig::try_from(cfg).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

fn to_quic_client(cfg: rustls::ClientConfig) -> Result<quinn::ClientConfig, TlsError> {
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

fn idle(d: Duration) -> Option<IdleTimeout> {
    IdleTimeout::try_from(d).ok()
}

/// Transport settings for client connections: one bidirectional stream each.
pub fn client_transport(q: &QuicConfig) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(idle(q.idle_timeout))
        .keep_alive_interval((!q.keep_alive_interval.is_zero()).then_some(q.keep_alive_interval))
        .stream_receive_window(VarInt::from_u32(q.stream_receive_window))
        .receive_window(VarInt::from_u32(q.receive_window))
        .send_window(q.send_window)
        .max_concurrent_bidi_streams(VarInt::from_u32(1))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        // Datagrams are not part of the protocol: buffer none.
        .datagram_receive_buffer_size(None)
        // Keep the initial MTU; probing costs state per connection for little gain
        // on the small frames pushes carry.
        .mtu_discovery_config(None);
    t
}

/// Transport settings for backend connections: many streams, larger windows.
pub fn rpc_transport(r: &RpcConfig) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(idle(r.idle_timeout))
        .keep_alive_interval(Some(r.idle_timeout / 3))
        .max_concurrent_bidi_streams(VarInt::from_u32(r.max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(8 << 20))
        .receive_window(VarInt::from_u32(32 << 20))
        .send_window(32 << 20)
        .datagram_receive_buffer_size(None);
    t
}

/// The server side of client QUIC connections: no client certificate, ALPN `quicpush/1`.
pub fn client_server_config(dir: &Path, q: &QuicConfig) -> Result<quinn::ServerConfig, TlsError> {
    let certs = load_certs(&dir.join(certs::SERVER_CERT))?;
    let key = load_key(&dir.join(certs::SERVER_KEY))?;
    let mut cfg = server_builder()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate and key do not match",
            source,
        })?;
    cfg.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    // No resumption tickets: nothing uses them yet, and each costs memory and CPU.
    cfg.send_tls13_tickets = 0;
    let mut sc = to_quic_server(cfg)?;
    sc.transport_config(Arc::new(client_transport(q)));
    Ok(sc)
}

/// The server side of backend RPC: a client certificate signed by `ca.pem` is
/// required; ALPN `quicpush-rpc/1`.
pub fn rpc_server_config(dir: &Path, r: &RpcConfig) -> Result<quinn::ServerConfig, TlsError> {
    let ca_path = dir.join(certs::CA_CERT);
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca_path)?), provider())
            .build()
            .map_err(|e| TlsError::Verifier {
                path: ca_path.display().to_string(),
                reason: e.to_string(),
            })?;
    let certs = load_certs(&dir.join(certs::SERVER_CERT))?;
    let key = load_key(&dir.join(certs::SERVER_KEY))?;
    let mut cfg = server_builder()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate and key do not match",
            source,
        })?;
    cfg.alpn_protocols = vec![RPC_ALPN.to_vec()];
    let mut sc = to_quic_server(cfg)?;
    sc.transport_config(Arc::new(rpc_transport(r)));
    Ok(sc)
}

/// Where a backend finds its certificates.
#[derive(Debug, Clone)]
pub struct BackendIdentity {
    /// CA that signed the server's certificate.
    pub ca: std::path::PathBuf,
    /// The backend's client certificate, if any (the server refuses backends without one).
    pub cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl BackendIdentity {
    /// `ca.pem`, `backend.pem` and `backend.key` in `dir`.
    pub fn from_dir(dir: &Path) -> Self {
        BackendIdentity {
            ca: dir.join(certs::CA_CERT),
            cert: Some((dir.join(certs::BACKEND_CERT), dir.join(certs::BACKEND_KEY))),
        }
    }
}

/// The backend side of RPC connections.
pub fn rpc_client_config(id: &BackendIdentity) -> Result<quinn::ClientConfig, TlsError> {
    let builder = client_builder()?.with_root_certificates(roots(&id.ca)?);
    let mut cfg = match &id.cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|source| TlsError::Rustls {
                what: "backend certificate and key do not match",
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![RPC_ALPN.to_vec()];
    let mut cc = to_quic_client(cfg)?;
    let mut t = TransportConfig::default();
    t.max_idle_timeout(idle(Duration::from_secs(60)))
        .keep_alive_interval(Some(Duration::from_secs(15)))
        .stream_receive_window(VarInt::from_u32(8 << 20))
        .receive_window(VarInt::from_u32(32 << 20))
        .send_window(32 << 20);
    cc.transport_config(Arc::new(t));
    Ok(cc)
}

/// The client side of client QUIC connections, trusting `ca_path`.
pub fn quic_client_config(ca_path: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = client_builder()?
        .with_root_certificates(roots(ca_path)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    let mut cc = to_quic_client(cfg)?;
    // As the server's defaults (`quic.*`): a keep-alive every 15 s keeps a NAT's
    // UDP mapping, and after a network change the client's next packet is what
    // tells the server its new address.
    let mut t = TransportConfig::default();
    t.max_idle_timeout(idle(Duration::from_secs(60)))
        .keep_alive_interval(Some(Duration::from_secs(15)));
    cc.transport_config(Arc::new(t));
    Ok(cc)
}

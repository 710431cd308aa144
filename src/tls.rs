//! TLS and QUIC configurations, built from a certificate directory.
//!
//! ring is the only crypto provider: every rustls config here is built with
//! [`provider`], never with a process-wide default.
//!
//! # Session tickets and 0-RTT: the client port only
//!
//! With `quic.zero_rtt` on, the client port sends each connection one TLS 1.3
//! session ticket and accepts early data (`max_early_data_size = u32::MAX`, the
//! only non-zero value QUIC allows), so a returning client sends its Auth as 0-RTT
//! data. The tickets are **stateful**: the ticket is a random id and the session
//! lives in this process's [`SessionStore`], which hands each one out once
//! (`take`). rustls accepts early data only with stateful tickets (RFC 8446
//! section 8.1): a stateless ticket (the ring ticketer) could be replayed with its
//! 0-RTT data any number of times, while a stored one resumes one connection and
//! is gone. [`SessionStore`] replaces rustls' `ServerSessionMemoryCache`, whose
//! `take` scans every stored session under one lock: at the sizes a push server
//! needs, that would serialise a reconnect storm. The session layer still treats
//! 0-RTT data as replayable (see [`crate::transport::quic`]).
//!
//! The backend RPC port sends no tickets, stores no sessions and accepts no early
//! data: its mutual TLS must complete, certificate and all, before a request runs.
//!
//! A client resumes when it reuses one [`quinn::ClientConfig`]: rustls' default
//! in-memory resumption store lives in it ([`quic_client_config`] enables early data).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, StoresServerSessions, WebPkiClientVerifier};
use rustls::RootCertStore;

use crate::certs;
use crate::config::{QuicConfig, RpcConfig};

/// ALPN of client QUIC connections.
pub const CLIENT_ALPN: &[u8] = b"quicpush/1";
/// ALPN of backend RPC connections: the version of the RPC wire format.
pub const RPC_ALPN: &[u8] = crate::rpc::proto::ALPN;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// A PEM file is malformed (a section without its end, bad base64).
    #[error("{path} is not valid PEM: {source}")]
    Pem { path: String, source: pem::Error },
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

/// The ring crypto provider, AES-128-GCM first: its SHA-256 key schedule runs
/// on the CPU's SHA instructions where SHA-384's has none, which takes a
/// measurable share off every handshake (see README, Performance), and it is
/// the suite QUIC's own Initial packets use. Servers pick by this order, not
/// the client's ([`rustls::ServerConfig::ignore_client_order`]).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// All certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem {
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
    PrivateKeyDer::from_pem_slice(&data).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: path.display().to_string(),
        },
        source => TlsError::Pem {
            path: path.display().to_string(),
            source,
        },
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

/// Most shards of a [`SessionStore`].
const SESSION_SHARDS: usize = 16;

/// Stored TLS sessions of returning clients, keyed by their ticket (a random id):
/// each is handed out once, and past `capacity` the oldest is forgotten.
///
/// Sharded by the ticket's hash; every operation is O(1) amortised under one
/// shard's lock (a plain mutex, never held across an `.await`).
pub struct SessionStore {
    shards: Box<[Mutex<SessionShard>]>,
    hasher: ahash::RandomState,
}

#[derive(Default)]
struct SessionShard {
    sessions: std::collections::HashMap<Vec<u8>, Vec<u8>, ahash::RandomState>,
    /// Tickets oldest first; may still name sessions already taken.
    order: std::collections::VecDeque<Vec<u8>>,
    capacity: usize,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("shards", &self.shards.len())
            .field("sessions", &self.len())
            .finish()
    }
}

impl SessionStore {
    /// A store remembering at most about `capacity` sessions (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let n = capacity.min(SESSION_SHARDS);
        let per_shard = capacity.div_ceil(n);
        SessionStore {
            shards: (0..n)
                .map(|_| {
                    Mutex::new(SessionShard {
                        capacity: per_shard,
                        ..SessionShard::default()
                    })
                })
                .collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    fn shard(&self, ticket: &[u8]) -> &Mutex<SessionShard> {
        let i = self.hasher.hash_one(ticket) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Sessions stored.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().sessions.len()).sum()
    }

    /// Whether no session is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StoresServerSessions for SessionStore {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut s = self.shard(&key).lock();
        if s.sessions.insert(key.clone(), value).is_none() {
            s.order.push_back(key);
        }
        while s.sessions.len() > s.capacity {
            match s.order.pop_front() {
                Some(oldest) => {
                    s.sessions.remove(&oldest);
                }
                None => break,
            }
        }
        // Taken sessions leave their ticket in `order`: drop those now and then.
        if s.order.len() > 2 * s.capacity + 16 {
            let SessionShard {
                sessions, order, ..
            } = &mut *s;
            order.retain(|k| sessions.contains_key(k));
        }
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shard(key).lock().sessions.get(key).cloned()
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shard(key).lock().sessions.remove(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// Every client-facing listener's TLS: the server certificate and key from
/// `dir`, no client certificate.
fn client_facing(dir: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let certs = load_certs(&dir.join(certs::SERVER_CERT))?;
    let key = load_key(&dir.join(certs::SERVER_KEY))?;
    let mut cfg = server_builder()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate and key do not match",
            source,
        })?;
    cfg.ignore_client_order = true;
    Ok(cfg)
}

/// The rustls side of [`client_server_config`].
pub fn client_server_tls(dir: &Path, q: &QuicConfig) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = client_facing(dir)?;
    cfg.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    if q.zero_rtt {
        // One single-use ticket per connection: a client has one connection at a
        // time and gets a new ticket on each. Stateful, since rustls accepts early
        // data only then (see the module docs).
        cfg.send_tls13_tickets = 1;
        cfg.session_storage = Arc::new(SessionStore::new(q.session_cache));
        // QUIC allows no other non-zero value.
        cfg.max_early_data_size = u32::MAX;
    } else {
        no_resumption(&mut cfg);
    }
    Ok(cfg)
}

/// No tickets, no stored sessions, no early data.
fn no_resumption(cfg: &mut rustls::ServerConfig) {
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.max_early_data_size = 0;
}

/// The server side of client QUIC connections: no client certificate, ALPN
/// `quicpush/1`, session tickets and 0-RTT as `quic.zero_rtt` says.
pub fn client_server_config(dir: &Path, q: &QuicConfig) -> Result<quinn::ServerConfig, TlsError> {
    let mut sc = to_quic_server(client_server_tls(dir, q)?)?;
    sc.transport_config(Arc::new(client_transport(q)));
    Ok(sc)
}

/// ALPN of WebSocket-over-TLS connections (`client.wss_bind`): HTTP/1.1, where
/// the upgrade happens.
pub const WSS_ALPN: &[u8] = b"http/1.1";

/// The server side of the client listeners over TLS over TCP: goim frames
/// (`client.tls_bind`, `alpn` empty: none asked for, none refused) and WebSocket
/// (`client.wss_bind`, `alpn` = [`WSS_ALPN`]). The server certificate from `dir`,
/// no client certificate, TLS 1.3, no session resumption.
pub fn client_tcp_server_config(
    dir: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = client_facing(dir)?;
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    no_resumption(&mut cfg);
    Ok(Arc::new(cfg))
}

/// The client side of [`client_tcp_server_config`], trusting `ca_path`: for the
/// Rust client over TLS or WebSocket over TLS.
pub fn tcp_client_config(
    ca_path: &Path,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut cfg = client_builder()?
        .with_root_certificates(roots(ca_path)?)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// The rustls side of [`rpc_server_config`]: mutual TLS, no resumption.
pub fn rpc_server_tls(dir: &Path) -> Result<rustls::ServerConfig, TlsError> {
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
    cfg.ignore_client_order = true;
    // A resumed handshake would skip the backend's certificate, and early data
    // would run a request before it was checked: every connection does the full
    // mutual handshake.
    no_resumption(&mut cfg);
    Ok(cfg)
}

/// The server side of backend RPC: a client certificate signed by `ca.pem` is
/// required; ALPN `quicpush-rpc/4`; no session tickets, no 0-RTT.
pub fn rpc_server_config(dir: &Path, r: &RpcConfig) -> Result<quinn::ServerConfig, TlsError> {
    let mut sc = to_quic_server(rpc_server_tls(dir)?)?;
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
///
/// Early data is on and rustls' default in-memory resumption store keeps the
/// server's tickets: connections made with this same config (or a clone) resume
/// and may send 0-RTT data (see [`crate::client::PushClient::connect_quic_0rtt`]).
pub fn quic_client_config(ca_path: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = client_builder()?
        .with_root_certificates(roots(ca_path)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
    cfg.enable_early_data = true;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_server_picks_aes_128_gcm_whatever_the_client_prefers() {
        let dir = tempfile::tempdir().unwrap();
        certs::ensure(dir.path(), &[]).unwrap();
        let server_cfg =
            Arc::new(client_server_tls(dir.path(), &crate::config::QuicConfig::default()).unwrap());
        // rustls's default order, AES-256 first, as most Rust clients send it.
        let mut client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(&dir.path().join(certs::CA_CERT)).unwrap())
        .with_no_client_auth();
        client_cfg.alpn_protocols = vec![CLIENT_ALPN.to_vec()];
        assert_eq!(
            client_cfg.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        for _ in 0..8 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            server.read_tls(&mut &buf[..]).unwrap();
            server.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            client.read_tls(&mut &buf[..]).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!server.is_handshaking());
        assert_eq!(
            server.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }

    fn write(dir: &Path, name: &str, body: &[u8]) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn pem_files_load_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        certs::generate(dir.path(), &[]).unwrap();
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        assert_eq!(load_certs(&cert).unwrap().len(), 1);
        assert!(load_key(&key).is_ok());

        let cut = std::fs::read_to_string(&cert).unwrap();
        let cut = write(dir.path(), "cut.pem", &cut.as_bytes()[..cut.len() / 2]);
        let e = load_certs(&cut).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e}");
        assert!(e.to_string().contains("cut.pem"), "{e}");

        let empty = write(dir.path(), "empty.pem", b"no PEM here\n");
        assert!(matches!(
            load_certs(&empty),
            Err(TlsError::NoCertificate { .. })
        ));
        assert!(matches!(load_key(&empty), Err(TlsError::NoKey { .. })));
        // a certificate is not a key
        let only_cert = write(dir.path(), "only-cert.pem", &std::fs::read(&cert).unwrap());
        assert!(matches!(load_key(&only_cert), Err(TlsError::NoKey { .. })));
    }

    #[test]
    fn session_store_hands_each_session_out_once_and_forgets_the_oldest() {
        let s = SessionStore::new(2);
        assert!(s.can_cache());
        assert!(s.put(b"t1".to_vec(), b"s1".to_vec()));
        assert_eq!(s.get(b"t1").as_deref(), Some(&b"s1"[..]));
        assert_eq!(s.take(b"t1").as_deref(), Some(&b"s1"[..]));
        assert_eq!(s.take(b"t1"), None, "a ticket resumes one connection");
        for i in 0..10u8 {
            s.put(vec![i], vec![i]);
        }
        assert_eq!(s.len(), 2);
        assert_eq!(s.take(&[9]).as_deref(), Some(&[9u8][..]));
        assert_eq!(s.take(&[0]), None, "the oldest were forgotten");
        // taken tickets do not grow the order list without bound
        for i in 0..1000u32 {
            let k = i.to_be_bytes().to_vec();
            s.put(k.clone(), k.clone());
            s.take(&k);
        }
        let order: usize = s.shards.iter().map(|x| x.lock().order.len()).sum();
        assert!(order <= 2 * (2 + 16), "{order}");
        let one = SessionStore::new(1);
        one.put(b"a".to_vec(), b"1".to_vec());
        one.put(b"b".to_vec(), b"2".to_vec());
        assert_eq!((one.take(b"a"), one.len()), (None, 1));
    }

    #[test]
    fn tickets_and_early_data_on_the_client_port_only() {
        let dir = tempfile::tempdir().unwrap();
        certs::ensure(dir.path(), &[]).unwrap();
        let c = Config::default();
        let client = client_server_tls(dir.path(), &c.quic).unwrap();
        assert_eq!(client.send_tls13_tickets, 1);
        assert_eq!(client.max_early_data_size, u32::MAX);
        assert!(client.session_storage.can_cache());
        assert!(!client.ticketer.enabled(), "stateful tickets only");

        let rpc = rpc_server_tls(dir.path()).unwrap();
        assert_eq!(rpc.send_tls13_tickets, 0);
        assert_eq!(rpc.max_early_data_size, 0);
        assert!(!rpc.session_storage.can_cache());
        assert!(!rpc.ticketer.enabled());

        let mut off = c.quic.clone();
        off.zero_rtt = false;
        let client = client_server_tls(dir.path(), &off).unwrap();
        assert_eq!(client.send_tls13_tickets, 0);
        assert_eq!(client.max_early_data_size, 0);
        assert!(!client.session_storage.can_cache());
        // quinn accepts both
        client_server_config(dir.path(), &c.quic).unwrap();
        rpc_server_config(dir.path(), &c.rpc).unwrap();
    }
}

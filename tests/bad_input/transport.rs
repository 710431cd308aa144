//! TLS and transport: handshakes with refused certificates or a wrong ALPN, the
//! wrong protocol on a port, and those cases.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quicpush::codec;
use quicpush::protocol::op;
use quicpush::rpc::proto::Response;
use quicpush::tls::{self, BackendIdentity};
use rand::{Rng, SeedableRng};

use crate::client::frame;
use crate::common::WAIT;
use crate::rpc::ping;
use crate::{act, reply, Case, Ctx, Expect, Observed, Seen, DATAGRAM_WINDOW};

/// A TLS 1.3 client configuration trusting `ca`, with an optional client certificate
/// and the given ALPN.
pub(crate) fn rustls_client(
    ca: &Path,
    cert: Option<(&Path, &Path)>,
    alpn: &[u8],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in tls::load_certs(ca).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(tls::load_certs(c).unwrap(), tls::load_key(k).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    cfg
}

fn quic_client(cfg: rustls::ClientConfig) -> quinn::ClientConfig {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

/// Connects to `addr` with `config` and tries a Ping: the reply, or why the
/// connection failed (the close reason the server sent, when it sent one).
async fn quic_attempt(addr: SocketAddr, config: quinn::ClientConfig) -> Observed {
    let endpoint = tls::client_endpoint(addr).unwrap();
    let port = endpoint.local_addr().unwrap().port();
    let attempt = async {
        let conn = endpoint
            .connect_with(config, addr, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&ping(1)).await.map_err(|e| e.to_string())?;
            let _ = send.finish();
            let data = recv.read_to_end(1 << 16).await.map_err(|e| e.to_string())?;
            codec::decode_payload::<Response>(&data[codec::PREFIX_LEN..]).map_err(|e| e.to_string())
        };
        exchange
            .await
            .map_err(|e| conn.close_reason().map_or(e, |reason| reason.to_string()))
    };
    let result = tokio::time::timeout(WAIT, attempt)
        .await
        .expect("the attempt neither failed nor succeeded in time");
    Observed {
        seen: Seen::Reply(format!("{result:?}")),
        peer: Some(port),
    }
}

fn backend_config(id: &BackendIdentity) -> quinn::ClientConfig {
    tls::rpc_client_config(id).unwrap()
}

/// A TCP connection to a port where only UDP listens.
async fn tcp_to(addr: SocketAddr) -> Observed {
    let seen = match tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Seen::NoConnection("connect timed out".into()),
        Ok(Err(e)) => Seen::NoConnection(format!("connect: {e}")),
        Ok(Ok(_)) => Seen::Reply("a TCP listener accepted the connection".into()),
    };
    Observed { seen, peer: None }
}

/// Sends datagrams to `addr` and counts what comes back within a short window.
async fn datagrams(addr: SocketAddr, payloads: Vec<Vec<u8>>) -> Observed {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for p in &payloads {
        socket.send_to(p, addr).await.unwrap();
    }
    let mut answers = 0;
    let mut buf = vec![0u8; 2048];
    while let Ok(Ok(_)) = tokio::time::timeout(DATAGRAM_WINDOW, socket.recv_from(&mut buf)).await {
        answers += 1;
    }
    Observed {
        seen: Seen::NoConnection(format!(
            "{} datagrams sent, {answers} answered",
            payloads.len()
        )),
        peer: None,
    }
}

fn random_datagrams() -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    (0..64)
        .map(|i| {
            let len = if i % 4 == 0 {
                1200 + rng.gen_range(0..200)
            } else {
                rng.gen_range(1..1500)
            };
            (0..len).map(|_| rng.gen()).collect()
        })
        .collect()
}

fn plain_datagrams() -> Vec<Vec<u8>> {
    vec![
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
        b"hello\n".to_vec(),
        frame(op::AUTH, "not over UDP"),
    ]
}

/// Writes a backend certificate and key signed by `issuer`, valid until `not_after`.
fn write_backend_cert(
    dir: &Path,
    name: &str,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    not_after: (i32, u8, u8),
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["backend".to_owned()]).unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("quicpush backend ({name})"),
    );
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let cert = params.signed_by(&key, issuer).unwrap();
    let pem = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&pem, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (pem, key_path)
}

/// CA parameters like the project's own (`src/certs.rs`), with this common name.
fn ca_params(cn: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// An expired backend certificate from the server's own CA, and a current one from
/// another CA.
pub(crate) fn bad_backend_certs(
    server_dir: &Path,
    out: &Path,
) -> (BackendIdentity, BackendIdentity) {
    let ca = server_dir.join("ca.pem");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(server_dir.join("ca.key")).unwrap())
            .unwrap();
    let ours = rcgen::Issuer::new(ca_params("quicpush CA"), ca_key);
    let expired = write_backend_cert(out, "expired", &ours, (2021, 1, 1));
    let other_key = rcgen::KeyPair::generate().unwrap();
    let theirs = rcgen::Issuer::new(ca_params("another CA"), other_key);
    let other = write_backend_cert(out, "other-ca", &theirs, (4096, 1, 1));
    (
        BackendIdentity {
            ca: ca.clone(),
            cert: Some(expired),
        },
        BackendIdentity {
            ca,
            cert: Some(other),
        },
    )
}

/// TLS and transport: refused certificates, wrong ALPN, the wrong protocol on a port.
pub(crate) fn transport_cases(c: &Ctx) -> Vec<Case> {
    let mut t = Vec::new();
    t.push(Case {
        name: "backend without a client certificate".into(),
        action: act(|c| {
            let id = BackendIdentity {
                ca: c.ca(),
                cert: None,
            };
            Box::pin(quic_attempt(c.rpc, backend_config(&id)))
        }),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 116",
            &["backend handshake failed", "peer sent no certificates"],
        ),
    });
    t.push(Case {
        name: "backend with an expired client certificate".into(),
        action: act(|c| Box::pin(quic_attempt(c.rpc, backend_config(&c.expired)))),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 45",
            &["backend handshake failed", "certificate expired"],
        ),
    });
    t.push(Case {
        name: "backend with a certificate from another CA".into(),
        action: act(|c| Box::pin(quic_attempt(c.rpc, backend_config(&c.other_ca)))),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 48",
            &[
                "backend handshake failed",
                "invalid peer certificate: UnknownIssuer",
            ],
        ),
    });
    t.push(Case {
        name: "wrong ALPN on the RPC port".into(),
        action: act(|c| {
            let dir = &c.dir;
            let cfg = rustls_client(
                &c.ca(),
                Some((&dir.join("backend.pem"), &dir.join("backend.key"))),
                b"h3",
            );
            Box::pin(quic_attempt(c.rpc, quic_client(cfg)))
        }),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 120",
            &[
                "backend handshake failed",
                "peer doesn't support any known protocol",
            ],
        ),
    });
    t.push(Case {
        name: "wrong ALPN on the client QUIC port".into(),
        action: act(|c| {
            let cfg = rustls_client(&c.ca(), None, b"h3");
            Box::pin(quic_attempt(c.quic, quic_client(cfg)))
        }),
        expect: reply(
            "Err(\"aborted by peer: the cryptographic handshake failed: error 120",
            &[
                "QUIC handshake failed",
                "peer doesn't support any known protocol",
            ],
        ),
    });
    for (what, port) in [("client QUIC", c.quic), ("RPC", c.rpc)] {
        if port.port() == c.tcp.port() {
            // The kernel gave the TCP listener the same number: nothing to refuse.
            eprintln!("skipping TCP to the {what} port: the TCP client port has its number");
        } else {
            t.push(Case {
                name: format!("TCP connection to the {what} port"),
                action: act(move |_| Box::pin(tcp_to(port))),
                expect: Expect::NoConnection,
            });
        }
        t.push(Case {
            name: format!("plain bytes as UDP datagrams to the {what} port"),
            action: act(move |_| Box::pin(datagrams(port, plain_datagrams()))),
            expect: Expect::NoConnection,
        });
        t.push(Case {
            name: format!("random UDP datagrams to the {what} port"),
            action: act(move |_| Box::pin(datagrams(port, random_datagrams()))),
            expect: Expect::NoConnection,
        });
    }
    t
}

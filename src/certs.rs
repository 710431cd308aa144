//! Generating the certificates and the token secret with rcgen.
//!
//! One run writes, into a directory:
//! - `ca.pem` / `ca.key`: the CA that signs the others and that backends are checked against;
//! - `server.pem` / `server.key`: the server's certificate (SANs `localhost`, `127.0.0.1`,
//!   `::1` and any extra names);
//! - `backend.pem` / `backend.key`: the backends' client certificate;
//! - `token.secret`: the HS256 secret for client tokens;
//! - `api.token`: the bearer token of the HTTP API (`http.api_token_file`), also
//!   added on its own to a directory that has the rest but not it.
//!
//! Private keys and the secret are written with mode 0600. Existing files are never
//! overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Names of the files in a certificate directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server.key";
pub const BACKEND_CERT: &str = "backend.pem";
pub const BACKEND_KEY: &str = "backend.key";
pub const TOKEN_SECRET: &str = "token.secret";
/// The HTTP API's bearer token; not in `ALL`: a directory made before the HTTP
/// API gets it added.
pub const API_TOKEN: &str = "api.token";

const ALL: [&str; 7] = [
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    BACKEND_CERT,
    BACKEND_KEY,
    TOKEN_SECRET,
];

/// Why certificates could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused the parameters (e.g. an invalid subject alternative name).
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The directory already holds some of the files; nothing was written.
    #[error("{path} already exists; refusing to overwrite existing certificates")]
    Exists { path: PathBuf },
    /// The HTTP API's token file could not be read, or holds no token.
    #[error("cannot read the HTTP API token {path}: {reason}")]
    ApiToken { path: PathBuf, reason: String },
    /// The directory holds some but not all files the server needs.
    #[error("{dir} is incomplete: {missing} is missing (remove the partial files or run `quicpush certs`)")]
    Incomplete { dir: PathBuf, missing: &'static str },
}

/// Whether `dir` holds none of the generated files.
fn is_empty(dir: &Path) -> bool {
    ALL.iter().all(|f| !dir.join(f).exists())
}

/// Generates everything in `dir` unless it already holds the certificates.
/// Returns whether it generated.
pub fn ensure(dir: &Path, extra_sans: &[String]) -> Result<bool, CertError> {
    if is_empty(dir) {
        generate(dir, extra_sans)?;
        return Ok(true);
    }
    for f in [CA_CERT, SERVER_CERT, SERVER_KEY] {
        if !dir.join(f).exists() {
            return Err(CertError::Incomplete {
                dir: dir.to_owned(),
                missing: f,
            });
        }
    }
    ensure_api_token(&dir.join(API_TOKEN))?;
    Ok(false)
}

/// Writes a random HTTP API token (32 bytes, hex, mode 0600) to `path` unless it
/// exists. Returns whether it wrote one.
pub fn ensure_api_token(path: &Path) -> Result<bool, CertError> {
    if path.exists() {
        return Ok(false);
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| CertError::Write {
            path: parent.to_owned(),
            source,
        })?;
    }
    write_file(path, &format!("{}\n", random_hex()), true)?;
    Ok(true)
}

/// Reads the HTTP API token: the file's first line, without surrounding blanks.
pub fn load_api_token(path: &Path) -> Result<String, CertError> {
    let err = |reason: String| CertError::ApiToken {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(err("the file holds no token".into()));
    }
    Ok(token.to_owned())
}

/// 32 random bytes in hex.
fn random_hex() -> String {
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut secret);
    secret.iter().map(|b| format!("{b:02x}")).collect()
}

/// Generates a CA, the server and backend certificates and the token secret in `dir`.
pub fn generate(dir: &Path, extra_sans: &[String]) -> Result<(), CertError> {
    for f in ALL {
        let path = dir.join(f);
        if path.exists() {
            return Err(CertError::Exists { path });
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })?;

    let gen = |what| move |source| CertError::Generate { what, source };

    let ca_key = KeyPair::generate().map_err(gen("CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen("CA"))?;
    ca_params.distinguished_name = name("quicpush CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(gen("CA"))?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut sans = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    for s in extra_sans {
        if !sans.contains(s) {
            sans.push(s.clone());
        }
    }
    let server_key = KeyPair::generate().map_err(gen("server key"))?;
    let mut server_params = CertificateParams::new(sans).map_err(gen("server certificate"))?;
    server_params.distinguished_name = name("quicpush server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .map_err(gen("server certificate"))?;

    let backend_key = KeyPair::generate().map_err(gen("backend key"))?;
    let mut backend_params =
        CertificateParams::new(vec!["backend".to_owned()]).map_err(gen("backend certificate"))?;
    backend_params.distinguished_name = name("quicpush backend");
    backend_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    backend_params.use_authority_key_identifier_extension = true;
    let backend_cert = backend_params
        .signed_by(&backend_key, &issuer)
        .map_err(gen("backend certificate"))?;

    let secret_hex = random_hex();

    write(dir, CA_CERT, &ca_cert.pem(), false)?;
    write(dir, CA_KEY, &ca_key_pem, true)?;
    write(dir, SERVER_CERT, &server_cert.pem(), false)?;
    write(dir, SERVER_KEY, &server_key.serialize_pem(), true)?;
    write(dir, BACKEND_CERT, &backend_cert.pem(), false)?;
    write(dir, BACKEND_KEY, &backend_key.serialize_pem(), true)?;
    write(dir, TOKEN_SECRET, &format!("{secret_hex}\n"), true)?;
    ensure_api_token(&dir.join(API_TOKEN))?;
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn write(dir: &Path, file: &str, contents: &str, private: bool) -> Result<(), CertError> {
    write_file(&dir.join(file), contents, private)
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let path = path.to_owned();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let res = opts
        .open(&path)
        .and_then(|mut f| f.write_all(contents.as_bytes()));
    res.map_err(|source| CertError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_all_files_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["push.example.com".into()]).unwrap();
        for f in ALL {
            assert!(dir.path().join(f).exists(), "{f}");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [CA_KEY, SERVER_KEY, BACKEND_KEY, TOKEN_SECRET] {
                let mode = std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        let secret = crate::auth::load_secret(&dir.path().join(TOKEN_SECRET)).unwrap();
        assert_eq!(secret.len(), 64);
        let token = load_api_token(&dir.path().join(API_TOKEN)).unwrap();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(API_TOKEN))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_directory_without_the_api_token_gets_one_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[]).unwrap();
        let path = dir.path().join(API_TOKEN);
        let first = load_api_token(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(
            !ensure(dir.path(), &[]).unwrap(),
            "the certificates existed"
        );
        let second = load_api_token(&path).unwrap();
        assert_ne!(first, second);
        assert!(!ensure_api_token(&path).unwrap());
        assert_eq!(load_api_token(&path).unwrap(), second);
        std::fs::write(&path, "  \n").unwrap();
        let err = load_api_token(&path).unwrap_err().to_string();
        assert!(
            err.contains("no token") && err.contains("api.token"),
            "{err}"
        );
    }

    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[]).unwrap();
        assert!(matches!(
            generate(dir.path(), &[]),
            Err(CertError::Exists { .. })
        ));
        assert!(!ensure(dir.path(), &[]).unwrap());
    }

    #[test]
    fn ensure_generates_once_and_spots_partial_dirs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure(dir.path(), &[]).unwrap());
        assert!(!ensure(dir.path(), &[]).unwrap());
        std::fs::remove_file(dir.path().join(SERVER_KEY)).unwrap();
        assert!(matches!(
            ensure(dir.path(), &[]),
            Err(CertError::Incomplete {
                missing: SERVER_KEY,
                ..
            })
        ));
    }

    #[test]
    fn bad_san_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            generate(dir.path(), &["bäd.example".into()]),
            Err(CertError::Generate { .. })
        ));
    }
}

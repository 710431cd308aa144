//! The Auth frame's token.
//!
//! - `jwt` mode: the body is an HS256 JWT. The algorithm is fixed here, never taken
//!   from the token's header. Claims: `key`, `mid`, `room_id`, `platform`, `accepts`,
//!   `exp` (required).
//! - `open` mode: the body is goim's plain JSON token, not verified.
//!
//! Either way the result is an [`Identity`]; an empty key gets a generated UUID.
//!
//! A client that wants to resume adds a `resume` object (see [`crate::resume`]):
//! a field of the open token, or, in jwt mode, a JSON body `{"token": "<jwt>",
//! "resume": {...}}` in place of the bare JWT.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AuthMode;
use crate::registry::MAX_FILTER_OPS;
use crate::resume::ResumeRequest;

/// Longest key or room id accepted, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Shortest HS256 secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 30;

/// Why an Auth body was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The Auth body is empty.
    #[error("missing token")]
    Missing,
    /// The token's signature does not match the server's secret.
    #[error("bad token signature")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The token is not a well-formed HS256 JWT with the required claims.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The resume request names another key than the one authenticated.
    #[error("resume request is for key {asked:?}, but the token authenticates {key:?}")]
    ResumeKeyMismatch { asked: String, key: String },
    /// The resume request is not valid JSON of the expected shape.
    #[error("malformed resume request: {0}")]
    BadResume(String),
    /// A claim has a value the server does not accept.
    #[error("invalid claim `{claim}`: {reason}")]
    InvalidClaim {
        claim: &'static str,
        reason: &'static str,
    },
}

/// Why the token secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read token secret {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file holds too few bytes to be a safe HS256 secret.
    #[error("token secret {path} is {len} bytes; at least {MIN_SECRET_LEN} are required")]
    TooShort { path: String, len: usize },
}

/// Who a client is, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Connection key; unique per connection (a second connection replaces the first).
    pub key: String,
    /// User id, when the token names one.
    pub mid: Option<i64>,
    /// Room to join at once.
    pub room: Option<String>,
    pub platform: String,
    /// Ops this client wants; empty means all.
    pub accepts: Vec<u32>,
    /// Present when the client negotiated resume: its positions.
    pub resume: Option<ResumeRequest>,
}

/// JWT claims, also used by `quicpush token` to issue tokens.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepts: Vec<u32>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

/// goim's plain JSON token (open mode).
#[derive(Debug, Deserialize)]
struct OpenToken {
    #[serde(default)]
    mid: i64,
    #[serde(default)]
    key: String,
    #[serde(default)]
    room_id: String,
    #[serde(default)]
    platform: String,
    #[serde(default)]
    accepts: Vec<u32>,
    #[serde(default)]
    resume: Option<serde_json::Value>,
}

/// jwt mode's JSON body, for a client that resumes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwtEnvelope {
    token: String,
    #[serde(default)]
    resume: Option<serde_json::Value>,
}

fn parse_resume(v: Option<serde_json::Value>) -> Result<Option<ResumeRequest>, AuthError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(|e| AuthError::BadResume(e.to_string())),
    }
}

/// Checks Auth bodies according to the configured mode.
#[derive(Clone)]
pub enum Authenticator {
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
    },
    Open,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Jwt { .. } => f.write_str("Authenticator::Jwt"),
            Authenticator::Open => f.write_str("Authenticator::Open"),
        }
    }
}

impl Authenticator {
    /// An HS256 verifier for `secret`.
    pub fn jwt(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        Authenticator::Jwt {
            key: DecodingKey::from_secret(secret),
            validation: Box::new(validation),
        }
    }

    /// The authenticator for a mode, loading the secret when the mode needs one.
    pub fn from_mode(mode: AuthMode, secret_file: &Path) -> Result<Self, SecretError> {
        match mode {
            AuthMode::Open => Ok(Authenticator::Open),
            AuthMode::Jwt => Ok(Self::jwt(&load_secret(secret_file)?)),
        }
    }

    /// Checks an Auth body and returns who the client is.
    pub fn verify(&self, body: &[u8]) -> Result<Identity, AuthError> {
        let body = body.trim_ascii();
        if body.is_empty() {
            return Err(AuthError::Missing);
        }
        match self {
            Authenticator::Jwt { key, validation } => {
                let (token, resume) = if body.first() == Some(&b'{') {
                    let env: JwtEnvelope = serde_json::from_slice(body)
                        .map_err(|e| AuthError::Malformed(format!("auth body: {e}")))?;
                    (
                        std::borrow::Cow::Owned(env.token),
                        parse_resume(env.resume)?,
                    )
                } else {
                    let t = std::str::from_utf8(body)
                        .map_err(|_| AuthError::Malformed("token is not UTF-8".into()))?;
                    (std::borrow::Cow::Borrowed(t), None)
                };
                let token = &*token;
                let data =
                    jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e
                        .kind()
                    {
                        ErrorKind::InvalidSignature => AuthError::BadSignature,
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        _ => AuthError::Malformed(e.to_string()),
                    })?;
                let c = data.claims;
                identity(
                    c.key.unwrap_or_default(),
                    c.mid,
                    c.room_id.unwrap_or_default(),
                    c.platform.unwrap_or_default(),
                    c.accepts,
                    resume,
                    false,
                )
            }
            Authenticator::Open => {
                let t: OpenToken = serde_json::from_slice(body)
                    .map_err(|e| AuthError::Malformed(format!("open token: {e}")))?;
                identity(
                    t.key,
                    (t.mid != 0).then_some(t.mid),
                    t.room_id,
                    t.platform,
                    t.accepts,
                    parse_resume(t.resume)?,
                    true,
                )
            }
        }
    }
}

fn identity(
    key: String,
    mid: Option<i64>,
    room: String,
    platform: String,
    mut accepts: Vec<u32>,
    resume: Option<ResumeRequest>,
    adopt_key: bool,
) -> Result<Identity, AuthError> {
    for (claim, value) in [("key", &key), ("room_id", &room), ("platform", &platform)] {
        if value.len() > MAX_ID_LEN {
            return Err(AuthError::InvalidClaim {
                claim,
                reason: "longer than 256 bytes",
            });
        }
    }
    if accepts.len() > MAX_FILTER_OPS {
        return Err(AuthError::InvalidClaim {
            claim: "accepts",
            reason: "more than 1024 ops",
        });
    }
    accepts.sort_unstable();
    accepts.dedup();
    let key = if key.is_empty() {
        // In open mode (unverified anyway) a resuming client that let the server
        // pick its key comes back with it. A JWT without a key never adopts one
        // from the client: that would let any holder of such a token read any
        // key's history.
        match resume
            .as_ref()
            .filter(|_| adopt_key)
            .and_then(|r| r.key.clone())
        {
            Some(k) if !k.is_empty() && k.len() <= MAX_ID_LEN => k,
            _ => uuid::Uuid::new_v4().to_string(),
        }
    } else {
        key
    };
    if let Some(asked) = resume.as_ref().and_then(|r| r.key.as_ref()) {
        if *asked != key {
            return Err(AuthError::ResumeKeyMismatch {
                asked: asked.clone(),
                key,
            });
        }
    }
    Ok(Identity {
        key,
        mid,
        room: (!room.is_empty()).then_some(room),
        platform,
        accepts,
        resume,
    })
}

/// Reads the HS256 secret: the file's bytes with surrounding whitespace trimmed.
pub fn load_secret(path: &Path) -> Result<Vec<u8>, SecretError> {
    let raw = std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let secret = raw.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_LEN {
        return Err(SecretError::TooShort {
            path: path.display().to_string(),
            len: secret.len(),
        });
    }
    Ok(secret)
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs `claims` as an HS256 JWT.
pub fn issue(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
}

/// Claims valid for `ttl` from now.
pub fn claims_for(key: &str, ttl: Duration) -> Claims {
    Claims {
        key: Some(key.to_owned()),
        exp: now_secs() + ttl.as_secs(),
        ..Claims::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn token(claims: &Claims) -> String {
        issue(SECRET, claims).unwrap()
    }

    #[test]
    fn valid_jwt_gives_identity() {
        let mut c = claims_for("k1", Duration::from_secs(60));
        c.mid = Some(42);
        c.room_id = Some("live://1".into());
        c.accepts = vec![1001, 1000, 1000];
        let id = Authenticator::jwt(SECRET)
            .verify(token(&c).as_bytes())
            .unwrap();
        assert_eq!(id.key, "k1");
        assert_eq!(id.mid, Some(42));
        assert_eq!(id.room.as_deref(), Some("live://1"));
        assert_eq!(id.accepts, vec![1000, 1001]);
    }

    #[test]
    fn missing_key_is_generated() {
        let c = Claims {
            exp: now_secs() + 60,
            ..Claims::default()
        };
        let id = Authenticator::jwt(SECRET)
            .verify(token(&c).as_bytes())
            .unwrap();
        assert_eq!(id.key.len(), 36, "a UUID: {}", id.key);
    }

    #[test]
    fn bad_signature_is_refused() {
        let c = claims_for("k", Duration::from_secs(60));
        let t = issue(b"another-secret-another-secret-xx", &c).unwrap();
        assert_eq!(
            Authenticator::jwt(SECRET).verify(t.as_bytes()),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn expired_is_refused() {
        let c = Claims {
            key: Some("k".into()),
            exp: now_secs() - 3600,
            ..Claims::default()
        };
        assert_eq!(
            Authenticator::jwt(SECRET).verify(token(&c).as_bytes()),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn missing_and_garbage_are_refused() {
        let a = Authenticator::jwt(SECRET);
        assert_eq!(a.verify(b""), Err(AuthError::Missing));
        assert_eq!(a.verify(b"  \n"), Err(AuthError::Missing));
        assert!(matches!(
            a.verify(b"not a jwt"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            a.verify(&[0xff, 0xfe]),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        // header {"alg":"none","typ":"JWT"}, claims {"key":"k","exp":9999999999}, no signature
        let t = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJrZXkiOiJrIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(Authenticator::jwt(SECRET).verify(t.as_bytes()).is_err());
    }

    #[test]
    fn token_without_exp_is_refused() {
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"key": "k"}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(matches!(
            Authenticator::jwt(SECRET).verify(t.as_bytes()),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn overlong_key_is_refused() {
        let c = claims_for(&"x".repeat(300), Duration::from_secs(60));
        assert!(matches!(
            Authenticator::jwt(SECRET).verify(token(&c).as_bytes()),
            Err(AuthError::InvalidClaim { claim: "key", .. })
        ));
    }

    #[test]
    fn open_mode_reads_goim_json() {
        let body = br#"{"mid":123,"key":"","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002]}"#;
        let id = Authenticator::Open.verify(body).unwrap();
        assert_eq!(id.mid, Some(123));
        assert_eq!(id.room.as_deref(), Some("live://1000"));
        assert_eq!(id.platform, "web");
        assert_eq!(id.accepts, vec![1000, 1001, 1002]);
        assert!(!id.key.is_empty());
        assert!(matches!(
            Authenticator::Open.verify(b"{nope"),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn resume_is_read_in_both_modes_and_must_name_the_same_key() {
        let open = Authenticator::Open;
        let id = open
            .verify(
                br#"{"key":"k1","resume":{"key":"k1","positions":{"key":{"epoch":3,"offset":9}}}}"#,
            )
            .unwrap();
        let r = id.resume.unwrap();
        assert_eq!(
            r.positions.key,
            Some(crate::resume::Position {
                epoch: 3,
                offset: 9
            })
        );
        assert!(open.verify(br#"{"key":"k1"}"#).unwrap().resume.is_none());
        assert_eq!(
            open.verify(br#"{"key":"k1","resume":{"key":"k2"}}"#),
            Err(AuthError::ResumeKeyMismatch {
                asked: "k2".into(),
                key: "k1".into()
            })
        );
        assert!(matches!(
            open.verify(br#"{"key":"k1","resume":{"positions":{"key":{"epoch":"x"}}}}"#),
            Err(AuthError::BadResume(_))
        ));
        // open mode: a generated key comes back through the resume request
        let id = open.verify(br#"{"resume":{"key":"gen-1"}}"#).unwrap();
        assert_eq!(id.key, "gen-1");

        let a = Authenticator::jwt(SECRET);
        let t = token(&claims_for("k1", Duration::from_secs(60)));
        let body = format!(r#"{{"token":"{t}","resume":{{"key":"k1"}}}}"#);
        let id = a.verify(body.as_bytes()).unwrap();
        assert_eq!((id.key.as_str(), id.resume.is_some()), ("k1", true));
        let body = format!(r#"{{"token":"{t}","resume":{{"key":"k2"}}}}"#);
        assert!(matches!(
            a.verify(body.as_bytes()),
            Err(AuthError::ResumeKeyMismatch { .. })
        ));
        // a JWT without a key never adopts the client's
        let keyless = token(&Claims {
            exp: now_secs() + 60,
            ..Claims::default()
        });
        let body = format!(r#"{{"token":"{keyless}","resume":{{"key":"victim"}}}}"#);
        assert!(matches!(
            a.verify(body.as_bytes()),
            Err(AuthError::ResumeKeyMismatch { .. })
        ));
        assert!(
            a.verify(t.as_bytes()).unwrap().resume.is_none(),
            "a bare JWT"
        );
    }

    #[test]
    fn short_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "short\n").unwrap();
        assert!(matches!(
            load_secret(&p),
            Err(SecretError::TooShort { len: 5, .. })
        ));
        std::fs::write(&p, format!("{}\n", "a".repeat(64))).unwrap();
        assert_eq!(load_secret(&p).unwrap().len(), 64);
    }
}

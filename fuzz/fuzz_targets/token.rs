//! Fuzz target: arbitrary Auth bodies through the JWT and the open-mode
//! authenticators, and arbitrary claims signed with the server's secret, so that
//! claim checks are reached too. Nothing panics, and an accepted identity respects
//! the limits.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use quicpush::auth::{Authenticator, Identity, MAX_ID_LEN};
use quicpush::registry::MAX_FILTER_OPS;
use quicpush_fuzz::SECRET;

/// `{"alg":"HS256","typ":"JWT"}`
const HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

fn check(id: &Identity) {
    assert!(!id.key.is_empty() && id.key.len() <= MAX_ID_LEN);
    if let Some(room) = &id.room {
        assert!(!room.is_empty() && room.len() <= MAX_ID_LEN);
    }
    assert!(id.platform.len() <= MAX_ID_LEN);
    assert!(id.accepts.len() <= MAX_FILTER_OPS);
    assert!(
        id.accepts.windows(2).all(|w| w[0] < w[1]),
        "sorted, no duplicates"
    );
}

/// An HS256 token whose payload is `claims`, signed with [`SECRET`].
fn signed(claims: &[u8]) -> String {
    let input = format!("{HEADER}.{}", URL_SAFE_NO_PAD.encode(claims));
    let key = EncodingKey::from_secret(SECRET);
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{input}.{sig}")
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static JWT: Authenticator = Authenticator::jwt(SECRET);
    }
    JWT.with(|jwt| {
        if let Ok(id) = jwt.verify(data) {
            check(&id);
        }
        if let Ok(id) = jwt.verify(signed(data).as_bytes()) {
            check(&id);
        }
    });
    if let Ok(id) = Authenticator::Open.verify(data) {
        check(&id);
    }
});

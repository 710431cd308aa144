//! Fuzz target: arbitrary Auth bodies through the JWT and the open-mode
//! authenticators. Neither panics, and an accepted identity respects the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicpush::auth::{Authenticator, Identity, MAX_ID_LEN};
use quicpush::registry::MAX_FILTER_OPS;
use quicpush_fuzz::SECRET;

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

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static JWT: Authenticator = Authenticator::jwt(SECRET);
    }
    if let Ok(id) = JWT.with(|a| a.verify(data)) {
        check(&id);
    }
    if let Ok(id) = Authenticator::Open.verify(data) {
        check(&id);
    }
});

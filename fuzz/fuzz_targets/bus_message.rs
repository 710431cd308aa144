//! Fuzz target: arbitrary bytes as a message on the tier's bus, through every
//! parser a node runs on one: the bincode envelope, and the positioned key and
//! user pushes of shared history. Nothing panics, and what parses round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicpush::cluster::envelope;
use quicpush::cluster::shared::{message_prefix, user_message_prefix, KeyPush, UserPush};

fuzz_target!(|data: &[u8]| {
    if let Ok(w) = envelope::decode(data) {
        let again = envelope::encode(&w.from, w.body.clone()).expect("a decoded envelope encodes");
        assert_eq!(envelope::decode(&again).expect("and decodes again").body, w.body);
    }
    if let Some(p) = KeyPush::parse(data) {
        assert!(p.position.offset > 0);
        let mut m = message_prefix(&p.key);
        m.extend_from_slice(&data[m.len()..]);
        assert_eq!(KeyPush::parse(&m), Some(p));
    }
    if let Some(p) = UserPush::parse(data) {
        assert!(p.position.offset > 0);
        assert_eq!(&data[..9], &user_message_prefix(p.mid)[..]);
    }
});

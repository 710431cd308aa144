//! Fuzz target: arbitrary bytes as an RPC message (length prefix, call id, payload)
//! and as a bare payload decoded as a `Request`. Nothing panics, and a request that
//! decodes re-encodes to a message that decodes back equal.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use quicpush::codec::{self, CodecError, PREFIX_LEN};
use quicpush::rpc::proto::Request;

fn round_trip(payload: &[u8]) {
    let Ok(req) = codec::decode_payload::<Request>(payload) else {
        return;
    };
    let mut buf = BytesMut::new();
    codec::write_message(&mut buf, 7, &req).unwrap();
    let (id, len) = codec::peek_prefix(&buf).unwrap().unwrap();
    assert_eq!(id, 7);
    assert_eq!(len as usize, buf.len() - PREFIX_LEN);
    // the encoding is the shortest; the input may have used longer varints
    assert!(len as usize <= payload.len());
    let again: Request = codec::decode_payload(&buf[PREFIX_LEN..]).unwrap();
    assert_eq!(again, req);
    let _ = req.method();
}

fuzz_target!(|data: &[u8]| {
    match codec::peek_prefix(data) {
        Ok(None) => assert!(data.len() < PREFIX_LEN),
        Ok(Some((id, len))) => {
            assert_eq!(id.to_be_bytes()[..], data[4..PREFIX_LEN]);
            let raw = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            assert_eq!(len + 8, u64::from(raw));
            // the payload, when the message is all there (as the server reads it)
            let rest = &data[PREFIX_LEN..];
            if let Ok(len) = usize::try_from(len) {
                if rest.len() >= len {
                    round_trip(&rest[..len]);
                }
            }
        }
        Err(CodecError::ShortLength(len)) => assert!(len < 8),
        Err(e) => panic!("unexpected prefix error {e}"),
    }
    // and the whole input as a payload
    round_trip(data);
});

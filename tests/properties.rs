//! Property tests of the two wire formats: goim frames and the RPC codec.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use quicpush::codec::{self, PREFIX_LEN};
use quicpush::protocol::{self, Frame, DEFAULT_MAX_BODY, HEADER_LEN};
use quicpush::rpc::proto::{PushItem, Request};

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        bytes(DEFAULT_MAX_BODY),
    )
        .prop_map(|(ver, op, seq, body)| Frame { ver, op, seq, body })
}

/// Small frames, for sequences of many.
fn small_frame() -> impl Strategy<Value = Frame> {
    (any::<u16>(), any::<u32>(), any::<u32>(), bytes(64)).prop_map(|(ver, op, seq, body)| Frame {
        ver,
        op,
        seq,
        body,
    })
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,16}", "[a-z0-9:/]{0,16}"]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        (text(), any::<u32>(), bytes(64)).prop_map(|(key, op, body)| Request::PushMsg {
            key,
            op,
            body
        }),
        (vec(text(), 0..8), any::<u32>(), bytes(64))
            .prop_map(|(keys, op, body)| Request::MPushMsg { keys, op, body }),
        vec(
            (text(), any::<u32>(), bytes(32)).prop_map(|(key, op, body)| PushItem {
                key,
                op,
                body
            }),
            0..8
        )
        .prop_map(|msgs| Request::MPushMsgs { msgs }),
        (vec(any::<i64>(), 0..8), any::<u32>(), bytes(64))
            .prop_map(|(mids, op, body)| Request::PushUser { mids, op, body }),
        (any::<u32>(), bytes(64), any::<u32>()).prop_map(|(op, body, speed)| Request::Broadcast {
            op,
            body,
            speed
        }),
        (text(), any::<u32>(), bytes(64)).prop_map(|(room, op, body)| Request::BroadcastRoom {
            room,
            op,
            body
        }),
        Just(Request::Rooms),
        Just(Request::Online),
        text().prop_map(|key| Request::Kick { key }),
    ]
}

/// Feeds `data` to the decoder in pieces of the given sizes (cycled) and returns
/// what it decoded and the bytes it had left.
fn decode_in_chunks(data: &[u8], sizes: &[usize], max_body: usize) -> (Vec<Frame>, BytesMut) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = data;
    let mut sizes = sizes.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().unwrap()).clamp(1, rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        while let Some(f) = protocol::decode(&mut buf, max_body).unwrap() {
            frames.push(f);
        }
    }
    (frames, buf)
}

proptest! {
    #[test]
    fn a_frame_decodes_to_itself_and_consumes_exactly_its_bytes(f in frame(), tail in bytes(8)) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        prop_assert_eq!(buf.len(), f.encoded_len());
        prop_assert_eq!(&buf[..], &f.to_bytes()[..]);
        buf.extend_from_slice(&tail);
        let got = protocol::decode(&mut buf, DEFAULT_MAX_BODY).unwrap();
        prop_assert_eq!(got, Some(f));
        prop_assert_eq!(&buf[..], &tail[..]);
    }

    #[test]
    fn frames_split_at_any_boundaries_decode_the_same(
        frames in vec(small_frame(), 1..8),
        sizes in vec(1usize..40, 1..8),
    ) {
        let data = protocol::join_raw(&frames);
        let (got, left) = decode_in_chunks(&data, &sizes, 64);
        prop_assert_eq!(got, frames.clone());
        prop_assert!(left.is_empty());
        prop_assert_eq!(protocol::split_raw(&data, 64).unwrap(), frames);
    }

    #[test]
    fn any_bytes_decode_or_fail_without_consuming_a_partial_frame(
        data in vec(any::<u8>(), 0..512),
        max_body in 0usize..600,
    ) {
        let mut buf = BytesMut::from(&data[..]);
        loop {
            let before = buf.len();
            match protocol::decode(&mut buf, max_body) {
                Ok(Some(f)) => {
                    prop_assert_eq!(before - buf.len(), f.encoded_len());
                    prop_assert!(f.body.len() <= max_body);
                }
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
                Err(_) => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
            }
        }
        let _ = protocol::split_raw(&Bytes::from(data), max_body);
    }

    #[test]
    fn a_header_claiming_more_than_the_limit_is_refused_before_its_body(
        f in small_frame(),
        over in 1usize..64,
    ) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        buf.truncate(HEADER_LEN);
        let max = f.body.len().saturating_sub(over);
        if max < f.body.len() {
            prop_assert!(protocol::decode(&mut buf, max).is_err());
        }
    }

    #[test]
    fn restamping_seq_changes_only_seq(f in small_frame(), seq in any::<u32>()) {
        let mut out = BytesMut::new();
        protocol::put_with_seq(&mut out, &f.to_bytes(), seq);
        let got = protocol::decode(&mut out, 64).unwrap().unwrap();
        prop_assert_eq!(got, Frame { seq, ..f });
        prop_assert!(out.is_empty());
    }

    #[test]
    fn a_request_round_trips_through_the_rpc_codec(
        reqs in vec((any::<u64>(), request()), 1..4),
    ) {
        let mut buf = BytesMut::new();
        for (id, req) in &reqs {
            codec::write_message(&mut buf, *id, req).unwrap();
        }
        // messages back to back, each found by its prefix
        let mut rest = &buf[..];
        for (id, req) in &reqs {
            let (got_id, len) = codec::peek_prefix(rest).unwrap().unwrap();
            prop_assert_eq!(got_id, *id);
            let end = PREFIX_LEN + len as usize;
            let got: Request = codec::decode_payload(&rest[PREFIX_LEN..end]).unwrap();
            prop_assert_eq!(&got, req);
            rest = &rest[end..];
        }
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn any_bytes_as_a_request_decode_or_fail(data in vec(any::<u8>(), 0..256)) {
        let _ = codec::peek_prefix(&data);
        if let Ok(req) = codec::decode_payload::<Request>(&data) {
            let mut buf = BytesMut::new();
            codec::write_message(&mut buf, 1, &req).unwrap();
            let again: Request = codec::decode_payload(&buf[PREFIX_LEN..]).unwrap();
            prop_assert_eq!(again, req);
        }
    }

    #[test]
    fn a_truncated_request_is_an_error(req in request(), cut in any::<prop::sample::Index>()) {
        let mut buf = BytesMut::new();
        codec::write_message(&mut buf, 1, &req).unwrap();
        let payload = &buf[PREFIX_LEN..];
        let cut = cut.index(payload.len());
        prop_assert!(codec::decode_payload::<Request>(&payload[..cut]).is_err());
    }
}

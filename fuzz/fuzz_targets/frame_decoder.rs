//! Fuzz target: arbitrary bytes through the goim frame decoder, whole and in chunks,
//! and through `split_raw`. A decoded frame re-encodes to exactly the bytes it was
//! decoded from, and decoding consumes exactly those bytes.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use quicpush::protocol::{self, Frame, FrameError, HEADER_LEN};

/// Everything `decode` takes off `buf`, and how it stopped.
fn decode_all(data: &[u8], max_body: usize) -> (Vec<Frame>, Result<(), FrameError>) {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    loop {
        let before = buf.clone();
        match protocol::decode(&mut buf, max_body) {
            Ok(Some(f)) => {
                let used = before.len() - buf.len();
                assert_eq!(used, f.encoded_len(), "consumed what it returned");
                assert_eq!(
                    &f.to_bytes()[..],
                    &before[..used],
                    "re-encodes to its bytes"
                );
                assert!(f.body.len() <= max_body);
                assert_eq!(&buf[..], &before[used..]);
                frames.push(f);
            }
            Ok(None) => {
                assert_eq!(buf, before, "an incomplete frame consumes nothing");
                if buf.len() >= HEADER_LEN {
                    let pack_len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    assert!(buf.len() < pack_len as usize, "a whole frame was left");
                }
                return (frames, Ok(()));
            }
            Err(e) => {
                assert_eq!(buf, before, "an error consumes nothing");
                return (frames, Err(e));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // the limit and the chunk size come from the input
    let max_body = usize::from(u16::from_be_bytes([data[0], data[1]]));
    let chunk = usize::from(data[2]).max(1);
    let data = &data[3..];

    let (frames, end) = decode_all(data, max_body);
    let used: usize = frames.iter().map(Frame::encoded_len).sum();

    // Fed in chunks, the decoder yields the same frames and stops the same way.
    let mut buf = BytesMut::new();
    let mut chunked = Vec::new();
    let mut chunked_end = Ok(());
    'feed: for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match protocol::decode(&mut buf, max_body) {
                Ok(Some(f)) => chunked.push(f),
                Ok(None) => break,
                Err(e) => {
                    chunked_end = Err(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(chunked, frames, "chunks of {chunk}");
    assert_eq!(chunked_end, end, "chunks of {chunk}");

    // Restamping a frame's seq changes nothing else.
    for f in &frames {
        let mut out = BytesMut::new();
        protocol::put_with_seq(&mut out, &f.to_bytes(), f.seq.wrapping_add(1));
        let g = protocol::decode(&mut out, max_body).unwrap().unwrap();
        assert_eq!(g.seq, f.seq.wrapping_add(1));
        assert_eq!((g.ver, g.op, &g.body), (f.ver, f.op, &f.body));
        assert!(out.is_empty());
    }

    // split_raw: whole frames or an error; what splits joins back to the input.
    let body = Bytes::copy_from_slice(data);
    match protocol::split_raw(&body, max_body) {
        Ok(split) => {
            assert_eq!(split, frames);
            assert_eq!(used, data.len());
            assert_eq!(protocol::join_raw(&split), body);
        }
        Err(FrameError::TruncatedRaw) => assert!(end.is_ok() && used < data.len()),
        Err(e) => assert_eq!(Err(e), end),
    }
});

//! The RPC wire encoding. Every use of bincode lives in this module, so a change of
//! encoding is a one-file change.
//!
//! A message on an RPC stream is `len: u32 BE | call_id: u64 BE | payload`, where
//! `len` counts the call id and the payload, and the payload is the bincode (serde,
//! standard config: varints, little endian) encoding of a request or a reply.

use bytes::{Buf, BufMut, BytesMut};
use serde::{de::DeserializeOwned, Serialize};

/// Bytes before the payload: length prefix and call id.
pub const PREFIX_LEN: usize = 12;

/// Why a payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The payload is not a valid encoding of the expected type.
    #[error("malformed payload: {0}")]
    Decode(String),
    /// The payload has bytes left over after the value.
    #[error("payload has {0} trailing bytes")]
    Trailing(usize),
    /// The value could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(String),
    /// A message's length field is shorter than its call id.
    #[error("message length {0} is shorter than the 8-byte call id")]
    ShortLength(u64),
}

/// The largest payload the codec will ever decode; callers enforce smaller limits
/// before decoding. Bounds what a length claimed inside a payload can allocate.
pub const MAX_PAYLOAD: usize = 64 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_PAYLOAD>()
}

/// Appends one message (`len | id | payload`) to `dst`.
pub fn write_message<T: Serialize>(
    dst: &mut BytesMut,
    id: u64,
    value: &T,
) -> Result<(), CodecError> {
    let start = dst.len();
    dst.put_u32(0);
    dst.put_u64(id);
    let mut w = dst.writer();
    let res = bincode::serde::encode_into_std_write(value, &mut w, config());
    let dst = w.into_inner();
    match res {
        Ok(_) => {
            let len = (dst.len() - start - 4) as u32;
            dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            dst.truncate(start);
            Err(CodecError::Encode(e.to_string()))
        }
    }
}

/// The header of the next message in `src`, if its 12 bytes are there:
/// `(call_id, payload_len)`. Consumes nothing. A length too short to hold the call
/// id means the stream is out of step and cannot be trusted further.
pub fn peek_prefix(src: &[u8]) -> Result<Option<(u64, u64)>, CodecError> {
    if src.len() < PREFIX_LEN {
        return Ok(None);
    }
    let mut h = &src[..PREFIX_LEN];
    let len = h.get_u32() as u64;
    let id = h.get_u64();
    if len < 8 {
        return Err(CodecError::ShortLength(len));
    }
    Ok(Some((id, len - 8)))
}

/// The bare payload of `value` (no length or call id): for messages that are
/// framed by their carrier, such as the cluster bus.
pub fn encode_payload<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a whole payload; trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Trailing(payload.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        A { key: String, n: u32 },
        B(Vec<u8>),
    }

    #[test]
    fn message_round_trip() {
        let mut buf = BytesMut::new();
        let m = Msg::A {
            key: "k".into(),
            n: 9,
        };
        write_message(&mut buf, 77, &m).unwrap();
        let (id, len) = peek_prefix(&buf).unwrap().unwrap();
        assert_eq!(id, 77);
        assert_eq!(len as usize, buf.len() - PREFIX_LEN);
        let got: Msg = decode_payload(&buf[PREFIX_LEN..]).unwrap();
        assert_eq!(got, m);
    }

    #[test]
    fn bad_payloads_are_errors() {
        assert!(decode_payload::<Msg>(&[9, 9, 9]).is_err());
        let mut buf = BytesMut::new();
        write_message(&mut buf, 1, &Msg::B(vec![1, 2])).unwrap();
        let mut payload = buf[PREFIX_LEN..].to_vec();
        payload.push(0);
        assert!(matches!(
            decode_payload::<Msg>(&payload),
            Err(CodecError::Trailing(1))
        ));
        assert!(decode_payload::<Msg>(&buf[PREFIX_LEN..buf.len() - 1]).is_err());
    }

    #[test]
    fn short_prefix_is_incomplete() {
        assert_eq!(peek_prefix(&[0; 11]).unwrap(), None);
    }

    #[test]
    fn length_shorter_than_the_call_id_is_an_error() {
        let mut b = vec![0, 0, 0, 7];
        b.extend_from_slice(&[0; 8]);
        assert!(matches!(peek_prefix(&b), Err(CodecError::ShortLength(7))));
    }
}

//! What one node asks another over the bus: serde + bincode through
//! [`crate::codec`], with a version byte so nodes of different versions refuse
//! each other's messages instead of misreading them.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::error::ClusterError;
use crate::codec;
use crate::rpc::proto::PushItem;

/// The envelope version this node writes and reads.
pub const VERSION: u8 = 1;

/// Why a node asks another to close a key's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KickReason {
    /// The key connected to another node (`new_node`).
    Replaced,
    /// A backend called `Kick` on another node.
    Kicked,
}

/// One request from a node to another (or to all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Envelope {
    /// One message to these keys.
    PushKeys {
        keys: Vec<String>,
        op: u32,
        body: Bytes,
    },
    /// Many messages, each to its key (`MPushMsgs`).
    PushItems { msgs: Vec<PushItem> },
    /// One message to every connection of these user ids.
    PushUsers {
        mids: Vec<i64>,
        op: u32,
        body: Bytes,
    },
    /// One message to a room's members.
    Room { room: String, op: u32, body: Bytes },
    /// One message to every client (`speed` per node, 0 = no limit).
    Broadcast { op: u32, body: Bytes, speed: u32 },
    /// Close the key's connection if it is `conn` or older (a connection made
    /// after the kick was decided is left alone).
    Kick {
        key: String,
        reason: KickReason,
        conn: u64,
        new_node: String,
    },
}

/// An envelope on the wire: version, sending node, request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    pub version: u8,
    pub from: String,
    pub body: Envelope,
}

/// Encodes `body` from node `from`.
pub fn encode(from: &str, body: Envelope) -> Result<Vec<u8>, ClusterError> {
    Ok(codec::encode_payload(&Wire {
        version: VERSION,
        from: from.to_owned(),
        body,
    })?)
}

/// Decodes a bus message: garbage or another version is an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<Wire, ClusterError> {
    let version = *bytes.first().ok_or(ClusterError::Version {
        got: 0,
        want: VERSION,
    })?;
    if version != VERSION {
        return Err(ClusterError::Version {
            got: version,
            want: VERSION,
        });
    }
    Ok(codec::decode_payload(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Envelope> {
        let body = Bytes::from_static(b"hi");
        vec![
            Envelope::PushKeys {
                keys: vec!["a".into(), "b".into()],
                op: 1000,
                body: body.clone(),
            },
            Envelope::PushItems {
                msgs: vec![PushItem {
                    key: "k".into(),
                    op: 7,
                    body: body.clone(),
                }],
            },
            Envelope::PushUsers {
                mids: vec![1, -2],
                op: 1000,
                body: body.clone(),
            },
            Envelope::Room {
                room: "live://1".into(),
                op: 1000,
                body: body.clone(),
            },
            Envelope::Broadcast {
                op: 1000,
                body,
                speed: 5,
            },
            Envelope::Kick {
                key: "k".into(),
                reason: KickReason::Replaced,
                conn: 42,
                new_node: "n2".into(),
            },
        ]
    }

    #[test]
    fn every_envelope_round_trips() {
        for e in all() {
            let bytes = encode("n1", e.clone()).expect("encodes");
            let w = decode(&bytes).expect("decodes");
            assert_eq!((w.version, w.from.as_str(), w.body), (VERSION, "n1", e));
        }
    }

    #[test]
    fn garbage_and_other_versions_are_errors() {
        assert!(decode(b"").is_err());
        assert!(decode(b"\x01\xff\xff\xff\xff\xff\xff").is_err());
        let mut ok = encode("n1", all().remove(0)).expect("encodes");
        ok[0] = 9;
        assert!(matches!(
            decode(&ok),
            Err(ClusterError::Version { got: 9, .. })
        ));
        let mut truncated = encode("n1", all().remove(3)).expect("encodes");
        truncated.truncate(truncated.len() - 1);
        assert!(decode(&truncated).is_err());
        let mut trailing = encode("n1", all().remove(3)).expect("encodes");
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        // every prefix of every envelope: an error or a value, never a panic
        for e in all() {
            let b = encode("n", e).expect("encodes");
            for n in 0..b.len() {
                let _ = decode(&b[..n]);
            }
        }
    }
}

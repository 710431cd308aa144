//! Backend RPC: raw bytes on a backend stream, and the RPC cases (malformed,
//! oversized, reset and abandoned calls).

use bytes::{BufMut, Bytes, BytesMut};
use quicpush::codec;
use quicpush::rpc::proto::Response;
use quicpush::rpc::Request;
use quicpush::tls::{self, BackendIdentity};

use crate::common::process::connect_backend;
use crate::common::{read_replies, WAIT};
use crate::{act, closed, reply, Case, Ctx, Observed, Seen};

/// A raw backend connection with the right certificate, for sending bytes as they are.
struct RawRpc {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    port: u16,
}

impl RawRpc {
    async fn connect(c: &Ctx) -> RawRpc {
        let config = tls::rpc_client_config(&BackendIdentity::from_dir(&c.dir)).unwrap();
        let endpoint = tls::client_endpoint(c.rpc).unwrap();
        let conn = endpoint
            .connect_with(config, c.rpc, "localhost")
            .unwrap()
            .await
            .unwrap();
        let port = endpoint.local_addr().unwrap().port();
        RawRpc {
            endpoint,
            conn,
            port,
        }
    }

    /// Sends `bytes` on a new stream (then finishes it) and reads replies until
    /// `want` arrived or the server ended the stream.
    async fn exchange(&self, bytes: &[u8], want: usize) -> (Vec<(u64, Response)>, bool) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        send.finish().unwrap();
        read_replies(&mut recv, want).await
    }

    /// Closes the connection; the endpoint tells the server and drains in the background.
    fn close(self) {
        self.conn.close(0u32.into(), b"done");
        let endpoint = self.endpoint;
        tokio::spawn(async move { tokio::time::timeout(WAIT, endpoint.wait_idle()).await });
    }
}

fn message(id: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(8 + payload.len() as u32);
    b.put_u64(id);
    b.put_slice(payload);
    b.to_vec()
}

pub(crate) fn ping(id: u64) -> Vec<u8> {
    let mut b = BytesMut::new();
    codec::write_message(&mut b, id, &Request::Ping).unwrap();
    b.to_vec()
}

/// Sends `bytes` (then a Ping with call id 9, unless `then_ping` is false) on one
/// stream of a fresh backend connection; what came back, as text.
async fn rpc_bytes(c: &Ctx, mut bytes: Vec<u8>, then_ping: bool, want: usize) -> Observed {
    let rpc = RawRpc::connect(c).await;
    if then_ping {
        bytes.extend_from_slice(&ping(9));
    }
    let (replies, ended) = rpc.exchange(&bytes, want).await;
    let port = rpc.port;
    rpc.close();
    let seen = if replies.is_empty() && ended {
        Seen::Closed("stream ended without a reply".into())
    } else {
        Seen::Reply(format!("{replies:?}"))
    };
    Observed {
        seen,
        peer: Some(port),
    }
}

/// A valid PushMsg whose payload is cut short by 3 bytes, its length field matching the cut.
fn truncated_bincode() -> Vec<u8> {
    let mut full = BytesMut::new();
    let req = Request::PushMsg {
        key: "nobody".into(),
        op: 1000,
        body: Bytes::from_static(b"hello"),
    };
    codec::write_message(&mut full, 1, &req).unwrap();
    message(1, &full[codec::PREFIX_LEN..full.len() - 3])
}

/// A request over `rpc.max_request_bytes`, sent in full, then a Ping.
async fn over_request_limit(c: &Ctx) -> Observed {
    let over = c.config.rpc.max_request_bytes + 1;
    let mut bytes = BytesMut::new();
    bytes.put_u32(8 + over as u32);
    bytes.put_u64(1);
    bytes.put_bytes(0, over);
    rpc_bytes(c, bytes.to_vec(), true, 2).await
}

/// 1,000,000 one-letter keys in one MPushMsg (2 MB: under the request limit).
async fn million_keys(c: &Ctx) -> Observed {
    let b = connect_backend(c.rpc, &c.dir).await;
    let keys = vec!["k".to_string(); 1_000_000];
    let result = b.mpush_msg(keys, 1000, "x").await;
    let after = b.ping().await;
    b.close().await;
    Observed {
        seen: Seen::Reply(format!("{result:?}; then ping: {after:?}")),
        peer: None,
    }
}

/// A Ping, then half a request, then the stream is reset.
async fn reset_mid_request(c: &Ctx) -> Observed {
    let rpc = RawRpc::connect(c).await;
    let (mut send, mut recv) = rpc.conn.open_bi().await.unwrap();
    let mut bytes = ping(1);
    let mut half = message(2, &[0u8; 100]);
    half.truncate(60);
    bytes.extend_from_slice(&half);
    send.write_all(&bytes).await.unwrap();
    let (replies, _) = read_replies(&mut recv, 1).await;
    assert_eq!(replies, vec![(1, Ok(quicpush::rpc::Reply::Pong))]);
    send.reset(7u32.into()).unwrap();
    let (more, ended) = read_replies(&mut recv, 1).await;
    assert!(ended && more.is_empty(), "{more:?}");
    let port = rpc.port;
    rpc.close();
    Observed {
        seen: Seen::Closed("the server finished its side".into()),
        peer: Some(port),
    }
}

/// Calls written on four streams, and the connection closed before any reply is read.
async fn close_with_calls_in_flight(c: &Ctx) -> Observed {
    let rpc = RawRpc::connect(c).await;
    let mut out = BytesMut::new();
    for id in 0..100u64 {
        let req = match id % 4 {
            0 => Request::Ping,
            1 => Request::Online,
            2 => Request::Rooms,
            _ => Request::PushMsg {
                key: "nobody".into(),
                op: 1000,
                body: Bytes::from_static(b"in flight"),
            },
        };
        codec::write_message(&mut out, id, &req).unwrap();
    }
    // Both halves of each stream stay open until the connection closes: dropping a
    // receive half would tell the server to stop sending on it first.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = rpc.conn.open_bi().await.unwrap();
        send.write_all(&out).await.unwrap();
        streams.push((send, recv));
    }
    let port = rpc.port;
    rpc.close();
    drop(streams);
    Observed {
        seen: Seen::Closed("closed by the backend with 400 calls unanswered".into()),
        peer: Some(port),
    }
}

/// Backend RPC, raw bytes with the right certificate.
pub(crate) fn rpc_cases(c: &Ctx) -> Vec<Case> {
    let max_req = c.config.rpc.max_request_bytes;
    let mut t = Vec::new();
    t.push(Case {
        name: "RPC truncated bincode".into(),
        action: act(|c| Box::pin(rpc_bytes(c, truncated_bincode(), true, 2))),
        expect: reply(
            "[(1, Err(Malformed(\"malformed payload: ",
            &["malformed request call=1", "malformed payload"],
        ),
    });
    t.push(Case {
        name: "RPC unknown variant tag".into(),
        action: act(|c| Box::pin(rpc_bytes(c, message(1, &[200]), true, 2))),
        expect: reply(
            "[(1, Err(Malformed(\"malformed payload: ",
            &["malformed request call=1", "malformed payload"],
        ),
    });
    t.push(Case {
        name: "RPC length prefix of 4 GiB".into(),
        action: act(|c| {
            let mut b = BytesMut::new();
            b.put_u32(u32::MAX);
            b.put_u64(1);
            Box::pin(rpc_bytes(c, b.to_vec(), true, 1))
        }),
        expect: reply(
            format!(
                "[(1, Err(RequestTooLarge {{ len: {}, max: {max_req} }}))]",
                u32::MAX - 8
            ),
            &["request too large; refused call=1"],
        ),
    });
    t.push(Case {
        name: "RPC body over rpc.max_request_bytes".into(),
        action: act(|c| Box::pin(over_request_limit(c))),
        expect: reply(
            format!(
                "[(1, Err(RequestTooLarge {{ len: {}, max: {max_req} }})), (9, Ok(Pong))]",
                max_req + 1
            ),
            &["request too large; refused call=1"],
        ),
    });
    t.push(Case {
        name: "RPC 1,000,000 keys in one call".into(),
        action: act(|c| Box::pin(million_keys(c))),
        expect: reply(
            format!(
                "Err(Rpc(TooManyKeys {{ len: 1000000, max: {} }})); then ping: Ok(())",
                c.config.rpc.max_keys
            ),
            &[],
        ),
    });
    t.push(Case {
        name: "RPC length shorter than the call id".into(),
        action: act(|c| {
            let mut b = BytesMut::new();
            b.put_u32(7);
            b.put_u64(1);
            Box::pin(rpc_bytes(c, b.to_vec(), false, 1))
        }),
        expect: closed(&[
            "stream out of step; closing it",
            "message length 7 is shorter than the 8-byte call id",
        ]),
    });
    t.push(Case {
        name: "RPC stream reset in the middle of a request".into(),
        action: act(|c| Box::pin(reset_mid_request(c))),
        expect: closed(&["backend reset the stream", "stream reset by peer: error 7"]),
    });
    t.push(Case {
        name: "RPC connection closed with calls in flight".into(),
        action: act(|c| Box::pin(close_with_calls_in_flight(c))),
        expect: closed(&["backend disconnected"]),
    });
    t
}

//! Client connections: raw frames over TCP and QUIC, and the client cases (framing,
//! Auth and tokens, ops).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use quicpush::auth;
use quicpush::client::PushClient;
use quicpush::protocol::{self, op, Frame};
use tokio::io::AsyncWriteExt;

use crate::common::{next, Via, BOTH, WAIT};
use crate::transport::rustls_client;
use crate::{act, closed, reply, Case, Ctx, Observed, Seen, ROOM};

fn header(pack_len: u32, header_len: u16, op: u32) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(pack_len);
    b.put_u16(header_len);
    b.put_u16(1);
    b.put_u32(op);
    b.put_u32(1);
    b.to_vec()
}

pub(crate) fn frame(op: u32, body: impl Into<Bytes>) -> Vec<u8> {
    Frame::new(op, 1, body).to_bytes().to_vec()
}

/// A client connection that has not authenticated, and its local port.
pub(crate) async fn connect(c: &Ctx, via: Via) -> (PushClient, u16) {
    match via {
        Via::Tcp => {
            let s = tokio::net::TcpStream::connect(c.tcp).await.unwrap();
            s.set_nodelay(true).unwrap();
            let port = s.local_addr().unwrap().port();
            let (r, w) = s.into_split();
            (PushClient::from_parts(Box::new(r), Box::new(w), None), port)
        }
        Via::Quic => {
            let client = PushClient::connect_quic(c.quic, "localhost", &c.ca())
                .await
                .unwrap();
            let (r, w, _, quic) = client.into_parts();
            let port = quic.as_ref().unwrap().1.local_addr().unwrap().port();
            (PushClient::from_parts(r, w, quic), port)
        }
        other => panic!("bad input is played over TCP and QUIC here, not {other:?}"),
    }
}

/// A client authenticated as `key` (in `room`, if any), and its local port.
pub(crate) async fn connect_authed(
    c: &Ctx,
    via: Via,
    key: &str,
    room: Option<&str>,
) -> (PushClient, u16) {
    let (mut client, port) = connect(c, via).await;
    tokio::time::timeout(WAIT, client.auth(c.token(key, room)))
        .await
        .expect("no AuthReply in time")
        .expect("a valid token is accepted");
    (client, port)
}

/// Ends the client's sending side (TCP FIN, QUIC stream FIN); reading goes on.
pub(crate) async fn half_close(client: PushClient) -> PushClient {
    let (r, mut w, _, quic) = client.into_parts();
    let _ = tokio::time::timeout(WAIT, w.shutdown()).await;
    PushClient::from_parts(r, w, quic)
}

/// Reads until the server ends the connection; the ops of the frames that came first.
pub(crate) async fn until_closed(client: &mut PushClient) -> Vec<u32> {
    let mut ops = Vec::new();
    let read = async {
        loop {
            match client.next_frame().await {
                Ok(Some(f)) => ops.push(f.op),
                Ok(None) | Err(_) => return,
            }
        }
    };
    let in_time = tokio::time::timeout(WAIT, read).await.is_ok();
    assert!(
        in_time,
        "the server did not close the connection within {WAIT:?} (frames: {ops:?})"
    );
    ops
}

/// Sends `bytes` (after a valid Auth as `key`, if given), then, with `eof`, ends the
/// sending side, and waits for the server to close the connection.
async fn send_bad(c: &Ctx, via: Via, key: Option<&str>, bytes: &[u8], eof: bool) -> Observed {
    let (mut client, port) = match key {
        Some(key) => connect_authed(c, via, key, None).await,
        None => connect(c, via).await,
    };
    // The server may close while this is still being written: that is the case's point.
    let _ = tokio::time::timeout(WAIT, client.send_raw(bytes)).await;
    if eof {
        client = half_close(client).await;
    }
    let ops = until_closed(&mut client).await;
    let before = ops.iter().filter(|&&o| o == op::HEARTBEAT_REPLY).count();
    assert_eq!(
        before,
        ops.len(),
        "only HeartbeatReplies may come before the close: {ops:?}"
    );
    Observed {
        seen: Seen::Closed(format!("{before} HeartbeatReplies first")),
        peer: Some(port),
    }
}

/// A client-frame case: `bytes` from a fresh connection over `via`.
fn frames(name: &str, via: Via, authed: bool, bytes: Vec<u8>, eof: bool, log: &str) -> Case {
    let key = format!("bad-{name}-{via:?}");
    Case {
        name: format!("{name} ({via:?})"),
        action: act(move |c| {
            let bytes = bytes.clone();
            let key = key.clone();
            Box::pin(async move {
                let key = authed.then_some(key.as_str());
                send_bad(c, via, key, &bytes, eof).await
            })
        }),
        expect: closed(&[log]),
    }
}

/// After Auth, an op the server does not handle, then a Heartbeat: the first is
/// ignored, the second answered with the room's online count.
async fn unknown_op(c: &Ctx, via: Via) -> Observed {
    let (mut client, port) =
        connect_authed(c, via, &format!("bad-unknown-op-{via:?}"), Some(ROOM)).await;
    client.send(55, "what is this").await.unwrap();
    let seq = client.heartbeat().await.unwrap();
    let f = next(&mut client).await;
    let count = if f.body.len() == 4 {
        u32::from_be_bytes(f.body[..].try_into().unwrap())
    } else {
        u32::MAX
    };
    let text = format!(
        "op={} seq_echoed={} room_online={count}",
        f.op,
        f.seq == seq
    );
    let mut client = half_close(client).await;
    until_closed(&mut client).await;
    Observed {
        seen: Seen::Reply(text),
        peer: Some(port),
    }
}

/// A TLS ClientHello, as a TLS client would open, sent to the plain TCP client port.
async fn client_hello_to_tcp(c: &Ctx) -> Observed {
    let cfg = rustls_client(&c.ca(), None, b"quicpush/1");
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    send_bad(c, Via::Tcp, None, &hello, false).await
}

/// Client connections: malformed frames, bad tokens and ops, before and after Auth.
pub(crate) fn client_cases(c: &Ctx) -> Vec<Case> {
    let max_body = c.config.client.max_body;
    let mut t = Vec::new();
    let wrong_key_token = {
        let claims = auth::claims_for("wrong-key", Duration::from_secs(3600));
        auth::issue(b"not-the-server-secret-0123456789", &claims).unwrap()
    };
    let expired_token = {
        let mut claims = auth::claims_for("expired", Duration::ZERO);
        claims.exp = auth::now_secs() - 3600;
        auth::issue(&c.secret, &claims).unwrap()
    };
    // header {"alg":"none","typ":"JWT"}, claims {"key":"k","exp":9999999999}, no signature
    let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJrZXkiOiJrIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
    let raw_cut = {
        let inner = protocol::join_raw(&[Frame::new(op::HEARTBEAT, 2, Bytes::new())]);
        inner.slice(..inner.len() - 1)
    };
    let mut flood = Vec::with_capacity(10_000 * 16);
    for _ in 0..10_000 {
        flood.extend_from_slice(&frame(op::HEARTBEAT, Bytes::new()));
    }
    for via in BOTH {
        t.push(frames(
            "short header then EOF",
            via,
            false,
            header(16, 16, op::AUTH)[..8].to_vec(),
            true,
            "connection closed in the middle of a frame (8 bytes buffered)",
        ));
        t.push(frames(
            "headerLen 17",
            via,
            false,
            header(16, 17, op::AUTH),
            false,
            "bad frame: header length 17 is not 16",
        ));
        t.push(frames(
            "packLen 15",
            via,
            false,
            header(15, 16, op::AUTH),
            false,
            "bad frame: packet length 15 is shorter than the 16-byte header",
        ));
        t.push(frames(
            "packLen over client.max_body",
            via,
            false,
            header(16 + max_body as u32 + 1, 16, op::AUTH),
            false,
            &format!(
                "bad frame: body of {} bytes exceeds the limit of {max_body} bytes",
                max_body + 1
            ),
        ));
        t.push(frames(
            "packLen 4 GiB",
            via,
            false,
            header(u32::MAX, 16, op::AUTH),
            false,
            &format!(
                "bad frame: body of {} bytes exceeds the limit of {max_body} bytes",
                u32::MAX - 16
            ),
        ));
        let mut cut = header(16 + 100, 16, op::AUTH);
        cut.extend_from_slice(&[b'x'; 40]);
        t.push(frames(
            "body cut off by EOF",
            via,
            false,
            cut,
            true,
            "connection closed in the middle of a frame (56 bytes buffered)",
        ));
        t.push(frames(
            "Heartbeat before Auth",
            via,
            false,
            frame(op::HEARTBEAT, Bytes::new()),
            false,
            "first frame has op 2, expected Auth (7)",
        ));
        t.push(frames(
            "SendMsg before Auth",
            via,
            false,
            frame(op::SEND_MSG, "hi"),
            false,
            "first frame has op 4, expected Auth (7)",
        ));
        t.push(frames(
            "Auth body empty",
            via,
            false,
            frame(op::AUTH, Bytes::new()),
            false,
            "auth failed: missing token",
        ));
        t.push(frames(
            "Auth body garbage",
            via,
            false,
            frame(op::AUTH, "this is not a token"),
            false,
            "auth failed: malformed token",
        ));
        t.push(frames(
            "Auth body 1 MiB",
            via,
            false,
            frame(op::AUTH, vec![b'a'; 1 << 20]),
            false,
            &format!(
                "bad frame: body of {} bytes exceeds the limit of {max_body} bytes",
                1 << 20
            ),
        ));
        t.push(frames(
            "Auth body invalid UTF-8",
            via,
            false,
            frame(op::AUTH, vec![0xff, 0xfe, 0xfd]),
            false,
            "auth failed: malformed token: token is not UTF-8",
        ));
        t.push(frames(
            "JWT alg none",
            via,
            false,
            frame(op::AUTH, alg_none),
            false,
            "auth failed: malformed token",
        ));
        t.push(frames(
            "JWT signed with a wrong key",
            via,
            false,
            frame(op::AUTH, wrong_key_token.clone()),
            false,
            "auth failed: bad token signature",
        ));
        t.push(frames(
            "JWT expired",
            via,
            false,
            frame(op::AUTH, expired_token.clone()),
            false,
            "auth failed: token expired",
        ));
        t.push(frames(
            "second Auth",
            via,
            true,
            frame(op::AUTH, c.token("again", None)),
            false,
            "invalid body for op 7: already authenticated",
        ));
        t.push(frames(
            "Raw frame with a cut inner frame",
            via,
            true,
            frame(op::RAW, raw_cut.clone()),
            false,
            "bad frame: raw frame body holds a truncated frame",
        ));
        t.push(frames(
            "10,000 Heartbeats at once",
            via,
            true,
            flood.clone(),
            false,
            &format!(
                "more than {} frames per second (inbound rate limit)",
                c.config.client.max_frames_per_sec
            ),
        ));
        t.push(Case {
            name: format!("unknown op after Auth ({via:?})"),
            action: act(move |c| Box::pin(unknown_op(c, via))),
            expect: reply(
                "op=3 seq_echoed=true room_online=3",
                &["ignoring a frame with an op the server does not handle op=55"],
            ),
        });
    }
    t.push(Case {
        name: "TLS ClientHello to the TCP client port".into(),
        action: act(|c| Box::pin(client_hello_to_tcp(c))),
        expect: closed(&["bad frame: header length"]),
    });
    t
}

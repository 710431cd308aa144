//! goim-logic's HTTP API against a real server on port 0, with real goim clients
//! over TCP and QUIC: what arrives, the JSON replies, goim's own benchmark
//! requests byte for byte, a table of bad requests, the bearer token, and curl.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{next_push, TestServer, Via};
use quicpush::auth::Claims;
use quicpush::http::client::{self, Response};
use serde_json::{json, Value};

async fn call(s: &TestServer, method: &str, path: &str, body: &[u8]) -> Response {
    client::request(s.http.unwrap(), method, path, Some(&s.api_token), body)
        .await
        .unwrap()
}

/// `method path` with the token: the HTTP status and the JSON reply.
async fn json_call(s: &TestServer, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let r = call(s, method, path, body).await;
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {}", r.text()));
    (r.status, v)
}

fn claims(s: &TestServer, key: &str, mid: Option<i64>, room: Option<&str>) -> Claims {
    let mut c = s.claims(key);
    c.mid = mid;
    c.room_id = room.map(str::to_owned);
    c
}

#[tokio::test]
async fn push_keys_reaches_every_key_over_tcp_and_quic_and_reports_each_outcome() {
    let s = TestServer::start().await;
    let mut a = s.client(Via::Tcp, "k-a").await;
    let mut b = s.client(Via::Quic, "k-b").await;
    s.wait_online(2).await;
    let (status, v) = json_call(
        &s,
        "POST",
        "/goim/push/keys?operation=1000&keys=k-a&keys=nobody&keys=k-b",
        b"{\"test\":1}",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["message"], "");
    assert_eq!(v["data"]["delivered"], 2, "{v}");
    assert_eq!(v["data"]["index"], 2);
    assert_eq!(v["data"]["outcomes"][0], "delivered");
    assert_eq!(v["data"]["outcomes"][2], "delivered");
    let missing = v["data"]["outcomes"][1].as_str().unwrap();
    assert!(missing == "offline" || missing == "stored", "{v}");
    for c in [&mut a, &mut b] {
        let f = next_push(c).await;
        assert_eq!((f.op, &f.body[..]), (1000, &b"{\"test\":1}"[..]));
    }
    s.stop().await;
}

#[tokio::test]
async fn push_mids_room_and_all() {
    let s = TestServer::start().await;
    let mut u = s
        .client_with(Via::Tcp, &claims(&s, "u1", Some(7), Some("live://1000")))
        .await;
    let mut r = s
        .client_with(Via::Quic, &claims(&s, "r1", Some(8), Some("live://1000")))
        .await;
    let mut other = s
        .client_with(Via::Tcp, &claims(&s, "o1", Some(9), Some("live://2000")))
        .await;
    s.wait_online(3).await;

    let (_, v) = json_call(
        &s,
        "POST",
        "/goim/push/mids?operation=1001&mids=7&mids=42",
        b"m",
    )
    .await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["data"]["delivered"], 1, "{v}");
    let f = next_push(&mut u).await;
    assert_eq!((f.op, &f.body[..]), (1001, &b"m"[..]));

    let (_, v) = json_call(
        &s,
        "POST",
        "/goim/push/room?operation=1002&type=live&room=1000",
        b"room",
    )
    .await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["data"]["delivered"], 2);
    assert_eq!(v["data"]["room"], "live://1000");
    for c in [&mut u, &mut r] {
        let f = next_push(c).await;
        assert_eq!((f.op, &f.body[..]), (1002, &b"room"[..]));
    }

    let (_, v) = json_call(&s, "POST", "/goim/push/all?operation=1003&speed=0", b"all").await;
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["data"]["online"], 3);
    for c in [&mut u, &mut r, &mut other] {
        let f = next_push(c).await;
        assert_eq!((f.op, &f.body[..]), (1003, &b"all"[..]));
    }
    s.stop().await;
}

#[tokio::test]
async fn online_top_room_and_total() {
    let s = TestServer::start().await;
    let mut clients = Vec::new();
    for (i, room) in [
        "live://a", "live://b", "live://b", "live://c", "live://c", "live://c", "test://c",
    ]
    .iter()
    .enumerate()
    {
        let via = if i % 2 == 0 { Via::Tcp } else { Via::Quic };
        clients.push(
            s.client_with(via, &claims(&s, &format!("c{i}"), None, Some(room)))
                .await,
        );
    }
    s.wait_online(7).await;
    let (_, v) = json_call(&s, "GET", "/goim/online/top?type=live&limit=2", b"").await;
    assert_eq!(
        v,
        json!({"code": 0, "message": "", "data": [
            {"room_id": "c", "count": 3},
            {"room_id": "b", "count": 2},
        ]})
    );
    let (_, v) = json_call(&s, "GET", "/goim/online/top?type=none&limit=5", b"").await;
    assert_eq!(v["data"], json!([]));
    let (_, v) = json_call(
        &s,
        "GET",
        "/goim/online/room?type=live&rooms=a&rooms=c&rooms=zzz",
        b"",
    )
    .await;
    assert_eq!(v["data"], json!({"a": 1, "c": 3, "zzz": 0}));
    let (_, v) = json_call(&s, "GET", "/goim/online/total", b"").await;
    assert_eq!(v["code"], 0);
    assert_eq!(v["data"]["conn_count"], 7);
    assert_eq!(
        v["data"]["ip_count"], 1,
        "every client is on 127.0.0.1: {v}"
    );
    assert_eq!(
        v["data"]["transports"],
        json!({"tcp": 4, "tls": 0, "ws": 0, "wss": 0, "quic": 3})
    );
    s.stop().await;
}

/// The request line and headers Go's net/http client writes for
/// `http.Post(url, contentType, body)` on a keep-alive connection.
fn go_post(addr: SocketAddr, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: Go-http-client/1.1\r\n\
         Content-Length: {}\r\nContent-Type: {content_type}\r\nAccept-Encoding: gzip\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// goim's benchmarks/push, push_room, push_rooms and multi_push requests, byte for
/// byte (they send no token: this server runs with `require_token = false`).
#[tokio::test]
async fn goims_benchmark_requests_byte_for_byte() {
    let s = TestServer::start_with(|c| c.http.require_token = false).await;
    let addr = s.http.unwrap();
    let mut user = s
        .client_with(Via::Tcp, &claims(&s, "bench-u", Some(5), Some("test://1")))
        .await;
    s.wait_online(1).await;
    let t = Duration::from_secs(10);

    // benchmarks/push: `{"m":{"test":1},"u":5}` to mids as a form post
    let body = br#"{"m":{"test":1},"u":5}"#;
    let r = client::send(
        addr,
        &go_post(
            addr,
            "/goim/push/mids?operation=1000&mids=5",
            "application/x-www-form-urlencoded",
            body,
        ),
        t,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (v["code"].clone(), v["data"]["delivered"].clone()),
        (json!(0), json!(1))
    );
    let f = next_push(&mut user).await;
    assert_eq!((f.op, &f.body[..]), (1000, &body[..]));

    // benchmarks/push_room: `{"test":N}` as JSON to type test, room 1
    for (path, body) in [
        (
            "/goim/push/room?operation=1000&type=test&room=1",
            &br#"{"test":0}"#[..],
        ),
        // benchmarks/push_rooms: the same route with its fixed content
        (
            "/goim/push/room?operation=1000&type=test&room=1",
            &br#"{"test":1}"#[..],
        ),
    ] {
        let r = client::send(addr, &go_post(addr, path, "application/json", body), t)
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["code"], 0, "{v}");
        assert_eq!(v["data"]["delivered"], 1);
        let f = next_push(&mut user).await;
        assert_eq!(&f.body[..], body);
    }

    // benchmarks/multi_push posts to `/goim/push/mids=<n>`, a route goim-logic has
    // no more than this server: 404, with the JSON shape.
    let r = client::send(
        addr,
        &go_post(
            addr,
            "/goim/push/mids=0",
            "application/x-www-form-urlencoded",
            br#"{"m":{"test":1},"u":[0,1,2]}"#,
        ),
        t,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404);
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], -404);
    s.stop().await;
}

/// Method, path, body, HTTP status, code, what the message contains.
type Case<'a> = (&'a str, &'a str, &'a [u8], u16, i64, &'a str);

#[tokio::test]
async fn bad_requests_each_get_their_status_code_and_message() {
    let s = TestServer::start_with(|c| {
        c.rpc.max_keys = 3;
        c.http.max_body_bytes = 8192;
        c.http.max_query_bytes = 1024;
    })
    .await;
    let big_body = vec![b'x'; 8193];
    let over_client_max = vec![b'x'; 4097];
    let long_query = format!("/goim/push/keys?operation=1&keys={}", "k".repeat(1100));
    // (method, path, body, HTTP status, code, message contains)
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/goim/push/keys?keys=a",
            b"m",
            200,
            -400,
            "missing parameter `operation`",
        ),
        (
            "POST",
            "/goim/push/keys?operation=1000",
            b"m",
            200,
            -400,
            "missing parameter `keys`",
        ),
        (
            "POST",
            "/goim/push/keys?operation=1000&keys=",
            b"m",
            200,
            -400,
            "parameter `keys` has an empty value",
        ),
        (
            "POST",
            "/goim/push/keys?operation=1000&keys=a&keys=",
            b"m",
            200,
            -400,
            "parameter `keys` has an empty value",
        ),
        (
            "POST",
            "/goim/push/keys?operation=abc&keys=a",
            b"m",
            200,
            -400,
            "operation=abc is not an op",
        ),
        (
            "POST",
            "/goim/push/keys?operation=-1&keys=a",
            b"m",
            200,
            -400,
            "operation=-1 is not an op",
        ),
        (
            "POST",
            "/goim/push/keys?operation=4294967296&keys=a",
            b"m",
            200,
            -400,
            "is not an op",
        ),
        (
            "POST",
            "/goim/push/keys?operation=1&keys=a&keys=b&keys=c&keys=d",
            b"m",
            200,
            -400,
            "MPushMsg: push arg error: 4 items exceed the limit of 3",
        ),
        (
            "POST",
            "/goim/push/keys?operation=1&keys=a",
            &over_client_max,
            200,
            -400,
            "body of 4097 bytes exceeds the limit of 4096",
        ),
        (
            "POST",
            "/goim/push/keys?operation=1&keys=a",
            &big_body,
            413,
            -400,
            "exceeds http.max_body_bytes of 8192",
        ),
        (
            "POST",
            &long_query,
            b"m",
            414,
            -400,
            "exceeds http.max_query_bytes of 1024",
        ),
        (
            "POST",
            "/goim/push/mids?operation=1&mids=abc",
            b"m",
            200,
            -400,
            "mids=abc is not a user id",
        ),
        (
            "POST",
            "/goim/push/mids?operation=1&mids=1.5",
            b"m",
            200,
            -400,
            "mids=1.5 is not a user id",
        ),
        (
            "POST",
            "/goim/push/mids?operation=1",
            b"m",
            200,
            -400,
            "missing parameter `mids`",
        ),
        (
            "POST",
            "/goim/push/room?operation=1&type=live",
            b"m",
            200,
            -400,
            "missing parameter `room`",
        ),
        (
            "POST",
            "/goim/push/room?operation=1&type=live&room=",
            b"m",
            200,
            -400,
            "parameter `room` is empty",
        ),
        (
            "POST",
            "/goim/push/room?operation=1&room=1",
            b"m",
            200,
            -400,
            "missing parameter `type`",
        ),
        (
            "POST",
            "/goim/push/all?operation=1&speed=-5",
            b"m",
            200,
            -400,
            "speed=-5 is not a speed",
        ),
        (
            "POST",
            "/goim/push/all?speed=1",
            b"m",
            200,
            -400,
            "missing parameter `operation`",
        ),
        (
            "GET",
            "/goim/online/top?type=live",
            b"",
            200,
            -400,
            "missing parameter `limit`",
        ),
        (
            "GET",
            "/goim/online/top?type=live&limit=x",
            b"",
            200,
            -400,
            "limit=x is not a count",
        ),
        (
            "GET",
            "/goim/online/top?limit=1",
            b"",
            200,
            -400,
            "missing parameter `type`",
        ),
        (
            "GET",
            "/goim/online/room?type=live",
            b"",
            200,
            -400,
            "missing parameter `rooms`",
        ),
        (
            "GET",
            "/goim/push/keys?operation=1&keys=a",
            b"",
            405,
            -405,
            "/goim/push/keys does not take GET",
        ),
        (
            "POST",
            "/goim/online/total",
            b"",
            405,
            -405,
            "does not take POST",
        ),
        (
            "GET",
            "/goim/push/nothing",
            b"",
            404,
            -404,
            "no route /goim/push/nothing",
        ),
        ("GET", "/", b"", 404, -404, "no route /"),
    ];
    for (method, path, body, status, code, message) in cases {
        let (st, v) = json_call(&s, method, path, body).await;
        let what = format!(
            "{method} {} ({} body bytes): {v}",
            &path[..path.len().min(60)],
            body.len()
        );
        assert_eq!(st, status, "{what}");
        assert_eq!(v["code"], code, "{what}");
        let m = v["message"].as_str().unwrap();
        assert!(m.contains(message), "{what}: want {message:?}");
    }
    // nothing was pushed, and the server still answers
    let (_, v) = json_call(&s, "GET", "/goim/online/total", b"").await;
    assert_eq!(v["code"], 0);
    s.stop().await;
}

#[tokio::test]
async fn the_bearer_token_is_required_and_checked() {
    let s = TestServer::start().await;
    let addr = s.http.unwrap();
    assert_eq!(s.api_token.len(), 64, "generated with the certificates");
    for (token, message) in [
        (None, "missing bearer token"),
        (Some("nope"), "wrong bearer token"),
        (Some(&s.api_token[..63]), "wrong bearer token"),
    ] {
        for path in ["/goim/online/total", "/metrics", "/nowhere"] {
            let r = client::request(addr, "GET", path, token, b"")
                .await
                .unwrap();
            assert_eq!(r.status, 401, "{path} with {token:?}");
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["code"], -401);
            assert!(v["message"].as_str().unwrap().contains(message), "{v}");
        }
    }
    let raw = format!(
        "GET /goim/online/total HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\nConnection: close\r\n\r\n",
        s.api_token
    );
    let r = client::send(addr, raw.as_bytes(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    assert!(r.text().contains("not a bearer token"), "{}", r.text());
    let r = client::request(addr, "GET", "/goim/online/total", Some(&s.api_token), b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    s.stop().await;
}

#[tokio::test]
async fn loopback_without_a_token_needs_none() {
    let s = TestServer::start_with(|c| c.http.require_token = false).await;
    let r = client::request(s.http.unwrap(), "GET", "/goim/online/total", None, b"")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    s.stop().await;
}

#[tokio::test]
async fn an_empty_bind_list_disables_http() {
    let s = TestServer::start_with(|c| c.http.bind.clear()).await;
    assert!(s.http.is_none());
    s.stop().await;
}

/// The quick start of goim's README, with curl, if it is installed.
#[tokio::test]
async fn curl_posts_to_a_room_as_goims_docs_show() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl is not installed: skipping (the CI script installs it)");
        return;
    }
    let s = TestServer::start().await;
    let mut c = s
        .client_with(Via::Tcp, &claims(&s, "curl-1", None, Some("live://1000")))
        .await;
    s.wait_online(1).await;
    let url = format!(
        "http://{}/goim/push/room?operation=1000&type=live&room=1000",
        s.http.unwrap()
    );
    let auth = format!("Authorization: Bearer {}", s.api_token);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-H", &auth, "-d", "{\"test\":1}", &url])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 0, "{v}");
    assert_eq!(v["data"]["delivered"], 1);
    let f = next_push(&mut c).await;
    assert_eq!(&f.body[..], b"{\"test\":1}");
    s.stop().await;
}

/// A request in flight when the server shuts down is answered.
#[tokio::test]
async fn shutdown_answers_requests_in_flight() {
    let s = TestServer::start().await;
    let addr = s.http.unwrap();
    let token = s.api_token.clone();
    // Headers sent, body not yet: the request is in flight at shutdown.
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST /goim/push/keys?operation=1&keys=gone HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: 4\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(s.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    conn.write_all(b"body").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"code\":0"), "{text}");
    stopping.await.unwrap();
}

/// A request slower than `http.timeout` (its body, here) is answered -500.
#[tokio::test]
async fn a_request_slower_than_the_timeout_gets_a_server_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = TestServer::start_with(|c| c.http.timeout = Duration::from_millis(200)).await;
    let mut conn = tokio::net::TcpStream::connect(s.http.unwrap())
        .await
        .unwrap();
    let head = format!(
        "POST /goim/push/keys?operation=1&keys=k HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 4\r\nConnection: close\r\n\r\n",
        s.api_token
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\"code\":-500"), "{text}");
    assert!(
        text.contains("took longer than http.timeout of 200ms"),
        "{text}"
    );
    s.stop().await;
}

/// Over `http.max_connections`, a connection waits until one closes.
#[tokio::test]
async fn connections_over_the_limit_wait_for_one_to_close() {
    let s = TestServer::start_with(|c| c.http.max_connections = 1).await;
    let addr = s.http.unwrap();
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    // let the server accept it
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = s.api_token.clone();
    let second = tokio::spawn(async move {
        client::request(addr, "GET", "/goim/online/total", Some(&token), b"").await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "served beside the first connection");
    drop(first);
    let r = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    s.stop().await;
}

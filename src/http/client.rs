//! A minimal HTTP/1.1 client over a plain TCP connection: one request, one
//! response with a `Content-Length` or ending with the connection. Enough for
//! `quicpush stats` and the tests; no TLS, no redirects, no chunked bodies.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("HTTP request to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP request to {addr}: no response within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP response from {addr} is malformed: {reason}")]
    Malformed { addr: SocketAddr, reason: String },
}

/// A response: status, headers (names lowercased) and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Largest response read.
const MAX_RESPONSE: usize = 64 << 20;

/// Sends `raw`, the bytes of one whole request, and reads its response.
pub async fn send(
    addr: SocketAddr,
    raw: &[u8],
    timeout: Duration,
) -> Result<Response, ClientError> {
    match tokio::time::timeout(timeout, exchange(addr, raw)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout { addr, timeout }),
    }
}

/// `method path` with an optional bearer token and body; the connection closes
/// after the response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<Response, ClientError> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        raw.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    send(addr, &bytes, Duration::from_secs(30)).await
}

async fn exchange(addr: SocketAddr, raw: &[u8]) -> Result<Response, ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let bad = |reason: String| ClientError::Malformed { addr, reason };
    let mut s = TcpStream::connect(addr).await.map_err(io)?;
    s.write_all(raw).await.map_err(io)?;
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_RESPONSE {
            return Err(bad("headers too long".into()));
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(bad(format!("connection closed after {} bytes", buf.len())));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect();
    let mut body = buf.split_off(head_end + 4);
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match length {
        Some(n) if n > MAX_RESPONSE => return Err(bad(format!("body of {n} bytes"))),
        Some(n) => {
            while body.len() < n {
                let mut chunk = vec![0u8; (n - body.len()).min(64 * 1024)];
                let k = s.read(&mut chunk).await.map_err(io)?;
                if k == 0 {
                    return Err(bad(format!("body ended at {} of {n} bytes", body.len())));
                }
                body.extend_from_slice(&chunk[..k]);
            }
            body.truncate(n);
        }
        None => {
            s.read_to_end(&mut body).await.map_err(io)?;
        }
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

//! A minimal goim v2 client over TCP or QUIC: what the examples, the integration
//! tests and load tools use to play a device.

use std::net::SocketAddr;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{self, op, Frame, FrameError, MAX_BODY_LIMIT};
use crate::tls::{self, TlsError};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PushClientError {
    /// Connecting, reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The QUIC connection could not be set up.
    #[error("QUIC: {0}")]
    Quic(String),
    /// The CA certificate could not be loaded.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The server sent something that is not a frame.
    #[error("bad frame from server: {0}")]
    Frame(#[from] FrameError),
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// The server answered Auth with something else.
    #[error("expected AuthReply (8), got op {0}")]
    AuthRefused(u32),
}

/// The read half of a client connection.
pub type Reader = Box<dyn AsyncRead + Unpin + Send>;
/// The write half of a client connection.
pub type Writer = Box<dyn AsyncWrite + Unpin + Send>;
/// A QUIC client's connection and endpoint, kept alive with its stream.
pub type QuicParts = (quinn::Connection, quinn::Endpoint);

/// One client connection.
pub struct PushClient {
    reader: Reader,
    writer: Writer,
    buf: BytesMut,
    seq: u32,
    quic: Option<QuicParts>,
}

impl std::fmt::Debug for PushClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushClient")
            .field("quic", &self.quic.is_some())
            .finish()
    }
}

impl PushClient {
    /// Connects over TCP.
    pub async fn connect_tcp(addr: SocketAddr) -> Result<PushClient, PushClientError> {
        let socket = tokio::net::TcpStream::connect(addr).await?;
        socket.set_nodelay(true)?;
        let (r, w) = socket.into_split();
        Ok(Self::from_parts(Box::new(r), Box::new(w), None))
    }

    /// Connects over QUIC, trusting the CA in `ca_path`.
    pub async fn connect_quic(
        addr: SocketAddr,
        server_name: &str,
        ca_path: &Path,
    ) -> Result<PushClient, PushClientError> {
        let config = tls::quic_client_config(ca_path)?;
        Self::connect_quic_with(addr, server_name, config).await
    }

    /// Connects over QUIC with a ready configuration.
    pub async fn connect_quic_with(
        addr: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> Result<PushClient, PushClientError> {
        let endpoint = tls::client_endpoint(addr)?;
        let conn = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| PushClientError::Quic(e.to_string()))?
            .await
            .map_err(|e| PushClientError::Quic(e.to_string()))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| PushClientError::Quic(e.to_string()))?;
        Ok(Self::from_parts(
            Box::new(recv),
            Box::new(send),
            Some((conn, endpoint)),
        ))
    }

    /// Connects over QUIC from a ready endpoint (e.g. one whose socket simulates
    /// a network, see [`crate::netsim`]) with a ready configuration.
    pub async fn connect_quic_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        config: quinn::ClientConfig,
    ) -> Result<PushClient, PushClientError> {
        let conn = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| PushClientError::Quic(e.to_string()))?
            .await
            .map_err(|e| PushClientError::Quic(e.to_string()))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| PushClientError::Quic(e.to_string()))?;
        Ok(Self::from_parts(
            Box::new(recv),
            Box::new(send),
            Some((conn, endpoint)),
        ))
    }

    /// A client over any reader and writer.
    pub fn from_parts(reader: Reader, writer: Writer, quic: Option<QuicParts>) -> PushClient {
        PushClient {
            reader,
            writer,
            buf: BytesMut::with_capacity(8192),
            seq: 0,
            quic,
        }
    }

    /// Sends a frame with the next seq; returns that seq.
    pub async fn send(&mut self, op: u32, body: impl Into<Bytes>) -> Result<u32, PushClientError> {
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(op, self.seq, body);
        self.send_raw(&frame.to_bytes()).await?;
        Ok(self.seq)
    }

    /// Writes bytes as they are (for sending malformed input in tests).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), PushClientError> {
        self.writer.write_all(bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Sends Auth with `token` and waits for AuthReply.
    pub async fn auth(&mut self, token: impl Into<Bytes>) -> Result<(), PushClientError> {
        self.send(op::AUTH, token).await?;
        match self.next_frame().await? {
            Some(f) if f.op == op::AUTH_REPLY => Ok(()),
            Some(f) => Err(PushClientError::AuthRefused(f.op)),
            None => Err(PushClientError::Closed),
        }
    }

    /// Sends a Heartbeat; the reply arrives through [`PushClient::next_frame`].
    pub async fn heartbeat(&mut self) -> Result<u32, PushClientError> {
        self.send(op::HEARTBEAT, Bytes::new()).await
    }

    /// The next frame from the server; `None` when the server closed the stream.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>, PushClientError> {
        loop {
            if let Some(f) = protocol::decode(&mut self.buf, MAX_BODY_LIMIT)? {
                return Ok(Some(f));
            }
            self.buf.reserve(4096);
            let n = match self.reader.read_buf(&mut self.buf).await {
                Ok(n) => n,
                // A QUIC connection closed by the server reads as an error.
                Err(_) if self.quic.is_some() => 0,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// Takes the client apart: its halves, bytes read but not yet decoded, and the
    /// QUIC connection if any.
    pub fn into_parts(self) -> (Reader, Writer, BytesMut, Option<QuicParts>) {
        (self.reader, self.writer, self.buf, self.quic)
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.writer.shutdown().await;
        if let Some((conn, endpoint)) = self.quic.take() {
            conn.close(0u32.into(), b"bye");
            endpoint.wait_idle().await;
        }
    }
}

//! Client connections: dialing over TCP or QUIC, reading and writing one
//! connection, and the ways a connection ends.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quicpush::auth;
use quicpush::client::{PushClient, Reader, ResumeState, Writer};
use quicpush::protocol::{self, op, Frame, PushMeta, MAX_BODY_LIMIT};
use quicpush::resume::ResumeReply;
use rand::rngs::StdRng;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::Via;
use crate::{key_of, mid_of, room_name, CONNECT_TIMEOUT};

/// What every client needs to connect.
pub(crate) struct Dial {
    pub(crate) tcp: SocketAddr,
    pub(crate) quic: SocketAddr,
    pub(crate) quic_config: quinn::ClientConfig,
    pub(crate) endpoints: Vec<quinn::Endpoint>,
    pub(crate) secret: Vec<u8>,
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// TCP: FIN; QUIC: the stream finished, then the connection closed.
    Graceful,
    /// TCP: RST (zero linger); QUIC: the connection closed at once with an error code.
    Abrupt,
}

/// One client connection, authenticated.
pub(crate) struct Conn {
    pub(crate) reader: Reader,
    pub(crate) writer: Writer,
    pub(crate) buf: BytesMut,
    pub(crate) quic: Option<quinn::Connection>,
    /// The connection's own state, as the client sees it.
    pub(crate) push_seq: u32,
    pub(crate) room: Option<u32>,
    /// A ChangeRoom was sent and its reply has not arrived: the room it asked for.
    pub(crate) pending: Option<Option<u32>>,
    /// Client frames sent (their seq).
    pub(crate) seq: u32,
    /// The connection negotiated resume: pushes carry the extension.
    pub(crate) resume: bool,
}

/// How a resuming client loses a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loss {
    /// Closed abruptly, without reading what is queued.
    Abrupt,
    /// Closed gracefully, without reading what is queued.
    Graceful,
    /// Replaced by the client's own next connection, which resumes from what it
    /// read on this one; what this one still delivers is not taken.
    Replaced,
    /// Kicked by a backend: read to its end (DisconnectReply), then resumed.
    Kicked,
}

impl Loss {
    pub(crate) fn random(rng: &mut StdRng) -> Loss {
        match rng.gen_range(0..10) {
            0..=2 => Loss::Abrupt,
            3..=5 => Loss::Graceful,
            6..=7 => Loss::Replaced,
            _ => Loss::Kicked,
        }
    }

    /// How the socket is set up and closed.
    pub(crate) fn ending(self) -> Ending {
        match self {
            Loss::Abrupt => Ending::Abrupt,
            _ => Ending::Graceful,
        }
    }
}

impl Dial {
    pub(crate) async fn connect(
        &self,
        client: u32,
        via: Via,
        room: Option<u32>,
        ending: Ending,
    ) -> Result<Conn, String> {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.connect_inner(client, via, room, ending),
        )
        .await
        .map_err(|_| format!("connect over {via:?} took over {CONNECT_TIMEOUT:?}"))?
    }

    /// Connects and authenticates asking for resume from `state`'s positions,
    /// which AuthReply's answer updates.
    pub(crate) async fn connect_resume(
        &self,
        client: u32,
        via: Via,
        room: u32,
        ending: Ending,
        state: &mut ResumeState,
    ) -> Result<(Conn, ResumeReply), String> {
        let connect = async {
            let mut pc = self.open(client, via, ending).await?;
            let token = self.token(client, Some(room))?;
            let reply = pc
                .auth_resume(token.as_bytes(), state)
                .await
                .map_err(|e| format!("auth with resume: {e}"))?;
            Ok((Conn::new(pc, Some(room), true), reply))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| format!("connect over {via:?} took over {CONNECT_TIMEOUT:?}"))?
    }

    fn token(&self, client: u32, room: Option<u32>) -> Result<String, String> {
        let mut claims = auth::claims_for(&key_of(client), Duration::from_secs(86_400));
        claims.mid = Some(mid_of(client));
        claims.room_id = room.map(room_name);
        auth::issue(&self.secret, &claims).map_err(|e| e.to_string())
    }

    async fn connect_inner(
        &self,
        client: u32,
        via: Via,
        room: Option<u32>,
        ending: Ending,
    ) -> Result<Conn, String> {
        let mut pc = self.open(client, via, ending).await?;
        let token = self.token(client, room)?;
        pc.auth(token).await.map_err(|e| format!("auth: {e}"))?;
        Ok(Conn::new(pc, room, false))
    }

    /// A connection, not yet authenticated.
    async fn open(&self, client: u32, via: Via, ending: Ending) -> Result<PushClient, String> {
        Ok(match via {
            Via::Tcp => {
                let stream = tokio::net::TcpStream::connect(self.tcp)
                    .await
                    .map_err(|e| format!("TCP connect: {e}"))?;
                let _ = stream.set_nodelay(true);
                if ending == Ending::Abrupt {
                    // Dropping the socket then resets the connection.
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(Duration::ZERO));
                }
                let (r, w) = stream.into_split();
                PushClient::from_parts(Box::new(r), Box::new(w), None)
            }
            Via::Quic => {
                let ep = &self.endpoints[client as usize % self.endpoints.len()];
                let conn = ep
                    .connect_with(self.quic_config.clone(), self.quic, "localhost")
                    .map_err(|e| format!("QUIC connect: {e}"))?
                    .await
                    .map_err(|e| format!("QUIC handshake: {e}"))?;
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| format!("QUIC stream: {e}"))?;
                PushClient::from_parts(Box::new(recv), Box::new(send), Some((conn, ep.clone())))
            }
            other => return Err(format!("the soak runs over TCP and QUIC, not {other:?}")),
        })
    }
}

impl Conn {
    /// The connection of an authenticated client.
    fn new(pc: PushClient, room: Option<u32>, resume: bool) -> Conn {
        let (reader, writer, buf, quic) = pc.into_parts();
        Conn {
            reader,
            writer,
            buf,
            quic: quic.map(|(c, _)| c),
            push_seq: 0,
            room,
            pending: None,
            // the Auth frame was 1
            seq: 1,
            resume,
        }
    }
    pub(crate) async fn send(&mut self, op: u32, body: impl Into<Bytes>) -> Result<(), String> {
        self.seq = self.seq.wrapping_add(1);
        let frame = Frame::new(op, self.seq, body).to_bytes();
        let write = async {
            self.writer.write_all(&frame).await?;
            self.writer.flush().await
        };
        tokio::time::timeout(Duration::from_secs(10), write)
            .await
            .map_err(|_| "write timed out".to_string())?
            .map_err(|e| format!("write: {e}"))
    }

    pub(crate) async fn change_room(&mut self, room: Option<u32>) -> Result<(), String> {
        let name = room.map(room_name).unwrap_or_default();
        self.pending = Some(room);
        self.send(op::CHANGE_ROOM, name).await
    }

    /// Reads more bytes; `Ok(false)` at the end of the stream.
    pub(crate) async fn fill(&mut self) -> Result<bool, String> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        match self.reader.read_buf(&mut self.buf).await {
            Ok(0) => Ok(false),
            Ok(_) => Ok(true),
            // QUIC: the server closing the connection after the stream reads as an error.
            Err(_) if self.quic.is_some() => Ok(false),
            Err(e) => Err(format!("read: {e}")),
        }
    }

    /// The next whole frame and, on a resume-capable connection, its extension. A
    /// connection that did not negotiate resume refuses an extension (headerLen 32).
    pub(crate) fn next_frame(&mut self) -> Result<Option<(Frame, Option<PushMeta>)>, String> {
        if self.resume {
            protocol::decode_server(&mut self.buf, MAX_BODY_LIMIT)
        } else {
            protocol::decode(&mut self.buf, MAX_BODY_LIMIT).map(|f| f.map(|f| (f, None)))
        }
        .map_err(|e| format!("bad frame: {e}"))
    }

    pub(crate) async fn close(mut self, ending: Ending) {
        match (ending, self.quic.take()) {
            (Ending::Graceful, quic) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), self.writer.shutdown()).await;
                if let Some(c) = quic {
                    c.close(0u32.into(), b"bye");
                }
            }
            (Ending::Abrupt, Some(c)) => c.close(7u32.into(), b"gone"),
            // zero linger: dropping resets the connection
            (Ending::Abrupt, None) => {}
        }
    }
}

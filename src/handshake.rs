//! Framed connections: both sides of the handshake (see [`crate::protocol`] for the exchange) and
//! the frame writer every connection uses after it.
//!
//! The client side is used by [`crate::client::ArrayClient`] and by array servers dialling their
//! peers; the server side by both listeners of an array server. Each side is bounded by a timeout
//! given by the caller, and frames are limited to [`HANDSHAKE_MAX_FRAME_BYTES`] until it is done.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::protocol::{
    client_proof, codec, decode, encode, nonce, proofs_equal, server_proof, versions_compatible, ClientMessage,
    ConnectionRole, Hello, Refusal, ServerMessage, Welcome, HANDSHAKE_MAX_FRAME_BYTES, PROTOCOL_VERSION,
};

/// A framed TCP connection.
pub type FramedConn = Framed<TcpStream, LengthDelimitedCodec>;

/// Writes queued frames to a connection until the queue closes, with one flush per burst:
/// whatever was queued while the previous write went out is written and flushed together. Used
/// by clients, the client port and the group port alike. Returns the write error that ended it.
pub async fn write_frames(
    mut sink: futures::stream::SplitSink<FramedConn, bytes::Bytes>,
    mut rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
) -> std::io::Result<()> {
    while let Some(frame) = rx.recv().await {
        sink.feed(frame).await?;
        while let Ok(frame) = rx.try_recv() {
            sink.feed(frame).await?;
        }
        sink.flush().await?;
    }
    Ok(())
}

/// Why a client-side handshake failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandshakeError {
    /// TCP connect or I/O failed, or the server closed the connection.
    #[error("{0}")]
    Io(String),
    /// No answer in time.
    #[error("no handshake answer within {0:?}")]
    Timeout(Duration),
    /// The server refused; final, retrying will not help.
    #[error("{0}")]
    Refused(Refusal),
    /// The server could not prove it knows the secret (or spoke nonsense).
    #[error("the server failed the handshake: {0}")]
    BadServer(String),
}

impl HandshakeError {
    /// Whether trying again (or another URL) may succeed.
    pub fn is_final(&self) -> bool {
        matches!(self, HandshakeError::Refused(_))
    }
}

/// What the client side states in its hello.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// Software version announced (the build's own unless overridden for testing).
    pub software_version: String,
    /// Array name expected; `None` accepts any array.
    pub array_name: Option<String>,
    /// Shared secret; empty when none is configured.
    pub secret: Vec<u8>,
    /// Client or peer.
    pub role: ConnectionRole,
}

/// Connects to `addr` and runs the client side of the handshake, all within `timeout`. On
/// success the connection is ready for requests and its frame bound raised to `max_frame_bytes`.
pub async fn connect(
    addr: &str,
    identity: &ClientIdentity,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(FramedConn, Welcome), HandshakeError> {
    match tokio::time::timeout(timeout, connect_inner(addr, identity, max_frame_bytes)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    }
}

async fn connect_inner(
    addr: &str,
    identity: &ClientIdentity,
    max_frame_bytes: usize,
) -> Result<(FramedConn, Welcome), HandshakeError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| HandshakeError::Io(format!("connect: {e}")))?;
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, codec(HANDSHAKE_MAX_FRAME_BYTES));
    let server_nonce = match recv(&mut framed).await? {
        ServerMessage::Challenge { server_nonce } => server_nonce,
        other => {
            return Err(HandshakeError::BadServer(format!(
                "expected a challenge, got {other:?}"
            )))
        }
    };
    let client_nonce = nonce();
    // With no expected name the client proves against the empty name and the server accepts it.
    let array_name = identity.array_name.clone().unwrap_or_default();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        software_version: identity.software_version.clone(),
        proof: client_proof(
            &identity.secret,
            &server_nonce,
            &client_nonce,
            &array_name,
            &identity.role,
        ),
        array_name,
        role: identity.role.clone(),
        client_nonce,
    };
    framed
        .send(encode(&ClientMessage::Hello(hello)))
        .await
        .map_err(|e| HandshakeError::Io(format!("send hello: {e}")))?;
    match recv(&mut framed).await? {
        ServerMessage::Welcome(welcome) => {
            let expected = server_proof(&identity.secret, &server_nonce, &client_nonce);
            if !proofs_equal(&expected, &welcome.proof) {
                return Err(HandshakeError::BadServer(
                    "its proof does not match our shared secret (is the secret file the same?)".into(),
                ));
            }
            framed.codec_mut().set_max_frame_length(max_frame_bytes);
            Ok((framed, welcome))
        }
        ServerMessage::Refused(r) => Err(HandshakeError::Refused(r)),
        other => Err(HandshakeError::BadServer(format!("expected a welcome, got {other:?}"))),
    }
}

async fn recv(framed: &mut FramedConn) -> Result<ServerMessage, HandshakeError> {
    match framed.next().await {
        Some(Ok(bytes)) => {
            decode::<ServerMessage>(&bytes).map_err(|e| HandshakeError::BadServer(format!("undecodable frame: {e}")))
        }
        Some(Err(e)) => Err(HandshakeError::Io(format!("read: {e}"))),
        None => Err(HandshakeError::Io("the server closed the connection".into())),
    }
}

/// What the server side checks a hello against.
#[derive(Debug, Clone)]
pub struct ServerIdentity {
    /// Name of this server.
    pub server_name: String,
    /// Array this server belongs to.
    pub array_name: String,
    /// Shared secret (empty when none is configured).
    pub secret: Vec<u8>,
    /// The configuration document sent in the welcome.
    pub config_toml: String,
    /// Whether this port takes peers (group port) or clients (client port).
    pub accepts_peers: bool,
}

/// Why a server-side handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The client was refused (it has been told why).
    #[error("refused: {0}")]
    Refused(Refusal),
    /// I/O error, timeout, or a malformed hello.
    #[error("{0}")]
    Broken(String),
}

/// Runs the server side of the handshake on a fresh connection within `timeout`. On success the
/// frame bound is raised to `max_frame_bytes` and the client's hello is returned.
pub async fn accept(
    stream: TcpStream,
    identity: &ServerIdentity,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(FramedConn, Hello), AcceptError> {
    let _ = stream.set_nodelay(true);
    let mut framed = Framed::new(stream, codec(HANDSHAKE_MAX_FRAME_BYTES));
    let result = tokio::time::timeout(timeout, accept_inner(&mut framed, identity)).await;
    match result {
        Err(_) => Err(AcceptError::Broken(format!("no hello within {timeout:?}"))),
        Ok(Err(e)) => Err(e),
        Ok(Ok(hello)) => {
            framed.codec_mut().set_max_frame_length(max_frame_bytes);
            Ok((framed, hello))
        }
    }
}

async fn accept_inner(framed: &mut FramedConn, identity: &ServerIdentity) -> Result<Hello, AcceptError> {
    let server_nonce = nonce();
    send(framed, &ServerMessage::Challenge { server_nonce }).await?;
    let hello = match framed.next().await {
        Some(Ok(bytes)) => match decode::<ClientMessage>(&bytes) {
            Ok(ClientMessage::Hello(h)) => h,
            Ok(_) => return Err(fatal(framed, "the first message must be a hello").await),
            Err(e) => return Err(fatal(framed, &format!("malformed hello: {e}")).await),
        },
        Some(Err(e)) => return Err(fatal(framed, &format!("bad frame: {e}")).await),
        None => return Err(AcceptError::Broken("closed before hello".into())),
    };
    let refusal = if hello.protocol_version != PROTOCOL_VERSION
        || !versions_compatible(&hello.software_version, crate::protocol::SOFTWARE_VERSION)
    {
        // Same software version but another protocol (a development build): say so in the versions.
        let (client, server) = if hello.software_version == crate::protocol::SOFTWARE_VERSION {
            (
                format!("{} (protocol {})", hello.software_version, hello.protocol_version),
                format!("{} (protocol {PROTOCOL_VERSION})", crate::protocol::SOFTWARE_VERSION),
            )
        } else {
            (
                hello.software_version.clone(),
                crate::protocol::SOFTWARE_VERSION.to_string(),
            )
        };
        Some(Refusal::VersionMismatch {
            client,
            server,
            client_protocol: hello.protocol_version,
            server_protocol: PROTOCOL_VERSION,
        })
    } else if !hello.array_name.is_empty() && hello.array_name != identity.array_name {
        Some(Refusal::WrongArrayName {
            expected: hello.array_name.clone(),
            actual: identity.array_name.clone(),
        })
    } else if !proofs_equal(
        &hello.proof,
        &client_proof(
            &identity.secret,
            &server_nonce,
            &hello.client_nonce,
            &hello.array_name,
            &hello.role,
        ),
    ) {
        Some(Refusal::AuthenticationFailed)
    } else {
        match (&hello.role, identity.accepts_peers) {
            (ConnectionRole::Client, true) => Some(Refusal::WrongPort(
                "this is a group port; clients use the client port".into(),
            )),
            (ConnectionRole::Peer { .. }, false) => Some(Refusal::WrongPort(
                "this is a client port; peers use the group port".into(),
            )),
            _ => None,
        }
    };
    if let Some(refusal) = refusal {
        send(framed, &ServerMessage::Refused(refusal.clone())).await?;
        return Err(AcceptError::Refused(refusal));
    }
    let welcome = Welcome {
        software_version: crate::protocol::SOFTWARE_VERSION.to_string(),
        server_name: identity.server_name.clone(),
        proof: server_proof(&identity.secret, &server_nonce, &hello.client_nonce),
        config_toml: if identity.accepts_peers {
            String::new()
        } else {
            identity.config_toml.clone()
        },
    };
    send(framed, &ServerMessage::Welcome(welcome)).await?;
    Ok(hello)
}

async fn send(framed: &mut FramedConn, msg: &ServerMessage) -> Result<(), AcceptError> {
    framed
        .send(encode(msg))
        .await
        .map_err(|e| AcceptError::Broken(format!("send: {e}")))
}

async fn fatal(framed: &mut FramedConn, why: &str) -> AcceptError {
    let _ = framed.send(encode(&ServerMessage::Fatal(why.to_string()))).await;
    AcceptError::Broken(why.to_string())
}

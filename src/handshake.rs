//! Framed connections: both sides of the handshake (see [`crate::protocol`] for the exchange) and
//! the frame writer every connection uses after it.
//!
//! The client side is used by [`crate::client::ArrayClient`] and by array servers dialling their
//! peers; the server side by both listeners of an array server. Each side is bounded by a timeout
//! given by the caller, and frames are limited to [`HANDSHAKE_FRAME_BYTES_MAX`] until it is done.
//!
//! Order of the server's checks: the proof first, with the secret of the role the hello claims
//! (the cluster secret, a credential's, or the peer secret); only a caller that passed it learns
//! anything about the array (its version, its name). A stranger gets "authentication failed" and
//! nothing else.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::protocol::{
    client_proof, codec, decode, encode, nonce, proofs_equal, server_proof, versions_compatible, ClientMessage,
    ConnectionRole, Hello, Refusal, ServerMessage, Welcome, HANDSHAKE_FRAME_BYTES_MAX, PROTOCOL_VERSION,
};
use crate::tls::{ClientTls, NetStream};

/// A framed connection, plain or TLS.
pub type FramedConn = Framed<NetStream, LengthDelimitedCodec>;

/// The length-delimited codec of a server-side connection, telling its reader how many bytes of a
/// frame not yet complete it holds (for the frame deadline).
pub struct WatchedCodec {
    inner: LengthDelimitedCodec,
    /// Bytes left in the read buffer after the last decode.
    buffered: Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio_util::codec::Decoder for WatchedCodec {
    type Item = bytes::BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<bytes::BytesMut>, std::io::Error> {
        let frame = self.inner.decode(src);
        self.buffered.store(src.len(), std::sync::atomic::Ordering::Relaxed);
        frame
    }
}

impl tokio_util::codec::Encoder<bytes::Bytes> for WatchedCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: bytes::Bytes, dst: &mut bytes::BytesMut) -> Result<(), std::io::Error> {
        self.inner.encode(item, dst)
    }
}

/// A server-side framed connection.
type WatchedConn = Framed<NetStream, WatchedCodec>;

/// The read half of a server-side connection.
pub type FrameReader = futures::stream::SplitStream<WatchedConn>;

/// The write half of a server-side connection.
pub type FrameWriter = futures::stream::SplitSink<WatchedConn, bytes::Bytes>;

/// Splits a server-side framed connection into a reader with `deadlines` and a writer, for two
/// tasks, keeping whatever the handshake had already read ahead (a client may pipeline requests
/// right behind its hello). The halves share the connection through a lock that never blocks a
/// thread: a task that finds it taken waits as any future does.
pub fn split_framed(framed: FramedConn, deadlines: FrameDeadlines) -> (DeadlineReader, FrameWriter) {
    let parts = framed.into_parts();
    let buffered = Arc::new(std::sync::atomic::AtomicUsize::new(parts.read_buf.len()));
    let mut watched = tokio_util::codec::FramedParts::new::<bytes::Bytes>(
        parts.io,
        WatchedCodec {
            inner: parts.codec,
            buffered: buffered.clone(),
        },
    );
    watched.read_buf = parts.read_buf;
    watched.write_buf = parts.write_buf;
    let (writer, reader) = Framed::from_parts(watched).split();
    (DeadlineReader::new(reader, buffered, deadlines), writer)
}

/// How long a server waits on a connection.
#[derive(Debug, Clone, Copy)]
pub struct FrameDeadlines {
    /// Longest silence (no frame at all) before the connection is closed.
    pub idle: Duration,
    /// Longest one frame may take from its first byte to its last.
    pub frame: Duration,
}

/// Why a connection stopped yielding frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame broke the codec's rules (too large) or the connection failed.
    #[error("bad frame: {0}")]
    Bad(std::io::Error),
    /// A frame started but did not complete in time (a slow or stalled client).
    #[error("a frame took longer than {0:?} to arrive")]
    Slow(Duration),
    /// Nothing arrived for the idle timeout.
    #[error("idle for {0:?}")]
    Idle(Duration),
}

impl FrameError {
    /// Whether the client only went away (closed or reset the connection), which is no fault.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, FrameError::Bad(e) if is_disconnect(e))
    }
}

/// How often a [`DeadlineReader`] looks at its deadlines while it waits.
const DEADLINE_TICK: Duration = Duration::from_millis(500);

/// The read half of a connection with the server's deadlines: silence, and a frame that started
/// but does not complete. One ticking timer per connection looks at them (a timer per frame would
/// cost every request a timer of its own).
pub struct DeadlineReader {
    reader: FrameReader,
    /// Bytes of a frame not yet complete that the reader holds.
    buffered: Arc<std::sync::atomic::AtomicUsize>,
    deadlines: FrameDeadlines,
    tick: tokio::time::Interval,
    /// When the last frame arrived (or the reader was made).
    idle_since: tokio::time::Instant,
    /// When the first byte of a frame still incomplete was seen (at a tick).
    partial_since: Option<tokio::time::Instant>,
}

impl DeadlineReader {
    /// Watches `reader` (whose codec reports its partial bytes in `buffered`) with `deadlines`.
    fn new(
        reader: FrameReader,
        buffered: Arc<std::sync::atomic::AtomicUsize>,
        deadlines: FrameDeadlines,
    ) -> DeadlineReader {
        let mut tick = tokio::time::interval(DEADLINE_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        DeadlineReader {
            reader,
            buffered,
            deadlines,
            tick,
            idle_since: tokio::time::Instant::now(),
            partial_since: None,
        }
    }

    /// The next frame, within the deadlines: `Ok(None)` when the other side closed the
    /// connection. Cancel safe: what arrived stays in the reader's buffer.
    pub async fn next(&mut self) -> Result<Option<bytes::BytesMut>, FrameError> {
        loop {
            tokio::select! {
                biased;
                frame = self.reader.next() => {
                    self.idle_since = tokio::time::Instant::now();
                    self.partial_since = None;
                    return match frame {
                        Some(Ok(frame)) => Ok(Some(frame)),
                        Some(Err(e)) => Err(FrameError::Bad(e)),
                        None => Ok(None),
                    };
                }
                _ = self.tick.tick() => {
                    let now = tokio::time::Instant::now();
                    let partial = self.buffered.load(std::sync::atomic::Ordering::Relaxed) > 0;
                    if self.partial_since.is_none() && partial {
                        self.partial_since = Some(now);
                    }
                    match self.partial_since {
                        Some(t) if now.duration_since(t) > self.deadlines.frame => {
                            return Err(FrameError::Slow(self.deadlines.frame))
                        }
                        None if now.duration_since(self.idle_since) > self.deadlines.idle => {
                            return Err(FrameError::Idle(self.deadlines.idle))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Writes queued frames to a connection until the queue closes, with one flush per burst:
/// whatever was queued while the previous write went out is written and flushed together. Used
/// by clients, the client port and the group port alike. With `idle`, a frame of its own is
/// written whenever nothing was queued for its duration (a client's idle ping). Returns the write
/// error that ended it.
pub async fn write_frames<S, T>(
    mut sink: S,
    mut rx: tokio::sync::mpsc::Receiver<T>,
    idle: Option<(Duration, bytes::Bytes)>,
) -> std::io::Result<()>
where
    S: futures::Sink<bytes::Bytes, Error = std::io::Error> + Unpin,
    T: Into<bytes::Bytes>,
{
    // One ticking timer for the idle ping (not one per burst): it fires at a fraction of the
    // interval and pings when nothing went out since the last look.
    let mut ping = idle.map(|(every, frame)| {
        let mut tick = tokio::time::interval(every / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        (tick, frame, false)
    });
    loop {
        let next = match ping.as_mut() {
            None => rx.recv().await.map(Into::into),
            Some((tick, frame, sent_since)) => tokio::select! {
                next = rx.recv() => {
                    *sent_since = true;
                    next.map(Into::into)
                }
                _ = tick.tick() => {
                    if std::mem::take(sent_since) {
                        continue;
                    }
                    Some(frame.clone())
                }
            },
        };
        let Some(frame) = next else { break };
        sink.feed(frame).await?;
        while let Ok(frame) = rx.try_recv() {
            sink.feed(frame.into()).await?;
        }
        sink.flush().await?;
    }
    Ok(())
}

/// What a plain client that got no answer is told: the server may speak TLS.
const TLS_HINT: &str = " (if the array uses TLS, give the client its CA: --tls-ca-file)";

/// Why a client-side handshake failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandshakeError {
    /// TCP connect or I/O failed, or the server closed the connection.
    #[error("{0}")]
    Io(String),
    /// No answer in time.
    #[error("no handshake answer within {after:?}{}", if *.plain { TLS_HINT } else { "" })]
    Timeout {
        /// How long the client waited.
        after: Duration,
        /// Whether the client spoke plain TCP (a TLS server waits for a TLS hello, silently).
        plain: bool,
    },
    /// The server refused; final unless it was only busy.
    #[error("{0}")]
    Refused(Refusal),
    /// The server could not prove it knows the secret (or spoke nonsense).
    #[error("the server failed the handshake: {0}")]
    BadServer(String),
}

impl HandshakeError {
    /// Whether trying again (or another URL) may not help.
    pub fn is_final(&self) -> bool {
        matches!(self, HandshakeError::Refused(r) if !matches!(r, Refusal::Busy(_)))
    }
}

/// What the client side states in its hello (its `Debug` never shows the secret).
#[derive(Clone)]
pub struct ClientIdentity {
    /// Software version announced (the build's own unless overridden for testing).
    pub software_version: String,
    /// Array name expected; `None` accepts any array.
    pub array_name: Option<String>,
    /// The secret proven: the cluster secret, a credential's, or the peer secret; empty when none
    /// is configured.
    pub secret: Vec<u8>,
    /// Client, credential or peer.
    pub role: ConnectionRole,
    /// TLS, when the other side speaks it.
    pub tls: Option<Arc<ClientTls>>,
}

impl std::fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("software_version", &self.software_version)
            .field("array_name", &self.array_name)
            .field("role", &self.role)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Connects to `addr` (`host:port`) and runs TLS (when configured) and the client side of the
/// handshake, all within `timeout`. On success the connection is ready for requests and its frame
/// bound raised to `max_frame_bytes`.
pub async fn connect(
    addr: &str,
    identity: &ClientIdentity,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(FramedConn, Welcome), HandshakeError> {
    match tokio::time::timeout(timeout, connect_inner(addr, identity, max_frame_bytes)).await {
        Ok(r) => r,
        Err(_) => Err(HandshakeError::Timeout {
            after: timeout,
            plain: identity.tls.is_none(),
        }),
    }
}

async fn connect_inner(
    addr: &str,
    identity: &ClientIdentity,
    max_frame_bytes: usize,
) -> Result<(FramedConn, Welcome), HandshakeError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| HandshakeError::Io(format!("connect: {e}")))?;
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    handshake_on(tcp, host, identity, max_frame_bytes).await
}

/// Runs TLS (when configured) and the client side of the handshake on a connection made by the
/// caller (for example from a chosen source address) to `host`. Not bounded in time: wrap it in a
/// timeout, as [`connect`] does.
pub async fn handshake_on(
    tcp: TcpStream,
    host: &str,
    identity: &ClientIdentity,
    max_frame_bytes: usize,
) -> Result<(FramedConn, Welcome), HandshakeError> {
    let _ = tcp.set_nodelay(true);
    let stream = match &identity.tls {
        None => NetStream::Plain(tcp),
        Some(tls) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            tls.connect(host, tcp)
                .await
                .map_err(|e| HandshakeError::Io(format!("TLS handshake: {e}")))?
        }
    };
    let mut framed = Framed::new(stream, codec(HANDSHAKE_FRAME_BYTES_MAX));
    let server_nonce = match recv(&mut framed, identity.tls.is_none()).await? {
        ServerMessage::Challenge { server_nonce } => server_nonce,
        ServerMessage::Refused(r) => return Err(HandshakeError::Refused(r)),
        other => {
            return Err(HandshakeError::BadServer(format!(
                "expected a challenge, got {}",
                message_kind(&other)
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
    match recv(&mut framed, false).await? {
        ServerMessage::Welcome(welcome) => {
            let expected = server_proof(&identity.secret, &server_nonce, &client_nonce);
            if !proofs_equal(&expected, &welcome.proof) {
                return Err(HandshakeError::BadServer(
                    "its proof does not match our secret (is the secret file the same?)".into(),
                ));
            }
            framed.codec_mut().set_max_frame_length(max_frame_bytes);
            Ok((framed, welcome))
        }
        ServerMessage::Refused(r) => Err(HandshakeError::Refused(r)),
        other => Err(HandshakeError::BadServer(format!(
            "expected a welcome, got {}",
            message_kind(&other)
        ))),
    }
}

/// The name of a message's kind (never its content, which may be large or hostile).
fn message_kind(msg: &ServerMessage) -> &'static str {
    match msg {
        ServerMessage::Challenge { .. } => "a challenge",
        ServerMessage::Welcome(_) => "a welcome",
        ServerMessage::Refused(_) => "a refusal",
        ServerMessage::Response(_) => "a response",
        ServerMessage::PeerReply { .. } => "a peer reply",
        ServerMessage::Fatal(_) => "a fatal error",
    }
}

async fn recv(framed: &mut FramedConn, plain: bool) -> Result<ServerMessage, HandshakeError> {
    // A TLS listener waits for a TLS hello and a plain client for our challenge: both wait until
    // the server's handshake deadline closes the connection. Say what probably happened.
    let hint = if plain { TLS_HINT } else { "" };
    match framed.next().await {
        Some(Ok(bytes)) => {
            decode::<ServerMessage>(&bytes).map_err(|e| HandshakeError::BadServer(format!("undecodable frame: {e}")))
        }
        Some(Err(e)) => Err(HandshakeError::Io(format!("read: {e}{hint}"))),
        None => Err(HandshakeError::Io(format!("the server closed the connection{hint}"))),
    }
}

/// Which secret a hello in a given role must prove, as one port sees it.
pub trait Authority: Send + Sync {
    /// `Ok(Some(secret))`: the secret to check the proof with (empty when the array has none);
    /// `Ok(None)`: no such identity (refused as an authentication failure, like a wrong secret);
    /// `Err(refusal)`: the role is not served on this port at all.
    fn secret_for(&self, role: &ConnectionRole) -> Result<Option<Vec<u8>>, Refusal>;
}

/// Where the configuration document of a welcome comes from (it changes as the array does).
pub type DocumentSource = Arc<dyn Fn() -> Arc<String> + Send + Sync>;

/// A source with no document (the group port's).
pub fn no_document() -> DocumentSource {
    Arc::new(|| Arc::new(String::new()))
}

/// What the server side checks a hello against.
#[derive(Clone)]
pub struct ServerIdentity {
    /// Name of this server.
    pub server_name: String,
    /// Array this server belongs to.
    pub array_name: String,
    /// The configuration document sent in the welcome (empty on the group port); the live one,
    /// which changes with the array's servers.
    pub config_toml: DocumentSource,
    /// Which secrets prove which roles on this port.
    pub authority: Arc<dyn Authority>,
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
    /// The client went away (closed or reset the connection) before the handshake completed:
    /// an ordinary event (a client that dialled several servers keeps the first to answer).
    #[error("the client left: {0}")]
    Gone(String),
}

/// Whether an I/O error only says that the other side went away (closed, reset, aborted).
pub fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe
    )
}

/// Runs the server side of the handshake on a fresh connection within `timeout`. On success the
/// frame bound is raised to `max_frame_bytes` and the client's hello is returned. Generic over the
/// stream so that it can be driven over memory (the fuzz tests do).
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    identity: &ServerIdentity,
    timeout: Duration,
    max_frame_bytes: usize,
) -> Result<(Framed<S, LengthDelimitedCodec>, Hello), AcceptError> {
    let mut framed = Framed::new(stream, codec(HANDSHAKE_FRAME_BYTES_MAX));
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

/// Tells a connection that the server will not take it (too many connections) and closes it.
pub async fn refuse_busy(stream: NetStream, why: String, timeout: Duration) {
    let mut framed = Framed::new(stream, codec(HANDSHAKE_FRAME_BYTES_MAX));
    let _ = tokio::time::timeout(
        timeout,
        framed.send(encode(&ServerMessage::Refused(Refusal::Busy(why)))),
    )
    .await;
}

async fn accept_inner<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    identity: &ServerIdentity,
) -> Result<Hello, AcceptError> {
    let server_nonce = nonce();
    send(framed, &ServerMessage::Challenge { server_nonce }).await?;
    let hello = match framed.next().await {
        Some(Ok(bytes)) => match decode::<ClientMessage>(&bytes) {
            Ok(ClientMessage::Hello(h)) => h,
            Ok(_) => return Err(fatal(framed, "the first message must be a hello").await),
            Err(_) => return Err(fatal(framed, "malformed hello").await),
        },
        Some(Err(e)) if is_disconnect(&e) => return Err(AcceptError::Gone(e.to_string())),
        Some(Err(e)) => return Err(fatal(framed, &format!("bad frame: {e}")).await),
        None => return Err(AcceptError::Gone("closed before its hello".into())),
    };
    let secret = match identity.authority.secret_for(&hello.role) {
        Err(refusal) => {
            send(framed, &ServerMessage::Refused(refusal.clone())).await?;
            return Err(AcceptError::Refused(refusal));
        }
        Ok(secret) => secret,
    };
    // An unknown identity costs the same HMAC as a known one with a wrong secret.
    let known = secret.is_some();
    let secret = secret.unwrap_or_else(|| nonce().to_vec());
    let expected = client_proof(
        &secret,
        &server_nonce,
        &hello.client_nonce,
        &hello.array_name,
        &hello.role,
    );
    let refusal = if !(proofs_equal(&hello.proof, &expected) && known) {
        Some(Refusal::AuthenticationFailed)
    } else if hello.protocol_version != PROTOCOL_VERSION
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
    } else {
        None
    };
    if let Some(refusal) = refusal {
        send(framed, &ServerMessage::Refused(refusal.clone())).await?;
        return Err(AcceptError::Refused(refusal));
    }
    let welcome = Welcome {
        software_version: crate::protocol::SOFTWARE_VERSION.to_string(),
        server_name: identity.server_name.clone(),
        proof: server_proof(&secret, &server_nonce, &hello.client_nonce),
        config_toml: (identity.config_toml)().to_string(),
    };
    send(framed, &ServerMessage::Welcome(welcome)).await?;
    Ok(hello)
}

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    msg: &ServerMessage,
) -> Result<(), AcceptError> {
    framed.send(encode(msg)).await.map_err(|e| {
        if is_disconnect(&e) {
            AcceptError::Gone(format!("send: {e}"))
        } else {
            AcceptError::Broken(format!("send: {e}"))
        }
    })
}

async fn fatal<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S, LengthDelimitedCodec>,
    why: &str,
) -> AcceptError {
    let _ = framed.send(encode(&ServerMessage::Fatal(why.to_string()))).await;
    AcceptError::Broken(why.to_string())
}

//! One way to serve a framed port, for the client port and the group port alike: admission, TLS,
//! the handshake within its deadline, one task per connection. What differs between the ports is
//! their [`Port`]: what a refused connection is told, how a failed handshake is counted, and what
//! an authenticated connection may do.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrocotta::admission::Admission;
use ferrocotta::handshake::{self, AcceptError, FramedConn, ServerIdentity};
use ferrocotta::protocol::{encode, Hello, ServerMessage};
use ferrocotta::tls::{NetStream, ServerTls};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a port is listened on: the same for each of its connections.
pub struct Listening {
    /// The port's name in logs ("client", "group").
    pub name: &'static str,
    /// Who this server is, and which secret proves which role here.
    pub identity: ServerIdentity,
    /// TLS, if the port speaks it.
    pub tls: Option<Arc<ServerTls>>,
    /// Bounds on connections.
    pub admission: Admission,
    /// From accept to the end of the protocol handshake (TLS included).
    pub handshake_timeout: Duration,
    /// Largest frame after the handshake.
    pub max_frame: usize,
}

/// What a port does with its connections.
pub trait Port: Send + Sync + 'static {
    /// How it is listened on.
    fn listening(&self) -> &Listening;

    /// Admission refused a connection (`why`); it is still open, for a port that answers.
    fn refused(&self, tcp: TcpStream, remote: SocketAddr, why: String) -> impl Future<Output = ()> + Send;

    /// The TLS or protocol handshake failed, or took too long.
    fn handshake_failed(&self, remote: SocketAddr, error: HandshakeFailed);

    /// Serves an authenticated connection until it ends or `shutdown`; its requests run on
    /// `tracker`.
    fn serve_connection(
        self: Arc<Self>,
        framed: FramedConn,
        hello: Hello,
        remote: SocketAddr,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> impl Future<Output = ()> + Send;
}

/// Accepts connections until `shutdown`, each in a task of its own on `tracker`. A connection
/// keeps its admission until it ends.
pub async fn serve<P: Port>(port: Arc<P>, listener: TcpListener, shutdown: CancellationToken, tracker: TaskTracker) {
    let name = port.listening().name;
    while let Some((tcp, remote, admitted)) = port.listening().admission.next(&listener, &shutdown, name).await {
        let port = port.clone();
        let shutdown = shutdown.clone();
        let inner = tracker.clone();
        tracker.spawn(async move {
            let mut admitted = match admitted {
                Ok(a) => a,
                Err(why) => return port.refused(tcp, remote, why.to_string()).await,
            };
            match handshake(port.listening(), tcp).await {
                Ok((framed, hello)) => {
                    admitted.handshake_done();
                    port.serve_connection(framed, hello, remote, shutdown, inner).await;
                }
                Err(e) => port.handshake_failed(remote, e),
            }
            drop(admitted);
        });
    }
}

/// Why a connection did not get past its handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailed {
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// The protocol handshake failed (wrong secret, version, array or port).
    #[error(transparent)]
    Protocol(#[from] AcceptError),
    /// Both together took longer than the handshake deadline.
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
}

impl HandshakeFailed {
    /// Whether the client only went away before the handshake completed (no fault: logged at
    /// debug level, not counted as a rejection).
    pub fn is_disconnect(&self) -> bool {
        match self {
            HandshakeFailed::Tls(e) => handshake::is_disconnect(e),
            HandshakeFailed::Protocol(AcceptError::Gone(_)) => true,
            _ => false,
        }
    }
}

/// TLS (when the port speaks it) and the protocol handshake, within the handshake deadline.
async fn handshake(l: &Listening, tcp: TcpStream) -> Result<(FramedConn, Hello), HandshakeFailed> {
    let both = async {
        let stream = match &l.tls {
            None => NetStream::Plain(tcp),
            Some(t) => t.accept(tcp).await.map_err(HandshakeFailed::Tls)?,
        };
        Ok(handshake::accept(stream, &l.identity, l.handshake_timeout, l.max_frame).await?)
    };
    tokio::time::timeout(l.handshake_timeout, both)
        .await
        .unwrap_or(Err(HandshakeFailed::Timeout(l.handshake_timeout)))
}

/// The last frame of a connection the server ends: why.
pub fn fatal(why: impl Into<String>) -> bytes::Bytes {
    encode(&ServerMessage::Fatal(why.into()))
}

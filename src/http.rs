//! Serving an axum router over HTTP/1.1, plain or TLS, with bounds: connections through an
//! [`Admission`], a deadline for the TLS handshake and for each request's headers, the size and
//! number of headers. Used by the array's admin port and by both ports of an integration node.
//!
//! axum's own `serve` takes a plain `TcpListener` and has none of these bounds, so this runs
//! hyper's connection builder under its own accept loop (as axum's low-level examples do).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionLimits};
use crate::log_throttle::LogThrottle;
use crate::tls::{NetStream, ServerTls};

/// Bounds of one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections held, per address, and in their TLS handshake.
    pub admission: AdmissionLimits,
    /// Bytes of a request's head (request line and headers) at most; beyond it the connection
    /// is answered 431 and closed. hyper allows no less than 8 KiB.
    pub header_bytes_max: usize,
    /// Headers of one request at most.
    pub headers_max: usize,
    /// Longest a request's head may take to arrive (also how long an idle keep-alive connection
    /// is kept).
    pub header_read_timeout: Duration,
    /// Longest a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
    /// Longest in-flight requests get to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            admission: AdmissionLimits {
                connections_max: 1024,
                connections_per_ip_max: 512,
                pending_handshakes_max: 128,
            },
            header_bytes_max: 16 * 1024,
            headers_max: 64,
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

static REFUSED: LogThrottle = LogThrottle::new();
static TLS_FAILED: LogThrottle = LogThrottle::new();

/// Serves `router` on `listener` until `shutdown`, then lets in-flight requests finish (bounded by
/// `shutdown_grace`). `what` names the port in logs.
pub async fn serve(
    what: &'static str,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    limits: HttpLimits,
    router: axum::Router,
    shutdown: CancellationToken,
) {
    let admission = Arc::new(Admission::new(limits.admission));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.header_bytes_max.max(8192))
        .max_headers(limits.headers_max);
    let builder = Arc::new(builder);
    while let Some((tcp, remote, admitted)) = admission.next(&listener, &shutdown, what).await {
        let mut admitted = match admitted {
            Ok(a) => a,
            Err(why) => {
                if let Some(suppressed) = REFUSED.allow() {
                    tracing::warn!(event = "http.connection_refused", port = what, remote = %remote, reason = %why, suppressed);
                }
                continue;
            }
        };
        let tls = tls.clone();
        let builder = builder.clone();
        let router = router.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match &tls {
                None => NetStream::Plain(tcp),
                Some(t) => match tokio::time::timeout(limits.tls_handshake_timeout, t.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        if let Some(suppressed) = TLS_FAILED.allow() {
                            tracing::warn!(event = "http.tls_failed", port = what, remote = %remote, error = %e, suppressed);
                        }
                        return;
                    }
                    Err(_) => return,
                },
            };
            admitted.handshake_done();
            let service = TowerToHyperService::new(router);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(conn.into_owned()).await;
            drop(admitted);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(event = "http.shutdown_timeout", port = what);
    }
}

/// Why an HTTP request of [`request`] got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection, TLS or HTTP exchange within the deadline.
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// Where it went.
        addr: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The connection or the exchange failed.
    #[error("{addr}: {why}")]
    Failed {
        /// Where it went.
        addr: String,
        /// What failed.
        why: String,
    },
}

/// Largest answer body a [`Call::get`] takes.
pub const ANSWER_BYTES_MAX: usize = 16 << 20;

/// One HTTP request of [`request`].
#[derive(Debug, Clone)]
pub struct Call<'a> {
    /// GET, POST, ...
    pub method: hyper::Method,
    /// Path and query.
    pub path: &'a str,
    /// Extra headers.
    pub headers: Vec<(&'a str, String)>,
    /// The body (empty for none).
    pub body: Vec<u8>,
    /// Largest answer body taken.
    pub body_max: usize,
    /// Deadline of the whole exchange.
    pub timeout: Duration,
}

impl<'a> Call<'a> {
    /// `GET path`, answers up to [`ANSWER_BYTES_MAX`], within `timeout`.
    pub fn get(path: &'a str, timeout: Duration) -> Call<'a> {
        Call {
            method: hyper::Method::GET,
            path,
            headers: Vec::new(),
            body: Vec::new(),
            body_max: ANSWER_BYTES_MAX,
            timeout,
        }
    }
}

/// One HTTP/1.1 request to `addr` (`host:port`) over a new connection, TLS when `tls` is given
/// (the server's certificate must name `host`): the answer's status and body. Everything
/// (connect, TLS, request, body) within the call's timeout. For the admin ports' own small
/// exchanges (the console gathering, `ferrocotta top`), not for load.
pub async fn request(
    addr: &str,
    tls: Option<&crate::tls::ClientTls>,
    call: Call<'_>,
) -> Result<(u16, bytes::Bytes), CallError> {
    request_with_headers(addr, tls, call)
        .await
        .map(|(status, _, body)| (status, body))
}

/// [`request`], with the answer's headers.
pub async fn request_with_headers(
    addr: &str,
    tls: Option<&crate::tls::ClientTls>,
    call: Call<'_>,
) -> Result<(u16, hyper::HeaderMap, bytes::Bytes), CallError> {
    let Call {
        method,
        path,
        headers,
        body,
        body_max,
        timeout,
    } = call;
    let failed = |why: String| CallError::Failed {
        addr: addr.to_string(),
        why,
    };
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| failed(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let stream = match tls {
            None => NetStream::Plain(tcp),
            Some(t) => t.connect(host, tcp).await.map_err(|e| failed(format!("TLS: {e}")))?,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(e.to_string()))?;
        // The connection's task ends with this call, however the call ends.
        let _driver = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr);
        for (k, v) in &headers {
            builder = builder.header(*k, v.as_str());
        }
        let request = builder
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .map_err(|e| failed(format!("bad request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| failed(e.to_string()))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let limited = http_body_util::Limited::new(response.into_body(), body_max);
        let body = http_body_util::BodyExt::collect(limited)
            .await
            .map_err(|e| failed(format!("reading the body: {e}")))?
            .to_bytes();
        Ok((status, headers, body))
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or_else(|_| {
        Err(CallError::Timeout {
            addr: addr.to_string(),
            timeout,
        })
    })
}

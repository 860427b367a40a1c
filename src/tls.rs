//! TLS on every port, with rustls (ring as the crypto provider, no OpenSSL).
//!
//! - [`ServerTls`]: what a listener presents (its certificate) and which client certificates it
//!   accepts (signed by the CA; required or not).
//! - [`ClientTls`]: what a dialler trusts (the CA) and the certificate it shows, if any.
//! - [`NetStream`]: a plain or TLS connection behind one type, so the framed protocol and HTTP
//!   run on either.
//! - Rotation: both re-read their files when asked ([`Reloadable::reload`]); [`spawn_reloader`]
//!   asks on SIGHUP and every `reload_interval` (only files whose size or time changed are
//!   re-read; a bad new file is logged and the previous configuration stays). Connections
//!   already open keep the configuration they started with.
//! - [`LocalCa`]: a CA and certificates made on the spot (rcgen), for `ferrocotta up --tls` and
//!   the tests.
//!
//! The protocol's own handshake still runs inside TLS: TLS protects the channel and, with client
//! certificates, says which machine is calling; the secret (or credential) says what it may do.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Files of a TLS identity; `cert_file` and `key_file` are optional on the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of the leaf certificate.
    pub key_file: Option<PathBuf>,
    /// The CA certificate(s) (PEM) trusted to sign the other side's certificate.
    pub ca_file: PathBuf,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("cannot read certificates from {}: {e}", path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{}: not a PEM certificate file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // Never the key's bytes in an error.
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError(format!("{}: no usable private key: {e}", path.display())))
}

fn read_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError(format!("{}: not a usable CA certificate: {e}", path.display())))?;
    }
    Ok(Arc::new(roots))
}

/// Size and modification time of each file, to notice a change without reading it.
fn stamp(files: &[&Path]) -> Vec<Option<(u64, SystemTime)>> {
    files
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.len(), m.modified().ok()?)))
        })
        .collect()
}

/// A configuration that can be re-read from its files.
pub trait Reloadable: Send + Sync {
    /// Re-reads the files (`force`: even if they look unchanged); whether anything changed.
    fn reload(&self, force: bool) -> Result<bool, TlsError>;
    /// What it is, for logs (`client port a1`).
    fn describe(&self) -> String;
}

struct Current<T> {
    config: Arc<T>,
    stamp: Vec<Option<(u64, SystemTime)>>,
}

/// The TLS side of a listener.
pub struct ServerTls {
    what: String,
    files: TlsFiles,
    require_client_cert: bool,
    current: RwLock<Current<rustls::ServerConfig>>,
}

impl ServerTls {
    /// Loads a listener's identity; `require_client_cert` makes clients show a certificate signed
    /// by the CA (mutual TLS). `what` names the listener in logs.
    pub fn load(what: &str, files: TlsFiles, require_client_cert: bool) -> Result<Arc<ServerTls>, TlsError> {
        let current = Self::build(&files, require_client_cert)?;
        Ok(Arc::new(ServerTls {
            what: what.to_string(),
            files,
            require_client_cert,
            current: RwLock::new(current),
        }))
    }

    fn paths(files: &TlsFiles) -> Vec<&Path> {
        let mut p: Vec<&Path> = vec![&files.ca_file];
        p.extend(files.cert_file.as_deref());
        p.extend(files.key_file.as_deref());
        p
    }

    fn build(files: &TlsFiles, require_client_cert: bool) -> Result<Current<rustls::ServerConfig>, TlsError> {
        let stamp = stamp(&Self::paths(files));
        let (Some(cert_file), Some(key_file)) = (&files.cert_file, &files.key_file) else {
            return Err(TlsError("a listener needs a certificate and a key".into()));
        };
        let certs = read_certs(cert_file)?;
        let key = read_key(key_file)?;
        let roots = read_roots(&files.ca_file)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, crypto());
        let verifier = if require_client_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        let verifier = verifier
            .build()
            .map_err(|e| TlsError(format!("{}: {e}", files.ca_file.display())))?;
        let mut config = rustls::ServerConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| TlsError(format!("{} with {}: {e}", cert_file.display(), key_file.display())))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Current {
            config: Arc::new(config),
            stamp,
        })
    }

    /// Runs the TLS handshake of an accepted connection.
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<NetStream> {
        let config = self.current.read().expect("tls lock").config.clone();
        let stream = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        Ok(NetStream::Tls(Box::new(tokio_rustls::TlsStream::Server(stream))))
    }

    /// Whether clients must show a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.require_client_cert
    }
}

impl Reloadable for ServerTls {
    fn reload(&self, force: bool) -> Result<bool, TlsError> {
        if !force && self.current.read().expect("tls lock").stamp == stamp(&Self::paths(&self.files)) {
            return Ok(false);
        }
        let next = Self::build(&self.files, self.require_client_cert)?;
        *self.current.write().expect("tls lock") = next;
        Ok(true)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

/// The TLS side of a dialler.
pub struct ClientTls {
    what: String,
    files: TlsFiles,
    current: RwLock<Current<rustls::ClientConfig>>,
}

impl ClientTls {
    /// Loads what a dialler trusts (the CA) and the certificate it shows, if any.
    pub fn load(what: &str, files: TlsFiles) -> Result<Arc<ClientTls>, TlsError> {
        let current = Self::build(&files)?;
        Ok(Arc::new(ClientTls {
            what: what.to_string(),
            files,
            current: RwLock::new(current),
        }))
    }

    fn build(files: &TlsFiles) -> Result<Current<rustls::ClientConfig>, TlsError> {
        let stamp = stamp(&ServerTls::paths(files));
        let roots = read_roots(&files.ca_file)?;
        let builder = rustls::ClientConfig::builder_with_provider(crypto())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .map_err(|e| TlsError(format!("{} with {}: {e}", cert.display(), key.display())))?,
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(TlsError("a client certificate needs both its file and its key".into())),
        };
        Ok(Current {
            config: Arc::new(config),
            stamp,
        })
    }

    /// The rustls configuration in force (for callers that run TLS themselves, like a blocking
    /// HTTP client in the tests).
    pub fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        self.current.read().expect("tls lock").config.clone()
    }

    /// Runs the TLS handshake on a fresh connection to `host`, verifying the server's certificate
    /// against the CA and the host name (or IP address) dialled.
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> io::Result<NetStream> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("`{host}` is not a host name: {e}")))?;
        let config = self.current.read().expect("tls lock").config.clone();
        let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        Ok(NetStream::Tls(Box::new(tokio_rustls::TlsStream::Client(stream))))
    }
}

impl Reloadable for ClientTls {
    fn reload(&self, force: bool) -> Result<bool, TlsError> {
        if !force && self.current.read().expect("tls lock").stamp == stamp(&ServerTls::paths(&self.files)) {
            return Ok(false);
        }
        let next = Self::build(&self.files)?;
        *self.current.write().expect("tls lock") = next;
        Ok(true)
    }

    fn describe(&self) -> String {
        self.what.clone()
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("files", &self.files).finish()
    }
}

/// Re-reads every handle's files on SIGHUP (forced) and every `interval` (when they changed),
/// until `shutdown`. Logs `tls.reloaded` or `tls.reload_failed` (the old configuration stays).
pub fn spawn_reloader(handles: Vec<Arc<dyn Reloadable>>, interval: Duration, shutdown: CancellationToken) {
    if handles.is_empty() {
        return;
    }
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(event = "tls.sighup_unavailable", error = %e);
                None
            }
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let force = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
            };
            for h in &handles {
                match h.reload(force) {
                    Ok(true) => tracing::info!(event = "tls.reloaded", what = %h.describe()),
                    Ok(false) => {}
                    Err(e) => tracing::error!(event = "tls.reload_failed", what = %h.describe(), error = %e),
                }
            }
        }
    });
}

/// A connection, plain or TLS.
pub enum NetStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (either side).
    Tls(Box<tokio_rustls::TlsStream<TcpStream>>),
}

impl NetStream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            NetStream::Plain(s) => s,
            NetStream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether the other side showed a certificate (verified against the CA by the handshake)
    /// that is valid for `name` (a DNS name in its subject alternative names).
    pub fn peer_certificate_names(&self, name: &str) -> bool {
        let NetStream::Tls(tls) = self else {
            return false;
        };
        let certs = match tls.as_ref() {
            tokio_rustls::TlsStream::Server(s) => s.get_ref().1.peer_certificates(),
            tokio_rustls::TlsStream::Client(s) => s.get_ref().1.peer_certificates(),
        };
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return false;
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
            return false;
        };
        let Ok(server_name) = ServerName::try_from(name) else {
            return false;
        };
        cert.verify_is_valid_for_subject_name(&server_name).is_ok()
    }

    /// The plain TCP connection, if this is one.
    pub fn into_plain(self) -> Option<TcpStream> {
        match self {
            NetStream::Plain(s) => Some(s),
            NetStream::Tls(_) => None,
        }
    }

    /// Whether this is a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, NetStream::Tls(_))
    }
}

impl AsyncRead for NetStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            NetStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for NetStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NetStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            NetStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(s) => Pin::new(s).poll_flush(cx),
            NetStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            NetStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            NetStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            NetStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            NetStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            NetStream::Plain(s) => s.is_write_vectored(),
            NetStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A certificate authority made on the spot, and the certificates it issues: for
/// `ferrocotta up --tls` and the tests, never a substitute for an operator's own PKI.
pub struct LocalCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// File names of a CA in a folder.
const CA_CERT_FILE: &str = "ca.crt";
const CA_KEY_FILE: &str = "ca.key";

fn ca_params() -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ferrocotta local CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl LocalCa {
    /// A new CA.
    pub fn create() -> Result<LocalCa, TlsError> {
        let key = rcgen::KeyPair::generate().map_err(|e| TlsError(e.to_string()))?;
        let cert = ca_params().self_signed(&key).map_err(|e| TlsError(e.to_string()))?;
        Ok(LocalCa { cert, key })
    }

    /// The CA kept in `dir` (`ca.crt`, `ca.key`), created there first if absent. An existing CA is
    /// used again through its key (the issuer's name and key identifier are the same, so the
    /// certificates it issues verify against the `ca.crt` on disk).
    pub fn in_dir(dir: &Path) -> Result<LocalCa, TlsError> {
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            let pem = std::fs::read_to_string(&key_path)
                .map_err(|e| TlsError(format!("cannot read {}: {e}", key_path.display())))?;
            let key = rcgen::KeyPair::from_pem(&pem).map_err(|e| TlsError(format!("{}: {e}", key_path.display())))?;
            let cert = ca_params().self_signed(&key).map_err(|e| TlsError(e.to_string()))?;
            return Ok(LocalCa { cert, key });
        }
        let ca = Self::create()?;
        std::fs::create_dir_all(dir).map_err(|e| TlsError(format!("cannot create {}: {e}", dir.display())))?;
        std::fs::write(dir.join(CA_CERT_FILE), ca.cert.pem()).map_err(|e| TlsError(e.to_string()))?;
        crate::security::write_private_file(&key_path, ca.key.serialize_pem().as_bytes())
            .map_err(|e| TlsError(format!("cannot write {}: {e}", key_path.display())))?;
        Ok(ca)
    }

    /// Path of the CA certificate in a folder made by [`LocalCa::in_dir`].
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join(CA_CERT_FILE)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate (PEM) and its key (PEM) valid for `names` (DNS names or IP addresses), for
    /// both server and client use.
    pub fn issue(&self, names: &[String]) -> Result<(String, String), TlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| TlsError(e.to_string()))?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(rcgen::DnType::CommonName, first.clone());
        }
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().map_err(|e| TlsError(e.to_string()))?;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(|e| TlsError(e.to_string()))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a certificate for `names` into `dir/<stem>.crt` and `dir/<stem>.key` (0600).
    pub fn issue_files(&self, dir: &Path, stem: &str, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
        let (cert, key) = self.issue(names)?;
        let cert_path = dir.join(format!("{stem}.crt"));
        let key_path = dir.join(format!("{stem}.key"));
        std::fs::write(&cert_path, cert).map_err(|e| TlsError(format!("cannot write {}: {e}", cert_path.display())))?;
        crate::security::write_private_file(&key_path, key.as_bytes())
            .map_err(|e| TlsError(format!("cannot write {}: {e}", key_path.display())))?;
        Ok((cert_path, key_path))
    }
}

/// The names a certificate for a process listening on `host` should carry besides its own name:
/// the host itself, and `localhost` with its addresses when the host is a loopback address.
pub fn names_for(name: &str, host: &str) -> Vec<String> {
    let mut names = vec![name.to_string()];
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let extra = if loopback {
        vec![host.to_string(), "localhost".to_string(), "127.0.0.1".to_string()]
    } else {
        vec![host.to_string()]
    };
    for n in extra {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

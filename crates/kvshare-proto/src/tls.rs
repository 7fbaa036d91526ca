//! TLS for kvshare's gRPC connections (rustls with the ring provider).
//!
//! - PEM loading shared by nodes and clients: [`certs_from_pem`], [`key_from_pem`],
//!   [`roots_from_pem`].
//! - [`ClientTls`]: a client's TLS settings (the CA that signs the servers, and optionally a
//!   client certificate for mTLS), replaceable at run time ([`ClientTls::replace`]): a node
//!   re-reads its certificate files and its peer connections present the new client certificate
//!   from their next handshake on.
//! - [`TlsConnector`]: the tonic connector every TLS channel uses (TCP with `TCP_NODELAY`, then
//!   a TLS handshake with ALPN `h2`, verifying the server's certificate against the host name of
//!   the address: its DNS SAN, or its IP SAN when the host is an IP address).
//!
//! Channels are built by [`crate::transport::channel_lazy`] and [`crate::transport::connect`].

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use parking_lot::RwLock;
use rustls::RootCertStore;
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::Uri;

/// ALPN protocol of gRPC (HTTP/2).
pub const ALPN_H2: &[u8] = b"h2";

/// Errors loading TLS material or building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// PEM text did not parse.
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        /// What was being read (a file name or a description).
        what: String,
        /// The cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// No certificate in PEM text that must hold one.
    #[error("{what}: no PEM certificate (-----BEGIN CERTIFICATE-----) found")]
    NoCertificate {
        /// What was being read.
        what: String,
    },
    /// No private key in PEM text that must hold one.
    #[error("{what}: no PEM private key (PKCS#8, PKCS#1 or SEC1) found")]
    NoKey {
        /// What was being read.
        what: String,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("{what}: unusable CA certificate: {source}")]
    BadCa {
        /// What was being read.
        what: String,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("{what}: {source}")]
    Config {
        /// What was being configured.
        what: String,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("client CA: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider of every TLS configuration (ring: no cmake or nasm needed to build, and
/// explicit, so nothing depends on a process-wide default provider).
///
/// AES-128-GCM is preferred to ring's default AES-256-GCM: 10 AES rounds instead of 14 on
/// every byte of K/V moved, with a security margin that is not in question (it is TLS 1.3's
/// mandatory suite). The other suites stay available in ring's order.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| *s != TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Reads a file for TLS material.
pub fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Every certificate in `pem` (a chain: the leaf first), failing when there is none.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// The first private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { what: what.into() },
        source => TlsError::Pem {
            what: what.into(),
            source,
        },
    })
}

/// A root store holding every CA certificate in `pem`.
pub fn roots_from_pem(pem: &[u8], what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem, what)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            what: what.into(),
            source,
        })?;
    }
    Ok(roots)
}

/// PEM text of a client certificate chain and its private key (mTLS).
#[derive(Clone)]
pub struct IdentityPem {
    /// Certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// Private key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for IdentityPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("IdentityPem")
            .field("cert_bytes", &self.cert.len())
            .finish_non_exhaustive()
    }
}

/// A rustls client configuration: trusts the CAs in `ca_pem`, presents `identity` if given,
/// offers ALPN `h2`.
pub fn client_config(
    ca_pem: &[u8],
    identity: Option<&IdentityPem>,
) -> Result<ClientConfig, TlsError> {
    let roots = roots_from_pem(ca_pem, "CA certificate")?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            what: "TLS protocol versions".into(),
            source,
        })?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                certs_from_pem(&id.cert, "client certificate")?,
                key_from_pem(&id.key, "client key")?,
            )
            .map_err(|source| TlsError::Config {
                what: "client certificate and key".into(),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A client's TLS settings, shared by every channel made from it (cheap to clone) and
/// replaceable at run time: channels use the configuration current at each handshake.
#[derive(Clone)]
pub struct ClientTls {
    current: Arc<RwLock<Arc<ClientConfig>>>,
    /// Name the server certificates are verified against instead of the address's host.
    server_name: Option<Arc<str>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field(
                "client_certificate",
                &self.current.read().client_auth_cert_resolver.has_certs(),
            )
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in `ca_pem` (PEM); presents `identity` when the servers
    /// require client certificates (mTLS).
    pub fn from_pem(ca_pem: &[u8], identity: Option<&IdentityPem>) -> Result<Self, TlsError> {
        Ok(Self::from_config(client_config(ca_pem, identity)?))
    }

    /// Reads the CA file and, if given, the client certificate and key files (PEM).
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let identity = identity
            .map(|(cert, key)| {
                Ok::<_, TlsError>(IdentityPem {
                    cert: read_file(cert)?,
                    key: read_file(key)?,
                })
            })
            .transpose()?;
        Self::from_pem(&read_file(ca)?, identity.as_ref())
    }

    /// Uses a rustls configuration as it is (it should offer ALPN `h2`).
    pub fn from_config(config: ClientConfig) -> Self {
        ClientTls {
            current: Arc::new(RwLock::new(Arc::new(config))),
            server_name: None,
        }
    }

    /// Verifies every server's certificate against `name` (a DNS name all of them carry as a
    /// SAN) instead of the host of the address dialled: for servers reached by IP address,
    /// such as nodes found through a headless Service. Shares the configuration (and its
    /// replacements) with `self`.
    pub fn with_server_name(&self, name: Option<&str>) -> Self {
        ClientTls {
            current: self.current.clone(),
            server_name: name.map(Arc::from),
        }
    }

    /// The name server certificates are verified against, when not the address's host.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Replaces the configuration of every channel made from this value: their next
    /// handshakes use the new CA and client certificate; open connections are untouched.
    pub fn replace(&self, ca_pem: &[u8], identity: Option<&IdentityPem>) -> Result<(), TlsError> {
        let config = Arc::new(client_config(ca_pem, identity)?);
        *self.current.write() = config;
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.current.read().clone()
    }
}

/// Errors of a TLS connection attempt.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The address has no host.
    #[error("address {0} has no host")]
    NoHost(String),
    /// The host is not a valid DNS name or IP address for TLS.
    #[error("host {host:?} is not a valid TLS server name: {source}")]
    ServerName {
        /// The host.
        host: String,
        /// The cause.
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },
    /// The TCP connection failed.
    #[error("TCP connection to {addr} failed: {source}")]
    Tcp {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server requires a client certificate (mTLS) and this client has none.
    #[error(
        "{addr} requires a client certificate (mTLS): give this client one signed by the \
         server's client CA (--tls-cert and --tls-key, KVSHARE_TLS_CERT/KEY)"
    )]
    ClientCertificateRequired {
        /// The address.
        addr: String,
    },
    /// The TLS handshake failed (certificate not trusted, wrong host name, client
    /// certificate refused, ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        /// The address.
        addr: String,
        /// The cause (rustls' error inside).
        #[source]
        source: std::io::Error,
    },
}

/// The tonic connector of TLS channels: TCP (no Nagle), then TLS with the [`ClientTls`]
/// configuration current at the time, verifying the certificate against the URI's host.
#[derive(Clone, Debug)]
pub struct TlsConnector {
    tls: ClientTls,
}

impl TlsConnector {
    /// A connector using `tls`.
    pub fn new(tls: ClientTls) -> Self {
        TlsConnector { tls }
    }
}

/// Host (without IPv6 brackets) and port of `uri` (default port: 443 for https, else 80).
fn host_port(uri: &Uri) -> Result<(String, u16), ConnectError> {
    let host = uri
        .host()
        .ok_or_else(|| ConnectError::NoHost(uri.to_string()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    Ok((host, port))
}

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        Box::pin(async move {
            let (host, port) = host_port(&uri)?;
            // HTTP/2 servers speak first (SETTINGS): their first bytes are the verdict on a
            // client certificate.
            Ok(TokioIo::new(connect_tls(&tls, &host, port, true).await?))
        })
    }
}

/// A TLS connection to `host:port` with `tls` (TCP without Nagle, certificate verified against
/// `host` or the configured server name); a server that wants a client certificate this client
/// does not have fails here. `server_speaks_first`: the protocol's server sends the first
/// application bytes (HTTP/2), so a refused client certificate also fails here, with the
/// reason; otherwise the refusal arrives as an alert at the first read.
pub async fn connect_tls(
    tls: &ClientTls,
    host: &str,
    port: u16,
    server_speaks_first: bool,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let config = tls.config();
    let verify_as = tls
        .server_name
        .as_deref()
        .map_or_else(|| host.to_string(), str::to_string);
    let name =
        ServerName::try_from(verify_as.clone()).map_err(|source| ConnectError::ServerName {
            host: verify_as,
            source,
        })?;
    let addr = format!("{host}:{port}");
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|source| ConnectError::Tcp {
            addr: addr.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let has_cert = config.client_auth_cert_resolver.has_certs();
    let requested = Arc::new(AtomicBool::new(false));
    let mut config = (*config).clone();
    config.client_auth_cert_resolver = Arc::new(NoteRequest {
        inner: config.client_auth_cert_resolver.clone(),
        requested: requested.clone(),
    });
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|source| ConnectError::Handshake {
            addr: addr.clone(),
            source,
        })?;
    if requested.load(Ordering::Acquire) {
        if !has_cert {
            return Err(ConnectError::ClientCertificateRequired { addr });
        }
        if !server_speaks_first {
            return Ok(tls);
        }
        // TLS 1.3 ends the client's handshake before the server has checked its
        // certificate: wait for the server's verdict (its first bytes, or an alert) so
        // that a refused certificate fails here with its reason.
        let (io, conn) = tls.get_mut();
        await_server_verdict(io, conn)
            .await
            .map_err(|source| ConnectError::Handshake { addr, source })?;
    }
    Ok(tls)
}

/// A client-certificate resolver that notes whether the server asked for a certificate.
#[derive(Debug)]
struct NoteRequest {
    inner: Arc<dyn rustls::client::ResolvesClientCert>,
    requested: Arc<AtomicBool>,
}

impl rustls::client::ResolvesClientCert for NoteRequest {
    fn resolve(
        &self,
        root_hint_subjects: &[&[u8]],
        sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.requested.store(true, Ordering::Release);
        self.inner.resolve(root_hint_subjects, sigschemes)
    }

    fn has_certs(&self) -> bool {
        self.inner.has_certs()
    }
}

/// `std::io::Read` over a tokio socket's non-blocking reads.
struct TryRead<'a>(&'a TcpStream);

impl std::io::Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// Reads TLS records until the server sends data (it accepted the client certificate; the
/// data stays buffered in `conn` for the stream's first read) or an alert (refused).
async fn await_server_verdict(
    io: &mut TcpStream,
    conn: &mut rustls::ClientConnection,
) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    loop {
        io.readable().await?;
        match conn.read_tls(&mut TryRead(io)) {
            Ok(0) => {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "the server closed the connection after the handshake",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let state = conn
            .process_new_packets()
            .map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
        if state.plaintext_bytes_to_read() > 0 || state.peer_has_closed() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_errors_name_what_was_read() {
        let e = certs_from_pem(b"nothing here", "CA file x").unwrap_err();
        assert!(e.to_string().contains("CA file x"), "{e}");
        assert!(matches!(e, TlsError::NoCertificate { .. }));
        let e = key_from_pem(b"nothing", "key file y").unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        assert!(ClientTls::from_pem(b"", None).is_err());
    }

    #[test]
    fn host_port_strips_brackets_and_defaults_ports() {
        let u: Uri = "https://[::1]:50051".parse().unwrap();
        assert_eq!(host_port(&u).unwrap(), ("::1".to_string(), 50051));
        let u: Uri = "https://node-0.kvshare".parse().unwrap();
        assert_eq!(host_port(&u).unwrap(), ("node-0.kvshare".to_string(), 443));
        let u: Uri = "http://a:1".parse().unwrap();
        assert_eq!(host_port(&u).unwrap(), ("a".to_string(), 1));
    }
}

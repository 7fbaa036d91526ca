//! Accept loops of the gRPC and HTTP ports, with or without TLS.
//!
//! Each accepted TCP connection is counted against `--max-connections` (gRPC) and gets
//! `TCP_NODELAY`; with TLS its handshake runs on a task of its own (a slow or silent client
//! holds up no other connection) and must finish within `--handshake-timeout-ms`, which for gRPC
//! also covers the HTTP/2 preface that follows (one deadline from accept, see
//! [`conn::GuardedConn`]). The acceptor is taken from [`NodeTls`] at each handshake, so a
//! reloaded certificate is used from the next connection on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use crate::conn::{self, GuardedConn, ServerStream};
use crate::tls::NodeTls;

/// Connections whose handshake is done but that the server has not taken yet.
const READY_QUEUE: usize = 128;

/// Waits a little after a failed accept (out of file descriptors, say) instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// How long a connection whose TLS handshake failed is kept to let the client read the alert.
const ALERT_LINGER: Duration = Duration::from_millis(500);

/// TLS handshake of `stream` within `deadline`. A failed handshake has sent its alert (no
/// client certificate, unknown CA, ...); the connection is then closed gracefully, reading
/// what the client still sends for a moment, so the close does not become a TCP reset that
/// discards the alert before the client reads it (the client would only see "connection
/// closed").
pub(crate) async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    deadline: tokio::time::Instant,
    what: &'static str,
) -> Option<TlsStream<TcpStream>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let peer = stream.peer_addr().ok();
    match tokio::time::timeout_at(deadline, acceptor.accept(stream).into_fallible()).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err((e, mut io))) => {
            debug!(?peer, error = %e, "{what} TLS handshake failed");
            let _ = tokio::time::timeout(ALERT_LINGER, async {
                let _ = io.shutdown().await;
                let mut sink = [0u8; 4096];
                while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
            None
        }
        Err(_) => {
            debug!(?peer, "{what} TLS handshake timed out");
            None
        }
    }
}

/// The next connection on `listener` that `limit` admits (without Nagle's algorithm), with
/// its slot; a failed accept waits a moment, a connection over the limit is closed at once.
pub(crate) async fn accept_counted(
    listener: &TcpListener,
    limit: &conn::ConnectionLimit,
    what: &str,
) -> (TcpStream, conn::ConnSlot) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                debug!(error = %e, "accepting a {what} connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match limit.acquire() {
            Some(slot) => return (stream, slot),
            None => warn!(
                open = limit.open(),
                "{what} connection refused: --max-connections reached"
            ),
        }
    }
}

/// The gRPC server's incoming connections: admitted by `limit`, TLS-wrapped with `tls`. The
/// loop ends when the server drops the stream.
pub fn grpc_incoming(
    listener: TcpListener,
    limit: conn::ConnectionLimit,
    tls: Option<Arc<NodeTls>>,
) -> ReceiverStream<std::io::Result<GuardedConn>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = accept_counted(&listener, &limit, "gRPC") => a,
                _ = tx.closed() => return,
            };
            let (stream, slot) = accepted;
            let info = stream.connect_info();
            match &tls {
                None => {
                    let conn = GuardedConn::new(ServerStream::Plain(stream), info, slot);
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tls.grpc_acceptor();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if let Some(s) = handshake(acceptor, stream, slot.deadline(), "gRPC").await
                        {
                            let conn = GuardedConn::new(ServerStream::Tls(Box::new(s)), info, slot);
                            let _ = tx.send(Ok(conn)).await;
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The HTTP port's listener with TLS, for `axum::serve`: handshakes run on their own tasks
/// and must finish within `handshake_timeout`.
pub struct HttpTlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl HttpTlsListener {
    /// Accepts on `listener`, handshaking with the HTTP acceptor of `tls`.
    pub fn new(
        listener: TcpListener,
        tls: Arc<NodeTls>,
        handshake_timeout: Duration,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!(error = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let acceptor = tls.http_acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let deadline = tokio::time::Instant::now() + handshake_timeout;
                    if let Some(s) = handshake(acceptor, stream, deadline, "HTTP").await {
                        let _ = tx.send((s, peer)).await;
                    }
                });
            }
        });
        Ok(HttpTlsListener { ready: rx, local })
    }
}

impl axum::serve::Listener for HttpTlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// What the HTTP router knows of a TLS connection: the peer's address and whether it presented
/// a client certificate (verified against `--tls-client-ca` during the handshake).
#[derive(Debug, Clone, Copy)]
pub struct HttpPeer {
    /// The peer's address.
    pub remote: SocketAddr,
    /// Whether the peer presented a verified client certificate.
    pub client_cert: bool,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, HttpTlsListener>>
    for HttpPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpTlsListener>) -> Self {
        HttpPeer {
            remote: *stream.remote_addr(),
            client_cert: stream.io().get_ref().1.peer_certificates().is_some(),
        }
    }
}

/// Paths served to TLS connections without a client certificate under mTLS: the probes of
/// kubelet, which cannot present one. They reveal only whether the node is up and ready.
pub const PROBE_PATHS: &[&str] = &["/healthz", "/readyz"];

/// Middleware of the HTTP port with TLS: gives handlers the client's address as
/// `ConnectInfo<SocketAddr>` (as without TLS: protected mode reads it) and, when `mtls`, refuses
/// requests of connections without a client certificate (403), except for [`PROBE_PATHS`].
pub async fn tls_http_gate(
    axum::extract::State(mtls): axum::extract::State<bool>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<HttpPeer>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    request
        .extensions_mut()
        .insert(axum::extract::ConnectInfo(peer.remote));
    if !mtls || peer.client_cert || PROBE_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    (
        axum::http::StatusCode::FORBIDDEN,
        "this node requires a client certificate (mTLS) for everything but /healthz and /readyz\n",
    )
        .into_response()
}

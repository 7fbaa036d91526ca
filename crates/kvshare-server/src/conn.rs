//! Limits on gRPC connections before HTTP/2 takes over: how many may be open, and how soon a
//! new one must complete its TLS handshake (with TLS) and send the HTTP/2 preface and SETTINGS
//! (a peer that opens TCP connections and sends nothing, or a trickle, would otherwise hold them
//! open for ever). Also the accepted stream type, plain or TLS ([`ServerStream`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bytes a client sends before its first request: the 24-byte connection preface and a SETTINGS
/// frame header (9 bytes).
const HANDSHAKE_BYTES: usize = 24 + 9;

/// Counts open connections against a limit.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    open: Arc<AtomicUsize>,
    max: usize,
    handshake_timeout: Duration,
}

impl ConnectionLimit {
    /// At most `max` connections, each of which must complete its handshake (TLS, if any, and
    /// the HTTP/2 preface and SETTINGS) within `handshake_timeout`.
    pub fn new(max: usize, handshake_timeout: Duration) -> Self {
        ConnectionLimit {
            open: Arc::new(AtomicUsize::new(0)),
            max: max.max(1),
            handshake_timeout,
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// A slot for a new connection, or `None` when the limit is reached. The slot counts
    /// until dropped; its deadline is when the handshake must be complete.
    pub fn acquire(&self) -> Option<ConnSlot> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnSlot {
            open: self.open.clone(),
            deadline: tokio::time::Instant::now() + self.handshake_timeout,
        })
    }

    /// Admits a new plain TCP connection, or `None` when the limit is reached (the stream is
    /// dropped, which closes it).
    pub fn admit(&self, stream: TcpStream) -> Option<GuardedConn> {
        let slot = self.acquire()?;
        let info = stream.connect_info();
        Some(GuardedConn::new(ServerStream::Plain(stream), info, slot))
    }
}

/// One counted connection, and the deadline of its handshake.
#[derive(Debug)]
pub struct ConnSlot {
    open: Arc<AtomicUsize>,
    deadline: tokio::time::Instant,
}

impl ConnSlot {
    /// When the connection's handshake (TLS and HTTP/2 preface) must be complete.
    pub fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted connection: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum ServerStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS, handshake done.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

macro_rules! on_stream {
    ($self:expr, $s:ident => $e:expr) => {
        match $self.get_mut() {
            ServerStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ServerStream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        on_stream!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        on_stream!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Plain(s) => s.is_write_vectored(),
            ServerStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// A connection that fails its reads if the HTTP/2 handshake does not arrive by its slot's
/// deadline (which a TLS handshake, if any, has already used part of), and is counted until
/// dropped. Handlers see the TCP peer's address (`Request::remote_addr`) with or without TLS.
#[derive(Debug)]
pub struct GuardedConn {
    inner: ServerStream,
    info: TcpConnectInfo,
    _slot: ConnSlot,
    /// The handshake deadline, until the handshake bytes have arrived.
    handshake: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl GuardedConn {
    /// Wraps an accepted stream (`info`: its TCP addresses) counted by `slot`.
    pub fn new(inner: ServerStream, info: TcpConnectInfo, slot: ConnSlot) -> Self {
        let handshake = Some(Box::pin(tokio::time::sleep_until(slot.deadline)));
        GuardedConn {
            inner,
            info,
            _slot: slot,
            handshake,
            received: 0,
        }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, ServerStream::Tls(_))
    }
}

impl Connected for GuardedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for GuardedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Some(deadline) = this.handshake.as_mut() {
            this.received += buf.filled().len() - before;
            if this.received >= HANDSHAKE_BYTES {
                this.handshake = None;
            } else if r.is_pending() && deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 handshake within --handshake-timeout-ms",
                )));
            }
        }
        r
    }
}

impl AsyncWrite for GuardedConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Maps the transport's answer to a request message over the size limit (`OUT_OF_RANGE` in
/// tonic) to `RESOURCE_EXHAUSTED`, which the gRPC spec prescribes and clients retry on.
pub fn message_too_large_is_exhausted<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let h = response.headers_mut();
    let too_large = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // Percent-encoded on the wire (spaces as %20).
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if too_large {
        h.insert(
            "grpc-status",
            tonic::codegen::http::HeaderValue::from_static("8"),
        );
    }
    response
}

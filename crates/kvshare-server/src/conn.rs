//! Limits on gRPC connections before HTTP/2 takes over: how many may be open, and how soon a
//! new one must send the HTTP/2 preface and SETTINGS (a peer that opens TCP connections and
//! sends nothing, or a trickle, would otherwise hold them open for ever).

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
    /// At most `max` connections, each of which must send its handshake within
    /// `handshake_timeout`.
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

    /// Admits a new connection, or `None` when the limit is reached (the stream is dropped,
    /// which closes it).
    pub fn admit(&self, stream: TcpStream) -> Option<GuardedConn> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(GuardedConn {
            inner: stream,
            open: self.open.clone(),
            handshake: Some(Box::pin(tokio::time::sleep(self.handshake_timeout))),
            received: 0,
        })
    }
}

/// A TCP connection that fails its reads if the handshake does not arrive in time, and is
/// counted until dropped.
#[derive(Debug)]
pub struct GuardedConn {
    inner: TcpStream,
    open: Arc<AtomicUsize>,
    /// The handshake deadline, until the handshake bytes have arrived.
    handshake: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl Drop for GuardedConn {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Connected for GuardedConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
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

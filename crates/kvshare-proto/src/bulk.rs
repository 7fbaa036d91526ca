//! The bulk transport's framing: Get and Put bytes on a plain TCP (or TLS) stream beside gRPC.
//!
//! HTTP/2 costs a node and its clients CPU per byte (DATA frames, flow control, one more copy
//! of each message on the receiving side); for K/V blocks of hundreds of KiB that is most of
//! the work. The bulk transport carries the same requests and responses as the `Get` and `Put`
//! RPCs, length-prefixed, so a block's bytes go from the socket into their final buffer in one
//! read and from the store onto the socket in one vectored write. gRPC stays the control path
//! (Lookup, Delete, Stats, ClusterInfo, which also announces the bulk port).
//!
//! A connection starts with [`MAGIC`], then frames in both directions. A frame is a 13-byte
//! prefix (kind: u8, head length: u32 LE, data length: u64 LE), a protobuf `head` and raw
//! `data` (a block's payload bytes: the `data` field of the head's message, carried outside
//! it so that it is never copied into or out of a protobuf buffer).
//!
//! | client sends | head | data |
//! |---|---|---|
//! | [`Kind::Open`] once, first | `BulkOpen` | none |
//! | [`Kind::Get`] | `GetRequest` | none |
//! | [`Kind::PutChunk`] ... then [`Kind::PutEnd`] | `PutRequest` (its `data` empty) / none | the chunk / none |
//!
//! | node answers | head | data |
//! |---|---|---|
//! | [`Kind::GetChunk`] per message of the Get's stream | `GetResponse` (its `data` empty) | the chunk |
//! | [`Kind::Done`] at the end of a request | the `PutResponse` of a Put; empty otherwise | none |
//! | [`Kind::Error`] instead of `Done` | `google.rpc.Status` (code, message, details) | none |
//!
//! One request at a time per connection: a client keeps several connections for concurrency.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes a client sends on a bulk connection (the transport's name and version).
pub const MAGIC: &[u8; 8] = b"KVSBULK1";

/// Bytes of a frame's prefix: kind (1), head length (4), data length (8).
pub const PREFIX_LEN: usize = 13;

/// Largest head either side accepts (a Get of a node's most keys, packed, fits many times).
pub const MAX_HEAD_BYTES: u32 = 8 << 20;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client: who it is (`BulkOpen`); answered with `Done` or `Error`.
    Open = 1,
    /// Client: a Get (`GetRequest`).
    Get = 2,
    /// Client: one chunk of a Put (`PutRequest` head, payload bytes as data).
    PutChunk = 3,
    /// Client: the Put is complete.
    PutEnd = 4,
    /// Node: one message of a Get's response (`GetResponse` head, payload bytes as data).
    GetChunk = 16,
    /// Node: the request succeeded (a Put's `PutResponse` as head).
    Done = 17,
    /// Node: the request failed (`google.rpc.Status` as head).
    Error = 18,
}

impl Kind {
    /// The kind with this wire value.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Open,
            2 => Kind::Get,
            3 => Kind::PutChunk,
            4 => Kind::PutEnd,
            16 => Kind::GetChunk,
            17 => Kind::Done,
            18 => Kind::Error,
            _ => return None,
        })
    }
}

/// A frame's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// What the frame is.
    pub kind: Kind,
    /// Bytes of its protobuf head.
    pub head_len: u32,
    /// Bytes of raw data after the head.
    pub data_len: u64,
}

/// A frame the other side sent that breaks the framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// An unknown kind byte.
    #[error("unknown bulk frame kind {0}")]
    UnknownKind(u8),
    /// A head over [`MAX_HEAD_BYTES`].
    #[error("bulk frame head of {0} bytes is over the limit of {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge(u32),
    /// The connection did not start with [`MAGIC`].
    #[error("not a kvshare bulk-transport connection (it must start with {MAGIC:?})")]
    BadMagic,
}

impl Prefix {
    /// The 13 bytes of this prefix.
    pub fn encode(&self) -> [u8; PREFIX_LEN] {
        let mut b = [0u8; PREFIX_LEN];
        b[0] = self.kind as u8;
        b[1..5].copy_from_slice(&self.head_len.to_le_bytes());
        b[5..13].copy_from_slice(&self.data_len.to_le_bytes());
        b
    }

    /// Parses a prefix; refuses unknown kinds and heads over [`MAX_HEAD_BYTES`].
    pub fn decode(b: &[u8; PREFIX_LEN]) -> Result<Prefix, FrameError> {
        let kind = Kind::from_u8(b[0]).ok_or(FrameError::UnknownKind(b[0]))?;
        let mut head = [0u8; 4];
        head.copy_from_slice(&b[1..5]);
        let mut data = [0u8; 8];
        data.copy_from_slice(&b[5..13]);
        let head_len = u32::from_le_bytes(head);
        if head_len > MAX_HEAD_BYTES {
            return Err(FrameError::HeadTooLarge(head_len));
        }
        Ok(Prefix {
            kind,
            head_len,
            data_len: u64::from_le_bytes(data),
        })
    }
}

fn invalid(e: FrameError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Reads the next frame's prefix; `None` when the stream ends cleanly before it.
pub async fn read_prefix<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> std::io::Result<Option<Prefix>> {
    let mut b = [0u8; PREFIX_LEN];
    let mut got = 0;
    while got < PREFIX_LEN {
        let n = r.read(&mut b[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Prefix::decode(&b).map(Some).map_err(invalid)
}

/// Reads the connection's magic.
pub async fn read_magic<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> std::io::Result<()> {
    let mut b = [0u8; MAGIC.len()];
    r.read_exact(&mut b).await?;
    if &b != MAGIC {
        return Err(invalid(FrameError::BadMagic));
    }
    Ok(())
}

/// Most bytes one read of [`read_into`] asks the socket for.
///
/// A read copies everything queued on the socket (several MiB on loopback) inside one system
/// call, and when the buffer's pages are new it also takes their page faults there: on a kernel
/// without kernel preemption (`PREEMPT_NONE`, the server default) and on a VM whose host backs
/// guest pages on first touch, that held a core for 4.5 ms at a time, during which a Lookup
/// waiting on that core was not run. In steps of this size the thread returns to the
/// scheduler every ~0.1 ms.
pub const READ_STEP: usize = 256 << 10;

/// Bytes between the writes [`prepare_step`] makes to fault a buffer's new pages in.
const PAGE: usize = 4096;

/// The length of the next read into `buf`'s spare capacity (at most `left` and
/// [`READ_STEP`]), with the pages of that range faulted in from user space first (one write
/// per page; where the thread can be preempted between faults, unlike inside the read).
/// `touched` is the end (an index into `buf`) of what earlier steps already faulted in: a read
/// that returned less than its step does not have those pages touched again.
fn prepare_step(buf: &mut BytesMut, left: usize, touched: &mut usize) -> usize {
    let filled = buf.len();
    let spare = buf.spare_capacity_mut();
    let step = left.min(READ_STEP).min(spare.len());
    let from = touched.saturating_sub(filled).min(step);
    let range = &mut spare[from..step];
    for b in range.iter_mut().step_by(PAGE) {
        b.write(0);
    }
    if let Some(last) = range.last_mut() {
        last.write(0);
    }
    *touched = (*touched).max(filled + step);
    step
}

/// Appends exactly `len` bytes from `r` to `buf`, read straight into its spare capacity (no
/// zero-fill, no intermediate buffer), in reads of at most [`READ_STEP`].
pub async fn read_into<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
    len: usize,
) -> std::io::Result<()> {
    buf.reserve(len);
    let end = buf.len() + len;
    let mut touched = buf.len();
    while buf.len() < end {
        let want = prepare_step(buf, end - buf.len(), &mut touched);
        let mut limited = bytes::BufMut::limit(&mut *buf, want);
        let n = r.read_buf(&mut limited).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// [`read_into`] that fails with [`std::io::ErrorKind::TimedOut`] when no byte arrives for
/// `idle`, or when `deadline` passes first.
pub async fn read_into_within<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
    len: usize,
    deadline: tokio::time::Instant,
    idle: std::time::Duration,
) -> std::io::Result<()> {
    buf.reserve(len);
    let end = buf.len() + len;
    let mut touched = buf.len();
    while buf.len() < end {
        let want = prepare_step(buf, end - buf.len(), &mut touched);
        let mut limited = bytes::BufMut::limit(&mut *buf, want);
        let until = deadline.min(tokio::time::Instant::now() + idle);
        match tokio::time::timeout_at(until, r.read_buf(&mut limited)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(())
}

/// [`skip`] that fails with [`std::io::ErrorKind::TimedOut`] when no byte arrives for `idle`,
/// or when `deadline` passes first.
pub async fn skip_within<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    len: u64,
    deadline: tokio::time::Instant,
    idle: std::time::Duration,
) -> std::io::Result<()> {
    let mut scratch = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let want = scratch
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let until = deadline.min(tokio::time::Instant::now() + idle);
        match tokio::time::timeout_at(until, r.read(&mut scratch[..want])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(n)) => left -= n as u64,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(())
}

/// Reads exactly `len` bytes into a buffer of their own.
pub async fn read_bytes<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    len: usize,
) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    read_into(r, &mut buf, len).await?;
    Ok(buf.freeze())
}

/// Reads and drops `len` bytes.
pub async fn skip<R: AsyncRead + Unpin + ?Sized>(r: &mut R, len: u64) -> std::io::Result<()> {
    let mut scratch = vec![0u8; 64 << 10];
    let mut left = len;
    while left > 0 {
        let want = scratch
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = r.read(&mut scratch[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(())
}

/// A frame's prefix and head in one buffer (its data, `data_len` bytes, goes after them).
pub fn frame_start(kind: Kind, head: &[u8], data_len: u64) -> std::io::Result<Vec<u8>> {
    let head_len = u32::try_from(head.len())
        .ok()
        .filter(|&n| n <= MAX_HEAD_BYTES)
        .ok_or_else(|| invalid(FrameError::HeadTooLarge(u32::MAX)))?;
    let prefix = Prefix {
        kind,
        head_len,
        data_len,
    };
    let mut start = Vec::with_capacity(PREFIX_LEN + head.len());
    start.extend_from_slice(&prefix.encode());
    start.extend_from_slice(head);
    Ok(start)
}

/// Most bytes one write of [`write_all_parts`] hands the socket.
///
/// A loopback (or veth) write runs the receiver's TCP input inside the same system call, so
/// one 1 MiB `writev` can hold a core for about a millisecond on a `PREEMPT_NONE` kernel,
/// and a thread woken on that core cannot run before the call returns. Smaller writes give
/// the scheduler a chance between them at a cost of one system call per 256 KiB. The same
/// reasoning as [`READ_STEP`], on the sending side.
pub const WRITE_STEP: usize = 256 << 10;

/// The slices of `parts` for one write: the leading ones, the last cut so that they hold at
/// most `limit` bytes.
fn step_slices<'a>(parts: &[&'a [u8]], limit: usize) -> Vec<std::io::IoSlice<'a>> {
    let mut left = limit;
    let mut slices = Vec::with_capacity(parts.len());
    for p in parts {
        if left == 0 {
            break;
        }
        let take = p.len().min(left);
        slices.push(std::io::IoSlice::new(&p[..take]));
        left -= take;
    }
    slices
}

/// Writes every byte of `parts`, in order, with vectored writes of at most [`WRITE_STEP`]
/// bytes each (nothing is copied).
pub async fn write_all_parts<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let slices = step_slices(&parts[first..], WRITE_STEP);
        let mut n = w.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let p = parts[first];
            if n >= p.len() {
                n -= p.len();
                first += 1;
            } else {
                parts[first] = &p[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// Writes a frame: prefix and head in one buffer, then the data, with vectored writes (the
/// data is never copied).
pub async fn write_frame<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    kind: Kind,
    head: &[u8],
    data: &[u8],
) -> std::io::Result<()> {
    let start = frame_start(kind, head, data.len() as u64)?;
    write_all_parts(w, &[&start, data]).await
}

/// Writes the connection's magic.
pub async fn write_magic<W: AsyncWrite + Unpin + ?Sized>(w: &mut W) -> std::io::Result<()> {
    w.write_all(MAGIC).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_round_trips_and_refuses_bad_input() {
        let p = Prefix {
            kind: Kind::GetChunk,
            head_len: 77,
            data_len: 1 << 40,
        };
        assert_eq!(Prefix::decode(&p.encode()), Ok(p));
        let mut b = p.encode();
        b[0] = 9;
        assert_eq!(Prefix::decode(&b), Err(FrameError::UnknownKind(9)));
        let big = Prefix {
            head_len: MAX_HEAD_BYTES + 1,
            ..p
        };
        assert_eq!(
            Prefix::decode(&big.encode()),
            Err(FrameError::HeadTooLarge(MAX_HEAD_BYTES + 1))
        );
    }

    proptest::proptest! {
        /// Any 13 bytes either decode to a prefix that encodes back to them, or are refused
        /// (unknown kind, head over the limit); nothing panics.
        #[test]
        fn any_prefix_bytes_decode_or_are_refused(b in proptest::array::uniform13(0u8..)) {
            match Prefix::decode(&b) {
                Ok(p) => {
                    proptest::prop_assert_eq!(p.encode(), b);
                    proptest::prop_assert!(p.head_len <= MAX_HEAD_BYTES);
                }
                Err(FrameError::UnknownKind(k)) => proptest::prop_assert!(Kind::from_u8(k).is_none()),
                Err(FrameError::HeadTooLarge(n)) => proptest::prop_assert!(n > MAX_HEAD_BYTES),
                Err(FrameError::BadMagic) => proptest::prop_assert!(false, "no magic in a prefix"),
            }
        }

        /// Frames of any head and data come back as written, whatever the pipe's buffer size.
        #[test]
        fn frames_round_trip(
            head in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..5000),
            pipe in 1usize..4096,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let (h, d) = rt.block_on(async {
                let (mut a, mut b) = tokio::io::duplex(pipe);
                let (hw, dw) = (head.clone(), data.clone());
                let w = tokio::spawn(async move { write_frame(&mut a, Kind::GetChunk, &hw, &dw).await });
                let p = read_prefix(&mut b).await.unwrap().unwrap();
                let h = read_bytes(&mut b, p.head_len as usize).await.unwrap();
                let d = read_bytes(&mut b, p.data_len as usize).await.unwrap();
                w.await.unwrap().unwrap();
                (h, d)
            });
            proptest::prop_assert_eq!(&h[..], &head[..]);
            proptest::prop_assert_eq!(&d[..], &data[..]);
        }
    }

    #[tokio::test]
    async fn frames_round_trip_through_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            write_magic(&mut a).await?;
            write_frame(&mut a, Kind::PutChunk, b"head", &sent).await?;
            write_frame(&mut a, Kind::PutEnd, b"", b"").await
        });
        read_magic(&mut b).await.unwrap();
        let p = read_prefix(&mut b).await.unwrap().unwrap();
        assert_eq!(
            (p.kind, p.head_len, p.data_len),
            (Kind::PutChunk, 4, 100_000)
        );
        assert_eq!(&read_bytes(&mut b, 4).await.unwrap()[..], b"head");
        let mut buf = BytesMut::new();
        read_into(&mut b, &mut buf, 60_000).await.unwrap();
        read_into(&mut b, &mut buf, 40_000).await.unwrap();
        assert_eq!(&buf[..], &data[..]);
        let end = read_prefix(&mut b).await.unwrap().unwrap();
        assert_eq!(end.kind, Kind::PutEnd);
        writer.await.unwrap().unwrap();
        assert!(read_prefix(&mut b).await.unwrap().is_none());
    }

    /// A reader that records the largest read it was asked for.
    struct Widest<R> {
        inner: R,
        widest: usize,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for Widest<R> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.widest = self.widest.max(buf.remaining());
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    #[tokio::test]
    async fn a_block_larger_than_one_step_is_read_in_steps_and_arrives_whole() {
        let len = 3 * READ_STEP + 12_345;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let mut r = Widest {
            inner: &data[..],
            widest: 0,
        };
        let mut buf = BytesMut::from(&b"kept"[..]);
        read_into(&mut r, &mut buf, len).await.unwrap();
        assert_eq!(&buf[..4], b"kept");
        assert_eq!(&buf[4..], &data[..]);
        assert_eq!(r.widest, READ_STEP);
        let mut within = BytesMut::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let idle = std::time::Duration::from_secs(10);
        read_into_within(&mut &data[..], &mut within, len, deadline, idle)
            .await
            .unwrap();
        assert_eq!(&within[..], &data[..]);
    }

    /// A writer that keeps what it is given and records the largest write it accepted.
    #[derive(Default)]
    struct WidestWrite {
        got: Vec<u8>,
        widest: usize,
        writes: usize,
    }

    impl tokio::io::AsyncWrite for WidestWrite {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.got.extend_from_slice(buf);
            self.widest = self.widest.max(buf.len());
            self.writes += 1;
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n: usize = bufs.iter().map(|b| b.len()).sum();
            for b in bufs {
                self.got.extend_from_slice(b);
            }
            self.widest = self.widest.max(n);
            self.writes += 1;
            std::task::Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_large_frame_is_written_in_steps_and_arrives_whole() {
        let data: Vec<u8> = (0..3 * WRITE_STEP + 777).map(|i| (i % 241) as u8).collect();
        let tail = b"the next frame".to_vec();
        let mut w = WidestWrite::default();
        write_all_parts(&mut w, &[b"head", &data, b"", &tail])
            .await
            .unwrap();
        let mut want = b"head".to_vec();
        want.extend_from_slice(&data);
        want.extend_from_slice(&tail);
        assert_eq!(w.got, want);
        assert_eq!(w.widest, WRITE_STEP);
        assert_eq!(w.writes, want.len().div_ceil(WRITE_STEP));
        let mut small = WidestWrite::default();
        write_all_parts(&mut small, &[b"a", b"bc"]).await.unwrap();
        assert_eq!((small.got, small.writes), (b"abc".to_vec(), 1));
    }

    #[tokio::test]
    async fn truncated_input_is_an_error_not_a_hang() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[3, 0, 0]).await.unwrap();
        drop(a);
        assert!(read_prefix(&mut b).await.is_err());
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(read_magic(&mut b).await.is_err());
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        let mut buf = BytesMut::new();
        assert!(read_into(&mut b, &mut buf, 10).await.is_err());
        assert!(skip(&mut b, 10).await.is_err());
    }
}

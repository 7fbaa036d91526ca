//! The bulk transport's listener: Get and Put on length-prefixed frames over TCP (TLS when the
//! node has TLS), beside gRPC. Framing: [`kvshare_proto::bulk`].
//!
//! A connection is admitted like a gRPC one (`--max-connections`, the TLS handshake within
//! `--handshake-timeout-ms`), then must send its `BulkOpen` (token, hop-local flag) within the
//! same deadline. Every request on it is then admitted as the RPC it stands for (token, role,
//! tenant, protected mode: [`crate::auth`]), so a revoked token stops working at its next
//! request, and is served by the same code as the RPC: Gets by [`KvCacheService::get_stream`]
//! (routing, budget, metrics), Puts by [`PutSession::run_bulk`] (validation, budget, checksum,
//! replication), with block bytes read into and written from their final buffers. Request heads
//! are charged to the buffer budget while they are parsed. A framing error or a Put that ends
//! early is answered with an `Error` frame, after which the node reads what the client still
//! sends for a while (so the client can read the answer) and closes the connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshare_core::BlockKey;
use kvshare_core::wire::get_chunks;
use kvshare_proto::bulk::{self, Kind, Prefix};
use kvshare_proto::rpc::RpcStatus;
use kvshare_proto::transport::{AUTHORIZATION_HEADER, NO_FORWARD_HEADER, NO_FORWARD_VALUE};
use kvshare_proto::v1 as pb;
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use tracing::{debug, warn};

use crate::config::BulkPriority;
use crate::conn::ConnectionLimit;
use crate::metrics::{Method, MethodLabels};
use crate::put::PutSession;
use crate::service::KvCacheService;
use crate::state::Scope;
use crate::tls::NodeTls;

/// A connection with no request for this long is closed (clients reconnect when they need it).
const IDLE_CLOSE: Duration = Duration::from_secs(120);

/// Read buffer of a connection.
const READ_BUFFER: usize = 16 << 10;

/// Largest payload slice in one Get frame (a block larger than this goes in several frames):
/// whole blocks keep the client's reassembly copy-free, this bound keeps one frame's budget
/// charge small next to `--buffer-budget`.
const MAX_GET_FRAME_BYTES: usize = 16 << 20;

/// The runtime of the bulk transport: its own threads, at a lower CPU priority than the
/// node's gRPC threads (`--bulk-priority`), so that a node whose cores are busy moving blocks
/// still answers Lookups and health checks at once (the data plane yields to the control
/// plane).
pub struct BulkRuntime(Option<tokio::runtime::Runtime>);

impl BulkRuntime {
    /// A runtime of `threads` worker threads at `priority`.
    pub fn new(threads: usize, priority: BulkPriority) -> std::io::Result<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("kvshare-bulk")
            .on_thread_start(move || lower_priority(priority))
            .enable_all()
            .build()
            .map(|rt| BulkRuntime(Some(rt)))
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(tokio::runtime::Runtime::handle)
    }
}

impl Drop for BulkRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Puts the calling thread under Linux `SCHED_IDLE`: it runs only when no other thread of its
/// CPU cgroup wants the core. Lowering one's own priority needs no capability.
pub fn make_current_thread_idle() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes the calling thread's (id 0) scheduling policy only; `param` outlives the
    // call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts the calling thread at `priority`: `SCHED_IDLE`, or this much nicer than now.
fn lower_priority(priority: BulkPriority) {
    let done = match priority {
        BulkPriority::Idle => make_current_thread_idle(),
        // SAFETY: getpriority/setpriority on the calling thread's own id only change its
        // scheduling weight.
        BulkPriority::Nice(n) => unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            if libc::setpriority(libc::PRIO_PROCESS, tid, (now + n).min(19)) != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        },
    };
    if let Err(error) = done {
        warn!(%priority, %error, "could not lower the priority of a bulk-transport thread");
    }
}

/// Serves the bulk transport on `listener` until `shutdown`, on `runtime`'s threads.
pub fn spawn(
    runtime: &BulkRuntime,
    listener: TcpListener,
    service: KvCacheService,
    limit: ConnectionLimit,
    tls: Option<Arc<NodeTls>>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let Some(handle) = runtime.handle() else {
        return Ok(());
    };
    // Registered again with the bulk runtime's reactor, so its connections are driven there.
    let listener = listener.into_std()?;
    handle.spawn(async move {
        let listener = match TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "the bulk transport's listener cannot be used; clients use gRPC");
                return;
            }
        };
        accept_loop(listener, service, limit, tls, shutdown).await;
    });
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    service: KvCacheService,
    limit: ConnectionLimit,
    tls: Option<Arc<NodeTls>>,
    shutdown: watch::Receiver<bool>,
) {
    let mut stop = shutdown.clone();
    loop {
        let (stream, slot) = tokio::select! {
            a = crate::accept::accept_counted(&listener, &limit, "bulk") => a,
            _ = stop.wait_for(|v| *v) => return,
        };
        let Ok(remote) = stream.peer_addr() else {
            continue;
        };
        let service = service.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let metrics = &service.state().metrics;
            metrics.bulk_connections.inc();
            let open = service.clone();
            let deadline = slot.deadline();
            let conn = Conn {
                service,
                remote,
                metadata: MetadataMap::new(),
                no_forward: false,
                shutdown,
            };
            match tls {
                None => conn.run(stream, deadline).await,
                Some(t) => {
                    if let Some(s) =
                        crate::accept::handshake(t.grpc_acceptor(), stream, deadline, "bulk").await
                    {
                        conn.run(s, deadline).await;
                    }
                }
            }
            drop(slot);
            open.state().metrics.bulk_connections.dec();
        });
    }
}

/// What ends a connection.
enum End {
    /// The client closed it, or went idle, or the node is stopping.
    Quiet,
    /// The client broke the protocol: it is told why, then the connection is closed.
    Refuse(Status),
}

/// One bulk connection.
struct Conn {
    service: KvCacheService,
    remote: SocketAddr,
    /// The headers its `BulkOpen` stands for.
    metadata: MetadataMap,
    no_forward: bool,
    shutdown: watch::Receiver<bool>,
}

impl Conn {
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        mut self,
        io: S,
        deadline: tokio::time::Instant,
    ) {
        // A frame's prefix, head and the start of its data in one system call; larger reads
        // (a block's bytes) bypass the buffer straight into the block's.
        let mut io = tokio::io::BufReader::with_capacity(READ_BUFFER, io);
        let end = match tokio::time::timeout_at(deadline, self.open(&mut io)).await {
            Ok(Ok(())) => self.serve(&mut io).await,
            Ok(Err(s)) => End::Refuse(s),
            Err(_) => End::Refuse(Status::deadline_exceeded(
                "bulk connection: no BulkOpen within --handshake-timeout-ms",
            )),
        };
        if let End::Refuse(status) = end {
            debug!(remote = %self.remote, code = ?status.code(), message = status.message(), "bulk connection refused");
            let idle = self.service.state().limits.stream_idle_timeout;
            let _ = tokio::time::timeout(idle, write_error(&mut io, &status)).await;
            linger(&mut io, idle).await;
        }
    }

    /// The magic and the `BulkOpen` frame; admits the caller (as for a Get).
    async fn open<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        io: &mut S,
    ) -> Result<(), Status> {
        bulk::read_magic(io)
            .await
            .map_err(|e| Status::invalid_argument(format!("bulk connection: {e}")))?;
        let p = bulk::read_prefix(io)
            .await
            .map_err(|e| Status::invalid_argument(format!("bulk connection: {e}")))?
            .ok_or_else(|| Status::invalid_argument("bulk connection closed before BulkOpen"))?;
        if p.kind != Kind::Open || p.data_len != 0 {
            return Err(Status::invalid_argument(format!(
                "bulk connection: the first frame must be an Open without data, got {:?}",
                p.kind
            )));
        }
        let open: pb::BulkOpen = self.head(io, p.head_len).await?;
        if !open.authorization.is_empty() {
            let v = MetadataValue::try_from(open.authorization.as_str()).map_err(|_| {
                Status::unauthenticated(
                    "BulkOpen.authorization is not a valid header value; send `Bearer <token>`",
                )
            })?;
            self.metadata.insert(AUTHORIZATION_HEADER, v);
        }
        if open.no_forward {
            self.metadata.insert(
                NO_FORWARD_HEADER,
                MetadataValue::from_static(NO_FORWARD_VALUE),
            );
        }
        self.no_forward = open.no_forward;
        self.service.admit(
            Method::get,
            self.no_forward,
            Some(self.remote),
            &self.metadata,
        )?;
        write(io, Kind::Done, &[], &[]).await
    }

    /// Counts a request of `method` on the bulk transport.
    fn count(&self, method: Method) {
        self.service
            .state()
            .metrics
            .bulk_requests
            .get_or_create(&MethodLabels { method })
            .inc();
    }

    /// Requests until the client closes, idles out, breaks the protocol or the node stops.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(&mut self, io: &mut S) -> End {
        loop {
            let mut stop = self.shutdown.clone();
            let next = tokio::select! {
                n = tokio::time::timeout(IDLE_CLOSE, bulk::read_prefix(io)) => n,
                _ = stop.wait_for(|v| *v) => return End::Quiet,
            };
            let p = match next {
                Ok(Ok(Some(p))) => p,
                Ok(Ok(None)) | Err(_) => return End::Quiet,
                Ok(Err(e)) => {
                    return End::Refuse(Status::invalid_argument(format!("bulk connection: {e}")));
                }
            };
            let served = match p.kind {
                Kind::Get if p.data_len == 0 => self.get(io, p).await,
                Kind::PutChunk => self.put(io, p).await,
                kind => Err(End::Refuse(Status::invalid_argument(format!(
                    "bulk connection: a {kind:?} frame (data {} bytes) cannot start a request; send Get (no data) or PutChunk",
                    p.data_len
                )))),
            };
            if let Err(end) = served {
                return end;
            }
        }
    }

    /// A frame's head, decoded; its bytes are charged to the buffer budget meanwhile.
    async fn head<M: Message + Default, S: AsyncRead + Unpin + Send>(
        &self,
        io: &mut S,
        len: u32,
    ) -> Result<M, Status> {
        let state = self.service.state();
        let _charge = state
            .budget
            .charge(u64::from(len), "a bulk request head")
            .await
            .map_err(|r| r.into_status())?;
        let idle = state.limits.stream_idle_timeout;
        let bytes: Bytes = match tokio::time::timeout(idle, bulk::read_bytes(io, len as usize))
            .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(Status::invalid_argument(format!("bulk connection: {e}"))),
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "bulk connection: a request head of {len} bytes did not arrive within {idle:?}"
                )));
            }
        };
        M::decode(bytes).map_err(|e| {
            Status::invalid_argument(format!(
                "bulk connection: the frame head is not a {}: {e}",
                std::any::type_name::<M>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("message")
            ))
        })
    }

    /// A Get: its response messages as GetChunk frames, then Done (or Error).
    async fn get<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        io: &mut S,
        p: Prefix,
    ) -> Result<(), End> {
        let t0 = Instant::now();
        self.count(Method::get);
        let req: pb::GetRequest = self.head(io, p.head_len).await.map_err(End::Refuse)?;
        let state = self.service.state().clone();
        let chunk = MAX_GET_FRAME_BYTES
            .min((state.budget.total_bytes() / 8) as usize)
            .max(state.limits.get_chunk_size);
        let admitted = self.service.admit(
            Method::get,
            self.no_forward,
            Some(self.remote),
            &self.metadata,
        );
        let target = admitted.and_then(|ctx| {
            self.service
                .target(&ctx, &req.namespace, &req.keys, &req.packed_keys)
                .map(|t| (ctx, t))
        });
        let stream = match target {
            Ok((_, (ns, keys, Scope::Local))) => {
                let r = self.get_local(io, ns.store, &keys).await;
                return match r {
                    Ok(()) => {
                        let _ = self.service.record_rpc(Method::get, t0, Ok(()));
                        Ok(())
                    }
                    Err(status) => {
                        let _ = self.service.record_rpc::<()>(Method::get, t0, Err(status));
                        Err(End::Quiet)
                    }
                };
            }
            Ok((ctx, _)) => self.service.get_stream(ctx, &req, chunk),
            Err(status) => Err(status),
        };
        let mut stream = match stream {
            Ok(s) => s,
            Err(status) => {
                let r = write_error(io, &status).await;
                self.service
                    .record_rpc::<()>(Method::get, t0, Err(status))
                    .ok();
                return r.map_err(|_| End::Quiet);
            }
        };
        let idle = state.limits.stream_idle_timeout;
        let mut result = Ok(());
        while let Some(item) = stream.next().await {
            let written = match item {
                Ok(mut msg) => {
                    let data = std::mem::take(&mut msg.data);
                    let head = msg.encode_to_vec();
                    tokio::time::timeout(idle, write(io, Kind::GetChunk, &head, &data)).await
                }
                Err(status) => {
                    let w = tokio::time::timeout(idle, write_error(io, &status)).await;
                    result = Err(status);
                    w
                }
            };
            if !matches!(written, Ok(Ok(()))) {
                // The client stopped reading or went away: the stream's charges are released
                // with it.
                let _ = self.service.record_rpc::<()>(
                    Method::get,
                    t0,
                    Err(Status::cancelled("the bulk client stopped reading")),
                );
                return Err(End::Quiet);
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() && write(io, Kind::Done, &[], &[]).await.is_err() {
            return Err(End::Quiet);
        }
        let _ = self.service.record_rpc(Method::get, t0, result);
        Ok(())
    }

    /// A Get answered from this node's store: each block looked up when its turn comes and
    /// written from the stored bytes (its budget charge held while it is written), the last
    /// one together with `Done`. An error means the client stopped reading.
    async fn get_local<S: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut S,
        ns: BlockKey,
        keys: &[BlockKey],
    ) -> Result<(), Status> {
        let state = self.service.state();
        let idle = state.limits.stream_idle_timeout;
        let (mut hits, mut sent) = (0u64, 0u64);
        let done =
            bulk::frame_start(Kind::Done, &[], 0).map_err(|e| Status::internal(e.to_string()))?;
        let mut result = Ok(());
        for (i, key) in keys.iter().enumerate() {
            let block = state
                .store
                .get_many(ns, std::slice::from_ref(key))
                .pop()
                .flatten();
            let mut msg = get_chunks(i as u32, key, block.as_deref(), usize::MAX)
                .pop()
                .unwrap_or_default();
            let data = std::mem::take(&mut msg.data);
            if block.is_some() {
                hits += 1;
                sent += data.len() as u64;
            }
            let start = bulk::frame_start(Kind::GetChunk, &msg.encode_to_vec(), data.len() as u64)
                .map_err(|e| Status::internal(e.to_string()))?;
            let last: &[u8] = if i + 1 == keys.len() { &done } else { &[] };
            match self.write_block(io, &start, &data, last).await {
                Ok(()) => {}
                // No room in the budget before the frame began: the client is told, and the
                // connection carries on.
                Err((status, false)) => {
                    let w = tokio::time::timeout(idle, write_error(io, &status)).await;
                    if !matches!(w, Ok(Ok(()))) {
                        result = Err(status);
                    }
                    break;
                }
                Err((status, true)) => {
                    result = Err(status);
                    break;
                }
            }
        }
        let m = &state.metrics;
        m.sent_bytes.inc_by(sent);
        if self.no_forward {
            state.count_peer_request(Method::get);
        } else {
            m.hits.inc_by(hits);
            m.misses
                .inc_by(keys.len() as u64 - hits.min(keys.len() as u64));
        }
        result
    }

    /// Writes one GetChunk frame (`start`: its prefix and head) with a stored block's bytes,
    /// then `last` (the Done frame after the last block). A block evicted while it is written
    /// stays in memory until then: each slice of at most `--get-chunk-size` is charged to the
    /// budget while it is written, as a gRPC Get's messages are (a client that reads slowly
    /// holds one slice, not its whole block). The error's flag says whether the frame had begun
    /// (the connection is then unusable).
    async fn write_block<S: AsyncWrite + Unpin + Send>(
        &self,
        io: &mut S,
        start: &[u8],
        data: &Bytes,
        last: &[u8],
    ) -> Result<(), (Status, bool)> {
        let state = self.service.state();
        let idle = state.limits.stream_idle_timeout;
        let slice = state.limits.get_chunk_size.max(1);
        let mut offset = 0;
        let mut head: &[u8] = start;
        loop {
            let end = data.len().min(offset + slice);
            let tail: &[u8] = if end == data.len() { last } else { &[] };
            let _charge = match state
                .budget
                .charge((end - offset) as u64, "a Get response")
                .await
            {
                Ok(c) => c,
                Err(r) => return Err((r.into_status(), offset > 0)),
            };
            let parts = [head, &data[offset..end], tail];
            match tokio::time::timeout(idle, bulk::write_all_parts(io, &parts)).await {
                Ok(Ok(())) => {}
                _ => {
                    let gone = Status::cancelled("the bulk client stopped reading");
                    return Err((gone, true));
                }
            }
            head = &[];
            offset = end;
            if offset == data.len() {
                return Ok(());
            }
        }
    }

    /// A Put: its PutChunk frames up to PutEnd, then Done with the PutResponse (or Error with
    /// the outcomes in its details).
    async fn put<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        io: &mut S,
        first: Prefix,
    ) -> Result<(), End> {
        let t0 = Instant::now();
        self.count(Method::put);
        let ctx = match self.service.admit(
            Method::put,
            self.no_forward,
            Some(self.remote),
            &self.metadata,
        ) {
            Ok(ctx) => ctx,
            Err(status) => {
                let _ = self
                    .service
                    .record_rpc::<()>(Method::put, t0, Err(status.clone()));
                // The upload is read and dropped, so the connection can carry the next request.
                self.drain_put(io, first).await?;
                return write_error(io, &status).await.map_err(|_| End::Quiet);
            }
        };
        let state = self.service.state().clone();
        if ctx.no_forward {
            state.count_peer_request(Method::put);
        }
        let session = PutSession::new(&state, ctx.no_forward, ctx.tenant);
        let (result, reusable) = session.run_bulk(first, io).await;
        let result = self.service.record_rpc(Method::put, t0, result);
        let written = match &result {
            Ok(resp) => write(io, Kind::Done, &resp.encode_to_vec(), &[]).await,
            Err(status) if reusable => write_error(io, status).await,
            Err(status) => return Err(End::Refuse(status.clone())),
        };
        written.map_err(|_| End::Quiet)
    }
}

impl Conn {
    /// Reads and drops the frames of a refused Put, up to its PutEnd (`first`: the prefix of
    /// its first frame), each within the idle timeout.
    async fn drain_put<S: AsyncRead + Unpin + Send>(
        &self,
        io: &mut S,
        first: Prefix,
    ) -> Result<(), End> {
        let idle = self.service.state().limits.stream_idle_timeout;
        let mut p = first;
        loop {
            match p.kind {
                Kind::PutEnd => return Ok(()),
                Kind::PutChunk => {
                    let len = u64::from(p.head_len).saturating_add(p.data_len);
                    match tokio::time::timeout(idle, bulk::skip(io, len)).await {
                        Ok(Ok(())) => {}
                        _ => return Err(End::Quiet),
                    }
                }
                kind => {
                    return Err(End::Refuse(Status::invalid_argument(format!(
                        "bulk put: a {kind:?} frame arrived where a PutChunk or PutEnd belongs"
                    ))));
                }
            }
            p = match tokio::time::timeout(idle, bulk::read_prefix(io)).await {
                Ok(Ok(Some(p))) => p,
                _ => return Err(End::Quiet),
            };
        }
    }
}

/// Writes a frame; an I/O failure means the client is gone.
async fn write<S: AsyncWrite + Unpin + Send>(
    io: &mut S,
    kind: Kind,
    head: &[u8],
    data: &[u8],
) -> Result<(), Status> {
    bulk::write_frame(io, kind, head, data)
        .await
        .map_err(|e| Status::unavailable(format!("bulk connection: {e}")))
}

/// The `Error` frame of `status`: a `google.rpc.Status` (the status' own details when it has
/// them: a failed Put's carry every block's outcome).
fn error_head(status: &Status) -> Vec<u8> {
    if !status.details().is_empty() {
        return status.details().to_vec();
    }
    RpcStatus {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: Vec::new(),
    }
    .encode_to_vec()
}

async fn write_error<S: AsyncWrite + Unpin + Send>(
    io: &mut S,
    status: &Status,
) -> Result<(), Status> {
    debug_assert!(status.code() != Code::Ok);
    write(io, Kind::Error, &error_head(status), &[]).await?;
    io.flush()
        .await
        .map_err(|e| Status::unavailable(format!("bulk connection: {e}")))
}

/// Closes the connection gracefully: ends the node's side, then reads and drops what the
/// client still sends (at most for `limit`), so that the close does not become a reset that
/// discards the answer before the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin + Send>(io: &mut S, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        let _ = io.shutdown().await;
        let mut sink = vec![0u8; 64 << 10];
        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_heads_are_rpc_statuses() {
        let s = Status::permission_denied("no");
        let h = RpcStatus::decode(&error_head(&s)[..]).unwrap();
        assert_eq!(
            (h.code, h.message.as_str()),
            (Code::PermissionDenied as i32, "no")
        );
        let details = kvshare_proto::rpc::encode_put_details(3, "m", &pb::PutResponse::default());
        let s = Status::with_details(Code::InvalidArgument, "m", details.clone().into());
        assert_eq!(error_head(&s), details);
    }
}

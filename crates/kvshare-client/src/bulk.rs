//! The client side of the bulk transport ([`kvshare_proto::bulk`]): Gets and Puts as
//! length-prefixed frames on pooled TCP (or TLS) connections to a node's bulk port, which the
//! node announces in `ClusterInfo`. A block's bytes are read from the socket straight into the
//! buffer the caller gets, and written from the caller's buffer with vectored writes.
//!
//! A [`KvClient`](crate::KvClient) finds the port at its first Get or Put; a node without one,
//! or one whose port cannot be reached (a firewall that only opens the gRPC port, say), is used
//! through gRPC for the rest of the client's life, with a warning.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvshare_core::wire::{GetAssembler, put_chunks};
use kvshare_core::{BlockKey, EncodedBlock};
use kvshare_proto::bulk::{self, Kind};
use kvshare_proto::rpc::RpcStatus;
use kvshare_proto::tls::{ClientTls, connect_tls};
use kvshare_proto::transport::MAX_MESSAGE_BYTES;
use kvshare_proto::v1 as pb;
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{ClientError, PutItem, error_chain};

/// Idle connections kept per node.
const MAX_IDLE: usize = 16;

/// A connection's byte stream (TCP or TLS).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection: reads buffered (a frame's prefix, head and the start of its data in one
/// system call; larger reads bypass the buffer straight into the caller's), writes not.
type Conn = tokio::io::BufReader<Box<dyn Io>>;

/// Read buffer of a connection.
const READ_BUFFER: usize = 16 << 10;

/// What went wrong on a bulk connection.
enum Failure {
    /// The node answered with an error status.
    Status(tonic::Status),
    /// The connection broke (or broke the protocol): worth one retry on a new connection.
    Io(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e.to_string())
    }
}

/// A node's bulk port, and idle connections to it.
pub(crate) struct Bulk {
    host: String,
    port: u16,
    tls: Option<ClientTls>,
    open: pb::BulkOpen,
    connect_timeout: Duration,
    idle: Mutex<Vec<Conn>>,
}

impl Bulk {
    /// The bulk port `port` of the node whose gRPC endpoint is `endpoint`.
    pub(crate) fn new(
        endpoint: &str,
        port: u16,
        tls: Option<ClientTls>,
        authorization: Option<String>,
        no_forward: bool,
        connect_timeout: Duration,
    ) -> Option<Bulk> {
        let uri: tonic::codegen::http::Uri = endpoint.parse().ok()?;
        let host = uri
            .host()?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Some(Bulk {
            host,
            port,
            tls,
            open: pb::BulkOpen {
                authorization: authorization.unwrap_or_default(),
                no_forward,
            },
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Opens a first connection and keeps it; false when the client should use gRPC
    /// instead: the port is unreachable (a warning), or the node refused the client there
    /// (gRPC then gives the caller the same answer).
    pub(crate) async fn probe(&self) -> bool {
        match self.connect().await {
            Ok(c) => {
                self.keep(c);
                true
            }
            Err(Failure::Io(e)) => {
                tracing::warn!(address = %self.address(), error = %e, "bulk transport unreachable; this client uses gRPC for Get and Put");
                false
            }
            Err(Failure::Status(s)) => {
                tracing::debug!(code = ?s.code(), message = s.message(), "bulk transport refused this client; using gRPC");
                false
            }
        }
    }

    /// Keeps `conn` for the next request.
    fn keep(&self, conn: Conn) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// `host:port` of the bulk port.
    pub(crate) fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A new connection, opened (magic, `BulkOpen`, the node's answer). `Err(Io)`: the port
    /// cannot be reached; `Err(Status)`: the node refused this client.
    async fn connect(&self) -> Result<Conn, Failure> {
        let connect = async {
            let io: Box<dyn Io> = match &self.tls {
                None => {
                    let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
                    let _ = tcp.set_nodelay(true);
                    Box::new(tcp)
                }
                Some(tls) => Box::new(
                    connect_tls(tls, &self.host, self.port, false)
                        .await
                        .map_err(|e| Failure::Io(error_chain(&e)))?,
                ),
            };
            let mut io = tokio::io::BufReader::with_capacity(READ_BUFFER, io);
            bulk::write_magic(&mut io).await?;
            bulk::write_frame(&mut io, Kind::Open, &self.open.encode_to_vec(), &[]).await?;
            io.flush().await?;
            Ok::<_, Failure>(io)
        };
        let mut io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Failure::Io(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                )));
            }
        };
        match tokio::time::timeout(self.connect_timeout, read_answer(&mut io)).await {
            Ok(Ok(_)) => Ok(io),
            Ok(Err(f)) => Err(f),
            Err(_) => Err(Failure::Io(format!(
                "no answer to BulkOpen within {:?}",
                self.connect_timeout
            ))),
        }
    }

    /// Runs `op` on an idle connection (or a new one), within `timeout`; a reused connection
    /// that turns out broken (the node closed it while idle) is replaced once.
    async fn run(&self, timeout: Duration, op: Op<'_>) -> Result<Answer, ClientError> {
        let run = async {
            let pooled = self.idle.lock().pop();
            let reused = pooled.is_some();
            let mut conn = match pooled {
                Some(c) => c,
                None => self.connect().await?,
            };
            let mut r = op.run(&mut conn).await;
            if reused && matches!(r, Err(Failure::Io(_))) {
                conn = self.connect().await?;
                r = op.run(&mut conn).await;
            }
            if r.is_ok() || matches!(r, Err(Failure::Status(_))) {
                self.keep(conn);
            }
            r
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(Failure::Status(s))) => Err(s.into()),
            Ok(Err(Failure::Io(e))) => Err(ClientError::Rpc {
                code: tonic::Code::Unavailable,
                message: format!("bulk transport to {}: {e}", self.address()),
            }),
            Err(_) => Err(ClientError::Rpc {
                code: tonic::Code::DeadlineExceeded,
                message: format!(
                    "bulk transport to {}: no answer within {timeout:?}",
                    self.address()
                ),
            }),
        }
    }

    /// A Get of `req` (whose keys are `keys`): blocks reassembled, not decoded.
    pub(crate) async fn get(
        &self,
        req: &pb::GetRequest,
        keys: &[BlockKey],
        timeout: Duration,
    ) -> Result<Vec<Option<EncodedBlock>>, ClientError> {
        let head = req.encode_to_vec();
        match self.run(timeout, Op::Get { head: &head, keys }).await? {
            Answer::Blocks(b) => Ok(b),
            Answer::Put(_) => Err(ClientError::Protocol("a Put answer to a Get".into())),
        }
    }

    /// A Put of `items`: the node's answer, or its error status (a rejection carries every
    /// outcome in its details, as over gRPC).
    pub(crate) async fn put(
        &self,
        items: &[PutItem],
        timeout: Duration,
    ) -> Result<Result<pb::PutResponse, tonic::Status>, ClientError> {
        match self.run(timeout, Op::Put(items)).await? {
            Answer::Put(r) => Ok(r),
            Answer::Blocks(_) => Err(ClientError::Protocol("a Get answer to a Put".into())),
        }
    }
}

/// A request on a bulk connection.
#[derive(Clone, Copy)]
enum Op<'a> {
    /// A Get: the encoded GetRequest and its keys.
    Get {
        head: &'a [u8],
        keys: &'a [BlockKey],
    },
    /// A Put of these blocks.
    Put(&'a [PutItem]),
}

/// The answer to an [`Op`].
enum Answer {
    Blocks(Vec<Option<EncodedBlock>>),
    Put(Result<pb::PutResponse, tonic::Status>),
}

impl Op<'_> {
    async fn run(self, io: &mut Conn) -> Result<Answer, Failure> {
        match self {
            Op::Get { head, keys } => get(io, head, keys).await.map(Answer::Blocks),
            Op::Put(items) => put(io, items).await.map(Answer::Put),
        }
    }
}

async fn get(
    io: &mut Conn,
    head: &[u8],
    keys: &[BlockKey],
) -> Result<Vec<Option<EncodedBlock>>, Failure> {
    bulk::write_frame(io, Kind::Get, head, &[]).await?;
    io.flush().await?;
    let mut asm = GetAssembler::sharing(keys);
    loop {
        let p = next_prefix(io).await?;
        match p.kind {
            Kind::GetChunk => {
                let mut msg: pb::GetResponse = read_head(io, p.head_len).await?;
                msg.data = read_data(io, p.data_len).await?;
                asm.push(msg).map_err(|e| Failure::Io(e.to_string()))?;
            }
            Kind::Done if p.data_len == 0 => {
                bulk::read_bytes(io, p.head_len as usize).await?;
                break;
            }
            Kind::Error => return Err(error_of(io, p.head_len).await?),
            k => return Err(Failure::Io(format!("unexpected {k:?} frame in a Get"))),
        }
    }
    asm.finish().map_err(|e| Failure::Io(e.to_string()))
}

async fn put(
    io: &mut Conn,
    items: &[PutItem],
) -> Result<Result<pb::PutResponse, tonic::Status>, Failure> {
    let sent = send_put(io, items).await;
    // A node that refused the upload early has answered and reads the rest only to let this
    // client see the answer: read it even when sending failed.
    match (read_answer(io).await, sent) {
        (Ok(head), _) => pb::PutResponse::decode(head)
            .map(Ok)
            .map_err(|e| Failure::Io(format!("a Put's answer is not a PutResponse: {e}"))),
        (Err(Failure::Status(s)), _) => Ok(Err(s)),
        (Err(f), Ok(())) => Err(f),
        (Err(_), Err(e)) => Err(e.into()),
    }
}

/// The frames of a Put: each block in one PutChunk, then PutEnd.
async fn send_put(io: &mut Conn, items: &[PutItem]) -> std::io::Result<()> {
    for item in items {
        for mut msg in put_chunks(&item.key, item.parent.as_ref(), &item.block, usize::MAX) {
            let data = std::mem::take(&mut msg.data);
            bulk::write_frame(io, Kind::PutChunk, &msg.encode_to_vec(), &data).await?;
        }
    }
    bulk::write_frame(io, Kind::PutEnd, &[], &[]).await?;
    io.flush().await
}

async fn next_prefix(io: &mut Conn) -> Result<bulk::Prefix, Failure> {
    bulk::read_prefix(io)
        .await?
        .ok_or_else(|| Failure::Io("the node closed the connection".into()))
}

async fn read_head<M: Message + Default>(io: &mut Conn, len: u32) -> Result<M, Failure> {
    let head = bulk::read_bytes(io, len as usize).await?;
    M::decode(head).map_err(|e| Failure::Io(format!("malformed frame head: {e}")))
}

/// A frame's data, at most [`MAX_MESSAGE_BYTES`] (what a gRPC message may carry).
async fn read_data(io: &mut Conn, len: u64) -> Result<Bytes, Failure> {
    let n = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_MESSAGE_BYTES)
        .ok_or_else(|| {
            Failure::Io(format!(
                "a frame of {len} data bytes is over the limit of {MAX_MESSAGE_BYTES}"
            ))
        })?;
    Ok(bulk::read_bytes(io, n).await?)
}

/// The node's status from an `Error` frame's head.
async fn error_of(io: &mut Conn, len: u32) -> Result<Failure, Failure> {
    let head = bulk::read_bytes(io, len as usize).await?;
    let st = RpcStatus::decode(head.clone())
        .map_err(|e| Failure::Io(format!("malformed error frame: {e}")))?;
    let code = tonic::Code::from_i32(st.code);
    Ok(Failure::Status(if st.details.is_empty() {
        tonic::Status::new(code, st.message)
    } else {
        tonic::Status::with_details(code, st.message, head)
    }))
}

/// The answer to a request without data: the head of its `Done` frame, or its error.
async fn read_answer(io: &mut Conn) -> Result<Bytes, Failure> {
    let p = next_prefix(io).await?;
    match p.kind {
        Kind::Done if p.data_len == 0 => Ok(bulk::read_bytes(io, p.head_len as usize).await?),
        Kind::Error => Err(error_of(io, p.head_len).await?),
        k => Err(Failure::Io(format!("unexpected {k:?} frame"))),
    }
}

/// A node's bulk port as the client found it: unknown yet, none, or this.
#[derive(Default)]
pub(crate) struct Discovery {
    state: tokio::sync::OnceCell<Option<Arc<Bulk>>>,
}

impl Discovery {
    /// The node's bulk transport, found once with `find` (None: use gRPC).
    pub(crate) async fn get(&self, find: impl AsyncFnOnce() -> Option<Bulk>) -> Option<Arc<Bulk>> {
        self.state
            .get_or_init(async || find().await.map(Arc::new))
            .await
            .clone()
    }
}

//! The Put stream as a state machine ([`PutSession`]): chunk reassembly, validation, admission
//! against the upload budget, verification, local storage and (in a cluster) replication to
//! each block's owners.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kvshare_core::placement::{ReplicaTally, ReplicaVerdict};
use kvshare_core::{BlockHeader, BlockKey, BlockStore, EncodedBlock, max_encoded_len};
use kvshare_proto::bulk;
use kvshare_proto::transport::MAX_MESSAGE_BYTES;
use kvshare_proto::v1 as pb;
use pb::block_outcome::Status as OutcomeStatus;
use prost::Message;
use tokio::io::AsyncRead;
use tonic::{Code, Status, Streaming};
use tracing::{debug, warn};

use crate::auth::Tenant;
use crate::budget::Charge;
use crate::cluster::{Target, View};
use crate::metrics::{PutOutcome, ResultLabels};
use crate::rejection::{Rejection, is_unreachable};
use crate::request::key_prefix;
use crate::routing::{self, Forward, ForwardResult};
use crate::state::{Limits, NodeState, Scope};

/// Verified blocks waiting to be sent to a remote owner are flushed past this many bytes.
const FLUSH_BYTES: u64 = 16 << 20;

/// Budget charged ahead of an upload's arriving bytes, at most this much at a time.
const CHARGE_STEP: u64 = 256 << 10;

/// A block whose chunks are arriving.
struct PendingBlock {
    index: usize,
    key: BlockKey,
    parent: Option<BlockKey>,
    /// None when the block was refused (its remaining chunks are read and dropped).
    header: Option<BlockHeader>,
    /// Payload bytes the block announced.
    payload_len: u64,
    /// The payload so far. Its capacity is reserved up front but only the pages written are
    /// resident, and only the bytes received are charged to the budget; each chunk is copied
    /// in and released, so neither small chunks nor their HTTP/2 receive buffers pile up.
    buf: BytesMut,
    received: u64,
    /// Budget held for `buf` (covers at least `received` bytes).
    charge: Charge,
    /// When the block must be complete (the idle allowance plus its size at the slowest
    /// accepted rate).
    deadline: Instant,
}

impl PendingBlock {
    /// Why the block is overdue at `now`, if it is.
    fn overdue(&self, limits: &Limits) -> Rejection {
        Rejection::new(
            Code::DeadlineExceeded,
            format!(
                "block {} (key {}) arrived too slowly: {} of {} payload bytes in {:?}; this node accepts uploads of at least {} bytes/s after {:?} (--put-min-rate, --stream-idle-timeout-ms)",
                self.index,
                key_prefix(&self.key),
                self.received,
                self.payload_len,
                limits.stream_idle_timeout + rate_allowance(self.payload_len, limits.put_min_rate),
                limits.put_min_rate,
                limits.stream_idle_timeout
            ),
        )
    }
}

/// How long `bytes` take at `rate` bytes per second.
fn rate_allowance(bytes: u64, rate: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64)
}

/// Where a chunk's payload bytes come from.
pub enum ChunkData<'r> {
    /// Already received (a gRPC message's `data`).
    Received(Bytes),
    /// `len` bytes still to be read from a bulk-transport connection.
    Stream {
        /// How many.
        len: u64,
        /// The connection.
        reader: &'r mut (dyn AsyncRead + Unpin + Send),
    },
}

impl ChunkData<'_> {
    /// Payload bytes of the chunk.
    fn len(&self) -> u64 {
        match self {
            ChunkData::Received(b) => b.len() as u64,
            ChunkData::Stream { len, .. } => *len,
        }
    }
}

/// One Put call: the blocks seen so far, their outcomes, and the copies bound for other owners.
pub struct PutSession<'a> {
    state: &'a NodeState,
    /// The owners' view when blocks are replicated; None when everything is stored here.
    view: Option<Arc<View>>,
    outcomes: Vec<pb::BlockOutcome>,
    tallies: HashMap<usize, ReplicaTally<Rejection>>,
    forwards: HashMap<usize, Vec<Forward>>,
    forward_bytes: u64,
    pending: Option<PendingBlock>,
    blocks_started: usize,
    /// The tenant the blocks are stored for.
    tenant: Tenant,
}

impl<'a> PutSession<'a> {
    /// A session that stores here when `no_forward` (or in a single-node cluster), else on
    /// each block's owners.
    pub fn new(state: &'a NodeState, no_forward: bool, tenant: Tenant) -> Self {
        let view = match state.scope(no_forward) {
            Scope::Local => None,
            Scope::Cluster(v) => Some(v),
        };
        PutSession {
            state,
            view,
            outcomes: Vec::new(),
            tallies: HashMap::new(),
            forwards: HashMap::new(),
            forward_bytes: 0,
            pending: None,
            blocks_started: 0,
            tenant,
        }
    }

    /// Reads the whole stream and answers: OK with every block's outcome, or the first
    /// failure with every outcome in the status details.
    pub async fn run(
        mut self,
        mut stream: Streaming<pb::PutRequest>,
    ) -> Result<pb::PutResponse, Status> {
        let stream_error = loop {
            let mut msg = match self.next_message(&mut stream).await {
                Ok(Some(m)) => m,
                Ok(None) => break None,
                Err(r) => {
                    warn!(code = ?r.code, reason = %r.message, "put stream ended; a partial block was discarded");
                    self.pending = None;
                    break Some(r.into_status());
                }
            };
            let data = std::mem::take(&mut msg.data);
            if let Err(s) = self.on_chunk(&msg, ChunkData::Received(data)).await {
                self.pending = None;
                break Some(s);
            }
        };
        self.finish(stream_error).await
    }

    /// Reads a Put from a bulk-transport connection: `PutChunk` frames (the first one's prefix
    /// is `first`) up to `PutEnd`, each chunk's bytes read straight into its block's buffer.
    /// Answers as [`PutSession::run`]; the flag says whether the connection can carry another
    /// request (false when the framing broke or the stream ended early: the rest of the upload
    /// is unread).
    pub async fn run_bulk<R: AsyncRead + Unpin + Send>(
        mut self,
        first: bulk::Prefix,
        reader: &mut R,
    ) -> (Result<pb::PutResponse, Status>, bool) {
        let mut prefix = Some(first);
        let stream_error = loop {
            let p = match prefix.take() {
                Some(p) => p,
                None => match self.next_frame(reader).await {
                    Ok(p) => p,
                    Err(r) => {
                        warn!(code = ?r.code, reason = %r.message, "bulk put ended; a partial block was discarded");
                        self.pending = None;
                        break Some(r.into_status());
                    }
                },
            };
            match p.kind {
                bulk::Kind::PutEnd if p.head_len == 0 && p.data_len == 0 => break None,
                bulk::Kind::PutChunk => {}
                kind => {
                    self.pending = None;
                    break Some(Status::invalid_argument(format!(
                        "bulk put: a {kind:?} frame (head {} bytes, data {} bytes) arrived where a PutChunk or an empty PutEnd belongs",
                        p.head_len, p.data_len
                    )));
                }
            }
            let head = self.read_head(reader, p.head_len).await;
            let msg = match head {
                Ok(m) if m.data.is_empty() => m,
                Ok(_) => {
                    self.pending = None;
                    break Some(Status::invalid_argument(
                        "bulk put: a PutChunk carries its bytes as frame data; its PutRequest head must have empty `data`",
                    ));
                }
                Err(r) => {
                    self.pending = None;
                    break Some(r.into_status());
                }
            };
            let data = ChunkData::Stream {
                len: p.data_len,
                reader: &mut *reader,
            };
            if let Err(s) = self.on_chunk(&msg, data).await {
                self.pending = None;
                break Some(s);
            }
        };
        let reusable = stream_error.is_none();
        (self.finish(stream_error).await, reusable)
    }

    /// The next frame's prefix of a bulk put, within the idle timeout and the pending block's
    /// deadline.
    async fn next_frame<R: AsyncRead + Unpin + Send>(
        &self,
        reader: &mut R,
    ) -> Result<bulk::Prefix, Rejection> {
        match tokio::time::timeout_at(self.until().into(), bulk::read_prefix(reader)).await {
            Ok(Ok(Some(p))) => Ok(p),
            Ok(Ok(None)) => Err(Rejection::invalid(
                "bulk put: the connection closed before PutEnd",
            )),
            Ok(Err(e)) => Err(Rejection::invalid(format!("bulk put: {e}"))),
            Err(_) => Err(self.stalled()),
        }
    }

    /// A PutChunk's head: its PutRequest (data excluded).
    async fn read_head<R: AsyncRead + Unpin + Send>(
        &self,
        reader: &mut R,
        len: u32,
    ) -> Result<pb::PutRequest, Rejection> {
        let read = bulk::read_bytes(reader, len as usize);
        let head = match tokio::time::timeout_at(self.until().into(), read).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => return Err(Rejection::invalid(format!("bulk put: {e}"))),
            Err(_) => return Err(self.stalled()),
        };
        pb::PutRequest::decode(head).map_err(|e| {
            Rejection::invalid(format!(
                "bulk put: a PutChunk head is not a PutRequest: {e}"
            ))
        })
    }

    /// When the next byte of the upload is due: the idle timeout, or sooner the pending
    /// block's deadline.
    fn until(&self) -> Instant {
        let idle_until = Instant::now() + self.state.limits.stream_idle_timeout;
        self.pending
            .as_ref()
            .map_or(idle_until, |p| p.deadline.min(idle_until))
    }

    /// Why an upload that delivered nothing in time ended.
    fn stalled(&self) -> Rejection {
        let limits = &self.state.limits;
        match &self.pending {
            Some(p) if Instant::now() >= p.deadline => p.overdue(limits),
            _ => Rejection::new(
                Code::DeadlineExceeded,
                format!(
                    "upload stalled: no message for {:?} (--stream-idle-timeout-ms); its buffers were freed",
                    limits.stream_idle_timeout
                ),
            ),
        }
    }

    /// Sends what waits for other owners, settles the outcomes and answers.
    async fn finish(mut self, mut stream_error: Option<Status>) -> Result<pb::PutResponse, Status> {
        self.flush_forwards().await;
        self.apply_tallies();
        if stream_error.is_none() {
            if let Some(p) = &self.pending {
                stream_error = Some(Status::invalid_argument(format!(
                    "upload ended in the middle of block {} (key {}): {} of {} payload bytes arrived; the partial block was discarded",
                    p.index,
                    key_prefix(&p.key),
                    p.received,
                    p.payload_len
                )));
            } else if self.blocks_started == 0 {
                return Err(Status::invalid_argument("Put stream carried no blocks"));
            }
        }
        self.into_response(stream_error)
    }

    /// The next message, within the idle timeout and the pending block's deadline.
    async fn next_message(
        &self,
        stream: &mut Streaming<pb::PutRequest>,
    ) -> Result<Option<pb::PutRequest>, Rejection> {
        match tokio::time::timeout_at(self.until().into(), stream.message()).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(s)) if s.code() == Code::OutOfRange => Err(Rejection::exhausted(format!(
                "upload stream failed: {}; send blocks in chunks of at most {} bytes",
                s.message(),
                MAX_MESSAGE_BYTES - (1 << 20)
            ))),
            Ok(Err(s)) => Err(Rejection::new(
                s.code(),
                format!("upload stream failed: {}", s.message()),
            )),
            Err(_) => Err(self.stalled()),
        }
    }

    /// One message of the stream (its payload bytes in `data`). An error ends the stream (the
    /// rest is unreadable).
    async fn on_chunk(&mut self, msg: &pb::PutRequest, data: ChunkData<'_>) -> Result<(), Status> {
        let key = BlockKey::from_slice(&msg.key).map_err(|_| {
            Status::invalid_argument(format!(
                "PutRequest.key must be 32 bytes, got {} bytes (message for block {})",
                msg.key.len(),
                self.pending
                    .as_ref()
                    .map_or(self.blocks_started, |p| p.index)
            ))
        })?;
        let mut p = match self.pending.take() {
            Some(p) if p.key == key => p,
            Some(p) => {
                return Err(Status::invalid_argument(format!(
                    "block {} (key {}) stopped after {} of {} payload bytes when a chunk for key {} arrived; send a block's chunks consecutively",
                    p.index,
                    key_prefix(&p.key),
                    p.received,
                    p.payload_len,
                    key_prefix(&key)
                )));
            }
            None => self.begin_block(key, msg)?,
        };
        let n = data.len();
        if p.received.saturating_add(n) > p.payload_len {
            return Err(Status::invalid_argument(format!(
                "block {} (key {}): chunks carry more than header.payload_len = {} bytes",
                p.index,
                key_prefix(&p.key),
                p.payload_len
            )));
        }
        match data {
            ChunkData::Received(bytes) => {
                if p.header.is_some()
                    && let Err(r) = self.buffer(&mut p, &bytes).await
                {
                    self.refuse_pending(&mut p, r);
                }
            }
            ChunkData::Stream { len, reader } => self.read_chunk(&mut p, len, reader).await?,
        }
        p.received += n;
        if p.received < p.payload_len {
            self.pending = Some(p);
        } else if p.header.is_some() {
            self.complete_block(p).await;
        }
        Ok(())
    }

    /// No room for the block: it is refused and the rest of its chunks are dropped.
    fn refuse_pending(&mut self, p: &mut PendingBlock, r: Rejection) {
        self.state.count_put(PutOutcome::rejected);
        self.reject(p.index, &p.key, r);
        p.header = None;
        p.buf = BytesMut::new();
        p.charge = Charge::default();
    }

    /// Reads `len` payload bytes of `p` from a bulk connection straight into its buffer,
    /// charging the budget ahead of them; bytes of a refused block are read and dropped. Fails
    /// (ending the upload) when the connection breaks or the block's deadline passes.
    async fn read_chunk<R: AsyncRead + Unpin + Send + ?Sized>(
        &mut self,
        p: &mut PendingBlock,
        len: u64,
        reader: &mut R,
    ) -> Result<(), Status> {
        let deadline = p.deadline;
        let mut done = 0u64;
        while done < len && p.header.is_some() {
            let step = (len - done).min(CHARGE_STEP);
            if let Err(r) = self.charge_ahead(p, p.received + done + step).await {
                self.refuse_pending(p, r);
                break;
            }
            let idle = self.state.limits.stream_idle_timeout;
            let read =
                bulk::read_into_within(reader, &mut p.buf, step as usize, deadline.into(), idle)
                    .await;
            self.read_failed(p, read)?;
            self.state.metrics.received_bytes.inc_by(step);
            done += step;
        }
        if done < len {
            let idle = self.state.limits.stream_idle_timeout;
            let read = bulk::skip_within(reader, len - done, deadline.into(), idle).await;
            self.read_failed(p, read)?;
        }
        Ok(())
    }

    /// The error that ends an upload whose read of `p`'s bytes failed: the block is overdue,
    /// the client went quiet for the idle timeout, or the connection broke.
    fn read_failed(&self, p: &PendingBlock, read: std::io::Result<()>) -> Result<(), Status> {
        match read {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                Err(if Instant::now() >= p.deadline {
                    p.overdue(&self.state.limits)
                } else {
                    Rejection::new(
                        Code::DeadlineExceeded,
                        format!(
                            "upload stalled: block {} (key {}) received no byte for {:?} (--stream-idle-timeout-ms) after {} of {} payload bytes; its buffers were freed",
                            p.index,
                            key_prefix(&p.key),
                            self.state.limits.stream_idle_timeout,
                            p.buf.len(),
                            p.payload_len
                        ),
                    )
                }
                .into_status())
            }
            Err(e) => Err(Status::invalid_argument(format!(
                "bulk put: block {} (key {}) broke off: {e}",
                p.index,
                key_prefix(&p.key)
            ))),
        }
    }

    /// Reads the first chunk of a block and admits it. A header that fails validation, or a
    /// block over a limit, refuses the block (its chunks are read and dropped, counted by the
    /// header's payload_len); a first chunk with no usable length at all ends the stream.
    fn begin_block(&mut self, key: BlockKey, msg: &pb::PutRequest) -> Result<PendingBlock, Status> {
        let index = self.blocks_started;
        let header_pb = msg.header.as_ref().ok_or_else(|| {
            Status::invalid_argument(format!(
                "block {index} (key {}): its first PutRequest has no header; the first chunk of every block carries its BlockHeader",
                key_prefix(&key)
            ))
        })?;
        let limits = &self.state.limits;
        let mut p = PendingBlock {
            index,
            key,
            parent: None,
            header: None,
            payload_len: header_pb.payload_len,
            buf: BytesMut::new(),
            received: 0,
            charge: Charge::default(),
            deadline: Instant::now()
                + limits.stream_idle_timeout
                + rate_allowance(header_pb.payload_len, limits.put_min_rate),
        };
        let admitted =
            parse_block_start(header_pb, &msg.parent_key).and_then(|(header, parent)| {
                self.admit(&header)?;
                p.parent = parent;
                // Capacity is reserved, not touched: pages become resident as bytes arrive.
                p.buf = BytesMut::with_capacity(header.payload_len as usize);
                p.header = Some(header);
                Ok(())
            });
        if let Err(r) = &admitted
            && (p.payload_len == 0
                || p.payload_len > max_encoded_len(self.state.limits.max_block_size))
        {
            // Too large to be worth reading: the stream ends here, the block's outcome says why.
            self.blocks_started += 1;
            self.state.count_put(PutOutcome::rejected);
            self.reject(index, &key, r.clone());
            return Err(r
                .clone()
                .context(format!("block {index} (key {})", key_prefix(&key)))
                .into_status());
        }
        self.blocks_started += 1;
        if let Err(r) = admitted {
            self.state.count_put(PutOutcome::rejected);
            self.reject(index, &key, r);
        }
        Ok(p)
    }

    /// Size limits for a new block (its buffer is charged as bytes arrive).
    fn admit(&self, h: &BlockHeader) -> Result<(), Rejection> {
        let limits = &self.state.limits;
        if h.raw_len > limits.max_block_size {
            return Err(Rejection::exhausted(format!(
                "block of {} raw bytes exceeds this node's --max-block-size of {} bytes",
                h.raw_len, limits.max_block_size
            )));
        }
        let capacity = self.state.store.capacity();
        let charge = BlockStore::charge_of_len(h.payload_len);
        if charge > capacity {
            return Err(Rejection::exhausted(format!(
                "block of {charge} bytes exceeds this node's whole capacity of {capacity} bytes"
            )));
        }
        if let Some(quota) = self.state.store.usage_of(self.tenant.id).quota
            && charge > quota
        {
            return Err(Rejection::exhausted(format!(
                "block of {charge} bytes exceeds your tenant's quota of {quota} bytes on this node"
            )));
        }
        Ok(())
    }

    /// Copies a chunk into the block's buffer, charging the budget ahead of it.
    async fn buffer(&self, p: &mut PendingBlock, data: &[u8]) -> Result<(), Rejection> {
        let n = data.len() as u64;
        self.charge_ahead(p, p.received + n).await?;
        self.state.metrics.received_bytes.inc_by(n);
        p.buf.extend_from_slice(data);
        Ok(())
    }

    /// Charges the budget so that `p`'s charge covers its first `end` payload bytes (in steps
    /// of at least [`CHARGE_STEP`]).
    async fn charge_ahead(&self, p: &mut PendingBlock, end: u64) -> Result<(), Rejection> {
        if end > p.charge.bytes() {
            let step = CHARGE_STEP.min(p.payload_len - p.charge.bytes().min(p.payload_len));
            let need = (end - p.charge.bytes()).max(step);
            let what = format!("block {} (key {})", p.index, key_prefix(&p.key));
            p.charge
                .absorb(self.state.budget.charge(need, &what).await?);
        }
        Ok(())
    }

    /// A complete block: store it here, or on its owners.
    async fn complete_block(&mut self, p: PendingBlock) {
        let Some(header) = p.header else {
            return;
        };
        // The buffer's charge is held until the block is stored or forwarded.
        let _charge = p.charge;
        let block = Arc::new(EncodedBlock {
            header,
            payload: p.buf.freeze(),
        });
        let Some(view) = self.view.clone() else {
            match self
                .state
                .store_verified(&self.tenant, p.key, p.parent, block)
                .await
            {
                Ok(true) => _ = self.record(&p.key, OutcomeStatus::Stored, 1),
                Ok(false) => _ = self.record(&p.key, OutcomeStatus::AlreadyPresent, 1),
                Err(r) => self.reject(p.index, &p.key, r),
            }
            return;
        };
        let idx = self.record(&p.key, OutcomeStatus::Unspecified, 0);
        let mut tally = ReplicaTally::default();
        for owner in view.owners(&p.key) {
            match &view.members()[owner].target {
                Target::Local => match self
                    .state
                    .store_verified(&self.tenant, p.key, p.parent, block.clone())
                    .await
                {
                    Ok(stored) => tally.ack(stored),
                    Err(r) => tally.reject(r),
                },
                Target::Remote(_) => {
                    self.forward_bytes += block.payload.len() as u64;
                    self.forwards.entry(owner).or_default().push(Forward {
                        outcome: idx,
                        key: p.key,
                        parent: p.parent,
                        block: block.clone(),
                    });
                }
            }
        }
        self.tallies.insert(idx, tally);
        if self.forward_bytes >= FLUSH_BYTES {
            self.flush_forwards().await;
        }
    }

    /// Sends every batched block to its remote owner, in parallel, and tallies the answers.
    async fn flush_forwards(&mut self) {
        let Some(view) = self.view.clone() else {
            return;
        };
        let batches = std::mem::take(&mut self.forwards);
        self.forward_bytes = 0;
        if batches.is_empty() {
            return;
        }
        for ForwardResult {
            outcome,
            node_id,
            result,
        } in routing::forward_puts(self.state, &view, &self.tenant, batches).await
        {
            let tally = self.tallies.entry(outcome).or_default();
            let label = if result.is_ok() { "ok" } else { "failed" };
            self.state
                .metrics
                .replica_writes
                .get_or_create(&ResultLabels {
                    result: label.into(),
                })
                .inc();
            match result {
                Ok(stored) => tally.ack(stored),
                Err(r) if is_unreachable(r.code) => {
                    tally.unreachable(format!("{node_id}: {}", r.message))
                }
                Err(r) => tally.reject(r),
            }
        }
    }

    /// Turns replication tallies into outcomes.
    fn apply_tallies(&mut self) {
        for (idx, tally) in std::mem::take(&mut self.tallies) {
            let o = &mut self.outcomes[idx];
            let rejection = match tally.verdict() {
                ReplicaVerdict::Held {
                    replicas,
                    newly_stored,
                } => {
                    o.replicas = replicas;
                    o.status = if newly_stored {
                        OutcomeStatus::Stored
                    } else {
                        OutcomeStatus::AlreadyPresent
                    } as i32;
                    continue;
                }
                ReplicaVerdict::Rejected(r) => r,
                ReplicaVerdict::Unreachable(who) => Rejection::new(
                    Code::Unavailable,
                    format!("no replica reachable ({}); retry later", who.join("; ")),
                ),
            };
            o.status = OutcomeStatus::Rejected as i32;
            o.code = rejection.code as i32;
            o.reason = rejection.message;
        }
    }

    /// Appends an outcome; returns its index.
    fn record(&mut self, key: &BlockKey, status: OutcomeStatus, replicas: u32) -> usize {
        self.outcomes.push(pb::BlockOutcome {
            key: Bytes::copy_from_slice(&key.0),
            status: status as i32,
            code: 0,
            reason: String::new(),
            replicas,
        });
        self.outcomes.len() - 1
    }

    fn reject(&mut self, index: usize, key: &BlockKey, r: Rejection) {
        debug!(block = index, key = %key_prefix(key), code = ?r.code, reason = %r.message, "put rejected");
        let i = self.record(key, OutcomeStatus::Rejected, 0);
        self.outcomes[i].code = r.code as i32;
        self.outcomes[i].reason = r.message;
    }

    /// Final status: OK with outcomes, or the first failure with every outcome in the details
    /// (a google.rpc.Status carrying the PutResponse).
    fn into_response(self, stream_error: Option<Status>) -> Result<pb::PutResponse, Status> {
        let total = self.outcomes.len();
        let rejected = |o: &&pb::BlockOutcome| o.status == OutcomeStatus::Rejected as i32;
        let accepted = total - self.outcomes.iter().filter(rejected).count();
        let first = self
            .outcomes
            .iter()
            .enumerate()
            .find(|(_, o)| rejected(o))
            .map(|(i, o)| {
                let key = BlockKey::from_slice(&o.key)
                    .map(|k| key_prefix(&k))
                    .unwrap_or_default();
                Rejection::new(
                    Code::from_i32(o.code),
                    format!("block {i} (key {key}): {}", o.reason),
                )
            });
        let failure = match (stream_error, first) {
            (Some(s), _) => Rejection::from(&s),
            (None, Some(r)) => r,
            (None, None) => {
                return Ok(pb::PutResponse {
                    outcomes: self.outcomes,
                });
            }
        };
        let msg = format!(
            "{} ({accepted} of {total} completed blocks accepted; details carry every outcome)",
            failure.message
        );
        let resp = pb::PutResponse {
            outcomes: self.outcomes,
        };
        let details = kvshare_proto::rpc::encode_put_details(failure.code as i32, &msg, &resp);
        Err(Status::with_details(
            failure.code,
            msg,
            Bytes::from(details),
        ))
    }
}

/// Header and parent key of a block's first chunk, validated.
fn parse_block_start(
    header: &pb::BlockHeader,
    parent_key: &[u8],
) -> Result<(BlockHeader, Option<BlockKey>), Rejection> {
    let header = BlockHeader::from_proto(header).map_err(|e| Rejection::from(&e))?;
    let parent = if parent_key.is_empty() {
        None
    } else {
        Some(BlockKey::from_slice(parent_key).map_err(|_| {
            Rejection::invalid(format!(
                "parent_key must be empty or 32 bytes, got {} bytes",
                parent_key.len()
            ))
        })?)
    };
    Ok((header, parent))
}

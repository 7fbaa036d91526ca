//! The `kvshare.v1.KvCache` gRPC service of one node.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use kvshare_core::{
    BlockHeader, BlockKey, BlockStore, CoreError, EncodedBlock, InsertOutcome, StoreKey,
};
use kvshare_proto::v1 as pb;
use pb::block_outcome::Status as OutcomeStatus;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::metrics::{Method, Metrics, PutLabels, PutOutcome};

/// Shared state of a node, used by the gRPC service and the HTTP endpoints.
pub struct NodeState {
    /// Stable node id.
    pub node_id: String,
    /// The block store.
    pub store: BlockStore,
    /// Metrics.
    pub metrics: Metrics,
    /// Largest accepted raw block size.
    pub max_block_size: u64,
    /// Largest Get chunk.
    pub get_chunk_size: usize,
    /// Most keys per request.
    pub max_keys: usize,
    /// gRPC address advertised to clients.
    pub grpc_addr: String,
    /// HTTP address.
    pub http_addr: String,
    /// Start time.
    pub started: Instant,
    /// In-flight upload budget, in KiB permits.
    pub inflight: Arc<Semaphore>,
    /// How long a put waits for in-flight budget.
    pub put_wait: Duration,
    /// Total in-flight budget, KiB.
    pub inflight_kib: u32,
}

/// The gRPC service.
#[derive(Clone)]
pub struct KvCacheService {
    state: Arc<NodeState>,
}

impl KvCacheService {
    /// A service over `state`.
    pub fn new(state: Arc<NodeState>) -> Self {
        KvCacheService { state }
    }
}

fn parse_namespace(b: &[u8]) -> Result<BlockKey, Status> {
    BlockKey::from_slice(b).map_err(|_| {
        Status::invalid_argument(format!(
            "namespace must be the 32-byte namespace digest, got {} bytes",
            b.len()
        ))
    })
}

fn parse_keys(keys: &[Bytes], max: usize) -> Result<Vec<BlockKey>, Status> {
    if keys.is_empty() {
        return Err(Status::invalid_argument(
            "keys is empty: send at least one 32-byte block key",
        ));
    }
    if keys.len() > max {
        return Err(Status::invalid_argument(format!(
            "{} keys in one request; the limit is {max}: split the request",
            keys.len()
        )));
    }
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            BlockKey::from_slice(k).map_err(|_| {
                Status::invalid_argument(format!(
                    "keys[{i}] must be 32 bytes, got {} bytes",
                    k.len()
                ))
            })
        })
        .collect()
}

fn short(k: &BlockKey) -> String {
    k.to_hex()[..16].to_string()
}

/// Upper bound on a payload's size given its raw size: no codec expands beyond this.
fn max_payload_for(raw_len: u64) -> u64 {
    raw_len + raw_len / 255 + 128
}

fn core_to_status(e: &CoreError) -> Code {
    match e {
        CoreError::TooLarge { .. } => Code::ResourceExhausted,
        _ => Code::InvalidArgument,
    }
}

/// A block whose chunks are arriving.
struct PendingBlock {
    index: usize,
    key: BlockKey,
    parent: Option<BlockKey>,
    /// None when the header was invalid (the block is then rejected).
    header: Option<BlockHeader>,
    /// Payload bytes the block announced.
    payload_len: u64,
    chunks: Vec<Bytes>,
    received: u64,
    /// A rejected block's remaining chunks are read and dropped.
    rejected: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

struct PutRun {
    outcomes: Vec<pb::BlockOutcome>,
    first_rejection: Option<(usize, Code, String)>,
}

impl PutRun {
    fn outcome(&mut self, key: &BlockKey, status: OutcomeStatus) {
        self.outcomes.push(pb::BlockOutcome {
            key: Bytes::copy_from_slice(&key.0),
            status: status as i32,
            code: 0,
            reason: String::new(),
            replicas: u32::from(status != OutcomeStatus::Rejected),
        });
    }

    fn reject(&mut self, index: usize, key: &BlockKey, code: Code, reason: String) {
        debug!(block = index, key = %short(key), ?code, %reason, "put rejected");
        if self.first_rejection.is_none() {
            self.first_rejection = Some((
                index,
                code,
                format!("block {index} (key {}): {reason}", short(key)),
            ));
        }
        self.outcomes.push(pb::BlockOutcome {
            key: Bytes::copy_from_slice(&key.0),
            status: OutcomeStatus::Rejected as i32,
            code: code as i32,
            reason,
            replicas: 0,
        });
    }

    /// Final status: OK with outcomes, or the first rejection with outcomes in the details.
    fn finish(self, stream_error: Option<Status>) -> Result<PutResponse, Status> {
        let stored = self
            .outcomes
            .iter()
            .filter(|o| o.status != OutcomeStatus::Rejected as i32)
            .count();
        let total = self.outcomes.len();
        let resp = pb::PutResponse {
            outcomes: self.outcomes,
        };
        let (code, msg) = match (stream_error, self.first_rejection) {
            (Some(s), _) => (s.code(), s.message().to_string()),
            (None, Some((_, code, msg))) => (code, msg),
            (None, None) => return Ok(resp),
        };
        let msg = format!(
            "{msg} ({stored} of {total} completed blocks accepted; details carry every outcome)"
        );
        let details = kvshare_proto::rpc::encode_put_details(code as i32, &msg, &resp);
        Err(Status::with_details(code, msg, Bytes::from(details)))
    }
}

type PutResponse = pb::PutResponse;

impl NodeState {
    /// Reads the first chunk of a block. A header that fails validation rejects the block
    /// (its chunks are read and dropped, counted by the header's payload_len); a chunk with no
    /// usable length at all ends the stream.
    fn start_block(
        &self,
        index: usize,
        key: BlockKey,
        msg: &pb::PutRequest,
        run: &mut PutRun,
    ) -> Result<PendingBlock, Status> {
        let header_pb = msg.header.as_ref().ok_or_else(|| {
            Status::invalid_argument(format!(
                "block {index} (key {}): its first PutRequest has no header; the first chunk of every block carries its BlockHeader",
                short(&key)
            ))
        })?;
        let mut p = PendingBlock {
            index,
            key,
            parent: None,
            header: None,
            payload_len: header_pb.payload_len,
            chunks: Vec::new(),
            received: 0,
            rejected: false,
            _permit: None,
        };
        let parsed =
            BlockHeader::from_proto(header_pb).map_err(|e| (core_to_status(&e), e.to_string()));
        let parent = if msg.parent_key.is_empty() {
            Ok(None)
        } else {
            BlockKey::from_slice(&msg.parent_key)
                .map(Some)
                .map_err(|_| {
                    (
                        Code::InvalidArgument,
                        format!(
                            "parent_key must be empty or 32 bytes, got {} bytes",
                            msg.parent_key.len()
                        ),
                    )
                })
        };
        match parsed.and_then(|h| parent.map(|par| (h, par))) {
            Ok((h, par)) => {
                p.header = Some(h);
                p.parent = par;
            }
            Err((code, reason)) => {
                if p.payload_len == 0 || p.payload_len > max_payload_for(self.max_block_size) {
                    return Err(Status::new(
                        code,
                        format!("block {index} (key {}): {reason}", short(&key)),
                    ));
                }
                self.metrics
                    .puts
                    .get_or_create(&PutLabels {
                        outcome: PutOutcome::rejected,
                    })
                    .inc();
                run.reject(index, &key, code, reason);
                p.rejected = true;
            }
        }
        Ok(p)
    }

    /// Admits a new block: size limits and in-flight budget. Returns a rejection reason.
    async fn admit(&self, p: &mut PendingBlock) -> Result<(), (Code, String)> {
        let Some(h) = &p.header else { return Ok(()) };
        if h.raw_len > self.max_block_size {
            return Err((
                Code::ResourceExhausted,
                format!(
                    "block of {} raw bytes exceeds this node's --max-block-size of {} bytes",
                    h.raw_len, self.max_block_size
                ),
            ));
        }
        if h.payload_len > max_payload_for(h.raw_len) {
            return Err((
                Code::InvalidArgument,
                format!(
                    "header.payload_len {} is larger than any codec produces for raw_len {}",
                    h.payload_len, h.raw_len
                ),
            ));
        }
        let charge = BlockStore::charge_of_len(h.payload_len);
        if charge > self.store.capacity() {
            return Err((
                Code::ResourceExhausted,
                format!(
                    "block of {} bytes exceeds this node's whole capacity of {} bytes",
                    charge,
                    self.store.capacity()
                ),
            ));
        }
        // Budget for the buffered payload plus the decode buffer used to verify it.
        let kib = ((h.payload_len + h.raw_len) / 1024 + 1).min(u64::from(self.inflight_kib)) as u32;
        let permit = tokio::time::timeout(
            self.put_wait,
            self.inflight.clone().acquire_many_owned(kib),
        )
        .await
        .map_err(|_| {
            (
                Code::ResourceExhausted,
                format!(
                    "node busy: more than {} KiB of uploads in flight for {:?}; retry later",
                    self.inflight_kib, self.put_wait
                ),
            )
        })?
        .map_err(|_| (Code::Unavailable, "node is shutting down".to_string()))?;
        p._permit = Some(permit);
        Ok(())
    }

    /// Verifies and stores a complete block.
    async fn complete(self: &Arc<Self>, p: PendingBlock, run: &mut PutRun) {
        let Some(header) = p.header else { return };
        let sk = StoreKey {
            namespace: header.namespace,
            key: p.key,
        };
        if self.store.contains(&sk) {
            self.metrics
                .puts
                .get_or_create(&PutLabels {
                    outcome: PutOutcome::already_present,
                })
                .inc();
            run.outcome(&p.key, OutcomeStatus::AlreadyPresent);
            return;
        }
        let payload = if p.chunks.len() == 1 {
            p.chunks.into_iter().next().unwrap_or_default()
        } else {
            let mut b = BytesMut::with_capacity(p.received as usize);
            for c in &p.chunks {
                b.extend_from_slice(c);
            }
            b.freeze()
        };
        let block = Arc::new(EncodedBlock { header, payload });
        let verify = {
            let block = block.clone();
            tokio::task::spawn_blocking(move || block.decode().map(|_| ()))
        };
        let verified = match verify.await {
            Ok(r) => r,
            Err(e) => Err(CoreError::Corrupt(format!("verification task failed: {e}"))),
        };
        if let Err(e) = verified {
            self.metrics
                .puts
                .get_or_create(&PutLabels {
                    outcome: PutOutcome::rejected,
                })
                .inc();
            run.reject(p.index, &p.key, core_to_status(&e), e.to_string());
            return;
        }
        match self.store.insert(sk, p.parent, block) {
            Ok(InsertOutcome::Stored { evicted }) => {
                self.metrics.evictions.inc_by(evicted);
                self.metrics
                    .puts
                    .get_or_create(&PutLabels {
                        outcome: PutOutcome::stored,
                    })
                    .inc();
                run.outcome(&p.key, OutcomeStatus::Stored);
            }
            Ok(InsertOutcome::AlreadyPresent) => {
                self.metrics
                    .puts
                    .get_or_create(&PutLabels {
                        outcome: PutOutcome::already_present,
                    })
                    .inc();
                run.outcome(&p.key, OutcomeStatus::AlreadyPresent);
            }
            Err(e) => {
                self.metrics
                    .puts
                    .get_or_create(&PutLabels {
                        outcome: PutOutcome::rejected,
                    })
                    .inc();
                run.reject(p.index, &p.key, core_to_status(&e), e.to_string());
            }
        }
    }

    async fn put_stream(
        self: &Arc<Self>,
        mut stream: Streaming<pb::PutRequest>,
    ) -> Result<PutResponse, Status> {
        let mut run = PutRun {
            outcomes: Vec::new(),
            first_rejection: None,
        };
        let mut pending: Option<PendingBlock> = None;
        let mut blocks = 0usize;
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) => {
                    warn!(status = %s, "put stream broke; a partial block was discarded");
                    return run.finish(Some(Status::new(
                        s.code(),
                        format!("upload stream failed: {}", s.message()),
                    )));
                }
            };
            let key = match BlockKey::from_slice(&msg.key) {
                Ok(k) => k,
                Err(_) => {
                    return run.finish(Some(Status::invalid_argument(format!(
                        "PutRequest.key must be 32 bytes, got {} bytes (message for block {})",
                        msg.key.len(),
                        pending.as_ref().map_or(blocks, |p| p.index)
                    ))));
                }
            };
            let mut p = match pending.take() {
                Some(p) if p.key == key => p,
                Some(p) => {
                    return run.finish(Some(Status::invalid_argument(format!(
                        "block {} (key {}) stopped after {} of {} payload bytes when a chunk for key {} arrived; send a block's chunks consecutively",
                        p.index,
                        short(&p.key),
                        p.received,
                        p.payload_len,
                        short(&key)
                    ))));
                }
                None => {
                    let mut p = match self.start_block(blocks, key, &msg, &mut run) {
                        Ok(p) => p,
                        Err(s) => return run.finish(Some(s)),
                    };
                    blocks += 1;
                    if p.rejected {
                        // Already reported by start_block.
                    } else if let Err((code, reason)) = self.admit(&mut p).await {
                        self.metrics
                            .puts
                            .get_or_create(&PutLabels {
                                outcome: PutOutcome::rejected,
                            })
                            .inc();
                        run.reject(p.index, &p.key, code, reason);
                        p.rejected = true;
                    }
                    p
                }
            };
            let n = msg.data.len() as u64;
            if p.received + n > p.payload_len {
                return run.finish(Some(Status::invalid_argument(format!(
                    "block {} (key {}): chunks carry more than header.payload_len = {} bytes",
                    p.index,
                    short(&p.key),
                    p.payload_len
                ))));
            }
            p.received += n;
            if !p.rejected {
                self.metrics.received_bytes.inc_by(n);
                if n > 0 {
                    p.chunks.push(msg.data);
                }
            }
            if p.received == p.payload_len {
                if !p.rejected {
                    self.complete(p, &mut run).await;
                }
            } else {
                pending = Some(p);
            }
        }
        if let Some(p) = pending {
            let msg = format!(
                "upload ended in the middle of block {} (key {}): {} of {} payload bytes arrived; the partial block was discarded",
                p.index,
                short(&p.key),
                p.received,
                p.payload_len
            );
            return run.finish(Some(Status::invalid_argument(msg)));
        }
        if blocks == 0 {
            return Err(Status::invalid_argument("Put stream carried no blocks"));
        }
        run.finish(None)
    }

    /// Counters and gauges as the Stats RPC reports them.
    pub fn stats(&self) -> pb::StatsResponse {
        let st = self.store.stats();
        let m = &self.metrics;
        let put = |o| m.puts.get_or_create(&PutLabels { outcome: o }).get();
        pb::StatsResponse {
            node_id: self.node_id.clone(),
            capacity_bytes: st.capacity_bytes,
            stored_bytes: st.used_bytes,
            stored_blocks: st.blocks,
            stored_raw_bytes: st.raw_bytes,
            lookups: m.lookups.get(),
            hits: m.hits.get(),
            misses: m.misses.get(),
            puts_stored: put(PutOutcome::stored),
            puts_present: put(PutOutcome::already_present),
            puts_rejected: put(PutOutcome::rejected),
            evictions: st.evictions,
            bytes_in: m.received_bytes.get(),
            bytes_out: m.sent_bytes.get(),
            deletes: m.deletes.get(),
            namespaces: st
                .namespaces
                .iter()
                .map(|(ns, u)| pb::NamespaceStats {
                    namespace: Bytes::copy_from_slice(&ns.0),
                    blocks: u.blocks,
                    bytes: u.bytes,
                    hits: u.hits,
                })
                .collect(),
            uptime_seconds: self.started.elapsed().as_secs(),
            stored_payload_bytes: st.payload_bytes,
        }
    }
}

fn finish<T>(
    state: &NodeState,
    method: Method,
    t0: Instant,
    r: Result<T, Status>,
) -> Result<T, Status> {
    let code = r.as_ref().err().map_or(Code::Ok, Status::code);
    state
        .metrics
        .observe_rpc(method, code, t0.elapsed().as_secs_f64());
    r
}

/// Stream type of Get.
pub type GetStream = Pin<Box<dyn Stream<Item = Result<pb::GetResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::kv_cache_server::KvCache for KvCacheService {
    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupResponse>, Status> {
        let t0 = Instant::now();
        let s = &self.state;
        let r = (|| {
            let req = request.get_ref();
            let ns = parse_namespace(&req.namespace)?;
            let keys = parse_keys(&req.keys, s.max_keys)?;
            let hit = s.store.lookup_prefix(ns, &keys);
            s.metrics.lookups.inc();
            s.metrics.hits.inc_by(hit as u64);
            if hit < keys.len() {
                s.metrics.misses.inc();
            }
            Ok(Response::new(pb::LookupResponse {
                hit_blocks: hit as u32,
                nodes: if hit > 0 {
                    vec![s.node_id.clone()]
                } else {
                    vec![]
                },
            }))
        })();
        finish(s, Method::lookup, t0, r)
    }

    async fn put(
        &self,
        request: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let t0 = Instant::now();
        let r = self
            .state
            .put_stream(request.into_inner())
            .await
            .map(Response::new);
        finish(&self.state, Method::put, t0, r)
    }

    type GetStream = GetStream;

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let t0 = Instant::now();
        let s = &self.state;
        let r = (|| {
            let req = request.get_ref();
            let ns = parse_namespace(&req.namespace)?;
            let keys = parse_keys(&req.keys, s.max_keys)?;
            let found = s.store.get_many(ns, &keys);
            let chunk = s.get_chunk_size.max(1);
            let mut msgs = Vec::with_capacity(keys.len());
            let (mut hits, mut misses, mut sent) = (0u64, 0u64, 0u64);
            for (i, (key, block)) in keys.iter().zip(found).enumerate() {
                let key_bytes = Bytes::copy_from_slice(&key.0);
                let Some(block) = block else {
                    misses += 1;
                    msgs.push(Ok(pb::GetResponse {
                        index: i as u32,
                        key: key_bytes,
                        found: false,
                        ..Default::default()
                    }));
                    continue;
                };
                hits += 1;
                let len = block.payload.len();
                sent += len as u64;
                let mut off = 0;
                loop {
                    let end = (off + chunk).min(len);
                    msgs.push(Ok(pb::GetResponse {
                        index: i as u32,
                        key: key_bytes.clone(),
                        found: true,
                        header: (off == 0).then(|| block.header.to_proto()),
                        offset: off as u64,
                        // A slice shares the stored buffer: no copy, and the bytes outlive an
                        // eviction until this stream has sent them.
                        data: block.payload.slice(off..end),
                        last: end == len,
                    }));
                    off = end;
                    if off >= len {
                        break;
                    }
                }
            }
            s.metrics.hits.inc_by(hits);
            s.metrics.misses.inc_by(misses);
            s.metrics.sent_bytes.inc_by(sent);
            let stream: GetStream = Box::pin(tokio_stream::iter(msgs));
            Ok(Response::new(stream))
        })();
        finish(s, Method::get, t0, r)
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let t0 = Instant::now();
        let s = &self.state;
        let r = (|| {
            let req = request.get_ref();
            let ns = parse_namespace(&req.namespace)?;
            let keys = parse_keys(&req.keys, s.max_keys)?;
            let deleted = keys
                .iter()
                .filter(|k| {
                    s.store.remove(&StoreKey {
                        namespace: ns,
                        key: **k,
                    })
                })
                .count();
            s.metrics.deletes.inc_by(deleted as u64);
            Ok(Response::new(pb::DeleteResponse {
                deleted: deleted as u32,
            }))
        })();
        finish(s, Method::delete, t0, r)
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let t0 = Instant::now();
        let r = Ok(Response::new(self.state.stats()));
        finish(&self.state, Method::stats, t0, r)
    }

    async fn cluster_info(
        &self,
        _request: Request<pb::ClusterInfoRequest>,
    ) -> Result<Response<pb::ClusterInfoResponse>, Status> {
        let t0 = Instant::now();
        let s = &self.state;
        let r = Ok(Response::new(pb::ClusterInfoResponse {
            node_id: s.node_id.clone(),
            members: vec![pb::Member {
                node_id: s.node_id.clone(),
                grpc_addr: s.grpc_addr.clone(),
                http_addr: s.http_addr.clone(),
                healthy: true,
            }],
            replicas: 1,
            placement: "rendezvous-xxh3-v1".into(),
        }));
        finish(s, Method::cluster_info, t0, r)
    }
}

//! The `kvshare.v1.KvCache` gRPC service of one node.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use kvshare_core::wire::get_chunks;
use kvshare_core::{BlockKey, BlockStore, CoreError, StoreKey};
use kvshare_proto::v1 as pb;
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::cluster::{Cluster, HOP_HEADER, HOP_LOCAL};
use crate::metrics::{Method, Metrics, PutLabels, PutOutcome};
use crate::routing;

/// True when the request asks to be answered from this node's store only.
fn is_local<T>(r: &Request<T>) -> bool {
    r.metadata()
        .get(HOP_HEADER)
        .is_some_and(|v| v.as_bytes() == HOP_LOCAL.as_bytes())
}

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
    /// Membership and placement.
    pub cluster: Arc<Cluster>,
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

/// Namespace and keys of a Lookup, Get or Delete, validated.
fn parse_request(
    namespace: &[u8],
    keys: &[Bytes],
    max: usize,
) -> Result<(BlockKey, Vec<BlockKey>), Status> {
    Ok((parse_namespace(namespace)?, parse_keys(keys, max)?))
}

pub(crate) fn short(k: &BlockKey) -> String {
    k.to_hex()[..16].to_string()
}

/// Upper bound on a payload's size given its raw size: no codec expands beyond this.
pub(crate) fn max_payload_for(raw_len: u64) -> u64 {
    raw_len + raw_len / 255 + 128
}

pub(crate) fn core_to_status(e: &CoreError) -> Code {
    match e {
        CoreError::TooLarge { .. } => Code::ResourceExhausted,
        _ => Code::InvalidArgument,
    }
}

impl NodeState {
    /// Counts a request served from the local store for a peer or smart client.
    fn count_peer_request(&self, method: Method) {
        self.metrics
            .peer_requests
            .get_or_create(&crate::metrics::MethodLabels { method })
            .inc();
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
            lookup_blocks: m.lookup_blocks.get(),
            lookup_hit_blocks: m.lookup_hit_blocks.get(),
            lookup_tokens: m.lookup_tokens.get(),
            lookup_hit_tokens: m.lookup_hit_tokens.get(),
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
        let local = is_local(&request);
        let r = async {
            let req = request.get_ref();
            let (ns, keys) = parse_request(&req.namespace, &req.keys, s.max_keys)?;
            let view = s.cluster.view();
            let (present, nodes) = if local || view.is_single() {
                (s.store.presence(ns, &keys), vec![s.node_id.clone()])
            } else {
                let p = routing::lookup(s, &view, ns, &keys).await;
                (p, view.members.iter().map(|m| m.node_id.clone()).collect())
            };
            let hit = present.iter().take_while(|p| **p).count();
            if local {
                s.count_peer_request(Method::lookup);
            } else {
                let tpb = u64::from(s.store.tokens_per_block(&ns));
                s.metrics.lookups.inc();
                s.metrics.lookup_blocks.inc_by(keys.len() as u64);
                s.metrics.lookup_hit_blocks.inc_by(hit as u64);
                s.metrics.lookup_tokens.inc_by(keys.len() as u64 * tpb);
                s.metrics.lookup_hit_tokens.inc_by(hit as u64 * tpb);
                s.metrics.hits.inc_by(hit as u64);
                if hit < keys.len() {
                    s.metrics.misses.inc();
                }
            }
            Ok(Response::new(pb::LookupResponse {
                hit_blocks: hit as u32,
                nodes: if hit > 0 { nodes } else { vec![] },
                present: if req.per_key { present } else { vec![] },
            }))
        }
        .await;
        finish(s, Method::lookup, t0, r)
    }

    async fn put(
        &self,
        request: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let t0 = Instant::now();
        let local = is_local(&request);
        if local {
            self.state.count_peer_request(Method::put);
        }
        let r = self
            .state
            .put_stream(request.into_inner(), local)
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
        let local = is_local(&request);
        let r = async {
            let req = request.get_ref();
            let (ns, keys) = parse_request(&req.namespace, &req.keys, s.max_keys)?;
            let view = s.cluster.view();
            let found = if local || view.is_single() {
                s.store.get_many(ns, &keys)
            } else {
                routing::get(s, &view, ns, &keys).await
            };
            let chunk = s.get_chunk_size.max(1);
            let mut msgs = Vec::with_capacity(keys.len());
            let (mut hits, mut misses, mut sent) = (0u64, 0u64, 0u64);
            for (i, (key, block)) in keys.iter().zip(found).enumerate() {
                match &block {
                    Some(b) => {
                        hits += 1;
                        sent += b.payload.len() as u64;
                    }
                    None => misses += 1,
                }
                msgs.extend(
                    get_chunks(i as u32, key, block.as_deref(), chunk)
                        .into_iter()
                        .map(Ok),
                );
            }
            if local {
                s.count_peer_request(Method::get);
            } else {
                s.metrics.hits.inc_by(hits);
                s.metrics.misses.inc_by(misses);
            }
            s.metrics.sent_bytes.inc_by(sent);
            let stream: GetStream = Box::pin(tokio_stream::iter(msgs));
            Ok(Response::new(stream))
        }
        .await;
        finish(s, Method::get, t0, r)
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let t0 = Instant::now();
        let s = &self.state;
        let local = is_local(&request);
        let r = async {
            let req = request.get_ref();
            let (ns, keys) = parse_request(&req.namespace, &req.keys, s.max_keys)?;
            let view = s.cluster.view();
            let deleted = if local || view.is_single() {
                keys.iter()
                    .filter(|k| {
                        s.store.remove(&StoreKey {
                            namespace: ns,
                            key: **k,
                        })
                    })
                    .count() as u32
            } else {
                routing::delete(s, &view, ns, &keys).await
            };
            s.metrics.deletes.inc_by(u64::from(deleted));
            Ok(Response::new(pb::DeleteResponse { deleted }))
        }
        .await;
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
            members: s.cluster.members_info(),
            replicas: s.cluster.replicas(),
            placement: kvshare_core::placement::PLACEMENT_NAME.into(),
        }));
        finish(s, Method::cluster_info, t0, r)
    }
}

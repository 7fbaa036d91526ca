//! The state of one node, shared by the gRPC service and the HTTP endpoints: its store,
//! limits, metrics and cluster view, and the operations on the local store that every request
//! path uses.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshare_core::{BlockKey, BlockStore, CoreError, EncodedBlock, InsertOutcome, StoreKey};
use kvshare_proto::v1 as pb;

use crate::auth::{Auth, Tenant};
use crate::budget::{Charge, MemoryBudget};
use crate::cluster::{Cluster, View};
use crate::metrics::{Method, MethodLabels, Metrics, PutLabels, PutOutcome};
use crate::rejection::Rejection;

/// Raw size up to which a block is verified on the async runtime (larger: a blocking thread).
const INLINE_VERIFY_BYTES: u64 = 64 * 1024;

/// Limits a node enforces on requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted raw block size.
    pub max_block_size: u64,
    /// Largest Get chunk.
    pub get_chunk_size: usize,
    /// Most keys per request.
    pub max_keys: usize,
    /// An upload that delivers nothing, or a Get whose client reads nothing, for this long is
    /// ended.
    pub stream_idle_timeout: Duration,
    /// Slowest accepted upload rate (bytes per second) once a block's idle allowance is spent.
    pub put_min_rate: u64,
    /// Top namespaces listed by stats when the request does not say (see [`NodeState::stats`]).
    pub stats_top_namespaces: u32,
}

/// Most top namespaces a Stats request may ask for.
pub const MAX_STATS_TOP_NAMESPACES: u32 = 1000;

/// Shared state of a node, used by the gRPC service and the HTTP endpoints.
pub struct NodeState {
    /// Stable node id.
    pub node_id: String,
    /// The block store (shared with the `/metrics` namespace collector).
    pub store: Arc<BlockStore>,
    /// Metrics.
    pub metrics: Metrics,
    /// Request limits.
    pub limits: Limits,
    /// Memory budget for buffered bytes (uploads, verification, Get responses).
    pub budget: MemoryBudget,
    /// gRPC address advertised to clients.
    pub grpc_addr: String,
    /// HTTP address.
    pub http_addr: String,
    /// Port of the bulk transport (same host as `grpc_addr`), 0 when off.
    pub bulk_port: u16,
    /// Start time.
    pub started: Instant,
    /// Membership and placement.
    pub cluster: Arc<Cluster>,
    /// Tokens, roles, tenants, protected mode.
    pub auth: Arc<Auth>,
}

/// Where a request is answered.
pub enum Scope {
    /// From this node's store: a request marked "do not forward", or a single-node cluster.
    Local,
    /// By fanning out to the owners in this view.
    Cluster(Arc<View>),
}

impl NodeState {
    /// Whether a request is answered here or fanned out (`no_forward`: the request carries
    /// the do-not-forward header).
    pub fn scope(&self, no_forward: bool) -> Scope {
        if no_forward {
            return Scope::Local;
        }
        let view = self.cluster.view();
        if view.is_single() {
            Scope::Local
        } else {
            Scope::Cluster(view)
        }
    }

    /// Counts a request served from the local store for a peer or smart client.
    pub fn count_peer_request(&self, method: Method) {
        self.metrics
            .peer_requests
            .get_or_create(&MethodLabels { method })
            .inc();
    }

    /// Counts one block's put outcome.
    pub fn count_put(&self, outcome: PutOutcome) {
        self.metrics
            .puts
            .get_or_create(&PutLabels { outcome })
            .inc();
    }

    /// Removes `keys` of namespace `ns` from this node's store; returns how many were there.
    pub fn remove_local(&self, ns: BlockKey, keys: &[BlockKey]) -> u32 {
        keys.iter()
            .filter(|k| {
                self.store.remove(&StoreKey {
                    namespace: ns,
                    key: **k,
                })
            })
            .count() as u32
    }

    /// Verifies a complete block (length, and the payload checksum, or when the writer sent none
    /// a decode against the raw checksum) and stores it here for `tenant` (under
    /// [`Tenant::space`] of its namespace). `Ok(true)` when newly stored, `Ok(false)` when it
    /// was already present.
    pub async fn store_verified(
        &self,
        tenant: &Tenant,
        key: BlockKey,
        parent: Option<BlockKey>,
        block: Arc<EncodedBlock>,
    ) -> Result<bool, Rejection> {
        let sk = StoreKey {
            namespace: tenant.space(block.header.namespace),
            key,
        };
        if self.store.contains(&sk) {
            self.count_put(PutOutcome::already_present);
            return Ok(false);
        }
        // Decoding a compressed block to check it needs a raw-size buffer.
        let _decode_buffer = if !block.verification_decodes() {
            Charge::default()
        } else {
            let what = format!("verifying a block of {} raw bytes", block.header.raw_len);
            match self.budget.charge(block.header.raw_len, &what).await {
                Ok(c) => c,
                Err(r) => {
                    self.count_put(PutOutcome::rejected);
                    return Err(r);
                }
            }
        };
        let inserted = match verify(block.clone()).await {
            Ok(()) => self.store.insert_for(tenant.id, sk, parent, block),
            Err(e) => Err(e),
        };
        match inserted {
            Ok(InsertOutcome::Stored { evicted }) => {
                self.metrics.evictions.inc_by(evicted);
                self.count_put(PutOutcome::stored);
                Ok(true)
            }
            Ok(InsertOutcome::AlreadyPresent) => {
                self.count_put(PutOutcome::already_present);
                Ok(false)
            }
            Err(e) => {
                self.count_put(PutOutcome::rejected);
                Err(Rejection::from(&e))
            }
        }
    }

    /// Stats as a caller limited to `tenant` sees them: the tenant's blocks, bytes, hits,
    /// evictions and namespaces, its quota as capacity (the node's capacity without one), and
    /// none of the node-wide counters.
    pub fn tenant_stats(&self, tenant: &Tenant, top_namespaces: u32) -> pb::StatsResponse {
        let u = self.store.usage_of(tenant.id);
        let (total, namespaces) = self
            .store
            .tenant_namespaces(tenant.id, self.stats_top(top_namespaces));
        pb::StatsResponse {
            node_id: self.node_id.clone(),
            capacity_bytes: u.quota.unwrap_or_else(|| self.store.capacity()),
            stored_bytes: u.bytes,
            stored_blocks: u.blocks,
            stored_payload_bytes: u
                .bytes
                .saturating_sub(u.blocks * kvshare_core::store::ENTRY_OVERHEAD_BYTES),
            hits: u.hits,
            evictions: u.evictions,
            namespaces: namespace_stats(&namespaces),
            namespaces_total: total,
            uptime_seconds: self.started.elapsed().as_secs(),
            ..Default::default()
        }
    }

    /// Top namespaces to list for a request asking for `requested` (0: this node's default;
    /// at most [`MAX_STATS_TOP_NAMESPACES`]).
    pub fn stats_top(&self, requested: u32) -> usize {
        let n = if requested == 0 {
            self.limits.stats_top_namespaces
        } else {
            requested
        };
        n.min(MAX_STATS_TOP_NAMESPACES) as usize
    }

    /// Counters and gauges as the Stats RPC reports them, listing the top `top_namespaces`
    /// namespaces by bytes and by hits (0: this node's default; capped at
    /// [`MAX_STATS_TOP_NAMESPACES`]) and counting them all in `namespaces_total`.
    pub fn stats(&self, top_namespaces: u32) -> pb::StatsResponse {
        let st = self.store.stats(self.stats_top(top_namespaces));
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
            namespaces: namespace_stats(&st.namespaces),
            uptime_seconds: self.started.elapsed().as_secs(),
            stored_payload_bytes: st.payload_bytes,
            lookup_blocks: m.lookup_blocks.get(),
            lookup_hit_blocks: m.lookup_hit_blocks.get(),
            lookup_tokens: m.lookup_tokens.get(),
            lookup_hit_tokens: m.lookup_hit_tokens.get(),
            namespaces_total: st.namespaces_total,
        }
    }
}

/// Checks a block before it is stored ([`EncodedBlock::verify_payload`]); blocks that must be
/// decoded for it, when large, off the async runtime.
async fn verify(block: Arc<EncodedBlock>) -> Result<(), CoreError> {
    if !block.verification_decodes() || block.header.raw_len <= INLINE_VERIFY_BYTES {
        return block.verify_payload();
    }
    match tokio::task::spawn_blocking(move || block.verify_payload()).await {
        Ok(r) => r,
        Err(e) => Err(CoreError::Corrupt(format!("verification task failed: {e}"))),
    }
}

/// The wire form of listed namespaces' usage.
fn namespace_stats(
    list: &[(BlockKey, kvshare_core::store::NamespaceUsage)],
) -> Vec<pb::NamespaceStats> {
    list.iter()
        .map(|(ns, u)| pb::NamespaceStats {
            namespace: Bytes::copy_from_slice(&ns.0),
            blocks: u.blocks,
            bytes: u.bytes,
            hits: u.hits,
        })
        .collect()
}

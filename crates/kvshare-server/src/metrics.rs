//! Prometheus metrics of a node (`/metrics`), following Prometheus naming conventions.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use kvshare_core::BlockStore;
use kvshare_core::TenantUsage;
use kvshare_core::store::NamespaceUsage;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// RPC method label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Method {
    lookup,
    put,
    get,
    delete,
    stats,
    cluster_info,
    set_capacity,
}

/// Labels of per-method metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The RPC.
    pub method: Method,
}

/// Put outcome label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum PutOutcome {
    stored,
    already_present,
    rejected,
}

/// Labels of put outcomes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PutLabels {
    /// The outcome.
    pub outcome: PutOutcome,
}

/// Labels of RPC results.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The RPC.
    pub method: Method,
    /// gRPC status code name, e.g. `Ok`, `InvalidArgument`.
    pub code: String,
}

/// Labels of forwarded requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// The RPC forwarded.
    pub method: Method,
}

/// Labels of replica writes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `failed`.
    pub result: String,
}

/// Labels of peer health.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// Peer node id (or address while its id is unknown).
    pub peer: String,
}

/// Labels of configuration mismatches.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MismatchLabels {
    /// `replicas`, `members` or `duplicate_node_id`.
    pub kind: String,
    /// The peer: node id, or `id@address` for a duplicate node id.
    pub peer: String,
}

/// Labels of per-namespace metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    /// First 16 hex digits of the namespace digest.
    pub namespace: String,
}

/// Scrape-time collector of per-namespace usage: only the store's top namespaces (by bytes and
/// by hits, see [`BlockStore::stats`]), so the label cardinality stays bounded by `2 * top`
/// however many namespaces the node holds; `kvshare_namespaces` counts them all.
struct NamespaceCollector {
    store: Arc<BlockStore>,
    top: usize,
}

impl std::fmt::Debug for NamespaceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceCollector")
            .field("top", &self.top)
            .finish_non_exhaustive()
    }
}

/// What the namespace collector emits, after the registry's `kvshare_` prefix: name, help, type
/// (a table, like `register!`, so that scripts/validate_deploy.py finds the names).
const NAMESPACE_METRICS: [(&str, &str, MetricType); 4] = [
    (
        "namespaces",
        "Namespaces with blocks stored on this node",
        MetricType::Gauge,
    ),
    (
        "namespace_stored_bytes",
        "Bytes stored (payload plus index overhead) by each of the top namespaces",
        MetricType::Gauge,
    ),
    (
        "namespace_blocks",
        "Blocks stored by each of the top namespaces",
        MetricType::Gauge,
    ),
    (
        "namespace_hits",
        "Blocks of each of the top namespaces found by lookups and gets (from 0 again after a namespace loses its last block)",
        MetricType::Counter,
    ),
];

/// Reads one figure of a namespace's usage.
type UsageField = fn(&NamespaceUsage) -> u64;

impl Collector for NamespaceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let st = self.store.stats(self.top);
        let [total, bytes, blocks, hits] = &NAMESPACE_METRICS;
        let gauge = ConstGauge::new(st.namespaces_total);
        gauge.encode(encoder.encode_descriptor(total.0, total.1, None, total.2)?)?;
        let labels: Vec<NamespaceLabels> = st
            .namespaces
            .iter()
            .map(|(ns, _)| NamespaceLabels {
                namespace: ns.to_hex().chars().take(16).collect(),
            })
            .collect();
        let gauges: [(_, UsageField); 2] = [(bytes, |u| u.bytes), (blocks, |u| u.blocks)];
        for ((name, help, kind), value) in gauges {
            let mut e = encoder.encode_descriptor(name, help, None, *kind)?;
            for (l, (_, u)) in labels.iter().zip(&st.namespaces) {
                e.encode_family(l)?.encode_gauge(&value(u))?;
            }
        }
        let mut e = encoder.encode_descriptor(hits.0, hits.1, None, hits.2)?;
        for (l, (_, u)) in labels.iter().zip(&st.namespaces) {
            e.encode_family(l)?
                .encode_counter::<NamespaceLabels, u64, u64>(&u.hits, None)?;
        }
        Ok(())
    }
}

/// Labels of per-tenant metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

/// Scrape-time collector of per-tenant usage (tenants are few: those of the auth file, plus
/// `default`).
struct TenantCollector {
    store: Arc<BlockStore>,
}

impl std::fmt::Debug for TenantCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantCollector").finish_non_exhaustive()
    }
}

/// What the tenant collector emits, after the registry's `kvshare_` prefix.
const TENANT_METRICS: [(&str, &str, MetricType); 5] = [
    (
        "tenant_stored_bytes",
        "Bytes stored (payload plus index overhead) by each tenant",
        MetricType::Gauge,
    ),
    (
        "tenant_blocks",
        "Blocks stored by each tenant",
        MetricType::Gauge,
    ),
    (
        "tenant_quota_bytes",
        "Quota of each tenant that has one (bytes per node, from --auth-file)",
        MetricType::Gauge,
    ),
    (
        "tenant_hits",
        "Blocks of each tenant found by lookups and gets",
        MetricType::Counter,
    ),
    (
        "tenant_evictions",
        "Blocks of each tenant evicted (by the node's capacity or the tenant's quota)",
        MetricType::Counter,
    ),
];

impl Collector for TenantCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.store.tenant_usage();
        let labels: Vec<TenantLabels> = all
            .iter()
            .map(|(name, _)| TenantLabels {
                tenant: name.to_string(),
            })
            .collect();
        let [bytes, blocks, quota, hits, evictions] = &TENANT_METRICS;
        let gauges: [(_, UsageOf); 2] = [(bytes, |u| Some(u.bytes)), (blocks, |u| Some(u.blocks))];
        let quota_gauge: [(_, UsageOf); 1] = [(quota, |u| u.quota)];
        for ((name, help, kind), value) in gauges.into_iter().chain(quota_gauge) {
            let mut e = encoder.encode_descriptor(name, help, None, *kind)?;
            for (l, (_, u)) in labels.iter().zip(&all) {
                if let Some(v) = value(u) {
                    e.encode_family(l)?.encode_gauge(&v)?;
                }
            }
        }
        let counters: [(_, UsageOf); 2] =
            [(hits, |u| Some(u.hits)), (evictions, |u| Some(u.evictions))];
        for ((name, help, kind), value) in counters {
            let mut e = encoder.encode_descriptor(name, help, None, *kind)?;
            for (l, (_, u)) in labels.iter().zip(&all) {
                if let Some(v) = value(u) {
                    e.encode_family(l)?
                        .encode_counter::<TenantLabels, u64, u64>(&v, None)?;
                }
            }
        }
        Ok(())
    }
}

/// Reads one figure of a tenant's usage.
type UsageOf = fn(&TenantUsage) -> Option<u64>;

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 20 µs .. ~10 s
    Histogram::new(exponential_buckets(0.000_02, 2.0, 20))
}

/// Every metric a node exports.
pub struct Metrics {
    registry: Registry,
    /// Lookup RPCs.
    pub lookups: Counter,
    /// Keys asked by client lookups.
    pub lookup_blocks: Counter,
    /// Keys in the cached prefixes returned by client lookups.
    pub lookup_hit_blocks: Counter,
    /// Tokens covered by client lookups.
    pub lookup_tokens: Counter,
    /// Tokens in the cached prefixes returned by client lookups.
    pub lookup_hit_tokens: Counter,
    /// Blocks found by lookups and gets.
    pub hits: Counter,
    /// Blocks not found (a lookup counts its first miss).
    pub misses: Counter,
    /// Put outcomes per block.
    pub puts: Family<PutLabels, Counter>,
    /// Blocks evicted to stay under capacity.
    pub evictions: Counter,
    /// Encoded payload bytes received by puts.
    pub received_bytes: Counter,
    /// Encoded payload bytes sent by gets.
    pub sent_bytes: Counter,
    /// Blocks removed by Delete.
    pub deletes: Counter,
    /// Charged bytes stored.
    pub stored_bytes: Gauge,
    /// Blocks stored.
    pub stored_blocks: Gauge,
    /// Raw bytes the stored blocks decode to.
    pub stored_raw_bytes: Gauge,
    /// Configured capacity.
    pub capacity_bytes: Gauge,
    /// RPC latency.
    pub rpc_duration: HistogramFamily,
    /// RPCs by method and status code.
    pub rpcs: Family<RpcLabels, Counter>,
    /// Requests this node sent to peers on behalf of a client.
    pub forwarded: Family<ForwardLabels, Counter>,
    /// Requests served for peers or smart clients from the local store only (x-kvshare-hop).
    pub peer_requests: Family<MethodLabels, Counter>,
    /// Block writes to remote replicas.
    pub replica_writes: Family<ResultLabels, Counter>,
    /// Blocks served by a replica other than the first owner.
    pub failovers: Counter,
    /// Blocks copied to an owner that lacked them by re-replication.
    pub rereplicated_blocks: Counter,
    /// Local blocks that the last re-replication sweep found missing on one of their owners.
    pub under_replicated_blocks: Gauge,
    /// Re-replication sweeps completed.
    pub rebalance_sweeps: Counter,
    /// 1 when a peer is healthy, 0 when marked down.
    pub peer_up: Family<PeerLabels, Gauge>,
    /// Times each peer was marked down (shared with the cluster's health checks).
    pub peer_markdowns: Family<PeerLabels, Counter>,
    /// 1 per configuration mismatch in force (set at scrape time).
    pub config_mismatch: Family<MismatchLabels, Gauge>,
    /// Blocks loaded from the store snapshot at start.
    pub snapshot_loaded_blocks: Gauge,
    /// Payload bytes loaded from the store snapshot at start.
    pub snapshot_loaded_bytes: Gauge,
    /// Snapshot records not loaded because they were damaged, invalid or missing.
    pub snapshot_skipped_records: Gauge,
    /// Seconds the snapshot load took at start.
    pub snapshot_load_seconds: Gauge<f64, AtomicU64>,
    /// Successful reloads of the auth file.
    pub auth_reloads: Counter,
    /// Failed reloads of the auth file (the old configuration stays).
    pub auth_reload_failures: Counter,
    /// Times the allocator's free pages were handed back to the OS because resident memory
    /// drifted above what the node holds.
    pub allocator_trims: Counter,
    /// Open bulk-transport connections.
    pub bulk_connections: Gauge,
    /// Requests served on the bulk transport, by method (they also count in `rpcs`).
    pub bulk_requests: Family<MethodLabels, Counter>,
}

/// Registers clones of the metric handles (they share their values) as `name` with `help`.
macro_rules! register {
    ($registry:expr, $m:expr; $($field:ident: $name:literal, $help:literal;)*) => {
        $( $registry.register($name, $help, $m.$field.clone()); )*
    };
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("kvshare"),
            lookups: Counter::default(),
            lookup_blocks: Counter::default(),
            lookup_hit_blocks: Counter::default(),
            lookup_tokens: Counter::default(),
            lookup_hit_tokens: Counter::default(),
            hits: Counter::default(),
            misses: Counter::default(),
            puts: Family::default(),
            received_bytes: Counter::default(),
            sent_bytes: Counter::default(),
            deletes: Counter::default(),
            rpcs: Family::default(),
            rpc_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            evictions: Counter::default(),
            stored_bytes: Gauge::default(),
            stored_blocks: Gauge::default(),
            stored_raw_bytes: Gauge::default(),
            capacity_bytes: Gauge::default(),
            forwarded: Family::default(),
            peer_requests: Family::default(),
            replica_writes: Family::default(),
            failovers: Counter::default(),
            rereplicated_blocks: Counter::default(),
            under_replicated_blocks: Gauge::default(),
            rebalance_sweeps: Counter::default(),
            peer_up: Family::default(),
            peer_markdowns: Family::default(),
            config_mismatch: Family::default(),
            snapshot_loaded_blocks: Gauge::default(),
            snapshot_loaded_bytes: Gauge::default(),
            snapshot_skipped_records: Gauge::default(),
            snapshot_load_seconds: Gauge::default(),
            auth_reloads: Counter::default(),
            auth_reload_failures: Counter::default(),
            allocator_trims: Counter::default(),
            bulk_connections: Gauge::default(),
            bulk_requests: Family::default(),
        };
        register!(m.registry, m;
            lookups: "lookups", "Lookup RPCs served";
            lookup_blocks: "lookup_blocks", "Block keys asked by client lookups";
            lookup_hit_blocks: "lookup_hit_blocks", "Block keys in the cached prefixes returned by lookups";
            lookup_tokens: "lookup_tokens", "Prompt tokens covered by client lookups";
            lookup_hit_tokens: "lookup_hit_tokens", "Prompt tokens in the cached prefixes returned by lookups";
            hits: "hits", "Blocks found by lookups and gets";
            misses: "misses", "Blocks not found by lookups (first miss) and gets";
            puts: "put_blocks", "Blocks received by Put, by outcome";
            received_bytes: "received_bytes", "Encoded payload bytes received by Put";
            sent_bytes: "sent_bytes", "Encoded payload bytes sent by Get";
            deletes: "deleted_blocks", "Blocks removed by Delete";
            rpcs: "rpcs", "RPCs handled, by method and gRPC status code";
            rpc_duration: "rpc_duration_seconds", "RPC handling time";
            evictions: "evictions", "Blocks evicted to stay under capacity";
            stored_bytes: "stored_bytes", "Bytes stored (payload plus index overhead)";
            stored_blocks: "stored_blocks", "Blocks stored";
            stored_raw_bytes: "stored_raw_bytes", "Raw bytes the stored blocks decode to";
            capacity_bytes: "capacity_bytes", "Configured capacity in bytes";
            forwarded: "forwarded_requests", "Requests sent to peers on behalf of clients, by method";
            peer_requests: "peer_requests", "Requests served from the local store for peers and smart clients";
            replica_writes: "replica_writes", "Block writes to remote replicas, by result";
            failovers: "failovers", "Blocks served by a replica other than the first owner";
            rereplicated_blocks: "rereplicated_blocks", "Blocks copied by re-replication to an owner that lacked them";
            under_replicated_blocks: "under_replicated_blocks", "Local blocks the last re-replication sweep found missing on one of their owners (before copying)";
            rebalance_sweeps: "rebalance_sweeps", "Re-replication sweeps completed";
            peer_up: "peer_up", "Whether a peer is healthy (1) or marked down (0)";
            peer_markdowns: "peer_markdowns", "Times a peer was marked down by failed health checks";
            config_mismatch: "config_mismatch", "Configuration mismatches with peers in force (1 each), by kind (replicas, members, duplicate_node_id) and peer";
            snapshot_loaded_blocks: "snapshot_loaded_blocks", "Blocks loaded from the store snapshot (--data-dir) at start";
            snapshot_loaded_bytes: "snapshot_loaded_bytes", "Payload bytes loaded from the store snapshot at start";
            snapshot_skipped_records: "snapshot_skipped_records", "Snapshot records not loaded at start: damaged, invalid or cut off";
            snapshot_load_seconds: "snapshot_load_seconds", "Time the store snapshot took to load at start";
            auth_reloads: "auth_reloads", "Times the --auth-file was reloaded after a change or SIGHUP";
            auth_reload_failures: "auth_reload_failures", "Reloads of the --auth-file that failed (the previous configuration stays in force)";
            allocator_trims: "allocator_trims", "Times the allocator's free pages were returned to the OS because resident memory drifted above stored bytes plus buffers in use";
            bulk_connections: "bulk_connections", "Open connections on the bulk transport (--bulk-addr)";
            bulk_requests: "bulk_requests", "Get and Put requests served on the bulk transport, by method (also counted in kvshare_rpcs)";
        );
        m
    }

    /// Registers the per-namespace collector: at each scrape, the `top` namespaces of `store` by
    /// bytes and by hits (`kvshare_namespace_stored_bytes`, `kvshare_namespace_blocks`,
    /// `kvshare_namespace_hits`) and the count of all (`kvshare_namespaces`).
    pub fn register_namespaces(&mut self, store: Arc<BlockStore>, top: usize) {
        self.registry
            .register_collector(Box::new(NamespaceCollector {
                store: store.clone(),
                top,
            }));
        self.registry
            .register_collector(Box::new(TenantCollector { store }));
    }

    /// Counts a client's lookup of `keys` blocks of which the first `hit` are cached
    /// (`tokens_per_block` of the namespace, 0 when unknown).
    pub fn count_client_lookup(&self, keys: u64, hit: u64, tokens_per_block: u64) {
        self.lookups.inc();
        self.lookup_blocks.inc_by(keys);
        self.lookup_hit_blocks.inc_by(hit);
        self.lookup_tokens.inc_by(keys * tokens_per_block);
        self.lookup_hit_tokens.inc_by(hit * tokens_per_block);
        self.hits.inc_by(hit);
        if hit < keys {
            self.misses.inc();
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Prometheus text exposition format 0.0.4 (what `promtool check metrics` and plain
    /// scrapers expect): OpenMetrics with counter families named by their `_total` samples and
    /// without the `# EOF` / `# UNIT` lines.
    pub fn encode_prometheus_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }

    /// Records one finished RPC.
    pub fn observe_rpc(&self, method: Method, code: tonic::Code, seconds: f64) {
        self.rpc_duration
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Converts OpenMetrics text to Prometheus text format 0.0.4.
pub fn openmetrics_to_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut pending_help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let family = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some((hname, text)) = pending_help.take()
                && hname == name
            {
                out.push_str(&format!("# HELP {family} {text}\n"));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let m = Metrics::new();
        m.lookups.inc();
        m.observe_rpc(Method::get, tonic::Code::Ok, 0.001);
        let t = m.encode_prometheus_text();
        assert!(
            t.contains("# HELP kvshare_lookups_total Lookup RPCs served"),
            "{t}"
        );
        assert!(
            t.contains("# TYPE kvshare_lookups_total counter\nkvshare_lookups_total 1\n"),
            "{t}"
        );
        assert!(t.contains("# TYPE kvshare_rpc_duration_seconds histogram"));
        assert!(!t.contains("# EOF"));
    }

    #[test]
    fn namespace_collector_lists_only_the_top_namespaces() {
        use kvshare_core::layout::{DType, KvLayout};
        use kvshare_core::{BlockKey, Codec, EncodedBlock, StoreKey};
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            dtype: DType::U8,
            tokens_per_block: 1,
        };
        let store = Arc::new(BlockStore::new(1 << 20));
        for ns in 0..20u8 {
            let namespace = BlockKey([ns; 32]);
            let block = Arc::new(
                EncodedBlock::encode(namespace, layout, Codec::None, &[1, 2]).expect("block"),
            );
            for b in 0..=ns {
                let key = StoreKey {
                    namespace,
                    key: BlockKey([b; 32]),
                };
                store.insert(key, None, block.clone()).expect("insert");
            }
        }
        // Namespace 3 gets the most hits; 19 is the largest.
        store.lookup_prefix(BlockKey([3; 32]), &[BlockKey([0; 32]), BlockKey([1; 32])]);
        let mut m = Metrics::new();
        m.register_namespaces(store, 1);
        let t = m.encode_prometheus_text();
        assert!(t.contains("\nkvshare_namespaces 20\n"), "{t}");
        let largest = format!(
            "kvshare_namespace_blocks{{namespace=\"{}\"}} 20\n",
            "13".repeat(8)
        );
        assert!(t.contains(&largest), "{t}");
        let hit = format!(
            "kvshare_namespace_hits_total{{namespace=\"{}\"}} 2\n",
            "03".repeat(8)
        );
        assert!(t.contains(&hit), "{t}");
        assert!(
            t.contains("# TYPE kvshare_namespace_hits_total counter"),
            "{t}"
        );
        assert_eq!(
            t.matches("kvshare_namespace_stored_bytes{").count(),
            2,
            "{t}"
        );
    }
}

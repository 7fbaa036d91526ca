//! HTTP endpoints: `/metrics`, `/api/stats`, `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Serialize;

use crate::service::NodeState;

/// State shared by the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// The node.
    pub node: Arc<NodeState>,
    /// False once shutdown has begun (readiness fails so load balancers drain the node).
    pub ready: Arc<AtomicBool>,
}

/// JSON body of `/api/stats`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct StatsJson {
    /// Node id.
    pub node_id: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Bytes stored (payload plus index overhead).
    pub stored_bytes: u64,
    /// Blocks stored.
    pub stored_blocks: u64,
    /// Raw bytes the stored blocks decode to.
    pub stored_raw_bytes: u64,
    /// Encoded payload bytes stored.
    pub stored_payload_bytes: u64,
    /// stored_raw_bytes / stored_payload_bytes.
    pub compression_ratio: f64,
    /// Lookup RPCs.
    pub lookups: u64,
    /// Blocks found.
    pub hits: u64,
    /// Blocks not found.
    pub misses: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// Keys asked by client lookups.
    pub lookup_blocks: u64,
    /// Keys in the cached prefixes returned.
    pub lookup_hit_blocks: u64,
    /// lookup_hit_blocks / lookup_blocks.
    pub block_hit_rate: f64,
    /// Tokens covered by client lookups.
    pub lookup_tokens: u64,
    /// Tokens in the cached prefixes returned.
    pub lookup_hit_tokens: u64,
    /// lookup_hit_tokens / lookup_tokens.
    pub token_hit_rate: f64,
    /// Blocks stored by puts.
    pub puts_stored: u64,
    /// Blocks already present.
    pub puts_present: u64,
    /// Blocks rejected.
    pub puts_rejected: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
    /// Blocks deleted.
    pub deletes: u64,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Per-namespace usage, largest first.
    pub namespaces: Vec<NamespaceJson>,
}

/// One namespace in `/api/stats`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct NamespaceJson {
    /// Namespace digest, hex.
    pub namespace: String,
    /// Blocks stored.
    pub blocks: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Hits.
    pub hits: u64,
}

impl StatsJson {
    /// Builds the JSON view of a node's stats.
    pub fn from_node(node: &NodeState) -> Self {
        Self::from_pb(&node.stats())
    }

    /// JSON view of a Stats RPC answer.
    pub fn from_pb(s: &kvshare_proto::v1::StatsResponse) -> Self {
        let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
        StatsJson {
            compression_ratio: ratio(s.stored_raw_bytes, s.stored_payload_bytes),
            hit_rate: ratio(s.hits, s.hits + s.misses),
            lookup_blocks: s.lookup_blocks,
            lookup_hit_blocks: s.lookup_hit_blocks,
            block_hit_rate: ratio(s.lookup_hit_blocks, s.lookup_blocks),
            lookup_tokens: s.lookup_tokens,
            lookup_hit_tokens: s.lookup_hit_tokens,
            token_hit_rate: ratio(s.lookup_hit_tokens, s.lookup_tokens),
            node_id: s.node_id.clone(),
            capacity_bytes: s.capacity_bytes,
            stored_bytes: s.stored_bytes,
            stored_blocks: s.stored_blocks,
            stored_raw_bytes: s.stored_raw_bytes,
            stored_payload_bytes: s.stored_payload_bytes,
            lookups: s.lookups,
            hits: s.hits,
            misses: s.misses,
            puts_stored: s.puts_stored,
            puts_present: s.puts_present,
            puts_rejected: s.puts_rejected,
            evictions: s.evictions,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            deletes: s.deletes,
            uptime_seconds: s.uptime_seconds,
            namespaces: s
                .namespaces
                .iter()
                .map(|n| NamespaceJson {
                    namespace: hex::encode(&n.namespace),
                    blocks: n.blocks,
                    bytes: n.bytes,
                    hits: n.hits,
                })
                .collect(),
        }
    }
}

/// One member in `/api/cluster`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct NodeJson {
    /// Node id (or `unknown@addr` before the first contact).
    pub node_id: String,
    /// gRPC address.
    pub grpc_addr: String,
    /// HTTP address.
    pub http_addr: String,
    /// Whether the answering node's health checks consider it up.
    pub healthy: bool,
    /// Whether its stats could be fetched just now.
    pub reachable: bool,
    /// Why not, when unreachable.
    pub error: Option<String>,
    /// Its stats, when reachable.
    pub stats: Option<StatsJson>,
}

/// Cluster-wide totals in `/api/cluster` (over reachable nodes).
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq, Default)]
pub struct TotalsJson {
    /// Sum of capacities.
    pub capacity_bytes: u64,
    /// Sum of stored bytes.
    pub stored_bytes: u64,
    /// Sum of stored blocks (replicas counted once per copy).
    pub stored_blocks: u64,
    /// Sum of raw bytes stored.
    pub stored_raw_bytes: u64,
    /// Sum of payload bytes stored.
    pub stored_payload_bytes: u64,
    /// stored_raw_bytes / stored_payload_bytes.
    pub compression_ratio: f64,
    /// Client lookups.
    pub lookups: u64,
    /// Keys asked by client lookups.
    pub lookup_blocks: u64,
    /// Keys in returned cached prefixes.
    pub lookup_hit_blocks: u64,
    /// lookup_hit_blocks / lookup_blocks.
    pub block_hit_rate: f64,
    /// Tokens asked by client lookups.
    pub lookup_tokens: u64,
    /// Tokens in returned cached prefixes.
    pub lookup_hit_tokens: u64,
    /// lookup_hit_tokens / lookup_tokens.
    pub token_hit_rate: f64,
    /// Evictions.
    pub evictions: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
}

/// Body of `/api/cluster`: every member's stats, aggregated through one node.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct ClusterJson {
    /// The answering node.
    pub node_id: String,
    /// Replication factor.
    pub replicas: u32,
    /// Every known member.
    pub nodes: Vec<NodeJson>,
    /// Totals over reachable members.
    pub totals: TotalsJson,
    /// Top namespaces by bytes (merged over members).
    pub namespaces_by_bytes: Vec<NamespaceJson>,
    /// Top namespaces by hits.
    pub namespaces_by_hits: Vec<NamespaceJson>,
}

/// Gathers `/api/cluster`: this node's stats plus each peer's `Stats` RPC (1 s deadline each,
/// in parallel).
pub async fn cluster_json(node: &NodeState) -> ClusterJson {
    let peers = node.cluster.peer_clients();
    let fetches = peers.into_iter().map(|(info, client)| async move {
        let mut c = client;
        let mut req = tonic::Request::new(kvshare_proto::v1::StatsRequest {});
        req.set_timeout(std::time::Duration::from_secs(1));
        let r = tokio::time::timeout(std::time::Duration::from_millis(1500), c.stats(req)).await;
        let (stats, error) = match r {
            Ok(Ok(s)) => (Some(StatsJson::from_pb(s.get_ref())), None),
            Ok(Err(e)) => (None, Some(format!("{:?}: {}", e.code(), e.message()))),
            Err(_) => (None, Some("no answer within 1.5 s".to_string())),
        };
        NodeJson {
            node_id: info.node_id,
            grpc_addr: info.grpc_addr,
            http_addr: info.http_addr,
            healthy: info.healthy,
            reachable: stats.is_some(),
            error,
            stats,
        }
    });
    let mut nodes = vec![NodeJson {
        node_id: node.node_id.clone(),
        grpc_addr: node.grpc_addr.clone(),
        http_addr: node.http_addr.clone(),
        healthy: true,
        reachable: true,
        error: None,
        stats: Some(StatsJson::from_node(node)),
    }];
    nodes.extend(futures::future::join_all(fetches).await);
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));

    let mut t = TotalsJson::default();
    let mut ns: std::collections::HashMap<String, NamespaceJson> = std::collections::HashMap::new();
    for s in nodes.iter().filter_map(|n| n.stats.as_ref()) {
        t.capacity_bytes += s.capacity_bytes;
        t.stored_bytes += s.stored_bytes;
        t.stored_blocks += s.stored_blocks;
        t.stored_raw_bytes += s.stored_raw_bytes;
        t.stored_payload_bytes += s.stored_payload_bytes;
        t.lookups += s.lookups;
        t.lookup_blocks += s.lookup_blocks;
        t.lookup_hit_blocks += s.lookup_hit_blocks;
        t.lookup_tokens += s.lookup_tokens;
        t.lookup_hit_tokens += s.lookup_hit_tokens;
        t.evictions += s.evictions;
        t.bytes_in += s.bytes_in;
        t.bytes_out += s.bytes_out;
        for n in &s.namespaces {
            let e = ns
                .entry(n.namespace.clone())
                .or_insert_with(|| NamespaceJson {
                    namespace: n.namespace.clone(),
                    blocks: 0,
                    bytes: 0,
                    hits: 0,
                });
            e.blocks += n.blocks;
            e.bytes += n.bytes;
            e.hits += n.hits;
        }
    }
    let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    t.compression_ratio = ratio(t.stored_raw_bytes, t.stored_payload_bytes);
    t.block_hit_rate = ratio(t.lookup_hit_blocks, t.lookup_blocks);
    t.token_hit_rate = ratio(t.lookup_hit_tokens, t.lookup_tokens);
    let mut all: Vec<NamespaceJson> = ns.into_values().collect();
    all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.namespace.cmp(&b.namespace)));
    let by_bytes: Vec<NamespaceJson> = all.iter().take(10).cloned().collect();
    all.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.namespace.cmp(&b.namespace)));
    let by_hits: Vec<NamespaceJson> = all.into_iter().filter(|n| n.hits > 0).take(10).collect();
    ClusterJson {
        node_id: node.node_id.clone(),
        replicas: node.cluster.replicas(),
        nodes,
        totals: t,
        namespaces_by_bytes: by_bytes,
        namespaces_by_hits: by_hits,
    }
}

/// The dashboard page (embedded in the binary; no CDN, no build step).
pub const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");

async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_HTML,
    )
}

async fn api_cluster(State(st): State<HttpState>) -> Json<ClusterJson> {
    Json(cluster_json(&st.node).await)
}

async fn metrics(State(st): State<HttpState>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let node = &st.node;
    let s = node.store.stats();
    let m = &node.metrics;
    m.stored_bytes.set(s.used_bytes as i64);
    m.stored_blocks.set(s.blocks as i64);
    m.stored_raw_bytes.set(s.raw_bytes as i64);
    m.capacity_bytes.set(s.capacity_bytes as i64);
    // Only current peers: a peer removed from membership (scale-down) leaves no stale series.
    m.peer_up.clear();
    for (peer, up) in node.cluster.peer_health() {
        m.peer_up
            .get_or_create(&crate::metrics::PeerLabels { peer })
            .set(i64::from(up));
    }
    // Prometheus asks for OpenMetrics; everything else (curl, promtool) gets text format 0.0.4.
    let wants_om = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    if wants_om {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            m.encode(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            m.encode_prometheus_text(),
        )
    }
}

async fn api_stats(State(st): State<HttpState>) -> Json<StatsJson> {
    Json(StatsJson::from_node(&st.node))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(st): State<HttpState>) -> impl IntoResponse {
    if st.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    }
}

/// The HTTP router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/api/stats", get(api_stats))
        .route("/api/cluster", get(api_cluster))
        .route("/dashboard", get(dashboard))
        .route(
            "/",
            get(|| async { axum::response::Redirect::temporary("/dashboard") }),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

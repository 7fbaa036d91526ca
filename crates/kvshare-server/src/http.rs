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
        let s = node.stats();
        let payload = s.stored_payload_bytes;
        let lookups_total = s.hits + s.misses;
        StatsJson {
            compression_ratio: if payload > 0 {
                s.stored_raw_bytes as f64 / payload as f64
            } else {
                0.0
            },
            hit_rate: if lookups_total > 0 {
                s.hits as f64 / lookups_total as f64
            } else {
                0.0
            },
            node_id: s.node_id,
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

async fn metrics(State(st): State<HttpState>) -> impl IntoResponse {
    let node = &st.node;
    let s = node.store.stats();
    let m = &node.metrics;
    m.stored_bytes.set(s.used_bytes as i64);
    m.stored_blocks.set(s.blocks as i64);
    m.stored_raw_bytes.set(s.raw_bytes as i64);
    m.capacity_bytes.set(s.capacity_bytes as i64);
    for (peer, up) in node.cluster.peer_health() {
        m.peer_up
            .get_or_create(&crate::metrics::PeerLabels { peer })
            .set(i64::from(up));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
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
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

//! HTTP endpoints: `/dashboard`, `/api/cluster`, `/api/stats`, `/metrics`, `/healthz`,
//! `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::Serialize;

use crate::auth::{Caller, Role};
use crate::state::NodeState;

/// State shared by the HTTP handlers.
#[derive(Clone)]
pub struct HttpState {
    /// The node.
    pub node: Arc<NodeState>,
    /// False once shutdown has begun (readiness fails so load balancers drain the node).
    pub ready: Arc<AtomicBool>,
}

/// Storage figures, in `/api/stats` (one node) and `/api/cluster` totals (summed).
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq, Default)]
#[serde(default)]
pub struct StorageJson {
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Bytes stored (payload plus index overhead).
    pub stored_bytes: u64,
    /// Blocks stored (replicas counted once per copy).
    pub stored_blocks: u64,
    /// Raw bytes the stored blocks decode to.
    pub stored_raw_bytes: u64,
    /// Encoded payload bytes stored.
    pub stored_payload_bytes: u64,
    /// stored_raw_bytes / stored_payload_bytes.
    pub compression_ratio: f64,
}

/// Prefix-lookup figures, in `/api/stats` and `/api/cluster` totals.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq, Default)]
#[serde(default)]
pub struct LookupJson {
    /// Client lookups.
    pub lookups: u64,
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
}

/// Traffic figures, in `/api/stats` and `/api/cluster` totals.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq, Default)]
#[serde(default)]
pub struct TrafficJson {
    /// Blocks evicted.
    pub evictions: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b > 0 { a as f64 / b as f64 } else { 0.0 }
}

/// Figures that add up across nodes: one node's in `/api/stats`, the sum in `/api/cluster`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq, Default)]
pub struct UsageJson {
    /// Storage figures.
    #[serde(flatten)]
    pub storage: StorageJson,
    /// Lookup figures.
    #[serde(flatten)]
    pub lookup: LookupJson,
    /// Traffic figures.
    #[serde(flatten)]
    pub traffic: TrafficJson,
}

/// A configuration mismatch with a peer, in `/api/stats` and `/api/cluster`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct ConfigWarningJson {
    /// `replicas`, `members` or `duplicate_node_id`.
    pub kind: String,
    /// The peer: node id, or `id@address` for a duplicate node id.
    pub peer: String,
    /// What differs and what to change.
    pub message: String,
}

/// The configuration mismatches `node` sees now.
fn config_warnings(node: &NodeState) -> Vec<ConfigWarningJson> {
    node.cluster
        .config_warnings()
        .into_iter()
        .map(|w| ConfigWarningJson {
            kind: w.kind.as_str().into(),
            peer: w.peer,
            message: w.message,
        })
        .collect()
}

/// JSON body of `/api/stats`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct StatsJson {
    /// Node id.
    pub node_id: String,
    /// Storage, lookup and traffic figures.
    #[serde(flatten)]
    pub usage: UsageJson,
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
    /// Blocks deleted.
    pub deletes: u64,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// The top namespaces (the largest by bytes together with those with most hits, as many
    /// as the node's `--stats-top-namespaces`), largest first.
    pub namespaces: Vec<NamespaceJson>,
    /// Namespaces with blocks stored on the node, listed or not.
    #[serde(default)]
    pub namespaces_total: u64,
    /// Configuration mismatches between the node and its peers (empty for a peer's stats
    /// fetched over gRPC).
    #[serde(default)]
    pub config_warnings: Vec<ConfigWarningJson>,
    /// Usage of each tenant (only in `/api/stats`; a caller limited to one tenant sees only
    /// its own).
    #[serde(default)]
    pub tenants: Vec<TenantJson>,
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
        let mut s = Self::from_pb(&node.stats(0));
        s.config_warnings = config_warnings(node);
        s
    }

    /// JSON view of a Stats RPC answer.
    pub fn from_pb(s: &kvshare_proto::v1::StatsResponse) -> Self {
        StatsJson {
            node_id: s.node_id.clone(),
            usage: UsageJson {
                storage: StorageJson {
                    capacity_bytes: s.capacity_bytes,
                    stored_bytes: s.stored_bytes,
                    stored_blocks: s.stored_blocks,
                    stored_raw_bytes: s.stored_raw_bytes,
                    stored_payload_bytes: s.stored_payload_bytes,
                    compression_ratio: 0.0,
                },
                lookup: LookupJson {
                    lookups: s.lookups,
                    lookup_blocks: s.lookup_blocks,
                    lookup_hit_blocks: s.lookup_hit_blocks,
                    block_hit_rate: 0.0,
                    lookup_tokens: s.lookup_tokens,
                    lookup_hit_tokens: s.lookup_hit_tokens,
                    token_hit_rate: 0.0,
                },
                traffic: TrafficJson {
                    evictions: s.evictions,
                    bytes_in: s.bytes_in,
                    bytes_out: s.bytes_out,
                },
            }
            .with_ratios(),
            hits: s.hits,
            misses: s.misses,
            hit_rate: ratio(s.hits, s.hits + s.misses),
            puts_stored: s.puts_stored,
            puts_present: s.puts_present,
            puts_rejected: s.puts_rejected,
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
            namespaces_total: s.namespaces_total,
            config_warnings: Vec::new(),
            tenants: Vec::new(),
        }
    }
}

/// One member in `/api/cluster`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct NodeJson {
    /// Node id (or `unknown@addr` before the first contact).
    pub node_id: String,
    /// Its stats, when reachable.
    pub stats: Option<StatsJson>,
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
    pub totals: UsageJson,
    /// Top namespaces by bytes (merged over members).
    pub namespaces_by_bytes: Vec<NamespaceJson>,
    /// Top namespaces by hits.
    pub namespaces_by_hits: Vec<NamespaceJson>,
    /// Most namespaces stored on one reachable member (a lower bound of the cluster's distinct
    /// namespaces: replicas would make a sum count one namespace several times).
    #[serde(default)]
    pub namespaces_total: u64,
    /// Configuration mismatches the answering node sees between itself and its peers
    /// (replication factor, member lists, duplicate node ids).
    #[serde(default)]
    pub config_warnings: Vec<ConfigWarningJson>,
    /// Usage of each tenant on the answering node (a caller limited to one tenant sees only
    /// its own).
    #[serde(default)]
    pub tenants: Vec<TenantJson>,
    /// How clients are admitted: `tokens` (--auth-file), `protected` (loopback clients only),
    /// `insecure` (--insecure-no-auth: anyone), `local` (loopback listener, no auth).
    #[serde(default)]
    pub auth_mode: String,
}

/// One tenant's usage on a node, in `/api/stats` and `/api/cluster`.
#[derive(Debug, Serialize, serde::Deserialize, Clone, PartialEq)]
pub struct TenantJson {
    /// Tenant name.
    pub tenant: String,
    /// Blocks stored.
    pub blocks: u64,
    /// Bytes stored (payload plus index overhead).
    pub bytes: u64,
    /// Hits.
    pub hits: u64,
    /// Blocks evicted.
    pub evictions: u64,
    /// Quota in bytes, if the tenant has one.
    pub quota_bytes: Option<u64>,
}

/// The tenants of `node` a caller may see (every tenant for admins, peers and when auth is off).
fn tenants_json(node: &NodeState, caller: Option<&Caller>) -> Vec<TenantJson> {
    let only = caller
        .filter(|c| !matches!(c.role, Role::Admin | Role::Peer))
        .map(|c| c.tenant.clone());
    node.store
        .tenant_usage()
        .into_iter()
        .filter(|(name, _)| only.as_ref().is_none_or(|o| o == name))
        .map(|(name, u)| TenantJson {
            tenant: name.to_string(),
            blocks: u.blocks,
            bytes: u.bytes,
            hits: u.hits,
            evictions: u.evictions,
            quota_bytes: u.quota,
        })
        .collect()
}

fn auth_mode(node: &NodeState) -> &'static str {
    let a = &node.auth;
    if a.enabled() {
        "tokens"
    } else if a.protected() {
        "protected"
    } else if a.insecure() {
        "insecure"
    } else {
        "local"
    }
}

/// One peer's entry in `/api/cluster`: its `Stats` RPC (1 s deadline).
async fn peer_json(
    info: kvshare_proto::v1::Member,
    mut client: kvshare_proto::transport::KvClient,
) -> NodeJson {
    let mut req = tonic::Request::new(kvshare_proto::v1::StatsRequest::default());
    req.set_timeout(std::time::Duration::from_secs(1));
    let r = tokio::time::timeout(std::time::Duration::from_millis(1500), client.stats(req)).await;
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
}

impl UsageJson {
    /// Sets the ratios from the counts.
    fn with_ratios(mut self) -> Self {
        let (st, lk) = (&mut self.storage, &mut self.lookup);
        st.compression_ratio = ratio(st.stored_raw_bytes, st.stored_payload_bytes);
        lk.block_hit_rate = ratio(lk.lookup_hit_blocks, lk.lookup_blocks);
        lk.token_hit_rate = ratio(lk.lookup_hit_tokens, lk.lookup_tokens);
        self
    }

    /// Every count summed over `all` (each integer field added by name), ratios recomputed.
    fn sum<'a>(all: impl Iterator<Item = &'a UsageJson>) -> UsageJson {
        let mut sum = serde_json::Map::new();
        for u in all {
            let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(u) else {
                continue;
            };
            for (name, v) in fields {
                if let Some(n) = v.as_u64() {
                    let total = sum.get(&name).and_then(|t| t.as_u64()).unwrap_or(0);
                    sum.insert(name, total.saturating_add(n).into());
                }
            }
        }
        serde_json::from_value::<UsageJson>(serde_json::Value::Object(sum))
            .unwrap_or_default()
            .with_ratios()
    }
}

/// Totals and merged namespaces (top 10 by bytes, top 10 by hits) over reachable nodes.
fn aggregate(nodes: &[NodeJson]) -> (UsageJson, Vec<NamespaceJson>, Vec<NamespaceJson>) {
    let reachable = || nodes.iter().filter_map(|n| n.stats.as_ref());
    let totals = UsageJson::sum(reachable().map(|s| &s.usage));
    let mut ns: std::collections::HashMap<String, NamespaceJson> = std::collections::HashMap::new();
    for n in reachable().flat_map(|s| &s.namespaces) {
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
    let mut all: Vec<NamespaceJson> = ns.into_values().collect();
    all.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.namespace.cmp(&b.namespace)));
    let by_bytes: Vec<NamespaceJson> = all.iter().take(10).cloned().collect();
    all.sort_by(|a, b| b.hits.cmp(&a.hits).then(a.namespace.cmp(&b.namespace)));
    let by_hits: Vec<NamespaceJson> = all.into_iter().filter(|n| n.hits > 0).take(10).collect();
    (totals, by_bytes, by_hits)
}

/// Gathers `/api/cluster`: this node's stats plus each peer's `Stats` RPC (in parallel).
pub async fn cluster_json(node: &NodeState) -> ClusterJson {
    let peers = node.cluster.peer_clients();
    let fetches = peers
        .into_iter()
        .map(|(info, client)| peer_json(info, client));
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
    let (totals, namespaces_by_bytes, namespaces_by_hits) = aggregate(&nodes);
    let namespaces_total = nodes
        .iter()
        .filter_map(|n| n.stats.as_ref())
        .map(|s| s.namespaces_total)
        .max()
        .unwrap_or(0);
    ClusterJson {
        node_id: node.node_id.clone(),
        replicas: node.cluster.replicas(),
        nodes,
        totals,
        namespaces_by_bytes,
        namespaces_by_hits,
        namespaces_total,
        config_warnings: config_warnings(node),
        tenants: Vec::new(),
        auth_mode: auth_mode(node).into(),
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

async fn api_cluster(
    State(st): State<HttpState>,
    caller: Option<axum::Extension<Caller>>,
) -> Json<ClusterJson> {
    let mut c = cluster_json(&st.node).await;
    c.tenants = tenants_json(&st.node, caller.as_ref().map(|c| &c.0));
    Json(c)
}

/// Gate of `/api/*` (and `/metrics` with `--metrics-auth`): protected mode, then a token of
/// any role when auth is on. The caller goes into the request's extensions.
async fn guard(
    State(st): State<HttpState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let remote = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0);
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec());
    match st.node.auth.admit_http(remote, header.as_deref()) {
        Ok(caller) => {
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            next.run(req).await
        }
        Err(s) => {
            let code = match s.code() {
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            let mut r = (code, format!("{}\n", s.message())).into_response();
            if code == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
            }
            r
        }
    }
}

/// `/metrics` with `--metrics-auth`: a token of any role (nothing else: protected mode does
/// not apply to metrics, which Prometheus scrapes from other hosts).
async fn metrics_guard(
    State(st): State<HttpState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if st.node.auth.metrics_auth() {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Err(s) = st.node.auth.authenticate(header) {
            let mut r = (StatusCode::UNAUTHORIZED, format!("{}\n", s.message())).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    next.run(req).await
}

async fn metrics(State(st): State<HttpState>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let node = &st.node;
    // Sizes only: the namespace collector lists the top namespaces itself.
    let s = node.store.stats(0);
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
    m.config_mismatch.clear();
    for w in node.cluster.config_warnings() {
        m.config_mismatch
            .get_or_create(&crate::metrics::MismatchLabels {
                kind: w.kind.as_str().into(),
                peer: w.peer,
            })
            .set(1);
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

async fn api_stats(
    State(st): State<HttpState>,
    caller: Option<axum::Extension<Caller>>,
) -> Json<StatsJson> {
    let mut s = StatsJson::from_node(&st.node);
    s.tenants = tenants_json(&st.node, caller.as_ref().map(|c| &c.0));
    Json(s)
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
    let api = Router::new()
        .route("/api/stats", get(api_stats))
        .route("/api/cluster", get(api_cluster))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    let metrics = Router::new().route("/metrics", get(metrics)).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), metrics_guard),
    );
    Router::new()
        .merge(api)
        .merge(metrics)
        .route("/dashboard", get(dashboard))
        .route(
            "/",
            get(|| async { axum::response::Redirect::temporary("/dashboard") }),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_sums_counts_and_recomputes_ratios() {
        let node = |raw, payload, hit, asked| {
            UsageJson {
                storage: StorageJson {
                    stored_raw_bytes: raw,
                    stored_payload_bytes: payload,
                    compression_ratio: 9.0,
                    ..Default::default()
                },
                lookup: LookupJson {
                    lookup_tokens: asked,
                    lookup_hit_tokens: hit,
                    ..Default::default()
                },
                traffic: TrafficJson {
                    evictions: 1,
                    ..Default::default()
                },
            }
            .with_ratios()
        };
        let (a, b) = (node(300, 100, 1, 4), node(100, 100, 3, 4));
        let t = UsageJson::sum([&a, &b].into_iter());
        assert_eq!(t.storage.stored_raw_bytes, 400);
        assert_eq!(t.storage.compression_ratio, 2.0);
        assert_eq!(t.lookup.token_hit_rate, 0.5);
        assert_eq!(t.traffic.evictions, 2);
        let json = serde_json::to_value(&t).unwrap_or_default();
        assert_eq!(
            json["stored_raw_bytes"], 400,
            "fields are flattened: {json}"
        );
    }
}

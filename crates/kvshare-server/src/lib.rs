//! kvshare-server: one cache node.
//!
//! [`start`] binds the gRPC and HTTP listeners and serves until [`NodeHandle::shutdown`] (or a
//! signal, in the `kvshared` binary). The gRPC side serves `kvshare.v1.KvCache`,
//! `grpc.health.v1.Health` and server reflection (`grpc.reflection.v1` and `v1alpha`); the
//! HTTP side serves `/dashboard`, `/api/cluster`, `/api/stats`, `/metrics`, `/healthz` and
//! `/readyz`.
//!
//! Modules, each depending only on those listed after it: [`service`] (thin gRPC adapter) →
//! [`put`] (the upload state machine) and [`get`] (the streamed Get response) → [`routing`]
//! (fan-out to owners) → [`state`] (the node: store, limits, budget, metrics, cluster) →
//! [`cluster`] (membership, health) ; [`http`] → [`state`]; [`capacity`] (`--capacity auto`,
//! run-time changes) → [`state`]; [`config`] → [`capacity`]; [`accept`] (accept loops, TLS
//! handshakes) → [`conn`], [`tls`] (certificates and their reload); leaves: [`budget`],
//! [`conn`], [`metrics`], [`rejection`], [`request`].

#![warn(missing_docs)]

pub mod accept;
pub mod auth;
pub mod budget;
pub mod bulk;
pub mod capacity;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod get;
pub mod get_wire;
pub mod http;
pub mod metrics;
pub mod put;
pub mod rebalance;
pub mod rejection;
pub mod request;
pub mod routing;
pub mod service;
pub mod state;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use kvshare_core::BlockStore;
use kvshare_core::snapshot;
use kvshare_proto::transport::{
    CONNECTION_WINDOW_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, STREAM_WINDOW_BYTES,
};
use kvshare_proto::v1::kv_cache_server::KvCacheServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use config::ServerConfig;
pub use service::KvCacheService;
pub use state::NodeState;

/// Errors starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// `--capacity auto` found no usable memory limit.
    #[error(transparent)]
    Capacity(#[from] capacity::CapacityError),
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Transport(#[source] tonic::transport::Error),
    /// Reflection service setup failed.
    #[error("setting up server reflection failed")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// The HTTP server failed.
    #[error("HTTP server failed")]
    Http(#[source] std::io::Error),
    /// The data directory cannot be created.
    #[error("cannot create the data directory {path}")]
    DataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The store snapshot could not be written at shutdown.
    #[error("writing the store snapshot failed")]
    Snapshot(#[source] kvshare_core::snapshot::SnapshotError),
    /// The TLS files do not load.
    #[error("TLS: {0}")]
    Tls(#[from] kvshare_proto::tls::TlsError),
    /// The auth file or the peer token is unusable.
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    /// The port file could not be written.
    #[error("cannot write the port file {path}")]
    PortFile {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running node.
pub struct NodeHandle {
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Bound bulk-transport address, when on.
    pub bulk_addr: Option<SocketAddr>,
    /// Shared state (store, metrics).
    pub state: Arc<NodeState>,
    shutdown: watch::Sender<bool>,
    grpc_task: JoinHandle<Result<(), tonic::transport::Error>>,
    http_task: JoinHandle<Result<(), std::io::Error>>,
    ready: Arc<AtomicBool>,
    data_dir: Option<PathBuf>,
    tls: Option<Arc<tls::NodeTls>>,
    /// The bulk transport's threads (stopped when the handle is dropped).
    _bulk_runtime: Option<bulk::BulkRuntime>,
}

impl NodeHandle {
    /// Stops accepting requests, lets in-flight ones finish (at most `drain`), then, with
    /// `--data-dir`, writes the store snapshot, and returns.
    pub async fn shutdown(self, drain: Duration) -> Result<(), ServerError> {
        self.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        let wait = async {
            let g = self.grpc_task.await;
            let h = self.http_task.await;
            (g, h)
        };
        let served = match tokio::time::timeout(drain, wait).await {
            Ok((g, h)) => match (g, h) {
                (Ok(Err(e)), _) => Err(ServerError::Transport(e)),
                (_, Ok(Err(e))) => Err(ServerError::Http(e)),
                _ => Ok(()),
            },
            Err(_) => {
                tracing::warn!(?drain, "drain timed out; exiting with requests in flight");
                Ok(())
            }
        };
        if let Some(dir) = self.data_dir {
            save_snapshot(self.state.store.clone(), dir).await?;
        }
        served
    }

    /// gRPC endpoint URL (`http://ip:port`, `https://` with TLS).
    pub fn endpoint(&self) -> String {
        kvshare_proto::transport::endpoint_url(&self.grpc_addr.to_string(), self.tls.is_some())
    }

    /// The node's TLS state, when TLS is on.
    pub fn tls(&self) -> Option<&Arc<tls::NodeTls>> {
        self.tls.as_ref()
    }

    /// Re-reads the TLS files now (what SIGHUP does): new connections use the new
    /// certificates. Without TLS, does nothing and returns false. On error the running
    /// certificates stay.
    pub fn reload_tls(&self) -> Result<bool, ServerError> {
        match &self.tls {
            Some(t) => t.reload().map(|()| true).map_err(ServerError::Tls),
            None => Ok(false),
        }
    }
}

/// Writes the store snapshot to `dir` (off the async runtime) and logs what it wrote.
async fn save_snapshot(store: Arc<BlockStore>, dir: PathBuf) -> Result<(), ServerError> {
    let t0 = Instant::now();
    let path = snapshot::snapshot_path(&dir);
    let r = tokio::task::spawn_blocking(move || snapshot::save_to_dir(&store, &dir))
        .await
        .map_err(|e| {
            ServerError::Snapshot(snapshot::SnapshotError::Io(std::io::Error::other(e)))
        })?;
    match r {
        Ok(r) => {
            let secs = t0.elapsed().as_secs_f64();
            info!(
                path = %path.display(),
                blocks = r.blocks,
                bytes = r.file_bytes,
                seconds = secs,
                mb_per_s = r.file_bytes as f64 / 1e6 / secs.max(1e-9),
                "store snapshot written"
            );
            Ok(())
        }
        Err(e) => {
            error!(path = %path.display(), error = %e, "writing the store snapshot failed");
            Err(ServerError::Snapshot(e))
        }
    }
}

/// Loads the store snapshot from `dir` if there is one (off the async runtime), deletes it,
/// and records what it loaded in the logs and metrics. Never fails the start: an unusable
/// snapshot is logged and the node starts with what it could load.
async fn load_snapshot(state: &NodeState, dir: PathBuf) {
    let t0 = Instant::now();
    let path = snapshot::snapshot_path(&dir);
    let store = state.store.clone();
    let limits = snapshot::SnapshotLimits {
        max_block_size: state.limits.max_block_size,
    };
    let r =
        tokio::task::spawn_blocking(move || snapshot::load_from_dir(&store, &dir, limits)).await;
    let secs = t0.elapsed().as_secs_f64();
    let m = &state.metrics;
    m.snapshot_load_seconds.set(secs);
    match r {
        Ok(Ok(Some(r))) => {
            m.snapshot_loaded_blocks.set(r.loaded_blocks as i64);
            m.snapshot_loaded_bytes.set(r.loaded_bytes as i64);
            m.snapshot_skipped_records.set(r.skipped_records as i64);
            if r.skipped_records > 0 {
                warn!(
                    path = %path.display(),
                    skipped = r.skipped_records,
                    "store snapshot had damaged or missing records; they were skipped"
                );
            }
            info!(
                path = %path.display(),
                blocks = r.loaded_blocks,
                bytes = r.loaded_bytes,
                skipped = r.skipped_records,
                over_capacity = r.over_capacity,
                seconds = secs,
                mb_per_s = r.loaded_bytes as f64 / 1e6 / secs.max(1e-9),
                "store snapshot loaded"
            );
        }
        Ok(Ok(None)) => info!(path = %path.display(), "no store snapshot to load"),
        Ok(Err(e)) => {
            warn!(path = %path.display(), error = %e, "store snapshot unusable; starting empty")
        }
        Err(e) => warn!(error = %e, "loading the store snapshot failed; starting empty"),
    }
}

/// Addresses the node tells peers and clients to use.
struct Advertised {
    grpc: String,
    http: String,
    /// The bulk transport's port (on the gRPC address' host), 0 when off.
    bulk_port: u16,
}

/// Addresses to advertise: `--advertise-addr`, else the bound address (the node id as host
/// when bound to an unspecified address, as in a Kubernetes StatefulSet).
fn advertised(
    config: &ServerConfig,
    node_id: &str,
    grpc: SocketAddr,
    http: SocketAddr,
) -> Advertised {
    let grpc_adv = config.advertise_addr.clone().unwrap_or_else(|| {
        if grpc.ip().is_unspecified() {
            format!("{}:{}", node_id, grpc.port())
        } else {
            grpc.to_string()
        }
    });
    let http_adv = if http.ip().is_unspecified() {
        let host = grpc_adv
            .rsplit_once(':')
            .map_or(grpc_adv.as_str(), |(h, _)| h);
        format!("{host}:{}", http.port())
    } else {
        http.to_string()
    };
    Advertised {
        grpc: grpc_adv,
        http: http_adv,
        bulk_port: 0,
    }
}

fn cluster_config(
    config: &ServerConfig,
    peer_token: kvshare_proto::transport::BearerToken,
    tls: Option<kvshare_proto::transport::ClientTls>,
) -> cluster::ClusterConfig {
    cluster::ClusterConfig {
        peer_token,
        peers: config
            .peers
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
        peers_dns: config.peers_dns.clone(),
        replicas: config.replicas,
        health_interval: Duration::from_millis(config.peer_health_interval_ms.max(10)),
        health_timeout: Duration::from_millis(config.peer_health_timeout_ms.max(10)),
        failure_threshold: config.peer_failure_threshold.max(1),
        forward_timeout: Duration::from_millis(config.forward_timeout_ms.max(10)),
        hedge_after: Duration::from_millis(config.hedge_after_ms.max(1)),
        dns_interval: Duration::from_millis(config.dns_interval_ms.max(100)),
        tls,
    }
}

fn node_state(
    config: &ServerConfig,
    capacity: u64,
    node_id: String,
    addrs: Advertised,
    cluster: Arc<cluster::Cluster>,
    mut metrics: metrics::Metrics,
    auth: Arc<auth::Auth>,
) -> NodeState {
    let stats_top_namespaces = config
        .stats_top_namespaces
        .clamp(1, state::MAX_STATS_TOP_NAMESPACES);
    let store = Arc::new(BlockStore::new(capacity));
    metrics.register_namespaces(store.clone(), stats_top_namespaces as usize);
    NodeState {
        node_id,
        store,
        metrics,
        limits: state::Limits {
            max_block_size: config.max_block_size,
            get_chunk_size: config
                .get_chunk_size
                .clamp(4096, (MAX_MESSAGE_BYTES - (1 << 20)) as u64)
                as usize,
            max_keys: config.max_keys.max(1),
            stream_idle_timeout: Duration::from_millis(config.stream_idle_timeout_ms.max(1)),
            put_min_rate: config.put_min_rate.max(1),
            stats_top_namespaces,
        },
        grpc_addr: addrs.grpc,
        http_addr: addrs.http,
        bulk_port: addrs.bulk_port,
        started: Instant::now(),
        budget: budget::MemoryBudget::new(
            config.buffer_budget,
            Duration::from_millis(config.budget_wait_ms),
        ),
        cluster,
        auth,
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Interval of HTTP/2 pings on an idle gRPC connection (a peer that stopped answering is
/// dropped, with its streams and buffers).
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered.
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How often the recency of lookups' and gets' hits is applied to the store's LRU order.
const READ_RECENCY_INTERVAL: Duration = Duration::from_millis(5);

/// Applies the hits readers buffered to the store's LRU order every few milliseconds, on a
/// blocking thread (in batches, so writers never wait long), until `shutdown`. Lookups and Gets
/// never take the store's lock themselves.
async fn apply_read_recency(store: Arc<BlockStore>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(READ_RECENCY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            _ = tick.tick() => {}
        }
        if store.buffered_reads() > 0 {
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.apply_buffered_reads()).await;
        }
    }
}

/// Serves gRPC (KvCache, health, reflection v1 and v1alpha) on `listener` until `shutdown`.
async fn spawn_grpc(
    listener: TcpListener,
    state: Arc<NodeState>,
    config: &ServerConfig,
    tls: Option<Arc<tls::NodeTls>>,
    limit: conn::ConnectionLimit,
    mut shutdown: watch::Receiver<bool>,
) -> Result<
    (
        JoinHandle<Result<(), tonic::transport::Error>>,
        KvCacheService,
    ),
    ServerError,
> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<KvCacheServer<KvCacheService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kvshare_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(ServerError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServerError::Reflection)?;
    let request_timeout = state.limits.stream_idle_timeout;
    let service = KvCacheService::new(state);
    let kv = get_wire::ZeroCopyGet::new(
        KvCacheServer::new(service.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        service.clone(),
        request_timeout,
    );
    // Small messages (lookups, headers) must not wait for Nagle's algorithm and delayed ACKs
    // (40 ms stalls): the accept loop disables it on every accepted connection. (The builder's
    // tcp_nodelay only applies to listeners tonic binds itself.)
    let incoming = accept::grpc_incoming(listener, limit, tls);
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(config.max_streams_per_connection.max(1)))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .layer(tower::util::MapResponseLayer::new(
            conn::message_too_large_is_exhausted,
        ))
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(kv)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.wait_for(|v| *v).await;
            health_reporter
                .set_not_serving::<KvCacheServer<KvCacheService>>()
                .await;
        });
    Ok((tokio::spawn(server), service))
}

/// Serves the HTTP endpoints on `listener` until `shutdown` (over TLS with `tls`).
fn spawn_http(
    listener: TcpListener,
    state: http::HttpState,
    tls: Option<(Arc<tls::NodeTls>, Duration)>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<Result<(), std::io::Error>>, ServerError> {
    let app = http::router(state);
    let stop = async move {
        let _ = shutdown.wait_for(|v| *v).await;
    };
    Ok(match tls {
        // Connect info: the client's address, for protected mode.
        None => tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(stop)
            .await
        }),
        Some((tls, handshake_timeout)) => {
            let addr = listener.local_addr().ok();
            let listener = accept::HttpTlsListener::new(listener, tls.clone(), handshake_timeout)
                .map_err(|source| ServerError::Bind {
                addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })?;
            // The client's address (protected mode) and, under mTLS, the client-certificate
            // rule, from the TLS connection's info.
            let app = app.layer(axum::middleware::from_fn_with_state(
                tls.requires_client_cert(),
                accept::tls_http_gate,
            ));
            tokio::spawn(async move {
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<accept::HttpPeer>(),
                )
                .with_graceful_shutdown(stop)
                .await
            })
        }
    })
}

/// Logs how clients are admitted (a warning at every start with `--insecure-no-auth`).
fn log_auth_mode(auth: &auth::Auth, config: &ServerConfig, peer_token: bool) {
    if auth.enabled() {
        info!(auth_file = ?config.auth_file, peer_token, "auth on: clients need a bearer token");
    } else if auth.insecure() {
        warn!(
            "--insecure-no-auth: no --auth-file, and clients from any address are served; anyone who can reach this node can read, overwrite and delete every block"
        );
    } else if auth.protected() {
        warn!(
            "protected mode: no --auth-file and a non-loopback listen address, so only clients on loopback are served; start with --auth-file PATH, or --insecure-no-auth"
        );
    }
}

/// Binds listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<NodeHandle, ServerError> {
    let (capacity, memory_limit) = config.resolved_capacity()?;
    if capacity == 0 {
        return Err(ServerError::Config("--capacity must be > 0".into()));
    }
    if capacity > capacity::MAX_CAPACITY_BYTES {
        return Err(ServerError::Config(format!(
            "--capacity {capacity} is above the limit of {} bytes (64 TiB); check the unit",
            capacity::MAX_CAPACITY_BYTES
        )));
    }
    if let Some(limit) = memory_limit {
        info!(
            memory_limit = limit,
            buffer_budget = config.buffer_budget,
            headroom = capacity::RUNTIME_HEADROOM_BYTES,
            capacity,
            "--capacity auto: capacity = memory limit - buffer budget - runtime headroom"
        );
    }
    let tls = config.tls_files().map(tls::NodeTls::load).transpose()?;
    if let Some(t) = &tls {
        let has_peers =
            config.peers_dns.is_some() || config.peers.iter().any(|p| !p.trim().is_empty());
        if has_peers && t.peer_tls().is_none() {
            return Err(ServerError::Config(
                "TLS with peers needs --tls-ca (or --tls-client-ca) to verify the peers' certificates".into(),
            ));
        }
        info!(
            cert = %t.files().cert.display(),
            mtls = t.requires_client_cert(),
            "TLS on the gRPC and HTTP ports"
        );
    }
    let peer_tls = tls
        .as_ref()
        .and_then(|t| t.peer_tls())
        .map(|p| p.with_server_name(config.tls_peer_name.as_deref()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_rx_for_auth = shutdown_rx.clone();
    let grpc_listener = bind(config.grpc_addr).await?;
    let http_listener = bind(config.http_addr).await?;
    let local = |l: &TcpListener, addr| {
        l.local_addr()
            .map_err(|source| ServerError::Bind { addr, source })
    };
    let grpc_addr = local(&grpc_listener, config.grpc_addr)?;
    let http_addr = local(&http_listener, config.http_addr)?;
    let bulk_listener = match config.bulk_addr {
        config::BulkAddr::Off => None,
        config::BulkAddr::Auto => Some(bind(SocketAddr::new(grpc_addr.ip(), 0)).await?),
        config::BulkAddr::At(a) => Some(bind(a).await?),
    };
    let bulk_addr = match &bulk_listener {
        Some(l) => Some(local(l, config.grpc_addr)?),
        None => None,
    };
    let node_id = config.resolved_node_id();
    let addrs = Advertised {
        bulk_port: bulk_addr.map_or(0, |a| a.port()),
        ..advertised(&config, &node_id, grpc_addr, http_addr)
    };
    let metrics = metrics::Metrics::new();
    let auth = Arc::new(auth::Auth::new(
        config.auth_file.as_deref(),
        config.insecure_no_auth,
        config.metrics_auth,
        &[Some(grpc_addr), Some(http_addr), bulk_addr]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>(),
    )?);
    let peer_token = auth::peer_token(
        config.peer_token_file.as_deref(),
        config
            .peer_token
            .as_ref()
            .map(kvshare_proto::transport::Secret::expose),
    )?;
    log_auth_mode(&auth, &config, peer_token.is_set());
    let cluster = cluster::Cluster::new(
        node_id.clone(),
        addrs.grpc.clone(),
        addrs.http.clone(),
        cluster_config(&config, peer_token.clone(), peer_tls),
        metrics.peer_markdowns.clone(),
    );
    let state = Arc::new(node_state(
        &config,
        capacity,
        node_id.clone(),
        addrs,
        cluster.clone(),
        metrics,
        auth.clone(),
    ));
    // Quotas hold from the first block on, snapshot included.
    auth.apply_quotas(&state.store);
    {
        let st = state.clone();
        let shutdown = shutdown_rx_for_auth.clone();
        tokio::spawn(async move {
            let a = st.auth.clone();
            a.watch(|| _ = st.auth.reload(&st.store, &st.metrics), shutdown)
                .await
        });
    }

    if let Some(dir) = &config.data_dir {
        std::fs::create_dir_all(dir).map_err(|source| ServerError::DataDir {
            path: dir.clone(),
            source,
        })?;
    }

    // Not ready until the snapshot is loaded; /healthz answers meanwhile.
    let ready = Arc::new(AtomicBool::new(false));
    let http_state = http::HttpState {
        node: state.clone(),
        ready: ready.clone(),
    };
    let handshake_timeout = Duration::from_millis(config.handshake_timeout_ms.max(1));
    let http_task = spawn_http(
        http_listener,
        http_state,
        tls.clone().map(|t| (t, handshake_timeout)),
        shutdown_rx.clone(),
    )?;
    if let Some(t) = &tls {
        t.clone().spawn_watcher(
            Duration::from_millis(config.tls_reload_interval_ms.max(10)),
            shutdown_rx.clone(),
        );
    }
    // The gRPC listener is bound, but requests are served only once the snapshot is loaded:
    // connections wait in the backlog, and peers see the node down until then.
    if let Some(dir) = &config.data_dir {
        load_snapshot(&state, dir.clone()).await;
    }
    // Health checks on their own thread and runtime (their connections are made there too): a
    // saturated data path cannot starve them. One round of discovery and checks completes
    // before serving: a restarted node's first answers (ClusterInfo to smart clients, forwarded
    // requests) must not describe a cluster of one, which would make it the owner of every key.
    cluster.clone().spawn_health_thread(shutdown_rx.clone());
    let first_round =
        Duration::from_millis(config.peer_health_timeout_ms.max(10)) * 2 + Duration::from_secs(1);
    cluster.first_round_done(first_round).await;
    let limit = conn::ConnectionLimit::new(
        config.max_connections,
        Duration::from_millis(config.handshake_timeout_ms.max(1)),
    );
    let (grpc_task, service) = spawn_grpc(
        grpc_listener,
        state.clone(),
        &config,
        tls.clone(),
        limit.clone(),
        shutdown_rx.clone(),
    )
    .await?;
    let bulk_runtime = match bulk_listener {
        Some(l) => {
            let threads = std::thread::available_parallelism().map_or(2, usize::from);
            let rt = bulk::BulkRuntime::new(threads, config.bulk_priority).map_err(|source| {
                ServerError::Bind {
                    addr: bulk_addr.unwrap_or(config.grpc_addr),
                    source,
                }
            })?;
            bulk::spawn(&rt, l, service, limit, tls.clone(), shutdown_rx.clone()).map_err(
                |source| ServerError::Bind {
                    addr: bulk_addr.unwrap_or(config.grpc_addr),
                    source,
                },
            )?;
            Some(rt)
        }
        None => None,
    };
    let rebalance = rebalance::RebalanceConfig {
        after_down: Duration::from_millis(config.rereplicate_after_ms),
        interval: Duration::from_millis(config.rebalance_interval_ms.max(1_000)),
        rate: config.rereplicate_rate.max(1),
    };
    tokio::spawn(apply_read_recency(state.store.clone(), shutdown_rx.clone()));
    tokio::spawn(capacity::keep_resident_memory_bounded(
        state.clone(),
        shutdown_rx.clone(),
    ));
    tokio::spawn(rebalance::run(state.clone(), rebalance, shutdown_rx));
    ready.store(true, Ordering::Release);

    if let Some(path) = &config.port_file {
        let body = serde_json::json!({ "grpc": grpc_addr.to_string(), "http": http_addr.to_string(), "bulk": bulk_addr.map(|a| a.to_string()), "node_id": node_id });
        std::fs::write(path, body.to_string()).map_err(|source| ServerError::PortFile {
            path: path.clone(),
            source,
        })?;
    }
    info!(%node_id, grpc = %grpc_addr, http = %http_addr, bulk = ?bulk_addr, capacity, "kvshare node listening");
    Ok(NodeHandle {
        grpc_addr,
        http_addr,
        bulk_addr,
        state,
        shutdown: shutdown_tx,
        grpc_task,
        http_task,
        ready,
        data_dir: config.data_dir.clone(),
        tls,
        _bulk_runtime: bulk_runtime,
    })
}

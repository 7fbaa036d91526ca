//! kvshare-server: one cache node.
//!
//! [`start`] binds the gRPC and HTTP listeners and serves until [`NodeHandle::shutdown`] (or a
//! signal, in the `kvshared` binary). The gRPC side serves `kvshare.v1.KvCache`,
//! `grpc.health.v1.Health` and server reflection; the HTTP side serves `/metrics`,
//! `/api/stats`, `/healthz` and `/readyz`.

#![warn(missing_docs)]

pub mod cluster;
pub mod config;
pub mod http;
pub mod metrics;
mod put;
mod routing;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvshare_core::BlockStore;
use kvshare_proto::v1::kv_cache_server::KvCacheServer;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

pub use config::ServerConfig;
pub use service::{KvCacheService, NodeState};

/// Largest gRPC message a node accepts or sends: a 64 MiB block chunk plus framing.
pub const MAX_MESSAGE_BYTES: usize = 80 << 20;

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
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection service setup failed.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// I/O error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A running node.
pub struct NodeHandle {
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound HTTP address.
    pub http_addr: SocketAddr,
    /// Shared state (store, metrics).
    pub state: Arc<NodeState>,
    shutdown: watch::Sender<bool>,
    grpc_task: JoinHandle<Result<(), tonic::transport::Error>>,
    http_task: JoinHandle<Result<(), std::io::Error>>,
    ready: Arc<AtomicBool>,
}

impl NodeHandle {
    /// Stops accepting requests, lets in-flight ones finish (at most `drain`), and waits.
    pub async fn shutdown(self, drain: Duration) -> Result<(), ServerError> {
        self.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        let wait = async {
            let g = self.grpc_task.await;
            let h = self.http_task.await;
            (g, h)
        };
        match tokio::time::timeout(drain, wait).await {
            Ok((g, h)) => {
                if let Ok(Err(e)) = g {
                    return Err(e.into());
                }
                if let Ok(Err(e)) = h {
                    return Err(e.into());
                }
                Ok(())
            }
            Err(_) => {
                tracing::warn!(?drain, "drain timed out; exiting with requests in flight");
                Ok(())
            }
        }
    }

    /// gRPC endpoint URL (`http://ip:port`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }
}

/// Binds listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<NodeHandle, ServerError> {
    if config.capacity == 0 {
        return Err(ServerError::Config("--capacity must be > 0".into()));
    }
    let grpc_listener = TcpListener::bind(config.grpc_addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.grpc_addr,
            source,
        })?;
    let http_listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.http_addr,
            source,
        })?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let node_id = config.resolved_node_id();

    let advertise = config.advertise_addr.clone().unwrap_or_else(|| {
        if grpc_addr.ip().is_unspecified() {
            format!("{}:{}", node_id, grpc_addr.port())
        } else {
            grpc_addr.to_string()
        }
    });
    let http_advertise = if http_addr.ip().is_unspecified() {
        format!(
            "{}:{}",
            advertise
                .rsplit_once(':')
                .map_or(advertise.as_str(), |(h, _)| h),
            http_addr.port()
        )
    } else {
        http_addr.to_string()
    };
    let cluster = cluster::Cluster::new(
        node_id.clone(),
        advertise.clone(),
        http_advertise.clone(),
        cluster::ClusterConfig {
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
            dns_interval: Duration::from_millis(config.dns_interval_ms.max(100)),
        },
    );
    let inflight_kib = (config.max_inflight_put / 1024).clamp(1, u64::from(u32::MAX >> 3)) as u32;
    let state = Arc::new(NodeState {
        node_id: node_id.clone(),
        store: BlockStore::new(config.capacity),
        metrics: metrics::Metrics::new(),
        max_block_size: config.max_block_size,
        get_chunk_size: config
            .get_chunk_size
            .clamp(4096, (MAX_MESSAGE_BYTES - (1 << 20)) as u64) as usize,
        max_keys: config.max_keys.max(1),
        grpc_addr: advertise,
        http_addr: http_advertise,
        started: Instant::now(),
        inflight: Arc::new(Semaphore::new(inflight_kib as usize)),
        put_wait: Duration::from_millis(config.put_wait_ms),
        inflight_kib,
        cluster: cluster.clone(),
    });

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<KvCacheServer<KvCacheService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kvshare_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let kv = KvCacheServer::new(KvCacheService::new(state.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let ready = Arc::new(AtomicBool::new(true));

    // Small messages (lookups, headers) must not wait for Nagle's algorithm and delayed ACKs
    // (40 ms stalls): disable it on every accepted connection. (The builder's tcp_nodelay only
    // applies to listeners tonic binds itself.)
    let incoming = TcpListenerStream::new(grpc_listener).map(|conn| {
        if let Ok(s) = &conn {
            let _ = s.set_nodelay(true);
        }
        conn
    });
    let mut grpc_rx = shutdown_rx.clone();
    let reporter = health_reporter.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .max_frame_size(Some(1 << 20))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(kv)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = grpc_rx.wait_for(|v| *v).await;
                reporter
                    .set_not_serving::<KvCacheServer<KvCacheService>>()
                    .await;
            }),
    );
    tokio::spawn(cluster.run(shutdown_rx.clone()));
    let mut http_rx = shutdown_rx;
    let app = http::router(http::HttpState {
        node: state.clone(),
        ready: ready.clone(),
    });
    let http_task = tokio::spawn(async move {
        axum::serve(http_listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_rx.wait_for(|v| *v).await;
            })
            .await
    });

    if let Some(path) = &config.port_file {
        let body = serde_json::json!({ "grpc": grpc_addr.to_string(), "http": http_addr.to_string(), "node_id": node_id });
        std::fs::write(path, body.to_string())?;
    }
    info!(%node_id, grpc = %grpc_addr, http = %http_addr, capacity = config.capacity, "kvshare node listening");
    Ok(NodeHandle {
        grpc_addr,
        http_addr,
        state,
        shutdown: shutdown_tx,
        grpc_task,
        http_task,
        ready,
    })
}

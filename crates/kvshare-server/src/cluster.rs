//! Cluster membership, peer health and placement as seen by one node.
//!
//! Members are this node plus its peers: a static `--peers` list, or the addresses a DNS name
//! (`--peers-dns`, a Kubernetes headless Service) resolves to, re-resolved periodically. Each
//! node health-checks every peer with `grpc.health.v1` and learns its stable node id through
//! `ClusterInfo`. A peer that fails `failure_threshold` checks in a row (or forwarded requests)
//! is marked down and leaves the placement view; it comes back when it answers again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvshare_core::placement::{Placed, PlacementView};
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;
use parking_lot::RwLock;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tracing::{info, warn};

use kvshare_proto::transport;

/// Cluster settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Static peer addresses (`host:port` of their gRPC listeners).
    pub peers: Vec<String>,
    /// DNS name and port resolving to every node (`name:port`), re-resolved periodically.
    pub peers_dns: Option<String>,
    /// Replication factor; `None` picks 2 when there are peers, else 1.
    pub replicas: Option<usize>,
    /// Interval between health checks of each peer.
    pub health_interval: Duration,
    /// Deadline of one health check, and of connecting to a peer.
    pub health_timeout: Duration,
    /// Consecutive failures that mark a peer down.
    pub failure_threshold: u32,
    /// Deadline of a request forwarded to a peer.
    pub forward_timeout: Duration,
    /// How long a read waits for an owner before it also asks the next one.
    pub hedge_after: Duration,
    /// Interval between DNS resolutions.
    pub dns_interval: Duration,
}

/// How to reach a member.
#[derive(Clone)]
pub enum Target {
    /// This node.
    Local,
    /// A peer, over a shared channel.
    Remote(KvCacheClient<Channel>),
}

/// A live member in the placement view.
#[derive(Clone)]
pub struct Member {
    /// Stable node id.
    pub node_id: String,
    /// How to reach it.
    pub target: Target,
}

impl Placed for Member {
    fn node_id(&self) -> &str {
        &self.node_id
    }
}

/// The live members (this node included), sorted by node id, and the replication factor.
pub type View = PlacementView<Member>;

struct Peer {
    addr: String,
    node_id: Option<String>,
    http_addr: String,
    healthy: bool,
    failures: u32,
    last_seen: Option<Instant>,
    channel: Channel,
    from_dns: bool,
}

impl Peer {
    /// A peer at `addr` not yet contacted.
    fn new(addr: String, channel: Channel, from_dns: bool) -> Self {
        Peer {
            addr,
            node_id: None,
            http_addr: String::new(),
            healthy: false,
            failures: 0,
            last_seen: None,
            channel,
            from_dns,
        }
    }

    /// Node id, or `unknown@addr` before the first contact.
    fn display_id(&self) -> String {
        self.node_id
            .clone()
            .unwrap_or_else(|| format!("unknown@{}", self.addr))
    }

    /// The peer as `ClusterInfo` reports it.
    fn member(&self) -> pb::Member {
        pb::Member {
            node_id: self.display_id(),
            grpc_addr: self.addr.clone(),
            http_addr: self.http_addr.clone(),
            healthy: self.healthy,
            last_seen_seconds_ago: self.last_seen.map_or(u64::MAX, |t| t.elapsed().as_secs()),
        }
    }
}

/// Cluster state of one node.
pub struct Cluster {
    /// This node's id.
    pub self_id: String,
    self_grpc: String,
    self_http: String,
    config: ClusterConfig,
    peers: RwLock<Vec<Peer>>,
    view: RwLock<Arc<View>>,
}

fn lazy_channel(addr: &str, timeout: Duration) -> Option<Channel> {
    let ep = Endpoint::from_shared(format!("http://{addr}")).ok()?;
    Some(transport::tune_endpoint(ep, timeout).connect_lazy())
}

impl Cluster {
    /// Membership for a node with the given identity and configuration.
    pub fn new(
        self_id: String,
        self_grpc: String,
        self_http: String,
        config: ClusterConfig,
    ) -> Arc<Self> {
        let peers = config
            .peers
            .iter()
            .filter(|a| **a != self_grpc)
            .filter_map(|a| {
                lazy_channel(a, config.health_timeout).map(|ch| Peer::new(a.clone(), ch, false))
            })
            .collect();
        let c = Arc::new(Cluster {
            self_id,
            self_grpc,
            self_http,
            config,
            peers: RwLock::new(peers),
            view: RwLock::new(Arc::new(View::new(Vec::new(), 1))),
        });
        c.rebuild_view();
        c
    }

    /// The current placement view (cheap: an `Arc`).
    pub fn view(&self) -> Arc<View> {
        self.view.read().clone()
    }

    /// Replication factor in force for a cluster of `n` configured members.
    fn replicas_for(&self, n: usize) -> usize {
        self.config
            .replicas
            .unwrap_or(if n >= 2 { 2 } else { 1 })
            .max(1)
    }

    fn rebuild_view(&self) {
        let peers = self.peers.read();
        let configured = 1 + peers.iter().filter(|p| !self.is_self(p)).count();
        let mut members: Vec<Member> = vec![Member {
            node_id: self.self_id.clone(),
            target: Target::Local,
        }];
        for p in peers.iter() {
            if let (true, Some(id)) = (p.healthy, &p.node_id)
                && *id != self.self_id
                && !members.iter().any(|m| m.node_id == *id)
            {
                members.push(Member {
                    node_id: id.clone(),
                    target: Target::Remote(transport::kv_client(p.channel.clone())),
                });
            }
        }
        let replicas = self.replicas_for(configured);
        *self.view.write() = Arc::new(View::new(members, replicas));
    }

    /// Whether a configured peer is this node itself (recognised by its id).
    fn is_self(&self, p: &Peer) -> bool {
        p.node_id.as_deref() == Some(&self.self_id)
    }

    /// Every known member with its health, for `ClusterInfo`.
    pub fn members_info(&self) -> Vec<pb::Member> {
        let mut out = vec![pb::Member {
            node_id: self.self_id.clone(),
            grpc_addr: self.self_grpc.clone(),
            http_addr: self.self_http.clone(),
            healthy: true,
            last_seen_seconds_ago: 0,
        }];
        out.extend(
            self.peers
                .read()
                .iter()
                .filter(|p| !self.is_self(p))
                .map(Peer::member),
        );
        out
    }

    /// Every peer with a client for it (healthy or not), for stats aggregation.
    pub fn peer_clients(&self) -> Vec<(pb::Member, KvCacheClient<Channel>)> {
        self.peers
            .read()
            .iter()
            .filter(|p| !self.is_self(p))
            .map(|p| (p.member(), KvCacheClient::new(p.channel.clone())))
            .collect()
    }

    /// Replication factor currently in force.
    pub fn replicas(&self) -> u32 {
        self.view().replicas() as u32
    }

    /// Health of every peer: (node id or address, healthy).
    pub fn peer_health(&self) -> Vec<(String, bool)> {
        self.peers
            .read()
            .iter()
            .filter(|p| !self.is_self(p))
            .map(|p| {
                (
                    p.node_id.clone().unwrap_or_else(|| p.addr.clone()),
                    p.healthy,
                )
            })
            .collect()
    }

    /// Records a failed request to `node_id` (counts like a failed health check).
    pub fn report_failure(&self, node_id: &str) {
        let mut changed = false;
        {
            let mut peers = self.peers.write();
            if let Some(p) = peers
                .iter_mut()
                .find(|p| p.node_id.as_deref() == Some(node_id))
            {
                p.failures += 1;
                if p.healthy && p.failures >= self.config.failure_threshold {
                    p.healthy = false;
                    changed = true;
                    warn!(peer = node_id, "peer marked down after failed requests");
                }
            }
        }
        if changed {
            self.rebuild_view();
        }
    }

    async fn check_peer(
        channel: Channel,
        timeout: Duration,
        need_info: bool,
    ) -> Result<Option<pb::ClusterInfoResponse>, String> {
        let mut health = HealthClient::new(channel.clone());
        let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        req.set_timeout(timeout);
        let resp = tokio::time::timeout(timeout, health.check(req))
            .await
            .map_err(|_| "health check timed out".to_string())?
            .map_err(|e| e.message().to_string())?;
        if resp.into_inner().status
            != tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        {
            return Err("not serving".into());
        }
        if !need_info {
            return Ok(None);
        }
        let mut kv = KvCacheClient::new(channel);
        let mut req = tonic::Request::new(pb::ClusterInfoRequest {});
        req.set_timeout(timeout);
        let info = tokio::time::timeout(timeout, kv.cluster_info(req))
            .await
            .map_err(|_| "cluster info timed out".to_string())?
            .map_err(|e| e.message().to_string())?;
        Ok(Some(info.into_inner()))
    }

    /// One round of health checks of every peer.
    pub async fn check_all(&self) {
        let targets: Vec<(String, Channel, bool)> = self
            .peers
            .read()
            .iter()
            .map(|p| {
                (
                    p.addr.clone(),
                    p.channel.clone(),
                    p.node_id.is_none() || !p.healthy,
                )
            })
            .collect();
        let timeout = self.config.health_timeout;
        let results =
            futures::future::join_all(targets.into_iter().map(|(addr, ch, need)| async move {
                (addr, Self::check_peer(ch, timeout, need).await)
            }))
            .await;
        let mut changed = false;
        {
            let mut peers = self.peers.write();
            for (addr, r) in results {
                let Some(p) = peers.iter_mut().find(|p| p.addr == addr) else {
                    continue;
                };
                match r {
                    Ok(info) => {
                        if let Some(info) = info {
                            if p.node_id.as_deref() != Some(&info.node_id) {
                                changed = true;
                            }
                            p.node_id = Some(info.node_id.clone());
                            if let Some(m) = info.members.iter().find(|m| m.node_id == info.node_id)
                            {
                                p.http_addr = m.http_addr.clone();
                            }
                        }
                        p.failures = 0;
                        p.last_seen = Some(Instant::now());
                        if !p.healthy {
                            p.healthy = true;
                            changed = true;
                            info!(peer = %addr, node = ?p.node_id, "peer up");
                        }
                    }
                    Err(e) => {
                        p.failures += 1;
                        if p.healthy && p.failures >= self.config.failure_threshold {
                            p.healthy = false;
                            changed = true;
                            warn!(peer = %addr, node = ?p.node_id, error = %e, "peer marked down");
                        }
                    }
                }
            }
        }
        if changed {
            self.rebuild_view();
        }
    }

    /// Resolves `--peers-dns` and adds or drops peers to match.
    pub async fn resolve_dns(&self) {
        let Some(name) = &self.config.peers_dns else {
            return;
        };
        let addrs: Vec<String> = match tokio::net::lookup_host(name.as_str()).await {
            Ok(a) => a.map(|a| a.to_string()).collect(),
            Err(e) => {
                warn!(%name, error = %e, "peer DNS lookup failed; keeping the last known peers");
                return;
            }
        };
        let mut changed = false;
        {
            let mut peers = self.peers.write();
            let before = peers.len();
            peers.retain(|p| !p.from_dns || addrs.contains(&p.addr));
            changed |= peers.len() != before;
            for a in addrs {
                if a == self.self_grpc || peers.iter().any(|p| p.addr == a) {
                    continue;
                }
                if let Some(channel) = lazy_channel(&a, self.config.health_timeout) {
                    info!(peer = %a, "peer discovered by DNS");
                    peers.push(Peer::new(a, channel, true));
                }
            }
        }
        if changed {
            self.rebuild_view();
        }
    }

    /// Deadline of forwarded requests.
    pub fn forward_timeout(&self) -> Duration {
        self.config.forward_timeout
    }

    /// How long a read waits for an owner before it also asks the next one.
    pub fn hedge_after(&self) -> Duration {
        self.config.hedge_after
    }

    /// Runs health checks (and DNS resolution) until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last_dns: Option<Instant> = None;
        loop {
            if last_dns.is_none_or(|t| t.elapsed() >= self.config.dns_interval) {
                self.resolve_dns().await;
                last_dns = Some(Instant::now());
            }
            self.check_all().await;
            tokio::select! {
                _ = tokio::time::sleep(self.config.health_interval) => {}
                _ = shutdown.wait_for(|v| *v) => return,
            }
        }
    }

    /// Per-peer counts for tests and status: node id -> healthy.
    pub fn health_map(&self) -> HashMap<String, bool> {
        self.peer_health().into_iter().collect()
    }
}

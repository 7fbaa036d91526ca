//! Cluster membership, peer health, configuration checks and placement as seen by one node.
//!
//! Members are this node plus its peers: a static `--peers` list, or the addresses a DNS name
//! (`--peers-dns`, a Kubernetes headless Service) resolves to, re-resolved periodically.
//!
//! **Health.** Each node health-checks every peer with `grpc.health.v1` on a connection of its
//! own (never the one forwarded data uses, whose HTTP/2 window a storm of Get data can fill),
//! driven by a small runtime on a dedicated OS thread ([`Cluster::spawn_health_thread`]), so a
//! saturated data path can delay neither the timer nor the check. A peer is marked down only by
//! `failure_threshold` consecutive failed checks; a check that times out while the peer's data
//! responses keep arriving (within the last check interval) is not counted. A failed forwarded
//! request never marks a peer down by itself: it makes the peer a suspect, checked at once and
//! then every quarter interval until it answers or is marked down (so a killed process is
//! marked down in a fraction of a second, a frozen one after the checks time out).
//!
//! **Configuration checks.** Peers' `ClusterInfo` is fetched on first contact, when a peer
//! comes back, and every [`INFO_EVERY`]th check. Each answer is compared with this node's
//! configuration: replication factor, member lists (a member one side has and the other does
//! not) and node id (another process answering with this node's id, or two peers with one id).
//! A mismatch is logged as an error when it appears and reported by [`Cluster::config_warnings`]
//! while it lasts. Of two processes with one node id, the one started first keeps it: every node
//! that sees both keeps the younger out of its placement view, and each of the two keeps the
//! other out of its own.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvshare_core::placement::{Placed, PlacementView};
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;
use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{Notify, watch};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;
use tracing::{debug, error, info, warn};

use kvshare_proto::transport;

use crate::metrics::PeerLabels;

/// A peer's `ClusterInfo` is fetched again every this many checks (and on first contact, and
/// when it comes back).
pub const INFO_EVERY: u32 = 10;

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
    /// Consecutive failed checks that mark a peer down.
    pub failure_threshold: u32,
    /// Deadline of a request forwarded to a peer.
    pub forward_timeout: Duration,
    /// How long a read waits for an owner before it also asks the next one.
    pub hedge_after: Duration,
    /// Interval between DNS resolutions.
    pub dns_interval: Duration,
    /// The token this node sends on every request to a peer (`--peer-token-file`).
    pub peer_token: transport::BearerToken,
    /// TLS of connections to peers (data and health checks); `None`: plain TCP.
    pub tls: Option<transport::ClientTls>,
}

/// How to reach a member.
#[derive(Clone)]
pub enum Target {
    /// This node.
    Local,
    /// A peer, over a shared channel.
    Remote(Box<transport::KvClient>),
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

/// Kind of a configuration mismatch between this node and a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MismatchKind {
    /// The peer is configured for another replication factor.
    Replicas,
    /// The peer's member list and this node's differ.
    Members,
    /// Two processes claim one node id.
    DuplicateNodeId,
}

impl MismatchKind {
    /// The `kind` label value: `replicas`, `members` or `duplicate_node_id`.
    pub fn as_str(self) -> &'static str {
        match self {
            MismatchKind::Replicas => "replicas",
            MismatchKind::Members => "members",
            MismatchKind::DuplicateNodeId => "duplicate_node_id",
        }
    }
}

/// A configuration mismatch, reported while it lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    /// What differs.
    pub kind: MismatchKind,
    /// The peer it concerns: its node id, or `id@address` for a duplicate node id.
    pub peer: String,
    /// What is wrong and what to change, for a person.
    pub message: String,
}

/// What a peer's last `ClusterInfo` said about it.
#[derive(Debug, Clone, Default)]
struct PeerInfo {
    instance_id: String,
    started_unix_ms: u64,
}

struct Peer {
    addr: String,
    node_id: Option<String>,
    http_addr: String,
    healthy: bool,
    failures: u32,
    last_seen: Option<Instant>,
    /// Carries forwarded data requests (and stats).
    channel: Channel,
    /// Carries health checks and ClusterInfo only; made on the health runtime at first use.
    health: Option<Channel>,
    from_dns: bool,
    /// A forwarded request to it failed: check it now.
    suspect: bool,
    /// Last time it answered a forwarded request.
    last_data_ok: Option<Instant>,
    /// Checks since its ClusterInfo was last fetched.
    checks_since_info: u32,
    info: Option<PeerInfo>,
    /// Replica and member mismatches found in its last ClusterInfo.
    warnings: Vec<ConfigWarning>,
    /// Kept out of the placement view: another process has its node id (why).
    duplicate: Option<ConfigWarning>,
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
            health: None,
            from_dns,
            suspect: false,
            last_data_ok: None,
            checks_since_info: 0,
            info: None,
            warnings: Vec::new(),
            duplicate: None,
        }
    }

    /// Node id, or `unknown@addr` before the first contact.
    fn display_id(&self) -> String {
        self.node_id
            .clone()
            .unwrap_or_else(|| format!("unknown@{}", self.addr))
    }

    /// Healthy and not kept out as a duplicate: in the placement view.
    fn placed(&self) -> bool {
        self.healthy && self.duplicate.is_none()
    }

    /// The peer as `ClusterInfo` reports it (a duplicate kept out of placement is not healthy).
    fn member(&self) -> pb::Member {
        pb::Member {
            node_id: self.display_id(),
            grpc_addr: self.addr.clone(),
            http_addr: self.http_addr.clone(),
            healthy: self.placed(),
            last_seen_seconds_ago: self.last_seen.map_or(u64::MAX, |t| t.elapsed().as_secs()),
        }
    }
}

/// What one check of a peer found.
enum CheckError {
    /// No answer within the deadline.
    TimedOut(&'static str),
    /// An answer that is not "serving", or a transport error.
    Failed(String),
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckError::TimedOut(what) => write!(f, "{what} timed out"),
            CheckError::Failed(e) => f.write_str(e),
        }
    }
}

/// Cluster state of one node.
pub struct Cluster {
    /// This node's id.
    pub self_id: String,
    /// Random id of this process (tells it apart from another process with the same node id).
    pub instance_id: String,
    /// When this process started, Unix milliseconds.
    pub started_unix_ms: u64,
    self_grpc: String,
    self_http: String,
    config: ClusterConfig,
    peers: RwLock<Vec<Peer>>,
    view: RwLock<Arc<View>>,
    /// Wakes the health loop to check suspects.
    wake: Notify,
    /// Runtime that drives data channels (peers found by DNS get theirs made there).
    data_runtime: Option<tokio::runtime::Handle>,
    /// Peers marked down, counted per peer (`kvshare_peer_markdowns_total`).
    markdowns: Family<PeerLabels, Counter>,
    /// Turns true once the health loop has completed its first round of checks.
    first_round: watch::Sender<bool>,
}

fn lazy_channel(
    addr: &str,
    timeout: Duration,
    tls: Option<&transport::ClientTls>,
) -> Option<Channel> {
    let ep = Endpoint::from_shared(transport::endpoint_url(addr, tls.is_some())).ok()?;
    Some(transport::channel_lazy(
        &transport::tune_endpoint(ep, timeout),
        tls,
    ))
}

/// A connection of its own for health checks: small windows are plenty, and no data shares it.
fn health_channel(
    addr: &str,
    timeout: Duration,
    tls: Option<&transport::ClientTls>,
) -> Option<Channel> {
    let ep = Endpoint::from_shared(transport::endpoint_url(addr, tls.is_some())).ok()?;
    Some(transport::channel_lazy(
        &ep.connect_timeout(timeout).tcp_nodelay(true),
        tls,
    ))
}

/// A random id for this process.
fn new_instance_id() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", h.finish())
}

/// Whether a member another node lists is one this node knows (by node id or address).
fn knows(ids: &[&str], addrs: &[&str], m: &pb::Member) -> bool {
    ids.contains(&m.node_id.as_str()) || addrs.contains(&m.grpc_addr.as_str())
}

impl Cluster {
    /// Membership for a node with the given identity and configuration. `markdowns` counts
    /// peers marked down (registered by the caller). Call within the runtime that serves data:
    /// forwarded requests' connections are driven by it.
    pub fn new(
        self_id: String,
        self_grpc: String,
        self_http: String,
        config: ClusterConfig,
        markdowns: Family<PeerLabels, Counter>,
    ) -> Arc<Self> {
        let peers = config
            .peers
            .iter()
            .filter(|a| **a != self_grpc)
            .filter_map(|a| {
                lazy_channel(a, config.health_timeout, config.tls.as_ref())
                    .map(|ch| Peer::new(a.clone(), ch, false))
            })
            .collect();
        let c = Arc::new(Cluster {
            self_id,
            instance_id: new_instance_id(),
            started_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            self_grpc,
            self_http,
            config,
            peers: RwLock::new(peers),
            view: RwLock::new(Arc::new(View::new(Vec::new(), 1))),
            wake: Notify::new(),
            data_runtime: tokio::runtime::Handle::try_current().ok(),
            markdowns,
            first_round: watch::channel(false).0,
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

    /// Configured members: this node and every peer that is not this node itself.
    fn configured_members(&self, peers: &[Peer]) -> usize {
        1 + peers.iter().filter(|p| !self.is_self(p)).count()
    }

    /// Replication factor this node is configured for (whatever the live members allow).
    pub fn configured_replicas(&self) -> u32 {
        let n = self.configured_members(&self.peers.read());
        self.replicas_for(n) as u32
    }

    fn rebuild_view(&self) {
        let peers = self.peers.read();
        let configured = self.configured_members(&peers);
        let mut members: Vec<Member> = vec![Member {
            node_id: self.self_id.clone(),
            target: Target::Local,
        }];
        for p in peers.iter() {
            if let (true, Some(id)) = (p.placed(), &p.node_id)
                && *id != self.self_id
                && !members.iter().any(|m| m.node_id == *id)
            {
                members.push(Member {
                    node_id: id.clone(),
                    target: Target::Remote(Box::new(transport::kv_client_with_token(
                        p.channel.clone(),
                        self.config.peer_token.clone(),
                    ))),
                });
            }
        }
        let replicas = self.replicas_for(configured);
        *self.view.write() = Arc::new(View::new(members, replicas));
    }

    /// Whether a configured peer is this node itself: it answered with this node's id and
    /// this process's instance id.
    fn is_self(&self, p: &Peer) -> bool {
        p.node_id.as_deref() == Some(&self.self_id)
            && p.info
                .as_ref()
                .is_none_or(|i| i.instance_id.is_empty() || i.instance_id == self.instance_id)
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
    pub fn peer_clients(&self) -> Vec<(pb::Member, transport::KvClient)> {
        let token = &self.config.peer_token;
        self.peers
            .read()
            .iter()
            .filter(|p| !self.is_self(p))
            .map(|p| {
                let c = KvCacheClient::with_interceptor(p.channel.clone(), token.clone());
                (p.member(), c)
            })
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

    /// Configuration mismatches in force, sorted by kind and peer.
    pub fn config_warnings(&self) -> Vec<ConfigWarning> {
        let peers = self.peers.read();
        let mut out: Vec<ConfigWarning> = peers
            .iter()
            .filter(|p| !self.is_self(p))
            .flat_map(|p| p.warnings.iter().chain(&p.duplicate))
            .cloned()
            .collect();
        out.sort_by(|a, b| (a.kind, &a.peer).cmp(&(b.kind, &b.peer)));
        out.dedup_by(|a, b| a.kind == b.kind && a.peer == b.peer);
        out
    }

    /// Records a failed request to `node_id`. It does not count as a failed check: the peer
    /// becomes a suspect and is checked at once (a slow data response is no sign of death; a
    /// killed process fails its checks at once and is marked down within a quarter interval).
    pub fn report_failure(&self, node_id: &str) {
        let mut found = false;
        for p in self.peers.write().iter_mut() {
            if p.node_id.as_deref() == Some(node_id) && p.healthy {
                p.suspect = true;
                found = true;
            }
        }
        if found {
            self.wake.notify_one();
        }
    }

    /// Records a forwarded request `node_id` answered: a health check that times out within
    /// the next check interval is not counted against it.
    pub fn report_success(&self, node_id: &str) {
        for p in self.peers.write().iter_mut() {
            if p.node_id.as_deref() == Some(node_id) {
                p.last_data_ok = Some(Instant::now());
            }
        }
    }

    async fn check_peer(
        channel: Channel,
        timeout: Duration,
        need_info: bool,
        token: transport::BearerToken,
    ) -> Result<Option<pb::ClusterInfoResponse>, CheckError> {
        let mut health = HealthClient::new(channel.clone());
        let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        });
        req.set_timeout(timeout);
        let resp = tokio::time::timeout(timeout, health.check(req))
            .await
            .map_err(|_| CheckError::TimedOut("health check"))?
            .map_err(|e| match e.code() {
                tonic::Code::DeadlineExceeded => CheckError::TimedOut("health check"),
                _ => CheckError::Failed(e.message().to_string()),
            })?;
        if resp.into_inner().status
            != tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        {
            return Err(CheckError::Failed("not serving".into()));
        }
        if !need_info {
            return Ok(None);
        }
        let mut kv = KvCacheClient::with_interceptor(channel, token);
        let mut req = tonic::Request::new(pb::ClusterInfoRequest {});
        req.set_timeout(timeout);
        let info = tokio::time::timeout(timeout, kv.cluster_info(req))
            .await
            .map_err(|_| CheckError::TimedOut("cluster info"))?
            .map_err(|e| CheckError::Failed(e.message().to_string()))?;
        Ok(Some(info.into_inner()))
    }

    /// One round of health checks of every peer.
    pub async fn check_all(&self) {
        self.check_round(false).await;
    }

    /// Checks every peer, or only the suspects.
    async fn check_round(&self, suspects_only: bool) {
        let timeout = self.config.health_timeout;
        let targets: Vec<(String, Channel, bool)> = self
            .peers
            .write()
            .iter_mut()
            .filter(|p| !suspects_only || p.suspect)
            .filter_map(|p| {
                if p.health.is_none() {
                    p.health = health_channel(&p.addr, timeout, self.config.tls.as_ref());
                }
                let need_info = p.node_id.is_none()
                    || p.info.is_none()
                    || !p.healthy
                    || p.checks_since_info + 1 >= INFO_EVERY;
                Some((p.addr.clone(), p.health.clone()?, need_info))
            })
            .collect();
        if targets.is_empty() {
            return;
        }
        let token = &self.config.peer_token;
        let results =
            futures::future::join_all(targets.into_iter().map(|(addr, ch, need)| async move {
                (
                    addr,
                    Self::check_peer(ch, timeout, need, token.clone()).await,
                )
            }))
            .await;
        let mut changed = false;
        {
            let mut peers = self.peers.write();
            for (addr, r) in results {
                let Some(i) = peers.iter().position(|p| p.addr == addr) else {
                    continue;
                };
                changed |= match r {
                    Ok(info) => self.check_passed(&mut peers, i, info),
                    Err(e) => self.check_failed(&mut peers[i], &e),
                };
            }
            changed |= self.find_duplicates(&mut peers);
        }
        if changed {
            self.rebuild_view();
        }
    }

    /// A check of `peers[i]` passed (with its ClusterInfo when fetched); true if the view
    /// changes.
    fn check_passed(
        &self,
        peers: &mut [Peer],
        i: usize,
        info: Option<pb::ClusterInfoResponse>,
    ) -> bool {
        let mut changed = false;
        if let Some(info) = info {
            let p = &mut peers[i];
            changed |= p.node_id.as_deref() != Some(&info.node_id);
            p.node_id = Some(info.node_id.clone());
            if let Some(m) = info.members.iter().find(|m| m.node_id == info.node_id) {
                p.http_addr = m.http_addr.clone();
            }
            p.info = Some(PeerInfo {
                instance_id: info.instance_id.clone(),
                started_unix_ms: info.started_unix_ms,
            });
            p.checks_since_info = 0;
            let warnings = self.compare(peers, i, &info);
            let p = &mut peers[i];
            for w in warnings.iter().filter(|w| !p.warnings.contains(w)) {
                error!(peer = %p.addr, kind = w.kind.as_str(), "configuration mismatch: {}", w.message);
            }
            for w in p.warnings.iter().filter(|w| !warnings.contains(w)) {
                info!(peer = %p.addr, kind = w.kind.as_str(), "configuration mismatch resolved: {}", w.message);
            }
            p.warnings = warnings;
        } else {
            peers[i].checks_since_info += 1;
        }
        let p = &mut peers[i];
        p.failures = 0;
        p.suspect = false;
        p.last_seen = Some(Instant::now());
        if !p.healthy {
            p.healthy = true;
            changed = true;
            info!(peer = %p.addr, node = ?p.node_id, "peer up");
        }
        changed
    }

    /// A check of `p` failed; true if it is marked down.
    fn check_failed(&self, p: &mut Peer, e: &CheckError) -> bool {
        let interval = self.config.health_interval;
        if matches!(e, CheckError::TimedOut(_))
            && p.healthy
            && p.last_data_ok.is_some_and(|t| t.elapsed() < interval)
        {
            debug!(peer = %p.addr, error = %e, "health check timed out; the peer's data responses keep arriving: not counted");
            return false;
        }
        p.failures += 1;
        if !p.healthy || p.failures < self.config.failure_threshold {
            return false;
        }
        p.healthy = false;
        p.suspect = false;
        self.markdowns
            .get_or_create(&PeerLabels {
                peer: p.display_id(),
            })
            .inc();
        warn!(peer = %p.addr, node = ?p.node_id, error = %e, failures = p.failures, "peer marked down");
        true
    }

    /// Replica and member mismatches between this node and `peers[i]`, whose ClusterInfo is
    /// `info`.
    fn compare(
        &self,
        peers: &[Peer],
        i: usize,
        info: &pb::ClusterInfoResponse,
    ) -> Vec<ConfigWarning> {
        let peer = &peers[i];
        let label = info.node_id.clone();
        let mut out = Vec::new();
        let mine = self.replicas_for(self.configured_members(peers)) as u32;
        if info.configured_replicas != 0 && info.configured_replicas != mine {
            out.push(ConfigWarning {
                kind: MismatchKind::Replicas,
                peer: label.clone(),
                message: format!(
                    "{} ({}) is configured for {} replicas, this node ({}) for {mine}: give every node the same --replicas",
                    info.node_id, peer.addr, info.configured_replicas, self.self_id
                ),
            });
        }
        // Members the peer lists that this node does not know, and the reverse.
        let mut ids: Vec<&str> = vec![&self.self_id];
        let mut addrs: Vec<&str> = vec![&self.self_grpc];
        for p in peers {
            ids.extend(p.node_id.as_deref());
            addrs.push(&p.addr);
        }
        let unknown_here: Vec<String> = info
            .members
            .iter()
            .filter(|m| !knows(&ids, &addrs, m))
            .map(|m| format!("{} ({})", m.node_id, m.grpc_addr))
            .collect();
        let theirs = |id: Option<&str>, addr: &str| {
            info.members
                .iter()
                .any(|m| id.is_some_and(|id| m.node_id == id) || m.grpc_addr == addr)
        };
        let mut unknown_there: Vec<String> = Vec::new();
        if !theirs(Some(&self.self_id), &self.self_grpc) {
            unknown_there.push(format!("{} ({}, this node)", self.self_id, self.self_grpc));
        }
        for (j, p) in peers.iter().enumerate() {
            if j != i
                && !self.is_self(p)
                && p.duplicate.is_none()
                && !theirs(p.node_id.as_deref(), &p.addr)
            {
                unknown_there.push(format!("{} ({})", p.display_id(), p.addr));
            }
        }
        if !unknown_here.is_empty() || !unknown_there.is_empty() {
            let mut parts = Vec::new();
            if !unknown_here.is_empty() {
                parts.push(format!(
                    "{} lists {} that this node's peers do not",
                    info.node_id,
                    unknown_here.join(", ")
                ));
            }
            if !unknown_there.is_empty() {
                parts.push(format!(
                    "{} does not list {}",
                    info.node_id,
                    unknown_there.join(", ")
                ));
            }
            out.push(ConfigWarning {
                kind: MismatchKind::Members,
                peer: label,
                message: format!(
                    "member lists differ: {}; give every node the same --peers (or --peers-dns)",
                    parts.join("; ")
                ),
            });
        }
        out
    }

    /// Marks peers that claim a node id another process holds (this node's, or a peer's that
    /// started earlier) as duplicates kept out of placement; logs each new one. True if any
    /// changed.
    fn find_duplicates(&self, peers: &mut [Peer]) -> bool {
        // The keeper of each node id among peers: the earliest started (then lowest instance).
        let mut keeper: BTreeMap<&str, (u64, &str, &str)> = BTreeMap::new();
        keeper.insert(
            &self.self_id,
            (self.started_unix_ms, &self.instance_id, &self.self_grpc),
        );
        for p in peers.iter() {
            if let (Some(id), Some(info)) = (&p.node_id, &p.info)
                && !self.is_self(p)
            {
                let mine = (
                    info.started_unix_ms,
                    info.instance_id.as_str(),
                    p.addr.as_str(),
                );
                if id == &self.self_id {
                    continue;
                }
                keeper
                    .entry(id)
                    .and_modify(|k| {
                        if (mine.0, mine.1) < (k.0, k.1) {
                            *k = mine;
                        }
                    })
                    .or_insert(mine);
            }
        }
        // For each peer: the address of the process that keeps its id, when not itself.
        let kept_elsewhere: Vec<Option<String>> = peers
            .iter()
            .map(|p| match (&p.node_id, &p.info) {
                (Some(id), Some(info)) if !self.is_self(p) => keeper
                    .get(id.as_str())
                    .filter(|k| k.1 != info.instance_id)
                    .map(|k| k.2.to_string()),
                _ => None,
            })
            .collect();
        let mut changed = false;
        for (p, kept) in peers.iter_mut().zip(kept_elsewhere) {
            let warning = kept.map(|kept_addr| {
                let id = p.node_id.clone().unwrap_or_default();
                let message = if id == self.self_id {
                    format!(
                        "another process at {} answers with this node's id {id} (this node: {}); each keeps the other out of its placement, and nodes that see both place only the one started first: give each node a unique --node-id",
                        p.addr, self.self_grpc
                    )
                } else {
                    format!(
                        "two processes claim node id {id}: {kept_addr} (started first, placed) and {} (not placed): give each node a unique --node-id",
                        p.addr
                    )
                };
                ConfigWarning {
                    kind: MismatchKind::DuplicateNodeId,
                    peer: format!("{id}@{}", p.addr),
                    message,
                }
            });
            if warning != p.duplicate {
                if let Some(w) = &warning {
                    error!(peer = %p.addr, kind = w.kind.as_str(), "configuration mismatch: {}", w.message);
                } else {
                    info!(peer = %p.addr, "duplicate node id resolved");
                }
                p.duplicate = warning;
                changed = true;
            }
        }
        changed
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
            // Data channels are driven by the data runtime, not the health thread.
            let _guard = self.data_runtime.as_ref().map(|h| h.enter());
            for a in addrs {
                if a == self.self_grpc || peers.iter().any(|p| p.addr == a) {
                    continue;
                }
                if let Some(channel) =
                    lazy_channel(&a, self.config.health_timeout, self.config.tls.as_ref())
                {
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

    /// Runs health checks (and DNS resolution) until `shutdown` turns true (or its sender is
    /// dropped). Checks start at a fixed rate (every `health_interval`, whatever a round took),
    /// so a frozen peer is marked down within `interval x threshold + timeout`; suspects are
    /// checked at once and then every quarter interval.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut last_dns: Option<Instant> = None;
        let mut tick = tokio::time::interval(self.config.health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let retry = (self.config.health_interval / 4).max(Duration::from_millis(10));
        loop {
            let suspects = self.peers.read().iter().any(|p| p.suspect);
            // (The select only picks; the work runs after it, holding no borrow of `shutdown`.)
            let suspects_only = tokio::select! {
                _ = tick.tick() => false,
                _ = self.wake.notified() => true,
                _ = tokio::time::sleep(retry), if suspects => true,
                _ = shutdown.wait_for(|v| *v) => return,
            };
            if !suspects_only && last_dns.is_none_or(|t| t.elapsed() >= self.config.dns_interval) {
                self.resolve_dns().await;
                last_dns = Some(Instant::now());
            }
            self.check_round(suspects_only).await;
            if !suspects_only {
                self.first_round.send_replace(true);
            }
        }
    }

    /// Waits (at most `limit`) until the health loop has checked every peer once, so that a
    /// node that starts serving knows its cluster instead of believing it is alone.
    pub async fn first_round_done(&self, limit: Duration) {
        let mut rx = self.first_round.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|v| *v)).await;
    }

    /// Runs [`Cluster::run`] on a current-thread runtime of its own, on a dedicated OS thread
    /// (`kvshare-health`), so that a saturated data runtime cannot delay health checks. Falls
    /// back to a task on the current runtime if the thread cannot be made.
    pub fn spawn_health_thread(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let me = self.clone();
        let rx = shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("kvshare-health".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(me.run(rx)),
                    Err(e) => error!(error = %e, "cannot build the health-check runtime"),
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "no health-check thread; checking peers on the data runtime");
            tokio::spawn(self.run(shutdown));
        }
    }

    /// Per-peer counts for tests and status: node id -> healthy.
    pub fn health_map(&self) -> HashMap<String, bool> {
        self.peer_health().into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(peers: &[&str], replicas: Option<usize>) -> ClusterConfig {
        ClusterConfig {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            peers_dns: None,
            replicas,
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
            failure_threshold: 2,
            forward_timeout: Duration::from_secs(5),
            hedge_after: Duration::from_millis(250),
            dns_interval: Duration::from_secs(10),
            peer_token: transport::BearerToken::default(),
            tls: None,
        }
    }

    /// Node `a` at 10.0.0.1:1 with the given peers, every peer up with the id given.
    fn cluster(peers: &[(&str, &str)], replicas: Option<usize>) -> Arc<Cluster> {
        let addrs: Vec<&str> = peers.iter().map(|p| p.0).collect();
        let c = Cluster::new(
            "a".into(),
            "10.0.0.1:1".into(),
            "10.0.0.1:2".into(),
            config(&addrs, replicas),
            Family::default(),
        );
        for (p, (_, id)) in c.peers.write().iter_mut().zip(peers) {
            p.node_id = Some(id.to_string());
            p.healthy = true;
            p.info = Some(PeerInfo {
                instance_id: format!("instance-{id}-{}", p.addr),
                started_unix_ms: 1,
            });
        }
        c.rebuild_view();
        c
    }

    fn member(id: &str, addr: &str) -> pb::Member {
        pb::Member {
            node_id: id.into(),
            grpc_addr: addr.into(),
            healthy: true,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn failed_data_requests_make_a_suspect_and_only_failed_checks_mark_down() {
        let c = cluster(&[("10.0.0.2:1", "b")], None);
        for _ in 0..5 {
            c.report_failure("b");
        }
        assert!(
            c.health_map()["b"],
            "data failures alone never mark a peer down"
        );
        assert!(c.peers.read()[0].suspect);
        let e = CheckError::Failed("connection refused".into());
        assert!(!c.check_failed(&mut c.peers.write()[0], &e));
        assert!(c.check_failed(&mut c.peers.write()[0], &e));
        assert!(!c.peers.read()[0].healthy);
        let markdowns = c.markdowns.get_or_create(&PeerLabels { peer: "b".into() });
        assert_eq!(markdowns.get(), 1);
    }

    #[tokio::test]
    async fn a_timed_out_check_is_not_counted_while_data_responses_arrive() {
        let c = cluster(&[("10.0.0.2:1", "b")], None);
        c.report_success("b");
        let timed_out = CheckError::TimedOut("health check");
        for _ in 0..3 {
            assert!(!c.check_failed(&mut c.peers.write()[0], &timed_out));
        }
        assert_eq!(c.peers.read()[0].failures, 0);
        // A refused connection counts whatever data did before.
        let refused = CheckError::Failed("connection refused".into());
        c.check_failed(&mut c.peers.write()[0], &refused);
        assert_eq!(c.peers.read()[0].failures, 1);
    }

    #[tokio::test]
    async fn replica_and_member_mismatches_are_found_both_ways() {
        let c = cluster(&[("10.0.0.2:1", "b"), ("10.0.0.3:1", "c")], None);
        assert_eq!(c.configured_replicas(), 2);
        let agree = pb::ClusterInfoResponse {
            node_id: "b".into(),
            members: vec![
                member("b", "10.0.0.2:1"),
                member("a", "10.0.0.1:1"),
                member("unknown@10.0.0.3:1", "10.0.0.3:1"),
            ],
            configured_replicas: 2,
            ..Default::default()
        };
        assert_eq!(c.compare(&c.peers.read(), 0, &agree), vec![]);
        // b is configured for R=1, lists x, and lists neither a nor c.
        let odd = pb::ClusterInfoResponse {
            node_id: "b".into(),
            members: vec![member("b", "10.0.0.2:1"), member("x", "10.0.0.9:1")],
            configured_replicas: 1,
            ..Default::default()
        };
        let w = c.compare(&c.peers.read(), 0, &odd);
        assert_eq!(w.len(), 2, "{w:?}");
        assert_eq!(
            (w[0].kind, w[0].peer.as_str()),
            (MismatchKind::Replicas, "b")
        );
        assert!(w[0].message.contains("1 replicas"), "{}", w[0].message);
        assert_eq!(w[1].kind, MismatchKind::Members);
        for name in [
            "x (10.0.0.9:1)",
            "a (10.0.0.1:1, this node)",
            "c (10.0.0.3:1)",
        ] {
            assert!(w[1].message.contains(name), "{name}: {}", w[1].message);
        }
        // An old peer that does not send its configured replicas is not compared.
        let old = pb::ClusterInfoResponse {
            configured_replicas: 0,
            ..agree
        };
        assert_eq!(c.compare(&c.peers.read(), 0, &old), vec![]);
    }

    #[tokio::test]
    async fn of_two_processes_with_one_id_only_the_older_is_placed() {
        let c = cluster(&[("10.0.0.2:1", "b"), ("10.0.0.3:1", "b")], None);
        {
            let mut peers = c.peers.write();
            if let Some(i) = peers[1].info.as_mut() {
                i.started_unix_ms = 5;
            }
            assert!(c.find_duplicates(&mut peers));
            assert!(peers[0].duplicate.is_none());
            let dup = peers[1].duplicate.clone().expect("younger is a duplicate");
            assert_eq!(dup.peer, "b@10.0.0.3:1");
            assert!(dup.message.contains("10.0.0.2:1") && dup.message.contains("10.0.0.3:1"));
            assert!(!c.find_duplicates(&mut peers), "reported once");
        }
        c.rebuild_view();
        let healthy: Vec<String> = c
            .members_info()
            .into_iter()
            .filter(|m| m.node_id == "b" && m.healthy)
            .map(|m| m.grpc_addr)
            .collect();
        assert_eq!(healthy, vec!["10.0.0.2:1".to_string()]);
        assert_eq!(c.view().members().len(), 2);
        assert_eq!(c.config_warnings().len(), 1);
    }

    #[tokio::test]
    async fn a_peer_claiming_this_nodes_id_is_kept_out_but_this_process_is_itself() {
        let c = cluster(&[("10.0.0.2:1", "a"), ("10.0.0.1:9", "a")], None);
        let me = c.instance_id.clone();
        {
            let mut peers = c.peers.write();
            // The second entry is this node listed under another address: same instance.
            if let Some(i) = peers[1].info.as_mut() {
                i.instance_id = me;
            }
            c.find_duplicates(&mut peers);
            assert!(peers[0].duplicate.is_some(), "another process with id a");
            assert!(peers[1].duplicate.is_none());
        }
        assert!(c.is_self(&c.peers.read()[1]));
        assert!(!c.is_self(&c.peers.read()[0]));
        let w = c.config_warnings();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].kind, MismatchKind::DuplicateNodeId);
        assert_eq!(c.view().members().len(), 1, "nobody else is placed");
    }
}

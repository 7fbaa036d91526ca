//! A cluster-aware client: fetches the membership with `ClusterInfo`, computes each key's owners
//! with the same rendezvous hashing as the nodes, and sends gets and puts straight to the
//! owners (one hop). Membership is refreshed periodically and after errors.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvshare_core::placement::{node_seed, owners};
use kvshare_core::{BlockKey, EncodedBlock, Namespace};
use parking_lot::Mutex;
use tracing::debug;

use crate::{
    BlockOutcome, ClientError, ClientOptions, KvClient, PrefixLookup, PutItem, PutReport,
    PutStatus, decode_prefix, encode_prefix,
};

struct Node {
    node_id: String,
    endpoint: String,
    /// Plain client: the node coordinates (used for lookups).
    coordinator: KvClient,
    /// Hop-local client: the node answers from its own store.
    direct: KvClient,
}

struct Routing {
    nodes: Vec<Node>,
    seeds: Vec<u64>,
    replicas: usize,
    fetched: Instant,
}

/// Client of a kvshare cluster that routes to key owners directly.
pub struct ClusterClient {
    bootstrap: Vec<String>,
    opts: ClientOptions,
    routing: Mutex<Arc<Routing>>,
    refresh_every: Duration,
    next: std::sync::atomic::AtomicUsize,
}

fn endpoint_of(addr: &str) -> String {
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

impl ClusterClient {
    /// Connects through any of `endpoints` and learns the membership.
    pub async fn connect(endpoints: &[String], opts: ClientOptions) -> Result<Self, ClientError> {
        let c = ClusterClient {
            bootstrap: endpoints.to_vec(),
            opts,
            routing: Mutex::new(Arc::new(Routing {
                nodes: vec![],
                seeds: vec![],
                replicas: 1,
                fetched: Instant::now(),
            })),
            refresh_every: Duration::from_secs(5),
            next: std::sync::atomic::AtomicUsize::new(0),
        };
        c.refresh().await?;
        Ok(c)
    }

    /// Re-reads the membership from any reachable node.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let mut candidates: Vec<String> = self
            .routing
            .lock()
            .nodes
            .iter()
            .map(|n| n.endpoint.clone())
            .collect();
        candidates.extend(self.bootstrap.iter().cloned());
        let mut last_err = None;
        for ep in candidates {
            let mut c = match KvClient::connect(&endpoint_of(&ep), self.opts.clone()).await {
                Ok(c) => c,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let info = match c.cluster_info().await {
                Ok(i) => i,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            let mut nodes = Vec::new();
            for m in info.members.iter().filter(|m| m.healthy) {
                let ep = endpoint_of(&m.grpc_addr);
                match KvClient::connect(&ep, self.opts.clone()).await {
                    Ok(client) => nodes.push(Node {
                        node_id: m.node_id.clone(),
                        endpoint: ep,
                        direct: client.clone().hop_local(),
                        coordinator: client,
                    }),
                    Err(e) => {
                        debug!(node = %m.node_id, error = %e, "member unreachable from this client")
                    }
                }
            }
            if nodes.is_empty() {
                continue;
            }
            nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            let seeds = nodes.iter().map(|n| node_seed(&n.node_id)).collect();
            let replicas = (info.replicas as usize).clamp(1, nodes.len());
            *self.routing.lock() = Arc::new(Routing {
                nodes,
                seeds,
                replicas,
                fetched: Instant::now(),
            });
            return Ok(());
        }
        Err(last_err.unwrap_or_else(|| ClientError::Connect {
            endpoint: self.bootstrap.join(","),
            reason: "no member reachable".into(),
        }))
    }

    async fn routing(&self) -> Arc<Routing> {
        let r = self.routing.lock().clone();
        if r.fetched.elapsed() > self.refresh_every && self.refresh().await.is_ok() {
            return self.routing.lock().clone();
        }
        r
    }

    /// Node ids of the members this client routes to.
    pub fn members(&self) -> Vec<String> {
        self.routing
            .lock()
            .nodes
            .iter()
            .map(|n| n.node_id.clone())
            .collect()
    }

    /// Node id of the first owner of `key` in the current view.
    pub fn primary_owner(&self, key: &BlockKey) -> Option<String> {
        let r = self.routing.lock().clone();
        owners(&r.seeds, key, 1)
            .first()
            .map(|&i| r.nodes[i].node_id.clone())
    }

    /// Longest cached prefix of `tokens` (asked of one node, which fans out to the owners).
    pub async fn lookup(
        &self,
        ns: &Namespace,
        tokens: &[u32],
    ) -> Result<PrefixLookup, ClientError> {
        let keys = ns.block_keys(tokens)?;
        if keys.is_empty() {
            return Ok(PrefixLookup {
                keys,
                hit_blocks: 0,
            });
        }
        let hit_blocks = self.lookup_keys(&ns.digest(), &keys).await?;
        Ok(PrefixLookup { keys, hit_blocks })
    }

    /// How many leading `keys` of `namespace` the cluster holds (asked of one node, which fans
    /// out to the owners; the next node is tried when one fails). For callers that compute
    /// keys themselves (e.g. vLLM's own block hashes).
    pub async fn lookup_keys(
        &self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<usize, ClientError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut last = None;
        for _ in 0..2 {
            let r = self.routing().await;
            for _ in 0..r.nodes.len() {
                let i =
                    self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % r.nodes.len();
                let mut c = r.nodes[i].coordinator.clone();
                match c.lookup_keys(namespace, keys).await {
                    Ok(hit_blocks) => return Ok(hit_blocks),
                    Err(e) => last = Some(e),
                }
            }
            let _ = self.refresh().await;
        }
        Err(last.unwrap_or_else(|| ClientError::Protocol("no members".into())))
    }

    /// Deletes blocks from every owner (asked of one node, which fans out); returns how many
    /// copies existed.
    pub async fn delete_keys(
        &self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<u32, ClientError> {
        let r = self.routing().await;
        let mut last = None;
        for _ in 0..r.nodes.len() {
            let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % r.nodes.len();
            let mut c = r.nodes[i].coordinator.clone();
            match c.delete_keys(namespace, keys).await {
                Ok(n) => return Ok(n),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Protocol("no members".into())))
    }

    /// Fetches blocks from their owners directly; `None` for keys no owner has.
    pub async fn get_blocks(
        &self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<EncodedBlock>>, ClientError> {
        let r = self.routing().await;
        if r.nodes.is_empty() {
            return Err(ClientError::Protocol("no members".into()));
        }
        let ranked: Vec<Vec<usize>> = keys
            .iter()
            .map(|k| owners(&r.seeds, k, r.replicas))
            .collect();
        let mut out: Vec<Option<EncodedBlock>> = vec![None; keys.len()];
        let mut errors = 0;
        for round in 0..r.replicas {
            let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
            for (i, o) in ranked.iter().enumerate() {
                if out[i].is_none()
                    && let Some(&n) = o.get(round)
                {
                    groups.entry(n).or_default().push(i);
                }
            }
            if groups.is_empty() {
                break;
            }
            let calls = groups.into_iter().map(|(n, idx)| {
                let mut c = r.nodes[n].direct.clone();
                let sub: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
                async move { (idx, c.get_blocks(namespace, &sub).await) }
            });
            for (idx, res) in futures::future::join_all(calls).await {
                match res {
                    Ok(blocks) => {
                        for (i, b) in idx.into_iter().zip(blocks) {
                            if b.is_some() {
                                out[i] = b;
                            }
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "owner failed; falling over to the next replica");
                        errors += 1;
                    }
                }
            }
        }
        if errors > 0 {
            let _ = self.refresh().await;
        }
        Ok(out)
    }

    /// Uploads blocks to each of their owners directly (the client replicates).
    pub async fn put_blocks(&self, items: Vec<PutItem>) -> Result<PutReport, ClientError> {
        let r = self.routing().await;
        if r.nodes.is_empty() {
            return Err(ClientError::Protocol("no members".into()));
        }
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, it) in items.iter().enumerate() {
            for n in owners(&r.seeds, &it.key, r.replicas) {
                groups.entry(n).or_default().push(i);
            }
        }
        let items = Arc::new(items);
        let calls = groups.into_iter().map(|(n, idx)| {
            let mut c = r.nodes[n].direct.clone();
            let items = items.clone();
            async move {
                let batch: Vec<PutItem> = idx.iter().map(|&i| items[i].clone()).collect();
                let res = match c.put_blocks(batch).await {
                    Ok(rep) => Ok(rep.outcomes),
                    Err(ClientError::Rejected { outcomes, .. }) => Ok(outcomes),
                    Err(e) => Err(e),
                };
                (idx, res)
            }
        });
        let mut replicas = vec![0u32; items.len()];
        let mut stored = vec![false; items.len()];
        let mut rejection: Vec<Option<(tonic::Code, String)>> = vec![None; items.len()];
        let mut errors = 0;
        for (idx, res) in futures::future::join_all(calls).await {
            match res {
                Ok(outcomes) if outcomes.len() == idx.len() => {
                    for (i, o) in idx.into_iter().zip(outcomes) {
                        match o.status {
                            PutStatus::Stored => {
                                replicas[i] += 1;
                                stored[i] = true;
                            }
                            PutStatus::AlreadyPresent => replicas[i] += 1,
                            PutStatus::Rejected { code, reason } => {
                                rejection[i] = Some((code, reason))
                            }
                        }
                    }
                }
                Ok(_) => errors += 1,
                Err(e) => {
                    debug!(error = %e, "replica write failed");
                    errors += 1;
                    for i in idx {
                        rejection[i].get_or_insert((
                            e.code().unwrap_or(tonic::Code::Unavailable),
                            e.to_string(),
                        ));
                    }
                }
            }
        }
        if errors > 0 {
            let _ = self.refresh().await;
        }
        let mut report = PutReport::default();
        for (i, it) in items.iter().enumerate() {
            report.raw_bytes += it.block.header.raw_len;
            report.wire_bytes += it.block.payload.len() as u64;
            let status = if replicas[i] > 0 {
                if stored[i] {
                    PutStatus::Stored
                } else {
                    PutStatus::AlreadyPresent
                }
            } else {
                let (code, reason) = rejection[i]
                    .clone()
                    .unwrap_or((tonic::Code::Unavailable, "no owner reachable".into()));
                PutStatus::Rejected { code, reason }
            };
            report.outcomes.push(BlockOutcome {
                key: it.key,
                status,
                replicas: replicas[i],
            });
        }
        let first_rejected =
            report
                .outcomes
                .iter()
                .enumerate()
                .find_map(|(index, o)| match &o.status {
                    PutStatus::Rejected { code, reason } => {
                        Some((index, o.key, *code, reason.clone()))
                    }
                    _ => None,
                });
        if let Some((index, key, code, reason)) = first_rejected {
            return Err(ClientError::Rejected {
                index,
                key,
                code,
                reason,
                outcomes: report.outcomes.clone(),
            });
        }
        Ok(report)
    }

    /// Compresses and uploads the first `blocks.len()` blocks of `tokens`.
    pub async fn put_prefix<B: AsRef<[u8]>>(
        &self,
        ns: &Namespace,
        tokens: &[u32],
        blocks: &[B],
    ) -> Result<PutReport, ClientError> {
        let keys = ns.block_keys(tokens)?;
        let items = encode_prefix(ns, &keys, blocks, self.opts.codec)?;
        self.put_blocks(items).await
    }

    /// Fetches, decodes and verifies the cached leading blocks of `tokens`.
    pub async fn get_prefix(
        &self,
        ns: &Namespace,
        tokens: &[u32],
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        let keys = ns.block_keys(tokens)?;
        let blocks = self.get_blocks(&ns.digest(), &keys).await?;
        decode_prefix(ns, &keys, blocks).await
    }
}

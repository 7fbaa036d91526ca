//! A cluster-aware client: fetches the membership with `ClusterInfo`, computes each key's owners
//! with the same rendezvous hashing as the nodes ([`PlacementView`]), and sends gets and puts
//! straight to the owners (one hop). Membership is refreshed periodically and after errors.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kvshare_core::placement::{Placed, PlacementView, ReplicaTally, ReplicaVerdict};
use kvshare_core::{BlockKey, EncodedBlock, Namespace};
use parking_lot::Mutex;
use tracing::debug;

use crate::{
    BlockOutcome, ClientError, ClientOptions, KvClient, PrefixLookup, PutItem, PutReport,
    PutStatus, fail_on_rejection, fetch_prefix, lookup_prefix, prefix_items,
};

/// One member as the client reaches it.
struct Node {
    node_id: String,
    endpoint: String,
    /// Plain client: the node coordinates (used for lookups and deletes).
    coordinator: KvClient,
    /// Do-not-forward client: the node answers from its own store.
    direct: KvClient,
}

impl Placed for Node {
    fn node_id(&self) -> &str {
        &self.node_id
    }
}

/// The placement view and when it was fetched.
struct Routing {
    view: PlacementView<Node>,
    fetched: Instant,
}

/// A replica's rejection of a block.
type Refusal = (tonic::Code, String);

/// Client of a kvshare cluster that routes to key owners directly.
pub struct ClusterClient {
    bootstrap: Vec<String>,
    opts: ClientOptions,
    routing: Mutex<Arc<Routing>>,
    refresh_every: Duration,
    next: AtomicUsize,
}

/// URL of a member's address: `https://` when the client uses TLS.
fn endpoint_of(addr: &str, opts: &ClientOptions) -> String {
    kvshare_proto::transport::endpoint_url(addr, opts.tls.is_some())
}

impl ClusterClient {
    /// Connects through any of `endpoints` and learns the membership.
    pub async fn connect(endpoints: &[String], opts: ClientOptions) -> Result<Self, ClientError> {
        let c = ClusterClient {
            bootstrap: endpoints.to_vec(),
            opts,
            routing: Mutex::new(Arc::new(Routing {
                view: PlacementView::new(Vec::new(), 1),
                fetched: Instant::now(),
            })),
            refresh_every: Duration::from_secs(5),
            next: AtomicUsize::new(0),
        };
        c.refresh().await?;
        Ok(c)
    }

    /// Re-reads the membership from any reachable node.
    pub async fn refresh(&self) -> Result<(), ClientError> {
        let mut candidates: Vec<String> = self
            .routing
            .lock()
            .view
            .members()
            .iter()
            .map(|n| n.endpoint.clone())
            .collect();
        candidates.extend(self.bootstrap.iter().cloned());
        let mut last_err = None;
        for ep in candidates {
            match self.membership_via(&ep).await {
                Ok(view) if !view.members().is_empty() => {
                    *self.routing.lock() = Arc::new(Routing {
                        view,
                        fetched: Instant::now(),
                    });
                    return Ok(());
                }
                Ok(_) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(ClientError::NoMemberReachable {
            endpoints: self.bootstrap.join(","),
            last: last_err.map(Box::new),
        })
    }

    /// The healthy members as the node at `ep` reports them, each connected.
    async fn membership_via(&self, ep: &str) -> Result<PlacementView<Node>, ClientError> {
        let mut c = KvClient::connect(&endpoint_of(ep, &self.opts), self.opts.clone()).await?;
        let info = c.cluster_info().await?;
        let mut nodes = Vec::new();
        for m in info.members.iter().filter(|m| m.healthy) {
            let ep = endpoint_of(&m.grpc_addr, &self.opts);
            match KvClient::connect(&ep, self.opts.clone()).await {
                Ok(client) => nodes.push(Node {
                    node_id: m.node_id.clone(),
                    endpoint: ep,
                    direct: client.clone().no_forward(),
                    coordinator: client,
                }),
                Err(e) => {
                    debug!(node = %m.node_id, error = %e, "member unreachable from this client")
                }
            }
        }
        Ok(PlacementView::new(nodes, info.replicas as usize))
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
        let r = self.routing.lock().clone();
        r.view.members().iter().map(|n| n.node_id.clone()).collect()
    }

    /// Node id of the first owner of `key` in the current view.
    pub fn primary_owner(&self, key: &BlockKey) -> Option<String> {
        let r = self.routing.lock().clone();
        r.view
            .owners(key)
            .first()
            .map(|&i| r.view.members()[i].node_id.clone())
    }

    /// Runs `call` on the members' coordinator clients in turn (round robin) until one
    /// answers; refreshes the membership and tries once more round if all fail.
    async fn on_any_member<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut last = None;
        for _ in 0..2 {
            let r = self.routing().await;
            let n = r.view.members().len();
            for _ in 0..n {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                match call(r.view.members()[i].coordinator.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e) => last = Some(e),
                }
            }
            let _ = self.refresh().await;
        }
        Err(last.unwrap_or_else(|| ClientError::Protocol("no members".into())))
    }

    /// Longest cached prefix of `tokens` (asked of one node, which fans out to the owners).
    pub async fn lookup(
        &self,
        ns: &Namespace,
        tokens: &[u32],
    ) -> Result<PrefixLookup, ClientError> {
        lookup_prefix(ns, tokens, async |d, k| self.lookup_keys(d, k).await).await
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
        self.on_any_member(|mut c| async move { c.lookup_keys(namespace, keys).await })
            .await
    }

    /// Deletes blocks from every owner (asked of one node, which fans out); returns how many
    /// copies existed.
    pub async fn delete_keys(
        &self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<u32, ClientError> {
        self.on_any_member(|mut c| async move { c.delete_keys(namespace, keys).await })
            .await
    }

    /// Fetches blocks from their owners directly; `None` for keys no owner has. When an owner
    /// fails (a node restarting, a connection to a restarted node), the membership is
    /// refreshed and the keys still missing are asked once more.
    pub async fn get_blocks(
        &self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<EncodedBlock>>, ClientError> {
        let (mut out, errors) = self.fetch_from_owners(namespace, keys).await?;
        if errors > 0 {
            let _ = self.refresh().await;
            let missing: Vec<usize> = (0..keys.len()).filter(|&i| out[i].is_none()).collect();
            if !missing.is_empty() {
                let sub: Vec<BlockKey> = missing.iter().map(|&i| keys[i]).collect();
                let (again, _) = self.fetch_from_owners(namespace, &sub).await?;
                for (i, b) in missing.into_iter().zip(again) {
                    out[i] = b;
                }
            }
        }
        Ok(out)
    }

    /// One pass of [`ClusterClient::get_blocks`]: the blocks, and how many owner calls failed.
    async fn fetch_from_owners(
        &self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<(Vec<Option<EncodedBlock>>, usize), ClientError> {
        let r = self.routing().await;
        if r.view.members().is_empty() {
            return Err(ClientError::Protocol("no members".into()));
        }
        let errors = AtomicUsize::new(0);
        let hedge = self.opts.hedge_after;
        let (out, _) = r
            .view
            .fetch_hedged(keys, || tokio::time::sleep(hedge), |n, idx| {
                let mut c = r.view.members()[n].direct.clone();
                let sub: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
                let errors = &errors;
                async move {
                    match c.get_blocks(namespace, &sub).await {
                        Ok(blocks) => (idx, blocks),
                        Err(e) => {
                            debug!(error = %e, "owner failed; falling over to the next replica");
                            errors.fetch_add(1, Ordering::Relaxed);
                            let none = vec![None; idx.len()];
                            (idx, none)
                        }
                    }
                }
            })
            .await;
        Ok((out, errors.load(Ordering::Relaxed)))
    }

    /// Fetches, decodes and verifies the cached leading blocks of `tokens`.
    pub async fn get_prefix(
        &self,
        ns: &Namespace,
        tokens: &[u32],
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        fetch_prefix(ns, tokens, async |d, k| self.get_blocks(d, k).await).await
    }

    /// Uploads blocks to each of their owners directly (the client replicates).
    pub async fn put_blocks(&self, items: Vec<PutItem>) -> Result<PutReport, ClientError> {
        let r = self.routing().await;
        if r.view.members().is_empty() {
            return Err(ClientError::Protocol("no members".into()));
        }
        let keys: Vec<BlockKey> = items.iter().map(|it| it.key).collect();
        let items = Arc::new(items);
        let calls = r.view.all_owner_groups(&keys).into_iter().map(|(n, idx)| {
            let mut c = r.view.members()[n].direct.clone();
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
        let mut tallies: Vec<ReplicaTally<Refusal>> = vec![ReplicaTally::default(); items.len()];
        let mut errors = 0;
        for (idx, res) in futures::future::join_all(calls).await {
            errors += usize::from(!tally_replica(&mut tallies, idx, res));
        }
        if errors > 0 {
            let _ = self.refresh().await;
        }
        put_report(&items, tallies)
    }

    /// Compresses and uploads the first `blocks.len()` blocks of `tokens`.
    pub async fn put_prefix<B: AsRef<[u8]> + Sync>(
        &self,
        ns: &Namespace,
        tokens: &[u32],
        blocks: &[B],
    ) -> Result<PutReport, ClientError> {
        self.put_blocks(prefix_items(ns, tokens, blocks, self.opts.codec)?)
            .await
    }
}

/// Adds one replica's answer for the blocks `idx` to their tallies; false when the replica
/// failed as a whole.
fn tally_replica(
    tallies: &mut [ReplicaTally<Refusal>],
    idx: Vec<usize>,
    res: Result<Vec<BlockOutcome>, ClientError>,
) -> bool {
    match res {
        Ok(outcomes) if outcomes.len() == idx.len() => {
            for (i, o) in idx.into_iter().zip(outcomes) {
                match o.status {
                    PutStatus::Stored => tallies[i].ack(true),
                    PutStatus::AlreadyPresent => tallies[i].ack(false),
                    PutStatus::Rejected { code, reason } => tallies[i].reject((code, reason)),
                }
            }
            true
        }
        Ok(outcomes) => {
            debug!(
                outcomes = outcomes.len(),
                blocks = idx.len(),
                "replica answered the wrong number of outcomes"
            );
            false
        }
        // The replica answered but refuses this client (no or unknown token, a role that may
        // not write): every node has the same auth file, so no other replica would accept it
        // either. A refusal of each block, not an unreachable owner.
        Err(ClientError::Rpc { code, message })
            if matches!(
                code,
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) =>
        {
            for i in idx {
                tallies[i].reject((code, message.clone()));
            }
            true
        }
        Err(e) => {
            debug!(error = %e, "replica write failed");
            for i in idx {
                tallies[i].unreachable(e.to_string());
            }
            false
        }
    }
}

/// The report of a replicated upload; fails with the first rejected block.
fn put_report(
    items: &[PutItem],
    tallies: Vec<ReplicaTally<Refusal>>,
) -> Result<PutReport, ClientError> {
    let mut report = PutReport::default();
    for (it, tally) in items.iter().zip(tallies) {
        report.raw_bytes += it.block.header.raw_len;
        report.wire_bytes += it.block.payload.len() as u64;
        let (status, replicas) = match tally.verdict() {
            ReplicaVerdict::Held {
                replicas,
                newly_stored,
            } => {
                let status = if newly_stored {
                    PutStatus::Stored
                } else {
                    PutStatus::AlreadyPresent
                };
                (status, replicas)
            }
            ReplicaVerdict::Rejected((code, reason)) => (PutStatus::Rejected { code, reason }, 0),
            ReplicaVerdict::Unreachable(why) => {
                let reason = format!("no owner reachable ({})", why.join("; "));
                let code = tonic::Code::Unavailable;
                (PutStatus::Rejected { code, reason }, 0)
            }
        };
        report.outcomes.push(BlockOutcome {
            key: it.key,
            status,
            replicas,
        });
    }
    report.outcomes = fail_on_rejection(report.outcomes)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(byte: u8) -> PutItem {
        let ns = Namespace {
            model: "m".into(),
            revision: String::new(),
            layout: kvshare_core::KvLayout {
                num_layers: 1,
                num_kv_heads: 1,
                head_dim: 8,
                dtype: kvshare_core::DType::F16,
                tokens_per_block: 4,
            },
            tp_rank: 0,
            tp_size: 1,
            lora: None,
            tenant_salt: None,
            scheme: kvshare_core::KeyScheme::Chained,
        };
        let raw = vec![byte; ns.layout.block_bytes() as usize];
        let keys = ns.block_keys(&[1, 2, 3, 4]).expect("keys");
        crate::encode_blocks(
            &ns,
            &keys,
            0,
            &[raw.as_slice()],
            kvshare_core::Codec::None,
            1,
        )
        .expect("encode")
        .remove(0)
    }

    fn rpc(code: tonic::Code) -> ClientError {
        ClientError::Rpc {
            code,
            message: format!("{code:?} from the node"),
        }
    }

    #[test]
    fn auth_refusals_are_rejections_with_their_code_not_unreachable_owners() {
        for code in [tonic::Code::Unauthenticated, tonic::Code::PermissionDenied] {
            let items = vec![item(1)];
            let mut tallies = vec![ReplicaTally::default()];
            assert!(tally_replica(&mut tallies, vec![0], Err(rpc(code))));
            assert!(tally_replica(&mut tallies, vec![0], Err(rpc(code))));
            let e = put_report(&items, tallies).expect_err("refused");
            assert_eq!(e.code(), Some(code), "{e}");
        }
    }

    #[test]
    fn transport_failures_stay_unreachable_and_one_ack_holds() {
        let items = vec![item(2)];
        let mut tallies = vec![ReplicaTally::default()];
        assert!(!tally_replica(
            &mut tallies,
            vec![0],
            Err(rpc(tonic::Code::Unavailable))
        ));
        let e = put_report(&items, tallies).expect_err("unreachable");
        assert_eq!(e.code(), Some(tonic::Code::Unavailable), "{e}");
        assert!(e.to_string().contains("no owner reachable"), "{e}");

        // One replica refusing and another storing: the block is held.
        let mut tallies = vec![ReplicaTally::default()];
        tally_replica(
            &mut tallies,
            vec![0],
            Err(rpc(tonic::Code::PermissionDenied)),
        );
        let ok = vec![BlockOutcome {
            key: items[0].key,
            status: PutStatus::Stored,
            replicas: 1,
        }];
        assert!(tally_replica(&mut tallies, vec![0], Ok(ok)));
        assert_eq!(put_report(&items, tallies).expect("held").stored(), 1);
    }
}

//! Fan-out to owners: how a node answers a request whose keys live on other members. Every
//! forwarded request carries the do-not-forward header, so it is answered from the receiving
//! node's store only (one hop).

use std::collections::HashMap;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use std::sync::Arc;

use bytes::Bytes;
use kvshare_core::keys::pack_keys;
use kvshare_core::wire::{GetAssembler, put_chunks};
use kvshare_core::{BlockKey, EncodedBlock};
use kvshare_proto::transport::{KvClient, TENANT_HEADER, mark_no_forward};
use kvshare_proto::v1 as pb;
use pb::block_outcome::Status as OutcomeStatus;
use tonic::{Code, Request, Status};
use tracing::{debug, warn};

use crate::auth::{Space, Tenant};
use crate::budget::Charge;
use crate::cluster::{Member, Target, View};
use crate::deadline;
use crate::metrics::{ForwardLabels, Method};
use crate::rejection::{Rejection, is_unreachable};
use crate::state::NodeState;

/// Largest block chunk in a forwarded Put.
const FORWARD_CHUNK: usize = 4 << 20;

/// A verified block bound for a remote owner.
pub struct Forward {
    /// Index of the block's outcome in the Put response.
    pub outcome: usize,
    /// Key.
    pub key: BlockKey,
    /// Parent key.
    pub parent: Option<BlockKey>,
    /// The block.
    pub block: Arc<EncodedBlock>,
}

/// What one owner answered for one forwarded block: `Ok(newly stored)` or why not.
pub struct ForwardResult {
    /// Index of the block's outcome in the Put response.
    pub outcome: usize,
    /// The owner.
    pub node_id: String,
    /// Its answer.
    pub result: Result<bool, Rejection>,
}

/// A request to a peer: deadline, the do-not-forward header, and the tenant it acts for (the
/// peer token itself is added by the client's interceptor).
fn peer_request<T>(msg: T, state: &NodeState, tenant: &Tenant) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(deadline::budget(state.cluster.forward_timeout()));
    mark_no_forward(&mut r);
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(&*tenant.name) {
        r.metadata_mut().insert(TENANT_HEADER, v);
    }
    r
}

fn count_forward(state: &NodeState, method: Method) {
    state
        .metrics
        .forwarded
        .get_or_create(&ForwardLabels { method })
        .inc();
}

/// Logs a failed forwarded request and, when the peer did not answer, reports it to the
/// cluster (the peer is health-checked at once; only failed checks mark it down).
fn peer_failed(state: &NodeState, member: &Member, method: Method, status: &Status) {
    debug!(peer = %member.node_id, ?method, %status, "forwarded request failed");
    if is_unreachable(status.code()) {
        state.cluster.report_failure(&member.node_id);
    }
}

/// Presence of every key on any of its owners. Once every key has an answer from at least one
/// owner, slower owners get the hedge delay to answer too (a copy only they hold still
/// counts), then are left behind: a frozen owner costs a lookup that delay, not its timeout.
pub async fn lookup(state: &NodeState, view: &View, ns: &Space, keys: &[BlockKey]) -> Vec<bool> {
    let mut calls: FuturesUnordered<_> = view
        .all_owner_groups(keys)
        .into_iter()
        .map(|(m, idx)| {
            let member = &view.members()[m];
            let sub: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
            async move {
                let present = match &member.target {
                    Target::Local => Some(state.store.presence(ns.store, &sub)),
                    Target::Remote(client) => lookup_remote(state, member, client, ns, &sub).await,
                };
                (idx, present)
            }
        })
        .collect();
    let mut present = vec![false; keys.len()];
    let mut covered = vec![false; keys.len()];
    let mut uncovered = keys.len();
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        let next = match grace.as_mut() {
            Some(g) => tokio::select! {
                r = calls.next() => r,
                _ = g => break,
            },
            None => calls.next().await,
        };
        let Some((idx, answer)) = next else { break };
        for (i, hit) in idx.into_iter().zip(answer.unwrap_or_default()) {
            present[i] |= hit;
            if !covered[i] {
                covered[i] = true;
                uncovered -= 1;
            }
        }
        if uncovered == 0 {
            if present.iter().all(|p| *p) {
                break;
            }
            if grace.is_none() {
                grace = Some(Box::pin(tokio::time::sleep(state.cluster.hedge_after())));
            }
        }
    }
    present
}

/// Presence of `keys` on one peer (a per-key Lookup marked do-not-forward); `None` when the
/// peer failed (counted against its health when it did not answer).
pub async fn lookup_remote(
    state: &NodeState,
    member: &Member,
    client: &KvClient,
    ns: &Space,
    keys: &[BlockKey],
) -> Option<Vec<bool>> {
    count_forward(state, Method::lookup);
    let req = pb::LookupRequest {
        namespace: Bytes::copy_from_slice(&ns.wire.0),
        keys: Vec::new(),
        packed_keys: pack_keys(keys),
        per_key: true,
    };
    match client
        .clone()
        .lookup(peer_request(req, state, &ns.tenant))
        .await
    {
        Ok(r) if r.get_ref().present.len() == keys.len() => {
            state.cluster.report_success(&member.node_id);
            Some(r.into_inner().present)
        }
        Ok(r) => {
            let n = r.get_ref().present.len();
            let status = Status::internal(format!("{n} presence flags for {} keys", keys.len()));
            peer_failed(state, member, Method::lookup, &status);
            None
        }
        Err(s) => {
            peer_failed(state, member, Method::lookup, &s);
            None
        }
    }
}

/// A block fetched for a forwarded Get, with the budget charge of its buffer (none for a block
/// of the local store, which its capacity already counts).
pub struct Fetched {
    /// The block.
    pub block: Arc<EncodedBlock>,
    /// Budget held for it until it has been sent.
    pub charge: Charge,
}

/// What a peer's Get gave: a block (or a miss) per key, `None` when the peer failed.
type PeerBlocks = Option<Vec<Option<Fetched>>>;

async fn get_remote(
    state: &NodeState,
    member: &Member,
    client: &KvClient,
    ns: &Space,
    keys: &[BlockKey],
    credit: &std::sync::Mutex<Charge>,
) -> Result<PeerBlocks, Rejection> {
    count_forward(state, Method::get);
    let req = pb::GetRequest {
        namespace: Bytes::copy_from_slice(&ns.wire.0),
        keys: Vec::new(),
        packed_keys: pack_keys(keys),
    };
    let mut charges: Vec<Charge> = std::iter::repeat_with(Charge::default)
        .take(keys.len())
        .collect();
    let mut refused = None;
    let result = async {
        let mut stream = client
            .clone()
            .get(peer_request(req, state, &ns.tenant))
            .await?
            .into_inner();
        let mut asm = GetAssembler::new(keys);
        while let Some(m) = stream.message().await? {
            // Every received byte is charged before it is kept, twice: the block held until it
            // is sent, and the copy its response messages are encoded into.
            let need = 2 * m.data.len() as u64;
            let prepaid = credit.lock().ok().and_then(|mut c| c.take(need));
            let charge = match prepaid {
                Some(c) => Ok(c),
                None => state.budget.charge(need, "a forwarded Get").await,
            };
            match (charge, charges.get_mut(m.index as usize)) {
                (Ok(c), Some(held)) => held.absorb(c),
                (Ok(_), None) => {}
                (Err(r), _) => {
                    refused = Some(r);
                    return Err(Status::cancelled("no room in the buffer budget"));
                }
            }
            asm.push(m).map_err(|e| Status::data_loss(e.to_string()))?;
        }
        asm.finish().map_err(|e| Status::data_loss(e.to_string()))
    }
    .await;
    if let Some(r) = refused {
        return Err(r);
    }
    if result.is_ok() {
        state.cluster.report_success(&member.node_id);
    }
    Ok(match result {
        Ok(blocks) => Some(
            blocks
                .into_iter()
                .zip(charges)
                .map(|(b, charge)| {
                    b.map(|b| Fetched {
                        block: Arc::new(b),
                        charge,
                    })
                })
                .collect(),
        ),
        Err(s) => {
            peer_failed(state, member, Method::get, &s);
            None
        }
    })
}

/// Blocks of `keys`, each from the first owner that has it (owners tried in rank order).
/// What peers send is paid from `credit` (reserved ahead) while it lasts, then charged to the
/// budget. Fails only when the budget has no room for what the owners send.
pub async fn get(
    state: &NodeState,
    view: &View,
    ns: &Space,
    keys: &[BlockKey],
    credit: Charge,
) -> Result<Vec<Option<Fetched>>, Rejection> {
    let credit = std::sync::Mutex::new(credit);
    let refused = std::sync::Mutex::new(None);
    let hedge = state.cluster.hedge_after();
    let delay = || tokio::time::sleep(hedge);
    let (found, fallbacks) = view
        .fetch_hedged(keys, delay, |m, idx| {
            let member = &view.members()[m];
            let sub: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
            let (refused, credit) = (&refused, &credit);
            async move {
                let got: Vec<Option<Fetched>> = match &member.target {
                    Target::Local => state
                        .store
                        .get_many(ns.store, &sub)
                        .into_iter()
                        .map(|b| {
                            b.map(|block| Fetched {
                                block,
                                charge: Charge::default(),
                            })
                        })
                        .collect(),
                    Target::Remote(client) => {
                        match get_remote(state, member, client, ns, &sub, credit).await {
                            Ok(Some(v)) => v,
                            Ok(None) => std::iter::repeat_with(|| None).take(sub.len()).collect(),
                            Err(r) => {
                                if let Ok(mut slot) = refused.lock() {
                                    slot.get_or_insert(r);
                                }
                                std::iter::repeat_with(|| None).take(sub.len()).collect()
                            }
                        }
                    }
                };
                (idx, got)
            }
        })
        .await;
    state.metrics.failovers.inc_by(fallbacks);
    match refused.into_inner() {
        Ok(Some(r)) => Err(r),
        _ => Ok(found),
    }
}

/// Deletes `keys` on every owner; returns the number of copies removed. An owner that fails
/// is logged and counted against its health; the copies it may hold are not counted.
pub async fn delete(state: &NodeState, view: &View, ns: &Space, keys: &[BlockKey]) -> u32 {
    let calls = view.all_owner_groups(keys).into_iter().map(|(m, idx)| {
        let member = &view.members()[m];
        let sub: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
        async move {
            match &member.target {
                Target::Local => state.remove_local(ns.store, &sub),
                Target::Remote(client) => {
                    count_forward(state, Method::delete);
                    let req = pb::DeleteRequest {
                        namespace: Bytes::copy_from_slice(&ns.wire.0),
                        keys: Vec::new(),
                        packed_keys: pack_keys(&sub),
                    };
                    match client
                        .clone()
                        .delete(peer_request(req, state, &ns.tenant))
                        .await
                    {
                        Ok(r) => r.into_inner().deleted,
                        Err(s) => {
                            warn!(peer = %member.node_id, status = %s, keys = sub.len(), "forwarded delete failed; copies on that peer may remain");
                            peer_failed(state, member, Method::delete, &s);
                            0
                        }
                    }
                }
            }
        }
    });
    futures::future::join_all(calls).await.into_iter().sum()
}

/// Sends batched blocks to their remote owners (member index -> blocks), in parallel.
pub async fn forward_puts(
    state: &NodeState,
    view: &View,
    tenant: &Tenant,
    batches: HashMap<usize, Vec<Forward>>,
) -> Vec<ForwardResult> {
    let calls = batches.into_iter().map(|(m, items)| {
        let member = &view.members()[m];
        async move {
            let Target::Remote(client) = &member.target else {
                return Vec::new();
            };
            let results = forward_batch(state, client, tenant, &items)
                .await
                .map_err(|s| {
                    peer_failed(state, member, Method::put, &s);
                    Rejection::from(&s)
                });
            batch_results(member, &items, results)
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// One Put of `items` to a peer: every block's outcome, or the call's failure.
async fn forward_batch(
    state: &NodeState,
    client: &KvClient,
    tenant: &Tenant,
    items: &[Forward],
) -> Result<Vec<pb::BlockOutcome>, Status> {
    count_forward(state, Method::put);
    let msgs: Vec<pb::PutRequest> = items
        .iter()
        .flat_map(|f| put_chunks(&f.key, f.parent.as_ref(), &f.block, FORWARD_CHUNK))
        .collect();
    let outcomes = match client
        .clone()
        .put(peer_request(tokio_stream::iter(msgs), state, tenant))
        .await
    {
        Ok(r) => r.into_inner().outcomes,
        // A rejected block fails the call, with every outcome in the details.
        Err(s) => match kvshare_proto::rpc::decode_put_details(s.details()) {
            Some(d) => d.outcomes,
            None => return Err(s),
        },
    };
    if outcomes.len() != items.len() {
        return Err(Status::internal(format!(
            "peer answered {} outcomes for {} blocks",
            outcomes.len(),
            items.len()
        )));
    }
    Ok(outcomes)
}

/// Per-block results of one forwarded batch.
fn batch_results(
    member: &Member,
    items: &[Forward],
    outcomes: Result<Vec<pb::BlockOutcome>, Rejection>,
) -> Vec<ForwardResult> {
    let result_of = |o: Result<&pb::BlockOutcome, &Rejection>| match o {
        Ok(o) => match OutcomeStatus::try_from(o.status) {
            Ok(OutcomeStatus::Stored) => Ok(true),
            Ok(OutcomeStatus::AlreadyPresent) => Ok(false),
            _ => Err(Rejection::new(Code::from_i32(o.code), o.reason.clone())),
        },
        Err(r) => Err(r.clone()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, f)| ForwardResult {
            outcome: f.outcome,
            node_id: member.node_id.clone(),
            result: result_of(outcomes.as_ref().map(|os| &os[i])),
        })
        .collect()
}

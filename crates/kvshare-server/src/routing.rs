//! Fan-out to owners: how a node answers a request whose keys live on other members.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use kvshare_core::wire::{GetAssembler, put_chunks};
use kvshare_core::{BlockKey, EncodedBlock};
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;
use pb::block_outcome::Status as OutcomeStatus;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::cluster::{HOP_HEADER, HOP_LOCAL, Target, View};
use crate::metrics::{ForwardLabels, Method};
use crate::put::Forward;
use crate::service::NodeState;

/// Largest block chunk in a forwarded Put.
const FORWARD_CHUNK: usize = 4 << 20;

fn hop_request<T>(msg: T, state: &NodeState) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(state.cluster.forward_timeout());
    r.metadata_mut().insert(
        HOP_HEADER,
        tonic::metadata::MetadataValue::from_static(HOP_LOCAL),
    );
    r
}

fn keys_bytes(keys: &[BlockKey]) -> Vec<Bytes> {
    keys.iter().map(|k| Bytes::copy_from_slice(&k.0)).collect()
}

fn count_forward(state: &NodeState, method: Method) {
    state
        .metrics
        .forwarded
        .get_or_create(&ForwardLabels { method })
        .inc();
}

fn is_unreachable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// Key indices grouped by the member that should answer for them: member index -> key indices.
fn group<F: Fn(usize) -> Option<usize>>(n: usize, pick: F) -> HashMap<usize, Vec<usize>> {
    let mut m: HashMap<usize, Vec<usize>> = HashMap::new();
    for i in 0..n {
        if let Some(member) = pick(i) {
            m.entry(member).or_default().push(i);
        }
    }
    m
}

/// Presence of every key on any of its owners.
pub(crate) async fn lookup(
    state: &NodeState,
    view: &View,
    ns: BlockKey,
    keys: &[BlockKey],
) -> Vec<bool> {
    let owners: Vec<Vec<usize>> = keys.iter().map(|k| view.owners(k)).collect();
    let mut per_member: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, o) in owners.iter().enumerate() {
        for m in o {
            per_member.entry(*m).or_default().push(i);
        }
    }
    let calls = per_member.into_iter().map(|(m, idx)| {
        let member = &view.members[m];
        let sub: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
        async move {
            let present = match &member.target {
                Target::Local => Some(state.store.presence(ns, &sub)),
                Target::Remote(client) => {
                    count_forward(state, Method::lookup);
                    let req = pb::LookupRequest {
                        namespace: Bytes::copy_from_slice(&ns.0),
                        keys: keys_bytes(&sub),
                        per_key: true,
                    };
                    match client.clone().lookup(hop_request(req, state)).await {
                        Ok(r) if r.get_ref().present.len() == sub.len() => {
                            Some(r.into_inner().present)
                        }
                        Ok(_) => None,
                        Err(s) => {
                            if is_unreachable(s.code()) {
                                state.cluster.report_failure(&member.node_id);
                            }
                            None
                        }
                    }
                }
            };
            (idx, present)
        }
    });
    let mut present = vec![false; keys.len()];
    for (idx, p) in futures::future::join_all(calls).await {
        if let Some(p) = p {
            for (i, hit) in idx.into_iter().zip(p) {
                present[i] |= hit;
            }
        }
    }
    present
}

async fn get_remote(
    state: &NodeState,
    node_id: &str,
    client: &KvCacheClient<Channel>,
    ns: BlockKey,
    keys: &[BlockKey],
) -> Option<Vec<Option<EncodedBlock>>> {
    count_forward(state, Method::get);
    let req = pb::GetRequest {
        namespace: Bytes::copy_from_slice(&ns.0),
        keys: keys_bytes(keys),
    };
    let result = async {
        let mut stream = client
            .clone()
            .get(hop_request(req, state))
            .await?
            .into_inner();
        let mut asm = GetAssembler::new(keys);
        while let Some(m) = stream.message().await? {
            asm.push(m)
                .map_err(|e| tonic::Status::data_loss(e.to_string()))?;
        }
        asm.finish()
            .map_err(|e| tonic::Status::data_loss(e.to_string()))
    }
    .await;
    match result {
        Ok(v) => Some(v),
        Err(s) => {
            tracing::debug!(peer = node_id, status = %s, "forwarded get failed; falling over");
            if is_unreachable(s.code()) {
                state.cluster.report_failure(node_id);
            }
            None
        }
    }
}

/// Blocks of `keys`, each from the first owner that has it (owners tried in rank order).
pub(crate) async fn get(
    state: &NodeState,
    view: &View,
    ns: BlockKey,
    keys: &[BlockKey],
) -> Vec<Option<Arc<EncodedBlock>>> {
    let owners: Vec<Vec<usize>> = keys.iter().map(|k| view.owners(k)).collect();
    let mut out: Vec<Option<Arc<EncodedBlock>>> = vec![None; keys.len()];
    for round in 0..view.replicas {
        let todo = group(keys.len(), |i| {
            if out[i].is_none() {
                owners[i].get(round).copied()
            } else {
                None
            }
        });
        if todo.is_empty() {
            break;
        }
        let calls = todo.into_iter().map(|(m, idx)| {
            let member = &view.members[m];
            let sub: Vec<BlockKey> = idx.iter().map(|&i| keys[i]).collect();
            async move {
                let got: Vec<Option<Arc<EncodedBlock>>> = match &member.target {
                    Target::Local => state.store.get_many(ns, &sub),
                    Target::Remote(client) => {
                        match get_remote(state, &member.node_id, client, ns, &sub).await {
                            Some(v) => v.into_iter().map(|b| b.map(Arc::new)).collect(),
                            None => vec![None; sub.len()],
                        }
                    }
                };
                (idx, got)
            }
        });
        for (idx, got) in futures::future::join_all(calls).await {
            for (i, b) in idx.into_iter().zip(got) {
                if b.is_some() {
                    if round > 0 {
                        state.metrics.failovers.inc();
                    }
                    out[i] = b;
                }
            }
        }
    }
    out
}

/// Deletes `keys` on every owner; returns the number of copies removed.
pub(crate) async fn delete(state: &NodeState, view: &View, ns: BlockKey, keys: &[BlockKey]) -> u32 {
    let mut per_member: HashMap<usize, Vec<BlockKey>> = HashMap::new();
    for k in keys {
        for m in view.owners(k) {
            per_member.entry(m).or_default().push(*k);
        }
    }
    let calls = per_member.into_iter().map(|(m, sub)| {
        let member = &view.members[m];
        async move {
            match &member.target {
                Target::Local => sub
                    .iter()
                    .filter(|k| {
                        state.store.remove(&kvshare_core::StoreKey {
                            namespace: ns,
                            key: **k,
                        })
                    })
                    .count() as u32,
                Target::Remote(client) => {
                    count_forward(state, Method::delete);
                    let req = pb::DeleteRequest {
                        namespace: Bytes::copy_from_slice(&ns.0),
                        keys: keys_bytes(&sub),
                    };
                    client
                        .clone()
                        .delete(hop_request(req, state))
                        .await
                        .map(|r| r.into_inner().deleted)
                        .unwrap_or(0)
                }
            }
        }
    });
    futures::future::join_all(calls).await.into_iter().sum()
}

/// Sends batched blocks to their remote owners; returns (outcome index, node id, result) where
/// a result is Ok(newly stored) or the owner's rejection.
pub(crate) async fn forward_puts(
    state: &NodeState,
    view: &View,
    batches: HashMap<usize, Vec<Forward>>,
) -> Vec<(usize, String, Result<bool, (Code, String)>)> {
    let calls = batches.into_iter().map(|(m, items)| {
        let member = &view.members[m];
        async move {
            let Target::Remote(client) = &member.target else {
                return Vec::new();
            };
            count_forward(state, Method::put);
            let msgs: Vec<pb::PutRequest> = items
                .iter()
                .flat_map(|f| put_chunks(&f.key, f.parent.as_ref(), &f.block, FORWARD_CHUNK))
                .collect();
            let outcomes: Result<Vec<pb::BlockOutcome>, tonic::Status> = match client
                .clone()
                .put(hop_request(tokio_stream::iter(msgs), state))
                .await
            {
                Ok(r) => Ok(r.into_inner().outcomes),
                Err(s) => match kvshare_proto::rpc::decode_put_details(s.details()) {
                    Some(d) if d.outcomes.len() == items.len() => Ok(d.outcomes),
                    _ => Err(s),
                },
            };
            match outcomes {
                Ok(os) if os.len() == items.len() => items
                    .iter()
                    .zip(os)
                    .map(|(f, o)| {
                        let r = match OutcomeStatus::try_from(o.status) {
                            Ok(OutcomeStatus::Stored) => Ok(true),
                            Ok(OutcomeStatus::AlreadyPresent) => Ok(false),
                            _ => Err((Code::from_i32(o.code), o.reason)),
                        };
                        (f.outcome, member.node_id.clone(), r)
                    })
                    .collect(),
                other => {
                    let (code, msg) = match other {
                        Err(s) => (s.code(), s.message().to_string()),
                        Ok(os) => (
                            Code::Internal,
                            format!(
                                "peer answered {} outcomes for {} blocks",
                                os.len(),
                                items.len()
                            ),
                        ),
                    };
                    if is_unreachable(code) {
                        state.cluster.report_failure(&member.node_id);
                    }
                    items
                        .iter()
                        .map(|f| (f.outcome, member.node_id.clone(), Err((code, msg.clone()))))
                        .collect()
                }
            }
        }
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

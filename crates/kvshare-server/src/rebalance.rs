//! Re-replication: every node, in the background, makes sure each block it holds is also held
//! by every owner the current placement gives it, so R copies exist again after members leave,
//! return or join.
//!
//! A sweep walks the local store (least recently used first, without changing recency), asks
//! each remote owner which of its blocks it lacks (a per-key Lookup marked do-not-forward) and
//! copies the missing ones to it with forwarded Puts, paced to `--rereplicate-rate`. It covers:
//! - **a member that returns or joins** (swept after [`SETTLE`]): copies written while it was
//!   away went to stand-in owners; they hand them back (hinted handoff), so reads that ask
//!   only the current owners find them;
//! - **a member down longer than `--rereplicate-after-ms`**: the surviving owners copy its blocks
//!   to the owners that replace it, so a second loss does not lose them;
//! - a periodic sweep every `--rebalance-interval-ms` catches anything missed.
//!
//! Stand-in copies stay where they are (they age out of the LRU like any block).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvshare_core::{BlockKey, StoreKey};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::auth::{Space, Tenant};
use crate::cluster::{Target, View};
use crate::routing::{self, Forward};
use crate::state::NodeState;

/// How long membership must be stable after a member returns or joins before a sweep.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Keys asked of one owner per Lookup.
const BATCH_KEYS: usize = 1_024;
/// Blocks sent to one owner per forwarded Put.
const PUSH_BYTES: u64 = 16 << 20;
/// How often membership is looked at.
const TICK: Duration = Duration::from_millis(250);

/// Re-replication settings.
#[derive(Debug, Clone)]
pub struct RebalanceConfig {
    /// How long a member must be down before its blocks are copied to its replacements.
    pub after_down: Duration,
    /// Interval of the periodic sweep.
    pub interval: Duration,
    /// Most bytes copied per second.
    pub rate: u64,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Local blocks looked at.
    pub blocks: u64,
    /// Local blocks missing on at least one owner.
    pub under_replicated: u64,
    /// Copies made.
    pub copied: u64,
}

/// Runs sweeps when membership changes (and periodically) until `shutdown`.
pub async fn run(
    state: Arc<NodeState>,
    config: RebalanceConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut seen: BTreeSet<String> = members(&state.cluster.view());
    let mut last_sweep = Instant::now();
    // When a sweep is due because members returned or joined, and because members left.
    let (mut join_due, mut leave_due): (Option<Instant>, Option<Instant>) = (None, None);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.wait_for(|v| *v) => return,
        }
        let view = state.cluster.view();
        let now = members(&view);
        let t = Instant::now();
        if now.difference(&seen).next().is_some() {
            join_due = Some(t + SETTLE);
        }
        if seen.difference(&now).next().is_some() {
            leave_due = Some(t + config.after_down);
        }
        seen = now;
        let reached = |due: Option<Instant>| due.is_some_and(|d| d <= t);
        let due =
            reached(join_due) || reached(leave_due) || last_sweep.elapsed() >= config.interval;
        if !due || view.is_single() {
            continue;
        }
        join_due = join_due.filter(|d| *d > t);
        leave_due = leave_due.filter(|d| *d > t);
        let report = sweep(&state, &view, config.rate).await;
        info!(
            members = view.members().len(),
            blocks = report.blocks,
            under_replicated = report.under_replicated,
            copied = report.copied,
            ms = t.elapsed().as_millis() as u64,
            "re-replication sweep"
        );
        state.metrics.rebalance_sweeps.inc();
        last_sweep = Instant::now();
    }
}

fn members(view: &View) -> BTreeSet<String> {
    view.members().iter().map(|m| m.node_id.clone()).collect()
}

/// One pass over the local store against `view`.
pub async fn sweep(state: &NodeState, view: &View, rate: u64) -> SweepReport {
    let mut by_ns: HashMap<BlockKey, Vec<BlockKey>> = HashMap::new();
    for sk in state.store.keys_oldest_first() {
        by_ns.entry(sk.namespace).or_default().push(sk.key);
    }
    let mut report = SweepReport::default();
    let started = Instant::now();
    let mut copied_bytes = 0u64;
    for (ns, keys) in by_ns {
        let Some(space) = space_of(state, ns, &keys) else {
            continue;
        };
        for batch in keys.chunks(BATCH_KEYS) {
            report.blocks += batch.len() as u64;
            let (under, copied, bytes) = repair_batch(state, view, &space, batch).await;
            report.under_replicated += under;
            report.copied += copied;
            copied_bytes += bytes;
            pace(started, copied_bytes, rate).await;
        }
    }
    state
        .metrics
        .under_replicated_blocks
        .set(report.under_replicated as i64);
    report
}

/// The tenant and client namespace of stored namespace `ns`, from one of its blocks (their
/// headers carry the namespace as the client sent it; the store knows the tenant). Copies go to
/// owners as the client's namespace plus the tenant header, so the owner maps them once, as it
/// maps forwarded Puts.
fn space_of(state: &NodeState, ns: BlockKey, keys: &[BlockKey]) -> Option<Space> {
    let stored = keys.iter().find_map(|k| {
        state.store.peek(&StoreKey {
            namespace: ns,
            key: *k,
        })
    })?;
    let tenant = Tenant {
        id: state.store.tenant_id(&stored.tenant),
        name: stored.tenant.clone(),
    };
    let space = tenant.space_of(stored.block.header.namespace);
    if space.store != ns {
        warn!(tenant = %tenant.name, "re-replication: stored namespace does not match its blocks' tenant; skipped");
        return None;
    }
    Some(space)
}

/// Sleeps so that `bytes` since `started` stay within `rate` bytes per second.
async fn pace(started: Instant, bytes: u64, rate: u64) {
    let due = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        tokio::time::sleep(wait).await;
    }
}

/// Checks one batch of local keys against their remote owners and copies what they lack.
/// Returns (blocks missing somewhere, copies made, bytes copied).
async fn repair_batch(
    state: &NodeState,
    view: &View,
    ns: &Space,
    keys: &[BlockKey],
) -> (u64, u64, u64) {
    let mut per_owner: HashMap<usize, Vec<BlockKey>> = HashMap::new();
    for k in keys {
        for m in view.owners(k) {
            if matches!(view.members()[m].target, Target::Remote(_)) {
                per_owner.entry(m).or_default().push(*k);
            }
        }
    }
    let mut missing_anywhere: BTreeSet<BlockKey> = BTreeSet::new();
    let mut batches: HashMap<usize, Vec<Forward>> = HashMap::new();
    let mut bytes = 0u64;
    for (m, owned) in per_owner {
        let member = &view.members()[m];
        let Target::Remote(client) = &member.target else {
            continue;
        };
        let Some(present) = routing::lookup_remote(state, member, client, ns, &owned).await else {
            debug!(peer = %member.node_id, "re-replication: owner did not answer; later sweep");
            continue;
        };
        for (k, here) in owned.iter().zip(present) {
            if here {
                continue;
            }
            let Some(stored) = state.store.peek(&StoreKey {
                namespace: ns.store,
                key: *k,
            }) else {
                continue;
            };
            let (block, parent) = (stored.block, stored.parent);
            missing_anywhere.insert(*k);
            bytes += block.payload.len() as u64;
            let list = batches.entry(m).or_default();
            list.push(Forward {
                outcome: list.len(),
                key: *k,
                parent,
                block,
            });
        }
    }
    let mut copied = 0;
    for (m, items) in batches {
        for chunk in split_by_bytes(items) {
            let sent = HashMap::from([(m, chunk)]);
            for r in routing::forward_puts(state, view, &ns.tenant, sent).await {
                match r.result {
                    Ok(_) => copied += 1,
                    Err(e) => {
                        warn!(peer = %r.node_id, reason = %e.message, "re-replication copy refused")
                    }
                }
            }
        }
    }
    state.metrics.rereplicated_blocks.inc_by(copied);
    (missing_anywhere.len() as u64, copied, bytes)
}

/// Splits a list of copies into Puts of about [`PUSH_BYTES`] each.
fn split_by_bytes(items: Vec<Forward>) -> Vec<Vec<Forward>> {
    let mut out: Vec<Vec<Forward>> = vec![Vec::new()];
    let mut size = 0;
    for mut f in items {
        let len = f.block.payload.len() as u64;
        if size + len > PUSH_BYTES && out.last().is_some_and(|l| !l.is_empty()) {
            out.push(Vec::new());
            size = 0;
        }
        size += len;
        if let Some(last) = out.last_mut() {
            f.outcome = last.len();
            last.push(f);
        }
    }
    out
}

//! Placement: which nodes own a key, by rendezvous (highest-random-weight) hashing.
//!
//! Every node and client computes the same owners from the same member list: a key's owners are
//! the `replicas` members with the highest `xxh3_64(node_id_hash ^ key)` score. Adding or removing
//! a member moves only the keys whose top-`replicas` set it enters or leaves (about
//! `replicas / N` of them), never a global reshuffle.

use std::collections::HashMap;
use std::future::Future;

use futures::StreamExt;
use futures::future::Either;
use futures::stream::FuturesUnordered;

use crate::keys::BlockKey;

/// Name of this placement algorithm (reported by `ClusterInfo`).
pub const PLACEMENT_NAME: &str = "rendezvous-xxh3-v1";

/// Seed of a node in the rendezvous hash, derived from its stable id.
pub fn node_seed(node_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(node_id.as_bytes())
}

/// Score of `key` on the node with `seed`; the highest scores own the key.
pub fn score(seed: u64, key: &BlockKey) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&key.0, seed)
}

/// Indices into `seeds` of the nodes in preference order for `key` (best first). Ties (which
/// need equal node seeds) break by index, so the order is total and deterministic.
pub fn rank(seeds: &[u64], key: &BlockKey) -> Vec<usize> {
    let mut idx: Vec<(u64, usize)> = seeds
        .iter()
        .enumerate()
        .map(|(i, s)| (score(*s, key), i))
        .collect();
    idx.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    idx.into_iter().map(|(_, i)| i).collect()
}

/// Indices of the `replicas` owners of `key` among `seeds`, best first.
pub fn owners(seeds: &[u64], key: &BlockKey, replicas: usize) -> Vec<usize> {
    let mut r = rank(seeds, key);
    r.truncate(replicas.min(seeds.len()));
    r
}

/// A cluster member as placement sees it: anything with a stable node id.
pub trait Placed {
    /// The member's stable node id (its rendezvous seed is derived from it).
    fn node_id(&self) -> &str;
}

/// The members a request is placed on, sorted by node id, with their seeds and the replication
/// factor in force. Nodes (routing forwarded requests) and smart clients (routing straight to
/// owners) both use it, so they agree on every key's owners.
#[derive(Debug, Clone)]
pub struct PlacementView<M> {
    members: Vec<M>,
    seeds: Vec<u64>,
    replicas: usize,
}

impl<M: Placed> PlacementView<M> {
    /// A view of `members` (sorted here by node id; later duplicates of an id are dropped)
    /// keeping `replicas` copies of each key, at most one per member.
    pub fn new(mut members: Vec<M>, replicas: usize) -> Self {
        members.sort_by(|a, b| a.node_id().cmp(b.node_id()));
        members.dedup_by(|a, b| a.node_id() == b.node_id());
        let seeds = members.iter().map(|m| node_seed(m.node_id())).collect();
        let replicas = replicas.max(1).min(members.len());
        PlacementView {
            members,
            seeds,
            replicas,
        }
    }

    /// Members, sorted by node id.
    pub fn members(&self) -> &[M] {
        &self.members
    }

    /// Replicas per key (at most the number of members).
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// True when there is at most one member: nothing to route.
    pub fn is_single(&self) -> bool {
        self.members.len() <= 1
    }

    /// Indices into [`members`](Self::members) of `key`'s owners, best first.
    pub fn owners(&self, key: &BlockKey) -> Vec<usize> {
        owners(&self.seeds, key, self.replicas)
    }

    /// Owners of every key, best first.
    pub fn owner_lists(&self, keys: &[BlockKey]) -> Vec<Vec<usize>> {
        keys.iter().map(|k| self.owners(k)).collect()
    }

    /// Key indices grouped by member, every owner of every key included (for requests that go
    /// to all replicas: lookups, deletes, writes).
    pub fn all_owner_groups(&self, keys: &[BlockKey]) -> HashMap<usize, Vec<usize>> {
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, k) in keys.iter().enumerate() {
            for m in self.owners(k) {
                groups.entry(m).or_default().push(i);
            }
        }
        groups
    }
}

impl<M: Placed> PlacementView<M> {
    /// Fetches every key from its owners in rank order, with hedging: a key whose owner misses
    /// or fails goes to its next owner at once, and a key whose owner has not answered when
    /// `delay()` completes is asked of its next owner too (both requests race; the first block
    /// wins; `delay` is called again for each further round). Returns when every key has a
    /// block or every owner of it has answered, dropping slower requests; also returns how many
    /// blocks came from a fallback owner. `fetch(member, key indices)` answers one entry per
    /// index (`None`: missing there, or the member failed).
    pub async fn fetch_hedged<T, F, Fut, D, DF>(
        &self,
        keys: &[BlockKey],
        mut delay: D,
        fetch: F,
    ) -> (Vec<Option<T>>, u64)
    where
        F: FnMut(usize, Vec<usize>) -> Fut,
        Fut: Future<Output = (Vec<usize>, Vec<Option<T>>)>,
        D: FnMut() -> DF,
        DF: Future<Output = ()>,
    {
        let n = keys.len();
        let mut h = Hedged {
            owners: self.owner_lists(keys),
            next_rank: vec![0; n],
            pending: vec![0; n],
            calls: FuturesUnordered::new(),
            fetch,
        };
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(n).collect();
        let mut fallbacks = 0;
        h.ask_next((0..n).collect());
        let mut timer = Box::pin(delay());
        while !(0..n).all(|i| out[i].is_some() || h.exhausted(i)) {
            match futures::future::select(h.calls.next(), &mut timer).await {
                Either::Left((None, _)) => break,
                Either::Left((Some((idx, got)), _)) => {
                    let mut retry = Vec::new();
                    for (i, item) in idx.into_iter().zip(got) {
                        h.pending[i] = h.pending[i].saturating_sub(1);
                        match item {
                            Some(v) if out[i].is_none() => {
                                fallbacks += u64::from(h.next_rank[i] > 1);
                                out[i] = Some(v);
                            }
                            None if out[i].is_none() && h.pending[i] == 0 => retry.push(i),
                            _ => {}
                        }
                    }
                    h.ask_next(retry);
                }
                Either::Right(((), _)) => {
                    let slow = (0..n)
                        .filter(|&i| out[i].is_none() && h.pending[i] > 0)
                        .collect();
                    h.ask_next(slow);
                    timer = Box::pin(delay());
                }
            }
        }
        (out, fallbacks)
    }
}

/// The state of a hedged fetch: which owner rank each key asks next and how many requests for
/// it are out.
struct Hedged<F, Fut> {
    owners: Vec<Vec<usize>>,
    next_rank: Vec<usize>,
    pending: Vec<u32>,
    calls: FuturesUnordered<Fut>,
    fetch: F,
}

impl<T, F, Fut> Hedged<F, Fut>
where
    F: FnMut(usize, Vec<usize>) -> Fut,
    Fut: Future<Output = (Vec<usize>, Vec<Option<T>>)>,
{
    /// Asks each of `which` keys' next owner (one request per owner).
    fn ask_next(&mut self, which: Vec<usize>) {
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for i in which {
            if let Some(&m) = self.owners[i].get(self.next_rank[i]) {
                self.next_rank[i] += 1;
                self.pending[i] += 1;
                groups.entry(m).or_default().push(i);
            }
        }
        for (m, idx) in groups {
            self.calls.push((self.fetch)(m, idx));
        }
    }

    /// Whether every owner of key `i` has been asked and has answered.
    fn exhausted(&self, i: usize) -> bool {
        self.pending[i] == 0 && self.next_rank[i] >= self.owners[i].len()
    }
}

/// How the writes of one block to its replicas went.
#[derive(Debug, Clone)]
pub struct ReplicaTally<R> {
    acks: u32,
    newly_stored: bool,
    rejection: Option<R>,
    unreachable: Vec<String>,
}

impl<R> Default for ReplicaTally<R> {
    fn default() -> Self {
        ReplicaTally {
            acks: 0,
            newly_stored: false,
            rejection: None,
            unreachable: Vec::new(),
        }
    }
}

/// The verdict on a block written to its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaVerdict<R> {
    /// At least one replica holds the block.
    Held {
        /// Replicas that hold it.
        replicas: u32,
        /// True when some replica stored it now (false: every replica already had it).
        newly_stored: bool,
    },
    /// No replica holds it and one refused it (its rejection).
    Rejected(R),
    /// No replica holds it and none could be reached (who, and why).
    Unreachable(Vec<String>),
}

impl<R> ReplicaTally<R> {
    /// A replica holds the block (`newly_stored`: it stored it now).
    pub fn ack(&mut self, newly_stored: bool) {
        self.acks += 1;
        self.newly_stored |= newly_stored;
    }

    /// A replica refused the block.
    pub fn reject(&mut self, rejection: R) {
        self.rejection = Some(rejection);
    }

    /// A replica could not be reached (`why`: node and reason).
    pub fn unreachable(&mut self, why: String) {
        self.unreachable.push(why);
    }

    /// The verdict: held when any replica acknowledged, else the last rejection, else
    /// unreachable.
    pub fn verdict(self) -> ReplicaVerdict<R> {
        match (self.acks, self.rejection) {
            (0, Some(r)) => ReplicaVerdict::Rejected(r),
            (0, None) => ReplicaVerdict::Unreachable(self.unreachable),
            (replicas, _) => ReplicaVerdict::Held {
                replicas,
                newly_stored: self.newly_stored,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn key(i: u64) -> BlockKey {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_le_bytes());
        BlockKey(sha2_like(k))
    }

    // Spread test keys like real SHA-256 keys.
    fn sha2_like(k: [u8; 32]) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        Sha256::digest(k).into()
    }

    fn seeds(ids: &[&str]) -> Vec<u64> {
        ids.iter().map(|i| node_seed(i)).collect()
    }

    #[test]
    fn owners_are_distinct_and_balanced() {
        let s = seeds(&["node-0", "node-1", "node-2"]);
        let mut count = [0usize; 3];
        for i in 0..30_000 {
            let o = owners(&s, &key(i), 2);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
            for n in o {
                count[n] += 1;
            }
        }
        for c in count {
            // Each node owns 2/3 of 30,000 keys = 20,000, within 3 %.
            assert!((19_400..=20_600).contains(&c), "{count:?}");
        }
    }

    #[test]
    fn adding_a_node_moves_only_its_share() {
        let three = seeds(&["node-0", "node-1", "node-2"]);
        let four = seeds(&["node-0", "node-1", "node-2", "node-3"]);
        let n = 20_000;
        let mut moved = 0;
        for i in 0..n {
            let k = key(i);
            let a: HashSet<usize> = owners(&three, &k, 2).into_iter().collect();
            let b: HashSet<usize> = owners(&four, &k, 2).into_iter().collect();
            // A key's owner set changes only by gaining node 3.
            if a != b {
                assert!(b.contains(&3), "key moved between old nodes");
                moved += 1;
            }
        }
        let frac = moved as f64 / n as f64;
        // Node 3 enters the top-2 of half the keys (2/4); each such key changes one of its two
        // owners, so a quarter of all (key, owner) assignments move.
        assert!((0.47..=0.53).contains(&frac), "{frac}");
    }

    proptest! {
        #[test]
        fn removing_a_node_keeps_surviving_owners(i in any::<u64>()) {
            let all = seeds(&["a", "b", "c", "d", "e"]);
            let k = key(i);
            let before = owners(&all, &k, 2);
            // Remove node 4 ("e"): survivors keep their rank order.
            let r: Vec<usize> = rank(&all, &k).into_iter().filter(|&n| n != 4).collect();
            let after = owners(&all[..4], &k, 2);
            prop_assert_eq!(&r[..2], &after[..]);
            if !before.contains(&4) { prop_assert_eq!(before, after); }
        }
    }

    struct M(&'static str);
    impl Placed for M {
        fn node_id(&self) -> &str {
            self.0
        }
    }

    #[test]
    fn view_sorts_dedups_and_clamps_replicas() {
        let v = PlacementView::new(vec![M("c"), M("a"), M("b"), M("a")], 5);
        let ids: Vec<&str> = v.members().iter().map(|m| m.0).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(v.replicas(), 3);
        assert!(!v.is_single());
        let k = key(7);
        let s = seeds(&["a", "b", "c"]);
        assert_eq!(v.owners(&k), owners(&s, &k, 3));
        let empty: PlacementView<M> = PlacementView::new(vec![], 2);
        assert!(empty.is_single());
        assert_eq!(empty.replicas(), 0);
    }

    #[test]
    fn all_owner_groups_cover_every_replica() {
        let v = PlacementView::new(vec![M("a"), M("b"), M("c")], 2);
        let keys: Vec<BlockKey> = (0..50).map(key).collect();
        let groups = v.all_owner_groups(&keys);
        let total: usize = groups.values().map(Vec::len).sum();
        assert_eq!(total, 100);
        for (m, idx) in &groups {
            for &i in idx {
                assert!(v.owners(&keys[i]).contains(m));
            }
        }
    }

    #[test]
    fn failover_asks_the_next_owner_for_what_is_missing() {
        let v = PlacementView::new(vec![M("a"), M("b"), M("c")], 2);
        let keys: Vec<BlockKey> = (0..40).map(key).collect();
        let first_owner_down = 0; // member "a" answers nothing
        let (found, fallbacks) = futures::executor::block_on(v.fetch_hedged(
            &keys,
            futures::future::pending,
            |m, idx| {
                let got: Vec<Option<usize>> = idx
                    .iter()
                    .map(|&i| (m != first_owner_down).then_some(i))
                    .collect();
                async move { (idx, got) }
            },
        ));
        assert!(found.iter().enumerate().all(|(i, f)| *f == Some(i)));
        let led_by_a = keys.iter().filter(|k| v.owners(k)[0] == 0).count() as u64;
        assert_eq!(fallbacks, led_by_a);
        assert!(led_by_a > 0);
    }

    #[test]
    fn a_silent_owner_is_hedged_after_the_delay() {
        let v = PlacementView::new(vec![M("a"), M("b"), M("c")], 2);
        let keys: Vec<BlockKey> = (0..40).map(key).collect();
        // Member 0 never answers; the delay completes at once, so its keys go to their next
        // owner and every key is found without waiting for it.
        let (found, fallbacks) = futures::executor::block_on(v.fetch_hedged(
            &keys,
            || async {},
            |m, idx| {
                let got: Vec<Option<usize>> = idx.iter().map(|&i| Some(i)).collect();
                async move {
                    if m == 0 {
                        futures::future::pending::<()>().await;
                    }
                    (idx, got)
                }
            },
        ));
        assert!(found.iter().enumerate().all(|(i, f)| *f == Some(i)));
        assert!(fallbacks > 0);
    }

    #[test]
    fn tally_verdicts() {
        let mut t: ReplicaTally<&str> = ReplicaTally::default();
        t.reject("full");
        t.ack(false);
        assert_eq!(
            t.verdict(),
            ReplicaVerdict::Held {
                replicas: 1,
                newly_stored: false
            }
        );
        let mut t: ReplicaTally<&str> = ReplicaTally::default();
        t.unreachable("b: down".into());
        t.reject("full");
        assert_eq!(t.verdict(), ReplicaVerdict::Rejected("full"));
        let mut t: ReplicaTally<&str> = ReplicaTally::default();
        t.unreachable("b: down".into());
        assert_eq!(
            t.verdict(),
            ReplicaVerdict::Unreachable(vec!["b: down".into()])
        );
    }
}

//! Placement: which nodes own a key, by rendezvous (highest-random-weight) hashing.
//!
//! Every node and client computes the same owners from the same member list: a key's owners are
//! the `replicas` members with the highest `xxh3_64(node_id_hash ^ key)` score. Adding or removing
//! a member moves only the keys whose top-`replicas` set it enters or leaves (about
//! `replicas / N` of them), never a global reshuffle.

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
}

//! Store operations: insert with eviction, prefix lookups, gets. `cargo bench -p kvshare-core`.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvshare_core::layout::{DType, KvLayout};
use kvshare_core::{BlockKey, BlockStore, Codec, EncodedBlock, StoreKey};

const NS: BlockKey = BlockKey([3; 32]);

fn key(i: u64) -> BlockKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_le_bytes());
    k[8..16].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    BlockKey(k)
}

fn store_ops(c: &mut Criterion) {
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 64,
        dtype: DType::BF16,
        tokens_per_block: 16,
    };
    let block = Arc::new(
        EncodedBlock::encode(
            NS,
            layout,
            Codec::None,
            &vec![7u8; layout.block_bytes() as usize],
        )
        .expect("block"),
    );
    let mut g = c.benchmark_group("store");

    // Insert into a full store: every insert evicts one block.
    let full = BlockStore::new(10_000 * BlockStore::charge_of(&block));
    let mut n = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("insert-with-eviction", |b| {
        b.iter(|| {
            n += 1;
            let parent = (!n.is_multiple_of(16)).then(|| key(n - 1));
            full.insert(
                StoreKey {
                    namespace: NS,
                    key: key(n),
                },
                parent,
                block.clone(),
            )
            .is_ok()
        })
    });

    // Longest-prefix lookup of a 2048-block prompt that is fully cached.
    let s = BlockStore::new(1 << 30);
    let keys: Vec<BlockKey> = (0..2048).map(|i| key(1_000_000 + i)).collect();
    for (i, k) in keys.iter().enumerate() {
        let parent = i.checked_sub(1).map(|p| keys[p]);
        let _ = s.insert(
            StoreKey {
                namespace: NS,
                key: *k,
            },
            parent,
            block.clone(),
        );
    }
    g.throughput(Throughput::Elements(2048));
    g.bench_function("lookup-prefix-2048", |b| {
        b.iter(|| s.lookup_prefix(NS, &keys))
    });
    g.bench_function("get-many-2048", |b| b.iter(|| s.get_many(NS, &keys).len()));
    g.finish();
}

criterion_group!(benches, store_ops);
criterion_main!(benches);

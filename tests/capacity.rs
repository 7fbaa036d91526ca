//! Capacity is a hard limit: 8 concurrent writers push 4x the capacity while samplers watch
//! stored bytes; the newest blocks stay readable and eviction counters add up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kvshare_client::{ClientOptions, KvClient};
use kvshare_core::{BlockStore, Codec, DType, Namespace};
use kvshare_tests::{
    http_get, kv_blocks, kv_sample_bytes, minilm_layout, prompt_tokens, start_node,
};

const CAPACITY: u64 = 8 << 20;
const WRITERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_push_stored_bytes_over_capacity() {
    let node = start_node(CAPACITY, |_| {}).await;
    let layout = minilm_layout(DType::BF16, 4); // 36,864 raw bytes per block
    let data = kv_sample_bytes(DType::BF16);
    // Codec none: every block is charged exactly the same, so the arithmetic below is exact.
    let per_block = BlockStore::charge_of_len(layout.block_bytes());
    let blocks_per_writer = (4 * CAPACITY / per_block) as usize / WRITERS + 1;
    let pushed_bytes = (blocks_per_writer * WRITERS) as u64 * per_block;
    assert!(pushed_bytes >= 4 * CAPACITY);

    // Sampler 1: the store's own counter, as fast as it can read.
    let stop = Arc::new(AtomicBool::new(false));
    let state = node.state.clone();
    let s1 = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let (mut samples, mut max) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                max = max.max(state.store.used_bytes());
                samples += 1;
            }
            (samples, max)
        })
    };
    // Sampler 2: what a client sees through the Stats RPC.
    let s2 = {
        let stop = stop.clone();
        let endpoint = node.endpoint();
        tokio::spawn(async move {
            let mut c = KvClient::connect(&endpoint, ClientOptions::default())
                .await
                .expect("connect");
            let (mut samples, mut max) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let s = c.stats().await.expect("stats");
                assert!(
                    s.stored_bytes <= s.capacity_bytes,
                    "{} > {}",
                    s.stored_bytes,
                    s.capacity_bytes
                );
                max = max.max(s.stored_bytes);
                samples += 1;
            }
            (samples, max)
        })
    };

    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let seq = seq.clone();
        let endpoint = node.endpoint();
        let blocks = kv_blocks(&data, layout, blocks_per_writer, 5, w * 31);
        writers.push(tokio::spawn(async move {
            let opts = ClientOptions {
                codec: Codec::None,
                ..Default::default()
            };
            let mut c = KvClient::connect(&endpoint, opts).await.expect("connect");
            let ns = Namespace::new(format!("writer-{w}"), layout);
            // One prompt of 16 blocks per put, as a worker pushes after each prefill; each
            // prompt is its own chain, so eviction takes old prompts tail first.
            // Keep each writer's last few prompts with the global order they completed in.
            let mut recent = std::collections::VecDeque::new();
            for (p, chunk) in blocks.chunks(16).enumerate() {
                let tokens = prompt_tokens(chunk.len() * 4, (w * 10_000 + p) as u32);
                let r = c.put_prefix(&ns, &tokens, chunk).await.expect("put");
                assert_eq!(r.stored(), chunk.len());
                recent.push_back((
                    seq.fetch_add(1, Ordering::SeqCst),
                    ns.clone(),
                    tokens,
                    chunk.to_vec(),
                ));
                if recent.len() > 4 {
                    recent.pop_front();
                }
            }
            recent
        }));
    }
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.expect("writer"));
    }
    // The globally newest prompts (4 x 16 blocks, well under the ~225 blocks that fit).
    written.sort_by_key(|r| std::cmp::Reverse(r.0));
    let written: Vec<_> = written
        .into_iter()
        .take(4)
        .map(|(_, ns, t, b)| (ns, t, b))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let (n1, max1) = s1.await.expect("sampler 1");
    let (n2, max2) = s2.await.expect("sampler 2");
    println!(
        "store sampler: {n1} samples, max {max1}; stats sampler: {n2} samples, max {max2}; capacity {CAPACITY}"
    );
    assert!(n1 > 1000 && n2 > 5, "samplers ran: {n1} {n2}");
    assert!(max1 <= CAPACITY && max2 <= CAPACITY);

    // The newest prompts are readable and intact.
    let mut c = KvClient::connect(&node.endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    for (ns, tokens, blocks) in &written {
        assert_eq!(
            c.lookup(ns, tokens).await.expect("lookup").hit_blocks,
            blocks.len()
        );
        let got = c.get_prefix(ns, tokens).await.expect("get newest prompt");
        assert!(&got == blocks, "newest prompt of {ns:?} intact");
    }

    // Counters add up: everything pushed was stored; what is gone was evicted.
    let s = c.stats().await.expect("stats");
    let pushed_blocks = (blocks_per_writer * WRITERS) as u64;
    assert_eq!(s.puts_stored, pushed_blocks);
    assert_eq!(s.evictions, pushed_blocks - s.stored_blocks);
    assert_eq!(s.stored_bytes, s.stored_blocks * per_block);
    assert_eq!(
        s.stored_blocks,
        CAPACITY / per_block,
        "a full store holds as many blocks as fit"
    );
    let (_, metrics) = http_get(&node.http_addr.to_string(), "/metrics").await;
    assert!(
        metrics.contains(&format!("kvshare_evictions_total {}", s.evictions)),
        "metrics evictions match stats: {}",
        metrics
            .lines()
            .filter(|l| l.contains("evictions"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

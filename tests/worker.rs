//! Inference workers against a real node: a worker reusing another worker's blocks gets
//! bit-identical logits for every codec and K/V dtype; a corrupted stored block is detected,
//! recomputed and repaired; an unreachable tier degrades to full prefill.

use std::sync::Arc;

use bytes::Bytes;
use kvshare_client::{ClientOptions, ClusterClient};
use kvshare_core::{Codec, DType, EncodedBlock, StoreKey};
use kvshare_tests::start_node;
use kvshare_worker::tokenizer::random_tokens as tokens;
use kvshare_worker::{CacheMode, Model, ModelConfig, Worker};

const TPB: u32 = 16;

async fn tier(endpoint: &str, codec: Codec) -> ClusterClient {
    let opts = ClientOptions {
        codec,
        ..ClientOptions::default()
    };
    ClusterClient::connect(&[endpoint.to_string()], opts)
        .await
        .expect("connect")
}

/// A worker on `model` sharing through the node at `endpoint`.
async fn worker(model: &Arc<Model>, dtype: DType, codec: Codec, endpoint: &str) -> Worker {
    Worker::new(
        model.clone(),
        dtype,
        TPB,
        codec,
        Some(tier(endpoint, codec).await),
    )
    .expect("worker")
}

fn tiny() -> (ModelConfig, Arc<Model>) {
    let cfg = ModelConfig::preset("tiny").expect("preset");
    let m = Arc::new(Model::random(&cfg, 2026).expect("model"));
    (cfg, m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_of_another_workers_blocks_is_bit_identical_for_every_codec_and_dtype() {
    let node = start_node(512 << 20, |_| {}).await;
    let (cfg, model_a) = tiny();
    // Worker B has its own copy of the weights (same seed), as a separate process would.
    let model_b = Arc::new(Model::random(&cfg, 2026).expect("model"));
    let mut seed = 0;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for codec in [
            Codec::None,
            Codec::Lz4,
            Codec::BytePlaneLz4,
            Codec::BytePlaneZstd,
        ] {
            let a = worker(&model_a, dtype, codec, &node.endpoint()).await;
            let b = worker(&model_b, dtype, codec, &node.endpoint()).await;
            assert_eq!(a.namespace().digest(), b.namespace().digest());
            for (len, shared) in [(97usize, 64usize), (160, 160), (48, 20), (200, 150)] {
                seed += 1;
                let base = tokens(len, seed, cfg.vocab_size);
                let ga = a
                    .generate(&base, 2, CacheMode::ReadWrite)
                    .await
                    .expect("a runs");
                assert_eq!(ga.report.cached_tokens, 0, "fresh prompt");
                assert!(ga.report.pushed_blocks >= len / TPB as usize - 1);
                let mut prompt = base[..shared].to_vec();
                prompt.extend(tokens(len - shared, seed + 7_777, cfg.vocab_size));
                let cold = b.generate(&prompt, 4, CacheMode::Off).await.expect("cold");
                let warm = b
                    .generate(&prompt, 4, CacheMode::ReadWrite)
                    .await
                    .expect("warm");
                // Reusable: the shared full blocks, but never the block holding the last token.
                let want = (shared.min(len - 1) / TPB as usize) * TPB as usize;
                let what = format!("{dtype:?} {codec:?} len {len} shared {shared}");
                assert_eq!(warm.report.cached_tokens, want, "{what}");
                assert!(warm.report.cache_error.is_none(), "{what}");
                assert_eq!(warm.report.corrupt_blocks, 0, "{what}");
                assert!(want == 0 || warm.report.fetched_wire_bytes > 0, "{what}");
                assert_eq!(cold.tokens, warm.tokens, "{what}");
                assert_eq!(cold.logits.len(), 4);
                for (c, w) in cold.logits.iter().zip(&warm.logits) {
                    let same = c.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(
                        same,
                        "{what}: logits differ by {}",
                        kvshare_worker::max_abs_diff(c, w)
                    );
                }
            }
        }
    }
    node.shutdown(std::time::Duration::from_secs(1)).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_block_is_detected_recomputed_and_repaired() {
    let node = start_node(256 << 20, |_| {}).await;
    let (cfg, model) = tiny();
    let codec = Codec::BytePlaneZstd;
    let a = worker(&model, DType::BF16, codec, &node.endpoint()).await;
    let b = worker(&model, DType::BF16, codec, &node.endpoint()).await;
    let prompt = tokens(130, 99, cfg.vocab_size);
    a.generate(&prompt, 1, CacheMode::ReadWrite)
        .await
        .expect("a pushes");
    let ns = b.namespace().clone();
    let keys = ns.block_keys(&prompt).expect("keys");
    assert_eq!(keys.len(), 8);

    // Test hook: flip one payload byte of block 3 inside the node's store, behind the Put
    // path's verification (as a memory or disk fault would).
    let sk = StoreKey {
        namespace: ns.digest(),
        key: keys[3],
    };
    let good = node.state.store.get(&sk).expect("block 3 is stored");
    let mut payload = good.payload.to_vec();
    let mid = payload.len() / 2;
    payload[mid] ^= 0x5a;
    let bad = EncodedBlock {
        header: good.header,
        payload: Bytes::from(payload),
    };
    assert!(bad.verify().is_err(), "the flip must break the checksum");
    assert!(node.state.store.remove(&sk));
    node.state
        .store
        .insert(sk, Some(keys[2]), Arc::new(bad))
        .expect("insert corrupt copy");

    let cold = b.generate(&prompt, 3, CacheMode::Off).await.expect("cold");
    let warm = b
        .generate(&prompt, 3, CacheMode::ReadWrite)
        .await
        .expect("warm");
    assert_eq!(warm.report.hit_blocks, 8, "the tier still lists all blocks");
    assert_eq!(warm.report.corrupt_blocks, 1);
    assert_eq!(
        warm.report.reused_blocks, 3,
        "blocks before the corrupt one"
    );
    assert_eq!(warm.report.cached_tokens, 48);
    assert_eq!(cold.logits, warm.logits, "recomputed answer is exact");
    assert_eq!(cold.tokens, warm.tokens);
    assert!(
        warm.report.push_error.is_none(),
        "{:?}",
        warm.report.push_error
    );

    // The worker replaced the bad copy: the next request reuses every block.
    let repaired = node.state.store.get(&sk).expect("block 3 again");
    assert!(repaired.verify().is_ok());
    let again = b
        .generate(&prompt, 3, CacheMode::ReadWrite)
        .await
        .expect("again");
    assert_eq!(again.report.corrupt_blocks, 0);
    assert_eq!(again.report.reused_blocks, 8);
    assert_eq!(again.logits, cold.logits);
    node.shutdown(std::time::Duration::from_secs(1)).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_tier_means_full_prefill_not_failure() {
    let node = start_node(64 << 20, |_| {}).await;
    let (cfg, model) = tiny();
    let w = worker(&model, DType::F16, Codec::Lz4, &node.endpoint()).await;
    let prompt = tokens(80, 5, cfg.vocab_size);
    let first = w
        .generate(&prompt, 2, CacheMode::ReadWrite)
        .await
        .expect("first");
    node.shutdown(std::time::Duration::from_millis(100))
        .await
        .ok();
    let second = w
        .generate(&prompt, 2, CacheMode::ReadWrite)
        .await
        .expect("served without the tier");
    assert_eq!(second.report.cached_tokens, 0);
    assert!(second.report.cache_error.is_some());
    assert_eq!(first.logits, second.logits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_prompts_are_refused_with_a_reason() {
    let (cfg, model) = tiny();
    let w = Worker::new(model, DType::F32, TPB, Codec::None, None).expect("worker");
    let empty = w.generate(&[], 1, CacheMode::Off).await;
    assert!(empty.is_err_and(|e| e.to_string().contains("no tokens")));
    let oov = w
        .generate(&[cfg.vocab_size as u32], 1, CacheMode::Off)
        .await;
    assert!(oov.is_err_and(|e| e.to_string().contains("vocabulary")));
    let too_long = vec![1u32; cfg.max_positions];
    assert!(w.generate(&too_long, 2, CacheMode::Off).await.is_err());
    // A huge generation length is refused up front (nothing is allocated for it).
    let huge = w.generate(&[1, 2, 3], usize::MAX, CacheMode::Off).await;
    assert!(huge.is_err_and(|e| e.to_string().contains("limit")));
    assert!(Worker::new(w.model().clone(), DType::U8, TPB, Codec::None, None).is_err());
}

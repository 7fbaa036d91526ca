//! The inference worker: look up the longest cached prefix, fetch and decode it into the model's
//! K/V cache, prefill only the rest, decode greedily, push every new full block.

use std::sync::Arc;
use std::time::Instant;

use kvshare_client::{ClusterClient, encode_blocks};
use kvshare_core::parallel::{block_threads, par_map};
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout, Namespace};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::error::WorkerError;
use crate::kv::{blocks_to_cache, cache_to_blocks, tensor_dtype};
use crate::model::{KvCache, Model, argmax};

/// Most threads used to encode or decode blocks.
const MAX_BLOCK_THREADS: usize = 4;

/// Whether a request uses the cache tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Full prefill; nothing is looked up or pushed (the no-cache baseline).
    Off,
    /// Reuse the cached prefix and push new blocks.
    ReadWrite,
}

/// What one request did and how long each part took (milliseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestReport {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from the cache tier.
    pub cached_tokens: usize,
    /// Leading blocks the tier reported present.
    pub hit_blocks: usize,
    /// Blocks fetched, verified and loaded into the model.
    pub reused_blocks: usize,
    /// Fetched blocks that failed their checksum or header check (recomputed instead).
    pub corrupt_blocks: usize,
    /// Why the cache tier could not be used, when it could not (the request still succeeds).
    pub cache_error: Option<String>,
    /// Compressed bytes received from the tier.
    pub fetched_wire_bytes: u64,
    /// Raw K/V bytes those blocks decoded to.
    pub fetched_raw_bytes: u64,
    /// Lookup round trip.
    pub lookup_ms: f64,
    /// Get, decompression, verification and layout conversion.
    pub fetch_ms: f64,
    /// Prefill of the tokens not cached.
    pub prefill_ms: f64,
    /// Time to first token: request start to the first token's logits.
    pub ttft_ms: f64,
    /// Decoding of the remaining generated tokens.
    pub decode_ms: f64,
    /// Blocks uploaded after the request.
    pub pushed_blocks: usize,
    /// Of those, blocks the tier stored anew.
    pub stored_blocks: usize,
    /// Compressed bytes uploaded.
    pub pushed_wire_bytes: u64,
    /// Raw bytes of the uploaded blocks.
    pub pushed_raw_bytes: u64,
    /// Encoding and upload.
    pub push_ms: f64,
    /// Why the upload failed, if it did (the request still succeeds).
    pub push_error: Option<String>,
}

/// Result of one request.
#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated token ids (greedy).
    pub tokens: Vec<u32>,
    /// Logits that produced each generated token; `logits[0]` ends the prefill.
    pub logits: Vec<Vec<f32>>,
    /// Counters and timings.
    pub report: RequestReport,
}

/// An inference worker bound to one model and one cache namespace.
pub struct Worker {
    model: Arc<Model>,
    ns: Namespace,
    codec: Codec,
    tier: Option<ClusterClient>,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WorkerError> + Send + 'static,
) -> Result<T, WorkerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WorkerError::Task(e.to_string()))?
}

/// The K/V layout a model's cache has in blocks of `tokens_per_block` positions.
pub fn model_layout(model: &Model, dtype: DType, tokens_per_block: u32) -> KvLayout {
    let c = model.config();
    KvLayout {
        num_layers: c.num_layers as u32,
        num_kv_heads: c.num_kv_heads as u32,
        head_dim: c.head_dim() as u32,
        dtype,
        tokens_per_block,
    }
}

impl Worker {
    /// A worker running `model` with K/V kept as `dtype`, shared in blocks of
    /// `tokens_per_block` positions compressed with `codec`, through `tier` (`None`: no cache).
    pub fn new(
        model: Arc<Model>,
        dtype: DType,
        tokens_per_block: u32,
        codec: Codec,
        tier: Option<ClusterClient>,
    ) -> Result<Self, WorkerError> {
        tensor_dtype(dtype)?;
        let layout = model_layout(&model, dtype, tokens_per_block);
        layout.validate()?;
        let mut ns = Namespace::new(model.config().name.clone(), layout);
        ns.revision = model.fingerprint().to_string();
        Ok(Worker {
            model,
            ns,
            codec,
            tier,
        })
    }

    /// The cache namespace (model, weights, layout) this worker reads and writes.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Runs `prompt` and greedily generates `max_new_tokens` (at least one) tokens.
    pub async fn generate(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        mode: CacheMode,
    ) -> Result<Generation, WorkerError> {
        self.check_request(prompt, max_new_tokens)?;
        let start = Instant::now();
        let mut report = RequestReport {
            prompt_tokens: prompt.len(),
            ..RequestReport::default()
        };
        let tier = match mode {
            CacheMode::ReadWrite => self.tier.as_ref(),
            CacheMode::Off => None,
        };
        let (cache, corrupt_key) = match tier {
            Some(tier) => self.fetch_prefix(tier, prompt, &mut report).await?,
            None => (self.empty_cache()?, None),
        };
        report.cached_tokens = cache.len();

        let t = Instant::now();
        let rest = prompt[cache.len()..].to_vec();
        let (cache, first) = self.prefill(cache, rest).await?;
        report.prefill_ms = ms(t);
        report.ttft_ms = ms(start);

        let t = Instant::now();
        let (tokens, logits, cache) = self.decode(cache, first, max_new_tokens).await?;
        report.decode_ms = ms(t);

        if let Some(tier) = tier {
            self.push_generated(tier, prompt, &tokens, cache, corrupt_key, &mut report)
                .await;
        }
        Ok(Generation {
            tokens,
            logits,
            report,
        })
    }

    /// Refuses prompts the model cannot run: empty, out of the vocabulary, or too long to
    /// generate `max_new_tokens` after.
    fn check_request(&self, prompt: &[u32], max_new_tokens: usize) -> Result<(), WorkerError> {
        if prompt.is_empty() {
            return Err(WorkerError::Prompt("the prompt has no tokens".into()));
        }
        self.model.check_tokens(0, prompt)?;
        let limit = self.model.config().max_positions;
        if max_new_tokens.max(1) > limit.saturating_sub(prompt.len()) {
            return Err(WorkerError::Prompt(format!(
                "{} prompt tokens plus {max_new_tokens} new tokens exceed the model's limit of {limit} positions",
                prompt.len()
            )));
        }
        Ok(())
    }

    /// A K/V cache with no positions, in the namespace's element type.
    fn empty_cache(&self) -> Result<KvCache, WorkerError> {
        let layout = self.ns.layout;
        Ok(KvCache::new(
            layout.num_layers as usize,
            tensor_dtype(layout.dtype)?,
        ))
    }

    /// Prefills `rest` after the positions already in `cache` (on a blocking thread); returns
    /// the cache and the logits of the last position.
    async fn prefill(
        &self,
        mut cache: KvCache,
        rest: Vec<u32>,
    ) -> Result<(KvCache, Vec<f32>), WorkerError> {
        let model = self.model.clone();
        let tpb = self.ns.tokens_per_block();
        blocking(move || {
            let logits = model.prefill(&rest, &mut cache, tpb)?;
            Ok((cache, logits))
        })
        .await
    }

    /// Greedy decoding from the prefill's logits `first` until `max_new_tokens` (at least one)
    /// tokens: the tokens, the logits behind each, and the cache.
    async fn decode(
        &self,
        mut cache: KvCache,
        first: Vec<f32>,
        max_new_tokens: usize,
    ) -> Result<(Vec<u32>, Vec<Vec<f32>>, KvCache), WorkerError> {
        let model = self.model.clone();
        blocking(move || {
            let mut tokens = vec![argmax(&first)];
            let mut logits = vec![first];
            while tokens.len() < max_new_tokens {
                let last = tokens[tokens.len() - 1];
                let next = model.step(last, &mut cache)?;
                tokens.push(argmax(&next));
                logits.push(next);
            }
            Ok((tokens, logits, cache))
        })
        .await
    }

    /// Pushes the blocks of the request that were not reused. A failure is recorded in the
    /// report, not returned: the request has its answer already.
    async fn push_generated(
        &self,
        tier: &ClusterClient,
        prompt: &[u32],
        tokens: &[u32],
        cache: KvCache,
        corrupt: Option<BlockKey>,
        report: &mut RequestReport,
    ) {
        // Positions with K/V: the prompt and every generated token but the last.
        let mut seq = prompt.to_vec();
        if let Some((_, decoded)) = tokens.split_last() {
            seq.extend_from_slice(decoded);
        }
        let first = report.reused_blocks;
        if let Err(e) = self
            .push_blocks(tier, &seq, cache, first, corrupt, report)
            .await
        {
            warn!(error = %e, "pushing K/V blocks failed");
            report.push_error = Some(e.to_string());
        }
    }

    /// Lookup and fetch of the longest usable cached prefix. Any failure of the tier is a miss;
    /// a block failing verification ends the prefix there (its key is returned for repair).
    async fn fetch_prefix(
        &self,
        tier: &ClusterClient,
        prompt: &[u32],
        report: &mut RequestReport,
    ) -> Result<(KvCache, Option<BlockKey>), WorkerError> {
        let tpb = self.ns.tokens_per_block();
        let layout = self.ns.layout;
        let empty = self.empty_cache()?;
        // The last prompt token is always computed: its logits are the first output.
        let usable = (prompt.len() - 1) / tpb;
        if usable == 0 {
            return Ok((empty, None));
        }
        let t = Instant::now();
        let found = tier.lookup(&self.ns, &prompt[..usable * tpb]).await;
        report.lookup_ms = ms(t);
        let found = match found {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "lookup failed; prefilling without the cache");
                report.cache_error = Some(format!("lookup: {e}"));
                return Ok((empty, None));
            }
        };
        report.hit_blocks = found.hit_blocks;
        if found.hit_blocks == 0 {
            return Ok((empty, None));
        }
        let t = Instant::now();
        let keys = found.keys[..found.hit_blocks].to_vec();
        let blocks = match tier.get_blocks(&self.ns.digest(), &keys).await {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "get failed; prefilling without the cache");
                report.cache_error = Some(format!("get: {e}"));
                report.fetch_ms = ms(t);
                return Ok((empty, None));
            }
        };
        report.fetched_wire_bytes = blocks
            .iter()
            .flatten()
            .map(|b| b.payload.len() as u64)
            .sum();
        let ns = self.ns.clone();
        let (raws, bad) = blocking(move || Ok(decode_leading(&ns, &keys, blocks))).await?;
        if let Some((key, reason)) = &bad {
            warn!(key = %key.to_hex(), %reason, "cached block failed verification; recomputing it");
            report.corrupt_blocks = 1;
        }
        report.reused_blocks = raws.len();
        report.fetched_raw_bytes = raws.iter().map(|r| r.len() as u64).sum();
        let cache = blocking(move || blocks_to_cache(&raws, &layout)).await?;
        report.fetch_ms = ms(t);
        debug!(
            reused = report.reused_blocks,
            hit = report.hit_blocks,
            "prefix fetched"
        );
        Ok((cache, bad.map(|(k, _)| k)))
    }

    /// Encodes blocks `first..` of `cache` (keys from `seq`) and uploads them to their owners.
    async fn push_blocks(
        &self,
        tier: &ClusterClient,
        seq: &[u32],
        cache: KvCache,
        first: usize,
        corrupt: Option<BlockKey>,
        report: &mut RequestReport,
    ) -> Result<(), WorkerError> {
        let t = Instant::now();
        let tpb = self.ns.tokens_per_block();
        let full = cache.len().min(seq.len()) / tpb;
        if full <= first {
            return Ok(());
        }
        let keys = self.ns.block_keys(&seq[..full * tpb])?;
        if let Some(bad) = corrupt {
            // Replace the bad copy: a Put of a present key would keep it.
            let deleted = tier.delete_keys(&self.ns.digest(), &[bad]).await?;
            debug!(deleted, key = %bad.to_hex(), "deleted corrupt block");
        }
        let (ns, codec) = (self.ns.clone(), self.codec);
        let items = blocking(move || {
            let raws = cache_to_blocks(&cache, &ns.layout, first, full - first)?;
            let threads = block_threads(MAX_BLOCK_THREADS);
            Ok::<_, WorkerError>(encode_blocks(&ns, &keys, first, &raws, codec, threads)?)
        })
        .await?;
        report.pushed_blocks = items.len();
        report.pushed_raw_bytes = items.iter().map(|i| i.block.header.raw_len).sum();
        report.pushed_wire_bytes = items.iter().map(|i| i.block.payload.len() as u64).sum();
        let put = tier.put_blocks(items).await;
        report.push_ms = ms(t);
        let rep = put?;
        report.stored_blocks = rep.stored();
        Ok(())
    }
}

/// Decodes and verifies the leading present blocks (on up to four threads); stops at the first
/// missing one or at the first that fails (returned with the reason).
fn decode_leading(
    ns: &Namespace,
    keys: &[BlockKey],
    blocks: Vec<Option<EncodedBlock>>,
) -> (Vec<Vec<u8>>, Option<(BlockKey, String)>) {
    let digest = ns.digest();
    let check = |b: &&EncodedBlock| -> Result<Vec<u8>, String> {
        if b.header.namespace != digest || b.header.layout != ns.layout {
            return Err("header names another namespace or layout".into());
        }
        b.decode().map(Vec::from).map_err(|e| e.to_string())
    };
    let leading: Vec<&EncodedBlock> = blocks.iter().map_while(Option::as_ref).collect();
    let threads = block_threads(MAX_BLOCK_THREADS);
    let results = par_map(
        &leading,
        threads,
        |_, b| check(b),
        || Err("decoder thread panicked".into()),
    );
    let mut raws = Vec::with_capacity(results.len());
    for (key, r) in keys.iter().zip(results) {
        match r {
            Ok(raw) => raws.push(raw),
            Err(reason) => return (raws, Some((*key, reason))),
        }
    }
    (raws, None)
}

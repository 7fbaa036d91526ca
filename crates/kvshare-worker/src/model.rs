//! A Llama-style decoder on candle (CPU): RMSNorm, RoPE, grouped-query causal attention over an
//! explicit K/V cache, SwiGLU MLP.
//!
//! Prefill runs in chunks whose boundaries are multiples of the cache block size. A prefill
//! that starts from K/V fetched from the cache tier therefore runs exactly the same kernels on
//! exactly the same shapes and inputs as a full prefill of the same prompt, and its logits are
//! bit-identical (see `tests/worker.rs`). K and V are rounded to the cache dtype before
//! attention reads them, in both paths, so an f16/bf16 cache is exact too.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::WorkerError;

/// Weights of one decoder layer (projection matrices stored `[out, in]`, as in Hugging Face).
#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    mlp_norm: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
}

/// A loaded model.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    fingerprint: String,
}

/// The K/V cache of one sequence: per layer, K and V as `[kv_heads, tokens, head_dim]` in the
/// cache dtype.
#[derive(Debug, Clone)]
pub struct KvCache {
    dtype: DType,
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers holding K/V as `dtype`.
    pub fn new(num_layers: usize, dtype: DType) -> Self {
        KvCache {
            dtype,
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Builds a cache from per-layer `(K, V)` tensors of shape `[kv_heads, tokens, head_dim]`.
    pub fn from_layers(dtype: DType, layers: Vec<(Tensor, Tensor)>) -> Result<Self, WorkerError> {
        let len = match layers.first() {
            Some((k, _)) => k.dim(1)?,
            None => 0,
        };
        for (k, v) in &layers {
            if k.dim(1)? != len || v.dim(1)? != len || k.dtype() != dtype || v.dtype() != dtype {
                return Err(WorkerError::Layout(
                    "layers of a K/V cache differ in length or dtype".into(),
                ));
            }
        }
        Ok(KvCache {
            dtype,
            layers: layers.into_iter().map(Some).collect(),
            len,
        })
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Element type of the cached K/V.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// K and V of `layer`, `[kv_heads, tokens, head_dim]`; `None` while the cache is empty.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|l| l.as_ref())
    }

    /// Layers in the cache.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor), WorkerError> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| WorkerError::Layout(format!("cache has no layer {layer}")))?;
        let kv = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 1)?, Tensor::cat(&[&pv, &v], 1)?),
            None => (k, v),
        };
        *slot = Some(kv.clone());
        Ok(kv)
    }
}

/// Deterministic pseudo-random numbers (SplitMix64) for seeded weights: the same seed gives
/// the same model on every machine and in every process.
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-a, a).
    fn uniform(&mut self, a: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (2.0 * u - 1.0) * a
    }
}

/// Hugging Face Llama tensor names.
fn layer_names(i: usize) -> [String; 9] {
    let p = format!("model.layers.{i}");
    [
        format!("{p}.input_layernorm.weight"),
        format!("{p}.self_attn.q_proj.weight"),
        format!("{p}.self_attn.k_proj.weight"),
        format!("{p}.self_attn.v_proj.weight"),
        format!("{p}.self_attn.o_proj.weight"),
        format!("{p}.post_attention_layernorm.weight"),
        format!("{p}.mlp.gate_proj.weight"),
        format!("{p}.mlp.up_proj.weight"),
        format!("{p}.mlp.down_proj.weight"),
    ]
}

impl Model {
    /// A model with seeded random weights (uniform, std 0.02 for matrices; unit norms): no
    /// download, identical for the same `cfg` and `seed` everywhere.
    pub fn random(cfg: &ModelConfig, seed: u64) -> Result<Self, WorkerError> {
        cfg.validate()?;
        let mut rng = SplitMix(seed ^ 0x6b76_7368_6172_6521);
        let a = 0.02 * 3f32.sqrt();
        let mut mat = |rows: usize, cols: usize| -> Result<Tensor, WorkerError> {
            let v: Vec<f32> = (0..rows * cols).map(|_| rng.uniform(a)).collect();
            Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
        };
        let d = cfg.hidden_size;
        let kv = cfg.num_kv_heads * cfg.head_dim();
        let ff = cfg.intermediate_size;
        let mut weights = HashMap::new();
        weights.insert(
            "model.embed_tokens.weight".to_string(),
            mat(cfg.vocab_size, d)?,
        );
        for i in 0..cfg.num_layers {
            let n = layer_names(i);
            let shapes = [
                (0, 0),
                (d, d),
                (kv, d),
                (kv, d),
                (d, d),
                (0, 0),
                (ff, d),
                (ff, d),
                (d, ff),
            ];
            for (name, (r, c)) in n.into_iter().zip(shapes) {
                let t = if r == 0 {
                    Tensor::ones(d, DType::F32, &Device::Cpu)?
                } else {
                    mat(r, c)?
                };
                weights.insert(name, t);
            }
        }
        weights.insert(
            "model.norm.weight".to_string(),
            Tensor::ones(d, DType::F32, &Device::Cpu)?,
        );
        if !cfg.tie_word_embeddings {
            weights.insert("lm_head.weight".to_string(), mat(cfg.vocab_size, d)?);
        }
        Self::from_weights(cfg, weights, format!("seed-{seed}"))
    }

    /// Loads weights from a safetensors file with Hugging Face Llama names
    /// (`model.layers.N.self_attn.q_proj.weight`, ...); any float dtype is converted to f32.
    pub fn load_safetensors(cfg: &ModelConfig, path: &Path) -> Result<Self, WorkerError> {
        cfg.validate()?;
        let bytes = std::fs::read(path)
            .map_err(|e| WorkerError::Weights(format!("{}: {e}", path.display())))?;
        let fingerprint = format!("st-{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
        let weights = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| WorkerError::Weights(format!("{}: {e}", path.display())))?;
        Self::from_weights(cfg, weights, fingerprint)
    }

    /// Writes the weights as safetensors with Hugging Face Llama names.
    pub fn save_safetensors(&self, path: &Path) -> Result<(), WorkerError> {
        let mut m: HashMap<String, Tensor> = HashMap::new();
        m.insert("model.embed_tokens.weight".into(), self.embed.clone());
        for (i, l) in self.layers.iter().enumerate() {
            let ts = [
                &l.attn_norm,
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.mlp_norm,
                &l.w_gate,
                &l.w_up,
                &l.w_down,
            ];
            for (name, t) in layer_names(i).into_iter().zip(ts) {
                m.insert(name, t.clone());
            }
        }
        m.insert("model.norm.weight".into(), self.norm.clone());
        if !self.cfg.tie_word_embeddings {
            m.insert("lm_head.weight".into(), self.lm_head.clone());
        }
        candle_core::safetensors::save(&m, path)
            .map_err(|e| WorkerError::Weights(format!("{}: {e}", path.display())))
    }

    fn from_weights(
        cfg: &ModelConfig,
        mut w: HashMap<String, Tensor>,
        fingerprint: String,
    ) -> Result<Self, WorkerError> {
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor, WorkerError> {
            let t = w
                .remove(name)
                .ok_or_else(|| WorkerError::Weights(format!("tensor {name} is missing")))?;
            if t.dims() != shape {
                return Err(WorkerError::Weights(format!(
                    "tensor {name} has shape {:?}, the config needs {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(DType::F32)?.contiguous()?)
        };
        let d = cfg.hidden_size;
        let kv = cfg.num_kv_heads * cfg.head_dim();
        let ff = cfg.intermediate_size;
        let embed = take("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let n = layer_names(i);
            layers.push(Layer {
                attn_norm: take(&n[0], &[d])?,
                wq: take(&n[1], &[d, d])?,
                wk: take(&n[2], &[kv, d])?,
                wv: take(&n[3], &[kv, d])?,
                wo: take(&n[4], &[d, d])?,
                mlp_norm: take(&n[5], &[d])?,
                w_gate: take(&n[6], &[ff, d])?,
                w_up: take(&n[7], &[ff, d])?,
                w_down: take(&n[8], &[d, ff])?,
            });
        }
        let norm = take("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight", &[cfg.vocab_size, d])?
        };
        let (cos, sin) = rope_tables(cfg)?;
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            fingerprint,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Identifies the weights (`seed-N`, or a hash of the safetensors file): part of the cache
    /// namespace, so models with different weights never share K/V.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Checks `tokens` can be appended to a cache holding `cached` positions.
    pub fn check_tokens(&self, cached: usize, tokens: &[u32]) -> Result<(), WorkerError> {
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(WorkerError::Prompt(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                self.cfg.vocab_size
            )));
        }
        if cached + tokens.len() > self.cfg.max_positions {
            return Err(WorkerError::Prompt(format!(
                "{} positions exceed the model's limit of {}",
                cached + tokens.len(),
                self.cfg.max_positions
            )));
        }
        Ok(())
    }

    /// Runs `tokens` (positions `cache.len()..`) through the model in chunks that end on
    /// multiples of `chunk` positions, appending their K/V to `cache`; returns the logits of
    /// the last token. `chunk` is the cache's tokens per block, which makes a prefill that
    /// resumes from fetched blocks identical to a full one.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        chunk: usize,
    ) -> Result<Vec<f32>, WorkerError> {
        if tokens.is_empty() {
            return Err(WorkerError::Prompt("nothing to prefill".into()));
        }
        self.check_tokens(cache.len(), tokens)?;
        let chunk = chunk.max(1);
        let mut rest = tokens;
        let mut last = None;
        while !rest.is_empty() {
            let pos = cache.len();
            let room = chunk - pos % chunk;
            let (now, later) = rest.split_at(room.min(rest.len()));
            last = Some(self.forward(now, cache, later.is_empty())?);
            rest = later;
        }
        let hidden = last.ok_or_else(|| WorkerError::Prompt("nothing to prefill".into()))?;
        self.logits(&hidden)
    }

    /// One decoding step: appends `token` and returns the next token's logits.
    pub fn step(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>, WorkerError> {
        self.check_tokens(cache.len(), &[token])?;
        let hidden = self.forward(&[token], cache, true)?;
        self.logits(&hidden)
    }

    fn logits(&self, last_hidden: &Tensor) -> Result<Vec<f32>, WorkerError> {
        let h = candle_nn::ops::rms_norm(last_hidden, &self.norm, self.cfg.rms_norm_eps as f32)?;
        Ok(h.matmul(&self.lm_head.t()?)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// Forward pass of one chunk; returns the final hidden state of its last token, `[1, d]`.
    /// With `last_only` (the prompt's final chunk), the last layer computes K/V for every
    /// position but queries, attention and MLP only for the last one: the other positions'
    /// outputs are never read.
    fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor, WorkerError> {
        let cfg = &self.cfg;
        let (c, pos) = (tokens.len(), cache.len());
        let (h, kvh, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim());
        let groups = h / kvh;
        let eps = cfg.rms_norm_eps as f32;
        let ids = Tensor::from_slice(tokens, c, &Device::Cpu)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let cos = self.cos.narrow(0, pos, c)?;
        let sin = self.sin.narrow(0, pos, c)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let proj = |input: &Tensor, w: &Tensor, nh: usize| -> Result<Tensor, WorkerError> {
            let rows = input.dim(0)?;
            Ok(input
                .matmul(&w.t()?)?
                .reshape((1, rows, nh, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let last_layer = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            let n = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
            let k = candle_nn::rotary_emb::rope(&proj(&n, &l.wk, kvh)?, &cos, &sin)?;
            let v = proj(&n, &l.wv, kvh)?;
            let k = k.squeeze(0)?.to_dtype(cache.dtype())?;
            let v = v.squeeze(0)?.to_dtype(cache.dtype())?;
            let (ks, vs) = cache.append(i, k, v)?;
            let ks = ks.to_dtype(DType::F32)?;
            let vs = vs.to_dtype(DType::F32)?;
            // Query positions `first..c` of the chunk.
            let first = if last_only && i == last_layer {
                c - 1
            } else {
                0
            };
            let rows = c - first;
            let (n, x_in) = if first > 0 {
                (n.narrow(0, first, rows)?, x.narrow(0, first, rows)?)
            } else {
                (n, x)
            };
            let q = proj(&n, &l.wq, h)?;
            let q = candle_nn::rotary_emb::rope(
                &q,
                &cos.narrow(0, first, rows)?,
                &sin.narrow(0, first, rows)?,
            )?;
            // Queries of the heads sharing a K/V head are stacked: [kv_heads, groups * rows, hd].
            let q = q.reshape((kvh, groups * rows, hd))?;
            let softmax = CausalSoftmax {
                pos,
                chunk: c,
                first,
                scale,
            };
            let att = q.matmul(&ks.t()?)?.apply_op1_no_bwd(&softmax)?;
            let out = att
                .matmul(&vs)?
                .reshape((h, rows, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((rows, h * hd))?;
            let y = (x_in + out.matmul(&l.wo.t()?)?)?;
            let n = candle_nn::ops::rms_norm(&y, &l.mlp_norm, eps)?;
            let gate = candle_nn::ops::silu(&n.matmul(&l.w_gate.t()?)?)?;
            let up = n.matmul(&l.w_up.t()?)?;
            x = (y + (gate * up)?.matmul(&l.w_down.t()?)?)?;
        }
        cache.len = pos + c;
        let rows = x.dim(0)?;
        Ok(x.narrow(0, rows - 1, 1)?)
    }
}

/// Fused scale, causal mask and softmax over the last axis of attention scores
/// `[kv_heads, groups * (chunk - first), pos + chunk]` (rows ordered kv head, group, query) for
/// the queries at positions `pos + first..pos + chunk`: query `i` sees keys `0..=pos + i`. One
/// multi-threaded pass instead of three single-threaded ones over the largest tensor of the
/// prefill.
struct CausalSoftmax {
    pos: usize,
    chunk: usize,
    first: usize,
    scale: f32,
}

impl candle_core::CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "kvshare-causal-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(src) = storage else {
            candle_core::bail!("causal softmax expects f32 scores");
        };
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("causal softmax expects contiguous scores");
        };
        let src = &src[o1..o2];
        let keys = layout.dims().last().copied().unwrap_or(0);
        if keys != self.pos + self.chunk || self.first >= self.chunk {
            candle_core::bail!(
                "scores have {keys} keys, expected {}",
                self.pos + self.chunk
            );
        }
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(keys)
            .zip(src.par_chunks(keys))
            .enumerate()
            .for_each(|(row, (d, s))| {
                let seen = self.pos + self.first + row % (self.chunk - self.first) + 1;
                let (d, s) = (&mut d[..seen], &s[..seen]);
                let max = max_of(s) * self.scale;
                for (o, &x) in d.iter_mut().zip(s) {
                    *o = exp_nonpositive(x * self.scale - max);
                }
                let inv = 1.0 / sum_of(d);
                d.iter_mut().for_each(|o| *o *= inv);
            });
        Ok((candle_core::CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Maximum of a non-empty slice (eight independent lanes, so it vectorises).
fn max_of(s: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = s.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    tail.iter()
        .chain(lanes.iter())
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Sum of a slice in eight lanes (a fixed order: the same inputs give the same bits).
fn sum_of(s: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = s.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().chain(tail).sum()
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum): Cephes' single-precision
/// range reduction and polynomial, branch-free so loops over it vectorise; relative error
/// below 2e-7. Inputs under -87 give 2^-126 * e^(x + 87 ln 2)-ish tiny values, never NaN.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = if x < -87.0 { -87.0 } else { x };
    // n = round(x / ln 2), by the 1.5 * 2^23 trick.
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n: n + 127 (in 1..=127 here) lands in the low mantissa bits of the magic sum; shift it
    // into the exponent field (integer ops only, so the loop vectorises).
    y * f32::from_bits((n + (12_582_912.0 + 127.0)).to_bits() << 23)
}

/// RoPE cos/sin tables `[max_positions, head_dim / 2]` (Hugging Face Llama convention).
fn rope_tables(cfg: &ModelConfig) -> Result<(Tensor, Tensor), WorkerError> {
    let hd = cfg.head_dim();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let n = cfg.max_positions;
    let mut cos = Vec::with_capacity(n * hd / 2);
    let mut sin = Vec::with_capacity(n * hd / 2);
    for p in 0..n {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, hd / 2), &Device::Cpu)?,
        Tensor::from_vec(sin, (n, hd / 2), &Device::Cpu)?,
    ))
}

/// Index of the largest logit (greedy decoding); ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Largest absolute difference between two logit vectors (infinite when lengths differ).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Model {
        let cfg = ModelConfig::preset("tiny").expect("preset");
        Model::random(&cfg, 7).expect("model")
    }

    fn prompt(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97)) % 512)
            .collect()
    }

    /// The tiny model, a prompt of `n` tokens, and two empty f32 caches to compare runs in.
    fn fixture(n: usize, seed: u32) -> (Model, Vec<u32>, KvCache, KvCache) {
        let caches = (KvCache::new(2, DType::F32), KvCache::new(2, DType::F32));
        (tiny(), prompt(n, seed), caches.0, caches.1)
    }

    /// The elements of an f32 tensor, flattened.
    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32 values")
    }

    #[test]
    fn same_seed_same_model_other_seed_other_logits() {
        let cfg = ModelConfig::preset("tiny").expect("preset");
        let p = prompt(40, 1);
        let run = |m: &Model| {
            let mut c = KvCache::new(cfg.num_layers, DType::F32);
            m.prefill(&p, &mut c, 16).expect("prefill")
        };
        let a = run(&Model::random(&cfg, 1).expect("a"));
        let b = run(&Model::random(&cfg, 1).expect("b"));
        let c = run(&Model::random(&cfg, 2).expect("c"));
        assert_eq!(a, b);
        assert!(max_abs_diff(&a, &c) > 1e-4);
        assert_eq!(a.len(), cfg.vocab_size);
        assert!(a.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn resuming_from_a_block_aligned_cache_is_bit_identical() {
        let m = tiny();
        let p = prompt(70, 3);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let mut full = KvCache::new(2, dtype);
            let want = m.prefill(&p, &mut full, 16).expect("full");
            let mut part = KvCache::new(2, dtype);
            m.prefill(&p[..32], &mut part, 16).expect("prefix");
            let got = m.prefill(&p[32..], &mut part, 16).expect("rest");
            assert_eq!(want, got, "{dtype:?}");
            assert_eq!(part.len(), 70);
            // Decoding continues identically.
            let t = argmax(&want);
            assert_eq!(
                m.step(t, &mut full).expect("step"),
                m.step(t, &mut part).expect("step")
            );
        }
    }

    #[test]
    fn chunking_changes_rounding_only() {
        // One-shot (chunk = whole prompt) vs 16-token chunks: same function, f32 rounding apart.
        let (m, p, mut a, mut b) = fixture(64, 5);
        let x = m.prefill(&p, &mut a, 64).expect("one shot");
        let y = m.prefill(&p, &mut b, 16).expect("chunked");
        assert!(max_abs_diff(&x, &y) < 1e-4, "{}", max_abs_diff(&x, &y));
    }

    #[test]
    fn fused_causal_softmax_matches_mask_then_softmax() {
        let (kvh, groups, c, pos) = (2, 3, 5, 7);
        let total = pos + c;
        let v: Vec<f32> = (0..kvh * groups * c * total)
            .map(|i| ((i * 7919 % 1000) as f32 / 100.0) - 5.0)
            .collect();
        let scores = Tensor::from_vec(v, (kvh, groups * c, total), &Device::Cpu).expect("t");
        let op = CausalSoftmax {
            pos,
            chunk: c,
            first: 0,
            scale: 0.5,
        };
        let got = scores.apply_op1_no_bwd(&op).expect("op");
        let mut mask = vec![0f32; c * total];
        for i in 0..c {
            for j in pos + i + 1..total {
                mask[i * total + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(mask, (c, total), &Device::Cpu).expect("mask");
        let want = (scores * 0.5)
            .and_then(|t| t.reshape((kvh, groups, c, total)))
            .and_then(|t| t.broadcast_add(&mask))
            .and_then(|t| candle_nn::ops::softmax_last_dim(&t))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("reference");
        let got = values(&got);
        assert!(
            max_abs_diff(&got, &want) < 1e-6,
            "{}",
            max_abs_diff(&got, &want)
        );
        // Masked keys get exactly zero weight.
        assert_eq!(got[pos + 1], 0.0);
    }

    #[test]
    fn exp_nonpositive_is_accurate_over_its_range() {
        let mut worst = 0f32;
        let mut x = 0f32;
        while x > -90.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            if want > 1e-37 {
                worst = worst.max(((got - want) / want).abs());
            }
            assert!(got.is_finite() && got >= 0.0);
            x -= 0.000_97;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(
            max_of(&[1.0, -3.0, 7.5, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0]),
            9.0
        );
        assert_eq!(sum_of(&[1.0; 11]), 11.0);
    }

    #[test]
    fn last_only_final_layer_matches_the_full_computation() {
        let (m, p, mut a, mut b) = fixture(37, 11);
        let full = m.forward(&p, &mut a, false).expect("full");
        let last = m.forward(&p, &mut b, true).expect("last only");
        let (x, y) = (values(&full), values(&last));
        assert_eq!(x.len(), m.config().hidden_size);
        assert!(max_abs_diff(&x, &y) < 1e-5, "{}", max_abs_diff(&x, &y));
        // K/V of every position is still cached, identically.
        for l in 0..2 {
            let (ka, va) = a.layer(l).expect("a");
            let (kb, vb) = b.layer(l).expect("b");
            assert_eq!(values(ka), values(kb));
            assert_eq!(values(va), values(vb));
        }
        assert_eq!(b.len(), 37);
    }

    #[test]
    fn bad_prompts_are_refused() {
        let m = tiny();
        let mut c = KvCache::new(2, DType::F32);
        assert!(matches!(
            m.prefill(&[], &mut c, 16),
            Err(WorkerError::Prompt(_))
        ));
        assert!(matches!(
            m.prefill(&[512], &mut c, 16),
            Err(WorkerError::Prompt(_))
        ));
        let long = vec![1u32; m.config().max_positions + 1];
        assert!(matches!(
            m.prefill(&long, &mut c, 16),
            Err(WorkerError::Prompt(_))
        ));
    }

    #[test]
    fn safetensors_round_trip_gives_the_same_logits() {
        let (m, p, mut a, mut b) = fixture(20, 9);
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.safetensors");
        m.save_safetensors(&path).expect("save");
        let back = Model::load_safetensors(m.config(), &path).expect("load");
        assert!(back.fingerprint().starts_with("st-"));
        assert_eq!(
            m.prefill(&p, &mut a, 16).expect("a"),
            back.prefill(&p, &mut b, 16).expect("b")
        );
        let mut other = m.config().clone();
        other.hidden_size = 128;
        assert!(matches!(
            Model::load_safetensors(&other, &path),
            Err(WorkerError::Weights(_))
        ));
    }
}

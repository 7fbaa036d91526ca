//! Exact conversion between the model's K/V cache (`[kv_heads, tokens, head_dim]` per layer)
//! and kvshare blocks (`[layer][k, v][token of block][kv_head][dim]`, little-endian, the
//! namespace's dtype). No value is rounded: the cache already holds the block dtype.

use candle_core::{DType as TensorDType, Device, Tensor};
use kvshare_core::{DType, KvLayout};

use crate::error::WorkerError;
use crate::model::KvCache;

/// The tensor dtype that stores a kvshare dtype (u8/fp8 K/V is not supported by the model).
pub fn tensor_dtype(d: DType) -> Result<TensorDType, WorkerError> {
    match d {
        DType::F32 => Ok(TensorDType::F32),
        DType::F16 => Ok(TensorDType::F16),
        DType::BF16 => Ok(TensorDType::BF16),
        DType::U8 => Err(WorkerError::Layout(
            "the worker keeps K/V as f32, f16 or bf16; u8 namespaces are not supported".into(),
        )),
    }
}

/// Little-endian bytes of a tensor (any layout; it is made contiguous first).
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>, WorkerError> {
    let flat = t.flatten_all()?;
    Ok(match flat.dtype() {
        TensorDType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        TensorDType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        TensorDType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(WorkerError::Layout(format!(
                "cannot serialise a {other:?} tensor"
            )));
        }
    })
}

/// Raw K/V of blocks `first..first + count` of `cache`, each in block layout.
pub fn cache_to_blocks(
    cache: &KvCache,
    layout: &KvLayout,
    first: usize,
    count: usize,
) -> Result<Vec<Vec<u8>>, WorkerError> {
    let tpb = layout.tokens_per_block as usize;
    check_layout(cache, layout)?;
    if (first + count) * tpb > cache.len() {
        return Err(WorkerError::Layout(format!(
            "blocks {first}..{} need {} positions, the cache holds {}",
            first + count,
            (first + count) * tpb,
            cache.len()
        )));
    }
    let row = layout.num_kv_heads as usize * layout.head_dim as usize * layout.dtype.size();
    let plane = tpb * row;
    let mut blocks: Vec<Vec<u8>> = (0..count)
        .map(|_| Vec::with_capacity(layout.block_bytes() as usize))
        .collect();
    for l in 0..cache.num_layers() {
        let (k, v) = cache
            .layer(l)
            .ok_or_else(|| WorkerError::Layout(format!("layer {l} is empty")))?;
        for t in [k, v] {
            // [kv_heads, tokens, dim] -> [tokens, kv_heads, dim] for the span of the blocks.
            let span = t
                .narrow(1, first * tpb, count * tpb)?
                .transpose(0, 1)?
                .contiguous()?;
            let bytes = tensor_bytes(&span)?;
            for (b, out) in blocks.iter_mut().enumerate() {
                out.extend_from_slice(&bytes[b * plane..(b + 1) * plane]);
            }
        }
    }
    Ok(blocks)
}

/// A cache holding the positions of `blocks` (raw, in block layout, in prefix order).
pub fn blocks_to_cache(blocks: &[Vec<u8>], layout: &KvLayout) -> Result<KvCache, WorkerError> {
    let dtype = tensor_dtype(layout.dtype)?;
    let layers = layout.num_layers as usize;
    let tpb = layout.tokens_per_block as usize;
    let (heads, dim) = (layout.num_kv_heads as usize, layout.head_dim as usize);
    let plane = tpb * heads * dim * layout.dtype.size();
    if let Some((i, b)) = blocks
        .iter()
        .enumerate()
        .find(|(_, b)| b.len() as u64 != layout.block_bytes())
    {
        return Err(WorkerError::Layout(format!(
            "block {i} holds {} bytes, the layout needs {}",
            b.len(),
            layout.block_bytes()
        )));
    }
    if blocks.is_empty() {
        return Ok(KvCache::new(layers, dtype));
    }
    let tokens = blocks.len() * tpb;
    let mut out = Vec::with_capacity(layers);
    let mut buf = Vec::with_capacity(blocks.len() * plane);
    for l in 0..layers {
        let mut kv = [None, None];
        for (which, slot) in kv.iter_mut().enumerate() {
            buf.clear();
            let off = (2 * l + which) * plane;
            for b in blocks {
                buf.extend_from_slice(&b[off..off + plane]);
            }
            let t = Tensor::from_raw_buffer(&buf, dtype, &[tokens, heads, dim], &Device::Cpu)?
                .transpose(0, 1)?
                .contiguous()?;
            *slot = Some(t);
        }
        let [Some(k), Some(v)] = kv else {
            return Err(WorkerError::Layout("missing K or V plane".into()));
        };
        out.push((k, v));
    }
    KvCache::from_layers(dtype, out)
}

fn check_layout(cache: &KvCache, layout: &KvLayout) -> Result<(), WorkerError> {
    if cache.num_layers() != layout.num_layers as usize
        || cache.dtype() != tensor_dtype(layout.dtype)?
    {
        return Err(WorkerError::Layout(format!(
            "cache of {} layers ({:?}) does not match the namespace layout {layout:?}",
            cache.num_layers(),
            cache.dtype()
        )));
    }
    if let Some((k, _)) = cache.layer(0) {
        let (h, _, d) = k.dims3()?;
        if h != layout.num_kv_heads as usize || d != layout.head_dim as usize {
            return Err(WorkerError::Layout(format!(
                "cache has {h} K/V heads of {d} dims, the layout {} of {}",
                layout.num_kv_heads, layout.head_dim
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::Model;

    fn layout(cfg: &ModelConfig, dtype: DType, tpb: u32) -> KvLayout {
        KvLayout {
            num_layers: cfg.num_layers as u32,
            num_kv_heads: cfg.num_kv_heads as u32,
            head_dim: cfg.head_dim() as u32,
            dtype,
            tokens_per_block: tpb,
        }
    }

    #[test]
    fn blocks_round_trip_exactly_for_every_dtype() {
        let cfg = ModelConfig::preset("tiny").expect("preset");
        let m = Model::random(&cfg, 3).expect("model");
        let p: Vec<u32> = (0..50).map(|i| (i * 31 + 7) % 512).collect();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let lay = layout(&cfg, dtype, 16);
            let mut c = KvCache::new(cfg.num_layers, tensor_dtype(dtype).expect("dtype"));
            m.prefill(&p, &mut c, 16).expect("prefill");
            let blocks = cache_to_blocks(&c, &lay, 0, 3).expect("to blocks");
            assert_eq!(blocks.len(), 3);
            assert!(blocks.iter().all(|b| b.len() as u64 == lay.block_bytes()));
            let back = blocks_to_cache(&blocks, &lay).expect("to cache");
            assert_eq!(back.len(), 48);
            for l in 0..cfg.num_layers {
                let (k0, v0) = c.layer(l).expect("layer");
                let (k1, v1) = back.layer(l).expect("layer");
                let want_k = tensor_bytes(&k0.narrow(1, 0, 48).expect("narrow")).expect("k");
                let want_v = tensor_bytes(&v0.narrow(1, 0, 48).expect("narrow")).expect("v");
                assert_eq!(want_k, tensor_bytes(k1).expect("k"));
                assert_eq!(want_v, tensor_bytes(v1).expect("v"));
            }
            // A later block alone matches the same bytes.
            let one = cache_to_blocks(&c, &lay, 2, 1).expect("block 2");
            assert_eq!(one[0], blocks[2]);
        }
    }

    #[test]
    fn block_layout_is_layer_kv_token_head_dim() {
        // Hand-built cache: 1 layer, 2 heads, 2 tokens, 1 dim; K = 10*h + t, V = 100 + 10*h + t.
        let k = Tensor::from_vec(vec![0f32, 1., 10., 11.], (2, 2, 1), &Device::Cpu).expect("k");
        let v = (k.clone() + 100.0).expect("v");
        let c = KvCache::from_layers(TensorDType::F32, vec![(k, v)]).expect("cache");
        let lay = KvLayout {
            num_layers: 1,
            num_kv_heads: 2,
            head_dim: 1,
            dtype: DType::F32,
            tokens_per_block: 2,
        };
        let b = cache_to_blocks(&c, &lay, 0, 1).expect("block");
        let vals: Vec<f32> = b[0]
            .chunks(4)
            .map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]]))
            .collect();
        // K: token 0 (head 0, head 1), token 1 (head 0, head 1); then V likewise.
        assert_eq!(vals, vec![0., 10., 1., 11., 100., 110., 101., 111.]);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let cfg = ModelConfig::preset("tiny").expect("preset");
        let lay = layout(&cfg, DType::BF16, 16);
        assert!(blocks_to_cache(&[vec![0u8; 10]], &lay).is_err());
        let c = KvCache::new(cfg.num_layers, TensorDType::BF16);
        assert!(cache_to_blocks(&c, &lay, 0, 1).is_err());
        assert!(tensor_dtype(DType::U8).is_err());
    }
}

//! Real K/V activations laid out as `[layer][k, v][token][head][dim]` (the layout of
//! `shared/data/kv-sample` and of `tests/data/kv-*-256tok.bin`), cut into blocks of the
//! block layout `[layer][k, v][token of block][head][dim]`.

use crate::error::CoreError;
use crate::layout::KvLayout;

/// A buffer of real K/V for `tokens` positions of a model with `layout`'s layers, heads and dims.
#[derive(Debug, Clone)]
pub struct KvSample<'a> {
    data: &'a [u8],
    layout: KvLayout,
    tokens: usize,
}

impl<'a> KvSample<'a> {
    /// Wraps `data`; its length must be a whole number of tokens of `layout`.
    pub fn new(data: &'a [u8], layout: KvLayout) -> Result<Self, CoreError> {
        let per_token = layout.token_bytes() as usize;
        if per_token == 0 || !data.len().is_multiple_of(per_token) {
            return Err(CoreError::InvalidInput(format!(
                "sample of {} bytes is not a whole number of {per_token}-byte tokens",
                data.len()
            )));
        }
        Ok(KvSample {
            data,
            layout,
            tokens: data.len() / per_token,
        })
    }

    /// Positions in the sample.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Raw K/V of the `layout.tokens_per_block` positions starting at `start` (wrapping around
    /// the sample), in block layout.
    pub fn block(&self, start: usize) -> Vec<u8> {
        let l = &self.layout;
        let row = l.num_kv_heads as usize * l.head_dim as usize * l.dtype.size();
        let tpb = l.tokens_per_block as usize;
        let mut out = Vec::with_capacity(l.block_bytes() as usize);
        for plane in 0..(l.num_layers as usize * 2) {
            let base = plane * self.tokens * row;
            for t in 0..tpb {
                let pos = (start + t) % self.tokens;
                out.extend_from_slice(&self.data[base + pos * row..base + (pos + 1) * row]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DType;

    #[test]
    fn gathers_rows_per_layer_and_kv() {
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 1,
            head_dim: 1,
            dtype: DType::U8,
            tokens_per_block: 2,
        };
        // 2 layers x 2 (k,v) x 3 tokens, one byte each.
        let data: Vec<u8> = (0..12).collect();
        let s = KvSample::new(&data, layout).expect("sample");
        assert_eq!(s.tokens(), 3);
        assert_eq!(s.block(0), vec![0, 1, 3, 4, 6, 7, 9, 10]);
        assert_eq!(s.block(2), vec![2, 0, 5, 3, 8, 6, 11, 9]);
        assert!(KvSample::new(&data[..11], layout).is_err());
    }
}

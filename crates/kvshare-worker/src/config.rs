//! Model shapes: the built-in presets and Hugging Face `config.json` (Llama family).

use serde::{Deserialize, Serialize};

use crate::error::WorkerError;

/// Shape of a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU MLP).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Name used in the cache namespace (with the weights' fingerprint as revision).
    pub name: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest sequence (prompt plus generated tokens) the RoPE tables cover.
    pub max_positions: usize,
    /// Whether the output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Dimensions of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Checks the shape is consistent (heads divide the width, KV heads divide the heads, ...).
    pub fn validate(&self) -> Result<(), WorkerError> {
        let bad = |m: String| Err(WorkerError::Config(m));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_layers == 0
            || self.num_heads == 0
            || self.num_kv_heads == 0
            || self.max_positions == 0
        {
            return bad(format!(
                "model {:?}: every dimension must be > 0",
                self.name
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad(format!(
                "hidden_size {} is not a multiple of num_heads {}",
                self.hidden_size, self.num_heads
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_heads {} is not a multiple of num_kv_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// A preset by name: `tiny` (tests), `small` (the demo), `medium` (benchmarks).
    pub fn preset(name: &str) -> Result<Self, WorkerError> {
        let base = |name: &str, vocab, d, ff, layers, heads, kv| ModelConfig {
            name: format!("kvshare-llama-{name}"),
            vocab_size: vocab,
            hidden_size: d,
            intermediate_size: ff,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_positions: 8192,
            tie_word_embeddings: false,
        };
        match name {
            "tiny" => Ok(base("tiny", 512, 64, 192, 2, 4, 2)),
            "small" => Ok(base("small", 4096, 256, 768, 4, 8, 2)),
            "medium" => Ok(base("medium", 32_000, 512, 2048, 8, 8, 2)),
            other => Err(WorkerError::Config(format!(
                "unknown model preset {other:?}; expected tiny, small or medium"
            ))),
        }
    }

    /// Reads a Hugging Face Llama `config.json`.
    pub fn from_hf_json(name: &str, json: &str) -> Result<Self, WorkerError> {
        #[derive(Deserialize)]
        struct Hf {
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            rope_theta: Option<f32>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
        }
        let hf: Hf = serde_json::from_str(json)
            .map_err(|e| WorkerError::Config(format!("config.json: {e}")))?;
        let cfg = ModelConfig {
            name: name.to_string(),
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            max_positions: hf.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parameters outside the embedding table (the ones every token multiplies through).
    pub fn non_embedding_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let kv = (self.num_kv_heads * self.head_dim()) as u64;
        let ff = self.intermediate_size as u64;
        let per_layer = 2 * d * d + 2 * d * kv + 3 * d * ff + 2 * d;
        per_layer * self.num_layers as u64 + d
    }

    /// Prefill FLOPs of one token at position `pos` (matmuls only: projections, MLP and
    /// attention over `pos + 1` keys; the output head is excluded since prefill needs it only
    /// for the last token).
    pub fn flops_per_token(&self, pos: u64) -> u64 {
        let attn = 4 * (pos + 1) * self.hidden_size as u64 * self.num_layers as u64;
        2 * self.non_embedding_params() + attn
    }

    /// Prefill FLOPs of positions `from..to` (see [`ModelConfig::flops_per_token`]): the work
    /// a prefill resuming after `from` cached positions still does.
    pub fn prefill_flops(&self, from: u64, to: u64) -> f64 {
        (from..to).map(|p| self.flops_per_token(p) as f64).sum()
    }

    /// Bytes of K and V one token occupies in the cache at `dtype_bytes` per element.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> u64 {
        (2 * self.num_layers * self.num_kv_heads * self.head_dim() * dtype_bytes) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_gqa() {
        for p in ["tiny", "small", "medium"] {
            let c = ModelConfig::preset(p).expect("preset");
            c.validate().expect("valid");
            assert!(c.num_kv_heads < c.num_heads);
        }
        assert!(ModelConfig::preset("huge").is_err());
    }

    #[test]
    fn llama3_8b_config_json_parses_with_its_known_size() {
        let json = r#"{"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,
            "rope_theta":500000.0,"rms_norm_eps":1e-5,"max_position_embeddings":8192}"#;
        let c = ModelConfig::from_hf_json("llama-3-8b", json).expect("parse");
        assert_eq!(c.head_dim(), 128);
        // 8.03 B parameters in total, 6.98 B outside the two 128256x4096 tables.
        let total = c.non_embedding_params() + 2 * 128_256 * 4096;
        assert!((8_000_000_000..8_050_000_000).contains(&total), "{total}");
        assert_eq!(c.kv_bytes_per_token(2), 131_072);
    }

    #[test]
    fn inconsistent_shapes_are_refused() {
        let mut c = ModelConfig::preset("tiny").expect("preset");
        c.num_kv_heads = 3;
        assert!(c.validate().is_err());
        assert!(ModelConfig::from_hf_json("x", "{}").is_err());
    }
}

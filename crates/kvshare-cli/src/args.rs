//! Shared command-line arguments: namespaces and token lists.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use kvshare_core::cbor::CborValue;
use kvshare_core::{DType, KeyScheme, KvLayout, Namespace, VllmHashParams};

/// How to compute block keys.
#[derive(Debug, Clone, Args)]
pub struct SchemeArgs {
    /// Key scheme: `kvshare` (chained SHA-256 rooted at the namespace digest) or `vllm`
    /// (vLLM's sha256_cbor prefix-cache hash).
    #[arg(long, value_enum, default_value = "kvshare")]
    pub scheme: KeyScheme,
    /// vLLM scheme: the PYTHONHASHSEED vLLM ran with.
    #[arg(long, default_value = "0")]
    pub hash_seed: String,
    /// vLLM scheme: LoRA adapter name (mixed into every block).
    #[arg(long)]
    pub lora_name: Option<String>,
    /// vLLM scheme: request cache_salt (mixed into block 0).
    #[arg(long)]
    pub cache_salt: Option<String>,
    /// vLLM scheme: further extra keys (strings), appended after the LoRA key on every block.
    #[arg(long = "extra-key")]
    pub extra_keys: Vec<String>,
    /// vLLM scheme: LoRA adapter path (part of the LoRA key with the name).
    #[arg(long, requires = "lora_name")]
    pub lora_path: Option<String>,
}

impl SchemeArgs {
    /// The key scheme, with the vLLM parameters filled in from the other flags.
    pub fn scheme(&self) -> KeyScheme {
        match self.scheme {
            KeyScheme::Chained => KeyScheme::Chained,
            KeyScheme::VllmSha256Cbor(_) => KeyScheme::VllmSha256Cbor(VllmHashParams {
                python_hash_seed: self.hash_seed.clone(),
                lora_name: self.lora_name.clone(),
                lora_path: self.lora_path.clone(),
                cache_salt: self.cache_salt.clone(),
                extra: self
                    .extra_keys
                    .iter()
                    .map(|s| CborValue::Text(s.clone()))
                    .collect(),
            }),
        }
    }
}

/// The namespace a command works in.
#[derive(Debug, Clone, Args)]
pub struct NamespaceArgs {
    /// Model id.
    #[arg(long, env = "KVSHARE_MODEL", default_value = "demo-model")]
    pub model: String,
    /// Model revision.
    #[arg(long, default_value = "")]
    pub revision: String,
    /// Transformer layers.
    #[arg(long, default_value_t = 6)]
    pub layers: u32,
    /// KV heads per layer.
    #[arg(long, default_value_t = 12)]
    pub kv_heads: u32,
    /// Elements per head.
    #[arg(long, default_value_t = 32)]
    pub head_dim: u32,
    /// Element type.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DType,
    /// Tokens per block.
    #[arg(long, default_value_t = 16)]
    pub block_tokens: u32,
    /// Tensor-parallel rank.
    #[arg(long, default_value_t = 0)]
    pub tp_rank: u32,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub tp_size: u32,
    /// LoRA adapter.
    #[arg(long)]
    pub lora: Option<String>,
    /// Tenant isolation salt.
    #[arg(long, env = "KVSHARE_TENANT_SALT")]
    pub tenant_salt: Option<String>,
    /// How block keys are computed.
    #[command(flatten)]
    pub scheme: SchemeArgs,
}

impl NamespaceArgs {
    /// Builds and validates the namespace.
    pub fn namespace(&self) -> anyhow::Result<Namespace> {
        let layout = KvLayout {
            num_layers: self.layers,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
            tokens_per_block: self.block_tokens,
        };
        layout.validate()?;
        Ok(Namespace {
            model: self.model.clone(),
            revision: self.revision.clone(),
            layout,
            tp_rank: self.tp_rank,
            tp_size: self.tp_size,
            lora: self.lora.clone(),
            tenant_salt: self.tenant_salt.clone(),
            scheme: self.scheme.scheme(),
        })
    }
}

/// Token ids of a prompt.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Token ids, separated by commas or spaces (e.g. "1,2,3").
    #[arg(long, conflicts_with = "tokens_file")]
    pub tokens: Option<String>,
    /// File of token ids: little-endian u32 when it ends in .u32 or .bin, else text.
    #[arg(long)]
    pub tokens_file: Option<PathBuf>,
}

impl TokenArgs {
    /// The token ids.
    pub fn tokens(&self) -> anyhow::Result<Vec<u32>> {
        match (&self.tokens, &self.tokens_file) {
            (Some(t), _) => parse_tokens(t),
            (None, Some(p)) => {
                let is_bin = p.extension().is_some_and(|e| e == "u32" || e == "bin");
                let data = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                if is_bin {
                    if data.len() % 4 != 0 {
                        bail!(
                            "{} has {} bytes, not a whole number of u32 tokens",
                            p.display(),
                            data.len()
                        );
                    }
                    Ok(data
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect())
                } else {
                    parse_tokens(&String::from_utf8(data).context("token file is not UTF-8 text")?)
                }
            }
            (None, None) => bail!("give the prompt with --tokens 1,2,3 or --tokens-file FILE"),
        }
    }
}

/// A prompt: the namespace it is keyed in and its token ids.
#[derive(Debug, Clone, Args)]
pub struct PromptArgs {
    /// The namespace (model, layout, key scheme).
    #[command(flatten)]
    pub ns: NamespaceArgs,
    /// The token ids.
    #[command(flatten)]
    pub tokens: TokenArgs,
}

impl PromptArgs {
    /// The validated namespace and the token ids.
    pub fn resolve(&self) -> anyhow::Result<(Namespace, Vec<u32>)> {
        Ok((self.ns.namespace()?, self.tokens.tokens()?))
    }
}

/// Parses "1, 2 3,4" or "[1, 2, 3]".
pub fn parse_tokens(s: &str) -> anyhow::Result<Vec<u32>> {
    s.split(|c: char| c == ',' || c.is_whitespace() || c == '[' || c == ']')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("{t:?} is not a token id (0..=4294967295)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists_parse() {
        assert_eq!(parse_tokens("1,2, 3 4").ok(), Some(vec![1, 2, 3, 4]));
        assert_eq!(parse_tokens("[7, 8]").ok(), Some(vec![7, 8]));
        assert!(parse_tokens("1,x").is_err());
        assert!(parse_tokens("-1").is_err());
    }
}

//! Namespaces: everything that makes two KV caches incompatible.

use sha2::{Digest, Sha256};

use crate::error::CoreError;
use crate::keys::{BlockKey, KeyScheme, block_keys};
use crate::layout::KvLayout;

/// Identifies a family of compatible KV caches. Blocks of different namespaces never match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// Model id, e.g. `meta-llama/Llama-3.1-8B-Instruct`.
    pub model: String,
    /// Model revision (commit or tag); weights that differ must differ here.
    pub revision: String,
    /// KV layout of one block.
    pub layout: KvLayout,
    /// Tensor-parallel rank whose heads the blocks hold.
    pub tp_rank: u32,
    /// Tensor-parallel world size.
    pub tp_size: u32,
    /// LoRA adapter, if any.
    pub lora: Option<String>,
    /// Tenant isolation salt: tenants with different salts never share blocks.
    pub tenant_salt: Option<String>,
    /// How block keys are computed.
    pub scheme: KeyScheme,
}

impl Namespace {
    /// A namespace for a single-rank model with kvshare's chained key scheme.
    pub fn new(model: impl Into<String>, layout: KvLayout) -> Self {
        Namespace {
            model: model.into(),
            revision: String::new(),
            layout,
            tp_rank: 0,
            tp_size: 1,
            lora: None,
            tenant_salt: None,
            scheme: KeyScheme::Chained,
        }
    }

    /// SHA-256 digest over a length-prefixed encoding of every field: the namespace's identity
    /// on the wire and the root of its chained keys.
    pub fn digest(&self) -> BlockKey {
        let mut h = Sha256::new();
        h.update(b"kvshare/namespace/v1");
        let mut field = |b: &[u8]| {
            h.update((b.len() as u32).to_le_bytes());
            h.update(b);
        };
        field(self.model.as_bytes());
        field(self.revision.as_bytes());
        field(self.scheme.name().as_bytes());
        for v in [
            self.layout.num_layers,
            self.layout.num_kv_heads,
            self.layout.head_dim,
            self.layout.tokens_per_block,
            self.tp_rank,
            self.tp_size,
        ] {
            field(&v.to_le_bytes());
        }
        field(self.layout.dtype.name().as_bytes());
        field(self.lora.as_deref().unwrap_or("").as_bytes());
        field(self.tenant_salt.as_deref().unwrap_or("").as_bytes());
        BlockKey(h.finalize().into())
    }

    /// Keys of every full block of `tokens` in this namespace.
    pub fn block_keys(&self, tokens: &[u32]) -> Result<Vec<BlockKey>, CoreError> {
        block_keys(
            &self.scheme,
            &self.digest(),
            tokens,
            self.layout.tokens_per_block as usize,
        )
    }

    /// Tokens per block.
    pub fn tokens_per_block(&self) -> usize {
        self.layout.tokens_per_block as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DType;

    fn ns() -> Namespace {
        Namespace::new(
            "m",
            KvLayout {
                num_layers: 2,
                num_kv_heads: 2,
                head_dim: 4,
                dtype: DType::F16,
                tokens_per_block: 4,
            },
        )
    }

    #[test]
    fn every_field_changes_the_digest() {
        let base = ns().digest();
        let mut variants = vec![];
        let mut n = ns();
        n.model = "m2".into();
        variants.push(n);
        let mut n = ns();
        n.revision = "r".into();
        variants.push(n);
        let mut n = ns();
        n.layout.dtype = DType::BF16;
        variants.push(n);
        let mut n = ns();
        n.layout.tokens_per_block = 8;
        variants.push(n);
        let mut n = ns();
        n.tp_rank = 1;
        variants.push(n);
        let mut n = ns();
        n.lora = Some("a".into());
        variants.push(n);
        let mut n = ns();
        n.tenant_salt = Some("t".into());
        variants.push(n);
        for v in variants {
            assert_ne!(v.digest(), base, "{v:?}");
        }
        assert_eq!(ns().digest(), base);
    }

    #[test]
    fn tenants_do_not_share_keys() {
        let a = ns();
        let mut b = ns();
        b.tenant_salt = Some("other".into());
        let t: Vec<u32> = (0..8).collect();
        assert_ne!(a.block_keys(&t).ok(), b.block_keys(&t).ok());
    }
}

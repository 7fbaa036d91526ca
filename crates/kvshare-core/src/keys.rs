//! Block keys: 32-byte names of whole token prefixes.
//!
//! Two schemes:
//! - [`KeyScheme::Chained`] (kvshare's own): `key_-1 = namespace digest`,
//!   `key_i = SHA-256("kvshare/block/v1" || key_{i-1} || tokens of block i as u32 little-endian)`.
//! - [`KeyScheme::VllmSha256Cbor`]: byte-compatible with vLLM's `sha256_cbor` prefix-cache hash:
//!   `none_hash = SHA-256(CBOR(text PYTHONHASHSEED))`,
//!   `h_i = SHA-256(CBOR([bstr h_{i-1}, [uint tokens], extra_keys or null]))`.
//!   Extra keys follow vLLM's order: LoRA name (every block), then cache salt (block 0 only).
//!
//! Only full blocks are keyed; a trailing partial block is ignored.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::cbor::CborValue;
use crate::error::CoreError;

/// Length of a block key and of a namespace digest.
pub const KEY_LEN: usize = 32;

/// A 32-byte block key (or namespace digest).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockKey(pub [u8; KEY_LEN]);

impl BlockKey {
    /// Parses a key from exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Result<Self, CoreError> {
        let arr: [u8; KEY_LEN] = b.try_into().map_err(|_| {
            CoreError::InvalidKey(format!("a key must be {KEY_LEN} bytes, got {}", b.len()))
        })?;
        Ok(BlockKey(arr))
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, CoreError> {
        let v =
            hex::decode(s.trim()).map_err(|e| CoreError::InvalidKey(format!("not hex: {e}")))?;
        Self::from_slice(&v)
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// First 8 bytes as a little-endian integer (for logs and cheap fingerprints).
    pub fn prefix_u64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }
}

/// Keys packed end to end, as the `packed_keys` request fields carry them.
pub fn pack_keys(keys: &[BlockKey]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(keys.len() * KEY_LEN);
    for k in keys {
        out.extend_from_slice(&k.0);
    }
    bytes::Bytes::from(out)
}

/// Splits a `packed_keys` field into keys; `None` when its length is not a multiple of
/// [`KEY_LEN`].
pub fn unpack_keys(packed: &[u8]) -> Option<Vec<BlockKey>> {
    if !packed.len().is_multiple_of(KEY_LEN) {
        return None;
    }
    Some(
        packed
            .chunks_exact(KEY_LEN)
            .map(|c| {
                let mut k = [0u8; KEY_LEN];
                k.copy_from_slice(c);
                BlockKey(k)
            })
            .collect(),
    )
}

impl fmt::Debug for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockKey({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Which hash names the blocks of a prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeyScheme {
    /// kvshare's chained SHA-256, rooted at the namespace digest.
    Chained,
    /// vLLM's `sha256_cbor` prefix-cache hash.
    VllmSha256Cbor(VllmHashParams),
}

/// On the command line a scheme is named `kvshare` or `vllm` (or by its stable
/// [`KeyScheme::name`]). `KeyScheme` carries data, so this is written out rather than derived;
/// a parsed `vllm` holds default [`VllmHashParams`] for the caller to fill from its other flags.
#[cfg(feature = "clap")]
impl clap::ValueEnum for KeyScheme {
    fn value_variants<'a>() -> &'a [Self] {
        static VARIANTS: [KeyScheme; 2] = [
            KeyScheme::Chained,
            KeyScheme::VllmSha256Cbor(VllmHashParams {
                python_hash_seed: String::new(),
                lora_name: None,
                lora_path: None,
                cache_salt: None,
                extra: Vec::new(),
            }),
        ];
        &VARIANTS
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        use clap::builder::PossibleValue;
        Some(match self {
            KeyScheme::Chained => PossibleValue::new("kvshare")
                .alias(self.name())
                .help("chained SHA-256 rooted at the namespace digest"),
            KeyScheme::VllmSha256Cbor(_) => PossibleValue::new("vllm")
                .alias(self.name())
                .help("vLLM's sha256_cbor prefix-cache hash"),
        })
    }
}

impl KeyScheme {
    /// Stable name used in namespace digests and by the CLI.
    pub fn name(&self) -> &'static str {
        match self {
            KeyScheme::Chained => "kvshare-sha256-v1",
            KeyScheme::VllmSha256Cbor(_) => "vllm-sha256-cbor",
        }
    }
}

/// Parameters of vLLM's `sha256_cbor` scheme.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct VllmHashParams {
    /// The `PYTHONHASHSEED` text vLLM was started with (vLLM requires it set for reproducible
    /// hashes across processes).
    pub python_hash_seed: String,
    /// LoRA adapter name (`lora_request.lora_name`), mixed into every block.
    pub lora_name: Option<String>,
    /// LoRA adapter path (`lora_request.lora_path`), part of the LoRA key (`None`: CBOR null).
    pub lora_path: Option<String>,
    /// Per-request `cache_salt`, mixed into block 0 only.
    pub cache_salt: Option<String>,
    /// Further extra keys (e.g. multimodal identifiers), appended after the LoRA key on every
    /// block, before the salt.
    pub extra: Vec<CborValue>,
}

impl VllmHashParams {
    /// vLLM's `NONE_HASH`: SHA-256 of the CBOR text string of the seed.
    pub fn none_hash(&self) -> BlockKey {
        sha256(&CborValue::Text(self.python_hash_seed.clone()).encode())
    }

    /// The extra keys of block `index` (its position in the request), or `None` when there
    /// are none (encoded as CBOR null). vLLM 0.32 tags them: `("lora", name, path)` on every
    /// block, then `("cache_salt", salt)` on block 0 only.
    pub fn extra_keys(&self, index: usize) -> Option<Vec<CborValue>> {
        let text = |s: &str| CborValue::Text(s.to_string());
        let mut keys = Vec::new();
        if let Some(name) = &self.lora_name {
            let path = self.lora_path.as_deref().map_or(CborValue::Null, text);
            keys.push(CborValue::Array(vec![text("lora"), text(name), path]));
        }
        keys.extend(self.extra.iter().cloned());
        if index == 0
            && let Some(salt) = self.cache_salt.as_deref().filter(|s| !s.is_empty())
        {
            keys.push(CborValue::Array(vec![text("cache_salt"), text(salt)]));
        }
        (!keys.is_empty()).then_some(keys)
    }
}

fn sha256(data: &[u8]) -> BlockKey {
    BlockKey(Sha256::digest(data).into())
}

/// Key of one block given its parent (chained scheme).
pub fn chained_block_key(parent: &BlockKey, tokens: &[u32]) -> BlockKey {
    let mut h = Sha256::new();
    h.update(b"kvshare/block/v1");
    h.update(parent.0);
    let mut buf = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    h.update(&buf);
    BlockKey(h.finalize().into())
}

/// Key of one block given its parent (vLLM `sha256_cbor` scheme).
pub fn vllm_block_key(
    parent: &BlockKey,
    tokens: &[u32],
    extra: Option<Vec<CborValue>>,
) -> BlockKey {
    let item = CborValue::Array(vec![
        CborValue::Bytes(parent.0.to_vec()),
        CborValue::Array(
            tokens
                .iter()
                .map(|&t| CborValue::Uint(u64::from(t)))
                .collect(),
        ),
        extra.map_or(CborValue::Null, CborValue::Array),
    ]);
    sha256(&item.encode())
}

/// Keys of every full block of `tokens`.
///
/// `root` is the namespace digest for [`KeyScheme::Chained`]; the vLLM scheme roots at its own
/// `none_hash` and ignores it.
pub fn block_keys(
    scheme: &KeyScheme,
    root: &BlockKey,
    tokens: &[u32],
    tokens_per_block: usize,
) -> Result<Vec<BlockKey>, CoreError> {
    if tokens_per_block == 0 {
        return Err(CoreError::InvalidInput(
            "tokens_per_block must be > 0".into(),
        ));
    }
    let mut keys = Vec::with_capacity(tokens.len() / tokens_per_block);
    match scheme {
        KeyScheme::Chained => {
            let mut parent = *root;
            for block in tokens.chunks_exact(tokens_per_block) {
                parent = chained_block_key(&parent, block);
                keys.push(parent);
            }
        }
        KeyScheme::VllmSha256Cbor(p) => {
            let mut parent = p.none_hash();
            for (i, block) in tokens.chunks_exact(tokens_per_block).enumerate() {
                parent = vllm_block_key(&parent, block, p.extra_keys(i));
                keys.push(parent);
            }
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(serde::Deserialize)]
    struct Vectors {
        cases: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        pythonhashseed: String,
        block_size: usize,
        token_ids: Vec<u32>,
        extra_keys: Option<serde_json::Value>,
        none_hash: String,
        block_hashes: Vec<String>,
    }

    #[test]
    fn reproduces_every_vllm_vector() {
        let text = include_str!("../../../tests/data/vllm-sha256-cbor.json");
        let v: Vectors = serde_json::from_str(text).expect("vectors parse");
        assert!(!v.cases.is_empty());
        for case in v.cases {
            assert!(
                case.extra_keys.is_none(),
                "{}: extra keys not modelled here",
                case.name
            );
            let params = VllmHashParams {
                python_hash_seed: case.pythonhashseed.clone(),
                ..Default::default()
            };
            assert_eq!(params.none_hash().to_hex(), case.none_hash, "{}", case.name);
            let keys = block_keys(
                &KeyScheme::VllmSha256Cbor(params),
                &BlockKey([0; 32]),
                &case.token_ids,
                case.block_size,
            )
            .expect("hash");
            let got: Vec<String> = keys.iter().map(BlockKey::to_hex).collect();
            assert_eq!(got, case.block_hashes, "{}", case.name);
        }
    }

    #[test]
    fn chained_scheme_is_pinned() {
        // Published test vector (docs/keys.md), cross-checked with Python hashlib:
        // root = 32 zero bytes, tokens 0..32, 16 tokens per block.
        let tokens: Vec<u32> = (0..32).collect();
        let keys = block_keys(&KeyScheme::Chained, &BlockKey([0; 32]), &tokens, 16).expect("hash");
        assert_eq!(keys.len(), 2);
        assert_eq!(
            keys[0],
            chained_block_key(&BlockKey([0; 32]), &tokens[..16])
        );
        assert_eq!(keys[1], chained_block_key(&keys[0], &tokens[16..]));
        assert_eq!(keys[0].to_hex(), CHAINED_VECTOR_0);
        assert_eq!(keys[1].to_hex(), CHAINED_VECTOR_1);
    }

    const CHAINED_VECTOR_0: &str =
        "a841d401cab294cf85356f0c992cb370d3f8a391c87ee6a8e4683948232ce47d";
    const CHAINED_VECTOR_1: &str =
        "f37724bb74b27d6aee8c424175eb01c28adc1f90cfc5ea28f120f663c3497d80";

    #[test]
    fn salt_changes_block_zero_and_thus_the_chain() {
        let tokens: Vec<u32> = (0..48).collect();
        let plain = VllmHashParams {
            python_hash_seed: "0".into(),
            ..Default::default()
        };
        let salted = VllmHashParams {
            cache_salt: Some("tenant-a".into()),
            ..plain.clone()
        };
        assert_eq!(salted.extra_keys(1), None);
        let a = block_keys(
            &KeyScheme::VllmSha256Cbor(plain),
            &BlockKey([0; 32]),
            &tokens,
            16,
        );
        let b = block_keys(
            &KeyScheme::VllmSha256Cbor(salted),
            &BlockKey([0; 32]),
            &tokens,
            16,
        );
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    #[test]
    fn lora_and_salt_order_matches_vllm() {
        let p = VllmHashParams {
            python_hash_seed: "0".into(),
            lora_name: Some("adapter".into()),
            lora_path: None,
            cache_salt: Some("salt".into()),
            extra: vec![],
        };
        let t = |s: &str| CborValue::Text(s.into());
        let lora = CborValue::Array(vec![t("lora"), t("adapter"), CborValue::Null]);
        let salt = CborValue::Array(vec![t("cache_salt"), t("salt")]);
        assert_eq!(p.extra_keys(0), Some(vec![lora.clone(), salt]));
        assert_eq!(p.extra_keys(3), Some(vec![lora]));
    }

    proptest! {
        #[test]
        fn keys_depend_on_whole_prefix(tokens in proptest::collection::vec(any::<u32>(), 32..200), flip in 0usize..32) {
            let root = BlockKey([7; 32]);
            let a = block_keys(&KeyScheme::Chained, &root, &tokens, 16).expect("a");
            let mut t2 = tokens.clone();
            t2[flip] ^= 1;
            let b = block_keys(&KeyScheme::Chained, &root, &t2, 16).expect("b");
            prop_assert_eq!(a.len(), tokens.len() / 16);
            // Every block at or after the flipped one differs; earlier blocks are equal.
            for i in 0..a.len() {
                if i < flip / 16 { prop_assert_eq!(a[i], b[i]); } else { prop_assert_ne!(a[i], b[i]); }
            }
        }

        #[test]
        fn hashing_is_deterministic_and_prefix_stable(tokens in proptest::collection::vec(any::<u32>(), 0..100), cut in 0usize..100) {
            let p = VllmHashParams { python_hash_seed: "42".into(), ..Default::default() };
            let s = KeyScheme::VllmSha256Cbor(p);
            let full = block_keys(&s, &BlockKey([0; 32]), &tokens, 4).expect("full");
            let cut = cut.min(tokens.len());
            let part = block_keys(&s, &BlockKey([0; 32]), &tokens[..cut], 4).expect("part");
            prop_assert_eq!(&full[..part.len()], &part[..]);
        }
    }
}

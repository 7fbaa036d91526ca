//! KV layout of a block: how many layers, heads, elements and of which type.

use kvshare_proto::v1 as pb;

use crate::error::CoreError;

/// Element type of cached K/V tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DType {
    /// IEEE 754 binary32.
    #[cfg_attr(feature = "clap", value(name = "f32", alias = "float32"))]
    F32,
    /// IEEE 754 binary16.
    #[cfg_attr(feature = "clap", value(name = "f16", aliases = ["fp16", "float16", "half"]))]
    F16,
    /// bfloat16.
    #[cfg_attr(feature = "clap", value(name = "bf16", alias = "bfloat16"))]
    BF16,
    /// One byte per element (fp8 or int8).
    #[cfg_attr(feature = "clap", value(name = "u8", aliases = ["fp8", "int8"]))]
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// Short lower-case name (`f32`, `f16`, `bf16`, `u8`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::U8 => "u8",
        }
    }

    /// Parses a name as printed by [`DType::name`].
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "fp16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "u8" | "fp8" | "int8" => Ok(DType::U8),
            other => Err(CoreError::InvalidLayout(format!(
                "unknown dtype {other:?}; expected one of f32, f16, bf16, u8"
            ))),
        }
    }

    /// Converts from the wire enum value.
    pub fn from_proto(v: i32) -> Result<Self, CoreError> {
        match pb::DType::try_from(v) {
            Ok(pb::DType::DtypeF32) => Ok(DType::F32),
            Ok(pb::DType::DtypeF16) => Ok(DType::F16),
            Ok(pb::DType::DtypeBf16) => Ok(DType::BF16),
            Ok(pb::DType::DtypeU8) => Ok(DType::U8),
            Ok(pb::DType::DtypeUnspecified) => Err(CoreError::InvalidLayout(
                "dtype is not set; use DTYPE_F32, DTYPE_F16, DTYPE_BF16 or DTYPE_U8".into(),
            )),
            Err(_) => Err(CoreError::InvalidLayout(format!(
                "unknown dtype value {v}; expected 1 (f32), 2 (f16), 3 (bf16) or 4 (u8)"
            ))),
        }
    }

    /// The wire enum.
    pub fn to_proto(self) -> pb::DType {
        match self {
            DType::F32 => pb::DType::DtypeF32,
            DType::F16 => pb::DType::DtypeF16,
            DType::BF16 => pb::DType::DtypeBf16,
            DType::U8 => pb::DType::DtypeU8,
        }
    }
}

/// Shape of one block: `num_layers` x {K,V} x `tokens_per_block` x `num_kv_heads` x `head_dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KvLayout {
    /// Transformer layers.
    pub num_layers: u32,
    /// KV heads per layer (per tensor-parallel rank).
    pub num_kv_heads: u32,
    /// Elements per head.
    pub head_dim: u32,
    /// Element type.
    pub dtype: DType,
    /// Tokens per block.
    pub tokens_per_block: u32,
}

/// Upper bound on a layout's raw block size (1 GiB), so products cannot overflow or mislead.
pub const MAX_LAYOUT_BLOCK_BYTES: u64 = 1 << 30;

/// Most transformer layers a layout may have (the largest models have a few hundred).
pub const MAX_LAYERS: u32 = 4_096;
/// Most KV heads per layer (per tensor-parallel rank) a layout may have.
pub const MAX_KV_HEADS: u32 = 4_096;
/// Most elements per head a layout may have (real heads have at most a few hundred; MLA
/// latents are 576; the room above is for layouts that fold heads or tokens into one row).
pub const MAX_HEAD_DIM: u32 = 1 << 20;
/// Most tokens per block a layout may have (engines use 16 to 256; LMCache chunks are 256).
pub const MAX_TOKENS_PER_BLOCK: u32 = 1 << 20;

impl KvLayout {
    /// Raw bytes of one block of this layout; `u64::MAX` when the product overflows (which
    /// [`KvLayout::validate`] rejects, so a validated layout never saturates).
    pub fn block_bytes(&self) -> u64 {
        self.token_bytes()
            .saturating_mul(u64::from(self.tokens_per_block))
    }

    /// Raw bytes of one token across all layers (K and V); `u64::MAX` when the product
    /// overflows.
    pub fn token_bytes(&self) -> u64 {
        [
            2,
            u64::from(self.num_kv_heads),
            u64::from(self.head_dim),
            self.dtype.size() as u64,
        ]
        .into_iter()
        .fold(u64::from(self.num_layers), u64::saturating_mul)
    }

    /// Checks that every dimension is between 1 and its limit (`MAX_LAYERS`, `MAX_KV_HEADS`,
    /// `MAX_HEAD_DIM`, `MAX_TOKENS_PER_BLOCK`) and the block is at most
    /// [`MAX_LAYOUT_BLOCK_BYTES`].
    pub fn validate(&self) -> Result<(), CoreError> {
        let dims = [
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("num_kv_heads", self.num_kv_heads, MAX_KV_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            (
                "tokens_per_block",
                self.tokens_per_block,
                MAX_TOKENS_PER_BLOCK,
            ),
        ];
        for (name, v, max) in dims {
            if v == 0 || v > max {
                return Err(CoreError::InvalidLayout(format!(
                    "layout.{name} is {v}; it must be between 1 and {max}"
                )));
            }
        }
        if self.block_bytes() > MAX_LAYOUT_BLOCK_BYTES {
            return Err(CoreError::InvalidLayout(format!(
                "layout describes {} layers x 2 x {} tokens x {} heads x {} dims x {} bytes per block, more than the {} byte maximum",
                self.num_layers,
                self.tokens_per_block,
                self.num_kv_heads,
                self.head_dim,
                self.dtype.size(),
                MAX_LAYOUT_BLOCK_BYTES
            )));
        }
        Ok(())
    }

    /// Converts from the wire message, validating it.
    pub fn from_proto(p: &pb::KvLayout) -> Result<Self, CoreError> {
        let l = KvLayout {
            num_layers: p.num_layers,
            num_kv_heads: p.num_kv_heads,
            head_dim: p.head_dim,
            dtype: DType::from_proto(p.dtype)?,
            tokens_per_block: p.tokens_per_block,
        };
        l.validate()?;
        Ok(l)
    }

    /// The wire message.
    pub fn to_proto(&self) -> pb::KvLayout {
        pb::KvLayout {
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype.to_proto() as i32,
            tokens_per_block: self.tokens_per_block,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minilm_block_is_147456_bytes() {
        let l = KvLayout {
            num_layers: 6,
            num_kv_heads: 12,
            head_dim: 32,
            dtype: DType::BF16,
            tokens_per_block: 16,
        };
        assert_eq!(l.block_bytes(), 147_456);
        assert_eq!(l.token_bytes(), 9_216);
        assert!(l.validate().is_ok());
        assert_eq!(KvLayout::from_proto(&l.to_proto()).ok(), Some(l));
    }

    #[test]
    fn overflowing_and_oversized_layouts_are_rejected() {
        // The dims multiply to 2^64 + 8192: unchecked, that wraps to 8192.
        let wraps = KvLayout {
            num_layers: 87_382,
            num_kv_heads: 45_712,
            head_dim: 44_208,
            dtype: DType::U8,
            tokens_per_block: 52_232,
        };
        assert_eq!(wraps.block_bytes(), u64::MAX);
        let err = wraps.validate().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("num_layers is 87382")));
        let huge = KvLayout {
            num_layers: 1 << 31,
            num_kv_heads: 2,
            head_dim: 1,
            dtype: DType::U8,
            tokens_per_block: 1 << 31,
        };
        assert!(huge.validate().is_err());
        let at_limits = KvLayout {
            num_layers: MAX_LAYERS,
            num_kv_heads: MAX_KV_HEADS,
            head_dim: MAX_HEAD_DIM,
            dtype: DType::F32,
            tokens_per_block: MAX_TOKENS_PER_BLOCK,
        };
        assert_eq!(at_limits.block_bytes(), u64::MAX);
        let err = at_limits.validate().err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("byte maximum")));
    }

    proptest::proptest! {
        #[test]
        fn block_bytes_is_the_exact_product_or_saturates(
            l in 0u32.., h in 0u32.., d in 0u32.., t in 0u32..,
        ) {
            let layout = KvLayout {
                num_layers: l, num_kv_heads: h, head_dim: d, dtype: DType::BF16, tokens_per_block: t,
            };
            let exact = [2, u128::from(h), u128::from(d), 2, u128::from(t)]
                .into_iter()
                .try_fold(u128::from(l), u128::checked_mul)
                .unwrap_or(u128::MAX);
            let expected = u64::try_from(exact).unwrap_or(u64::MAX);
            proptest::prop_assert_eq!(layout.block_bytes(), expected);
            if layout.validate().is_ok() {
                proptest::prop_assert!(exact <= u128::from(MAX_LAYOUT_BLOCK_BYTES) && exact > 0);
            }
        }
    }

    #[test]
    fn zero_dims_and_bad_dtype_are_rejected() {
        let mut p = pb::KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
            dtype: 99,
            tokens_per_block: 1,
        };
        assert!(KvLayout::from_proto(&p).is_err());
        p.dtype = pb::DType::DtypeF16 as i32;
        p.head_dim = 0;
        let err = KvLayout::from_proto(&p).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("head_dim")));
    }
}

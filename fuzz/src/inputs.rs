//! Structured inputs built from fuzz bytes with `arbitrary`: small layouts, raw K/V-like
//! blocks, encoded block sequences for chunk streams.

use arbitrary::{Result, Unstructured};
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout};

/// Every dtype.
pub const DTYPES: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::U8];

/// The namespace digest used for generated blocks.
pub const NAMESPACE: BlockKey = BlockKey([0x5a; 32]);

/// A small valid layout (at most 3 x 2 x 8 x 4 x 32 x 4 = 24 KiB per block).
pub fn small_layout(u: &mut Unstructured) -> Result<KvLayout> {
    Ok(KvLayout {
        num_layers: u.int_in_range(1..=3)?,
        num_kv_heads: u.int_in_range(1..=4)?,
        head_dim: u.int_in_range(1..=32)?,
        dtype: *u.choose(&DTYPES)?,
        tokens_per_block: u.int_in_range(1..=8)?,
    })
}

/// Raw bytes of `len`, in one of three shapes so that every codec path is reached: a repeated
/// pattern (compressible planes), noise (planes stored raw), or K/V-like elements (a
/// low-entropy high byte from the pattern, noise in the others).
pub fn raw_bytes(u: &mut Unstructured, len: usize, width: usize) -> Result<Vec<u8>> {
    let shape = u.int_in_range(0u8..=2)?;
    let plen = u.int_in_range(0usize..=64)?.min(u.len());
    let pattern = u.bytes(plen)?.to_vec();
    let mut state: u64 = u.arbitrary::<u64>()? | 1;
    let mut noise = move || {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    };
    let pat = |i: usize| pattern.get(i % pattern.len().max(1)).copied().unwrap_or(0);
    let width = width.max(1);
    Ok((0..len)
        .map(|i| match shape {
            0 => pat(i),
            1 => noise(),
            _ if i % width == width - 1 => pat(i / width),
            _ => noise(),
        })
        .collect())
}

/// One block of a generated stream: its key and, when found, the encoded block and its raw bytes.
pub type StreamBlock = (BlockKey, Option<(EncodedBlock, Vec<u8>)>);

/// The keys of a generated stream of `n` blocks (distinct, recognisable).
pub fn stream_keys(n: usize) -> Vec<BlockKey> {
    (0..n).map(|i| BlockKey([i as u8 + 1; 32])).collect()
}

/// Up to `max` blocks, each missing (one in four) or a valid encoding of small raw bytes with
/// any codec.
pub fn blocks(u: &mut Unstructured, max: usize) -> Result<Vec<StreamBlock>> {
    let n = u.int_in_range(0..=max)?;
    let mut out = Vec::with_capacity(n);
    for key in stream_keys(n) {
        if u.ratio(1u8, 4)? {
            out.push((key, None));
            continue;
        }
        let layout = small_layout(u)?;
        let codec = *u.choose(&Codec::ALL)?;
        let raw = raw_bytes(u, layout.block_bytes() as usize, layout.dtype.size())?;
        let block = EncodedBlock::encode(NAMESPACE, layout, codec, &raw)
            .expect("a small valid layout with raw bytes of its size encodes");
        out.push((key, Some((block, raw))));
    }
    Ok(out)
}

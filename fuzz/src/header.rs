//! `block_header`: any `BlockHeader` message through `BlockHeader::from_proto`, compared with
//! an independent, overflow-free model of the rules.

use arbitrary::Unstructured;
use kvshare_core::BlockHeader;
use kvshare_core::layout::MAX_LAYOUT_BLOCK_BYTES;
use kvshare_proto::v1 as pb;
use prost::Message;

/// Input: one mode byte, then either (even) a protobuf-encoded `BlockHeader` or (odd) bytes for
/// [`structural`], which favours the dimension values that overflow products (powers of two,
/// all-ones) and raw_len values equal to a wrapped product.
pub fn check_block_header(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let p = if mode & 1 == 0 {
        match pb::BlockHeader::decode(rest) {
            Ok(p) => p,
            Err(_) => return,
        }
    } else {
        match structural(&mut Unstructured::new(rest)) {
            Ok(p) => p,
            Err(_) => return,
        }
    };
    check(&p);
}

/// The exact raw size of a layout, saturating at u128::MAX (four 32-bit dims, x2, x4 can need
/// 131 bits); None for an unknown dtype.
pub fn exact_block_bytes(l: &pb::KvLayout) -> Option<u128> {
    let size: u128 = match pb::DType::try_from(l.dtype).ok()? {
        pb::DType::DtypeF32 => 4,
        pb::DType::DtypeF16 | pb::DType::DtypeBf16 => 2,
        pb::DType::DtypeU8 => 1,
        pb::DType::DtypeUnspecified => return None,
    };
    Some(
        [l.tokens_per_block, l.num_kv_heads, l.head_dim]
            .into_iter()
            .fold(u128::from(l.num_layers) * 2 * size, |acc, d| {
                acc.saturating_mul(u128::from(d))
            }),
    )
}

/// Whether the header is valid by the documented rules (32-byte namespace, known codec and
/// dtype, non-zero dims, raw size at most MAX_LAYOUT_BLOCK_BYTES and equal to raw_len, non-empty
/// payload no larger than any codec produces for raw_len).
fn valid_by_model(p: &pb::BlockHeader) -> bool {
    let Some(l) = p.layout.as_ref() else {
        return false;
    };
    let dims_nonzero =
        l.num_layers > 0 && l.num_kv_heads > 0 && l.head_dim > 0 && l.tokens_per_block > 0;
    let codec_known = matches!(
        pb::Codec::try_from(p.codec),
        Ok(c) if c != pb::Codec::Unspecified
    );
    p.namespace.len() == 32
        && codec_known
        && dims_nonzero
        && p.payload_len > 0
        && p.payload_len <= kvshare_core::max_encoded_len(p.raw_len)
        && exact_block_bytes(l)
            .is_some_and(|b| b <= u128::from(MAX_LAYOUT_BLOCK_BYTES) && b == u128::from(p.raw_len))
}

/// Model shapes every real model has (per-field limits may reject more exotic ones): a header
/// valid by the model with such a layout must be accepted.
fn ordinary_shape(l: &pb::KvLayout) -> bool {
    l.num_layers <= 128 && l.num_kv_heads <= 64 && l.head_dim <= 256 && l.tokens_per_block <= 256
}

fn check(p: &pb::BlockHeader) {
    let by_model = valid_by_model(p);
    match BlockHeader::from_proto(p) {
        Ok(h) => {
            let l = p.layout.as_ref().expect("an accepted header has a layout");
            let exact = exact_block_bytes(l).expect("an accepted header has a known dtype");
            assert!(
                exact == u128::from(h.raw_len) && exact <= u128::from(MAX_LAYOUT_BLOCK_BYTES),
                "accepted a header whose layout makes {exact} bytes, raw_len {} (max {MAX_LAYOUT_BLOCK_BYTES}): {p:?}",
                h.raw_len
            );
            assert!(by_model, "accepted a header the rules reject: {p:?}");
            assert_eq!(h.layout.block_bytes(), h.raw_len);
            assert_eq!(
                u128::from(h.layout.token_bytes()) * u128::from(h.layout.tokens_per_block),
                exact
            );
            assert!(h.payload_len > 0);
            assert_eq!(h.namespace.0.as_slice(), p.namespace.as_ref());
            // Round trips: struct -> message -> struct, and through the wire encoding.
            let back = h.to_proto();
            assert_eq!(BlockHeader::from_proto(&back), Ok(h));
            let wire = pb::BlockHeader::decode(back.encode_to_vec().as_slice())
                .expect("an encoded header decodes");
            assert_eq!(BlockHeader::from_proto(&wire), Ok(h));
        }
        Err(e) => {
            let ordinary = p.layout.as_ref().is_some_and(ordinary_shape);
            assert!(
                !(by_model && ordinary),
                "rejected a valid header ({e}): {p:?}"
            );
        }
    }
}

/// A header message built field by field, biased towards overflow-prone dimensions.
pub fn structural(u: &mut Unstructured) -> arbitrary::Result<pb::BlockHeader> {
    fn dim(u: &mut Unstructured) -> arbitrary::Result<u32> {
        Ok(match u.int_in_range(0u8..=3)? {
            0 => u.int_in_range(0..=300)?,
            1 => 1u32 << u.int_in_range(0..=31)?,
            2 => (1u32 << u.int_in_range(0..=31)?).wrapping_sub(1),
            _ => u.arbitrary()?,
        })
    }
    let layout = pb::KvLayout {
        num_layers: dim(u)?,
        num_kv_heads: dim(u)?,
        head_dim: dim(u)?,
        dtype: u.int_in_range(0..=5)?,
        tokens_per_block: dim(u)?,
    };
    let exact = exact_block_bytes(&layout).unwrap_or(0);
    let raw_len = match u.int_in_range(0u8..=2)? {
        // What a product computed in wrapping u64 arithmetic gives.
        0 => exact as u64,
        1 => u64::try_from(exact).unwrap_or(u64::MAX),
        _ => u.arbitrary()?,
    };
    let namespace = if u.ratio(7u8, 8)? {
        vec![u.arbitrary::<u8>()?; 32]
    } else {
        let n = u.int_in_range(0..=40)?;
        u.bytes(n)?.to_vec()
    };
    Ok(pb::BlockHeader {
        namespace: namespace.into(),
        layout: u.ratio(15u8, 16)?.then_some(layout),
        codec: if u.ratio(7u8, 8)? {
            u.int_in_range(1..=4)?
        } else {
            u.arbitrary()?
        },
        raw_len,
        checksum: u.arbitrary()?,
        payload_checksum: u.arbitrary()?,
        payload_len: if u.ratio(7u8, 8)? {
            u.int_in_range(1..=1 << 20)?
        } else {
            u.arbitrary()?
        },
    })
}

//! `codec_decode` (hostile payloads) and `codec_roundtrip` (encode then decode).

use arbitrary::Unstructured;
use bytes::Bytes;
use kvshare_core::{BlockHeader, Codec, EncodedBlock, checksum};
use kvshare_proto::v1 as pb;

use crate::alloc::peak_growth;
use crate::header::exact_block_bytes;
use crate::inputs;

/// Largest raw_len the decode target decodes: bounding raw_len is the caller's job (the layout
/// allows 1 GiB), and larger blocks only slow the fuzzer down.
pub const MAX_FUZZ_RAW_LEN: u64 = 1 << 20;

/// Bytes a decode may allocate beyond twice raw_len (error messages, small buffers).
const ALLOC_SLACK: usize = 64 << 10;

/// Flag bit: set the header checksum to that of the bytes the payload decodes to, so decoding
/// gets past the checksum.
pub const FIX_CHECKSUM: u8 = 1;
/// Flag bit: raw_len one more than the layout's size.
pub const WRONG_RAW_LEN: u8 = 2;
/// Flag bit: payload_len one more than the payload.
pub const WRONG_PAYLOAD_LEN: u8 = 4;

/// Input of `codec_decode`, a fixed 11-byte preamble then the payload.
#[derive(Debug, Clone)]
pub struct DecodeInput<'a> {
    /// Index into `Codec::ALL` (modulo its length).
    pub codec: u8,
    /// Wire dtype value (mod 5: 0 is unset).
    pub dtype: u8,
    /// num_layers, num_kv_heads, head_dim, tokens_per_block.
    pub dims: [u16; 4],
    /// `FIX_CHECKSUM` | `WRONG_RAW_LEN` | `WRONG_PAYLOAD_LEN`.
    pub flags: u8,
    /// The encoded payload.
    pub payload: &'a [u8],
}

impl<'a> DecodeInput<'a> {
    /// Parses the preamble; None when `data` is shorter.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let (pre, payload) = data.split_at_checked(11)?;
        let d = |i: usize| u16::from_le_bytes([pre[2 + 2 * i], pre[3 + 2 * i]]);
        Some(DecodeInput {
            codec: pre[0],
            dtype: pre[1],
            dims: [d(0), d(1), d(2), d(3)],
            flags: pre[10],
            payload,
        })
    }

    /// The bytes [`DecodeInput::parse`] reads back (seed corpus).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![self.codec, self.dtype];
        for d in self.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.push(self.flags);
        out.extend_from_slice(self.payload);
        out
    }
}

fn assert_alloc_bounded(peak: Option<usize>, raw_len: usize, what: &str) {
    if let Some(peak) = peak {
        assert!(
            peak <= 2 * raw_len + ALLOC_SLACK,
            "{what} allocated {peak} bytes at once for raw_len {raw_len}"
        );
    }
}

/// Any payload under any header: `EncodedBlock::decode` and `verify` never panic, agree, allocate
/// at most about 2 x raw_len, and a successful decode is exactly raw_len bytes with the header
/// checksum that re-encodes and decodes to itself.
pub fn check_codec_decode(data: &[u8]) {
    let Some(inp) = DecodeInput::parse(data) else {
        return;
    };
    let codec = Codec::ALL[usize::from(inp.codec) % Codec::ALL.len()];
    let layout = pb::KvLayout {
        num_layers: inp.dims[0].into(),
        num_kv_heads: inp.dims[1].into(),
        head_dim: inp.dims[2].into(),
        dtype: i32::from(inp.dtype % 5),
        tokens_per_block: inp.dims[3].into(),
    };
    let exact = exact_block_bytes(&layout).unwrap_or(0);
    if exact > u128::from(MAX_FUZZ_RAW_LEN) {
        return;
    }
    let raw_len = exact as u64 + u64::from(inp.flags & WRONG_RAW_LEN != 0);
    let payload_len = inp.payload.len() as u64 + u64::from(inp.flags & WRONG_PAYLOAD_LEN != 0);

    // The codec alone, with whatever raw_len the preamble gives.
    let (direct, peak) = peak_growth(|| codec.decode(inp.payload, raw_len as usize));
    assert_alloc_bounded(peak, raw_len as usize, "Codec::decode");
    if let Ok(raw) = &direct {
        assert_eq!(
            raw.len() as u64,
            raw_len,
            "{codec} decoded to a wrong length"
        );
    }

    let mut hp = pb::BlockHeader {
        namespace: Bytes::copy_from_slice(&inputs::NAMESPACE.0),
        layout: Some(layout),
        codec: codec.to_proto() as i32,
        raw_len,
        checksum: 0,
        payload_len,
        // No payload checksum: `verify` below takes the decoding path, the one under test.
        payload_checksum: None,
    };
    if inp.flags & FIX_CHECKSUM != 0
        && let Ok(raw) = &direct
    {
        hp.checksum = checksum(raw);
    }
    let Ok(header) = BlockHeader::from_proto(&hp) else {
        return;
    };
    let block = EncodedBlock {
        header,
        payload: Bytes::copy_from_slice(inp.payload),
    };
    let (decoded, peak) = peak_growth(|| block.decode());
    assert_alloc_bounded(peak, raw_len as usize, "EncodedBlock::decode");
    let (verified, peak) = peak_growth(|| block.verify());
    assert_alloc_bounded(peak, raw_len as usize, "EncodedBlock::verify");
    assert_eq!(
        decoded.is_ok(),
        verified.is_ok(),
        "decode {decoded:?} but verify {verified:?}"
    );
    match decoded {
        Ok(raw) => {
            let raw = raw.to_vec();
            assert_eq!(raw.len() as u64, raw_len);
            assert_eq!(checksum(&raw), header.checksum);
            assert_eq!(direct.as_ref().ok(), Some(&raw));
            let again = codec.encode(&raw, header.layout.dtype.size());
            assert_eq!(codec.decode(&again, raw.len()).as_ref(), Ok(&raw));
        }
        Err(_) => assert!(
            inp.flags & (FIX_CHECKSUM | WRONG_PAYLOAD_LEN) != FIX_CHECKSUM || direct.is_err(),
            "{codec}: the payload decodes alone and its checksum is right, yet the block fails"
        ),
    }
}

/// Raw bytes of a small layout encode with every codec and decode back; the codecs also round
/// trip any byte string at any element width.
pub fn check_codec_roundtrip(data: &[u8]) {
    let _ = roundtrip(Unstructured::new(data));
}

fn roundtrip(mut u: Unstructured) -> arbitrary::Result<()> {
    let layout = inputs::small_layout(&mut u)?;
    let width = layout.dtype.size();
    let raw = inputs::raw_bytes(&mut u, layout.block_bytes() as usize, width)?;
    for codec in Codec::ALL {
        let b = EncodedBlock::encode(inputs::NAMESPACE, layout, codec, &raw).expect("encode");
        assert_eq!(b.header.payload_len, b.payload.len() as u64);
        assert_eq!(b.decode().map(Vec::from).as_ref(), Ok(&raw), "{codec}");
        assert_eq!(b.verify(), Ok(()), "{codec}");
        assert_eq!(BlockHeader::from_proto(&b.header.to_proto()), Ok(b.header));
    }
    // Any length and any width (the byte-plane codecs clamp it to 1..=8; a tail travels raw).
    let width = u.int_in_range(0usize..=10)?;
    let free = u.take_rest();
    for codec in Codec::ALL {
        let enc = codec.encode(free, width);
        assert_eq!(
            codec.decode(&enc, free.len()).as_deref(),
            Ok(free),
            "{codec} width {width}"
        );
        if !free.is_empty() {
            assert!(codec.decode(&enc, free.len() - 1).is_err(), "{codec} short");
        }
        assert!(codec.decode(&enc, free.len() + 1).is_err(), "{codec} long");
    }
    Ok(())
}

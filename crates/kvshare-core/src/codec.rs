//! Block codecs: how the raw K/V bytes of a block are encoded on the wire and in the store.
//!
//! 16-bit floats barely compress as a byte stream (LZ4 on fp16/bf16 K/V: 1.00x), because every
//! other byte is a near-random mantissa byte. The byte-plane codecs split each element into its
//! byte planes (byte 0 of every element, then byte 1, ...) and compress each plane on its own: the
//! plane holding sign and exponent is low-entropy and shrinks, the mantissa planes do not and are
//! stored raw. On real K/V (tests/data) byte-plane + zstd reaches 1.44x on bf16.
//!
//! Byte-plane payload layout (all integers little-endian):
//! ```text
//! u8 width (1..=8) | u8 tail_len | width x (u8 mode, u32 len) | plane data ... | tail bytes
//! ```
//! `mode` is 0 for a raw plane, 1 for an LZ4-compressed one, 2 for a zstd-compressed one, 3 for a
//! Huffman-coded one (`huff.rs`). Each plane holds `raw_len / width` bytes once decoded; the last
//! `raw_len % width` bytes of the block travel raw as the tail. A byteplane-huff payload is one
//! transform byte (0: none; 1: each 2- or 4-byte element rotated left by one bit before the
//! split) followed by this layout.
//!
//! # byteplane-huff: why an entropy coder, and why hand-rolled
//!
//! The exponent plane needs an entropy coder, not a match finder (ZipNN's and DFloat11's
//! approach): zstd's `ZSTD_compressBlock_fast` was most of byteplane-zstd's encode time. Order-0
//! entropy on the shared kv-sample (2,048 tokens, 128 blocks of 147,456 bytes): bf16 high byte
//! 2.859 bits (sign + 7 exponent bits), 2.784 bits once rotated (the 8-bit exponent; sign and
//! mantissa in the low byte), low byte 7.972 bits; fp16 high byte 5.73 bits, low byte 8.00 bits.
//! Coding the low plane as well would gain at most 0.3 %, so it stays raw (its sampled entropy is
//! above `RAW_ENTROPY_BITS`, so it is not even histogrammed). Bounds with the low plane raw:
//! bf16 1.484x rotated (1.473x not), fp16 1.165x.
//!
//! Crates checked (crates.io, 2026-11): `fse` 0.1.0 and `huff0` 0.1.0 are empty placeholders;
//! ruzstd 0.9.1 has huff0/FSE coders but its Huffman encoder and bit I/O are crate-private; `tans`
//! 0.1.0's licence forbids commercial use; constriction 0.5.0 (rANS, `SmallAnsCoder` with a
//! 12-bit `ContiguousLookupDecoderModel`) reaches 1.472x on bf16 but codes the exponent plane at
//! 0.42 GB/s and decodes it at 0.41 GB/s (raw bytes per second), far below the 1 GB/s encode /
//! 2 GB/s decode targets. The hand-rolled coder (`huff.rs`: length-limited canonical Huffman, 11
//! bits, 4 interleaved streams, two-symbol decode table) does the same plane at 1.8-2.2 GB/s
//! encode and 2.9-3.8 GB/s decode (fp16-bf16), at 1.4751x on bf16. A 12-bit table gained 0.04 %
//! of ratio and lost 15 % of bf16 decode speed.
//!
//! Whole codec, one thread, all 128 blocks (`KVSHARE_KV_SAMPLE=.../kv-sample cargo bench -p
//! kvshare-core --bench codec`), GB/s of raw bytes, byteplane-zstd measured in the same run:
//!
//! | codec | bf16 ratio | encode | decode | fp16 ratio | encode | decode |
//! |---|---|---|---|---|---|---|
//! | byteplane-zstd | 1.4364 | 0.73 | 2.65 | 1.1609 | 2.22 | 3.78 |
//! | byteplane-huff | 1.4750 | 1.49 | 3.08 | 1.1606 | 1.39 | 2.33 |
//!
//! On fp16 zstd is faster at the same ratio (its high plane is 5.7 bits per byte, so zstd finds
//! no matches and runs its own tuned Huffman literal coder, and fewer of our lookups decode two
//! symbols); on bf16, the dtype of most LLM K/V caches, byteplane-huff is smaller and 2x / 1.16x
//! faster, hence the clients' default. The split and merge of 2- and 4-byte elements run
//! AVX2-compiled when the CPU has it (`avx2_dispatch!`): at the x86-64 baseline LLVM leaves those
//! byte shuffles scalar, 8x slower.

use std::fmt;

use kvshare_proto::v1 as pb;

use crate::error::CoreError;
use crate::huff;

/// zstd level used by [`Codec::BytePlaneZstd`]: level 1 is within 1 % of level 3's ratio on K/V
/// planes at several times the speed.
pub const ZSTD_LEVEL: i32 = 1;

/// A block payload encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Codec {
    /// Raw bytes.
    #[cfg_attr(feature = "clap", value(name = "none"))]
    None,
    /// LZ4 block format over the whole block.
    #[cfg_attr(feature = "clap", value(name = "lz4"))]
    Lz4,
    /// Byte planes, each LZ4-compressed or raw.
    #[cfg_attr(feature = "clap", value(name = "byteplane-lz4"))]
    BytePlaneLz4,
    /// Byte planes, each zstd-compressed or raw.
    #[cfg_attr(feature = "clap", value(name = "byteplane-zstd"))]
    BytePlaneZstd,
    /// 16- and 32-bit elements rotated left by one bit (sign next to the mantissa, so the top
    /// byte is the exponent), split into byte planes, each Huffman-coded or raw: about
    /// byteplane-zstd's ratio at several times its speed.
    #[cfg_attr(feature = "clap", value(name = "byteplane-huff"))]
    BytePlaneHuff,
}

impl Codec {
    /// All codecs, in wire order.
    pub const ALL: [Codec; 5] = [
        Codec::None,
        Codec::Lz4,
        Codec::BytePlaneLz4,
        Codec::BytePlaneZstd,
        Codec::BytePlaneHuff,
    ];

    /// Converts from the wire enum value.
    pub fn from_proto(v: i32) -> Result<Self, CoreError> {
        match pb::Codec::try_from(v) {
            Ok(pb::Codec::None) => Ok(Codec::None),
            Ok(pb::Codec::Lz4) => Ok(Codec::Lz4),
            Ok(pb::Codec::ByteplaneLz4) => Ok(Codec::BytePlaneLz4),
            Ok(pb::Codec::ByteplaneZstd) => Ok(Codec::BytePlaneZstd),
            Ok(pb::Codec::ByteplaneHuff) => Ok(Codec::BytePlaneHuff),
            Ok(pb::Codec::Unspecified) | Err(_) => Err(CoreError::UnknownCodec(v)),
        }
    }

    /// The wire enum.
    pub fn to_proto(self) -> pb::Codec {
        match self {
            Codec::None => pb::Codec::None,
            Codec::Lz4 => pb::Codec::Lz4,
            Codec::BytePlaneLz4 => pb::Codec::ByteplaneLz4,
            Codec::BytePlaneZstd => pb::Codec::ByteplaneZstd,
            Codec::BytePlaneHuff => pb::Codec::ByteplaneHuff,
        }
    }

    /// Name used on the command line (`none`, `lz4`, `byteplane-lz4`, `byteplane-zstd`,
    /// `byteplane-huff`).
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::BytePlaneLz4 => "byteplane-lz4",
            Codec::BytePlaneZstd => "byteplane-zstd",
            Codec::BytePlaneHuff => "byteplane-huff",
        }
    }

    /// Parses a name as printed by [`Codec::name`].
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        Codec::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                CoreError::InvalidInput(format!(
                    "unknown codec {s:?}; expected none, lz4, byteplane-lz4, byteplane-zstd or byteplane-huff"
                ))
            })
    }

    /// Encodes `raw`. `width` is the element size in bytes (used by byte-plane codecs; 1..=8).
    pub fn encode(self, raw: &[u8], width: usize) -> Vec<u8> {
        match self {
            Codec::None => raw.to_vec(),
            Codec::Lz4 => lz4_flex::block::compress(raw),
            Codec::BytePlaneLz4 => encode_planes(raw, width, PlaneCoder::Lz4),
            Codec::BytePlaneZstd => encode_planes(raw, width, PlaneCoder::Zstd),
            Codec::BytePlaneHuff => encode_planes(raw, width, PlaneCoder::Huff),
        }
    }

    /// Decodes `payload` into exactly `raw_len` bytes, or fails without panicking on any input.
    /// The caller bounds `raw_len` (it allocates that much).
    pub fn decode(self, payload: &[u8], raw_len: usize) -> Result<Vec<u8>, CoreError> {
        match self {
            Codec::None => {
                if payload.len() != raw_len {
                    return Err(CoreError::Corrupt(format!(
                        "codec none: payload has {} bytes but the header says raw_len {raw_len}",
                        payload.len()
                    )));
                }
                Ok(payload.to_vec())
            }
            Codec::Lz4 => {
                let mut out = vec![0u8; raw_len];
                decode_lz4_exact(payload, &mut out)?;
                Ok(out)
            }
            Codec::BytePlaneLz4 | Codec::BytePlaneZstd => {
                decode_planes(payload, raw_len, Transform::None)
            }
            Codec::BytePlaneHuff => {
                let (&t, rest) = payload
                    .split_first()
                    .ok_or_else(|| CoreError::Corrupt("byteplane-huff payload is empty".into()))?;
                let transform = match t {
                    TRANSFORM_NONE => Transform::None,
                    TRANSFORM_ROTATE => Transform::Rotate,
                    t => {
                        return Err(CoreError::Corrupt(format!(
                            "byteplane-huff payload: unknown element transform {t}"
                        )));
                    }
                };
                decode_planes(rest, raw_len, transform)
            }
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Upper bound on an encoded payload's size given its raw size: no codec expands beyond this
/// (saturating, so a hostile raw size cannot overflow it).
pub fn max_encoded_len(raw_len: u64) -> u64 {
    raw_len.saturating_add(raw_len / 255).saturating_add(128)
}

/// xxh3-64 checksum of raw block bytes.
pub fn checksum(raw: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(raw)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PlaneCoder {
    Lz4,
    Zstd,
    Huff,
}

const MODE_RAW: u8 = 0;
const MODE_LZ4: u8 = 1;
const MODE_ZSTD: u8 = 2;
const MODE_HUFF: u8 = 3;

/// First byte of a byteplane-huff payload: elements split as they are.
const TRANSFORM_NONE: u8 = 0;
/// First byte of a byteplane-huff payload: 2- or 4-byte elements rotated left by one bit before
/// the split (bf16: the top byte becomes the 8-bit exponent, the sign joins the mantissa byte).
const TRANSFORM_ROTATE: u8 = 1;

/// What was done to each element before the split (undone after the merge).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transform {
    None,
    Rotate,
}

/// Splits the whole elements of `body` into `width` planes of `n` bytes each, rotating 2- and
/// 4-byte elements left by one bit first when `rotate`.
fn split_planes(body: &[u8], width: usize, rotate: bool) -> Vec<Vec<u8>> {
    let n = body.len() / width;
    let mut planes: Vec<Vec<u8>> = vec![vec![0u8; n]; width];
    // Preallocated planes filled by zipped iterators (no per-byte push, no index checks): this
    // loop was a third of the encode time when written with push.
    match (&mut planes[..], rotate) {
        ([p0, p1], false) => split2::<0>(body, p0, p1),
        ([p0, p1], true) => split2::<1>(body, p0, p1),
        ([p0, p1, p2, p3], true) => split4::<1>(body, [p0, p1, p2, p3]),
        _ => {
            for (i, plane) in planes.iter_mut().enumerate() {
                for (o, w) in plane.iter_mut().zip(body.chunks_exact(width)) {
                    *o = w[i];
                }
            }
        }
    }
    planes
}

/// Defines `$name`, which runs `$body` compiled for AVX2 when the CPU has it and as compiled
/// otherwise. The byte (de)interleaving loops vectorise with AVX2; at the x86-64 baseline LLVM
/// leaves them scalar, ~8x slower (measured 17-19 us vs 2-4 us per 147,456-byte block: a quarter
/// of a byteplane-huff decode).
macro_rules! avx2_dispatch {
    ($(#[$m:meta])* fn $name:ident => $body:ident, $avx:ident ($($a:ident : $t:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        fn $avx<const ROT: u32>($($a: $t),*) {
            $body::<ROT>($($a),*)
        }

        $(#[$m])*
        fn $name<const ROT: u32>($($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above), `$avx`'s only requirement.
                return unsafe { $avx::<ROT>($($a),*) };
            }
            $body::<ROT>($($a),*)
        }
    };
}

avx2_dispatch! {
    /// Splits 2-byte elements, rotated left by `ROT` bits, into two planes.
    fn split2 => split2_body, split2_avx2(body: &[u8], p0: &mut [u8], p1: &mut [u8])
}

#[inline(always)]
fn split2_body<const ROT: u32>(body: &[u8], p0: &mut [u8], p1: &mut [u8]) {
    for ((w, a), b) in body.chunks_exact(2).zip(p0.iter_mut()).zip(p1.iter_mut()) {
        let x = u16::from_le_bytes([w[0], w[1]]).rotate_left(ROT);
        *a = x as u8;
        *b = (x >> 8) as u8;
    }
}

avx2_dispatch! {
    /// Splits 4-byte elements, rotated left by `ROT` bits, into four planes.
    fn split4 => split4_body, split4_avx2(body: &[u8], p: [&mut Vec<u8>; 4])
}

#[inline(always)]
fn split4_body<const ROT: u32>(body: &[u8], p: [&mut Vec<u8>; 4]) {
    let [p0, p1, p2, p3] = p;
    for ((((w, a), b), c), d) in body
        .chunks_exact(4)
        .zip(p0.iter_mut())
        .zip(p1.iter_mut())
        .zip(p2.iter_mut())
        .zip(p3.iter_mut())
    {
        let x = u32::from_le_bytes([w[0], w[1], w[2], w[3]]).rotate_left(ROT);
        [*a, *b, *c, *d] = x.to_le_bytes();
    }
}

fn encode_planes(raw: &[u8], width: usize, coder: PlaneCoder) -> Vec<u8> {
    let width = width.clamp(1, 8);
    let n = raw.len() / width;
    let tail = &raw[n * width..];
    let rotate = coder == PlaneCoder::Huff && matches!(width, 2 | 4);
    let planes = split_planes(&raw[..n * width], width, rotate);
    let mut out = Vec::with_capacity(raw.len() + 3 + 5 * width);
    if coder == PlaneCoder::Huff {
        out.push(if rotate {
            TRANSFORM_ROTATE
        } else {
            TRANSFORM_NONE
        });
    }
    out.push(width as u8);
    out.push(tail.len() as u8);
    let dir_at = out.len();
    out.resize(dir_at + 5 * width, 0);
    for (i, plane) in planes.iter().enumerate() {
        let start = out.len();
        // A near-random plane (16-bit mantissa bytes) cannot shrink enough to pay for the
        // compressor's time: store it raw without trying.
        let mode = if entropy_bits_per_byte(plane) > RAW_ENTROPY_BITS {
            MODE_RAW
        } else {
            match coder {
                PlaneCoder::Lz4 => {
                    append_if_smaller(&mut out, plane, MODE_LZ4, lz4_flex::block::compress(plane))
                }
                PlaneCoder::Zstd => match zstd_compress(plane) {
                    Some(c) => append_if_smaller(&mut out, plane, MODE_ZSTD, c),
                    None => MODE_RAW,
                },
                PlaneCoder::Huff => huff_append(&mut out, plane),
            }
        };
        if mode == MODE_RAW {
            out.truncate(start);
            out.extend_from_slice(plane);
        }
        let d = dir_at + 5 * i;
        out[d] = mode;
        let len = (out.len() - start) as u32;
        out[d + 1..d + 5].copy_from_slice(&len.to_le_bytes());
    }
    out.extend_from_slice(tail);
    out
}

/// Appends `coded` and returns `mode` if it is smaller than `plane`, else returns `MODE_RAW`.
fn append_if_smaller(out: &mut Vec<u8>, plane: &[u8], mode: u8, coded: Vec<u8>) -> u8 {
    if coded.len() < plane.len() {
        out.extend_from_slice(&coded);
        mode
    } else {
        MODE_RAW
    }
}

/// Huffman-codes `plane` onto `out` if that is smaller than the plane (the size is known from
/// the histogram before coding); returns the mode used (the caller appends a raw plane).
fn huff_append(out: &mut Vec<u8>, plane: &[u8]) -> u8 {
    let counts = huff::histogram(plane);
    let lens = huff::code_lengths(&counts);
    if huff::encoded_len(&counts, &lens) >= plane.len() {
        return MODE_RAW;
    }
    let start = out.len();
    huff::encode(plane.len(), |i| plane[i], &lens, out);
    if out.len() - start >= plane.len() {
        return MODE_RAW;
    }
    MODE_HUFF
}

/// Planes whose order-0 entropy exceeds this (bits per byte) are stored raw: the best any
/// entropy coder could save is under 3 %, and trying costs more time than the rest of the block.
const RAW_ENTROPY_BITS: f64 = 7.75;

/// Order-0 entropy of `data` in bits per byte, estimated from every 4th byte.
fn entropy_bits_per_byte(data: &[u8]) -> f64 {
    let mut hist = [0u32; 256];
    let mut n = 0u32;
    for b in data.iter().step_by(4) {
        hist[*b as usize] += 1;
        n += 1;
    }
    if n == 0 {
        return 0.0;
    }
    let n = f64::from(n);
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

thread_local! {
    static ZSTD_COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compresses with a per-thread context (creating one costs more than a small plane).
fn zstd_compress(data: &[u8]) -> Option<Vec<u8>> {
    ZSTD_COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        c.as_mut()?.compress(data).ok()
    })
}

/// zstd-decompresses into `out` with a per-thread context; returns the decoded length.
fn zstd_decompress_into(data: &[u8], out: &mut [u8]) -> Result<usize, String> {
    ZSTD_DECOMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        match c.as_mut() {
            Some(d) => d.decompress_to_buffer(data, out).map_err(|e| e.to_string()),
            None => Err("no zstd context".into()),
        }
    })
}

fn decode_lz4_exact(input: &[u8], out: &mut [u8]) -> Result<(), CoreError> {
    let n = lz4_flex::block::decompress_into(input, out)
        .map_err(|e| CoreError::Corrupt(format!("lz4: {e}")))?;
    if n != out.len() {
        return Err(CoreError::Corrupt(format!(
            "lz4 data decodes to {n} bytes but the header says raw_len {}",
            out.len()
        )));
    }
    Ok(())
}

fn decode_planes(
    payload: &[u8],
    raw_len: usize,
    transform: Transform,
) -> Result<Vec<u8>, CoreError> {
    let corrupt = |m: String| CoreError::Corrupt(format!("byte-plane payload: {m}"));
    if payload.len() < 2 {
        return Err(corrupt("shorter than its 2-byte preamble".into()));
    }
    let width = payload[0] as usize;
    let tail_len = payload[1] as usize;
    if !(1..=8).contains(&width) {
        return Err(corrupt(format!("plane width {width} is not in 1..=8")));
    }
    if transform == Transform::Rotate && !matches!(width, 2 | 4) {
        return Err(corrupt(format!("rotated elements of width {width}")));
    }
    if raw_len % width != tail_len {
        return Err(corrupt(format!(
            "tail of {tail_len} bytes does not match raw_len {raw_len} with width {width}"
        )));
    }
    let n = raw_len / width;
    let dir_end = 2 + 5 * width;
    if payload.len() < dir_end + tail_len {
        return Err(corrupt("truncated plane directory".into()));
    }
    // Plane extents first: every length is checked before anything is allocated.
    let mut extents = [(0u8, 0usize, 0usize); 8];
    let mut pos = dir_end;
    for (i, e) in extents.iter_mut().enumerate().take(width) {
        let d = 2 + 5 * i;
        let mode = payload[d];
        let len = u32::from_le_bytes([
            payload[d + 1],
            payload[d + 2],
            payload[d + 3],
            payload[d + 4],
        ]) as usize;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= payload.len() - tail_len)
            .ok_or_else(|| corrupt(format!("plane {i} of {len} bytes runs past the payload")))?;
        match mode {
            MODE_RAW if len != n => {
                return Err(corrupt(format!(
                    "raw plane {i} has {len} bytes, expected {n}"
                )));
            }
            MODE_RAW | MODE_LZ4 | MODE_ZSTD | MODE_HUFF => {}
            m => return Err(corrupt(format!("plane {i} has unknown mode {m}"))),
        }
        *e = (mode, pos, end);
        pos = end;
    }
    if pos + tail_len != payload.len() {
        return Err(corrupt(format!(
            "{} unexpected trailing bytes",
            payload.len() as isize - (pos + tail_len) as isize
        )));
    }
    let coded = extents[..width].iter().filter(|e| e.0 != MODE_RAW).count();
    // Decoded planes (at most raw_len bytes): with `out`, a decode holds at most 2 x raw_len.
    let mut scratch = vec![0u8; n * coded];
    let mut chunks = scratch.chunks_exact_mut(n.max(1));
    let mut planes: [&[u8]; 8] = [&[]; 8];
    for (i, &(mode, start, end)) in extents[..width].iter().enumerate() {
        let data = &payload[start..end];
        if mode == MODE_RAW {
            planes[i] = data;
            continue;
        }
        let plane: &mut [u8] = match chunks.next() {
            Some(c) => c,
            // n == 0: nothing to decode into, but the coded data must still be valid.
            None => &mut [],
        };
        match mode {
            MODE_LZ4 => decode_lz4_exact(data, plane)?,
            MODE_ZSTD => {
                let got = zstd_decompress_into(data, plane)
                    .map_err(|e| corrupt(format!("zstd plane {i}: {e}")))?;
                if got != n {
                    return Err(corrupt(format!(
                        "zstd plane {i} decodes to {got} bytes, expected {n}"
                    )));
                }
            }
            _ => huff::decode(data, plane)
                .map_err(|e| corrupt(format!("huffman plane {i}: {}", e.0)))?,
        }
        planes[i] = plane;
    }
    let mut out = vec![0u8; raw_len];
    merge_planes(&mut out[..n * width], &planes[..width], transform);
    out[n * width..].copy_from_slice(&payload[pos..]);
    Ok(out)
}

/// Interleaves `planes` (each `out.len() / planes.len()` bytes) into `out`, undoing `transform`.
fn merge_planes(out: &mut [u8], planes: &[&[u8]], transform: Transform) {
    match (planes, transform) {
        ([p0, p1], Transform::None) => merge2::<0>(out, p0, p1),
        ([p0, p1], Transform::Rotate) => merge2::<1>(out, p0, p1),
        ([p0, p1, p2, p3], Transform::None) => merge4::<0>(out, [p0, p1, p2, p3]),
        ([p0, p1, p2, p3], Transform::Rotate) => merge4::<1>(out, [p0, p1, p2, p3]),
        _ => {
            let width = planes.len();
            for (i, p) in planes.iter().enumerate() {
                // `skip` (not `out[i..]`): a block shorter than one element has no plane bytes.
                for (o, b) in out.iter_mut().skip(i).step_by(width).zip(p.iter()) {
                    *o = *b;
                }
            }
        }
    }
}

avx2_dispatch! {
    /// Two planes into 16-bit elements rotated right by `ROT` bits.
    fn merge2 => merge2_body, merge2_avx2(out: &mut [u8], p0: &[u8], p1: &[u8])
}

#[inline(always)]
fn merge2_body<const ROT: u32>(out: &mut [u8], p0: &[u8], p1: &[u8]) {
    for ((o, &a), &b) in out.chunks_exact_mut(2).zip(p0).zip(p1) {
        let x = u16::from_le_bytes([a, b]).rotate_right(ROT);
        o.copy_from_slice(&x.to_le_bytes());
    }
}

avx2_dispatch! {
    /// Four planes into 32-bit elements rotated right by `ROT` bits.
    fn merge4 => merge4_body, merge4_avx2(out: &mut [u8], p: [&[u8]; 4])
}

#[inline(always)]
fn merge4_body<const ROT: u32>(out: &mut [u8], p: [&[u8]; 4]) {
    for ((((o, &a), &b), &c), &d) in out
        .chunks_exact_mut(4)
        .zip(p[0])
        .zip(p[1])
        .zip(p[2])
        .zip(p[3])
    {
        let x = u32::from_le_bytes([a, b, c, d]).rotate_right(ROT);
        o.copy_from_slice(&x.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kv_sample() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/kv-bf16-256tok.bin"
        ))
        .expect("tests/data/kv-bf16-256tok.bin")
    }

    #[test]
    fn every_codec_round_trips_real_kv() {
        let data = kv_sample();
        for block in data.chunks(147_456).take(4) {
            for c in Codec::ALL {
                let enc = c.encode(block, 2);
                let dec = c.decode(&enc, block.len()).expect("decode");
                assert_eq!(dec, block, "{c}");
            }
        }
    }

    #[test]
    fn byteplane_zstd_compresses_real_bf16() {
        let data = kv_sample();
        let enc = Codec::BytePlaneZstd.encode(&data, 2);
        let ratio = data.len() as f64 / enc.len() as f64;
        assert!(ratio > 1.3, "ratio {ratio}");
        let lz4 = Codec::Lz4.encode(&data, 2);
        assert!(enc.len() < lz4.len());
    }

    fn f16_sample() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/data/kv-f16-256tok.bin"
        ))
        .expect("tests/data/kv-f16-256tok.bin")
    }

    fn ratio(c: Codec, blocks: &[u8]) -> f64 {
        let enc: usize = blocks.chunks(147_456).map(|b| c.encode(b, 2).len()).sum();
        blocks.len() as f64 / enc as f64
    }

    #[test]
    fn byteplane_huff_meets_the_ratio_targets_on_real_kv() {
        // Issue targets: >= 1.40x on bf16, >= 1.12x on fp16 (order-0 limits 1.49x / 1.17x).
        let bf16 = ratio(Codec::BytePlaneHuff, &kv_sample());
        assert!(bf16 >= 1.40, "bf16 ratio {bf16}");
        assert!(
            bf16 > ratio(Codec::BytePlaneZstd, &kv_sample()),
            "bf16 {bf16}"
        );
        let f16 = ratio(Codec::BytePlaneHuff, &f16_sample());
        assert!(f16 >= 1.12, "f16 ratio {f16}");
    }

    #[test]
    fn byteplane_huff_rotates_16_and_32_bit_elements_only() {
        let data = kv_sample();
        let block = &data[..4099];
        for (width, transform) in [(1, 0u8), (2, 1), (3, 0), (4, 1), (8, 0)] {
            let enc = Codec::BytePlaneHuff.encode(block, width);
            assert_eq!(enc[0], transform, "width {width}");
            assert_eq!(enc[1] as usize, width);
            assert_eq!(
                Codec::BytePlaneHuff.decode(&enc, block.len()).as_deref(),
                Ok(block)
            );
            // Another transform byte: unknown, or rotation at a width that has none, or the
            // wrong one (the bytes then differ).
            for t in [0u8, 1, 2, 255] {
                if t == transform {
                    continue;
                }
                let mut bad = enc.clone();
                bad[0] = t;
                match Codec::BytePlaneHuff.decode(&bad, block.len()) {
                    Ok(d) => assert!(t <= 1 && matches!(width, 2 | 4) && d != block),
                    Err(e) => assert!(matches!(e, CoreError::Corrupt(_))),
                }
            }
        }
        assert!(Codec::BytePlaneHuff.decode(&[], 0).is_err());
    }

    #[test]
    fn byteplane_huff_codes_the_exponent_plane_and_stores_the_mantissa_raw() {
        let data = kv_sample();
        let enc = Codec::BytePlaneHuff.encode(&data[..147_456], 2);
        // transform, width, tail, then (mode, len) of the low and high planes.
        assert_eq!(enc[3], MODE_RAW, "mantissa plane");
        assert_eq!(enc[8], MODE_HUFF, "exponent plane");
    }

    #[test]
    fn wrong_raw_len_is_an_error_not_a_panic() {
        let data = kv_sample();
        let block = &data[..4096];
        for c in Codec::ALL {
            let enc = c.encode(block, 2);
            assert!(c.decode(&enc, 4095).is_err(), "{c} short");
            assert!(c.decode(&enc, 4097).is_err(), "{c} long");
        }
    }

    #[test]
    fn blocks_shorter_than_one_element_round_trip() {
        for width in 1..=8 {
            for len in 0..=17 {
                let raw: Vec<u8> = (0..len as u8).collect();
                for c in Codec::ALL {
                    let enc = c.encode(&raw, width);
                    assert_eq!(
                        c.decode(&enc, raw.len()),
                        Ok(raw.clone()),
                        "{c} width {width} len {len}"
                    );
                    // And a wrong raw_len is an error, never a panic.
                    let _ = c.decode(&enc, raw.len() + 1);
                }
            }
        }
    }

    #[test]
    fn unknown_codec_values_are_rejected() {
        assert_eq!(Codec::from_proto(0), Err(CoreError::UnknownCodec(0)));
        assert_eq!(Codec::from_proto(42), Err(CoreError::UnknownCodec(42)));
        for c in Codec::ALL {
            assert_eq!(Codec::from_proto(c.to_proto() as i32), Ok(c));
            assert_eq!(Codec::parse(c.name()), Ok(c));
        }
    }

    proptest! {
        #[test]
        fn round_trip_arbitrary_bytes(raw in proptest::collection::vec(any::<u8>(), 0..5000), width in 1usize..=8) {
            for c in Codec::ALL {
                let enc = c.encode(&raw, width);
                prop_assert!(enc.len() as u64 <= max_encoded_len(raw.len() as u64), "{}", c);
                let dec = c.decode(&enc, raw.len());
                prop_assert_eq!(dec, Ok(raw.clone()), "{}", c);
            }
        }

        #[test]
        fn round_trip_real_kv_slices(start in 0usize..500_000, len in 0usize..40_000, dtype_width in prop_oneof![Just(1usize), Just(2), Just(4)]) {
            let data = kv_sample();
            let start = start.min(data.len());
            let end = (start + len).min(data.len());
            let raw = &data[start..end];
            for c in Codec::ALL {
                let enc = c.encode(raw, dtype_width);
                prop_assert_eq!(c.decode(&enc, raw.len()), Ok(raw.to_vec()));
            }
        }

        #[test]
        fn garbage_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..300), raw_len in 0usize..2000) {
            for c in Codec::ALL {
                let _ = c.decode(&payload, raw_len);
            }
        }

        #[test]
        fn bit_flips_are_caught_by_the_checksum_or_the_decoder(flip in 0usize..100_000) {
            let data = kv_sample();
            let raw = &data[..147_456];
            let sum = checksum(raw);
            for c in Codec::ALL {
                let mut enc = c.encode(raw, 2);
                let i = flip % enc.len();
                enc[i] ^= 0x10;
                // A flip either fails to decode, or decodes to bytes whose checksum differs, or
                // lands in a bit the format ignores (zstd's unused frame-header bit) and decodes
                // to the original bytes. Never wrong bytes with a matching checksum.
                let undetected = matches!(c.decode(&enc, raw.len()), Ok(d) if d != raw && checksum(&d) == sum);
                prop_assert!(!undetected, "{} flip at {} undetected", c, i);
            }
        }
    }
}

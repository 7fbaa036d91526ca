//! Length-limited canonical Huffman coding of one byte plane in four interleaved streams, with a
//! two-symbols-per-lookup decoder (the structure of zstd's huff0 `4X2`).
//!
//! Why hand-rolled: see the measurements at the top of `codec.rs`. In short, no maintained crate
//! exposes a fast byte-oriented Huffman/FSE coder (the crates.io `fse` and `huff0` are empty
//! placeholders, ruzstd keeps its huff0 coder crate-private, `tans` carries a commercial-use
//! restriction, constriction's rANS decodes an order of magnitude too slowly for 2 GB/s).
//!
//! Encoded plane layout (integers little-endian):
//! ```text
//! 128 bytes: code length of each symbol 0..=255, 4 bits each (symbol 2k in the low nibble),
//!            0 = symbol absent, else 1..=MAX_BITS
//! u32:       n, the number of symbols (a decode into any other length is refused: with short
//!            codes, n - 1 symbols can fill the same bytes as n)
//! 3 x u32:   byte length of streams 0, 1, 2 (stream 3 takes the rest)
//! streams:   stream k codes symbols [k*q, min((k+1)*q, n)) with q = ceil(n/4); bits are written
//!            least significant first, each code bit-reversed, so the decoder looks the next
//!            MAX_BITS bits up in a table; zero bits pad each stream's last byte
//! ```
//! The code must be complete (Kraft sum exactly 1, at least two symbols): every table slot then
//! decodes to something, and the decoder needs no "invalid code" branch. A decoder that reads past
//! a stream sees zero bits and is caught by the final check that each stream ended in its last
//! byte.

/// Longest code, in bits; also the decode table's index width.
pub const MAX_BITS: u32 = 11;
const TABLE_SIZE: usize = 1 << MAX_BITS;
/// Lookups per refill: a refill leaves at least 56 bits.
const LOOKUPS: usize = 56 / MAX_BITS as usize;
const STREAMS: usize = 4;
/// Bytes before the stream data: code lengths, then three stream lengths.
pub const HEADER_LEN: usize = 128 + 4 + 4 * (STREAMS - 1);

/// Why a Huffman plane does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HuffError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, HuffError> {
    Err(HuffError(m.into()))
}

/// Histogram of `data` (four interleaved counters break the store-to-load dependency on runs).
pub fn histogram(data: &[u8]) -> [u32; 256] {
    let mut h = [[0u32; 256]; 4];
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        h[0][c[0] as usize] += 1;
        h[1][c[1] as usize] += 1;
        h[2][c[2] as usize] += 1;
        h[3][c[3] as usize] += 1;
    }
    for &b in chunks.remainder() {
        h[0][b as usize] += 1;
    }
    let mut out = [0u32; 256];
    for (i, o) in out.iter_mut().enumerate() {
        *o = h[0][i] + h[1][i] + h[2][i] + h[3][i];
    }
    out
}

/// Huffman code lengths (0 for absent symbols) of at most [`MAX_BITS`] bits for `counts`, forming
/// a complete code of at least two symbols. Length-limiting halves the counts (keeping them
/// non-zero) until the unrestricted Huffman code fits: at most a few rounds for 256 symbols.
pub fn code_lengths(counts: &[u32; 256]) -> [u8; 256] {
    let mut lens = [0u8; 256];
    let present: Vec<usize> = (0..256).filter(|&s| counts[s] > 0).collect();
    match present.len() {
        0 => {
            lens[0] = 1;
            lens[1] = 1;
            return lens;
        }
        1 => {
            // A complete code needs two symbols: pair the only one with an unused neighbour.
            let s = present[0];
            lens[s] = 1;
            lens[s ^ 1] = 1;
            return lens;
        }
        _ => {}
    }
    let mut weights: Vec<u64> = present.iter().map(|&s| u64::from(counts[s])).collect();
    loop {
        let depths = huffman_depths(&weights);
        if depths.iter().all(|&d| d <= MAX_BITS as u8) {
            for (&s, &d) in present.iter().zip(&depths) {
                lens[s] = d;
            }
            return lens;
        }
        for w in &mut weights {
            *w = (*w >> 1).max(1);
        }
    }
}

/// Depth of each leaf of a Huffman tree over `weights` (two or more), by the two-queue method.
fn huffman_depths(weights: &[u64]) -> Vec<u8> {
    let n = weights.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| weights[i]);
    // Nodes 0..n are leaves (in sorted order), n.. are internal nodes in creation order, whose
    // weights are non-decreasing: merging the two lightest of the two queue heads builds the tree.
    let mut weight: Vec<u64> = order.iter().map(|&i| weights[i]).collect();
    let mut parent = vec![0usize; 2 * n - 1];
    let (mut leaf, mut node) = (0usize, n);
    for next in n..2 * n - 1 {
        let mut pick = || {
            if leaf < n && (node >= next || weight[leaf] <= weight[node]) {
                leaf += 1;
                leaf - 1
            } else {
                node += 1;
                node - 1
            }
        };
        let (a, b) = (pick(), pick());
        weight.push(weight[a] + weight[b]);
        parent[a] = next;
        parent[b] = next;
    }
    let mut depth = vec![0u8; 2 * n - 1];
    for i in (0..2 * n - 2).rev() {
        depth[i] = depth[parent[i]].saturating_add(1);
    }
    let mut out = vec![0u8; n];
    for (rank, &i) in order.iter().enumerate() {
        out[i] = depth[rank];
    }
    out
}

/// Canonical codes for `lens`, bit-reversed (LSB-first streams): `codes[s]` is written as the
/// low `lens[s]` bits.
fn canonical_codes(lens: &[u8; 256]) -> [u16; 256] {
    let mut count = [0u16; MAX_BITS as usize + 2];
    for &l in lens {
        count[l as usize] += 1;
    }
    count[0] = 0;
    let mut next = [0u16; MAX_BITS as usize + 2];
    let mut code = 0u16;
    for bits in 1..=MAX_BITS as usize {
        code = (code + count[bits - 1]) << 1;
        next[bits] = code;
    }
    let mut codes = [0u16; 256];
    for s in 0..256 {
        let l = lens[s];
        if l > 0 {
            let c = next[l as usize];
            next[l as usize] += 1;
            codes[s] = c.reverse_bits() >> (16 - u32::from(l));
        }
    }
    codes
}

/// Bytes [`encode`] writes for `data` with `lens`, computed from its histogram.
pub fn encoded_len(counts: &[u32; 256], lens: &[u8; 256]) -> usize {
    let bits: u64 = counts
        .iter()
        .zip(lens)
        .map(|(&c, &l)| u64::from(c) * u64::from(l))
        .sum();
    // Each stream pads to a byte.
    HEADER_LEN + (bits / 8) as usize + STREAMS
}

/// Appends the encoding of the `n` symbols `sym(0..n)` with code lengths `lens` to `out`.
/// `sym` lets the caller feed a plane without materialising it (e.g. every other byte of a
/// block). Every symbol produced must have a non-zero length in `lens`.
pub fn encode(n: usize, sym: impl Fn(usize) -> u8, lens: &[u8; 256], out: &mut Vec<u8>) {
    let codes = canonical_codes(lens);
    // code | len << 16: one load per symbol.
    let mut table = [0u32; 256];
    for s in 0..256 {
        table[s] = u32::from(codes[s]) | u32::from(lens[s]) << 16;
    }
    for pair in lens.chunks_exact(2) {
        out.push(pair[0] | pair[1] << 4);
    }
    // Planes are at most a block (1 GiB), so n fits; saturate rather than wrap regardless.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    let dir = out.len();
    out.resize(dir + 4 * (STREAMS - 1), 0);
    let q = n.div_ceil(STREAMS);
    let bounds: [(usize, usize); STREAMS] =
        std::array::from_fn(|k| ((k * q).min(n), ((k + 1) * q).min(n)));
    // Each stream gets a region of its worst case (MAX_BITS per symbol) plus 8 bytes of slack for
    // the unaligned u64 stores; the regions are compacted afterwards.
    let cap = (q * MAX_BITS as usize).div_ceil(8) + 8;
    let base = out.len();
    out.resize(base + STREAMS * cap, 0);
    let buf = &mut out[base..];
    let mut w: [Writer; STREAMS] = std::array::from_fn(|k| Writer {
        pos: k * cap,
        acc: 0,
        nbits: 0,
    });
    // The four streams in lockstep (independent dependency chains) while all have symbols left:
    // the last stream is the shortest.
    let common = bounds[STREAMS - 1].1 - bounds[STREAMS - 1].0;
    let mut i = 0;
    while i + 4 <= common {
        for k in 0..STREAMS {
            // Four symbols (at most 44 bits) on top of at most 7 pending bits fit in 64.
            for j in 0..4 {
                w[k].put(table[sym(bounds[k].0 + i + j) as usize]);
            }
            w[k].flush(buf);
        }
        i += 4;
    }
    let mut lens_out = [0usize; STREAMS];
    for k in 0..STREAMS {
        for idx in bounds[k].0 + i..bounds[k].1 {
            w[k].put(table[sym(idx) as usize]);
            w[k].flush(buf);
        }
        w[k].finish(buf);
        lens_out[k] = w[k].pos - k * cap;
    }
    let mut end = base;
    for (k, &len) in lens_out.iter().enumerate() {
        out.copy_within(base + k * cap..base + k * cap + len, end);
        end += len;
    }
    out.truncate(end);
    for k in 0..STREAMS - 1 {
        out[dir + 4 * k..dir + 4 * k + 4].copy_from_slice(&(lens_out[k] as u32).to_le_bytes());
    }
}

/// LSB-first bit writer into a region of a shared buffer.
struct Writer {
    /// Next byte to write.
    pos: usize,
    acc: u64,
    /// Pending bits in `acc` (at most 7 after a flush).
    nbits: u32,
}

impl Writer {
    /// Adds a `code | len << 16` table entry.
    #[inline(always)]
    fn put(&mut self, e: u32) {
        self.acc |= u64::from(e & 0xffff) << self.nbits;
        self.nbits += e >> 16;
    }

    /// Writes the whole pending bytes (an 8-byte store; the region has the slack).
    #[inline(always)]
    fn flush(&mut self, buf: &mut [u8]) {
        buf[self.pos..self.pos + 8].copy_from_slice(&self.acc.to_le_bytes());
        let bytes = self.nbits >> 3;
        self.pos += bytes as usize;
        self.acc >>= bytes * 8;
        self.nbits &= 7;
    }

    /// Writes the last partial byte, zero-padded.
    fn finish(&mut self, buf: &mut [u8]) {
        self.flush(buf);
        if self.nbits > 0 {
            buf[self.pos] = self.acc as u8;
            self.pos += 1;
            self.nbits = 0;
        }
    }
}

/// Decode table entry: up to two symbols from one `MAX_BITS`-bit lookup.
/// Bits 0..8 bits consumed (so `acc.wrapping_shr(e)` consumes them), 8..16 symbols decoded (1 or
/// 2), 16..24 first symbol, 24..32 second symbol.
type Entry = u32;

fn build_table(lens: &[u8; 256]) -> Result<Box<[Entry; TABLE_SIZE]>, HuffError> {
    let mut kraft = 0u32;
    let mut symbols = 0u32;
    for &l in lens {
        if u32::from(l) > MAX_BITS {
            return err(format!("code length {l} exceeds {MAX_BITS}"));
        }
        if l > 0 {
            kraft += 1 << (MAX_BITS - u32::from(l));
            symbols += 1;
        }
    }
    if kraft != TABLE_SIZE as u32 || symbols < 2 {
        return err("code lengths do not form a complete prefix code");
    }
    let codes = canonical_codes(lens);
    // Single-symbol table first: every index whose low `len` bits are the code.
    let mut single = vec![0u16; TABLE_SIZE];
    for s in 0..256 {
        let l = u32::from(lens[s]);
        if l == 0 {
            continue;
        }
        let step = 1usize << l;
        let mut i = usize::from(codes[s]);
        while i < TABLE_SIZE {
            single[i] = s as u16 | (l as u16) << 8;
            i += step;
        }
    }
    let mut table: Box<[Entry; TABLE_SIZE]> = Box::new([0; TABLE_SIZE]);
    for (i, t) in table.iter_mut().enumerate() {
        let e1 = single[i];
        let l1 = u32::from(e1 >> 8);
        let e2 = single[i >> l1];
        let l2 = u32::from(e2 >> 8);
        // The second code is known from the MAX_BITS - l1 bits left only if it fits in them.
        *t = if l1 + l2 <= MAX_BITS {
            (l1 + l2) | 2 << 8 | u32::from(e1 & 0xff) << 16 | u32::from(e2 & 0xff) << 24
        } else {
            l1 | 1 << 8 | u32::from(e1 & 0xff) << 16
        };
    }
    Ok(table)
}

/// An encoded plane's parts.
struct Parsed<'a> {
    /// Code length of each symbol.
    lens: [u8; 256],
    /// Symbols the plane holds.
    symbols: usize,
    /// The four streams.
    streams: [&'a [u8]; STREAMS],
}

/// Parses the header of an encoded plane: code lengths, symbol count and the four streams.
fn parse(data: &[u8]) -> Result<Parsed<'_>, HuffError> {
    if data.len() < HEADER_LEN {
        return err("huffman plane shorter than its header");
    }
    let mut lens = [0u8; 256];
    for (i, &b) in data[..128].iter().enumerate() {
        lens[2 * i] = b & 15;
        lens[2 * i + 1] = b >> 4;
    }
    let n = u32::from_le_bytes([data[128], data[129], data[130], data[131]]) as usize;
    let mut rest = &data[HEADER_LEN..];
    let mut streams: [&[u8]; STREAMS] = [&[]; STREAMS];
    for (k, s) in streams.iter_mut().enumerate().take(STREAMS - 1) {
        let at = 132 + 4 * k;
        let len = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        if len > rest.len() {
            return err(format!(
                "huffman stream {k} of {len} bytes runs past the plane"
            ));
        }
        let (a, b) = rest.split_at(len);
        *s = a;
        rest = b;
    }
    streams[STREAMS - 1] = rest;
    Ok(Parsed {
        lens,
        symbols: n,
        streams,
    })
}

/// A forward LSB-first bit reader over one stream. Past the end it reads zero bits;
/// [`Reader::consumed`] tells how far it got.
struct Reader<'a> {
    data: &'a [u8],
    /// Next byte to load.
    pos: usize,
    acc: u64,
    /// Valid bits in `acc`.
    nbits: u32,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        let mut r = Reader {
            data,
            pos: 0,
            acc: 0,
            nbits: 0,
        };
        r.refill();
        r
    }

    /// Fills `acc` to at least 56 bits (zeros past the end).
    #[inline(always)]
    fn refill(&mut self) {
        if let Some(w) = self.data.get(self.pos..self.pos + 8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.acc |= u64::from_le_bytes(b) << self.nbits;
            self.pos += ((63 - self.nbits) >> 3) as usize;
            self.nbits |= 56;
        } else {
            while self.nbits <= 56 {
                let b = self.data.get(self.pos).copied().unwrap_or(0);
                self.acc |= u64::from(b) << self.nbits;
                self.pos += 1;
                self.nbits += 8;
            }
        }
    }

    /// True while a fast refill (an 8-byte load) is possible.
    #[inline(always)]
    fn fast(&self) -> bool {
        self.pos + 8 <= self.data.len()
    }

    #[inline(always)]
    fn peek(&self) -> usize {
        (self.acc & (TABLE_SIZE as u64 - 1)) as usize
    }

    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.acc >>= n;
        self.nbits -= n;
    }

    /// Consumes the bits of a table entry.
    #[inline(always)]
    fn consume_entry(&mut self, e: Entry) {
        self.acc = self.acc.wrapping_shr(e);
        self.nbits -= e & 0xff;
    }

    /// Bits consumed so far (loaded minus still buffered).
    fn consumed(&self) -> u64 {
        (self.pos as u64) * 8 - u64::from(self.nbits)
    }
}

/// Decodes an encoded plane into `out` (its length is the symbol count). Errors on malformed
/// tables, lengths, or streams that do not end in their last byte; never panics, allocates only
/// the 8 KiB decode table.
pub fn decode(data: &[u8], out: &mut [u8]) -> Result<(), HuffError> {
    let Parsed {
        lens,
        symbols,
        streams,
    } = parse(data)?;
    let n = out.len();
    if symbols != n {
        return err(format!(
            "huffman plane holds {symbols} symbols, not the {n} expected"
        ));
    }
    let table = build_table(&lens)?;
    let q = n.div_ceil(STREAMS);
    let mut readers: [Reader; STREAMS] = std::array::from_fn(|k| Reader::new(streams[k]));
    // Split `out` into the four segments.
    let (s0, rest) = out.split_at_mut(q.min(n));
    let (s1, rest) = rest.split_at_mut(q.min(rest.len()));
    let (s2, s3) = rest.split_at_mut(q.min(rest.len()));
    let mut segs: [&mut [u8]; STREAMS] = [s0, s1, s2, s3];
    let mut at = [0usize; STREAMS];

    // Fast loop: all four streams in lockstep, LOOKUPS lookups per refill, each
    // lookup writing two bytes (so 2 x LOOKUPS bytes of room in every segment).
    let seg_len: [usize; STREAMS] = std::array::from_fn(|k| segs[k].len());
    loop {
        if !(readers.iter().all(Reader::fast)
            && (0..STREAMS).all(|k| at[k] + 2 * LOOKUPS <= seg_len[k]))
        {
            break;
        }
        for r in readers.iter_mut() {
            r.refill();
        }
        for _ in 0..LOOKUPS {
            for k in 0..STREAMS {
                let e = table[readers[k].peek()];
                segs[k][at[k]..at[k] + 2].copy_from_slice(&((e >> 16) as u16).to_le_bytes());
                readers[k].consume_entry(e);
                at[k] += ((e >> 8) & 0xff) as usize;
            }
        }
    }
    // Tail: one stream at a time, one symbol at a time (a two-symbol entry's second symbol is
    // written only if the segment has room for it).
    for k in 0..STREAMS {
        let r = &mut readers[k];
        let seg = &mut segs[k];
        while at[k] < seg.len() {
            if r.nbits < MAX_BITS * 2 {
                r.refill();
            }
            let e = table[r.peek()];
            let first = (e >> 16) as u8;
            seg[at[k]] = first;
            if (e >> 8) & 0xff == 2 && at[k] + 1 < seg.len() {
                seg[at[k] + 1] = (e >> 24) as u8;
                r.consume_entry(e);
                at[k] += 2;
            } else {
                // Only the first symbol: consume its own length.
                r.consume(u32::from(lens[usize::from(first)]));
                at[k] += 1;
            }
        }
        let used = r.consumed().div_ceil(8);
        if used != streams[k].len() as u64 {
            return err(format!(
                "huffman stream {k} has {} bytes but its symbols use {used}",
                streams[k].len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(data: &[u8]) -> Vec<u8> {
        let counts = histogram(data);
        let lens = code_lengths(&counts);
        let mut enc = Vec::new();
        encode(data.len(), |i| data[i], &lens, &mut enc);
        assert!(enc.len() <= encoded_len(&counts, &lens));
        let mut out = vec![0u8; data.len()];
        decode(&enc, &mut out).expect("decode");
        assert_eq!(out, data);
        enc
    }

    #[test]
    fn skewed_data_shrinks() {
        let data: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 29) as u8 * (i % 3 == 0) as u8)
            .collect();
        let enc = round_trip(&data);
        assert!(enc.len() < data.len() / 3, "{}", enc.len());
    }

    /// Found by the codec_roundtrip fuzz target: with 1-bit codes, n - 1 symbols fill the same
    /// bytes as n, so only the stored symbol count tells a wrong length apart.
    #[test]
    fn a_decode_into_another_length_is_refused() {
        let data: Vec<u8> = (0..1000u32).map(|i| u8::from(i % 7 == 0)).collect();
        let enc = round_trip(&data);
        for n in [data.len() - 1, data.len() + 1, 0] {
            let mut out = vec![0u8; n];
            assert!(decode(&enc, &mut out).is_err(), "{n} symbols");
        }
    }

    #[test]
    fn constant_and_empty_planes() {
        round_trip(&[]);
        round_trip(&[7]);
        round_trip(&[255; 1000]);
        round_trip(&[0; 33]);
    }

    #[test]
    fn lengths_are_limited_on_geometric_counts() {
        let mut counts = [0u32; 256];
        for (i, c) in counts.iter_mut().enumerate().take(40) {
            *c = 1 << (31 - i.min(31)) >> 1;
            *c = (*c).max(1);
        }
        let lens = code_lengths(&counts);
        assert!(lens.iter().all(|&l| u32::from(l) <= MAX_BITS));
        assert!(build_table(&lens).is_ok());
    }

    #[test]
    fn incomplete_codes_are_rejected() {
        let mut lens = [0u8; 256];
        lens[0] = 1;
        assert!(build_table(&lens).is_err());
        lens[1] = 2;
        assert!(build_table(&lens).is_err());
        lens[2] = 2;
        assert!(build_table(&lens).is_ok());
        lens[3] = 12;
        assert!(build_table(&lens).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(data in proptest::collection::vec(any::<u8>(), 0..3000), skew in 0u32..8) {
            let data: Vec<u8> = data.iter().map(|b| b >> skew).collect();
            round_trip(&data);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..400), n in 0usize..3000) {
            let mut out = vec![0u8; n];
            let _ = decode(&data, &mut out);
        }

        #[test]
        fn valid_tables_with_garbage_streams_never_panic(
            data in proptest::collection::vec(0u8..40, 1..3000),
            lens in proptest::collection::vec(0u32..600, 3),
            garbage in proptest::collection::vec(any::<u8>(), 0..1500),
            n in 0usize..4000,
        ) {
            // A real code table, then arbitrary stream lengths and stream bytes, decoded into a
            // plane of arbitrary size: errors or fills the plane, never panics.
            let counts = histogram(&data);
            let code = code_lengths(&counts);
            let mut enc = Vec::new();
            encode(data.len(), |i| data[i], &code, &mut enc);
            enc.truncate(128);
            for l in &lens {
                enc.extend_from_slice(&l.to_le_bytes());
            }
            enc.extend_from_slice(&garbage);
            let mut out = vec![0u8; n];
            let _ = decode(&enc, &mut out);
        }

        #[test]
        fn truncated_or_extended_streams_fail(data in proptest::collection::vec(0u8..8, 50..2000), cut in 1usize..8) {
            let counts = histogram(&data);
            let lens = code_lengths(&counts);
            let mut enc = Vec::new();
            encode(data.len(), |i| data[i], &lens, &mut enc);
            let mut out = vec![0u8; data.len()];
            prop_assert!(decode(&enc[..enc.len() - cut.min(enc.len() - HEADER_LEN)], &mut out).is_err() || cut.min(enc.len() - HEADER_LEN) == 0);
            let mut longer = enc.clone();
            longer.extend_from_slice(&[0u8; 8][..cut]);
            prop_assert!(decode(&longer, &mut out).is_err());
        }
    }
}

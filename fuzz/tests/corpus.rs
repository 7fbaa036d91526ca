//! Replays the committed corpus and regression inputs through the checks (without libFuzzer,
//! on stable: `cargo test` in fuzz/), and writes the seed corpus with `UPDATE_SEEDS=1`.

use std::fs;
use std::path::{Path, PathBuf};

use kvshare_core::wire::get_chunks;
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout};
use kvshare_fuzz::TARGETS;
use kvshare_fuzz::codec::{DecodeInput, FIX_CHECKSUM};
use kvshare_fuzz::inputs::{NAMESPACE, stream_keys};
use kvshare_fuzz::stream::encode_hostile;
use prost::Message;

fn dir(kind: &str, target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(kind)
        .join(target)
}

fn layouts() -> [KvLayout; 4] {
    let l = |num_layers, num_kv_heads, head_dim, dtype, tokens_per_block| KvLayout {
        num_layers,
        num_kv_heads,
        head_dim,
        dtype,
        tokens_per_block,
    };
    [
        l(1, 2, 16, DType::BF16, 4),
        l(1, 1, 3, DType::U8, 1),
        l(2, 1, 5, DType::F32, 2),
        l(6, 12, 32, DType::BF16, 16),
    ]
}

/// Real bf16 K/V bytes (tests/data), so seeds have realistic byte planes.
fn kv(len: usize) -> Vec<u8> {
    let all =
        fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/kv-bf16-256tok.bin"))
            .expect("tests/data/kv-bf16-256tok.bin");
    all[..len].to_vec()
}

fn block(layout: KvLayout, codec: Codec) -> EncodedBlock {
    EncodedBlock::encode(NAMESPACE, layout, codec, &kv(layout.block_bytes() as usize))
        .expect("encode")
}

/// Seed inputs per target, named.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (li, layout) in layouts().into_iter().enumerate() {
        for codec in Codec::ALL {
            // Headers of real blocks (mode 0: protobuf).
            let mut h = vec![0];
            h.extend(block(layout, codec).header.to_proto().encode_to_vec());
            out.push(("block_header", format!("header-l{li}-{codec}"), h));
            // Small blocks' payloads with their preamble.
            if layout.block_bytes() <= 1024 {
                let b = block(layout, codec);
                let d = DecodeInput {
                    codec: Codec::ALL.iter().position(|c| *c == codec).unwrap_or(0) as u8,
                    dtype: layout.dtype.to_proto() as u8,
                    dims: [
                        layout.num_layers as u16,
                        layout.num_kv_heads as u16,
                        layout.head_dim as u16,
                        layout.tokens_per_block as u16,
                    ],
                    flags: FIX_CHECKSUM,
                    payload: &b.payload,
                };
                out.push((
                    "codec_decode",
                    format!("payload-l{li}-{codec}"),
                    d.to_bytes(),
                ));
            }
        }
    }
    // Structural header inputs (mode 1), small dimensions: the fuzzer finds the large ones.
    out.push((
        "block_header",
        "structural-a".into(),
        vec![1, 0, 2, 0, 4, 0, 8, 2, 0, 16, 0, 0],
    ));
    out.push((
        "block_header",
        "structural-b".into(),
        vec![1, 1, 3, 0, 9, 1, 4, 3, 0, 1, 1, 5],
    ));

    // Get streams: block 0 in 100-byte chunks, block 1 missing, block 2 in one chunk.
    let keys = stream_keys(3);
    let b0 = block(layouts()[0], Codec::BytePlaneZstd);
    let b2 = block(layouts()[1], Codec::Lz4);
    let mut msgs = get_chunks(0, &keys[0], Some(&b0), 100);
    msgs.extend(get_chunks(1, &keys[1], None, 100));
    msgs.extend(get_chunks(2, &keys[2], Some(&b2), 100));
    out.push((
        "get_stream",
        "stream-3-blocks".into(),
        encode_hostile(3, &msgs),
    ));
    // The same with the keys left out (the target fills in the expected ones).
    for m in &mut msgs {
        m.key = Default::default();
    }
    out.push((
        "get_stream",
        "stream-3-blocks-nokeys".into(),
        encode_hostile(3, &msgs),
    ));
    let one = get_chunks(0, &BlockKey([1; 32]), Some(&b2), 1);
    out.push((
        "get_stream",
        "stream-1-byte-chunks".into(),
        encode_hostile(1, &one),
    ));
    // Valid-stream mode (odd first byte): arbitrary bytes.
    out.push((
        "get_stream",
        "valid-a".into(),
        (0u8..64).map(|i| i.wrapping_mul(37) | 1).collect(),
    ));
    out.push((
        "get_stream",
        "valid-b".into(),
        [1].into_iter().chain((0u8..200).rev()).collect(),
    ));

    // Round trips: arbitrary bytes, one with a K/V-like tail.
    out.push(("codec_roundtrip", "bytes-a".into(), (0u8..=255).collect()));
    out.push((
        "codec_roundtrip",
        "bytes-b".into(),
        [2, 1, 30, 1, 7, 2].into_iter().chain(kv(300)).collect(),
    ));
    out.push(("codec_roundtrip", "zeros".into(), vec![0; 64]));
    out
}

/// `UPDATE_SEEDS=1 cargo test --test corpus` rewrites corpus/<target>/seed-* from the code
/// above (other corpus files, e.g. ones a long run found, are kept).
#[test]
fn seeds_are_written_when_asked() {
    if std::env::var_os("UPDATE_SEEDS").is_none() {
        return;
    }
    for (target, name, bytes) in seeds() {
        let d = dir("corpus", target);
        fs::create_dir_all(&d).expect("mkdir");
        fs::write(d.join(format!("seed-{name}")), bytes).expect("write seed");
    }
}

#[test]
fn seeds_pass_the_checks() {
    for (target, name, bytes) in seeds() {
        let check = TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .expect("known target")
            .1;
        eprintln!("{target}/{name}");
        check(&bytes);
    }
}

/// Every committed input (corpus/ and regressions/) passes its target's checks.
#[test]
fn committed_inputs_pass_the_checks() {
    for (target, check) in TARGETS {
        for kind in ["corpus", "regressions"] {
            let Ok(entries) = fs::read_dir(dir(kind, target)) else {
                continue;
            };
            for e in entries {
                let path = e.expect("dir entry").path();
                eprintln!("{}", path.display());
                check(&fs::read(&path).expect("read input"));
            }
        }
    }
}

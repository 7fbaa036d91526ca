//! Stored payloads stay readable: `tests/fixtures/codec-v1/` holds payloads encoded once by
//! earlier versions of the codecs (the four codecs of commit 99f63af, before byteplane-huff
//! existed, and byteplane-huff as first released, with its symbol count), from slices of the real K/V in `tests/data`.
//! Each must still decode bit-exact whatever the encoders do today: stores, snapshots and peers
//! hold blocks written by older nodes.
//!
//! `MANIFEST` lines: `codec file width sample offset raw_len xxh3-of-raw`.

use std::path::PathBuf;

use kvshare_core::{Codec, checksum};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codec-v1")
}

struct Fixture {
    codec: Codec,
    file: String,
    width: usize,
    sample: String,
    offset: usize,
    raw_len: usize,
    sum: u64,
}

fn fixtures() -> Vec<Fixture> {
    let manifest = std::fs::read_to_string(dir().join("MANIFEST")).expect("MANIFEST");
    manifest
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 7, "manifest line {l:?}");
            Fixture {
                codec: Codec::parse(f[0]).expect("codec name"),
                file: f[1].to_string(),
                width: f[2].parse().expect("width"),
                sample: f[3].to_string(),
                offset: f[4].parse().expect("offset"),
                raw_len: f[5].parse().expect("raw_len"),
                sum: u64::from_str_radix(f[6], 16).expect("checksum"),
            }
        })
        .collect()
}

#[test]
fn stored_payloads_of_every_codec_decode_bit_exact() {
    let all = fixtures();
    for codec in Codec::ALL {
        assert!(
            all.iter().filter(|f| f.codec == codec).count() >= 3,
            "{codec} has no stored payloads"
        );
    }
    for f in &all {
        let payload = std::fs::read(dir().join(&f.file)).expect("fixture file");
        let raw = f
            .codec
            .decode(&payload, f.raw_len)
            .unwrap_or_else(|e| panic!("{}: {e}", f.file));
        assert_eq!(raw.len(), f.raw_len, "{}", f.file);
        assert_eq!(checksum(&raw), f.sum, "{}: checksum", f.file);
        // The same bytes as the slice of the sample they were cut from.
        let sample = std::fs::read(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/data")
                .join(&f.sample),
        )
        .expect("sample");
        assert_eq!(raw, sample[f.offset..f.offset + f.raw_len], "{}", f.file);
        // Today's encoder still round-trips the same bytes.
        let again = f.codec.encode(&raw, f.width);
        assert_eq!(f.codec.decode(&again, raw.len()), Ok(raw), "{}", f.file);
        // A stored payload one byte short is an error, not a panic or a wrong block.
        if let Some((_, short)) = payload.split_last() {
            assert!(
                f.codec
                    .decode(short, f.raw_len)
                    .is_err_and(|e| !e.to_string().is_empty()),
                "{} truncated",
                f.file
            );
        }
    }
}

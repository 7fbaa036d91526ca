//! Codec ratio and speed on real K/V: encode and decode throughput per core, per codec and dtype,
//! on 16-token all-MiniLM blocks (147,456 raw bytes). `cargo bench -p kvshare-core --bench codec`.
//!
//! The sample is `tests/data/kv-{bf16,f16}-256tok.bin` (16 blocks); set `KVSHARE_KV_SAMPLE` to
//! the `kv-sample` directory of the shared data (`minilm-kv-{bf16,f16}.bin`, 2,048 tokens, 128
//! blocks) to measure on all of it. Before criterion's groups, a summary table prints each
//! codec's ratio and its encode/decode speed in GB/s (10^9 raw bytes per second, best of 9 passes
//! over all blocks, one thread), with the speed relative to byteplane-zstd measured in the same
//! run (the machine is shared: compare ratios between codecs, not absolute figures between runs).

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvshare_core::Codec;
use kvshare_core::layout::{DType, KvLayout};
use kvshare_core::sample::KvSample;

fn blocks(dtype: DType) -> (String, Vec<Vec<u8>>) {
    let (path, source) = match std::env::var("KVSHARE_KV_SAMPLE") {
        Ok(dir) => {
            let name = if dtype == DType::BF16 {
                "minilm-kv-bf16.bin"
            } else {
                "minilm-kv-f16.bin"
            };
            (format!("{dir}/{name}"), name.to_string())
        }
        Err(_) => {
            let name = if dtype == DType::BF16 {
                "kv-bf16-256tok.bin"
            } else {
                "kv-f16-256tok.bin"
            };
            (
                format!("{}/../../tests/data/{name}", env!("CARGO_MANIFEST_DIR")),
                format!("tests/data/{name}"),
            )
        }
    };
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let layout = KvLayout {
        num_layers: 6,
        num_kv_heads: 12,
        head_dim: 32,
        dtype,
        tokens_per_block: 16,
    };
    let s = KvSample::new(&data, layout).expect("layout");
    let bs = (0..s.tokens() / 16).map(|i| s.block(i * 16)).collect();
    (source, bs)
}

/// Best of `passes` timings of `f`, as raw GB/s.
fn gbps(bytes: u64, passes: usize, mut f: impl FnMut() -> usize) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..passes {
        let t = Instant::now();
        black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

fn summary(dtype: DType, source: &str, bs: &[Vec<u8>]) {
    let bytes: u64 = bs.iter().map(|b| b.len() as u64).sum();
    println!(
        "codec summary, {} ({source}, {} blocks of {} bytes), single thread:",
        dtype.name(),
        bs.len(),
        bs.first().map_or(0, Vec::len)
    );
    println!(
        "  {:<15} {:>7} {:>12} {:>12} {:>10} {:>10}",
        "codec", "ratio", "encode GB/s", "decode GB/s", "enc vs zstd", "dec vs zstd"
    );
    let mut rows = Vec::new();
    for codec in Codec::ALL {
        let enc: Vec<Vec<u8>> = bs.iter().map(|b| codec.encode(b, 2)).collect();
        for (e, b) in enc.iter().zip(bs) {
            assert_eq!(codec.decode(e, b.len()).as_ref(), Ok(b), "{codec}");
        }
        let ratio = bytes as f64 / enc.iter().map(|e| e.len() as f64).sum::<f64>();
        let e = gbps(bytes, 9, || {
            bs.iter().map(|x| codec.encode(x, 2).len()).sum::<usize>()
        });
        let d = gbps(bytes, 9, || {
            enc.iter()
                .zip(bs)
                .map(|(e, b)| codec.decode(e, b.len()).map_or(0, |d| d.len()))
                .sum::<usize>()
        });
        rows.push((codec, ratio, e, d));
    }
    let (ze, zd) = rows
        .iter()
        .find(|r| r.0 == Codec::BytePlaneZstd)
        .map_or((1.0, 1.0), |r| (r.2, r.3));
    for (codec, ratio, e, d) in rows {
        println!(
            "  {:<15} {ratio:>7.4} {e:>12.3} {d:>12.3} {:>9.2}x {:>9.2}x",
            codec.name(),
            e / ze,
            d / zd
        );
    }
}

fn codecs(c: &mut Criterion) {
    for dtype in [DType::BF16, DType::F16] {
        let (source, bs) = blocks(dtype);
        summary(dtype, &source, &bs);
        let bytes: u64 = bs.iter().map(|b| b.len() as u64).sum();
        let mut g = c.benchmark_group(format!("codec-{}", dtype.name()));
        g.throughput(Throughput::Bytes(bytes));
        g.sample_size(20);
        for codec in Codec::ALL {
            let enc: Vec<Vec<u8>> = bs.iter().map(|b| codec.encode(b, 2)).collect();
            g.bench_function(BenchmarkId::new("encode", codec.name()), |b| {
                b.iter(|| bs.iter().map(|x| codec.encode(x, 2).len()).sum::<usize>())
            });
            g.bench_function(BenchmarkId::new("decode", codec.name()), |b| {
                b.iter(|| {
                    enc.iter()
                        .zip(&bs)
                        .map(|(e, x)| codec.decode(e, x.len()).map_or(0, |d| d.len()))
                        .sum::<usize>()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, codecs);
criterion_main!(benches);

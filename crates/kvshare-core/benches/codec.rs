//! Codec speed on real K/V (tests/data): encode and decode throughput per core, per codec and
//! dtype, on 16-token all-MiniLM blocks (147,456 raw bytes). `cargo bench -p kvshare-core`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvshare_core::Codec;
use kvshare_core::layout::{DType, KvLayout};
use kvshare_core::sample::KvSample;

fn blocks(dtype: DType) -> Vec<Vec<u8>> {
    let name = if dtype == DType::BF16 {
        "kv-bf16-256tok.bin"
    } else {
        "kv-f16-256tok.bin"
    };
    let data = std::fs::read(format!(
        "{}/../../tests/data/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("sample");
    let layout = KvLayout {
        num_layers: 6,
        num_kv_heads: 12,
        head_dim: 32,
        dtype,
        tokens_per_block: 16,
    };
    let s = KvSample::new(&data, layout).expect("layout");
    (0..16).map(|i| s.block(i * 16)).collect()
}

fn codecs(c: &mut Criterion) {
    for dtype in [DType::BF16, DType::F16] {
        let bs = blocks(dtype);
        let bytes: u64 = bs.iter().map(|b| b.len() as u64).sum();
        let mut g = c.benchmark_group(format!("codec-{}", dtype.name()));
        g.throughput(Throughput::Bytes(bytes));
        g.sample_size(20);
        for codec in Codec::ALL {
            let enc: Vec<Vec<u8>> = bs.iter().map(|b| codec.encode(b, 2)).collect();
            let ratio = bytes as f64 / enc.iter().map(|e| e.len() as f64).sum::<f64>();
            println!("{codec} on {}: ratio {ratio:.3}", dtype.name());
            g.bench_function(BenchmarkId::new("encode", codec.name()), |b| {
                b.iter(|| bs.iter().map(|x| codec.encode(x, 2).len()).sum::<usize>())
            });
            g.bench_function(BenchmarkId::new("decode", codec.name()), |b| {
                b.iter(|| {
                    enc.iter()
                        .map(|e| codec.decode(e, 147_456).map(|d| d.len()).unwrap_or(0))
                        .sum::<usize>()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, codecs);
criterion_main!(benches);

//! Helpers shared by the cross-crate integration tests in `tests/`.

#![warn(missing_docs)]

use std::path::PathBuf;

use kvshare_core::sample::KvSample;
use kvshare_core::{DType, KvLayout};
use kvshare_server::{NodeHandle, ServerConfig};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The all-MiniLM-L6-v2 layout of the sample K/V with `tokens_per_block` tokens per block.
pub fn minilm_layout(dtype: DType, tokens_per_block: u32) -> KvLayout {
    KvLayout {
        num_layers: 6,
        num_kv_heads: 12,
        head_dim: 32,
        dtype,
        tokens_per_block,
    }
}

/// Real K/V activations (256 tokens, `[layer][k,v][token][head][dim]`) from `tests/data`.
pub fn kv_sample_bytes(dtype: DType) -> Vec<u8> {
    let name = match dtype {
        DType::F16 => "kv-f16-256tok.bin",
        DType::BF16 => "kv-bf16-256tok.bin",
        other => panic!("no sample for {other:?}"),
    };
    let path = repo_root().join("tests/data").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// `n` blocks of real K/V in block layout; block `i` holds the sample positions starting at
/// `(i * stride + offset) % 256`.
pub fn kv_blocks(
    data: &[u8],
    layout: KvLayout,
    n: usize,
    stride: usize,
    offset: usize,
) -> Vec<Vec<u8>> {
    let sample = KvSample::new(data, layout).expect("sample layout");
    (0..n).map(|i| sample.block(i * stride + offset)).collect()
}

/// The token ids the sample K/V were computed for.
pub fn sample_tokens() -> Vec<u32> {
    let path = repo_root().join("tests/data/tokens-256.u32");
    let b = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A prompt of `n` tokens: the sample's tokens, repeated with a per-repetition and per-`seed`
/// offset so that no two blocks of different prompts (or repetitions) are equal.
pub fn prompt_tokens(n: usize, seed: u32) -> Vec<u32> {
    let base = sample_tokens();
    (0..n)
        .map(|i| {
            base[i % base.len()]
                .wrapping_add((i / base.len()) as u32 * 40_000)
                .wrapping_add(seed.wrapping_mul(1_000_003))
        })
        .collect()
}

/// Starts an in-process node on loopback with ephemeral ports.
pub async fn start_node(capacity: u64, tweak: impl FnOnce(&mut ServerConfig)) -> NodeHandle {
    let mut c = ServerConfig::local(capacity);
    c.node_id = Some("test-node".into());
    tweak(&mut c);
    kvshare_server::start(c).await.expect("node starts")
}

/// `GET path` over plain HTTP/1.0 (no client library needed); returns status code and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

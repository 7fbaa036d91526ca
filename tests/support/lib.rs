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

/// Path of the `kvshared` binary: `$KVSHARED_BIN`, else the workspace's own build, brought up
/// to date with `cargo build` once per test process (a no-op when it is current).
pub fn kvshared_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Ok(p) = std::env::var("KVSHARED_BIN") {
        return PathBuf::from(p);
    }
    BUILT
        .get_or_init(|| workspace_bin("kvshare-server", "kvshared"))
        .clone()
}

/// Path of the `kvshare` CLI binary, built like [`kvshared_bin`].
pub fn kvshare_cli_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| workspace_bin("kvshare-cli", "kvshare"))
        .clone()
}

fn workspace_bin(_package: &str, bin: &str) -> PathBuf {
    // `cargo test --workspace --no-run` builds every workspace binary with the same features as
    // the suite's own build, so under `cargo test --workspace` it is a no-op, and a single test
    // run alone still gets current binaries.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .to_path_buf();
    let status = std::process::Command::new(env!("CARGO"))
        .args(["test", "--workspace", "--no-run", "--quiet"])
        .current_dir(repo_root())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("cargo test --no-run");
    assert!(status.success(), "building the workspace binaries failed");
    let path = dir.join(bin);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `kvshared` child process; killed (SIGKILL) when dropped.
pub struct NodeProcess {
    /// Node id.
    pub node_id: String,
    /// gRPC address.
    pub grpc: String,
    /// HTTP address.
    pub http: String,
    child: Option<std::process::Child>,
}

impl NodeProcess {
    /// Starts `kvshared` with the given ports, peers and extra flags, and waits until it listens.
    pub fn start(
        node_id: &str,
        grpc_port: u16,
        http_port: u16,
        peers: &[String],
        extra: &[&str],
    ) -> Self {
        let grpc = format!("127.0.0.1:{grpc_port}");
        let http = format!("127.0.0.1:{http_port}");
        let child = std::process::Command::new(kvshared_bin())
            .args([
                "--node-id",
                node_id,
                "--grpc-addr",
                &grpc,
                "--http-addr",
                &http,
            ])
            .args(["--peers", &peers.join(",")])
            .args([
                "--peer-health-interval-ms",
                "200",
                "--peer-health-timeout-ms",
                "300",
                "--log-level",
                "warn",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn kvshared");
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(&grpc).is_err() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(20),
                "{node_id} did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        NodeProcess {
            node_id: node_id.into(),
            grpc,
            http,
            child: Some(child),
        }
    }

    /// gRPC endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Kills the process with SIGKILL (no graceful shutdown) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the node at `endpoint` sees `healthy` members (itself included) in ClusterInfo.
pub async fn wait_for_members(endpoint: &str, healthy: usize) {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(mut c) = kvshare_client::KvClient::connect(endpoint, Default::default()).await
            && let Ok(info) = c.cluster_info().await
            && info.members.iter().filter(|m| m.healthy).count() == healthy
        {
            return;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "{endpoint} never saw {healthy} healthy members"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Value of a Prometheus counter/gauge line `name{labels} value` (sum over matching lines).
pub fn metric_value(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// LZ4-encoded upload items for every full block of `tokens`; block `i` carries `raw[i % len]`.
pub fn lz4_items(
    ns: &kvshare_core::Namespace,
    tokens: &[u32],
    raw: &[Vec<u8>],
) -> Vec<kvshare_client::PutItem> {
    let keys = ns.block_keys(tokens).expect("keys");
    let blocks: Vec<&Vec<u8>> = (0..keys.len()).map(|i| &raw[i % raw.len()]).collect();
    kvshare_client::encode_prefix(ns, &keys, &blocks, kvshare_core::Codec::Lz4).expect("encode")
}

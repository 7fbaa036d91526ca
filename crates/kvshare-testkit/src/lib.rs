//! Helpers shared by kvshare's tests, benches and demo that run real processes: free ports, waiting
//! for a listener or a port file, `kvshared` child processes, cluster membership, and the real
//! K/V sample in `tests/data`. Test code: helpers panic with a message on failure.

#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

#[cfg(feature = "pki")]
pub mod pki;

use kvshare_core::sample::KvSample;
use kvshare_core::{DType, KvLayout};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A free TCP port on 127.0.0.1, bound and released, for a process started next to listen on.
///
/// Ports come from below the kernel's ephemeral range (`ip_local_port_range`), from a sequence
/// that starts at a point derived from the process id: a port taken from that range (binding
/// port 0) could meanwhile be handed out again by the kernel, to another listener's port 0 or
/// as the local port of an outgoing connection, and the process meant to listen on it would
/// then fail to start. Falls back to port 0 when there is no room below the range.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    const LOWEST: u64 = 10_000;
    let below = ephemeral_low().unwrap_or(32_768);
    if below < LOWEST + 1_000 {
        return port_zero();
    }
    let span = below - LOWEST;
    let start = u64::from(std::process::id()).wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let Ok(port) = u16::try_from(LOWEST + (start + n) % span) else {
            break;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    port_zero()
}

/// A port the kernel picks (bound and released).
fn port_zero() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()
        .map(|a| a.port())
}

/// The first port of Linux's ephemeral range, when it can be read.
fn ephemeral_low() -> Option<u64> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// Waits until `child` accepts TCP connections on `addr` (`host:port`); fails when it exits
/// first or after `timeout`.
pub fn wait_for_listener(addr: &str, timeout: Duration, child: &mut Child) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(_) => return Ok(()),
            Err(e) if t0.elapsed() > timeout => {
                return Err(format!("nothing listens on {addr} after {timeout:?}: {e}"));
            }
            Err(_) => {}
        }
        match child.try_wait() {
            Ok(Some(status)) => return Err(format!("exited during start-up ({status})")),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot check the process: {e}")),
        }
    }
}

/// `GET path` over plain HTTP/1.0 on `addr` (`host:port`), blocking: status code and body, or
/// `None` when the node does not answer within a second.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// `GET path` over HTTPS (HTTP/1.0 inside TLS) on `addr` (`host:port`), blocking, verifying the
/// node's certificate with `tls` (and presenting its client certificate, if any): status code
/// and body, or `None` when the node does not answer within a second or the handshake fails.
pub fn https_get(addr: &str, path: &str, tls: &kvshare_client::ClientTls) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse().ok()?;
    let mut config = (*tls.config()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = match tls.server_name() {
        Some(n) => rustls::pki_types::ServerName::try_from(n.to_string()).ok()?,
        None => rustls::pki_types::ServerName::from(sock.ip()),
    };
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).ok()?;
    let tcp = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(1))).ok()?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    // A server may close without close_notify after an HTTP/1.0 answer: keep what arrived.
    let _ = s.read_to_end(&mut raw);
    let out = String::from_utf8_lossy(&raw).into_owned();
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Value of the Prometheus sample `name` (no labels) in a `/metrics` body.
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `path` holds the JSON `kvshared --port-file` writes once it listens.
pub fn wait_for_port_file(path: &Path, timeout: Duration) -> Result<serde_json::Value, String> {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&s)
        {
            return Ok(v);
        }
        if t0.elapsed() > timeout {
            return Err(format!("{} not written after {timeout:?}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// Free loopback (gRPC, HTTP) ports for `n` nodes, and the `--peers` list naming all of them.
pub fn cluster_ports(n: usize) -> (Vec<(u16, u16)>, Vec<String>) {
    let ports: Vec<(u16, u16)> = (0..n)
        .map(|_| (free_port().expect("port"), free_port().expect("port")))
        .collect();
    let peers = ports
        .iter()
        .map(|(g, _)| format!("127.0.0.1:{g}"))
        .collect();
    (ports, peers)
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
    /// TLS the tests' probes and clients use with this node (see [`NodeProcess::with_tls`]).
    tls: Option<kvshare_client::ClientTls>,
}

impl NodeProcess {
    /// Starts the `kvshared` binary `bin` with the given ports, peers and extra flags, and
    /// waits until it listens.
    pub fn start(
        bin: &Path,
        node_id: &str,
        grpc_port: u16,
        http_port: u16,
        peers: &[String],
        extra: &[&str],
    ) -> Self {
        let grpc = format!("127.0.0.1:{grpc_port}");
        let http = format!("127.0.0.1:{http_port}");
        let mut child = std::process::Command::new(bin)
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
        if let Err(e) = wait_for_listener(&grpc, Duration::from_secs(20), &mut child) {
            panic!("{node_id} did not start: {e}");
        }
        NodeProcess {
            node_id: node_id.into(),
            grpc,
            http,
            child: Some(child),
            tls: None,
        }
    }

    /// For a node started with `--tls-cert`: probes ([`NodeProcess::wait_ready`],
    /// [`NodeProcess::http_get`]) use HTTPS verified with `tls`, and
    /// [`NodeProcess::endpoint`] is `https://`.
    pub fn with_tls(mut self, tls: kvshare_client::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// `GET path` on the node's HTTP port (HTTPS when the node has TLS): status and body.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        match &self.tls {
            Some(tls) => https_get(&self.http, path, tls),
            None => http_get(&self.http, path),
        }
    }

    /// Process id, while the process runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Resident memory now (`VmRSS`) and at its peak (`VmHWM`), in bytes, from `/proc`.
    pub fn rss(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// gRPC endpoint URL (`https://` for a node with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.grpc)
    }

    /// Sends SIGTERM (a graceful shutdown) and waits up to `timeout` for the process to exit;
    /// returns its exit status. After the timeout it is killed with SIGKILL and this fails.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let Some(mut c) = self.child.take() else {
            return Err("not running".into());
        };
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .map_err(|e| format!("running kill: {e}"))?;
        if !sent.success() {
            return Err(format!("kill -TERM failed: {sent}"));
        }
        let t0 = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if t0.elapsed() > timeout => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(format!("still running {timeout:?} after SIGTERM; killed"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("cannot check the process: {e}")),
            }
        }
    }

    /// Waits until `/readyz` answers 200 (fails after `timeout`).
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            if let Some((200, _)) = self.http_get("/readyz") {
                return Ok(());
            }
            if t0.elapsed() > timeout {
                return Err(format!("{} not ready after {timeout:?}", self.node_id));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
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
    wait_for_members_with(endpoint, healthy, Default::default()).await
}

/// [`wait_for_members`], connecting with `opts` (e.g. with TLS).
pub async fn wait_for_members_with(
    endpoint: &str,
    healthy: usize,
    opts: kvshare_client::ClientOptions,
) {
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(mut c) = kvshare_client::KvClient::connect(endpoint, opts.clone()).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("a port")).collect();
        let distinct: std::collections::HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        if let Some(low) = ephemeral_low() {
            assert!(
                ports.iter().all(|p| u64::from(*p) < low),
                "{ports:?} vs {low}"
            );
        }
        for p in ports.iter().take(5) {
            std::net::TcpListener::bind(("127.0.0.1", *p)).expect("still free");
        }
    }
}

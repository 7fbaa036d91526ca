//! What authentication and TLS cost (`--parts secure`): the same cells against two nodes started
//! side by side, one plain and one with `--auth-file` (every call carries a bearer token checked
//! against the file's SHA-256 digests) and TLS (certificates generated into OUT_DIR/secure).
//! Cells alternate between the nodes, `--repeat` times each, so all see the same machine;
//! medians and the secure/plain ratio are reported. With `--link`, the same comparison also
//! runs across each shaped link (nodes in the server namespace, clients in the client one),
//! where the link and not the two shared cores sets the pace, as between machines.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use kvshare_client::{ClientOptions, ClientTls, KvClient, PutItem};
use kvshare_core::{BlockKey, EncodedBlock};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Args;
use crate::procs::{BENCH_NODE_NAME, Node, Place};
use crate::throughput::{
    LOOKUP_NS, Load, NS, Op, kv_block, kvshare_op, layout_for, lookup_latencies, lookup_samples,
    percentile, populate_chain, random_key,
};

/// Block sizes of the throughput cells.
const SIZES: [u64; 2] = [256 << 10, 1 << 20];
/// Clients per cell.
const CONC: usize = 4;
/// Blocks of the Lookup prompt.
const LOOKUP_BLOCKS: usize = 2048;
/// Blocks each node holds for the get cells, per size.
const STORED: usize = 64;

/// One cell measured on both nodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecureRow {
    /// `loopback`, or the shaped link's label (`5gbit`).
    pub link: String,
    /// `get`, `put` or `lookup`.
    pub op: String,
    /// Block size in bytes (0 for lookups).
    pub block_bytes: u64,
    /// Plain node: raw GB/s of each run (lookups: p50 microseconds).
    pub plain: Vec<f64>,
    /// Node with `--auth-file` only (no TLS), same unit.
    pub auth: Vec<f64>,
    /// Auth + TLS node, same unit.
    pub secure: Vec<f64>,
    /// Median of `auth` over median of `plain`.
    pub auth_ratio: f64,
    /// Median of `secure` over median of `plain`.
    pub ratio: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    percentile(&s, 0.5)
}

/// One node under test and how its clients connect.
pub struct Target {
    endpoint: String,
    options: ClientOptions,
}

impl Target {
    async fn client(&self, codec: kvshare_core::Codec) -> anyhow::Result<KvClient> {
        let options = ClientOptions {
            codec,
            timeout: Duration::from_secs(120),
            ..self.options.clone()
        };
        Ok(KvClient::connect(&self.endpoint, options).await?)
    }
}

/// Writes an auth file granting `token` the writer role of tenant `bench`.
fn write_auth_file(dir: &Path, token: &str) -> anyhow::Result<std::path::PathBuf> {
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    let path = dir.join("auth.toml");
    std::fs::write(
        &path,
        format!(
            "[tenants.bench]\n\n[[tokens]]\ntenant = \"bench\"\nrole = \"writer\"\nsha256 = \"{digest}\"\n"
        ),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The plain, the auth-only and the auth + TLS node, and what a client needs to reach them.
pub struct SecureNodes {
    nodes: Vec<Node>,
    /// gRPC endpoints: plain, auth, auth + TLS.
    pub endpoints: [String; 3],
    /// The bearer token the auth file grants.
    pub token: String,
    /// The CA certificate (PEM file) the TLS node's certificate chains to.
    pub ca_file: PathBuf,
}

impl SecureNodes {
    /// Starts the three nodes at `place` (inside a namespace, each on ports of its own; the
    /// plain node with `--insecure-no-auth`, which protected mode needs off loopback). They are
    /// nodes 1 to 3 of [`Node::start_numbered`]: node 0 is the shaped-link throughput node.
    pub async fn start(args: &Args, place: Place<'_>) -> anyhow::Result<Self> {
        let dir = args.out_dir.join("secure");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = kvshare_testkit::pki::TestCa::new("kvshare-bench secure CA");
        let files = ca
            .issue("bench-node", &[BENCH_NODE_NAME], 1)
            .write(&dir, "node");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem)
            .with_context(|| format!("writing {}", ca_file.display()))?;
        let token = hex::encode(random_key().0);
        let auth = write_auth_file(&dir, &token)?;
        let auth_arg = auth.to_string_lossy().into_owned();
        let open: &[&str] = match place {
            Place::Loopback => &[],
            Place::Netns { .. } => &["--insecure-no-auth"],
        };
        let plain = Node::start_numbered(place, 1, "4GiB", open, None).await?;
        let auth_only =
            Node::start_numbered(place, 2, "4GiB", &["--auth-file", &auth_arg], None).await?;
        let secure = Node::start_numbered(
            place,
            3,
            "4GiB",
            &["--auth-file", &auth_arg],
            Some((files.cert, files.key)),
        )
        .await?;
        Ok(SecureNodes {
            endpoints: [
                plain.endpoint.clone(),
                auth_only.endpoint.clone(),
                secure.endpoint.clone(),
            ],
            nodes: vec![plain, auth_only, secure],
            token,
            ca_file,
        })
    }

    /// Stops the nodes.
    pub fn stop(self) {
        for n in self.nodes {
            n.stop();
        }
    }
}

/// How clients reach the plain, auth and auth + TLS nodes at `endpoints`.
fn targets(endpoints: &[String; 3], token: &str, ca_file: &Path) -> anyhow::Result<[Target; 3]> {
    let tls = ClientTls::from_files(ca_file, None)?.with_server_name(Some(BENCH_NODE_NAME));
    let [plain, auth, secure] = endpoints.clone();
    Ok([
        Target {
            endpoint: plain,
            options: ClientOptions::default(),
        },
        Target {
            endpoint: auth,
            options: ClientOptions {
                token: Some(token.to_string()),
                ..ClientOptions::default()
            },
        },
        Target {
            endpoint: secure,
            options: ClientOptions {
                token: Some(token.to_string()),
                tls: Some(tls),
                ..ClientOptions::default()
            },
        },
    ])
}

/// Raw GB/s of one cell of `load` against `target`.
async fn cell(
    target: &Target,
    args: &Args,
    load: Load,
    keys: Arc<Vec<BlockKey>>,
) -> anyhow::Result<f64> {
    let mut clients = Vec::with_capacity(load.conc);
    for _ in 0..load.conc {
        clients.push(target.client(args.codec).await?);
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (t, mut c) in clients.into_iter().enumerate() {
        let (keys, codec) = (keys.clone(), args.codec);
        tasks.push(tokio::spawn(async move {
            let mut raw = 0u64;
            for i in 0..load.ops.div_ceil(load.conc) {
                raw += kvshare_op(&mut c, codec, load, t, i, &keys).await?.0;
            }
            anyhow::Ok(raw)
        }));
    }
    let mut raw = 0u64;
    for t in tasks {
        raw += t.await??;
    }
    Ok(raw as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// Stores `STORED` blocks of `size` on `target` for its get cells.
async fn populate(target: &Target, args: &Args, size: u64) -> anyhow::Result<Arc<Vec<BlockKey>>> {
    let keys: Vec<BlockKey> = (0..STORED).map(|_| random_key()).collect();
    let mut c = target.client(args.codec).await?;
    for (i, k) in keys.iter().enumerate() {
        let raw = kv_block(size as usize, i);
        let block = EncodedBlock::encode(NS, layout_for(size), args.codec, &raw)?;
        c.put_blocks(vec![PutItem {
            key: *k,
            parent: None,
            block,
        }])
        .await?;
    }
    Ok(Arc::new(keys))
}

/// Runs the comparison on loopback and prints it.
pub async fn run(args: &Args) -> anyhow::Result<Vec<SecureRow>> {
    anyhow::ensure!(
        !args.tls,
        "--parts secure starts its own plain and TLS nodes; run it without --tls"
    );
    let nodes = SecureNodes::start(args, Place::Loopback).await?;
    let targets = targets(&nodes.endpoints, &nodes.token, &nodes.ca_file)?;
    let rows = measure(args, &targets, crate::throughput::LOOPBACK).await?;
    nodes.stop();
    Ok(rows)
}

/// `secure-cell`: the comparison over a shaped link, run from the client namespace against
/// nodes in the server namespace (the bearer token comes in `KVSHARE_TOKEN`).
pub async fn run_cells(
    args: &Args,
    endpoints: &[String; 3],
    ca_file: &Path,
    link: &str,
) -> anyhow::Result<Vec<SecureRow>> {
    let token = std::env::var("KVSHARE_TOKEN")
        .context("secure-cell needs the nodes' bearer token in KVSHARE_TOKEN")?;
    let targets = targets(endpoints, &token, ca_file)?;
    measure(args, &targets, link).await
}

/// The cells and the Lookup p50 on the three `targets`, alternating, `--repeat` runs each.
async fn measure(args: &Args, targets: &[Target; 3], link: &str) -> anyhow::Result<Vec<SecureRow>> {
    let repeat = args.repeat.max(1);
    let budget = match &args.bytes_per_cell {
        Some(b) => kvshare_core::size::parse_size(b)?,
        None if args.quick => 32 << 20,
        None => 256 << 20,
    };
    println!(
        "\n== auth, and auth + TLS, vs plain over {link}: the same cells on three nodes, alternating, {repeat} run(s) each"
    );
    let mut rows = Vec::new();
    for size in SIZES {
        let mut keys = Vec::new();
        for t in targets {
            keys.push(populate(t, args, size).await?);
        }
        for op in [Op::Get, Op::Put] {
            let load = Load {
                op,
                size,
                conc: CONC,
                ops: (budget / size).max(CONC as u64) as usize,
            };
            let mut runs = [Vec::new(), Vec::new(), Vec::new()];
            for _ in 0..repeat {
                for (i, t) in targets.iter().enumerate() {
                    runs[i].push(cell(t, args, load, keys[i].clone()).await?);
                }
            }
            rows.push(row(link, op.name(), size, runs));
        }
    }
    let chain: Vec<BlockKey> = (0..LOOKUP_BLOCKS).map(|_| random_key()).collect();
    let mut clients = Vec::new();
    for t in targets {
        let mut c = t.client(args.codec).await?;
        populate_chain(&mut c, &chain).await?;
        clients.push(c);
    }
    let samples = lookup_samples(args.quick, LOOKUP_BLOCKS);
    let mut runs = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..repeat {
        for (i, c) in clients.iter_mut().enumerate() {
            let mut lat = lookup_latencies("kvshare", LOOKUP_BLOCKS, samples, async || {
                Ok(c.lookup_keys(&LOOKUP_NS, &chain).await?)
            })
            .await?;
            lat.sort_by(f64::total_cmp);
            runs[i].push(percentile(&lat, 0.5));
        }
    }
    rows.push(row(link, "lookup p50 us", 0, runs));
    println!(
        "{:<14} {:>10} {:>9} {:>9} {:>9} {:>7} {:>8}   each run plain/auth/auth+TLS",
        "op", "block", "plain", "auth", "auth+TLS", "auth", "auth+TLS"
    );
    for r in &rows {
        let each: Vec<String> = (0..r.plain.len())
            .map(|i| format!("{:.3}/{:.3}/{:.3}", r.plain[i], r.auth[i], r.secure[i]))
            .collect();
        println!(
            "{:<14} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>6.2}x {:>7.2}x   {}",
            r.op,
            r.block_bytes,
            median(&r.plain),
            median(&r.auth),
            median(&r.secure),
            r.auth_ratio,
            r.ratio,
            each.join(" ")
        );
    }
    Ok(rows)
}

fn row(link: &str, op: &str, block_bytes: u64, runs: [Vec<f64>; 3]) -> SecureRow {
    let [plain, auth, secure] = runs;
    let base = median(&plain).max(f64::MIN_POSITIVE);
    SecureRow {
        link: link.into(),
        op: op.into(),
        block_bytes,
        auth_ratio: median(&auth) / base,
        ratio: median(&secure) / base,
        plain,
        auth,
        secure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_grants_the_token_as_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_auth_file(dir.path(), "s3cret").expect("write");
        let text = std::fs::read_to_string(path).expect("read");
        let digest = hex::encode(Sha256::digest(b"s3cret"));
        assert!(text.contains(&format!("sha256 = \"{digest}\"")), "{text}");
        assert!(text.contains("role = \"writer\""), "{text}");
        assert!(
            !text.contains("s3cret"),
            "the token itself is never written"
        );
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}

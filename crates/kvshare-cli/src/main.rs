//! `kvshare`: the kvshare operator CLI.
//!
//! `kvshare demo` (an embedded cluster with inference workers) needs the default-on `demo`
//! feature, which links the model (candle) and the server; without it the CLI is a thin gRPC
//! client.

mod args;
#[cfg(feature = "demo")]
mod demo;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kvshare_client::{ClientOptions, KvClient, PutStatus};
use kvshare_core::{Codec, KeyScheme};
use kvshare_proto::v1 as pb;
use serde_json::json;

use args::PromptArgs;

#[derive(Debug, Parser)]
#[command(
    name = "kvshare",
    version,
    about = "kvshare operator CLI: inspect nodes, hash prompts, move blocks, run the demo"
)]
struct Cli {
    /// gRPC endpoint of a kvshare node (`http://host:port`; `https://host:port` with --tls-ca).
    #[arg(
        long,
        global = true,
        env = "KVSHARE_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Deadline of each call, seconds.
    #[arg(long, global = true, default_value_t = 30)]
    timeout: u64,
    /// Bearer token for nodes that run with --auth-file (prefer the environment variable:
    /// a flag shows in the process list).
    #[arg(long, global = true, env = "KVSHARE_TOKEN", hide_env_values = true)]
    token: Option<kvshare_client::Secret>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// TLS options of the connections to nodes.
#[derive(Debug, clap::Args)]
struct TlsArgs {
    /// CA certificate(s) (PEM) that sign the nodes' certificates: connect with TLS (every
    /// endpoint becomes https://).
    #[arg(long, global = true, env = "KVSHARE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for nodes that require one (mTLS); with --tls-key.
    #[arg(long, global = true, env = "KVSHARE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "KVSHARE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl TlsArgs {
    /// `opts` with these TLS settings (unchanged without --tls-ca).
    fn apply(&self, opts: ClientOptions) -> anyhow::Result<ClientOptions> {
        let Some(ca) = &self.tls_ca else {
            if self.tls_cert.is_some() {
                bail!("--tls-cert needs --tls-ca (the CA that signs the nodes' certificates)");
            }
            return Ok(opts);
        };
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        opts.with_tls_files(ca, identity)
            .context("loading the TLS files (--tls-ca, --tls-cert, --tls-key)")
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Health, membership and usage of the node.
    Status,
    /// The node's counters.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Namespaces to list: the N largest by bytes and the N with most hits (0: the node's
        /// default, --stats-top-namespaces; at most 1000).
        #[arg(long, default_value_t = 0)]
        top: u32,
    },
    /// Longest cached prefix of a prompt.
    Lookup(PromptArgs),
    /// Upload raw K/V blocks of a prompt from a file (blocks concatenated, block layout).
    Put {
        #[command(flatten)]
        prompt: PromptArgs,
        /// File of raw K/V: N blocks of layers x 2 x block_tokens x kv_heads x head_dim elements.
        #[arg(long)]
        kv_file: PathBuf,
        /// Codec of the uploaded blocks.
        #[arg(long, value_enum, default_value = "byteplane-huff")]
        codec: Codec,
    },
    /// Download the cached leading blocks of a prompt (decoded, verified) to a file.
    Get {
        #[command(flatten)]
        prompt: PromptArgs,
        /// Output file (raw K/V blocks concatenated).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the block keys of token ids (no server needed).
    Hash {
        #[command(flatten)]
        prompt: PromptArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start an embedded node and run a prefix-sharing demo load against it.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// The demo: not in this build (built without the `demo` feature).
    #[cfg(not(feature = "demo"))]
    Demo {
        /// Ignored.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show or change the capacity of the cluster's nodes (SetCapacity, one call per node).
    Capacity {
        #[command(subcommand)]
        action: CapacityCommand,
    },
    /// Run the benchmark suite (`kvshare-bench`, installed next to this binary); arguments are
    /// passed through, e.g. `kvshare bench --quick --compare redis`.
    Bench {
        /// Arguments for kvshare-bench.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CapacityCommand {
    /// Each member's capacity and stored bytes.
    Get {
        /// Only this member (node id).
        #[arg(long)]
        node: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change the capacity of every member of the cluster (or of one, with --node) at run time.
    /// Shrinking evicts least recently used blocks down to the new size before the call returns.
    /// Lasts until the node restarts: change --capacity / KVSHARE_CAPACITY too to keep it.
    Set {
        /// The new capacity per node, e.g. 64MiB or 8GiB.
        #[arg(value_parser = size_arg)]
        size: u64,
        /// Only this member (node id).
        #[arg(long)]
        node: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn size_arg(s: &str) -> Result<u64, String> {
    kvshare_core::size::parse_size(s).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVSHARE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let opts = cli.tls.apply(ClientOptions {
        timeout: Duration::from_secs(cli.timeout),
        token: cli.token.as_ref().map(|t| t.expose().to_string()),
        ..ClientOptions::default()
    })?;
    let connect = |opts: ClientOptions| KvClient::connect(&cli.endpoint, opts);
    match cli.command {
        Command::Status => status(&mut connect(opts).await?).await,
        Command::Stats { json, top } => stats(&mut connect(opts).await?, json, top).await,
        Command::Lookup(prompt) => lookup(&mut connect(opts).await?, &prompt).await,
        Command::Put {
            prompt,
            kv_file,
            codec,
        } => {
            let mut c = connect(ClientOptions { codec, ..opts }).await?;
            put(&mut c, &prompt, &kv_file).await
        }
        Command::Get { prompt, out } => get(&mut connect(opts).await?, &prompt, &out).await,
        Command::Hash { prompt, json } => hash(&prompt, json),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(args).await,
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => bail!(
            "this kvshare was built without the `demo` feature; build it with \
             `cargo build -p kvshare-cli` (the feature is on by default) to run the demo"
        ),
        Command::Capacity { action } => capacity(&mut connect(opts).await?, action).await,
        Command::Bench { args } => bench(&args),
    }
}

/// A member a capacity command talks to: its id and a client connected to it.
struct Target {
    node_id: String,
    client: anyhow::Result<KvClient>,
}

/// The members `node` selects (all when `None`), each with a client. The node behind
/// `c` is reached through `c`'s endpoint (which works through a port-forward too); the others at
/// the gRPC address they advertise.
async fn capacity_targets(c: &KvClient, node: Option<&str>) -> anyhow::Result<Vec<Target>> {
    let info = c.clone().cluster_info().await?;
    let mut members: Vec<(String, String)> = info
        .members
        .iter()
        .map(|m| (m.node_id.clone(), m.grpc_addr.clone()))
        .collect();
    if members.is_empty() {
        members.push((info.node_id.clone(), String::new()));
    }
    if let Some(want) = node {
        members.retain(|(id, _)| id == want);
        if members.is_empty() {
            let ids: Vec<&str> = info.members.iter().map(|m| m.node_id.as_str()).collect();
            bail!(
                "no member {want:?} in the cluster of {}; members: {}",
                c.endpoint(),
                ids.join(", ")
            );
        }
    }
    let opts = c.options().clone();
    let targets = members.into_iter().map(|(id, addr)| {
        let (opts, this) = (opts.clone(), (id == info.node_id).then(|| c.clone()));
        async move {
            let client = match this {
                Some(c) => Ok(c),
                None => KvClient::connect(&format!("http://{addr}"), opts)
                    .await
                    .with_context(|| format!("connecting to {id} at {addr}")),
            };
            Target {
                node_id: id,
                client,
            }
        }
    });
    Ok(futures::future::join_all(targets).await)
}

async fn capacity(c: &mut KvClient, action: CapacityCommand) -> anyhow::Result<()> {
    use kvshare_core::size::format_size;
    match action {
        CapacityCommand::Get { node, json } => {
            let targets = capacity_targets(c, node.as_deref()).await?;
            let answers = futures::future::join_all(targets.into_iter().map(async |t| {
                let r = match t.client {
                    Ok(mut c) => c.stats_top(1).await.map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                (t.node_id, r)
            }))
            .await;
            let mut failed = 0;
            let mut rows = Vec::new();
            for (id, r) in answers {
                match r {
                    Ok(s) => {
                        if !json {
                            let pct =
                                100.0 * s.stored_bytes as f64 / s.capacity_bytes.max(1) as f64;
                            println!(
                                "{id:<20} capacity {:>12}  stored {:>12} ({pct:.1}%)",
                                format_size(s.capacity_bytes),
                                format_size(s.stored_bytes)
                            );
                        }
                        rows.push(json!({"node_id": id, "capacity_bytes": s.capacity_bytes, "stored_bytes": s.stored_bytes}));
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{id}: {e:#}");
                        rows.push(json!({"node_id": id, "error": format!("{e:#}")}));
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
            if failed > 0 {
                bail!("{failed} node(s) did not answer");
            }
            Ok(())
        }
        CapacityCommand::Set { size, node, json } => {
            let targets = capacity_targets(c, node.as_deref()).await?;
            let answers = futures::future::join_all(targets.into_iter().map(async |t| {
                let t0 = std::time::Instant::now();
                let r = match t.client {
                    Ok(mut c) => c.set_capacity(size).await.map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                (t.node_id, r, t0.elapsed())
            }))
            .await;
            let mut failed = 0;
            let mut rows = Vec::new();
            for (id, r, took) in answers {
                match r {
                    Ok(a) => {
                        if !json {
                            println!(
                                "{id:<20} {} -> {}: evicted {} blocks, stored {} ({} ms)",
                                format_size(a.old_capacity_bytes),
                                format_size(a.new_capacity_bytes),
                                a.evicted_blocks,
                                format_size(a.stored_bytes),
                                took.as_millis()
                            );
                        }
                        rows.push(json!({
                            "node_id": id,
                            "old_capacity_bytes": a.old_capacity_bytes,
                            "new_capacity_bytes": a.new_capacity_bytes,
                            "evicted_blocks": a.evicted_blocks,
                            "stored_bytes": a.stored_bytes,
                            "millis": took.as_millis() as u64,
                        }));
                    }
                    Err(e) => {
                        failed += 1;
                        eprintln!("{id}: capacity not changed: {e:#}");
                        rows.push(json!({"node_id": id, "error": format!("{e:#}")}));
                    }
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            }
            if failed > 0 {
                bail!("{failed} node(s) kept their old capacity (errors above)");
            }
            Ok(())
        }
    }
}

/// Runs `kvshare-bench` (next to this binary) with `args`, and exits with its status.
fn bench(args: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?.with_file_name("kvshare-bench");
    let status = std::process::Command::new(&exe)
        .args(args)
        .status()
        .with_context(|| {
            format!(
                "running {} (build it with cargo build --release -p kvshare-bench)",
                exe.display()
            )
        })?;
    std::process::exit(status.code().unwrap_or(1));
}

fn hash(prompt: &PromptArgs, as_json: bool) -> anyhow::Result<()> {
    let (ns, tokens) = prompt.resolve()?;
    let keys = ns.block_keys(&tokens)?;
    let root = match &ns.scheme {
        KeyScheme::VllmSha256Cbor(p) => p.none_hash(),
        KeyScheme::Chained => ns.digest(),
    };
    let keys_hex: Vec<String> = keys.iter().map(|k| k.to_hex()).collect();
    if as_json {
        let v = json!({
            "scheme": ns.scheme.name(),
            "block_tokens": ns.layout.tokens_per_block,
            "tokens": tokens.len(),
            "root": root.to_hex(),
            "namespace": ns.digest().to_hex(),
            "block_hashes": keys_hex,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("scheme     {}", ns.scheme.name());
        println!(
            "root       {}  ({})",
            root,
            if matches!(ns.scheme, KeyScheme::Chained) {
                "namespace digest"
            } else {
                "none_hash"
            }
        );
        println!(
            "tokens     {} ({} full blocks of {}; a partial tail is not hashed)",
            tokens.len(),
            keys.len(),
            ns.layout.tokens_per_block
        );
        for (i, k) in keys_hex.iter().enumerate() {
            println!("block {i:<4} {k}");
        }
    }
    Ok(())
}

fn stats_json(s: &pb::StatsResponse) -> serde_json::Value {
    json!({
        "node_id": s.node_id,
        "capacity_bytes": s.capacity_bytes,
        "stored_bytes": s.stored_bytes,
        "stored_blocks": s.stored_blocks,
        "stored_raw_bytes": s.stored_raw_bytes,
        "lookups": s.lookups,
        "hits": s.hits,
        "misses": s.misses,
        "puts_stored": s.puts_stored,
        "puts_present": s.puts_present,
        "puts_rejected": s.puts_rejected,
        "evictions": s.evictions,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
        "deletes": s.deletes,
        "uptime_seconds": s.uptime_seconds,
        "namespaces_total": s.namespaces_total,
        "namespaces": s.namespaces.iter().map(|n| json!({
            "namespace": hex::encode(&n.namespace), "blocks": n.blocks, "bytes": n.bytes, "hits": n.hits,
        })).collect::<Vec<_>>(),
    })
}

async fn status(c: &mut KvClient) -> anyhow::Result<()> {
    use kvshare_core::size::format_size;
    let healthy = c.health().await.unwrap_or(false);
    let info = c.cluster_info().await?;
    println!("endpoint   {} (node {})", c.endpoint(), info.node_id);
    println!(
        "health     {}",
        if healthy { "SERVING" } else { "NOT SERVING" }
    );
    println!("placement  {} (replicas {})", info.placement, info.replicas);
    println!(
        "{:<20} {:<22} {:<6} {:>10} {:>12} {:>12} {:>9}",
        "member", "grpc", "health", "blocks", "stored", "capacity", "hit rate"
    );
    // Ask each member for its own numbers, in parallel, with a short deadline (members the CLI
    // cannot reach show dashes).
    let opts = ClientOptions {
        timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ..c.options().clone()
    };
    let all_stats = futures::future::join_all(info.members.iter().map(|m| {
        let (opts, addr, healthy) = (opts.clone(), m.grpc_addr.clone(), m.healthy);
        async move {
            if !healthy {
                return None;
            }
            let mut mc = KvClient::connect(&format!("http://{addr}"), opts)
                .await
                .ok()?;
            mc.stats().await.ok()
        }
    }))
    .await;
    for (m, stats) in info.members.iter().zip(all_stats) {
        let (blocks, stored, cap, rate) = match &stats {
            Some(s) => (
                s.stored_blocks.to_string(),
                format_size(s.stored_bytes),
                format_size(s.capacity_bytes),
                hit_pct(s).map_or("-".into(), |p| format!("{p:.1}%")),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<20} {:<22} {:<6} {:>10} {:>12} {:>12} {:>9}",
            m.node_id,
            m.grpc_addr,
            if m.healthy { "up" } else { "down" },
            blocks,
            stored,
            cap,
            rate
        );
    }
    Ok(())
}

/// Percentage of lookups that hit, when there were any.
fn hit_pct(s: &pb::StatsResponse) -> Option<f64> {
    let total = s.hits + s.misses;
    (total > 0).then(|| 100.0 * s.hits as f64 / total as f64)
}

fn print_usage(s: &pb::StatsResponse) {
    use kvshare_core::size::format_size;
    let pct = if s.capacity_bytes > 0 {
        100.0 * s.stored_bytes as f64 / s.capacity_bytes as f64
    } else {
        0.0
    };
    println!(
        "stored     {} of {} ({pct:.1}%), {} blocks, {} raw",
        format_size(s.stored_bytes),
        format_size(s.capacity_bytes),
        s.stored_blocks,
        format_size(s.stored_raw_bytes)
    );
    println!(
        "traffic    {} lookups, {} hits / {} misses ({:.1}% hit), {} evictions, in {} out {}",
        s.lookups,
        s.hits,
        s.misses,
        hit_pct(s).unwrap_or(0.0),
        s.evictions,
        format_size(s.bytes_in),
        format_size(s.bytes_out)
    );
}

async fn stats(c: &mut KvClient, as_json: bool, top: u32) -> anyhow::Result<()> {
    let s = c.stats_top(top).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&stats_json(&s))?);
    } else {
        println!("node       {}", s.node_id);
        print_usage(&s);
        print_namespaces(&s);
    }
    Ok(())
}

/// The node's namespace count and its top namespaces (largest first).
fn print_namespaces(s: &pb::StatsResponse) {
    use kvshare_core::size::format_size;
    println!(
        "namespaces {} stored, top {} by bytes and hits:",
        s.namespaces_total,
        s.namespaces.len()
    );
    for n in &s.namespaces {
        println!(
            "  {:<16} {:>10} blocks {:>12} {:>12} hits",
            hex::encode(n.namespace.get(..8).unwrap_or(&n.namespace)),
            n.blocks,
            format_size(n.bytes),
            n.hits
        );
    }
}

async fn lookup(c: &mut KvClient, prompt: &PromptArgs) -> anyhow::Result<()> {
    let (ns, tokens) = prompt.resolve()?;
    let r = c.lookup(&ns, &tokens).await?;
    let tpb = ns.tokens_per_block();
    println!(
        "cached prefix: {} of {} blocks ({} of {} tokens)",
        r.hit_blocks,
        r.keys.len(),
        r.hit_blocks * tpb,
        tokens.len()
    );
    Ok(())
}

async fn put(c: &mut KvClient, prompt: &PromptArgs, kv_file: &Path) -> anyhow::Result<()> {
    let (ns, tokens) = prompt.resolve()?;
    let data = std::fs::read(kv_file).with_context(|| format!("reading {}", kv_file.display()))?;
    let bb = ns.layout.block_bytes() as usize;
    if data.is_empty() || data.len() % bb != 0 {
        bail!(
            "{} has {} bytes; a block of this layout is {bb} bytes, so the file must hold a whole number of blocks",
            kv_file.display(),
            data.len()
        );
    }
    let blocks: Vec<&[u8]> = data.chunks(bb).collect();
    let report = c.put_prefix(&ns, &tokens, &blocks).await?;
    for (i, o) in report.outcomes.iter().enumerate() {
        let what = match &o.status {
            PutStatus::Stored => "stored".to_string(),
            PutStatus::AlreadyPresent => "already present".to_string(),
            PutStatus::Rejected { code, reason } => format!("rejected ({code:?}): {reason}"),
        };
        println!("block {i:<4} {}  {what}", o.key);
    }
    println!(
        "{} stored, {} already present; {} raw bytes sent as {} ({:.2}x)",
        report.stored(),
        report.already_present(),
        report.raw_bytes,
        report.wire_bytes,
        report.raw_bytes as f64 / report.wire_bytes.max(1) as f64
    );
    Ok(())
}

async fn get(c: &mut KvClient, prompt: &PromptArgs, out: &Path) -> anyhow::Result<()> {
    let (ns, tokens) = prompt.resolve()?;
    let blocks = c.get_prefix(&ns, &tokens).await?;
    let data: Vec<u8> = blocks.concat();
    std::fs::write(out, &data).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} verified blocks ({} tokens, {} bytes) to {}",
        blocks.len(),
        blocks.len() * ns.tokens_per_block(),
        data.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_kept_but_never_printed() {
        let cli =
            Cli::try_parse_from(["kvshare", "--token", "cl1-s3cret", "status"]).expect("parse");
        assert_eq!(cli.token.as_ref().map(|t| t.expose()), Some("cl1-s3cret"));
        let shown = format!("{cli:?}");
        assert!(!shown.contains("cl1-s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}

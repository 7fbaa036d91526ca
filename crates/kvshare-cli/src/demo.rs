//! `kvshare demo`: an embedded local cluster (3 nodes, 2 replicas per block) plus inference
//! workers (a real Llama-style transformer, `kvshare-worker`) serving requests that share long
//! prefixes: a system prompt, one of three documents, a different question each time.
//!
//! Every request runs twice on its worker: once without the cache tier (full prefill, the
//! baseline) and once with it (lookup, fetch, prefill of the rest, push). The table compares
//! the two times to first token and checks the generated tokens are the same.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kvshare_client::{ClientOptions, ClusterClient};
use kvshare_core::size::{format_size, parse_size};
use kvshare_core::{Codec, DType};
use kvshare_server::ServerConfig;
use kvshare_worker::{CacheMode, Model, ModelConfig, RequestReport, Worker, tokenizer};

/// Text the demo's prompts are cut from (byte-level tokens).
static CORPUS: &str = concat!(
    include_str!("../../../docs/design.md"),
    include_str!("../../../docs/cluster.md"),
);

/// Options of the demo.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Requests to serve in total (round-robin over the workers).
    #[arg(long, default_value_t = 12)]
    requests: usize,
    /// Inference workers, each with its own connection to the cluster.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Capacity of each embedded node.
    #[arg(long, default_value = "256MiB")]
    capacity: String,
    /// Embedded cache nodes (a local cluster with 2 replicas per block when > 1).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Codec workers compress blocks with.
    #[arg(long, value_enum, default_value = "byteplane-huff")]
    codec: Codec,
    /// K/V dtype of the cache and the blocks: f32, f16, bf16.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DType,
    /// Model preset (seeded random weights): tiny, small, medium.
    #[arg(long, default_value = "small")]
    model: String,
    /// Positions per block.
    #[arg(long, default_value_t = 64)]
    tokens_per_block: u32,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 8)]
    max_new_tokens: usize,
    /// Length of the shared system prompt, in tokens.
    #[arg(long, default_value_t = 512)]
    system_tokens: usize,
    /// Length of each document, in tokens.
    #[arg(long, default_value_t = 1024)]
    document_tokens: usize,
    /// Keep the nodes (and their HTTP endpoints and dashboards) up this many seconds after the load.
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

/// The `len` bytes of the corpus starting at `start` (wrapping), as tokens.
fn corpus_tokens(start: usize, len: usize) -> Vec<u32> {
    let b = CORPUS.as_bytes();
    (0..len)
        .map(|i| u32::from(b[(start + i) % b.len()]))
        .collect()
}

/// A prompt: shared system prompt, one of three documents, then a question of its own.
fn prompt(args: &DemoArgs, request: usize) -> (Vec<u32>, usize) {
    let doc = request % 3;
    let mut t =
        tokenizer::encode("System: you are a helpful assistant answering from the document.\n");
    t.extend(corpus_tokens(0, args.system_tokens.saturating_sub(t.len())));
    t.extend(corpus_tokens(
        4096 + doc * (args.document_tokens + 997),
        args.document_tokens,
    ));
    let question = format!(
        "\nQuestion {request}: what does section {} say about {}?\nAnswer:",
        request * 7 % 23,
        ["eviction", "replication", "codecs", "lookups", "namespaces"][request % 5]
    );
    t.extend(tokenizer::encode(&question));
    (t, doc)
}

struct Row {
    request: usize,
    worker: usize,
    doc: usize,
    cold: RequestReport,
    warm: RequestReport,
    same_tokens: bool,
}

async fn start_cluster(args: &DemoArgs) -> anyhow::Result<Vec<kvshare_server::NodeHandle>> {
    let capacity = parse_size(&args.capacity)?;
    let n_nodes = args.nodes.max(1);
    // Reserve loopback ports so every node can list all peers from the start.
    let ports: Vec<u16> = (0..n_nodes)
        .map(|_| kvshare_testkit::free_port())
        .collect::<Result<_, _>>()?;
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut config = ServerConfig::local(capacity);
        config.grpc_addr = format!("127.0.0.1:{port}").parse()?;
        config.node_id = Some(format!("demo-node-{i}"));
        config.peers = if n_nodes > 1 { peers.clone() } else { vec![] };
        config.peer_health_interval_ms = 200;
        nodes.push(
            kvshare_server::start(config)
                .await
                .context("starting an embedded node")?,
        );
    }
    // Wait until every node sees every other one.
    let t0 = Instant::now();
    while nodes
        .iter()
        .any(|n| n.state.cluster.view().members().len() < n_nodes)
    {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "embedded nodes did not find each other"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(nodes)
}

fn print_cluster(nodes: &[kvshare_server::NodeHandle]) {
    println!(
        "kvshare demo: embedded cluster of {} node(s), {} replica(s) per block (HTTP endpoints up while the demo runs)",
        nodes.len(),
        nodes.first().map_or(0, |n| n.state.cluster.replicas())
    );
    for n in nodes {
        println!(
            "  {:<12} gRPC {}  dashboard http://{}/dashboard  metrics http://{}/metrics",
            n.state.node_id,
            n.endpoint(),
            n.http_addr,
            n.http_addr
        );
    }
}

/// One worker per `args.workers`, sharing one model, each bootstrapping from a different node
/// (and routing to owners itself).
async fn start_workers(
    args: &DemoArgs,
    model: Arc<Model>,
    nodes: &[kvshare_server::NodeHandle],
) -> anyhow::Result<Vec<Worker>> {
    let endpoints: Vec<String> = nodes.iter().map(|n| n.endpoint()).collect();
    let mut workers = Vec::new();
    for w in 0..args.workers.max(1) {
        let client = ClusterClient::connect(
            &[endpoints[w % endpoints.len()].clone()],
            ClientOptions {
                codec: args.codec,
                ..ClientOptions::default()
            },
        )
        .await?;
        workers.push(Worker::new(
            model.clone(),
            args.dtype,
            args.tokens_per_block,
            args.codec,
            Some(client),
        )?);
    }
    Ok(workers)
}

fn print_setup(args: &DemoArgs, cfg: &ModelConfig, build_secs: f64, workers: &[Worker]) {
    let layout = workers[0].namespace().layout;
    println!(
        "  model {} ({} layers, d={}, {} heads / {} K/V heads, {:.1} M params, seeded weights, built in {:.1} s)",
        cfg.name,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        (cfg.non_embedding_params() + 2 * (cfg.vocab_size * cfg.hidden_size) as u64) as f64 / 1e6,
        build_secs
    );
    println!(
        "  {} workers, {} requests: {}-token system prompt + 1 of 3 {}-token documents + a question; K/V {} in {}-token blocks ({}), codec {}\n",
        workers.len(),
        args.requests,
        args.system_tokens,
        args.document_tokens,
        args.dtype.name(),
        layout.tokens_per_block,
        format_size(layout.block_bytes()),
        args.codec,
    );
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    kvshare_worker::tune_allocator();
    let nodes = start_cluster(&args).await?;
    print_cluster(&nodes);
    let cfg = ModelConfig::preset(&args.model)?;
    let t = Instant::now();
    let model = Arc::new(Model::random(&cfg, 42)?);
    let build_secs = t.elapsed().as_secs_f64();
    let workers = start_workers(&args, model, &nodes).await?;
    print_setup(&args, &cfg, build_secs, &workers);
    let rows = serve(&args, &workers).await?;
    summarise(&rows, &nodes);
    if args.hold > 0 {
        println!(
            "\nholding the cluster for {} s: open http://{}/dashboard",
            args.hold, nodes[0].http_addr
        );
        tokio::time::sleep(Duration::from_secs(args.hold)).await;
    }
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await?;
    }
    println!("demo finished; nodes stopped cleanly");
    Ok(())
}

/// Serves the requests round-robin, each without and then with the cache tier, printing a
/// row per request.
async fn serve(args: &DemoArgs, workers: &[Worker]) -> anyhow::Result<Vec<Row>> {
    println!(
        "{:>3} {:>6} {:>3} {:>6} {:>6} {:>5} {:>12} {:>12} {:>7} {:>10} {:>6} {:>6}",
        "req",
        "worker",
        "doc",
        "prompt",
        "cached",
        "hit%",
        "TTFT no-tier",
        "TTFT w/ tier",
        "speedup",
        "fetched",
        "ratio",
        "same"
    );
    let mut rows = Vec::new();
    for r in 0..args.requests {
        let w = r % workers.len();
        let (tokens, doc) = prompt(args, r);
        let cold = workers[w]
            .generate(&tokens, args.max_new_tokens, CacheMode::Off)
            .await?;
        let warm = workers[w]
            .generate(&tokens, args.max_new_tokens, CacheMode::ReadWrite)
            .await?;
        let row = Row {
            request: r,
            worker: w,
            doc,
            same_tokens: cold.tokens == warm.tokens && cold.logits == warm.logits,
            cold: cold.report,
            warm: warm.report,
        };
        print_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

fn print_row(r: &Row) {
    let w = &r.warm;
    let ratio = if w.fetched_wire_bytes > 0 {
        w.fetched_raw_bytes as f64 / w.fetched_wire_bytes as f64
    } else {
        w.pushed_raw_bytes as f64 / w.pushed_wire_bytes.max(1) as f64
    };
    println!(
        "{:>3} {:>6} {:>3} {:>6} {:>6} {:>4.0}% {:>9.1} ms {:>9.1} ms {:>6.2}x {:>10} {:>5.2}x {:>6}",
        r.request,
        r.worker,
        r.doc,
        w.prompt_tokens,
        w.cached_tokens,
        100.0 * w.cached_tokens as f64 / w.prompt_tokens.max(1) as f64,
        r.cold.ttft_ms,
        w.ttft_ms,
        r.cold.ttft_ms / w.ttft_ms.max(1e-3),
        format_size(w.fetched_wire_bytes),
        ratio,
        if r.same_tokens { "yes" } else { "NO" }
    );
}

fn summarise(rows: &[Row], nodes: &[kvshare_server::NodeHandle]) {
    let sum = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>();
    let prompt = sum(&|r| r.warm.prompt_tokens as f64);
    let cached = sum(&|r| r.warm.cached_tokens as f64);
    let cold = sum(&|r| r.cold.ttft_ms);
    let warm = sum(&|r| r.warm.ttft_ms);
    let raw = sum(&|r| (r.warm.fetched_raw_bytes + r.warm.pushed_raw_bytes) as f64);
    let wire = sum(&|r| (r.warm.fetched_wire_bytes + r.warm.pushed_wire_bytes) as f64);
    let fetched = sum(&|r| r.warm.fetched_wire_bytes as f64);
    let same = rows.iter().filter(|r| r.same_tokens).count();
    println!(
        "\ntokens: {cached} of {prompt} prompt tokens came from the cache ({:.1}%): that prefill was skipped",
        100.0 * cached / prompt.max(1.0)
    );
    println!(
        "TTFT:   {:.0} ms in total with the tier vs {:.0} ms without ({:.2}x); {same} of {} answers identical to the no-cache run",
        warm,
        cold,
        cold / warm.max(1e-3),
        rows.len()
    );
    println!(
        "bytes:  {} fetched; {} of K/V moved as {} on the wire (compression {:.2}x)",
        format_size(fetched as u64),
        format_size(raw as u64),
        format_size(wire as u64),
        raw / wire.max(1.0)
    );
    for n in nodes {
        let s = n.state.stats(0);
        println!(
            "{:<12} {} blocks, {} of {} stored; {} lookups answered, {} evictions",
            n.state.node_id,
            s.stored_blocks,
            format_size(s.stored_bytes),
            format_size(s.capacity_bytes),
            s.lookups,
            s.evictions
        );
    }
}

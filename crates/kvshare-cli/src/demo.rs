//! `kvshare demo`: an embedded local cluster (3 nodes, R=2) plus simulated workers that share
//! long prefixes, routing with the cluster-aware client.
//!
//! Every request is a system prompt + a document + a question. The K/V payloads are real
//! activations (tests/data/kv-bf16-256tok.bin, compiled in), so the compression figures are
//! real; the inference itself is simulated here (the `kvshare-worker` crate runs a model).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use kvshare_client::{ClientOptions, ClusterClient, PutItem};
use kvshare_core::sample::KvSample;
use kvshare_core::size::{format_size, parse_size};
use kvshare_core::{Codec, DType, EncodedBlock, KvLayout, Namespace};
use kvshare_server::ServerConfig;

static KV_BF16: &[u8] = include_bytes!("../../../tests/data/kv-bf16-256tok.bin");
static TOKENS: &[u8] = include_bytes!("../../../tests/data/tokens-256.u32");

/// Options of the demo.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Requests to serve in total.
    #[arg(long, default_value_t = 24)]
    requests: usize,
    /// Simulated workers (each with its own connection), serving requests concurrently.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Capacity of each embedded node.
    #[arg(long, default_value = "256MiB")]
    capacity: String,
    /// Embedded cache nodes (a local cluster with 2 replicas per block when > 1).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Codec workers compress blocks with.
    #[arg(long, default_value = "byteplane-zstd")]
    codec: String,
    /// Keep the nodes (and their HTTP endpoints and dashboards) up this many seconds after the load.
    #[arg(long, default_value_t = 0)]
    hold: u64,
}

struct Row {
    request: usize,
    worker: usize,
    prompt_tokens: usize,
    cached_tokens: usize,
    wire_in: u64,
    raw_in: u64,
    wire_out: u64,
    raw_out: u64,
    lookup: Duration,
    fetch: Duration,
}

fn layout() -> KvLayout {
    // all-MiniLM-L6-v2: 6 layers, 12 heads of 32 dims; bf16; 16-token blocks (147,456 bytes).
    KvLayout {
        num_layers: 6,
        num_kv_heads: 12,
        head_dim: 32,
        dtype: DType::BF16,
        tokens_per_block: 16,
    }
}

/// A prompt: shared system prompt, one of a few documents, then a per-request question.
fn prompt(request: usize, corpus: &[u32]) -> (Vec<u32>, usize) {
    let system = &corpus[..64];
    let doc = request % 3; // three documents, reused round-robin
    let doc_tokens = &corpus[64 + doc * 48..64 + doc * 48 + 96.min(corpus.len() - 64 - doc * 48)];
    let mut t: Vec<u32> = system.iter().chain(doc_tokens).copied().collect();
    // A 40-token question that differs per request.
    t.extend((0..40u32).map(|i| 1000 + (request as u32) * 64 + i));
    (t, doc)
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let codec = Codec::parse(&args.codec)?;
    let capacity = parse_size(&args.capacity)?;
    let n_nodes = args.nodes.max(1);
    // Reserve loopback ports so every node can list all peers from the start.
    let ports: Vec<u16> = (0..n_nodes)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
        })
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
        .any(|n| n.state.cluster.view().members.len() < n_nodes)
    {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "embedded nodes did not find each other"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "kvshare demo: embedded cluster of {n_nodes} node(s), {} replica(s) per block",
        nodes[0].state.cluster.replicas()
    );
    for n in &nodes {
        println!(
            "  {:<12} gRPC {}  dashboard http://{}/dashboard",
            n.state.node_id,
            n.endpoint(),
            n.http_addr
        );
    }
    println!(
        "  workload {} requests from {} workers (cluster-aware clients); system prompt + 1 of 3 documents + a question; real bf16 K/V, codec {codec}\n",
        args.requests, args.workers
    );

    let corpus: Vec<u32> = TOKENS
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let ns = Namespace::new("sentence-transformers/all-MiniLM-L6-v2 (demo)", layout());
    let sample = Arc::new(KvSample::new(KV_BF16, layout())?);
    let endpoints: Vec<String> = nodes.iter().map(|n| n.endpoint()).collect();
    let workers = args.workers.max(1);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (ns, sample, corpus) = (ns.clone(), sample.clone(), corpus.clone());
        // Each worker bootstraps from a different node.
        let endpoint = vec![endpoints[w % endpoints.len()].clone()];
        let requests: Vec<usize> = (0..args.requests).filter(|r| r % workers == w).collect();
        tasks.push(tokio::spawn(async move {
            let client = ClusterClient::connect(
                &endpoint,
                ClientOptions {
                    codec,
                    ..Default::default()
                },
            )
            .await?;
            let mut rows = Vec::new();
            for r in requests {
                rows.push(serve(&client, codec, &ns, &sample, &corpus, r, w).await?);
                // Stagger the workers so later requests can reuse earlier ones' prefixes.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(rows)
        }));
    }
    let mut rows = Vec::new();
    for t in tasks {
        rows.extend(t.await.context("worker task")??);
    }
    rows.sort_by_key(|r| r.request);

    println!(
        "{:>4} {:>6} {:>7} {:>7} {:>6} {:>11} {:>11} {:>6} {:>10} {:>9}",
        "req",
        "worker",
        "prompt",
        "cached",
        "hit%",
        "fetched",
        "pushed",
        "ratio",
        "lookup ms",
        "fetch ms"
    );
    let (mut prompt_total, mut cached_total, mut raw_in, mut wire_in, mut raw_out, mut wire_out) =
        (0, 0, 0, 0, 0, 0);
    for r in &rows {
        let ratio = (r.raw_in + r.raw_out) as f64 / (r.wire_in + r.wire_out).max(1) as f64;
        println!(
            "{:>4} {:>6} {:>7} {:>7} {:>5.0}% {:>11} {:>11} {:>5.2}x {:>10.2} {:>9.2}",
            r.request,
            r.worker,
            r.prompt_tokens,
            r.cached_tokens,
            100.0 * r.cached_tokens as f64 / r.prompt_tokens as f64,
            format_size(r.wire_in),
            format_size(r.wire_out),
            ratio,
            r.lookup.as_secs_f64() * 1e3,
            r.fetch.as_secs_f64() * 1e3,
        );
        prompt_total += r.prompt_tokens;
        cached_total += r.cached_tokens;
        raw_in += r.raw_in;
        wire_in += r.wire_in;
        raw_out += r.raw_out;
        wire_out += r.wire_out;
    }
    println!(
        "\ntokens: {cached_total} of {prompt_total} prompt tokens came from the cache ({:.1}%): that prefill was skipped",
        100.0 * cached_total as f64 / prompt_total.max(1) as f64
    );
    println!(
        "bytes:  fetched {} of K/V as {} on the wire, pushed {} as {} (compression {:.2}x)",
        format_size(raw_in),
        format_size(wire_in),
        format_size(raw_out),
        format_size(wire_out),
        (raw_in + raw_out) as f64 / (wire_in + wire_out).max(1) as f64
    );
    for n in &nodes {
        let s = n.state.stats();
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

async fn serve(
    client: &ClusterClient,
    codec: Codec,
    ns: &Namespace,
    sample: &KvSample<'_>,
    corpus: &[u32],
    request: usize,
    worker: usize,
) -> anyhow::Result<Row> {
    let (tokens, doc) = prompt(request, corpus);
    let t0 = Instant::now();
    let lookup = client.lookup(ns, &tokens).await?;
    let t_lookup = t0.elapsed();
    let hit = lookup.hit_blocks;
    let t1 = Instant::now();
    let fetched = client.get_blocks(&ns.digest(), &lookup.keys[..hit]).await?;
    let (mut wire_in, mut raw_in) = (0, 0);
    for b in fetched.into_iter().flatten() {
        wire_in += b.payload.len() as u64;
        raw_in += b.decode()?.len() as u64;
    }
    let t_fetch = t1.elapsed();
    // "Prefill" the rest: the K/V of block i is the sample's K/V at a position that depends on
    // the block's content (document and offset), standing in for the model's output.
    let tpb = ns.tokens_per_block();
    let mut items = Vec::new();
    for i in hit..lookup.keys.len() {
        let start = if i < 4 {
            i * tpb
        } else {
            64 + doc * 48 + (i - 4) * tpb + request * 7
        };
        let raw = sample.block(start);
        let block = EncodedBlock::encode(ns.digest(), ns.layout, codec, &raw)?;
        items.push(PutItem {
            key: lookup.keys[i],
            parent: i.checked_sub(1).map(|p| lookup.keys[p]),
            block,
        });
    }
    let report = client.put_blocks(items).await?;
    Ok(Row {
        request,
        worker,
        prompt_tokens: tokens.len(),
        cached_tokens: hit * tpb,
        wire_in,
        raw_in,
        wire_out: report.wire_bytes,
        raw_out: report.raw_bytes,
        lookup: t_lookup,
        fetch: t_fetch,
    })
}

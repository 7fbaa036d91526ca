//! Prefix-sharing trace: many workers, Zipf-popular system prompts and documents, each request
//! = system prompt + document + its own question. Workers look up, fetch the cached prefix, and
//! push the blocks they had to compute. The node's capacity is below the working set, so the
//! cache fills and evicts; we report hit rate over time and the bytes and prefill saved.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use kvshare_client::{ClientOptions, KvClient, PutItem};
use kvshare_core::size::format_size;
use kvshare_core::{Codec, DType, EncodedBlock, KvLayout, Namespace};
use rand::Rng;
use rand::SeedableRng;
use serde::Serialize;

use crate::Args;
use crate::procs::Node;
use crate::throughput::kv_block;

/// Hit rate of one window of requests.
#[derive(Debug, Clone, Serialize)]
pub struct Window {
    /// Requests completed before this window ended.
    pub requests: usize,
    /// Cached prompt tokens / prompt tokens, in this window.
    pub token_hit_rate: f64,
    /// Node's stored bytes at the end of the window.
    pub stored_bytes: u64,
}

/// Trace results.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    /// Requests served.
    pub requests: usize,
    /// Concurrent workers.
    pub workers: usize,
    /// Node capacity.
    pub capacity_bytes: u64,
    /// Raw K/V bytes of all distinct blocks the trace touched (the working set).
    pub working_set_bytes: u64,
    /// Overall token hit rate.
    pub token_hit_rate: f64,
    /// Raw K/V bytes fetched instead of recomputed.
    pub raw_bytes_saved: u64,
    /// Bytes on the wire for those fetches.
    pub wire_bytes_fetched: u64,
    /// Evictions at the end.
    pub evictions: u64,
    /// Hit rate over time.
    pub windows: Vec<Window>,
    /// Seconds.
    pub seconds: f64,
}

fn zipf_sampler(n: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x / total;
            acc
        })
        .collect()
}

fn draw(cdf: &[f64], rng: &mut impl Rng) -> usize {
    let u: f64 = rng.random();
    cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
}

/// The trace's shape: its namespace, the popularity of prompts, and how many requests.
struct Trace {
    ns: Namespace,
    codec: Codec,
    systems: usize,
    docs: usize,
    requests: usize,
    workers: usize,
    capacity: u64,
    sys_cdf: Vec<f64>,
    doc_cdf: Vec<f64>,
    /// Requests handed out so far (shared by the workers).
    next: AtomicUsize,
}

/// What one request did.
struct Served {
    request: usize,
    hit_tokens: usize,
    prompt_tokens: usize,
    raw_fetched: u64,
    wire_fetched: u64,
}

impl Trace {
    fn new(args: &Args) -> Trace {
        // 2 layers x 4 KV heads x 64 dims, bf16, 16-token blocks: 16 KiB per block.
        let layout = KvLayout {
            num_layers: 2,
            num_kv_heads: 4,
            head_dim: 64,
            dtype: DType::BF16,
            tokens_per_block: 16,
        };
        let (systems, docs, requests, workers) = if args.quick {
            (10, 100, 1200, 8)
        } else {
            (20, 400, 6000, 16)
        };
        Trace {
            ns: Namespace::new("bench-trace", layout),
            codec: args.codec,
            systems,
            docs,
            requests,
            workers,
            capacity: if args.quick { 24 << 20 } else { 64 << 20 },
            sys_cdf: zipf_sampler(systems, 1.1),
            doc_cdf: zipf_sampler(docs, 0.9),
            next: AtomicUsize::new(0),
        }
    }

    /// Raw K/V bytes of all distinct blocks the trace can touch.
    fn working_set_bytes(&self) -> u64 {
        let distinct_blocks =
            self.systems * 16 + self.systems.min(self.docs) * self.docs * 32 + self.requests * 4;
        distinct_blocks as u64 * self.ns.layout.block_bytes()
    }

    /// One worker: takes requests until all are handed out.
    async fn worker(self: Arc<Self>, w: usize, endpoint: String) -> anyhow::Result<Vec<Served>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64 + 1);
        let mut c = KvClient::connect(
            &endpoint,
            ClientOptions {
                codec: self.codec,
                // For nodes that run with --auth-file.
                token: std::env::var("KVSHARE_TOKEN").ok(),
                ..crate::procs::client_options()
            },
        )
        .await?;
        let mut log = Vec::new();
        loop {
            let r = self.next.fetch_add(1, Ordering::Relaxed);
            if r >= self.requests {
                break;
            }
            let (s, d) = (draw(&self.sys_cdf, &mut rng), draw(&self.doc_cdf, &mut rng));
            log.push(self.serve(&mut c, r, s, d).await?);
        }
        Ok(log)
    }

    /// Request `r` on system prompt `s` and document `d`: look up, fetch the cached prefix,
    /// push the blocks it had to compute.
    async fn serve(
        &self,
        c: &mut KvClient,
        r: usize,
        s: usize,
        d: usize,
    ) -> anyhow::Result<Served> {
        // System prompt 256 tokens, document 512 tokens, question 64 tokens.
        let mut tokens: Vec<u32> = (0..256).map(|i| 1_000_000 + s as u32 * 1000 + i).collect();
        tokens.extend((0..512).map(|i| 2_000_000 + d as u32 * 1000 + i));
        tokens.extend((0..64).map(|i| 3_000_000 + r as u32 * 100 + i));
        let ns = &self.ns;
        let lookup = c.lookup(ns, &tokens).await?;
        let got = c
            .get_blocks(&ns.digest(), &lookup.keys[..lookup.hit_blocks])
            .await?;
        let (mut raw, mut wire, mut usable) = (0u64, 0u64, 0usize);
        // A block evicted between lookup and get ends the usable prefix.
        for b in got.iter().map_while(Option::as_ref) {
            wire += b.payload.len() as u64;
            raw += b.decode()?.len() as u64;
            usable += 1;
        }
        let layout = ns.layout;
        let items: Vec<PutItem> = (usable..lookup.keys.len())
            .map(|i| {
                let kv = kv_block(layout.block_bytes() as usize, i * 7 + s + d);
                Ok(PutItem {
                    key: lookup.keys[i],
                    parent: i.checked_sub(1).map(|p| lookup.keys[p]),
                    block: EncodedBlock::encode(ns.digest(), layout, self.codec, &kv)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        c.put_blocks(items).await?;
        Ok(Served {
            request: r,
            hit_tokens: usable * ns.tokens_per_block(),
            prompt_tokens: tokens.len(),
            raw_fetched: raw,
            wire_fetched: wire,
        })
    }
}

/// Token hit rate of some requests.
fn hit_rate(log: &[Served]) -> f64 {
    let hit: usize = log.iter().map(|l| l.hit_tokens).sum();
    let total: usize = log.iter().map(|l| l.prompt_tokens).sum();
    hit as f64 / total.max(1) as f64
}

/// Runs the trace against a fresh node.
pub async fn run(args: &Args) -> anyhow::Result<TraceReport> {
    let trace = Arc::new(Trace::new(args));
    let node = Node::start(&trace.capacity.to_string(), &[]).await?;
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..trace.workers)
        .map(|w| tokio::spawn(trace.clone().worker(w, node.endpoint.clone())))
        .collect();
    let mut log = Vec::new();
    for t in tasks {
        log.extend(t.await??);
    }
    log.sort_by_key(|l| l.request);
    let seconds = t0.elapsed().as_secs_f64();
    let mut c = KvClient::connect(&node.endpoint, crate::procs::client_options()).await?;
    let stats = c.stats().await?;
    node.stop();

    let windows = log
        .chunks((trace.requests / 12).max(1))
        .map(|chunk| Window {
            requests: chunk.last().map_or(0, |l| l.request + 1),
            token_hit_rate: hit_rate(chunk),
            stored_bytes: 0,
        })
        .collect();
    let report = TraceReport {
        requests: trace.requests,
        workers: trace.workers,
        capacity_bytes: trace.capacity,
        working_set_bytes: trace.working_set_bytes(),
        token_hit_rate: hit_rate(&log),
        raw_bytes_saved: log.iter().map(|l| l.raw_fetched).sum(),
        wire_bytes_fetched: log.iter().map(|l| l.wire_fetched).sum(),
        evictions: stats.evictions,
        windows,
        seconds,
    };
    print_report(&report);
    Ok(report)
}

fn print_report(report: &TraceReport) {
    println!(
        "\n== prefix-sharing trace: {} requests from {} workers in {:.1} s; capacity {} vs up to {} of distinct K/V",
        report.requests,
        report.workers,
        report.seconds,
        format_size(report.capacity_bytes),
        format_size(report.working_set_bytes)
    );
    println!(
        "token hit rate {:.1}%; {} of K/V fetched instead of recomputed ({} on the wire); {} evictions",
        100.0 * report.token_hit_rate,
        format_size(report.raw_bytes_saved),
        format_size(report.wire_bytes_fetched),
        report.evictions
    );
    print!("hit rate over time:");
    for w in &report.windows {
        print!(" {:.0}%", 100.0 * w.token_hit_rate);
    }
    println!();
}

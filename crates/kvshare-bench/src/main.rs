//! `kvshare-bench`: measures kvshare against a Redis baseline in the same run.
//!
//! - Throughput: put, get and mixed of 64 KiB .. 4 MiB blocks at concurrency 1, 4, 16, against a
//!   `kvshared` process and a `redis-server` process (loopback, persistence off, one key per
//!   block as LMCache's Redis/Valkey backend stores chunks). kvshare compresses on the client
//!   with the chosen codec; both report raw K/V bytes/s (what a worker receives) and wire bytes/s.
//! - Lookup latency of 128 / 2048 / 8192-block prompts (kvshare `Lookup`, one round trip;
//!   Redis: one pipelined `EXISTS` per block).
//! - A prefix-sharing trace: Zipf-popular system prompts and documents from many workers,
//!   with the cache filling past capacity: hit rate over time and bytes saved.
//! - Memory: RSS of the node against stored bytes once full of 256 KiB blocks.
//!
//! Payloads are real K/V (tests/data, tiled to the block size), never random bytes or zeros.
//!
//! `kvshare-bench ttft` measures the inference workers instead: time to first token of a
//! `kvshare-worker` process with and without reuse of another worker's blocks (see [`ttft`]).

mod chart;
mod procs;
mod throughput;
mod trace;
mod ttft;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kvshare_core::Codec;
use serde::Serialize;

/// Command line: the suite's options, or a subcommand for another bench.
#[derive(Debug, Parser)]
#[command(
    name = "kvshare-bench",
    about = "kvshare benchmarks against a Redis baseline",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(flatten)]
    suite: Args,
    #[command(subcommand)]
    bench: Option<Bench>,
}

/// Benches other than the suite against Redis.
#[derive(Debug, Subcommand)]
enum Bench {
    /// Time to first token of an inference worker, full prefill vs reuse of another worker's
    /// blocks (two `kvshare-worker stdio` processes, an embedded cache node).
    Ttft(ttft::TtftArgs),
}

/// Options of the suite (throughput, lookup latency, trace, memory).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Baseline to run side by side.
    #[arg(long, value_enum, default_value = "redis")]
    pub compare: Baseline,
    /// Quick mode for CI smoke runs (fewer sizes and operations; well under 2 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Codec kvshare clients use.
    #[arg(long, value_enum, default_value = "byteplane-zstd")]
    pub codec: Codec,
    /// Where to write bench.json and bench.svg.
    #[arg(long, default_value = "bench-out")]
    pub out_dir: PathBuf,
    /// Block sizes to test (bytes, comma-separated); default 64KiB,256KiB,1MiB,4MiB.
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<String>,
    /// Concurrency levels (comma-separated); default 1,4,16.
    #[arg(long, value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Raw bytes moved per measurement cell (e.g. 512MiB).
    #[arg(long)]
    pub bytes_per_cell: Option<String>,
    /// Which parts to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "throughput,lookup,trace,memory"
    )]
    pub parts: Vec<Part>,
    /// Serve and connect over TLS (a CA and node certificate generated into OUT_DIR/tls), to
    /// measure what TLS costs against a plaintext run.
    #[arg(long)]
    pub tls: bool,
}

/// The baseline measured next to kvshare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// A private `redis-server` process.
    Redis,
    /// No baseline.
    None,
}

/// A part of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Put, get and mixed throughput.
    Throughput,
    /// Lookup latency of long prompts.
    Lookup,
    /// Prefix-sharing trace.
    Trace,
    /// Node RSS at full capacity.
    Memory,
}

/// Everything measured, as written to bench.json.
#[derive(Debug, Serialize, Default)]
pub struct Report {
    /// Machine description.
    pub machine: String,
    /// Codec of the kvshare side.
    pub codec: String,
    /// Baseline server version (empty without a baseline).
    pub baseline: String,
    /// Throughput cells.
    pub throughput: Vec<throughput::Cell>,
    /// Lookup latency rows.
    pub lookup: Vec<throughput::LookupRow>,
    /// Prefix-sharing trace.
    pub trace: Option<trace::TraceReport>,
    /// Memory check.
    pub memory: Option<throughput::MemoryRow>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.bench {
        Some(Bench::Ttft(args)) => ttft::run(args).await,
        None => suite(cli.suite).await,
    }
}

/// Runs the selected parts of the suite and writes bench.json and bench.svg.
async fn suite(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    if args.tls {
        procs::enable_tls(&args.out_dir.join("tls"))?;
    }
    let mut report = Report {
        machine: machine(),
        codec: args.codec.name().into(),
        ..Default::default()
    };
    println!(
        "kvshare-bench on {}; codec {}{}{}",
        report.machine,
        args.codec,
        if args.quick { " (quick)" } else { "" },
        if args.tls { "; TLS" } else { "" }
    );
    let part = |p: Part| args.parts.contains(&p);

    let redis = if args.compare == Baseline::Redis {
        Some(procs::Redis::start().await?)
    } else {
        None
    };
    if let Some(r) = &redis {
        println!("baseline: {}", r.version);
        report.baseline = r.version.clone();
    }
    if part(Part::Throughput) || part(Part::Lookup) {
        let node = procs::Node::start("4GiB", &[]).await?;
        if part(Part::Throughput) {
            report.throughput = throughput::run(&args, &node, redis.as_ref()).await?;
        }
        if part(Part::Lookup) {
            report.lookup = throughput::lookups(&args, &node, redis.as_ref()).await?;
        }
        node.stop();
    }
    if part(Part::Memory) {
        report.memory = Some(throughput::memory(&args).await?);
    }
    if part(Part::Trace) {
        report.trace = Some(trace::run(&args).await?);
    }
    if let Some(r) = redis {
        r.stop();
    }

    let json = args.out_dir.join("bench.json");
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    let svg = args.out_dir.join("bench.svg");
    std::fs::write(&svg, chart::render(&report))?;
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}

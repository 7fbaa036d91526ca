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
//! - Lookup beside a throughput cell (`--parts lookup-loaded`): 2,048-block lookup latency idle
//!   and while gets/puts run in the same process, `--repeat` runs, median and each run.
//! - Shaped links (`--link 2gbit,5gbit`): get and put cells across a tbf-shaped veth pair
//!   between two network namespaces, after measuring what the link really delivers (see
//!   [`netns`]); with `--parts secure`, the auth/TLS comparison across each link too.
//! - Auth and TLS cost (`--parts secure`): the same cells and Lookups on a plain node, a node
//!   with `--auth-file` and one with `--auth-file` and TLS (see [`secure`]).
//!
//! Payloads are real K/V (tests/data, tiled to the block size), never random bytes or zeros.
//!
//! `kvshare-bench ttft` measures the inference workers instead: time to first token of a
//! `kvshare-worker` process with and without reuse of another worker's blocks (see [`ttft`]).

mod chart;
mod netns;
mod procs;
mod secure;
mod throughput;
mod trace;
mod ttft;

use std::path::PathBuf;
use std::time::Duration;

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
    /// Internal (shaped links): runs get and put cells against given servers and writes them as
    /// JSON; the suite runs it inside the client namespace.
    #[command(hide = true)]
    NetCell(NetCellArgs),
    /// Internal (shaped links): runs the auth/TLS comparison against given nodes and writes its
    /// rows as JSON; the suite runs it inside the client namespace.
    #[command(hide = true)]
    SecureCell(SecureCellArgs),
    /// Internal (shaped links): answers raw TCP rate tests until killed.
    #[command(hide = true)]
    TcpServe {
        /// Address to listen on.
        #[arg(long)]
        listen: String,
    },
    /// Internal (shaped links): one raw TCP rate test; prints `{"bytes":..,"seconds":..}`.
    #[command(hide = true)]
    TcpRate {
        /// Address of `tcp-serve`.
        #[arg(long)]
        connect: String,
        /// Which way the bytes flow.
        #[arg(long, value_enum)]
        direction: netns::Direction,
        /// How long to stream, milliseconds.
        #[arg(long, default_value_t = 1000)]
        millis: u64,
    },
}

/// Options of `net-cell`: the suite's sizes, concurrency, bytes and codec, plus the servers.
#[derive(Debug, Clone, clap::Args)]
struct NetCellArgs {
    #[command(flatten)]
    suite: Args,
    /// kvshare gRPC endpoint.
    #[arg(long)]
    endpoint: String,
    /// Redis URL (none: no baseline).
    #[arg(long)]
    redis_url: Option<String>,
    /// Link label written into the cells.
    #[arg(long)]
    link_label: String,
    /// Where to write the cells (JSON array).
    #[arg(long)]
    json_out: PathBuf,
}

/// Options of `secure-cell`: the suite's options, plus the three nodes (bearer token in
/// `KVSHARE_TOKEN`).
#[derive(Debug, Clone, clap::Args)]
struct SecureCellArgs {
    #[command(flatten)]
    suite: Args,
    /// gRPC endpoints of the plain, the auth and the auth + TLS node (comma-separated).
    #[arg(long, value_delimiter = ',')]
    endpoints: Vec<String>,
    /// CA certificate (PEM) of the TLS node.
    #[arg(long)]
    ca: PathBuf,
    /// Link label written into the rows.
    #[arg(long)]
    link_label: String,
    /// Where to write the rows (JSON array).
    #[arg(long)]
    json_out: PathBuf,
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
    #[arg(long, value_enum, default_value = "byteplane-huff")]
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
    /// Shaped links to also run get/put cells over (comma-separated rates, e.g. 2gbit,5gbit):
    /// servers and clients in two network namespaces joined by a tbf-shaped veth pair. Needs
    /// root or CAP_NET_ADMIN; skipped with a message otherwise.
    #[arg(long, value_delimiter = ',')]
    pub link: Vec<netns::LinkRate>,
    /// Runs of the lookup-loaded part (median and each run are reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Operations of the throughput cell beside the lookups of the lookup-loaded part.
    #[arg(long, value_enum, default_value = "mixed")]
    pub lookup_load: throughput::Op,
    /// CPU priority of the lookup-loaded part's load threads. `idle` (Linux `SCHED_IDLE`): the
    /// load stands for other workers' transfers, which run on their own hosts, so here it only
    /// takes what the lookup's client leaves of the shared cores; `normal`: a neighbouring
    /// client at the lookup client's own priority on the same cores.
    #[arg(long, value_enum, default_value = "idle")]
    pub load_priority: throughput::LoadPriority,
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
    /// Lookup latency of a 2,048-block prompt idle and beside a throughput cell.
    LookupLoaded,
    /// Prefix-sharing trace.
    Trace,
    /// Node RSS at full capacity.
    Memory,
    /// Get/put throughput and Lookup p50 with auth and TLS on, against a plain node.
    Secure,
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
    /// Lookup latency idle and beside a throughput cell.
    pub lookup_loaded: Vec<throughput::LookupLoadRow>,
    /// Shaped links (their cells are in `throughput`, with `link` set).
    pub shaped: Option<netns::ShapedReport>,
    /// Prefix-sharing trace.
    pub trace: Option<trace::TraceReport>,
    /// Memory check.
    pub memory: Option<throughput::MemoryRow>,
    /// Auth + TLS against plain.
    pub secure: Vec<secure::SecureRow>,
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
        Some(Bench::NetCell(a)) => net_cell(a).await,
        Some(Bench::SecureCell(a)) => secure_cell(a).await,
        Some(Bench::TcpServe { listen }) => netns::tcp_serve(&listen),
        Some(Bench::TcpRate {
            connect,
            direction,
            millis,
        }) => {
            let r = netns::tcp_rate(&connect, direction, Duration::from_millis(millis))?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
        None => {
            // Ctrl-C or SIGTERM drops the running suite: every child process, server and
            // namespace is removed by its guard before we exit.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = suite(cli.suite) => r,
                _ = tokio::signal::ctrl_c() => {
                    anyhow::bail!("interrupted: stopped the servers and removed the namespaces")
                }
                _ = term.recv() => {
                    anyhow::bail!("terminated: stopped the servers and removed the namespaces")
                }
            }
        }
    }
}

/// `net-cell`: the get and put cells of one shaped link, run from the client namespace.
async fn net_cell(a: NetCellArgs) -> anyhow::Result<()> {
    let cells =
        throughput::run_link(&a.suite, &a.endpoint, a.redis_url.as_deref(), &a.link_label).await?;
    std::fs::write(&a.json_out, serde_json::to_vec(&cells)?)
        .with_context(|| format!("writing {}", a.json_out.display()))?;
    Ok(())
}

/// `secure-cell`: the auth/TLS comparison over one shaped link, run from the client namespace.
async fn secure_cell(a: SecureCellArgs) -> anyhow::Result<()> {
    let endpoints: [String; 3] = a
        .endpoints
        .try_into()
        .map_err(|_| anyhow::anyhow!("--endpoints takes three endpoints: plain, auth, auth+TLS"))?;
    let rows = secure::run_cells(&a.suite, &endpoints, &a.ca, &a.link_label).await?;
    std::fs::write(&a.json_out, serde_json::to_vec(&rows)?)
        .with_context(|| format!("writing {}", a.json_out.display()))?;
    Ok(())
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
    if part(Part::Throughput) || part(Part::Lookup) || part(Part::LookupLoaded) {
        let node = procs::Node::start("4GiB", &[]).await?;
        if part(Part::Throughput) {
            report.throughput = throughput::run(&args, &node, redis.as_ref()).await?;
        }
        if part(Part::Lookup) {
            report.lookup = throughput::lookups(&args, &node, redis.as_ref()).await?;
        }
        if part(Part::LookupLoaded) {
            report.lookup_loaded = throughput::lookups_loaded(&args, &node, redis.as_ref()).await?;
        }
        node.stop();
    }
    if part(Part::Memory) {
        report.memory = Some(throughput::memory(&args).await?);
    }
    if part(Part::Secure) {
        report.secure = secure::run(&args).await?;
    }
    if !args.link.is_empty()
        && let Some(mut shaped) = netns::run(&args, &args.link).await?
    {
        report.throughput.extend(shaped.cells.iter().cloned());
        report.secure.append(&mut shaped.secure);
        report.shaped = Some(shaped);
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

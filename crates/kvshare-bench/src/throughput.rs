//! Throughput, lookup-latency and memory measurements.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kvshare_client::{ClientOptions, KvClient, PutItem};
use kvshare_core::size::{format_size, parse_size};
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout};
use rand::Rng;
use serde::Serialize;

use crate::Args;
use crate::procs::{Node, Redis, rss_bytes};

static KV_BF16: &[u8] = include_bytes!("../../../tests/data/kv-bf16-256tok.bin");

/// The link label of cells measured on loopback.
pub const LOOPBACK: &str = "loopback";

/// One measured (system, link, op, block size, concurrency) cell.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Cell {
    /// `kvshare` or `redis`.
    pub system: String,
    /// The link between client and servers: `loopback`, or a shaped link such as `2gbit`.
    pub link: String,
    /// `put`, `get` or `mixed`.
    pub op: String,
    /// Raw block size, bytes.
    pub block_bytes: u64,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Operations.
    pub ops: usize,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Raw K/V bytes per second (what a worker sends or receives), GB/s (1e9).
    pub raw_gbps: f64,
    /// Bytes on the wire per second, GB/s.
    pub wire_gbps: f64,
    /// Operations per second.
    pub ops_per_s: f64,
}

/// Lookup latency of one prompt length.
#[derive(Debug, Clone, Serialize)]
pub struct LookupRow {
    /// `kvshare` or `redis`.
    pub system: String,
    /// Blocks in the prompt.
    pub blocks: usize,
    /// Lookups measured.
    pub samples: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
}

/// One repetition of a lookup latency measurement, idle or beside a load.
#[derive(Debug, Clone, Serialize)]
pub struct LookupRun {
    /// Lookups measured.
    pub samples: usize,
    /// Median, microseconds.
    pub p50_us: f64,
    /// 99th percentile, microseconds.
    pub p99_us: f64,
    /// 99.9th percentile, microseconds.
    pub p999_us: f64,
    /// Raw K/V GB/s the load beside the lookups moved meanwhile (0 when idle).
    pub load_raw_gbps: f64,
}

/// Lookup latency of one system and prompt length, idle or while a throughput cell runs
/// beside it in the same process, over `--repeat` runs.
#[derive(Debug, Clone, Serialize)]
pub struct LookupLoadRow {
    /// `kvshare` or `redis`.
    pub system: String,
    /// Blocks in the prompt.
    pub blocks: usize,
    /// `idle`, or the load beside the lookups, e.g. `mixed 1 MiB x4`.
    pub condition: String,
    /// Each run, in order.
    pub runs: Vec<LookupRun>,
    /// Median over runs of the p50, microseconds.
    pub median_p50_us: f64,
    /// Median over runs of the p99, microseconds.
    pub median_p99_us: f64,
    /// Median over runs of the load's raw K/V GB/s (0 when idle).
    pub median_load_raw_gbps: f64,
}

/// The median of `v` (mean of the middle two for an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

impl LookupLoadRow {
    /// A row from its runs (medians computed here).
    pub fn new(system: &str, blocks: usize, condition: &str, runs: Vec<LookupRun>) -> Self {
        let med = |f: fn(&LookupRun) -> f64| median(runs.iter().map(f).collect());
        LookupLoadRow {
            system: system.into(),
            blocks,
            condition: condition.into(),
            median_p50_us: med(|r| r.p50_us),
            median_p99_us: med(|r| r.p99_us),
            median_load_raw_gbps: med(|r| r.load_raw_gbps),
            runs,
        }
    }
}

/// Node memory at full capacity.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryRow {
    /// Block size used to fill.
    pub block_bytes: u64,
    /// Configured capacity.
    pub capacity_bytes: u64,
    /// Stored bytes reported by the node.
    pub stored_bytes: u64,
    /// Resident set size of the node process.
    pub rss_bytes: u64,
    /// rss / stored.
    pub ratio: f64,
}

/// A layout whose block is exactly `size` raw bytes (bf16, 16 tokens, 1 layer, 1 head).
pub fn layout_for(size: u64) -> KvLayout {
    KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: (size / 64) as u32,
        dtype: DType::BF16,
        tokens_per_block: 16,
    }
}

/// `size` bytes of real K/V, tiled from the sample starting at `offset`.
pub fn kv_block(size: usize, offset: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    let mut pos = (offset * 8192) % KV_BF16.len();
    pos -= pos % 2;
    while v.len() < size {
        let take = (size - v.len()).min(KV_BF16.len() - pos);
        v.extend_from_slice(&KV_BF16[pos..pos + take]);
        pos = (pos + take) % KV_BF16.len();
    }
    v
}

pub(crate) fn random_key() -> BlockKey {
    BlockKey(rand::rng().random())
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The operations of a throughput load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Op {
    /// Puts of new blocks.
    Put,
    /// Gets of stored blocks.
    Get,
    /// Alternating gets and puts.
    Mixed,
}

impl Op {
    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Mixed => "mixed",
        }
    }

    /// Whether the `i`-th operation of a task is a put (else a get).
    fn is_put(self, i: usize) -> bool {
        match self {
            Op::Put => true,
            Op::Get => false,
            Op::Mixed => i.is_multiple_of(2),
        }
    }
}

pub(crate) struct Totals {
    raw: u64,
    wire: u64,
}

pub(crate) const NS: BlockKey = BlockKey([0xb5; 32]);

/// One measurement: `ops` operations of `op` on `size`-byte blocks by `conc` clients.
#[derive(Clone, Copy)]
pub(crate) struct Load {
    pub(crate) op: Op,
    pub(crate) size: u64,
    pub(crate) conc: usize,
    pub(crate) ops: usize,
}

impl Load {
    fn per_task(&self) -> usize {
        self.ops.div_ceil(self.conc)
    }

    fn cell(&self, system: &str, link: &str, secs: f64, t: &Totals) -> Cell {
        Cell {
            system: system.into(),
            link: link.into(),
            op: self.op.name().into(),
            block_bytes: self.size,
            concurrency: self.conc,
            ops: self.ops,
            seconds: secs,
            raw_gbps: t.raw as f64 / secs / 1e9,
            wire_gbps: t.wire as f64 / secs / 1e9,
            ops_per_s: self.ops as f64 / secs,
        }
    }
}

/// The key of block `k` in Redis, under `prefix`.
fn redis_key(prefix: &str, k: &BlockKey) -> String {
    format!("{prefix}:{}", k.to_hex())
}

/// Operation `i` of kvshare client task `t` of `load`: a put of fresh real K/V (compressed as
/// a worker would) or a get of a stored block (decompressed and verified). Returns (raw, wire)
/// bytes moved.
pub(crate) async fn kvshare_op(
    c: &mut KvClient,
    codec: Codec,
    load: Load,
    t: usize,
    i: usize,
    keys: &[BlockKey],
) -> anyhow::Result<(u64, u64)> {
    if load.op.is_put(i) {
        // The worker's side of a put: compress real K/V, then send.
        let raw = kv_block(load.size as usize, t * 1000 + i);
        let block = EncodedBlock::encode(NS, layout_for(load.size), codec, &raw)?;
        let wire = block.payload.len() as u64;
        c.put_blocks(vec![PutItem {
            key: random_key(),
            parent: None,
            block,
        }])
        .await?;
        Ok((raw.len() as u64, wire))
    } else {
        let k = keys[(t * 7919 + i) % keys.len()];
        let got = c.get_blocks(&NS, &[k]).await?;
        let b = got
            .into_iter()
            .next()
            .flatten()
            .context("pre-populated block missing")?;
        // The worker's side of a get: decompress and verify.
        Ok((b.decode()?.len() as u64, b.payload.len() as u64))
    }
}

/// Keys per task a background Redis load overwrites in turn (its memory stays bounded).
const BACKGROUND_KEYS: usize = 64;

/// Operation `i` of Redis client task `t` of `load`: `SET` of a new key (`bounded`: one of
/// [`BACKGROUND_KEYS`] keys of the task, overwritten in turn) or `GET` of a stored one.
/// Returns the raw bytes moved.
async fn redis_op(
    con: &mut redis::aio::MultiplexedConnection,
    load: Load,
    (t, i): (usize, usize),
    keys: &[String],
    bounded: bool,
) -> anyhow::Result<u64> {
    if load.op.is_put(i) {
        let raw = kv_block(load.size as usize, t * 1000 + i);
        let key = if bounded {
            format!("bg:{t}:{}", i % BACKGROUND_KEYS)
        } else {
            redis_key("kv", &random_key())
        };
        let n = raw.len() as u64;
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(raw)
            .query_async(con)
            .await?;
        Ok(n)
    } else {
        let k = &keys[(t * 7919 + i) % keys.len()];
        let v: Vec<u8> = redis::cmd("GET").arg(k).query_async(con).await?;
        anyhow::ensure!(!v.is_empty(), "redis lost key {k}");
        Ok(v.len() as u64)
    }
}

/// A kvshare client per task of `load`.
async fn kvshare_clients(
    endpoint: &str,
    codec: Codec,
    conc: usize,
) -> anyhow::Result<Vec<KvClient>> {
    let mut clients = Vec::with_capacity(conc);
    for _ in 0..conc {
        clients.push(
            KvClient::connect(
                endpoint,
                ClientOptions {
                    codec,
                    timeout: Duration::from_secs(120),
                    // For nodes that run with --auth-file.
                    token: std::env::var("KVSHARE_TOKEN").ok(),
                    ..crate::procs::client_options()
                },
            )
            .await?,
        );
    }
    Ok(clients)
}

async fn kvshare_cell(
    endpoint: &str,
    codec: Codec,
    load: Load,
    keys: Arc<Vec<BlockKey>>,
) -> anyhow::Result<Totals> {
    let mut tasks = Vec::new();
    for (t, mut c) in kvshare_clients(endpoint, codec, load.conc)
        .await?
        .into_iter()
        .enumerate()
    {
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let (mut raw_total, mut wire_total) = (0u64, 0u64);
            for i in 0..load.per_task() {
                let (raw, wire) = kvshare_op(&mut c, codec, load, t, i, &keys).await?;
                raw_total += raw;
                wire_total += wire;
            }
            anyhow::Ok((raw_total, wire_total))
        }));
    }
    let mut t = Totals { raw: 0, wire: 0 };
    for task in tasks {
        let (r, w) = task.await??;
        t.raw += r;
        t.wire += w;
    }
    Ok(t)
}

async fn redis_cell(url: &str, load: Load, keys: Arc<Vec<String>>) -> anyhow::Result<Totals> {
    let client = redis::Client::open(url)?;
    let mut tasks = Vec::new();
    for t in 0..load.conc {
        let mut con = client.get_multiplexed_async_connection().await?;
        let keys = keys.clone();
        tasks.push(tokio::spawn(async move {
            let mut raw_total = 0u64;
            for i in 0..load.per_task() {
                raw_total += redis_op(&mut con, load, (t, i), &keys, false).await?;
            }
            anyhow::Ok(raw_total)
        }));
    }
    let mut raw = 0;
    for task in tasks {
        raw += task.await??;
    }
    Ok(Totals { raw, wire: raw })
}

/// CPU priority of a background load's threads (`--load-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadPriority {
    /// Linux `SCHED_IDLE`.
    Idle,
    /// The bench's own priority.
    Normal,
}

impl LoadPriority {
    /// Puts the calling thread at this priority (a warning when the kernel refuses).
    fn apply(self) {
        if self == LoadPriority::Idle
            && let Err(e) = kvshare_server::bulk::make_current_thread_idle()
        {
            eprintln!("warning: the load's thread stays at normal priority: {e}");
        }
    }
}

/// A throughput load running in the background until [`Background::finish`] (or drop).
/// A throughput load beside the measured lookups. It runs on a runtime of its own (its own
/// threads, connections and tasks), as a neighbouring worker process would: the lookups measure
/// the node's latency under load, not a queue behind the load's tasks in this process.
struct Background {
    stop: Arc<AtomicBool>,
    raw: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    t0: Instant,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Background {
    /// `load.conc` kvshare clients looping over `load.op` until stopped, at `priority`.
    async fn kvshare(
        endpoint: &str,
        codec: Codec,
        load: Load,
        priority: LoadPriority,
        keys: Arc<Vec<BlockKey>>,
    ) -> anyhow::Result<Self> {
        let mut bg = Background::new(priority)?;
        for t in 0..load.conc {
            let (keys, stop, raw) = (keys.clone(), bg.stop.clone(), bg.raw.clone());
            let endpoint = endpoint.to_string();
            bg.tasks.push(bg.spawn(async move {
                let mut c = kvshare_clients(&endpoint, codec, 1)
                    .await?
                    .pop()
                    .context("no client")?;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (r, _) = kvshare_op(&mut c, codec, load, t, i, &keys).await?;
                    raw.fetch_add(r, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            }));
        }
        Ok(bg)
    }

    /// `load.conc` Redis connections looping over `load.op` until stopped, at `priority`.
    async fn redis(
        url: &str,
        load: Load,
        priority: LoadPriority,
        keys: Arc<Vec<String>>,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)?;
        let mut bg = Background::new(priority)?;
        for t in 0..load.conc {
            let (keys, stop, raw) = (keys.clone(), bg.stop.clone(), bg.raw.clone());
            let client = client.clone();
            bg.tasks.push(bg.spawn(async move {
                let mut con = client.get_multiplexed_async_connection().await?;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    // Overwrites its own keys: a Redis that reached maxmemory would evict
                    // the lookup's keys (its LRU clock ticks once a second).
                    let n = redis_op(&mut con, load, (t, i), &keys, true).await?;
                    raw.fetch_add(n, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            }));
        }
        Ok(bg)
    }

    fn new(priority: LoadPriority) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-load")
            .on_thread_start(move || priority.apply())
            .enable_all()
            .build()
            .context("starting the load's runtime")?;
        Ok(Background {
            stop: Arc::new(AtomicBool::new(false)),
            raw: Arc::new(AtomicU64::new(0)),
            tasks: Vec::new(),
            t0: Instant::now(),
            runtime: Some(runtime),
        })
    }

    /// Runs a load task on the load's own runtime.
    fn spawn(
        &self,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        match &self.runtime {
            Some(rt) => rt.spawn(task),
            None => tokio::spawn(task),
        }
    }

    /// Stops the load, waits for its tasks, and returns its raw K/V GB/s while it ran.
    async fn finish(mut self) -> anyhow::Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            t.await??;
        }
        // Every operation counted has finished by now.
        let secs = self.t0.elapsed().as_secs_f64();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        Ok(self.raw.load(Ordering::Relaxed) as f64 / secs / 1e9)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
        // Dropping a runtime inside async code would panic; let its threads end on their own.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Block sizes, concurrency levels and bytes per cell of a throughput run.
struct Plan {
    sizes: Vec<u64>,
    concs: Vec<usize>,
    budget: u64,
}

impl Plan {
    fn new(args: &Args) -> anyhow::Result<Plan> {
        let sizes: Vec<u64> = if !args.sizes.is_empty() {
            args.sizes
                .iter()
                .map(|s| parse_size(s))
                .collect::<Result<_, _>>()?
        } else if args.quick {
            vec![256 << 10, 1 << 20]
        } else {
            vec![64 << 10, 256 << 10, 1 << 20, 4 << 20]
        };
        let concs: Vec<usize> = if !args.concurrency.is_empty() {
            args.concurrency.clone()
        } else if args.quick {
            vec![4]
        } else {
            vec![1, 4, 16]
        };
        let budget = match &args.bytes_per_cell {
            Some(b) => parse_size(b)?,
            None if args.quick => 64 << 20,
            None => 384 << 20,
        };
        Ok(Plan {
            sizes,
            concs,
            budget,
        })
    }
}

/// Stores `keys` as distinct real K/V blocks of `size` bytes in kvshare, for gets.
async fn populate_kvshare(
    endpoint: &str,
    codec: Codec,
    size: u64,
    keys: &[BlockKey],
) -> anyhow::Result<()> {
    let layout = layout_for(size);
    let mut c = KvClient::connect(
        endpoint,
        ClientOptions {
            codec,
            ..crate::procs::client_options()
        },
    )
    .await?;
    for chunk in keys.chunks(8) {
        let items = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let raw = kv_block(size as usize, 500 + i);
                Ok(PutItem {
                    key: *k,
                    parent: None,
                    block: EncodedBlock::encode(NS, layout, codec, &raw)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        c.put_blocks(items).await?;
    }
    Ok(())
}

/// A multiplexed connection to the baseline at `url`.
async fn redis_connection(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// Stores `keys` as the same blocks in Redis.
async fn populate_redis(url: &str, size: u64, keys: &[String]) -> anyhow::Result<()> {
    let mut con = redis_connection(url).await?;
    for (i, k) in keys.iter().enumerate() {
        let () = redis::cmd("SET")
            .arg(k)
            .arg(kv_block(size as usize, 500 + i))
            .query_async(&mut con)
            .await?;
    }
    Ok(())
}

/// Put/get/mixed throughput for every size and concurrency, on loopback.
pub async fn run(args: &Args, node: &Node, redis: Option<&Redis>) -> anyhow::Result<Vec<Cell>> {
    println!(
        "\n== throughput: raw K/V GB/s (wire GB/s), {} per cell",
        format_size(Plan::new(args)?.budget)
    );
    measure(
        args,
        &node.endpoint,
        redis.map(|r| r.url.as_str()),
        &[Op::Get, Op::Put, Op::Mixed],
        LOOPBACK,
    )
    .await
}

/// Get and put throughput for every size and concurrency against the servers at `endpoint`
/// and `redis_url`, over the link called `link` (the shaped-link cells; run by the bench
/// re-executed inside the client namespace).
pub async fn run_link(
    args: &Args,
    endpoint: &str,
    redis_url: Option<&str>,
    link: &str,
) -> anyhow::Result<Vec<Cell>> {
    measure(args, endpoint, redis_url, &[Op::Get, Op::Put], link).await
}

/// The cells of `ops` for every size and concurrency of the plan, kvshare then Redis per cell.
async fn measure(
    args: &Args,
    endpoint: &str,
    redis: Option<&str>,
    op_kinds: &[Op],
    link: &str,
) -> anyhow::Result<Vec<Cell>> {
    let plan = Plan::new(args)?;
    let mut cells = Vec::new();
    println!(
        "{:<6} {:>9} {:>5} {:>18} {:>18} {:>8}",
        "op", "block", "conc", "kvshare", "redis", "ratio"
    );
    for &size in &plan.sizes {
        let ops = (plan.budget / size).max(16) as usize;
        // Pre-populate blocks for gets (distinct real K/V), in both systems.
        let keys: Vec<BlockKey> = (0..ops.min(128)).map(|_| random_key()).collect();
        populate_kvshare(endpoint, args.codec, size, &keys).await?;
        let rkeys: Vec<String> = keys.iter().map(|k| redis_key("kv", k)).collect();
        if let Some(r) = redis {
            populate_redis(r, size, &rkeys).await?;
        }
        let (keys, rkeys) = (Arc::new(keys), Arc::new(rkeys));
        for &conc in &plan.concs {
            for &op in op_kinds {
                let load = Load {
                    op,
                    size,
                    conc,
                    ops,
                };
                let t0 = Instant::now();
                let kt = kvshare_cell(endpoint, args.codec, load, keys.clone()).await?;
                let ks = load.cell("kvshare", link, t0.elapsed().as_secs_f64(), &kt);
                let rs = match redis {
                    Some(r) => {
                        let t0 = Instant::now();
                        let rt = redis_cell(r, load, rkeys.clone()).await?;
                        Some(load.cell("redis", link, t0.elapsed().as_secs_f64(), &rt))
                    }
                    None => None,
                };
                print_cells(&ks, rs.as_ref());
                cells.push(ks);
                cells.extend(rs);
            }
        }
        if let Some(r) = redis {
            let () = redis::cmd("FLUSHALL")
                .query_async(&mut redis_connection(r).await?)
                .await?;
        }
    }
    Ok(cells)
}

/// One row of the throughput table: kvshare and, when measured, Redis.
fn print_cells(ks: &Cell, rs: Option<&Cell>) {
    println!(
        "{:<6} {:>9} {:>5} {:>8.3} ({:>6.3}) {:>8} {:>9} {:>8}",
        ks.op,
        format_size(ks.block_bytes),
        ks.concurrency,
        ks.raw_gbps,
        ks.wire_gbps,
        rs.map_or("-".into(), |r| format!("{:.3}", r.raw_gbps)),
        "",
        rs.map_or("-".into(), |r| format!("{:.2}x", ks.raw_gbps / r.raw_gbps))
    );
}

/// Layout and namespace of the lookup test: one-token blocks of 32 bytes.
const LOOKUP_LAYOUT: KvLayout = KvLayout {
    num_layers: 1,
    num_kv_heads: 1,
    head_dim: 8,
    dtype: DType::BF16,
    tokens_per_block: 1,
};
pub(crate) const LOOKUP_NS: BlockKey = BlockKey([0x1c; 32]);

/// Stores a chain of `keys` (tiny blocks, each the parent of the next) in kvshare.
pub(crate) async fn populate_chain(c: &mut KvClient, keys: &[BlockKey]) -> anyhow::Result<()> {
    for (ci, chunk) in keys.chunks(1024).enumerate() {
        let items = chunk
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let idx = ci * 1024 + i;
                let raw = kv_block(32, idx);
                Ok(PutItem {
                    key: *k,
                    parent: idx.checked_sub(1).map(|p| keys[p]),
                    block: EncodedBlock::encode(LOOKUP_NS, LOOKUP_LAYOUT, Codec::None, &raw)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        c.put_blocks(items).await?;
    }
    Ok(())
}

/// Stores `keys` in Redis (pipelined) and returns the connection for the measurement.
async fn populate_redis_keys(
    r: &Redis,
    keys: &[String],
) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    let mut con = redis_connection(&r.url).await?;
    for chunk in keys.chunks(1024) {
        let mut p = redis::pipe();
        for k in chunk {
            p.cmd("SET").arg(k).arg(&b"x"[..]).ignore();
        }
        let () = p.query_async(&mut con).await?;
    }
    Ok(con)
}

/// Lookups measured per prompt length.
pub(crate) fn lookup_samples(quick: bool, blocks: usize) -> usize {
    match (quick, blocks) {
        (true, 8192) => 100,
        (true, _) => 300,
        (false, 8192) => 1000,
        (false, 2048) => 3000,
        (false, _) => 5000,
    }
}

/// Latencies (µs) of `samples` calls of `lookup`, each of which must find all `n` blocks.
pub(crate) async fn lookup_latencies(
    system: &str,
    n: usize,
    samples: usize,
    mut lookup: impl AsyncFnMut() -> anyhow::Result<usize>,
) -> anyhow::Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t0 = Instant::now();
        let hit = lookup().await?;
        lat.push(t0.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(hit == n, "{system} lookup found {hit} of {n}");
    }
    Ok(lat)
}

/// Leading `keys` present in Redis: one pipelined `EXISTS` per key.
async fn redis_leading_present(
    con: &mut redis::aio::MultiplexedConnection,
    keys: &[String],
) -> anyhow::Result<usize> {
    let mut p = redis::pipe();
    for k in keys {
        p.cmd("EXISTS").arg(k);
    }
    let found: Vec<i64> = p.query_async(con).await?;
    Ok(found.iter().take_while(|&&e| e == 1).count())
}

/// Lookup latency of long prompts.
pub async fn lookups(
    args: &Args,
    node: &Node,
    redis: Option<&Redis>,
) -> anyhow::Result<Vec<LookupRow>> {
    let longest = 8192;
    let keys: Vec<BlockKey> = (0..longest).map(|_| random_key()).collect();
    let mut c = KvClient::connect(&node.endpoint, crate::procs::client_options()).await?;
    populate_chain(&mut c, &keys).await?;
    let rkeys: Vec<String> = keys.iter().map(|k| redis_key("lk", k)).collect();
    let mut rcon = match redis {
        Some(r) => Some(populate_redis_keys(r, &rkeys).await?),
        None => None,
    };
    let mut rows = Vec::new();
    println!("\n== lookup latency (one prompt per call)");
    println!(
        "{:<8} {:>7} {:>8} {:>10} {:>10} {:>10}",
        "system", "blocks", "samples", "p50 us", "p99 us", "p999 us"
    );
    for &n in &[128usize, 2048, 8192] {
        let samples = lookup_samples(args.quick, n);
        let lat = lookup_latencies("kvshare", n, samples, async || {
            Ok(c.lookup_keys(&LOOKUP_NS, &keys[..n]).await?)
        })
        .await?;
        rows.push(row("kvshare", n, lat));
        if let Some(con) = rcon.as_mut() {
            let lat = lookup_latencies("redis", n, samples, async || {
                redis_leading_present(con, &rkeys[..n]).await
            })
            .await?;
            rows.push(row("redis", n, lat));
        }
    }
    Ok(rows)
}

/// The prompt length of the idle/loaded lookup comparison.
const LOADED_LOOKUP_BLOCKS: usize = 2048;
/// Block size and clients of the load beside the lookups (the headline throughput cell).
const LOAD_BLOCK: u64 = 1 << 20;
const LOAD_CONC: usize = 4;

pub(crate) fn lookup_run(mut lat: Vec<f64>, load_raw_gbps: f64) -> LookupRun {
    lat.sort_by(f64::total_cmp);
    LookupRun {
        samples: lat.len(),
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        p999_us: percentile(&lat, 0.999),
        load_raw_gbps,
    }
}

/// Lookup latency of a 2,048-block prompt, idle and while a throughput cell (`--lookup-load`
/// of 1 MiB blocks by 4 clients, against the same system, its threads at `--load-priority`)
/// runs beside it in this process;
/// `--repeat` runs, alternating kvshare and Redis within each run.
pub async fn lookups_loaded(
    args: &Args,
    node: &Node,
    redis: Option<&Redis>,
) -> anyhow::Result<Vec<LookupLoadRow>> {
    let n = LOADED_LOOKUP_BLOCKS;
    let samples = lookup_samples(args.quick, n);
    let keys: Vec<BlockKey> = (0..n).map(|_| random_key()).collect();
    let mut c = KvClient::connect(&node.endpoint, crate::procs::client_options()).await?;
    populate_chain(&mut c, &keys).await?;
    let rkeys: Vec<String> = keys.iter().map(|k| redis_key("ll", k)).collect();
    let mut rcon = match redis {
        Some(r) => Some(populate_redis_keys(r, &rkeys).await?),
        None => None,
    };
    // Blocks the load's gets read.
    let load = Load {
        op: args.lookup_load,
        size: LOAD_BLOCK,
        conc: LOAD_CONC,
        ops: 0,
    };
    let load_keys: Vec<BlockKey> = (0..64).map(|_| random_key()).collect();
    populate_kvshare(&node.endpoint, args.codec, LOAD_BLOCK, &load_keys).await?;
    let load_rkeys: Vec<String> = load_keys.iter().map(|k| redis_key("kv", k)).collect();
    if let Some(r) = redis {
        populate_redis(&r.url, LOAD_BLOCK, &load_rkeys).await?;
    }
    let (load_keys, load_rkeys) = (Arc::new(load_keys), Arc::new(load_rkeys));
    let condition = format!(
        "{} {} x{}{}",
        load.op.name(),
        format_size(LOAD_BLOCK),
        LOAD_CONC,
        match args.load_priority {
            LoadPriority::Idle => "",
            LoadPriority::Normal => " nice 0",
        }
    );
    // Time for the load's connections to reach steady state before lookups are timed.
    let warm = Duration::from_millis(300);
    let repeat = args.repeat.max(1);
    let (mut k_idle, mut k_loaded, mut r_idle, mut r_loaded) = (vec![], vec![], vec![], vec![]);
    println!(
        "\n== lookup latency of a {n}-block prompt, idle and beside a throughput cell ({condition}), {repeat} run(s)"
    );
    for run in 0..repeat {
        let lat = lookup_latencies("kvshare", n, samples, async || {
            Ok(c.lookup_keys(&LOOKUP_NS, &keys).await?)
        })
        .await?;
        k_idle.push(lookup_run(lat, 0.0));
        let bg = Background::kvshare(
            &node.endpoint,
            args.codec,
            load,
            args.load_priority,
            load_keys.clone(),
        )
        .await?;
        tokio::time::sleep(warm).await;
        let lat = lookup_latencies("kvshare", n, samples, async || {
            Ok(c.lookup_keys(&LOOKUP_NS, &keys).await?)
        })
        .await?;
        let gbps = bg.finish().await?;
        k_loaded.push(lookup_run(lat, gbps));
        if let (Some(r), Some(con)) = (redis, rcon.as_mut()) {
            let lat = lookup_latencies("redis", n, samples, async || {
                redis_leading_present(con, &rkeys).await
            })
            .await?;
            r_idle.push(lookup_run(lat, 0.0));
            let bg =
                Background::redis(&r.url, load, args.load_priority, load_rkeys.clone()).await?;
            tokio::time::sleep(warm).await;
            let lat = lookup_latencies("redis", n, samples, async || {
                redis_leading_present(con, &rkeys).await
            })
            .await?;
            let gbps = bg.finish().await?;
            r_loaded.push(lookup_run(lat, gbps));
        }
        println!("run {} of {repeat} done", run + 1);
    }
    let mut rows = vec![
        LookupLoadRow::new("kvshare", n, "idle", k_idle),
        LookupLoadRow::new("kvshare", n, &condition, k_loaded),
    ];
    if redis.is_some() {
        rows.push(LookupLoadRow::new("redis", n, "idle", r_idle));
        rows.push(LookupLoadRow::new("redis", n, &condition, r_loaded));
    }
    println!(
        "{:<8} {:<26} {:>12} {:>12} {:>10}  each run p50/p99 us",
        "system", "condition", "p50 us med", "p99 us med", "load GB/s"
    );
    for r in &rows {
        let each: Vec<String> = r
            .runs
            .iter()
            .map(|x| format!("{:.0}/{:.0}", x.p50_us, x.p99_us))
            .collect();
        println!(
            "{:<8} {:<26} {:>12.0} {:>12.0} {:>10.3}  {}",
            r.system,
            r.condition,
            r.median_p50_us,
            r.median_p99_us,
            r.median_load_raw_gbps,
            each.join(", ")
        );
    }
    Ok(rows)
}

fn row(system: &str, blocks: usize, mut lat: Vec<f64>) -> LookupRow {
    lat.sort_by(f64::total_cmp);
    let r = LookupRow {
        system: system.into(),
        blocks,
        samples: lat.len(),
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        p999_us: percentile(&lat, 0.999),
    };
    println!(
        "{:<8} {:>7} {:>8} {:>10.0} {:>10.0} {:>10.0}",
        r.system, r.blocks, r.samples, r.p50_us, r.p99_us, r.p999_us
    );
    r
}

/// Fills a fresh node past its capacity with 256 KiB blocks and compares RSS to stored bytes.
pub async fn memory(args: &Args) -> anyhow::Result<MemoryRow> {
    let capacity: u64 = if args.quick { 256 << 20 } else { 1 << 30 };
    let size: u64 = 256 << 10;
    let node = Node::start(&capacity.to_string(), &[]).await?;
    let layout = layout_for(size);
    let mut c = KvClient::connect(
        &node.endpoint,
        ClientOptions {
            codec: Codec::None,
            ..crate::procs::client_options()
        },
    )
    .await?;
    let blocks = (capacity * 5 / 4 / size) as usize;
    for chunk in (0..blocks).collect::<Vec<_>>().chunks(16) {
        let items = chunk
            .iter()
            .map(|&i| {
                Ok(PutItem {
                    key: random_key(),
                    parent: None,
                    block: EncodedBlock::encode(
                        NS,
                        layout,
                        Codec::None,
                        &kv_block(size as usize, i),
                    )?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        c.put_blocks(items).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = c.stats().await?;
    let rss = rss_bytes(node.pid()).unwrap_or(0);
    node.stop();
    let r = MemoryRow {
        block_bytes: size,
        capacity_bytes: capacity,
        stored_bytes: stats.stored_bytes,
        rss_bytes: rss,
        ratio: rss as f64 / stats.stored_bytes.max(1) as f64,
    };
    println!(
        "\n== memory: {} blocks pushed into {}: stored {}, RSS {} ({:.3}x stored)",
        blocks,
        format_size(capacity),
        format_size(r.stored_bytes),
        format_size(r.rss_bytes),
        r.ratio
    );
    Ok(r)
}

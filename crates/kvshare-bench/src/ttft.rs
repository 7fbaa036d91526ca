//! `kvshare-bench ttft`: time to first token of worker B on a prompt that shares a fraction of
//! worker A's prompt, full prefill (B, no cache) vs reuse (B, after A pushed its blocks).
//! A and B are separate `kvshare-worker stdio` processes; the cache node runs embedded in this
//! process. Cold and warm runs of a cell happen back to back in the same process B (in
//! alternating order), so the ratio is measured against a baseline taken under the same load.
//! The run fails when reuse changes the output (logits or tokens) of any cell.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use kvshare_core::{Codec, DType};
use kvshare_server::ServerConfig;
use kvshare_worker::protocol::{READY_LINE, StdioRequest, StdioResponse};
use kvshare_worker::tokenizer::random_tokens;
use kvshare_worker::{ModelConfig, RequestReport};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::procs::sibling_binary;

/// Options of the TTFT bench.
#[derive(Debug, Clone, Args)]
pub struct TtftArgs {
    /// Model presets to measure.
    #[arg(long, value_delimiter = ',', default_value = "tiny,medium")]
    models: Vec<String>,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    lengths: Vec<usize>,
    /// Percent of B's prompt shared with A's (and so cacheable).
    #[arg(long, value_delimiter = ',', default_value = "0,50,90")]
    shared: Vec<u32>,
    /// Repetitions per cell (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// K/V dtype.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DType,
    /// Block codec.
    #[arg(long, value_enum, default_value = "byteplane-huff")]
    codec: Codec,
    /// Positions per block (default by model, as in `kvshare-worker run`).
    #[arg(long)]
    tokens_per_block: Option<u32>,
    /// Smoke run: tiny model, 256-token prompts, one repetition.
    #[arg(long)]
    quick: bool,
    /// Also write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A `kvshare-worker stdio` child process.
struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    /// Starts a worker running `model` against the cache node at `endpoint`, and waits until
    /// it has loaded its model.
    async fn spawn(
        bin: &Path,
        model: &str,
        endpoint: &str,
        args: &TtftArgs,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(bin);
        cmd.args(["stdio", "--model", model, "--tier", endpoint])
            .args(["--dtype", args.dtype.name(), "--codec", args.codec.name()]);
        if let Some(t) = args.tokens_per_block {
            cmd.args(["--tokens-per-block", &t.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next_line().await? {
            Some(l) if l.trim() == READY_LINE => {}
            other => bail!("worker did not start: {other:?}"),
        }
        Ok(WorkerProc {
            child,
            stdin,
            lines,
        })
    }

    /// Runs `tokens` and generates one token; returns the answer's report and logits hash.
    async fn call(&mut self, tokens: &[u32], use_cache: bool) -> anyhow::Result<Answer> {
        let req = StdioRequest {
            tokens: tokens.to_vec(),
            max_new_tokens: 1,
            use_cache,
        };
        let mut line = serde_json::to_string(&req)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        let Some(resp) = self.lines.next_line().await? else {
            bail!("worker exited: {:?}", self.child.try_wait());
        };
        let resp: StdioResponse = serde_json::from_str(&resp)?;
        if let Some(e) = &resp.error {
            bail!("worker error: {e}");
        }
        Ok(Answer {
            report: resp.report.context("worker answered without a report")?,
            tokens: resp.tokens,
            logits_hash: resp.logits_hash,
        })
    }
}

/// A successful answer of a worker.
struct Answer {
    tokens: Vec<u32>,
    logits_hash: u64,
    report: RequestReport,
}

/// One repetition of a cell: B without and with the cache tier.
struct Sample {
    cold: RequestReport,
    warm: RequestReport,
    exact: bool,
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Medians of one (model, prompt length, shared fraction) cell.
#[derive(Debug, Serialize)]
struct Row {
    model: String,
    prompt_tokens: usize,
    shared_pct: u32,
    cached_tokens: f64,
    cold_ttft_ms: f64,
    warm_ttft_ms: f64,
    speedup: f64,
    flop_bound: f64,
    fetched_wire_bytes: f64,
    fetched_raw_bytes: f64,
    fetch_ms: f64,
    prefill_ms: f64,
    exact: bool,
}

impl Row {
    /// The medians of `samples`; exact only when every sample was.
    fn new(cfg: &ModelConfig, model: &str, len: usize, pct: u32, samples: &[Sample]) -> Row {
        let warm = |f: fn(&RequestReport) -> f64| median(samples.iter().map(|s| f(&s.warm)));
        let cold_ttft_ms = median(samples.iter().map(|s| s.cold.ttft_ms));
        let warm_ttft_ms = warm(|r| r.ttft_ms);
        let cached_tokens = warm(|r| r.cached_tokens as f64);
        Row {
            model: model.to_string(),
            prompt_tokens: len,
            shared_pct: pct,
            cached_tokens,
            cold_ttft_ms,
            warm_ttft_ms,
            speedup: if warm_ttft_ms > 0.0 {
                cold_ttft_ms / warm_ttft_ms
            } else {
                0.0
            },
            flop_bound: cfg.prefill_flops(0, len as u64)
                / cfg.prefill_flops(cached_tokens as u64, len as u64),
            fetched_wire_bytes: warm(|r| r.fetched_wire_bytes as f64),
            fetched_raw_bytes: warm(|r| r.fetched_raw_bytes as f64),
            fetch_ms: warm(|r| r.fetch_ms + r.lookup_ms),
            prefill_ms: warm(|r| r.prefill_ms),
            exact: samples.iter().all(|s| s.exact),
        }
    }
}

/// Runs the bench and prints markdown tables; fails when reuse changed any output.
pub async fn run(mut args: TtftArgs) -> anyhow::Result<()> {
    if args.quick {
        args.models = vec!["tiny".into()];
        args.lengths = vec![256];
        args.reps = 1;
    }
    let bin = sibling_binary("kvshare-worker", "KVSHARE_WORKER_BIN", "kvshare-worker")?;
    // As in a worker process: the embedded node's buffers stay on the heap.
    kvshare_worker::tune_allocator();
    let node = kvshare_server::start(ServerConfig::local(4 << 30))
        .await
        .context("starting the cache node")?;
    let endpoint = node.endpoint();
    eprintln!("cache node at {endpoint}; workers {}", bin.display());
    let mut rows = Vec::new();
    let mut seed = 1u64;
    for model in &args.models {
        rows.extend(measure_model(&args, &bin, &endpoint, model, &mut seed).await?);
    }
    print_ttft_table(&args, &rows);
    print_compute_table(&args)?;
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    node.shutdown(Duration::from_secs(1)).await?;
    check_exact(&rows)
}

/// Every cell of one model, with a fresh pair of worker processes.
async fn measure_model(
    args: &TtftArgs,
    bin: &Path,
    endpoint: &str,
    model: &str,
    seed: &mut u64,
) -> anyhow::Result<Vec<Row>> {
    let cfg = ModelConfig::preset(model)?;
    let mut a = WorkerProc::spawn(bin, model, endpoint, args).await?;
    let mut b = WorkerProc::spawn(bin, model, endpoint, args).await?;
    // Warm-up: allocator, thread pools, page faults of the weights.
    for w in [&mut a, &mut b] {
        w.call(&random_tokens(300, 999, cfg.vocab_size), false)
            .await?;
    }
    let mut rows = Vec::new();
    for &len in &args.lengths {
        for &pct in &args.shared {
            let mut samples = Vec::with_capacity(args.reps);
            for rep in 0..args.reps {
                *seed += 1;
                let cell = Cell {
                    vocab: cfg.vocab_size,
                    len,
                    pct,
                    seed: *seed,
                };
                samples.push(cell.sample(&mut a, &mut b, rep % 2 == 1).await?);
            }
            let row = Row::new(&cfg, model, len, pct, &samples);
            eprintln!(
                "{model} {len} tok {pct}% shared: cold {:.1} ms, warm {:.1} ms ({:.2}x)",
                row.cold_ttft_ms, row.warm_ttft_ms, row.speedup
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The prompts of one repetition.
struct Cell {
    vocab: usize,
    len: usize,
    pct: u32,
    seed: u64,
}

impl Cell {
    /// A pushes its prompt; B runs one sharing `pct` % of it, without and with the cache
    /// (warm first when `warm_first`, so neither run always goes first).
    async fn sample(
        &self,
        a: &mut WorkerProc,
        b: &mut WorkerProc,
        warm_first: bool,
    ) -> anyhow::Result<Sample> {
        let base = random_tokens(self.len, self.seed, self.vocab);
        a.call(&base, true).await?;
        let shared = self.len * self.pct as usize / 100;
        let mut prompt = base[..shared].to_vec();
        prompt.extend(random_tokens(
            self.len - shared,
            self.seed + 1_000_000,
            self.vocab,
        ));
        let (cold, warm) = if warm_first {
            let w = b.call(&prompt, true).await?;
            (b.call(&prompt, false).await?, w)
        } else {
            let c = b.call(&prompt, false).await?;
            (c, b.call(&prompt, true).await?)
        };
        Ok(Sample {
            exact: cold.logits_hash == warm.logits_hash && cold.tokens == warm.tokens,
            cold: cold.report,
            warm: warm.report,
        })
    }
}

/// Fails naming every cell where reuse changed the output.
fn check_exact(rows: &[Row]) -> anyhow::Result<()> {
    let inexact: Vec<String> = rows
        .iter()
        .filter(|r| !r.exact)
        .map(|r| format!("{} {} tokens {}%", r.model, r.prompt_tokens, r.shared_pct))
        .collect();
    if !inexact.is_empty() {
        bail!(
            "reuse changed the output (logits or tokens) in: {}",
            inexact.join(", ")
        );
    }
    Ok(())
}

fn print_ttft_table(args: &TtftArgs, rows: &[Row]) {
    println!(
        "TTFT of worker B, full prefill vs reuse of worker A's blocks ({}, {}, median of {}):\n",
        args.dtype.name(),
        args.codec.name(),
        args.reps
    );
    println!(
        "| model | prompt | shared | cached tokens | cold TTFT ms | warm TTFT ms | speedup | FLOP bound | fetched (wire / raw) | lookup+fetch ms | warm prefill ms | logits exact |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {} | {}% | {:.0} | {:.1} | {:.1} | {:.2}x | {:.2}x | {:.2} / {:.2} MiB | {:.1} | {:.1} | {} |",
            r.model,
            r.prompt_tokens,
            r.shared_pct,
            r.cached_tokens,
            r.cold_ttft_ms,
            r.warm_ttft_ms,
            r.speedup,
            r.flop_bound,
            r.fetched_wire_bytes / 1048576.0,
            r.fetched_raw_bytes / 1048576.0,
            r.fetch_ms,
            r.prefill_ms,
            if r.exact {
                "bit-identical"
            } else {
                "DIFFERENT"
            }
        );
    }
}

/// Prefill FLOPs saved per K/V byte fetched, for the measured models and Llama-3-8B.
fn print_compute_table(args: &TtftArgs) -> anyhow::Result<()> {
    println!(
        "\nCompute saved per byte fetched (prefill FLOPs of one token at position 4096 / its K/V bytes):\n"
    );
    println!(
        "| model | non-embedding params | KV bytes/token | FLOPs/token @4k | FLOPs per KV byte |"
    );
    println!("|---|---:|---:|---:|---:|");
    let llama3 = ModelConfig::from_hf_json(
        "Llama-3-8B",
        r#"{"vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8}"#,
    )?;
    let mut cfgs = Vec::new();
    for m in &args.models {
        cfgs.push(ModelConfig::preset(m)?);
    }
    cfgs.push(llama3);
    for c in cfgs {
        let kvb = c.kv_bytes_per_token(args.dtype.size());
        let fl = c.flops_per_token(4095);
        println!(
            "| {} | {:.1} M | {} | {:.2} GFLOP | {:.0} |",
            c.name,
            c.non_embedding_params() as f64 / 1e6,
            kvb,
            fl as f64 / 1e9,
            fl as f64 / kvb as f64
        );
    }
    Ok(())
}

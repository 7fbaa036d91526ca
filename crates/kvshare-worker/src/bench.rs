//! `kvshare-worker bench`: time to first token of worker B on a prompt that shares a fraction
//! of worker A's prompt, full prefill (B, no cache) vs reuse (B, after A pushed its blocks).
//! A and B are separate processes (`kvshare-worker stdio`); the cache node runs in this
//! process. Cold and warm runs of a cell happen back to back in the same process B (in
//! alternating order), so the ratio is measured against a baseline taken under the same load.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, bail};
use clap::Args;
use kvshare_server::ServerConfig;
use kvshare_worker::ModelConfig;
use kvshare_worker::tokenizer::random_tokens;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::{StdioRequest, StdioResponse};

/// Options of the bench.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
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
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Block codec.
    #[arg(long, default_value = "byteplane-zstd")]
    codec: String,
    /// Positions per block (default by model, as in `run`).
    #[arg(long)]
    tokens_per_block: Option<u32>,
    /// Smoke run: tiny model, 256-token prompts, one repetition.
    #[arg(long)]
    quick: bool,
    /// Also write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    async fn spawn(model: &str, endpoint: &str, args: &BenchArgs) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(exe);
        cmd.args(["stdio", "--model", model, "--tier", endpoint])
            .args(["--dtype", &args.dtype, "--codec", &args.codec]);
        if let Some(t) = args.tokens_per_block {
            cmd.args(["--tokens-per-block", &t.to_string()]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next_line().await? {
            Some(l) if l.contains("ready") => {}
            other => bail!("worker did not start: {other:?}"),
        }
        Ok(WorkerProc {
            child,
            stdin,
            lines,
        })
    }

    async fn call(&mut self, tokens: &[u32], use_cache: bool) -> anyhow::Result<StdioResponse> {
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
        Ok(resp)
    }
}

fn f(r: &serde_json::Value, k: &str) -> f64 {
    r.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

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

/// Runs the bench and prints a markdown table.
pub async fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    if args.quick {
        args.models = vec!["tiny".into()];
        args.lengths = vec![256];
        args.reps = 1;
    }
    let node = kvshare_server::start(ServerConfig::local(4 << 30))
        .await
        .context("starting the cache node")?;
    let endpoint = node.endpoint();
    eprintln!("cache node at {endpoint}");
    let mut rows = Vec::new();
    let mut seed = 1u64;
    for model in &args.models {
        let cfg = ModelConfig::preset(model)?;
        let mut a = WorkerProc::spawn(model, &endpoint, &args).await?;
        let mut b = WorkerProc::spawn(model, &endpoint, &args).await?;
        // Warm-up: allocator, thread pools, page faults of the weights.
        for w in [&mut a, &mut b] {
            w.call(&random_tokens(300, 999, cfg.vocab_size), false)
                .await?;
        }
        for &len in &args.lengths {
            for &pct in &args.shared {
                let (mut cold, mut warm, mut cached, mut wire, mut raw, mut fetch, mut pre) =
                    (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
                let mut exact = true;
                for rep in 0..args.reps {
                    seed += 1;
                    let base = random_tokens(len, seed, cfg.vocab_size);
                    a.call(&base, true).await?;
                    let shared = len * pct as usize / 100;
                    let mut prompt = base[..shared].to_vec();
                    prompt.extend(random_tokens(
                        len - shared,
                        seed + 1_000_000,
                        cfg.vocab_size,
                    ));
                    // Alternate the order so neither run always goes first.
                    let (c, w) = if rep % 2 == 0 {
                        let c = b.call(&prompt, false).await?;
                        (c, b.call(&prompt, true).await?)
                    } else {
                        let w = b.call(&prompt, true).await?;
                        (b.call(&prompt, false).await?, w)
                    };
                    exact &= c.logits_hash == w.logits_hash && c.tokens == w.tokens;
                    cold.push(f(&c.report, "ttft_ms"));
                    warm.push(f(&w.report, "ttft_ms"));
                    cached.push(f(&w.report, "cached_tokens"));
                    wire.push(f(&w.report, "fetched_wire_bytes"));
                    raw.push(f(&w.report, "fetched_raw_bytes"));
                    fetch.push(f(&w.report, "fetch_ms") + f(&w.report, "lookup_ms"));
                    pre.push(f(&w.report, "prefill_ms"));
                }
                let (c, w) = (median(cold), median(warm));
                let cached_tokens = median(cached);
                let flop_bound = cfg.prefill_flops(0, len as u64)
                    / cfg.prefill_flops(cached_tokens as u64, len as u64);
                let row = Row {
                    model: model.clone(),
                    prompt_tokens: len,
                    shared_pct: pct,
                    cached_tokens,
                    cold_ttft_ms: c,
                    warm_ttft_ms: w,
                    speedup: if w > 0.0 { c / w } else { 0.0 },
                    flop_bound,
                    fetched_wire_bytes: median(wire),
                    fetched_raw_bytes: median(raw),
                    fetch_ms: median(fetch),
                    prefill_ms: median(pre),
                    exact,
                };
                eprintln!(
                    "{model} {len} tok {pct}% shared: cold {c:.1} ms, warm {w:.1} ms ({:.2}x)",
                    row.speedup
                );
                rows.push(row);
            }
        }
    }
    print_tables(&args, &rows)?;
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&rows)?)?;
    }
    node.shutdown(std::time::Duration::from_secs(1)).await?;
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

fn print_tables(args: &BenchArgs, rows: &[Row]) -> anyhow::Result<()> {
    let dtype = kvshare_core::DType::parse(&args.dtype)?;
    println!(
        "TTFT of worker B, full prefill vs reuse of worker A's blocks ({}, {}, median of {}):\n",
        args.dtype, args.codec, args.reps
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
        let kvb = c.kv_bytes_per_token(dtype.size());
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

//! `kvshare-worker`: run prompts through a Llama-style model that shares prefix K/V through a
//! kvshare cluster (`run`), serve JSON requests on stdin (`stdio`, the protocol of
//! [`kvshare_worker::protocol`]), or write the seeded weights as safetensors
//! (`export-weights`).
//!
//! Time to first token with and without reuse across two worker processes is measured by
//! `kvshare-bench ttft`, which drives `kvshare-worker stdio` processes.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kvshare_client::{ClientOptions, ClusterClient};
use kvshare_core::{Codec, DType};
use kvshare_worker::protocol::{self, READY_LINE};
use kvshare_worker::{CacheMode, Model, ModelConfig, Worker, tokenizer};

#[derive(Debug, Parser)]
#[command(name = "kvshare-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one prompt and print what the cache tier saved.
    Run(RunArgs),
    /// Answer JSON requests read from stdin, one per line (used by `kvshare-bench ttft`).
    Stdio(ModelArgs),
    /// Write the model's weights (safetensors, Hugging Face Llama names) and config.json.
    ExportWeights {
        #[command(flatten)]
        model: ModelSource,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Which weights to run.
#[derive(Debug, Clone, Args)]
pub struct ModelSource {
    /// Built-in shape with seeded random weights: tiny, small or medium.
    #[arg(long, default_value = "small")]
    pub model: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Hugging Face Llama config.json (with --weights): load real weights instead.
    #[arg(long, requires = "weights")]
    pub config: Option<PathBuf>,
    /// Safetensors file of the weights named in --config.
    #[arg(long, requires = "config")]
    pub weights: Option<PathBuf>,
}

impl ModelSource {
    /// Builds or loads the model.
    pub fn load(&self) -> anyhow::Result<Model> {
        match (&self.config, &self.weights) {
            (Some(cfg), Some(w)) => {
                let json = std::fs::read_to_string(cfg)
                    .with_context(|| format!("reading {}", cfg.display()))?;
                let name = w
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "llama".into());
                let c = ModelConfig::from_hf_json(&name, &json)?;
                Ok(Model::load_safetensors(&c, w)?)
            }
            _ => Ok(Model::random(
                &ModelConfig::preset(&self.model)?,
                self.seed,
            )?),
        }
    }
}

/// Model, K/V format and cache tier of a worker.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// Cache nodes (comma-separated gRPC endpoints); empty: no cache tier.
    #[arg(
        long,
        env = "KVSHARE_ENDPOINTS",
        default_value = "",
        value_delimiter = ','
    )]
    pub tier: Vec<String>,
    /// Bearer token for cache nodes that run with --auth-file (role writer: workers push).
    #[arg(long, env = "KVSHARE_TOKEN", hide_env_values = true)]
    pub token: Option<kvshare_client::Secret>,
    /// Element type of the K/V cache and of the shared blocks: f32, f16 or bf16.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DType,
    /// Positions per block (and per prefill chunk); default by model: tiny 16, small 64,
    /// others 256.
    #[arg(long)]
    pub tokens_per_block: Option<u32>,
    /// Codec of pushed blocks.
    #[arg(long, value_enum, default_value = "byteplane-huff")]
    pub codec: Codec,
    /// CA certificate(s) (PEM) that sign the cache nodes' certificates: talk to the tier over
    /// TLS.
    #[arg(long, env = "KVSHARE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for nodes that require one (mTLS); with --tls-key.
    #[arg(long, env = "KVSHARE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "KVSHARE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ModelArgs {
    /// Loads the model and connects to the tier.
    pub async fn worker(&self) -> anyhow::Result<Worker> {
        let model = Arc::new(self.source.load()?);
        let tier = self
            .tier
            .iter()
            .filter(|e| !e.is_empty())
            .cloned()
            .collect::<Vec<_>>();
        let codec = self.codec;
        let client =
            if tier.is_empty() {
                None
            } else {
                let mut opts = ClientOptions {
                    codec,
                    token: self.token.as_ref().map(|t| t.expose().to_string()),
                    ..ClientOptions::default()
                };
                if let Some(ca) = &self.tls_ca {
                    let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
                    opts = opts
                        .with_tls_files(ca, identity)
                        .context("loading the TLS files (--tls-ca, --tls-cert, --tls-key)")?;
                } else if self.tls_cert.is_some() {
                    anyhow::bail!(
                        "--tls-cert needs --tls-ca (the CA that signs the nodes' certificates)"
                    );
                }
                Some(ClusterClient::connect(&tier, opts).await.with_context(|| {
                    format!("connecting to the cache tier at {}", tier.join(","))
                })?)
            };
        let tpb = self
            .tokens_per_block
            .unwrap_or(match self.source.model.as_str() {
                "tiny" if self.source.config.is_none() => 16,
                "small" if self.source.config.is_none() => 64,
                _ => 256,
            });
        Ok(Worker::new(model, self.dtype, tpb, codec, client)?)
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    worker: ModelArgs,
    /// Prompt text (byte-level tokens).
    #[arg(long, conflicts_with_all = ["prompt_file", "tokens"])]
    prompt: Option<String>,
    /// File whose text is the prompt.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    tokens: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Full prefill without the cache tier.
    #[arg(long)]
    no_cache: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

async fn stdio(args: ModelArgs) -> anyhow::Result<()> {
    let worker = args.worker().await?;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY_LINE}")?;
    out.flush()?;
    for line in stdin.lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let resp = protocol::answer(&worker, &line).await;
        serde_json::to_writer(&mut out, &resp)?;
        writeln!(out)?;
        out.flush()?;
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let tokens = match (&args.prompt, &args.prompt_file, &args.tokens) {
        (Some(p), _, _) => tokenizer::encode(p),
        (_, Some(f), _) => tokenizer::encode(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        ),
        (_, _, Some(t)) => t.clone(),
        _ => anyhow::bail!("give the prompt with --prompt, --prompt-file or --tokens"),
    };
    let worker = args.worker.worker().await?;
    let mode = if args.no_cache {
        CacheMode::Off
    } else {
        CacheMode::ReadWrite
    };
    let g = worker
        .generate(&tokens, args.max_new_tokens.max(1), mode)
        .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&g.report)?);
        return Ok(());
    }
    let r = &g.report;
    println!(
        "model        {} ({})",
        worker.model().config().name,
        worker.model().fingerprint()
    );
    println!(
        "prompt       {} tokens, {} from the cache tier",
        r.prompt_tokens, r.cached_tokens
    );
    println!(
        "TTFT         {:.1} ms (lookup {:.1}, fetch {:.1}, prefill {:.1})",
        r.ttft_ms, r.lookup_ms, r.fetch_ms, r.prefill_ms
    );
    println!(
        "fetched      {} B compressed, {} B raw; pushed {} blocks ({} B)",
        r.fetched_wire_bytes, r.fetched_raw_bytes, r.pushed_blocks, r.pushed_wire_bytes
    );
    if let Some(e) = r.cache_error.as_ref().or(r.push_error.as_ref()) {
        println!("cache tier   {e}");
    }
    println!(
        "generated    {:?} -> {:?}",
        g.tokens,
        tokenizer::decode(&g.tokens)
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kvshare_worker::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::Stdio(a) => stdio(a).await,
        Cmd::ExportWeights { model, out } => {
            let m = model.load()?;
            std::fs::create_dir_all(&out)?;
            let c = m.config();
            let cfg = serde_json::json!({
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
                "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
                "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
                "max_position_embeddings": c.max_positions,
                "tie_word_embeddings": c.tie_word_embeddings,
            });
            std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
            m.save_safetensors(&out.join("model.safetensors"))?;
            println!("wrote {}/config.json and model.safetensors", out.display());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_kept_but_never_printed() {
        let cli = Cli::try_parse_from(["kvshare-worker", "stdio", "--token", "wk-s3cret"])
            .expect("parse");
        let Cmd::Stdio(args) = &cli.cmd else {
            panic!("parsed {cli:?}");
        };
        assert_eq!(args.token.as_ref().map(|t| t.expose()), Some("wk-s3cret"));
        let shown = format!("{cli:?}");
        assert!(!shown.contains("wk-s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}

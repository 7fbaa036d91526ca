//! The `kvshare-worker stdio` protocol: one JSON [`StdioRequest`] per line on stdin, one JSON
//! [`StdioResponse`] per line on stdout (after a first `{"ready":true}` line). Benchmarks drive
//! worker processes through it.

use serde::{Deserialize, Serialize};

use crate::worker::{CacheMode, RequestReport, Worker};

/// The line a worker prints once it has loaded its model and is ready for requests.
pub const READY_LINE: &str = r#"{"ready":true}"#;

/// One request of the `stdio` protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StdioRequest {
    /// Prompt token ids.
    pub tokens: Vec<u32>,
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Use the cache tier (false: full prefill, nothing pushed).
    pub use_cache: bool,
}

/// The answer to a [`StdioRequest`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StdioResponse {
    /// Error, if the request failed.
    pub error: Option<String>,
    /// Generated tokens.
    pub tokens: Vec<u32>,
    /// xxh3 of the first token's logits (bit-exactness check across processes).
    pub logits_hash: u64,
    /// The request's report (`None` when the request failed).
    pub report: Option<RequestReport>,
}

impl StdioResponse {
    /// A failed request.
    pub fn failed(error: impl Into<String>) -> Self {
        StdioResponse {
            error: Some(error.into()),
            ..StdioResponse::default()
        }
    }
}

/// xxh3 of the little-endian bytes of `logits`.
pub fn logits_hash(logits: &[f32]) -> u64 {
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Runs one request line on `worker`; a malformed line or a failed request is an answer with
/// `error` set, never an error of the caller.
pub async fn answer(worker: &Worker, line: &str) -> StdioResponse {
    let req = match serde_json::from_str::<StdioRequest>(line) {
        Ok(req) => req,
        Err(e) => return StdioResponse::failed(format!("bad request: {e}")),
    };
    let mode = if req.use_cache {
        CacheMode::ReadWrite
    } else {
        CacheMode::Off
    };
    match worker.generate(&req.tokens, req.max_new_tokens, mode).await {
        Ok(g) => StdioResponse {
            error: None,
            logits_hash: g.logits.first().map_or(0, |l| logits_hash(l)),
            tokens: g.tokens,
            report: Some(g.report),
        },
        Err(e) => StdioResponse::failed(e.to_string()),
    }
}

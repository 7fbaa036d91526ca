//! kvshare inference worker: a Llama-style decoder (candle, CPU) whose prefill reuses the K/V
//! of shared prompt prefixes from the kvshare cache tier.
//!
//! For each prompt the [`Worker`] computes the block keys, looks up the longest cached prefix
//! in one round trip, fetches and verifies those blocks, converts them exactly into the model's
//! K/V cache, prefills only the remaining tokens, decodes greedily, and pushes every new full
//! block (compressed) for other workers. A block that is missing, unreachable or fails its
//! checksum is a miss and is recomputed, never used.

pub mod config;
pub mod error;
pub mod kv;
pub mod model;
pub mod tokenizer;
pub mod worker;

pub use config::ModelConfig;
pub use error::WorkerError;
pub use model::{KvCache, Model, argmax, max_abs_diff};
pub use worker::{CacheMode, Generation, RequestReport, Worker, model_layout};

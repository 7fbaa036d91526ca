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
pub mod protocol;
pub mod tokenizer;
pub mod worker;

pub use config::ModelConfig;
pub use error::WorkerError;
pub use model::{KvCache, Model, argmax, max_abs_diff};
pub use worker::{CacheMode, Generation, RequestReport, Worker, model_layout};

/// Tunes glibc's allocator for inference: attention scores of a 256-token chunk at 4k
/// positions are ~32 MiB, above glibc's largest mmap threshold, so by default every such
/// buffer is a fresh mmap whose pages fault in on first touch and are unmapped on free (a
/// quarter of a reuse prefill's time, measured). Keeping large buffers on the heap and not
/// trimming it lets them be reused. Compute runs on pool threads, so one arena serves them
/// all. Call once at process start; no-op elsewhere.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before the worker
    // allocates its model and has no memory-safety preconditions.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // One arena: per-thread arenas grow in 64 MiB heaps that cannot hold a 4k-position
        // chunk's scores and probabilities together, and shrink them back eagerly.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

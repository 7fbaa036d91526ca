//! kvshare-core: the pieces every kvshare process shares.
//!
//! - [`namespace`] and [`keys`]: namespaces and 32-byte chained prefix keys (kvshare's own
//!   SHA-256 scheme and vLLM's `sha256_cbor`).
//! - [`codec`] and [`block`]: block encodings (LZ4, byte-plane LZ4/zstd/Huffman), checksums, headers.
//! - [`store`]: the byte-bounded, chain-aware LRU block store.
//! - [`placement`]: rendezvous hashing of keys over cluster members.
//! - [`wire`]: chunking blocks into gRPC messages and reassembling them.
//! - [`snapshot`]: the store written to a file on shutdown and loaded back on start.
//! - [`size`]: human byte sizes (`8GiB`).
//! - [`sample`]: real K/V activations cut into blocks (tests, demo, benchmarks).

#![warn(missing_docs)]

pub mod block;
pub mod cbor;
pub mod codec;
pub mod error;
mod huff;
pub mod keys;
pub mod layout;
pub mod namespace;
pub mod parallel;
pub mod placement;
pub mod sample;
pub mod size;
pub mod snapshot;
pub mod store;
pub mod wire;

pub use block::{BlockHeader, EncodedBlock};
pub use codec::{Codec, checksum, max_encoded_len};
pub use error::CoreError;
pub use keys::{BlockKey, KEY_LEN, KeyScheme, VllmHashParams};
pub use layout::{DType, KvLayout};
pub use namespace::Namespace;
pub use store::{
    BlockStore, DEFAULT_TENANT, InsertOutcome, StoreKey, StoreStats, TenantId, TenantUsage,
};

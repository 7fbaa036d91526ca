//! Checks behind kvshare's fuzz targets (docs/fuzzing.md). Each `fuzz_targets/*.rs` is a
//! three-line `fuzz_target!` calling one `check_*` function here, so the same checks also run
//! under `cargo test` (tests/corpus.rs replays the committed corpus and regression inputs).
//!
//! Adding a target (the Put-side assembler, once it is a synchronous type): write
//! `check_put_stream(data: &[u8])` in a module here (`inputs::blocks` and `inputs::stream_keys` build
//! valid block sequences; `wire::put_chunks` cuts them into messages), a file
//! `fuzz_targets/put_stream.rs` like the others, a `[[bin]]` entry in Cargo.toml, and a seed
//! directory in corpus/ (tests/corpus.rs writes seeds: add a case to `seeds`).

pub mod alloc;
pub mod codec;
pub mod header;
pub mod inputs;
pub mod stream;

pub use codec::{check_codec_decode, check_codec_roundtrip};
pub use header::check_block_header;
pub use stream::check_get_stream;

/// A target's check: panics on a bug, returns on anything else.
pub type Check = fn(&[u8]);

/// Target names with their checks (tests/corpus.rs replays the committed inputs with them).
pub const TARGETS: &[(&str, Check)] = &[
    ("block_header", check_block_header),
    ("get_stream", check_get_stream),
    ("codec_decode", check_codec_decode),
    ("codec_roundtrip", check_codec_roundtrip),
];

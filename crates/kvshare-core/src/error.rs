//! Errors of the core library.

/// Everything that can go wrong in kvshare-core.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// A KV layout or dtype is malformed.
    #[error("invalid layout: {0}")]
    InvalidLayout(String),
    /// A key is not 32 bytes.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The codec id is unknown.
    #[error(
        "unknown codec {0}; known codecs: 1 (none), 2 (lz4), 3 (byteplane-lz4), 4 (byteplane-zstd), 5 (byteplane-huff)"
    )]
    UnknownCodec(i32),
    /// An encoded payload is malformed or does not decode to the declared length.
    #[error("corrupt payload: {0}")]
    Corrupt(String),
    /// The raw bytes do not match the header checksum.
    #[error(
        "checksum mismatch: header says {expected:#018x}, decoded bytes hash to {actual:#018x}"
    )]
    ChecksumMismatch {
        /// Checksum in the header.
        expected: u64,
        /// Checksum of the decoded bytes.
        actual: u64,
    },
    /// The encoded payload does not hash to the header's payload checksum.
    #[error(
        "payload checksum mismatch: header says {expected:#018x}, the payload bytes hash to {actual:#018x}"
    )]
    PayloadChecksumMismatch {
        /// Payload checksum in the header.
        expected: u64,
        /// Checksum of the payload received.
        actual: u64,
    },
    /// A header is malformed.
    #[error("invalid header: {0}")]
    InvalidHeader(String),
    /// A block does not fit the store at all.
    #[error("block of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the block.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A block is larger than its tenant's whole quota.
    #[error("block of {size} bytes exceeds the tenant's quota of {quota} bytes")]
    OverQuota {
        /// Size of the block (charged bytes).
        size: u64,
        /// The tenant's quota.
        quota: u64,
    },
    /// Token ids do not fill a block, or other caller misuse.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

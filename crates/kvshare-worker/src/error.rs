//! Errors of the worker library.

/// What can go wrong in the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An inconsistent or unknown model configuration.
    #[error("model configuration: {0}")]
    Config(String),
    /// Weights missing, of the wrong shape, or unreadable.
    #[error("weights: {0}")]
    Weights(String),
    /// A prompt the model cannot run (empty, too long, token out of the vocabulary).
    #[error("invalid prompt: {0}")]
    Prompt(String),
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),
    /// K/V bytes that do not fit the namespace's layout.
    #[error("K/V layout: {0}")]
    Layout(String),
    /// The cache tier refused or failed a call that the worker cannot treat as a miss.
    #[error("cache tier: {0}")]
    Client(#[from] kvshare_client::ClientError),
    /// Core (keys, codecs) error.
    #[error(transparent)]
    Core(#[from] kvshare_core::CoreError),
    /// A compute task panicked or was cancelled.
    #[error("compute task failed: {0}")]
    Task(String),
}

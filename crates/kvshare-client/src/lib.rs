//! kvshare-client: async Rust client for a kvshare node.
//!
//! The client hashes token prefixes into block keys ([`Namespace::block_keys`]), compresses
//! blocks on the caller's side (so the network carries compressed bytes), uploads them in
//! chunks, and on the way back reassembles, decompresses and verifies every block's checksum.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kvshare_client::ClientError> {
//! use kvshare_client::{ClientOptions, KvClient};
//! use kvshare_core::{DType, KvLayout, Namespace};
//! let layout = KvLayout { num_layers: 2, num_kv_heads: 2, head_dim: 8, dtype: DType::F16, tokens_per_block: 16 };
//! let ns = Namespace::new("my-model", layout);
//! let mut c = KvClient::connect("http://127.0.0.1:50051", ClientOptions::default()).await?;
//! let tokens: Vec<u32> = (0..64).collect();
//! let hit = c.lookup(&ns, &tokens).await?.hit_blocks;
//! # let _ = hit; Ok(()) }
//! ```

#![warn(missing_docs)]

mod bulk;
pub mod cluster;

pub use cluster::ClusterClient;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvshare_core::keys::pack_keys;
use kvshare_core::wire::{GetAssembler, put_chunks};
use kvshare_core::{BlockKey, Codec, CoreError, EncodedBlock, Namespace};
use kvshare_proto::transport::{
    BearerToken, endpoint_url, kv_client_with_token, mark_no_forward, tune_endpoint,
};
use kvshare_proto::v1 as pb;
use pb::block_outcome::Status as OutcomeStatus;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_client::HealthClient;

pub use kvshare_proto::tls::{ClientTls, IdentityPem, TlsError};
pub use kvshare_proto::transport::{MAX_MESSAGE_BYTES, Secret};

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The token has characters a header cannot carry.
    #[error("the token must be visible ASCII characters (no spaces or control characters)")]
    InvalidToken,
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}: {}", error_chain(source))]
    InvalidEndpoint {
        /// The endpoint.
        endpoint: String,
        /// Why it does not parse.
        #[source]
        source: tonic::transport::Error,
    },
    /// The endpoint is unreachable.
    #[error("cannot connect to {endpoint}: {}", error_chain(source))]
    Connect {
        /// The endpoint.
        endpoint: String,
        /// The transport error.
        #[source]
        source: tonic::transport::Error,
    },
    /// An `https://` endpoint without TLS settings to verify the server with.
    #[error(
        "{endpoint}: an https:// endpoint needs the CA certificate that signs the server's \
         (ClientOptions::tls; --tls-ca / KVSHARE_TLS_CA)"
    )]
    TlsNotConfigured {
        /// The endpoint.
        endpoint: String,
    },
    /// TLS files or PEM text that do not load.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// No member of a cluster answered.
    #[error(
        "no cluster member reachable through {endpoints}{}",
        last.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
    )]
    NoMemberReachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        #[source]
        last: Option<Box<ClientError>>,
    },
    /// The server answered with an error status.
    #[error("{code:?}: {message}")]
    Rpc {
        /// gRPC status code.
        code: tonic::Code,
        /// The server's message.
        message: String,
    },
    /// The server rejected a block of a put.
    #[error("block {index} (key {key}) rejected with {code:?}: {reason}")]
    Rejected {
        /// Index of the block in the upload.
        index: usize,
        /// Its key.
        key: BlockKey,
        /// gRPC status code describing the rejection.
        code: tonic::Code,
        /// The server's reason.
        reason: String,
        /// Outcomes of every block of the upload.
        outcomes: Vec<BlockOutcome>,
    },
    /// A fetched block failed to decode or verify.
    #[error("block {index} (key {key}) is corrupt: {source}")]
    Corrupt {
        /// Index of the block in the request.
        index: usize,
        /// Its key.
        key: BlockKey,
        /// The decode or checksum error.
        source: CoreError,
    },
    /// The server's stream broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Invalid input from the caller.
    #[error(transparent)]
    Core(#[from] CoreError),
}

/// `e` and its causes, joined with ": " (transport errors say little at the top level).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl ClientError {
    /// The gRPC status code of this error, where there is one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { code, .. } | ClientError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        // A status made by the transport (connection lost, TLS alert) says little by itself:
        // add its causes (e.g. "received fatal alert: CertificateRequired").
        let message = match std::error::Error::source(&s) {
            Some(cause) => format!("{}: {}", s.message(), error_chain(cause)),
            None => s.message().to_string(),
        };
        ClientError::Rpc {
            code: s.code(),
            message,
        }
    }
}

/// Client settings. `Debug` never shows the token.
#[derive(Clone)]
pub struct ClientOptions {
    /// Deadline of every call.
    pub timeout: Duration,
    /// Deadline of connection setup.
    pub connect_timeout: Duration,
    /// Largest chunk of a block in one upload message.
    pub chunk_size: usize,
    /// Codec used by [`KvClient::put_prefix`].
    pub codec: Codec,
    /// How long [`ClusterClient`] waits for a key's owner before it also asks the next one (a
    /// hedged read: a frozen owner costs this, not `timeout`).
    pub hedge_after: Duration,
    /// Bearer token sent on every request (`authorization: Bearer <token>`), for nodes that run
    /// with `--auth-file`; `None` sends none.
    pub token: Option<String>,
    /// TLS: the CA that signs the nodes' certificates and, for nodes that require client
    /// certificates (mTLS), this client's certificate and key. Set: every connection uses TLS
    /// (`host:port` and `http://` endpoints become `https://`). See [`ClientOptions::with_tls_files`].
    pub tls: Option<ClientTls>,
    /// Move Get and Put bytes over the node's bulk transport (length-prefixed frames on TCP or
    /// TLS beside gRPC, see `docs/design.md`) when it has one; gRPC otherwise, or when its port
    /// cannot be reached. False: gRPC for everything.
    pub bulk: bool,
}

impl ClientOptions {
    /// These options with TLS from PEM files: the CA certificate(s) that sign the nodes'
    /// certificates, and optionally a client certificate and key (mTLS).
    pub fn with_tls_files(
        self,
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Self, ClientError> {
        Ok(ClientOptions {
            tls: Some(ClientTls::from_files(ca, identity)?),
            ..self
        })
    }

    /// These options with TLS from PEM text (see [`ClientOptions::with_tls_files`]).
    pub fn with_tls_pem(
        self,
        ca_pem: &[u8],
        identity: Option<&IdentityPem>,
    ) -> Result<Self, ClientError> {
        Ok(ClientOptions {
            tls: Some(ClientTls::from_pem(ca_pem, identity)?),
            ..self
        })
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            chunk_size: 1 << 20,
            codec: Codec::BytePlaneHuff,
            hedge_after: Duration::from_millis(250),
            tls: None,
            token: None,
            bulk: true,
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field must be added here too (and cannot carry a secret
        // into logs unnoticed).
        let ClientOptions {
            timeout,
            connect_timeout,
            chunk_size,
            codec,
            hedge_after,
            token,
            tls,
            bulk,
        } = self;
        f.debug_struct("ClientOptions")
            .field("timeout", timeout)
            .field("connect_timeout", connect_timeout)
            .field("chunk_size", chunk_size)
            .field("codec", codec)
            .field("hedge_after", hedge_after)
            .field("token", &token.as_ref().map(|_| "<redacted>"))
            // Certificates are public but the client key is not: say only whether TLS is set.
            .field("tls", &tls.as_ref().map(|_| "<configured>"))
            .field("bulk", bulk)
            .finish()
    }
}

/// What happened to one uploaded block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOutcome {
    /// The key.
    pub key: BlockKey,
    /// Stored, already present or rejected.
    pub status: PutStatus,
    /// Replicas holding the block.
    pub replicas: u32,
}

/// Outcome of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutStatus {
    /// Stored now.
    Stored,
    /// Was already stored.
    AlreadyPresent,
    /// Refused.
    Rejected {
        /// gRPC status code.
        code: tonic::Code,
        /// Reason.
        reason: String,
    },
}

/// Summary of an upload.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PutReport {
    /// One outcome per block.
    pub outcomes: Vec<BlockOutcome>,
    /// Raw bytes of the uploaded blocks.
    pub raw_bytes: u64,
    /// Encoded bytes sent.
    pub wire_bytes: u64,
}

impl PutReport {
    /// Blocks newly stored.
    pub fn stored(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.status == PutStatus::Stored)
            .count()
    }
    /// Blocks that were already present.
    pub fn already_present(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.status == PutStatus::AlreadyPresent)
            .count()
    }
}

/// Result of a prefix lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixLookup {
    /// Keys of every full block of the prompt.
    pub keys: Vec<BlockKey>,
    /// Leading blocks present.
    pub hit_blocks: usize,
}

/// One block to upload.
#[derive(Debug, Clone)]
pub struct PutItem {
    /// Block key.
    pub key: BlockKey,
    /// Key of the previous block of the prefix, if any.
    pub parent: Option<BlockKey>,
    /// The encoded block.
    pub block: EncodedBlock,
}

/// A client of one kvshare node.
#[derive(Clone)]
pub struct KvClient {
    rpc: kvshare_proto::transport::KvClient,
    health: HealthClient<Channel>,
    opts: ClientOptions,
    endpoint: String,
    no_forward: bool,
    /// The node's bulk transport, found at the first Get or Put (shared by clones).
    bulk: Arc<bulk::Discovery>,
}

/// The keys of `tokens`' full blocks and how many leading ones `count_hits(namespace digest,
/// keys)` finds (not asked when the prompt has no full block).
async fn lookup_prefix(
    ns: &Namespace,
    tokens: &[u32],
    count_hits: impl AsyncFnOnce(&BlockKey, &[BlockKey]) -> Result<usize, ClientError>,
) -> Result<PrefixLookup, ClientError> {
    let keys = ns.block_keys(tokens)?;
    let hit_blocks = if keys.is_empty() {
        0
    } else {
        count_hits(&ns.digest(), &keys).await?
    };
    Ok(PrefixLookup { keys, hit_blocks })
}

pub(crate) fn outcome_from_pb(o: &pb::BlockOutcome) -> Result<BlockOutcome, ClientError> {
    let key = BlockKey::from_slice(&o.key)
        .map_err(|_| ClientError::Protocol(format!("outcome key has {} bytes", o.key.len())))?;
    let status = match OutcomeStatus::try_from(o.status) {
        Ok(OutcomeStatus::Stored) => PutStatus::Stored,
        Ok(OutcomeStatus::AlreadyPresent) => PutStatus::AlreadyPresent,
        Ok(OutcomeStatus::Rejected) => PutStatus::Rejected {
            code: tonic::Code::from_i32(o.code),
            reason: o.reason.clone(),
        },
        _ => {
            return Err(ClientError::Protocol(format!(
                "unknown outcome status {}",
                o.status
            )));
        }
    };
    Ok(BlockOutcome {
        key,
        status,
        replicas: o.replicas,
    })
}

impl KvClient {
    /// Connects to a node (`http://host:port`; with [`ClientOptions::tls`], `https://host:port`
    /// or `host:port`).
    pub async fn connect(endpoint: &str, opts: ClientOptions) -> Result<Self, ClientError> {
        if opts.tls.is_none() && endpoint.starts_with("https://") {
            return Err(ClientError::TlsNotConfigured {
                endpoint: endpoint.into(),
            });
        }
        let url = endpoint_url(endpoint, opts.tls.is_some());
        let ep =
            Endpoint::from_shared(url.clone()).map_err(|source| ClientError::InvalidEndpoint {
                endpoint: endpoint.into(),
                source,
            })?;
        BearerToken::new(opts.token.as_deref()).map_err(|_| ClientError::InvalidToken)?;
        let ep = tune_endpoint(ep, opts.connect_timeout).timeout(opts.timeout);
        let channel = kvshare_proto::transport::connect(&ep, opts.tls.as_ref())
            .await
            .map_err(|source| ClientError::Connect {
                endpoint: url.clone(),
                source,
            })?;
        Ok(Self::from_channel(channel, &url, opts))
    }

    /// Wraps an existing channel (a token that cannot be sent, see
    /// [`ClientError::InvalidToken`], is left out: [`KvClient::connect`] refuses it).
    pub fn from_channel(channel: Channel, endpoint: &str, opts: ClientOptions) -> Self {
        let token = BearerToken::new(opts.token.as_deref()).unwrap_or_default();
        KvClient {
            rpc: kv_client_with_token(channel.clone(), token),
            health: HealthClient::new(channel),
            opts,
            endpoint: endpoint.to_string(),
            no_forward: false,
            bulk: Arc::default(),
        }
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The options.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.opts.timeout);
        if self.no_forward {
            mark_no_forward(&mut r);
        }
        r
    }

    /// A client whose requests are answered from the node's own store, never forwarded
    /// (how a smart client talks to a key's owner directly).
    pub fn no_forward(mut self) -> Self {
        self.no_forward = true;
        // Bulk connections say in their BulkOpen whether they forward.
        self.bulk = Arc::default();
        self
    }

    /// The node's bulk transport when this client uses one: found at the first call (the
    /// port from ClusterInfo, then a first connection to it); `None`: gRPC.
    async fn bulk(&self) -> Option<Arc<bulk::Bulk>> {
        if !self.opts.bulk {
            return None;
        }
        let discovery = self.bulk.clone();
        discovery
            .get(async || {
                let mut rpc = self.clone();
                let info = rpc.cluster_info().await.ok()?;
                let port = u16::try_from(info.bulk_port).ok().filter(|&p| p != 0)?;
                let b = bulk::Bulk::new(
                    &self.endpoint,
                    port,
                    self.opts.tls.clone(),
                    self.opts.token.as_ref().map(|t| format!("Bearer {t}")),
                    self.no_forward,
                    self.opts.connect_timeout,
                )?;
                b.probe().await.then_some(b)
            })
            .await
    }

    /// Longest cached prefix of `tokens` in `ns`, in blocks.
    pub async fn lookup(
        &mut self,
        ns: &Namespace,
        tokens: &[u32],
    ) -> Result<PrefixLookup, ClientError> {
        lookup_prefix(ns, tokens, async |d, k| self.lookup_keys(d, k).await).await
    }

    async fn lookup_rpc(
        &mut self,
        namespace: &BlockKey,
        keys: &[BlockKey],
        per_key: bool,
    ) -> Result<pb::LookupResponse, ClientError> {
        let req = pb::LookupRequest {
            namespace: Bytes::copy_from_slice(&namespace.0),
            keys: Vec::new(),
            packed_keys: pack_keys(keys),
            per_key,
        };
        Ok(self.rpc.lookup(self.request(req)).await?.into_inner())
    }

    /// Number of leading `keys` present.
    pub async fn lookup_keys(
        &mut self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<usize, ClientError> {
        let hit = self.lookup_rpc(namespace, keys, false).await?.hit_blocks as usize;
        if hit > keys.len() {
            return Err(ClientError::Protocol(format!(
                "server reports {hit} hits for {} keys",
                keys.len()
            )));
        }
        Ok(hit)
    }

    /// Whether each key is stored (on any owner, or on this node alone for a hop-local client).
    pub async fn presence(
        &mut self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<Vec<bool>, ClientError> {
        let resp = self.lookup_rpc(namespace, keys, true).await?;
        if resp.present.len() != keys.len() {
            return Err(ClientError::Protocol(format!(
                "{} presence flags for {} keys",
                resp.present.len(),
                keys.len()
            )));
        }
        Ok(resp.present)
    }

    /// Compresses and uploads the first `blocks.len()` full blocks of `tokens`; `blocks[i]` is
    /// the raw K/V of block `i` in the namespace's layout.
    pub async fn put_prefix<B: AsRef<[u8]> + Sync>(
        &mut self,
        ns: &Namespace,
        tokens: &[u32],
        blocks: &[B],
    ) -> Result<PutReport, ClientError> {
        let items = prefix_items(ns, tokens, blocks, self.opts.codec)?;
        self.put_blocks(items).await
    }

    /// Uploads encoded blocks (chunked). Fails with [`ClientError::Rejected`] when the server
    /// refuses any block; blocks it accepted stay stored.
    pub async fn put_blocks(&mut self, items: Vec<PutItem>) -> Result<PutReport, ClientError> {
        if items.is_empty() {
            return Ok(PutReport::default());
        }
        let chunk = self.opts.chunk_size.max(1);
        let mut raw_bytes = 0;
        let mut wire_bytes = 0;
        for item in &items {
            raw_bytes += item.block.header.raw_len;
            wire_bytes += item.block.payload.len() as u64;
        }
        let answer = match self.bulk().await {
            Some(b) => b.put(&items, self.opts.timeout).await?,
            None => {
                let msgs = items
                    .iter()
                    .flat_map(|item| {
                        put_chunks(&item.key, item.parent.as_ref(), &item.block, chunk)
                    })
                    .collect::<Vec<_>>();
                let req = self.request(tokio_stream::iter(msgs));
                self.rpc.put(req).await.map(tonic::Response::into_inner)
            }
        };
        match answer {
            Ok(resp) => {
                let outcomes = resp
                    .outcomes
                    .iter()
                    .map(outcome_from_pb)
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(PutReport {
                    outcomes,
                    raw_bytes,
                    wire_bytes,
                })
            }
            Err(status) => Err(rejection_from_status(status)),
        }
    }

    /// Fetches blocks; `None` where a key is missing. Blocks are reassembled but not decoded.
    pub async fn get_blocks(
        &mut self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<EncodedBlock>>, ClientError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let req = pb::GetRequest {
            namespace: Bytes::copy_from_slice(&namespace.0),
            keys: Vec::new(),
            packed_keys: pack_keys(keys),
        };
        if let Some(b) = self.bulk().await {
            return b.get(&req, keys, self.opts.timeout).await;
        }
        let mut stream = self.rpc.get(self.request(req)).await?.into_inner();
        let mut asm = GetAssembler::sharing(keys);
        while let Some(msg) = stream.message().await? {
            asm.push(msg)
                .map_err(|e| ClientError::Protocol(e.to_string()))?;
        }
        asm.finish()
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Fetches, decodes and verifies the cached leading blocks of `tokens`: the raw K/V of
    /// blocks `0..n` where block `n` is the first one missing. A block that fails to decode or
    /// verify is an error ([`ClientError::Corrupt`]), never returned.
    pub async fn get_prefix(
        &mut self,
        ns: &Namespace,
        tokens: &[u32],
    ) -> Result<Vec<Vec<u8>>, ClientError> {
        fetch_prefix(ns, tokens, async |d, k| self.get_blocks(d, k).await).await
    }

    /// Deletes blocks; returns how many existed.
    pub async fn delete_keys(
        &mut self,
        namespace: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<u32, ClientError> {
        let req = pb::DeleteRequest {
            namespace: Bytes::copy_from_slice(&namespace.0),
            keys: Vec::new(),
            packed_keys: pack_keys(keys),
        };
        let resp = self.rpc.delete(self.request(req)).await?;
        Ok(resp.into_inner().deleted)
    }

    /// The node's counters, with its default number of top namespaces.
    pub async fn stats(&mut self) -> Result<pb::StatsResponse, ClientError> {
        self.stats_top(0).await
    }

    /// The node's counters, listing its `top_namespaces` largest namespaces by bytes together
    /// with its `top_namespaces` with most hits (0: the node's default; the node caps it at
    /// 1000).
    pub async fn stats_top(
        &mut self,
        top_namespaces: u32,
    ) -> Result<pb::StatsResponse, ClientError> {
        let req = self.request(pb::StatsRequest { top_namespaces });
        Ok(self.rpc.stats(req).await?.into_inner())
    }

    /// Standard gRPC health check of the KvCache service; true when SERVING.
    pub async fn health(&mut self) -> Result<bool, ClientError> {
        let req = tonic_health::pb::HealthCheckRequest {
            service: "kvshare.v1.KvCache".into(),
        };
        let resp = self.health.check(self.request(req)).await?.into_inner();
        Ok(resp.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }
    /// Cluster membership as the node sees it.
    pub async fn cluster_info(&mut self) -> Result<pb::ClusterInfoResponse, ClientError> {
        let req = self.request(pb::ClusterInfoRequest {});
        Ok(self.rpc.cluster_info(req).await?.into_inner())
    }

    /// Admin: sets the capacity of this node (the one the client is connected to; never
    /// forwarded) to `capacity_bytes`, evicting down to it. Old and new capacity, evicted blocks
    /// and stored bytes in the answer.
    pub async fn set_capacity(
        &mut self,
        capacity_bytes: u64,
    ) -> Result<pb::SetCapacityResponse, ClientError> {
        let req = self.request(pb::SetCapacityRequest { capacity_bytes });
        Ok(self.rpc.set_capacity(req).await?.into_inner())
    }
}

/// Upload items for the first `blocks.len()` full blocks of `tokens` (block `i`'s raw K/V is
/// `blocks[i]`, in the namespace's layout), compressed with `codec`.
pub fn prefix_items<B: AsRef<[u8]> + Sync>(
    ns: &Namespace,
    tokens: &[u32],
    blocks: &[B],
    codec: Codec,
) -> Result<Vec<PutItem>, ClientError> {
    encode_prefix(ns, &ns.block_keys(tokens)?, blocks, codec)
}

/// Fetches the blocks of `tokens` with `get(namespace digest, keys)`, then checks and decodes
/// the leading run of present blocks ([`decode_prefix`]).
pub async fn fetch_prefix(
    ns: &Namespace,
    tokens: &[u32],
    get: impl AsyncFnOnce(&BlockKey, &[BlockKey]) -> Result<Vec<Option<EncodedBlock>>, ClientError>,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let keys = ns.block_keys(tokens)?;
    let blocks = get(&ns.digest(), &keys).await?;
    decode_prefix(ns, &keys, blocks).await
}

/// Encodes the raw K/V of the first `blocks.len()` blocks of a prefix whose keys are `keys`.
pub fn encode_prefix<B: AsRef<[u8]> + Sync>(
    ns: &Namespace,
    keys: &[BlockKey],
    blocks: &[B],
    codec: Codec,
) -> Result<Vec<PutItem>, ClientError> {
    encode_blocks(ns, keys, 0, blocks, codec, 1)
}

/// Encodes blocks `first..first + blocks.len()` of a prefix whose keys are `keys` (each
/// block's parent is the key before it), on up to `threads` threads.
pub fn encode_blocks<B: AsRef<[u8]> + Sync>(
    ns: &Namespace,
    keys: &[BlockKey],
    first: usize,
    blocks: &[B],
    codec: Codec,
    threads: usize,
) -> Result<Vec<PutItem>, ClientError> {
    let end = first.checked_add(blocks.len()).filter(|&e| e <= keys.len());
    if end.is_none() {
        return Err(CoreError::InvalidInput(format!(
            "blocks {first}..{} given but the prompt makes only {} full blocks ({} tokens per block)",
            first.saturating_add(blocks.len()),
            keys.len(),
            ns.tokens_per_block()
        ))
        .into());
    }
    let digest = ns.digest();
    let encode = |j: usize, raw: &B| -> Result<PutItem, ClientError> {
        let i = first + j;
        Ok(PutItem {
            key: keys[i],
            parent: i.checked_sub(1).map(|p| keys[p]),
            block: EncodedBlock::encode(digest, ns.layout, codec, raw.as_ref())?,
        })
    };
    let encoded = kvshare_core::parallel::par_map(blocks, threads, encode, || {
        Err(ClientError::Protocol("an encoding thread panicked".into()))
    });
    encoded.into_iter().collect()
}

/// Checks fetched blocks against the namespace and decodes the leading run of present blocks.
pub async fn decode_prefix(
    ns: &Namespace,
    keys: &[BlockKey],
    blocks: Vec<Option<EncodedBlock>>,
) -> Result<Vec<Vec<u8>>, ClientError> {
    let digest = ns.digest();
    let mut out = Vec::new();
    for (i, b) in blocks.into_iter().enumerate() {
        let Some(b) = b else { break };
        if b.header.namespace != digest || b.header.layout != ns.layout {
            return Err(ClientError::Corrupt {
                index: i,
                key: keys[i],
                source: CoreError::InvalidHeader(
                    "block header does not match the namespace".into(),
                ),
            });
        }
        let raw = decode_blocking(b)
            .await
            .map_err(|source| ClientError::Corrupt {
                index: i,
                key: keys[i],
                source,
            })?;
        out.push(Vec::from(raw));
    }
    Ok(out)
}

/// Decodes a block off the async runtime (decompression is CPU work).
pub async fn decode_blocking(b: EncodedBlock) -> Result<Bytes, CoreError> {
    match tokio::task::spawn_blocking(move || b.decode()).await {
        Ok(r) => r,
        Err(e) => Err(CoreError::Corrupt(format!("decode task failed: {e}"))),
    }
}

/// `outcomes` when no block was rejected, else [`ClientError::Rejected`] naming the first
/// rejected block (with every outcome).
pub(crate) fn fail_on_rejection(
    outcomes: Vec<BlockOutcome>,
) -> Result<Vec<BlockOutcome>, ClientError> {
    let first = outcomes
        .iter()
        .enumerate()
        .find_map(|(i, o)| match &o.status {
            PutStatus::Rejected { code, reason } => Some((i, o.key, *code, reason.clone())),
            _ => None,
        });
    match first {
        Some((index, key, code, reason)) => Err(ClientError::Rejected {
            index,
            key,
            code,
            reason,
            outcomes,
        }),
        None => Ok(outcomes),
    }
}

/// Turns a failed Put's status into [`ClientError::Rejected`] when it carries outcomes.
pub(crate) fn rejection_from_status(status: tonic::Status) -> ClientError {
    let Some(resp) = kvshare_proto::rpc::decode_put_details(status.details()) else {
        return status.into();
    };
    let Ok(outcomes) = resp
        .outcomes
        .iter()
        .map(outcome_from_pb)
        .collect::<Result<Vec<_>, _>>()
    else {
        return status.into();
    };
    match fail_on_rejection(outcomes) {
        Err(e) => e,
        Ok(_) => status.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_options_debug_never_shows_the_token() {
        let opts = ClientOptions {
            token: Some("tok-9f2c-secret".into()),
            ..Default::default()
        };
        let shown = format!("{opts:?} {opts:#?}");
        assert!(!shown.contains("tok-9f2c-secret"), "{shown}");
        assert!(shown.contains("token: Some(\"<redacted>\")"), "{shown}");
        assert!(shown.contains("chunk_size: 1048576"), "{shown}");
        let none = format!("{:?}", ClientOptions::default());
        assert!(none.contains("token: None"), "{none}");
    }
}

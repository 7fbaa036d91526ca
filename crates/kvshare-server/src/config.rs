//! Node configuration: command-line flags, each with an environment variable (12-factor).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use kvshare_core::size::parse_size;

use crate::capacity::{CapacityError, auto_capacity_from_cgroup};

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// `--capacity`: a size, or `auto`.
fn capacity_arg(s: &str) -> Result<Capacity, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(Capacity::Auto);
    }
    parse_size(s)
        .map(Capacity::Bytes)
        .map_err(|e| format!("{e}; or `auto` to derive it from the container's memory limit"))
}

/// How the store's capacity is set at start (`--capacity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capacity {
    /// This many bytes.
    Bytes(u64),
    /// The container's cgroup memory limit minus `--buffer-budget` minus
    /// [`RUNTIME_HEADROOM_BYTES`](crate::capacity::RUNTIME_HEADROOM_BYTES)
    /// (see [`capacity`](crate::capacity)).
    Auto,
}

impl std::fmt::Display for Capacity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Capacity::Bytes(b) => write!(f, "{b}"),
            Capacity::Auto => f.write_str("auto"),
        }
    }
}

/// `--bulk-addr`: `auto`, `off`, or an address.
fn bulk_addr_arg(s: &str) -> Result<BulkAddr, String> {
    match s.trim() {
        a if a.eq_ignore_ascii_case("auto") => Ok(BulkAddr::Auto),
        a if a.eq_ignore_ascii_case("off") => Ok(BulkAddr::Off),
        a => a.parse().map(BulkAddr::At).map_err(|e| {
            format!("{e}; give IP:PORT, `auto` (the gRPC address' IP, a free port) or `off`")
        }),
    }
}

/// Where the bulk transport listens (`--bulk-addr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkAddr {
    /// The gRPC listen address' IP, a free port.
    Auto,
    /// No bulk transport: clients use gRPC for everything.
    Off,
    /// This address.
    At(SocketAddr),
}

/// `--bulk-priority`: `idle` or a nice increment from 0 to 19.
fn bulk_priority_arg(s: &str) -> Result<BulkPriority, String> {
    match s.trim() {
        a if a.eq_ignore_ascii_case("idle") => Ok(BulkPriority::Idle),
        a => match a.parse::<i32>() {
            Ok(n) if (0..=19).contains(&n) => Ok(BulkPriority::Nice(n)),
            _ => Err(format!(
                "`{a}` is not a priority; give `idle` (SCHED_IDLE) or a nice increment from 0 to 19"
            )),
        },
    }
}

/// CPU priority of the bulk transport's threads next to the node's gRPC threads
/// (`--bulk-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkPriority {
    /// Linux `SCHED_IDLE`: the threads run when no other thread of the node's CPU cgroup wants
    /// the core, so a Lookup never waits behind a block transfer.
    Idle,
    /// `SCHED_OTHER`, this much nicer than the node's other threads.
    Nice(i32),
}

impl std::fmt::Display for BulkPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BulkPriority::Idle => f.write_str("idle"),
            BulkPriority::Nice(n) => write!(f, "{n}"),
        }
    }
}

/// Format of the node's log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Configuration of one cache node (`kvshared --help` lists every flag).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kvshared",
    version,
    about = "kvshare cache node: a gRPC KV-cache block store with a hard memory cap"
)]
pub struct ServerConfig {
    /// Stable node id (defaults to the host name; on Kubernetes, the pod name).
    #[arg(long, env = "KVSHARE_NODE_ID")]
    pub node_id: Option<String>,

    /// gRPC listen address. Port 0 picks a free port.
    #[arg(long, env = "KVSHARE_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// Bulk-transport listen address: Get and Put bytes as length-prefixed frames on TCP (TLS
    /// when the gRPC port has TLS) beside gRPC, cheaper per byte than HTTP/2; clients learn the
    /// port from ClusterInfo and fall back to gRPC when they cannot reach it. `auto`: the gRPC
    /// address' IP and a free port; `off`: none; or IP:PORT (fixed, e.g. for a firewall or a
    /// Kubernetes containerPort).
    #[arg(long, env = "KVSHARE_BULK_ADDR", default_value = "auto", value_parser = bulk_addr_arg)]
    pub bulk_addr: BulkAddr,

    /// CPU priority of the bulk transport's threads: a nice increment from 0 to 19 (default
    /// 10: about a tenth of a contended core, so Lookups and health checks rarely wait behind
    /// block transfers, and transfers never stop), or `idle` (Linux `SCHED_IDLE`: they take a
    /// core only when no other thread of the node's CPU cgroup wants it). Use `idle` only where
    /// the node has a CPU cgroup of its own (a container, a systemd service, as in the Kubernetes
    /// manifests): a CPU-bound process in the same cgroup slows its transfers to a crawl (a
    /// 128 MiB Put beside two busy loops: 9 of 30 took over 10 s).
    #[arg(long, env = "KVSHARE_BULK_PRIORITY", default_value = "10", value_parser = bulk_priority_arg)]
    pub bulk_priority: BulkPriority,

    /// HTTP listen address for /metrics, /api/stats, /healthz and /readyz. Port 0 picks a free port.
    #[arg(long, env = "KVSHARE_HTTP_ADDR", default_value = "0.0.0.0:9090")]
    pub http_addr: SocketAddr,

    /// Hard limit on stored bytes (payloads plus 256 bytes of index per block), e.g. 8GiB; or
    /// `auto`: the container's cgroup memory limit minus --buffer-budget minus 256MiB of runtime
    /// headroom (refuses to start without a memory limit). Changeable at run time with the
    /// SetCapacity RPC (`kvshare capacity set`).
    #[arg(long, env = "KVSHARE_CAPACITY", default_value = "1GiB", value_parser = capacity_arg)]
    pub capacity: Capacity,

    /// Largest accepted block, raw (decoded) size, e.g. 64MiB. Larger puts get RESOURCE_EXHAUSTED.
    #[arg(long, env = "KVSHARE_MAX_BLOCK_SIZE", default_value = "64MiB", value_parser = size_arg)]
    pub max_block_size: u64,

    /// Memory budget for buffered bytes: uploads still arriving (charged as bytes arrive), the
    /// decode buffers that verify them, blocks fetched from peers for forwarded Gets, and Get
    /// responses on their way out. A request that finds it full waits up to --budget-wait-ms,
    /// then fails with RESOURCE_EXHAUSTED. RSS stays within capacity + this + a fixed overhead.
    #[arg(long, alias = "max-inflight-put", env = "KVSHARE_BUFFER_BUDGET", default_value = "512MiB", value_parser = size_arg)]
    pub buffer_budget: u64,

    /// How long a request waits for room in --buffer-budget before RESOURCE_EXHAUSTED (ms).
    #[arg(
        long,
        alias = "put-wait-ms",
        env = "KVSHARE_BUDGET_WAIT_MS",
        default_value_t = 5_000
    )]
    pub budget_wait_ms: u64,

    /// An upload that delivers no message for this long fails with DEADLINE_EXCEEDED, and a
    /// Get whose client reads nothing for this long is ended; both free their buffers (ms).
    #[arg(long, env = "KVSHARE_STREAM_IDLE_TIMEOUT_MS", default_value_t = 10_000)]
    pub stream_idle_timeout_ms: u64,

    /// Slowest accepted upload rate, bytes per second: a block must arrive within
    /// --stream-idle-timeout-ms + its size / this rate, e.g. 64KiB.
    #[arg(long, env = "KVSHARE_PUT_MIN_RATE", default_value = "64KiB", value_parser = size_arg)]
    pub put_min_rate: u64,

    /// A connection that has not sent the HTTP/2 preface and SETTINGS within this long is
    /// closed (milliseconds).
    #[arg(long, env = "KVSHARE_HANDSHAKE_TIMEOUT_MS", default_value_t = 5_000)]
    pub handshake_timeout_ms: u64,

    /// Most open gRPC connections; more are closed as they arrive.
    #[arg(long, env = "KVSHARE_MAX_CONNECTIONS", default_value_t = 4_096)]
    pub max_connections: usize,

    /// Most concurrent requests (HTTP/2 streams) on one gRPC connection.
    #[arg(
        long,
        env = "KVSHARE_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 256
    )]
    pub max_streams_per_connection: u32,

    /// Largest chunk of a block in one Get response message, e.g. 1MiB.
    #[arg(long, env = "KVSHARE_GET_CHUNK_SIZE", default_value = "1MiB", value_parser = size_arg)]
    pub get_chunk_size: u64,

    /// Most keys accepted in one Lookup, Get or Delete.
    #[arg(long, env = "KVSHARE_MAX_KEYS", default_value_t = 65_536)]
    pub max_keys: usize,

    /// Log filter (tracing EnvFilter syntax), e.g. info or kvshare_server=debug.
    #[arg(long, env = "KVSHARE_LOG", default_value = "info")]
    pub log_level: String,

    /// Log format: text or json.
    #[arg(long, env = "KVSHARE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Write the bound addresses as JSON ({"grpc": "...", "http": "..."}) to this file once
    /// listening (for scripts and tests that use port 0).
    #[arg(long, env = "KVSHARE_PORT_FILE")]
    pub port_file: Option<PathBuf>,

    /// Static peers: gRPC addresses (host:port) of the other nodes, comma-separated. Listing this
    /// node's own address too is fine (it is recognised by its node id).
    #[arg(long, env = "KVSHARE_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// DNS name resolving to every node's address (e.g. a Kubernetes headless Service),
    /// as NAME:PORT; re-resolved every --dns-interval-ms.
    #[arg(long, env = "KVSHARE_PEERS_DNS")]
    pub peers_dns: Option<String>,

    /// Replicas per block (default: 2 when the node has peers, else 1).
    #[arg(long, env = "KVSHARE_REPLICAS")]
    pub replicas: Option<usize>,

    /// Address other nodes and smart clients reach this node's gRPC port at (default: the
    /// listen address, or HOSTNAME:port when listening on all interfaces).
    #[arg(long, env = "KVSHARE_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// Interval between health checks of each peer (milliseconds).
    #[arg(long, env = "KVSHARE_PEER_HEALTH_INTERVAL_MS", default_value_t = 1_000)]
    pub peer_health_interval_ms: u64,

    /// Deadline of one peer health check (milliseconds).
    #[arg(long, env = "KVSHARE_PEER_HEALTH_TIMEOUT_MS", default_value_t = 500)]
    pub peer_health_timeout_ms: u64,

    /// Consecutive failed health checks that mark a peer down (a failed forwarded request
    /// only makes the peer checked at once).
    #[arg(long, env = "KVSHARE_PEER_FAILURE_THRESHOLD", default_value_t = 2)]
    pub peer_failure_threshold: u32,

    /// Deadline of a request forwarded to a peer (milliseconds).
    #[arg(long, env = "KVSHARE_FORWARD_TIMEOUT_MS", default_value_t = 5_000)]
    pub forward_timeout_ms: u64,

    /// A read (Lookup, Get) waits this long for a key's owner before it also asks the key's
    /// next owner; a frozen or overloaded owner costs a read this delay (milliseconds).
    #[arg(long, env = "KVSHARE_HEDGE_AFTER_MS", default_value_t = 250)]
    pub hedge_after_ms: u64,

    /// A member down this long has its blocks copied from the surviving owners to the owners
    /// that replace it (milliseconds). A member that returns or joins is caught up at once.
    #[arg(long, env = "KVSHARE_REREPLICATE_AFTER_MS", default_value_t = 30_000)]
    pub rereplicate_after_ms: u64,

    /// Interval of the periodic re-replication sweep (milliseconds).
    #[arg(long, env = "KVSHARE_REBALANCE_INTERVAL_MS", default_value_t = 600_000)]
    pub rebalance_interval_ms: u64,

    /// Most bytes per second re-replication copies to other nodes, e.g. 64MiB.
    #[arg(long, env = "KVSHARE_REREPLICATE_RATE", default_value = "64MiB", value_parser = size_arg)]
    pub rereplicate_rate: u64,

    /// Interval between DNS resolutions of --peers-dns (milliseconds).
    #[arg(long, env = "KVSHARE_DNS_INTERVAL_MS", default_value_t = 10_000)]
    pub dns_interval_ms: u64,

    /// Namespaces listed by Stats, /api/stats and /metrics: the N largest by bytes together
    /// with the N with most hits (1 to 1000). A Stats request may ask for up to 1000.
    #[arg(long, env = "KVSHARE_STATS_TOP_NAMESPACES", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub stats_top_namespaces: u32,

    /// Seconds to wait for in-flight requests on SIGTERM before exiting anyway.
    #[arg(long, env = "KVSHARE_DRAIN_SECONDS", default_value_t = 20)]
    pub drain_seconds: u64,

    /// Directory for the store snapshot: on SIGTERM, after draining, the stored blocks are
    /// written to DIR/store.snapshot; on start, that file is loaded (before /readyz turns
    /// ready) and deleted. Unset: nothing is kept across restarts.
    #[arg(long, env = "KVSHARE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Tokens, roles, tenants and quotas (TOML; see docs/security.md). Clients then need
    /// `authorization: Bearer <token>`. Re-read when it changes and on SIGHUP; a file that does
    /// not parse refuses the start (and, on reload, keeps the previous configuration).
    #[arg(long, env = "KVSHARE_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// File holding the token this node sends to its peers (role `peer` or `admin` in their
    /// --auth-file). KVSHARE_PEER_TOKEN gives the token itself instead.
    #[arg(long, env = "KVSHARE_PEER_TOKEN_FILE")]
    pub peer_token_file: Option<PathBuf>,

    /// The peer token itself, from the environment only (--peer-token-file wins).
    #[arg(
        long = "peer-token",
        env = "KVSHARE_PEER_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub peer_token: Option<kvshare_proto::transport::Secret>,

    /// Without --auth-file, serve clients from any address even when listening on a
    /// non-loopback address (protected mode off). Anyone who can reach the node can then read,
    /// overwrite and delete every block.
    #[arg(long, env = "KVSHARE_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// With --auth-file, /metrics also requires a token (any role).
    #[arg(long, env = "KVSHARE_METRICS_AUTH")]
    pub metrics_auth: bool,

    /// TLS certificate chain (PEM, leaf first). With --tls-key: TLS on the gRPC and HTTP ports.
    /// Re-read when the file changes (checked every second) or on SIGHUP; new connections get
    /// the new certificate, open ones keep theirs. Under mTLS it is also the client certificate
    /// this node presents to its peers. SANs: every name clients and peers dial (see
    /// docs/security.md).
    #[arg(long, env = "KVSHARE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1), reloaded with it.
    #[arg(long, env = "KVSHARE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign client certificates: clients must present a certificate
    /// signed by one of them (mTLS), peers included. Reloaded with --tls-cert.
    #[arg(long, env = "KVSHARE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// CA certificates (PEM) that sign the peers' server certificates (default:
    /// --tls-client-ca). Needed with TLS and peers. Reloaded with --tls-cert.
    #[arg(long, env = "KVSHARE_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,

    /// DNS name every peer's certificate carries, to verify peers against instead of the host
    /// of their address: needed when peers are dialled by IP address (--peers-dns), e.g. the
    /// headless Service's name. Unset: a peer's certificate must name the host it is dialled at.
    #[arg(long, env = "KVSHARE_TLS_PEER_NAME", requires = "tls_cert")]
    pub tls_peer_name: Option<String>,

    /// Interval between checks of the TLS files for changes (milliseconds).
    #[arg(long, env = "KVSHARE_TLS_RELOAD_INTERVAL_MS", default_value_t = 1_000)]
    pub tls_reload_interval_ms: u64,
}

impl ServerConfig {
    /// Defaults suitable for an embedded node on loopback with ephemeral ports.
    pub fn local(capacity: u64) -> Self {
        let mut c = ServerConfig::parse_from(["kvshared"]);
        c.grpc_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c.http_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        c.capacity = Capacity::Bytes(capacity);
        c
    }

    /// The capacity to start with: `--capacity` in bytes, or what `auto` derives from the
    /// cgroup memory limit (with the limit, for the log).
    pub fn resolved_capacity(&self) -> Result<(u64, Option<u64>), CapacityError> {
        match self.capacity {
            Capacity::Bytes(b) => Ok((b, None)),
            Capacity::Auto => auto_capacity_from_cgroup(self.buffer_budget)
                .map(|(capacity, limit)| (capacity, Some(limit))),
        }
    }

    /// The TLS files, when TLS is on (`--tls-cert` and `--tls-key`).
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
            peer_ca: self.tls_ca.clone(),
        })
    }

    /// The node id: `--node-id`, else the host name, else `kvshare-node`.
    pub fn resolved_node_id(&self) -> String {
        self.node_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "kvshare-node".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let c = ServerConfig::try_parse_from([
            "kvshared",
            "--capacity",
            "8GiB",
            "--max-block-size",
            "4MiB",
        ])
        .expect("parse");
        assert_eq!(c.capacity, Capacity::Bytes(8 << 30));
        assert_eq!(c.max_block_size, 4 << 20);
        assert!(ServerConfig::try_parse_from(["kvshared", "--capacity", "lots"]).is_err());
        for auto in ["auto", "AUTO"] {
            let c = ServerConfig::try_parse_from(["kvshared", "--capacity", auto]).expect("auto");
            assert_eq!(c.capacity, Capacity::Auto);
        }
        assert_eq!(
            ServerConfig::local(1 << 20).resolved_capacity().ok(),
            Some((1 << 20, None))
        );
        assert_eq!(c.stats_top_namespaces, 50);
        assert_eq!(c.data_dir, None);
        assert_eq!(c.bulk_priority, BulkPriority::Nice(10));
        for (arg, want) in [("IDLE", BulkPriority::Idle), ("0", BulkPriority::Nice(0))] {
            let c = ServerConfig::try_parse_from(["kvshared", "--bulk-priority", arg])
                .expect("a priority");
            assert_eq!(c.bulk_priority, want);
        }
        let c = ServerConfig::try_parse_from(["kvshared", "--bulk-priority", "19"]).expect("19");
        assert_eq!(c.bulk_priority.to_string(), "19");
        for bad in ["20", "-1", "low"] {
            assert!(ServerConfig::try_parse_from(["kvshared", "--bulk-priority", bad]).is_err());
        }
        let c = ServerConfig::try_parse_from(["kvshared", "--data-dir", "/var/lib/kvshare"])
            .expect("parse");
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/kvshare")));
        let c = ServerConfig::try_parse_from(["kvshared", "--stats-top-namespaces", "7"])
            .expect("parse");
        assert_eq!(c.stats_top_namespaces, 7);
        assert_eq!(c.tls_files(), None);
        assert!(ServerConfig::try_parse_from(["kvshared", "--tls-cert", "c.pem"]).is_err());
        assert!(ServerConfig::try_parse_from(["kvshared", "--tls-client-ca", "ca.pem"]).is_err());
        let c = ServerConfig::try_parse_from([
            "kvshared",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--tls-client-ca",
            "ca.pem",
        ])
        .expect("parse");
        let files = c.tls_files().expect("tls on");
        assert_eq!(files.peer_ca(), Some(std::path::Path::new("ca.pem")));
        assert_eq!(c.auth_file, None);
        assert!(!c.insecure_no_auth && !c.metrics_auth);
        let c = ServerConfig::try_parse_from([
            "kvshared",
            "--auth-file",
            "/etc/kvshare/auth.toml",
            "--peer-token-file",
            "/run/secrets/peer",
            "--insecure-no-auth",
            "--metrics-auth",
        ])
        .expect("parse");
        assert_eq!(c.auth_file, Some(PathBuf::from("/etc/kvshare/auth.toml")));
        assert_eq!(c.peer_token_file, Some(PathBuf::from("/run/secrets/peer")));
        assert!(c.insecure_no_auth && c.metrics_auth);
        // The peer token (normally from KVSHARE_PEER_TOKEN) is kept but never printed.
        let c = ServerConfig::try_parse_from(["kvshared", "--peer-token", "p33r-s3cret"])
            .expect("parse");
        assert_eq!(
            c.peer_token.as_ref().map(|t| t.expose()),
            Some("p33r-s3cret")
        );
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("p33r-s3cret") && shown.contains("peer_token: Some(<redacted>)"),
            "{shown}"
        );
        for bad in ["0", "1001"] {
            assert!(
                ServerConfig::try_parse_from(["kvshared", "--stats-top-namespaces", bad]).is_err()
            );
        }
    }
}

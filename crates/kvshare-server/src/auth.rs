//! Who may do what: bearer tokens, roles, tenants, quotas (`--auth-file`), and protected mode.
//!
//! # The auth file
//!
//! ```toml
//! [tenants.team-a]
//! quota = "8GiB"            # optional: most bytes this tenant may hold on each node
//! [[tokens]]
//! tenant = "team-a"
//! role = "writer"           # reader | writer | admin | peer
//! sha256 = "<hex SHA-256 of the token>"
//! ```
//!
//! Only digests are stored. A presented token is hashed with SHA-256 and compared with every
//! configured digest in constant time, without stopping at a match. The file is re-read when it
//! changes (polled every [`RELOAD_POLL`]) and on SIGHUP; a file that does not parse keeps the
//! previous configuration in force (logged, counted in `kvshare_auth_reload_failures_total`).
//!
//! # Roles ([`required_role`])
//!
//! | RPC | reader | writer | admin | peer |
//! |-----|--------|--------|-------|------|
//! | Lookup, Get | own tenant | own tenant | any tenant | forwarded only |
//! | Put, Delete | no | own tenant | any tenant | forwarded only |
//! | Stats | own tenant | own tenant | every tenant | every tenant |
//! | ClusterInfo | yes | yes | yes | yes |
//! | SetCapacity | no | no | yes | no |
//!
//! "Forwarded only": with the do-not-forward header, as nodes send. A `peer` or `admin` caller
//! may name the tenant it acts for in [`TENANT_HEADER`] (its Stats are then that tenant's
//! only); anyone else's header is ignored. "Own tenant" for Stats: the tenant's blocks, bytes,
//! hits, evictions and namespaces, with none of the node-wide counters; the HTTP `/api/stats`
//! and `/api/cluster` follow the same rule (`crate::http`).
//!
//! # Tenants
//!
//! A request's namespace is replaced by [`Tenant::space`] of it before the store sees it, so two
//! tenants that send the same namespace and keys never share blocks. The default tenant maps
//! every namespace to itself, so a node without `--auth-file` stores exactly what it stored
//! before tenants existed. Forwarded requests carry the caller's namespace as sent plus
//! [`TENANT_HEADER`]; the receiving node maps it once.
//!
//! # Protected mode
//!
//! Without `--auth-file`, a node listening on a non-loopback address answers only clients
//! connecting from loopback, unless started with `--insecure-no-auth` (as Redis does).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kvshare_core::size::parse_size;
use kvshare_core::{BlockKey, BlockStore, DEFAULT_TENANT, TenantId};
use kvshare_proto::transport::{AUTHORIZATION_HEADER, TENANT_HEADER};
use parking_lot::RwLock;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use tokio::sync::watch;
use tonic::Status;
use tracing::{error, info, warn};

use crate::metrics::{Method, Metrics};

/// How often the auth file's identity (inode, length, mtime) is checked for a change.
pub const RELOAD_POLL: Duration = Duration::from_millis(500);

/// Longest tenant name.
pub const MAX_TENANT_NAME_LEN: usize = 64;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Lookup, Get and Stats of its own tenant.
    Reader,
    /// A reader that may also Put and Delete.
    Writer,
    /// Everything, for every tenant.
    Admin,
    /// Another node: forwarded requests (with the do-not-forward header), for the tenant it
    /// names; Stats; ClusterInfo.
    Peer,
}

impl Role {
    /// The role's name in the auth file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
            Role::Peer => "peer",
        }
    }
}

/// Errors reading an auth file.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML of the expected shape.
    #[error("the auth file {path} is invalid: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The peer token file could not be read or is unusable.
    #[error("the peer token from {source_name} is unusable: {message}")]
    PeerToken {
        /// `--peer-token-file PATH` or `KVSHARE_PEER_TOKEN`.
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTenant {
    quota: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToken {
    tenant: Option<String>,
    role: Role,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    tenants: HashMap<String, FileTenant>,
    #[serde(default)]
    tokens: Vec<FileToken>,
}

/// One configured token.
#[derive(Debug, Clone)]
struct TokenEntry {
    digest: [u8; 32],
    role: Role,
    tenant: Arc<str>,
}

/// A parsed auth file: tokens (digests only) and tenants with their quotas.
#[derive(Debug, Clone, Default)]
pub struct AuthTable {
    tokens: Vec<TokenEntry>,
    /// Every tenant the file names, with its quota in bytes (if any).
    pub tenants: HashMap<String, Option<u64>>,
}

/// Whether `name` is a usable tenant name: 1 to [`MAX_TENANT_NAME_LEN`] characters of
/// `A-Z a-z 0-9 . _ -`.
pub fn valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TENANT_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl AuthTable {
    /// Parses the text of an auth file (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, AuthError> {
        let invalid = |message: String| AuthError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: AuthFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut tenants = HashMap::new();
        for (name, t) in &file.tenants {
            if !valid_tenant_name(name) {
                return Err(invalid(format!(
                    "tenant name {name:?}: use 1 to {MAX_TENANT_NAME_LEN} characters of A-Z a-z 0-9 . _ -"
                )));
            }
            let quota = match &t.quota {
                None => None,
                Some(q) => Some(
                    parse_size(q)
                        .map_err(|e| invalid(format!("tenants.{name}.quota = {q:?}: {e}")))?,
                ),
            };
            if quota == Some(0) {
                return Err(invalid(format!(
                    "tenants.{name}.quota is 0: remove the quota or give a size such as \"8GiB\""
                )));
            }
            tenants.insert(name.clone(), quota);
        }
        let mut seen = HashSet::new();
        let mut tokens = Vec::with_capacity(file.tokens.len());
        for (i, t) in file.tokens.iter().enumerate() {
            let what = format!("tokens[{i}]");
            let hex = t.sha256.trim();
            let digest: [u8; 32] = hex::decode(hex)
                .ok()
                .and_then(|d| d.try_into().ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "{what}.sha256 must be 64 hex digits (the SHA-256 of the token, e.g. `printf %s TOKEN | sha256sum`)"
                    ))
                })?;
            if !seen.insert(digest) {
                return Err(invalid(format!(
                    "{what}.sha256 appears twice: each token must be listed once"
                )));
            }
            let tenant = match (&t.tenant, t.role) {
                (Some(name), _) => {
                    if !tenants.contains_key(name) {
                        return Err(invalid(format!(
                            "{what}.tenant = {name:?} is not declared: add a [tenants.{name}] table"
                        )));
                    }
                    name.clone()
                }
                (None, Role::Admin | Role::Peer) => DEFAULT_TENANT.to_string(),
                (None, role) => {
                    return Err(invalid(format!(
                        "{what} (role {}) has no tenant: reader and writer tokens belong to a tenant",
                        role.as_str()
                    )));
                }
            };
            tokens.push(TokenEntry {
                digest,
                role: t.role,
                tenant: Arc::from(tenant),
            });
        }
        Ok(AuthTable { tokens, tenants })
    }

    /// Reads and parses the auth file at `path`.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The entry of `token`: its SHA-256 is compared with every configured digest in constant
    /// time (no early exit, no data-dependent branch until the end).
    fn find(&self, token: &str) -> Option<&TokenEntry> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = Choice::from(0);
        let mut index = 0u64;
        for (i, t) in self.tokens.iter().enumerate() {
            let eq = t.digest.ct_eq(&digest);
            index.conditional_assign(&(i as u64), eq);
            found |= eq;
        }
        if bool::from(found) {
            self.tokens.get(index as usize)
        } else {
            None
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Its role.
    pub role: Role,
    /// The tenant of its token.
    pub tenant: Arc<str>,
}

/// The role a method needs, for a request with (`no_forward`) or without the do-not-forward
/// header: `Ok` when `role` may call it, else the denial's message.
pub fn required_role(method: Method, no_forward: bool, role: Role) -> Result<(), String> {
    let name = method_name(method);
    let peer_ok = no_forward && role == Role::Peer;
    let needs = match method {
        Method::lookup | Method::get => {
            if matches!(role, Role::Reader | Role::Writer | Role::Admin) || peer_ok {
                return Ok(());
            }
            "reader, writer or admin"
        }
        Method::put | Method::delete => {
            if matches!(role, Role::Writer | Role::Admin) || peer_ok {
                return Ok(());
            }
            "writer or admin"
        }
        Method::stats | Method::cluster_info => return Ok(()),
        Method::set_capacity => {
            if role == Role::Admin {
                return Ok(());
            }
            "admin"
        }
    };
    let hint = if role == Role::Peer {
        " (peer tokens only make node-to-node requests, which carry the do-not-forward header)"
    } else {
        ""
    };
    Err(format!(
        "a token with role {} may not call {name}: it needs role {needs}{hint}",
        role.as_str()
    ))
}

fn method_name(method: Method) -> &'static str {
    match method {
        Method::lookup => "Lookup",
        Method::put => "Put",
        Method::get => "Get",
        Method::delete => "Delete",
        Method::stats => "Stats",
        Method::cluster_info => "ClusterInfo",
        Method::set_capacity => "SetCapacity",
    }
}

/// The tenant a request acts for, with its id in the node's store.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// Id in the node's store.
    pub id: TenantId,
    /// Name.
    pub name: Arc<str>,
}

impl Tenant {
    /// The default tenant (every request of a node without `--auth-file`).
    pub fn default_tenant() -> Self {
        Tenant {
            id: TenantId::DEFAULT,
            name: Arc::from(DEFAULT_TENANT),
        }
    }

    /// Whether this is the default tenant.
    pub fn is_default(&self) -> bool {
        &*self.name == DEFAULT_TENANT
    }

    /// The namespace under which this tenant's blocks of namespace `ns` are stored: `ns` itself
    /// for the default tenant, else SHA-256 of (`"kvshare/tenant/v1"`, 0x00, tenant name, 0x00,
    /// `ns`).
    pub fn space(&self, ns: BlockKey) -> BlockKey {
        tenant_space(&self.name, ns)
    }
}

/// A request's namespace as the client sent it (`wire`, what forwarded requests carry) and as
/// this node stores it (`store`, [`Tenant::space`] of it), with the tenant.
#[derive(Debug, Clone)]
pub struct Space {
    /// The tenant.
    pub tenant: Tenant,
    /// The namespace the client sent.
    pub wire: BlockKey,
    /// The namespace the store uses.
    pub store: BlockKey,
}

impl Tenant {
    /// The space of namespace `wire` for this tenant.
    pub fn space_of(&self, wire: BlockKey) -> Space {
        Space {
            tenant: self.clone(),
            wire,
            store: self.space(wire),
        }
    }
}

/// See [`Tenant::space`].
pub fn tenant_space(tenant: &str, ns: BlockKey) -> BlockKey {
    if tenant == DEFAULT_TENANT {
        return ns;
    }
    let mut h = Sha256::new();
    h.update(b"kvshare/tenant/v1\0");
    h.update(tenant.as_bytes());
    h.update([0u8]);
    h.update(ns.0);
    BlockKey(h.finalize().into())
}

/// The auth state of a node: the table in force (none: auth off), protected mode, the token the
/// node sends to its peers.
pub struct Auth {
    table: RwLock<Option<Arc<AuthTable>>>,
    path: Option<PathBuf>,
    /// Protected mode is on: no auth file, a non-loopback listener, no `--insecure-no-auth`.
    protected: bool,
    /// Started with `--insecure-no-auth` (and no auth file).
    insecure: bool,
    /// `/metrics` needs a token (`--metrics-auth`).
    metrics_auth: bool,
    /// Tenant names whose quota this node set in the store (to clear them on reload).
    quota_set: parking_lot::Mutex<HashSet<String>>,
}

/// Message of a refusal in protected mode.
pub const PROTECTED_MODE_MESSAGE: &str = "this node runs in protected mode: it listens on a non-loopback address without --auth-file, so it answers only clients on loopback. Start it with --auth-file PATH (tokens; see docs/security.md), or with --insecure-no-auth to let anyone who can reach it read and write every block";

/// Whether `ip` is loopback (IPv4-mapped IPv6 loopback included).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

impl Auth {
    /// Auth from the flags: `auth_file` (read now; an unusable file fails the start),
    /// `insecure_no_auth`, `metrics_auth`, and the gRPC and HTTP listen addresses (protected
    /// mode is on when either is not loopback).
    pub fn new(
        auth_file: Option<&Path>,
        insecure_no_auth: bool,
        metrics_auth: bool,
        listen: &[SocketAddr],
    ) -> Result<Self, AuthError> {
        let table = match auth_file {
            Some(p) => Some(Arc::new(AuthTable::load(p)?)),
            None => None,
        };
        let exposed = listen.iter().any(|a| !is_loopback(a.ip()));
        Ok(Auth {
            protected: table.is_none() && exposed && !insecure_no_auth,
            insecure: table.is_none() && insecure_no_auth,
            table: RwLock::new(table),
            path: auth_file.map(Path::to_path_buf),
            metrics_auth,
            quota_set: parking_lot::Mutex::new(HashSet::new()),
        })
    }

    /// No auth, no protected mode (embedded nodes and tests).
    pub fn disabled() -> Self {
        Auth {
            table: RwLock::new(None),
            path: None,
            protected: false,
            insecure: false,
            metrics_auth: false,
            quota_set: parking_lot::Mutex::new(HashSet::new()),
        }
    }

    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        self.table.read().is_some()
    }

    /// Whether protected mode is on.
    pub fn protected(&self) -> bool {
        self.protected
    }

    /// Whether the node was started with `--insecure-no-auth` (and no auth file).
    pub fn insecure(&self) -> bool {
        self.insecure
    }

    /// Whether `/metrics` needs a token.
    pub fn metrics_auth(&self) -> bool {
        self.metrics_auth && self.enabled()
    }

    /// Refuses a client from a non-loopback address in protected mode (`remote`: `None` when
    /// the transport does not say, which protected mode also refuses).
    pub fn check_remote(&self, remote: Option<SocketAddr>) -> Result<(), Status> {
        if self.protected && !remote.is_some_and(|r| is_loopback(r.ip())) {
            return Err(Status::permission_denied(PROTECTED_MODE_MESSAGE));
        }
        Ok(())
    }

    /// The caller presenting the `authorization` value `header` (`None`: no header). `Ok(None)`
    /// when auth is off.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Option<Caller>, Status> {
        let Some(table) = self.table.read().clone() else {
            return Ok(None);
        };
        let Some(raw) = header else {
            return Err(Status::unauthenticated(format!(
                "missing `{AUTHORIZATION_HEADER}` metadata: this node requires a token; send `{AUTHORIZATION_HEADER}: Bearer <token>` (kvshare --token, or KVSHARE_TOKEN)"
            )));
        };
        let token = std::str::from_utf8(raw)
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "malformed `{AUTHORIZATION_HEADER}` metadata: expected `Bearer <token>`"
                ))
            })?;
        match table.find(token) {
            Some(t) => Ok(Some(Caller {
                role: t.role,
                tenant: t.tenant.clone(),
            })),
            None => Err(Status::unauthenticated(
                "unknown token: check it, or ask the operator to add its SHA-256 to the node's --auth-file",
            )),
        }
    }

    /// Admits a gRPC request: protected mode, token, role. Returns the tenant it acts for (the
    /// default tenant when auth is off) and whether the caller sees every tenant (admin or peer
    /// naming no tenant in [`TENANT_HEADER`], or auth off).
    pub fn admit<T>(
        &self,
        store: &BlockStore,
        method: Method,
        no_forward: bool,
        request: &tonic::Request<T>,
    ) -> Result<(Tenant, bool), Status> {
        self.admit_parts(
            store,
            method,
            no_forward,
            request.remote_addr(),
            request.metadata(),
        )
    }

    /// [`Auth::admit`] of a request from `remote` with these headers (a bulk-transport request
    /// carries them in its connection's `BulkOpen`).
    pub fn admit_parts(
        &self,
        store: &BlockStore,
        method: Method,
        no_forward: bool,
        remote: Option<SocketAddr>,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(Tenant, bool), Status> {
        self.check_remote(remote)?;
        let header = metadata.get(AUTHORIZATION_HEADER).map(|v| v.as_bytes());
        let Some(caller) = self.authenticate(header)? else {
            return Ok((Tenant::default_tenant(), true));
        };
        required_role(method, no_forward, caller.role).map_err(Status::permission_denied)?;
        let trusted = matches!(caller.role, Role::Admin | Role::Peer);
        let named = metadata
            .get(TENANT_HEADER)
            .filter(|_| trusted)
            .map(|v| {
                v.to_str()
                    .ok()
                    .filter(|n| valid_tenant_name(n))
                    .map(str::to_string)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "`{TENANT_HEADER}` must be a tenant name (1 to {MAX_TENANT_NAME_LEN} characters of A-Z a-z 0-9 . _ -)"
                        ))
                    })
            })
            .transpose()?;
        // A trusted caller that names a tenant acts for that tenant only (a node gathering
        // `/api/cluster` for a reader asks its peers for that reader's tenant's Stats).
        let all_tenants = trusted && named.is_none();
        let name: Arc<str> = named.map_or(caller.tenant.clone(), Arc::from);
        Ok((
            Tenant {
                id: store.tenant_id(&name),
                name,
            },
            all_tenants,
        ))
    }

    /// Checks the `Authorization` header of an HTTP request for `/api/*` and `/dashboard` data
    /// (reader, writer or admin; peers too, for the dashboard of a peer) and protected mode.
    /// Returns the caller (`None` when auth is off).
    pub fn admit_http(
        &self,
        remote: Option<SocketAddr>,
        header: Option<&[u8]>,
    ) -> Result<Option<Caller>, Status> {
        self.check_remote(remote)?;
        self.authenticate(header)
    }

    /// Sets the store's tenant quotas to those of the table in force (clearing quotas of
    /// tenants no longer listed with one).
    pub fn apply_quotas(&self, store: &BlockStore) {
        let Some(table) = self.table.read().clone() else {
            return;
        };
        let mut set = self.quota_set.lock();
        let mut now = HashSet::new();
        for (name, quota) in &table.tenants {
            if let Some(q) = quota {
                let evicted = store.set_quota(store.tenant_id(name), Some(*q));
                if evicted > 0 {
                    info!(tenant = %name, quota = q, evicted, "tenant quota lowered; its least recently used blocks were evicted");
                }
                now.insert(name.clone());
            }
        }
        for gone in set.difference(&now) {
            store.set_quota(store.tenant_id(gone), None);
        }
        *set = now;
    }

    /// Re-reads the auth file: on success the new table is in force for every later request
    /// (open connections included) and quotas are applied; on failure the old table stays.
    pub fn reload(&self, store: &BlockStore, metrics: &Metrics) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        match AuthTable::load(path) {
            Ok(t) => {
                let (tokens, tenants) = (t.tokens.len(), t.tenants.len());
                *self.table.write() = Some(Arc::new(t));
                self.apply_quotas(store);
                metrics.auth_reloads.inc();
                info!(path = %path.display(), tokens, tenants, "auth file reloaded");
                true
            }
            Err(e) => {
                metrics.auth_reload_failures.inc();
                error!(error = %e, "auth file reload failed; the previous configuration stays in force");
                false
            }
        }
    }

    /// Watches the auth file until `shutdown`: calls `reload` (which should call
    /// [`Auth::reload`]) when the file's inode, length or modification time changes (checked
    /// every [`RELOAD_POLL`]) and on SIGHUP.
    pub async fn watch(&self, mut reload: impl FnMut(), mut shutdown: watch::Receiver<bool>) {
        let Some(path) = self.path.clone() else {
            return;
        };
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot install a SIGHUP handler; the auth file is still reloaded when it changes");
                None
            }
        };
        let mut last = file_identity(&path);
        loop {
            let hup_recv = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            let by_signal = tokio::select! {
                _ = tokio::time::sleep(RELOAD_POLL) => false,
                _ = hup_recv => true,
                _ = shutdown.wait_for(|v| *v) => return,
            };
            let now = file_identity(&path);
            if by_signal || now != last {
                last = now;
                reload();
            }
        }
    }
}

/// What identifies a version of a file: inode, length, modification time (`None`: unreadable).
fn file_identity(path: &Path) -> Option<(u64, u64, Option<SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.len(), m.modified().ok()))
}

/// The peer token from `--peer-token-file` or `KVSHARE_PEER_TOKEN` (the file wins; surrounding
/// whitespace is removed).
pub fn peer_token(
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<kvshare_proto::transport::BearerToken, AuthError> {
    let (text, source_name) = match (file, env) {
        (Some(p), _) => (
            std::fs::read_to_string(p).map_err(|e| AuthError::PeerToken {
                source_name: format!("--peer-token-file {}", p.display()),
                message: e.to_string(),
            })?,
            format!("--peer-token-file {}", p.display()),
        ),
        (None, Some(t)) => (t.to_string(), "KVSHARE_PEER_TOKEN".to_string()),
        (None, None) => return Ok(Default::default()),
    };
    let token = text.trim();
    if token.is_empty() {
        return Err(AuthError::PeerToken {
            source_name,
            message: "it is empty".into(),
        });
    }
    kvshare_proto::transport::BearerToken::new(Some(token)).map_err(|e| AuthError::PeerToken {
        source_name,
        message: e.to_string(),
    })
}

/// Hex SHA-256 of a token, as the auth file lists it.
pub fn token_digest_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(t: &str) -> String {
        token_digest_hex(t)
    }

    fn sample() -> String {
        format!(
            r#"
[tenants.team-a]
quota = "8GiB"
[tenants.team-b]

[[tokens]]
tenant = "team-a"
role = "writer"
sha256 = "{}"
[[tokens]]
tenant = "team-b"
role = "reader"
sha256 = "{}"
[[tokens]]
role = "admin"
sha256 = "{}"
[[tokens]]
role = "peer"
sha256 = "{}"
"#,
            sha("wa"),
            sha("rb"),
            sha("adm"),
            sha("peer")
        )
    }

    fn table() -> AuthTable {
        AuthTable::parse(&sample(), Path::new("auth.toml")).expect("parse")
    }

    #[test]
    fn the_file_parses_and_tokens_are_found_by_digest() {
        let t = table();
        assert_eq!(t.tenants.get("team-a"), Some(&Some(8 << 30)));
        assert_eq!(t.tenants.get("team-b"), Some(&None));
        let find = |tok: &str| t.find(tok).map(|e| (e.role, e.tenant.to_string()));
        assert_eq!(find("wa"), Some((Role::Writer, "team-a".into())));
        assert_eq!(find("rb"), Some((Role::Reader, "team-b".into())));
        assert_eq!(find("adm"), Some((Role::Admin, DEFAULT_TENANT.into())));
        assert_eq!(find("peer"), Some((Role::Peer, DEFAULT_TENANT.into())));
        assert_eq!(find("nope"), None);
        assert_eq!(find(""), None);
        assert_eq!(
            token_digest_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let p = Path::new("auth.toml");
        let err = |text: &str| AuthTable::parse(text, p).expect_err(text).to_string();
        let d = sha("x");
        assert!(err("[[tokens]]\nrole = \"writer\"\n").contains("sha256"));
        assert!(
            err(&format!(
                "[[tokens]]\nrole = \"owner\"\ntenant=\"a\"\nsha256=\"{d}\""
            ))
            .contains("owner")
        );
        assert!(
            err(&format!(
                "[[tokens]]\nrole = \"writer\"\ntenant = \"a\"\nsha256 = \"{d}\""
            ))
            .contains("not declared")
        );
        assert!(
            err(&format!("[[tokens]]\nrole = \"reader\"\nsha256 = \"{d}\""))
                .contains("has no tenant")
        );
        assert!(err("[[tokens]]\nrole = \"admin\"\nsha256 = \"abcd\"").contains("64 hex digits"));
        assert!(err(&format!("[[tokens]]\nrole = \"admin\"\nsha256 = \"{d}\"\n[[tokens]]\nrole = \"peer\"\nsha256 = \"{d}\"")).contains("twice"));
        assert!(err("[tenants.a]\nquota = \"lots\"").contains("quota"));
        assert!(err("[tenants.a]\nquota = \"0\"").contains("quota is 0"));
        assert!(err("[tenants.\"a b\"]").contains("tenant name"));
        assert!(err("[tenants.a]\nqouta = \"1GiB\"").contains("qouta"));
        assert!(err("this is not toml").contains("auth.toml"));
        // An empty file is valid: auth on, no tokens (everything is refused).
        let t = AuthTable::parse("", p).expect("empty");
        assert!(t.find("x").is_none());
    }

    #[test]
    fn role_table() {
        use Method::*;
        let all = [lookup, put, get, delete, stats, cluster_info, set_capacity];
        let allowed = |role: Role, nf: bool| -> Vec<Method> {
            all.iter()
                .copied()
                .filter(|m| required_role(*m, nf, role).is_ok())
                .collect()
        };
        for nf in [false, true] {
            assert_eq!(
                allowed(Role::Reader, nf),
                vec![lookup, get, stats, cluster_info]
            );
            assert_eq!(
                allowed(Role::Writer, nf),
                vec![lookup, put, get, delete, stats, cluster_info]
            );
            assert_eq!(allowed(Role::Admin, nf), all.to_vec());
        }
        assert_eq!(allowed(Role::Peer, false), vec![stats, cluster_info]);
        assert_eq!(
            allowed(Role::Peer, true),
            vec![lookup, put, get, delete, stats, cluster_info]
        );
        let msg = required_role(put, false, Role::Reader).expect_err("denied");
        assert!(
            msg.contains("role reader") && msg.contains("writer or admin"),
            "{msg}"
        );
        let msg = required_role(set_capacity, true, Role::Peer).expect_err("denied");
        assert!(msg.contains("needs role admin"), "{msg}");
    }

    #[test]
    fn authenticate_distinguishes_missing_malformed_and_unknown() {
        let auth = Auth::disabled();
        *auth.table.write() = Some(Arc::new(table()));
        let code = |h: Option<&[u8]>| {
            auth.authenticate(h)
                .map(|c| c.map(|c| c.role))
                .map_err(|s| (s.code(), s.message().to_string()))
        };
        let (c, m) = code(None).expect_err("missing");
        assert_eq!(c, tonic::Code::Unauthenticated);
        assert!(m.contains("missing `authorization`"), "{m}");
        for bad in [&b"wa"[..], b"Basic wa", b"Bearer ", b"Bearer", b"\xff\xfe"] {
            let (c, m) = code(Some(bad)).expect_err("malformed");
            assert_eq!(c, tonic::Code::Unauthenticated);
            assert!(m.contains("malformed"), "{m}");
        }
        let (c, m) = code(Some(b"Bearer wb")).expect_err("unknown");
        assert_eq!(c, tonic::Code::Unauthenticated);
        assert!(m.contains("unknown token"), "{m}");
        assert_eq!(code(Some(b"Bearer wa")), Ok(Some(Role::Writer)));
        assert_eq!(code(Some(b"bearer  wa ")), Ok(Some(Role::Writer)));
        assert_eq!(
            Auth::disabled()
                .authenticate(None)
                .map(|c| c.is_none())
                .ok(),
            Some(true)
        );
    }

    #[test]
    fn admit_limits_stats_to_a_named_tenant_and_ignores_untrusted_headers() {
        let auth = Auth::disabled();
        *auth.table.write() = Some(Arc::new(table()));
        let store = BlockStore::new(1 << 20);
        let admit = |token: &str, tenant: Option<&str>| {
            let mut r = tonic::Request::new(());
            r.metadata_mut().insert(
                AUTHORIZATION_HEADER,
                format!("Bearer {token}").parse().expect("ascii"),
            );
            if let Some(t) = tenant {
                r.metadata_mut()
                    .insert(TENANT_HEADER, t.parse().expect("ascii"));
            }
            auth.admit(&store, Method::stats, false, &r)
                .map(|(t, all)| (t.name.to_string(), all))
                .map_err(|s| s.code())
        };
        // Admin and peer: every tenant, or only the one they name.
        assert_eq!(admit("adm", None), Ok((DEFAULT_TENANT.into(), true)));
        assert_eq!(admit("peer", None), Ok((DEFAULT_TENANT.into(), true)));
        assert_eq!(admit("peer", Some("team-b")), Ok(("team-b".into(), false)));
        assert_eq!(admit("adm", Some("team-a")), Ok(("team-a".into(), false)));
        // Readers and writers: their own tenant, whatever header they send.
        assert_eq!(admit("rb", None), Ok(("team-b".into(), false)));
        assert_eq!(admit("rb", Some("team-a")), Ok(("team-b".into(), false)));
        assert_eq!(admit("wa", Some("team-b")), Ok(("team-a".into(), false)));
        assert_eq!(
            admit("peer", Some("no spaces")),
            Err(tonic::Code::InvalidArgument)
        );
    }

    #[test]
    fn protected_mode_refuses_remote_clients_only() {
        let lo: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:1".parse().expect("addr");
        let remote: SocketAddr = "10.1.2.3:4".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5".parse().expect("addr");
        let a = Auth::new(None, false, false, &[any, lo]).expect("auth");
        assert!(a.protected());
        assert!(a.check_remote(Some(lo)).is_ok());
        assert!(a.check_remote(Some(mapped)).is_ok());
        let e = a.check_remote(Some(remote)).expect_err("refused");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("--auth-file") && e.message().contains("--insecure-no-auth"));
        assert!(a.check_remote(None).is_err());
        let a = Auth::new(None, true, false, &[any]).expect("auth");
        assert!(!a.protected() && a.insecure());
        assert!(a.check_remote(Some(remote)).is_ok());
        let a = Auth::new(None, false, false, &[lo, lo]).expect("auth");
        assert!(!a.protected());
        assert!(a.check_remote(Some(remote)).is_ok());
    }

    #[test]
    fn the_default_tenant_maps_namespaces_to_themselves_and_others_do_not() {
        let ns = BlockKey([7; 32]);
        assert_eq!(tenant_space(DEFAULT_TENANT, ns), ns);
        let a = tenant_space("team-a", ns);
        let b = tenant_space("team-b", ns);
        assert_ne!(a, ns);
        assert_ne!(a, b);
        assert_eq!(a, tenant_space("team-a", ns));
        assert_ne!(a, tenant_space("team-a", BlockKey([8; 32])));
        // The separator keeps ("ab", ns) and ("a", "b" || ns...) apart.
        assert_ne!(tenant_space("ab", ns), tenant_space("a", ns));
    }

    #[test]
    fn peer_token_sources() {
        assert!(!peer_token(None, None).expect("none").is_set());
        assert!(peer_token(None, Some(" tok ")).expect("env").is_set());
        assert!(peer_token(None, Some("  ")).is_err());
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("peer");
        std::fs::write(&f, "secret\n").expect("write");
        assert!(peer_token(Some(&f), None).expect("file").is_set());
        let e = peer_token(Some(&dir.path().join("missing")), None).expect_err("missing");
        assert!(e.to_string().contains("--peer-token-file"));
    }
}

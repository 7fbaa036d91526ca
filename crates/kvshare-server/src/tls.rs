//! The node's TLS: server configurations for the gRPC and HTTP ports, the client configuration
//! of its peer connections, and hot reload of the certificate files.
//!
//! The files (`--tls-cert`, `--tls-key`, `--tls-client-ca`, `--tls-ca`) are read at start and
//! again when one of them changes (modification time, size or inode, polled every second: a
//! Kubernetes Secret volume swaps a symlink, cert-manager rewrites it) or on SIGHUP
//! ([`NodeTls::reload`]). A reload builds complete new configurations and swaps them in one
//! step; each accepted connection takes the configuration current at its handshake, so new
//! handshakes use the new certificate while open connections keep theirs. Files that do not
//! load (a half-written key, a key that does not match the certificate) leave the running
//! configuration in place and are logged; the next change is tried again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kvshare_proto::tls::{
    ALPN_H2, ClientTls, IdentityPem, TlsError, certs_from_pem, client_config, key_from_pem,
    provider, read_file, roots_from_pem,
};
use parking_lot::{Mutex, RwLock};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// Where the node's TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM, leaf first) presented to clients, and to peers under mTLS.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// CA certificates (PEM) that sign client certificates; set: clients must present one
    /// (mTLS).
    pub client_ca: Option<PathBuf>,
    /// CA certificates (PEM) that sign the peers' server certificates (default: `client_ca`).
    pub peer_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The CA file peers are verified with.
    pub fn peer_ca(&self) -> Option<&Path> {
        self.peer_ca.as_deref().or(self.client_ca.as_deref())
    }

    fn paths(&self) -> Vec<&Path> {
        let mut v = vec![self.cert.as_path(), self.key.as_path()];
        v.extend(self.client_ca.as_deref());
        v.extend(self.peer_ca.as_deref());
        v
    }
}

/// What identifies a version of a file: modification time, size, inode.
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Configurations built from one reading of the files.
struct Loaded {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
    peer_ca: Option<Vec<u8>>,
    identity: Option<IdentityPem>,
}

fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
    let cert_pem = read_file(&files.cert)?;
    let key_pem = read_file(&files.key)?;
    let cert_what = files.cert.display().to_string();
    let key_what = files.key.display().to_string();
    let chain = certs_from_pem(&cert_pem, &cert_what)?;
    let key = key_from_pem(&key_pem, &key_what)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            what: "TLS protocol versions".into(),
            source,
        })?;
    let single_cert =
        |builder: rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>| {
            builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|source| TlsError::Config {
                    what: format!("{cert_what} with {key_what}"),
                    source,
                })
        };
    let (mut grpc, mut http) = match &files.client_ca {
        Some(ca) => {
            let roots = Arc::new(roots_from_pem(&read_file(ca)?, &ca.display().to_string())?);
            let required =
                WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
            // The HTTP port asks for a certificate but lets the handshake through without one:
            // kubelet's probes present none. The router then serves /healthz and /readyz only
            // to such connections (`http::require_client_cert`).
            let optional = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .allow_unauthenticated()
                .build()?;
            (
                single_cert(builder.clone().with_client_cert_verifier(required))?,
                single_cert(builder.with_client_cert_verifier(optional))?,
            )
        }
        None => {
            let b = builder.with_no_client_auth();
            (single_cert(b.clone())?, single_cert(b)?)
        }
    };
    grpc.alpn_protocols = vec![ALPN_H2.to_vec()];
    http.alpn_protocols = vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    let peer_ca = files.peer_ca().map(read_file).transpose()?;
    // Peers present this node's certificate only where clients must have one.
    let identity = files.client_ca.as_ref().map(|_| IdentityPem {
        cert: cert_pem,
        key: key_pem,
    });
    if let Some(ca) = &peer_ca {
        // Checked now so a bad peer CA fails the load, not the first peer handshake.
        client_config(ca, identity.as_ref())?;
    }
    Ok(Loaded {
        grpc: Arc::new(grpc),
        http: Arc::new(http),
        peer_ca,
        identity,
    })
}

/// The node's TLS state: current server configurations and the peer client configuration.
pub struct NodeTls {
    files: TlsFiles,
    grpc: RwLock<Arc<ServerConfig>>,
    http: RwLock<Arc<ServerConfig>>,
    peers: Option<ClientTls>,
    stamps: Mutex<Vec<Stamp>>,
    reloads: watch::Sender<u64>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Reads the files and builds the configurations.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamps = files.paths().into_iter().map(stamp).collect();
        let loaded = load(&files)?;
        let peers = match &loaded.peer_ca {
            Some(ca) => Some(ClientTls::from_pem(ca, loaded.identity.as_ref())?),
            None => None,
        };
        Ok(Arc::new(NodeTls {
            files,
            grpc: RwLock::new(loaded.grpc),
            http: RwLock::new(loaded.http),
            peers,
            stamps: Mutex::new(stamps),
            reloads: watch::channel(0).0,
        }))
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate (mTLS).
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Acceptor for the next gRPC connection (ALPN `h2`).
    pub fn grpc_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.grpc.read().clone())
    }

    /// Acceptor for the next HTTP connection (ALPN `h2`, `http/1.1`).
    pub fn http_acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.http.read().clone())
    }

    /// TLS of connections to peers (`None` when no peer CA is configured).
    pub fn peer_tls(&self) -> Option<&ClientTls> {
        self.peers.as_ref()
    }

    /// Successful reloads so far (watchable: the value changes after each one).
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Re-reads the files and swaps the new configurations in. On error the running ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps: Vec<Stamp> = self.files.paths().into_iter().map(stamp).collect();
        let loaded = load(&self.files)?;
        if let (Some(peers), Some(ca)) = (&self.peers, &loaded.peer_ca) {
            peers.replace(ca, loaded.identity.as_ref())?;
        }
        *self.grpc.write() = loaded.grpc;
        *self.http.write() = loaded.http;
        *self.stamps.lock() = stamps;
        self.reloads.send_modify(|n| *n += 1);
        info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
        Ok(())
    }

    /// Reloads when a file changed since the last load (or failed attempt).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now: Vec<Stamp> = self.files.paths().into_iter().map(stamp).collect();
        {
            let mut seen = self.stamps.lock();
            if *seen == now {
                return Ok(false);
            }
            // A failed load is not retried until the files change again.
            *seen = now;
        }
        self.reload().map(|()| true)
    }

    /// Polls the files every `interval` until `shutdown`, reloading on change.
    pub fn spawn_watcher(
        self: Arc<Self>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|v| *v) => return,
                }
                let this = self.clone();
                // File reads and PEM parsing off the async workers.
                let r = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(
                        error = %e,
                        "TLS files changed but do not load; keeping the running certificates"
                    ),
                    Err(e) => warn!(error = %e, "TLS reload task failed"),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf, rcgen::Certificate) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let c = dir.join(format!("{name}.pem"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert)
    }

    #[test]
    fn reload_swaps_configs_and_keeps_them_on_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, _) = write_cert(dir.path(), "a", "a");
        let tls = NodeTls::load(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: Some(cert.clone()),
            peer_ca: None,
        })
        .unwrap();
        assert!(tls.requires_client_cert());
        assert!(
            tls.peer_tls().is_some(),
            "peer CA defaults to the client CA"
        );
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed");
        let before = tls.grpc.read().clone();
        let peer_before = tls.peer_tls().expect("peer tls").config();
        // A new certificate and key: swapped in.
        let (c2, k2, _) = write_cert(dir.path(), "b", "b");
        std::fs::rename(&c2, &cert).unwrap();
        std::fs::rename(&k2, &key).unwrap();
        assert!(tls.reload_if_changed().unwrap());
        let after = tls.grpc.read().clone();
        assert!(!Arc::ptr_eq(&before, &after));
        // Peer connections present the new certificate from their next handshake.
        let peer_after = tls.peer_tls().expect("peer tls").config();
        assert!(!Arc::ptr_eq(&peer_before, &peer_after));
        assert_eq!(*tls.reloads().borrow(), 1);
        // A truncated key: the load fails and the running configuration stays.
        std::fs::write(&key, b"-----BEGIN PRIVATE KEY-----\n").unwrap();
        assert!(tls.reload_if_changed().is_err());
        assert!(Arc::ptr_eq(&after, &tls.grpc.read().clone()));
        assert_eq!(*tls.reloads().borrow(), 1);
        // Not retried until the files change again.
        assert!(!tls.reload_if_changed().unwrap());
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _, _) = write_cert(dir.path(), "a", "a");
        let (_, other_key, _) = write_cert(dir.path(), "b", "b");
        let e = NodeTls::load(TlsFiles {
            cert,
            key: other_key,
            client_ca: None,
            peer_ca: None,
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::Config { .. }), "{e}");
    }
}

//! The processes a bench runs against, each on loopback: `kvshared`, `redis-server` and
//! `kvshare-worker` (found next to this binary).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use kvshare_client::{ClientOptions, ClientTls};

/// TLS of the bench's nodes and clients (`--tls`).
struct BenchTls {
    cert: PathBuf,
    key: PathBuf,
    client: ClientTls,
}

static TLS: OnceLock<BenchTls> = OnceLock::new();

/// Turns TLS on for every node this run starts and every client it makes: a CA and a node
/// certificate for 127.0.0.1 are generated into `dir`.
pub fn enable_tls(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = kvshare_testkit::pki::TestCa::new("kvshare-bench CA");
    let files = ca.issue("bench-node", &["127.0.0.1"], 1).write(dir, "node");
    let client = ClientTls::from_pem(ca.cert_pem.as_bytes(), None)?;
    let _ = TLS.set(BenchTls {
        cert: files.cert,
        key: files.key,
        client,
    });
    Ok(())
}

/// Client options of this run: the defaults, with TLS under `--tls`.
pub fn client_options() -> ClientOptions {
    ClientOptions {
        tls: TLS.get().map(|t| t.client.clone()),
        ..ClientOptions::default()
    }
}

/// A loopback port free right now (the OS's pick; free until someone binds it).
fn free_port() -> anyhow::Result<u16> {
    Ok(kvshare_testkit::free_port()?)
}

/// Waits until `127.0.0.1:port` accepts connections; fails when `child` exits first or after
/// 20 s.
fn wait_for_port(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let addr = format!("127.0.0.1:{port}");
    kvshare_testkit::wait_for_listener(&addr, Duration::from_secs(20), child)
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// The binary `name` of package `package`: the path in the environment variable `env`, else
/// the file of that name next to the running executable (the same target directory).
pub fn sibling_binary(name: &str, env: &str, package: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("{env}={} is not a file", p.display());
        }
        return Ok(p);
    }
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} not found: build it with `cargo build -p {package}` (add --release for a release \
             build of this bench), or set {env} to its path",
            p.display()
        );
    }
    Ok(p)
}

/// Resident set size of a process, bytes (Linux /proc).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// A server child process listening on a loopback port.
struct Server {
    child: Child,
}

impl Server {
    /// Spawns `cmd` (stdout discarded) and waits until it listens on `port`.
    async fn start(mut cmd: Command, port: u16, what: &str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        if let Err(e) = wait_for_port(port, what, &mut child) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Server { child })
    }

    /// Kills the process and reaps it.
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kvshared` child process.
pub struct Node {
    server: Server,
    /// gRPC endpoint URL.
    pub endpoint: String,
}

impl Node {
    /// Starts a node with `capacity` and extra flags.
    pub async fn start(capacity: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let (grpc, http) = (free_port()?, free_port()?);
        let mut cmd = Command::new(sibling_binary(
            "kvshared",
            "KVSHARED_BIN",
            "kvshare-server",
        )?);
        cmd.args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .args([
            "--capacity",
            capacity,
            "--node-id",
            "bench-node",
            "--log-level",
            "warn",
        ])
        .args(["--buffer-budget", "2GiB"])
        .args(extra);
        if let Some(t) = TLS.get() {
            cmd.arg("--tls-cert")
                .arg(&t.cert)
                .arg("--tls-key")
                .arg(&t.key);
        }
        let scheme = if TLS.get().is_some() { "https" } else { "http" };
        Ok(Node {
            server: Server::start(cmd, grpc, "kvshared").await?,
            endpoint: format!("{scheme}://127.0.0.1:{grpc}"),
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.server.child.id()
    }

    /// Stops the node.
    pub fn stop(self) {
        self.server.stop();
    }
}

/// A `redis-server` child process: loopback, no persistence.
pub struct Redis {
    server: Server,
    /// Connection URL.
    pub url: String,
    /// Version string.
    pub version: String,
}

fn redis_server() -> anyhow::Result<String> {
    let found = |p: &str| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for p in ["redis-server", "/usr/bin/redis-server"] {
        if found(p) {
            return Ok(p.to_string());
        }
    }
    // Install it from Debian's packages when we can (the bench installs what it needs).
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false);
    if root {
        println!("redis-server not found; installing Debian's redis-server package");
        let ok = Command::new("sh")
            .args(["-c", "DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null"])
            .status()
            .is_ok_and(|s| s.success());
        if ok && found("/usr/bin/redis-server") {
            // The package starts a system service; the bench uses its own instance.
            let _ = Command::new("sh")
                .args(["-c", "service redis-server stop >/dev/null 2>&1 || true"])
                .status();
            return Ok("/usr/bin/redis-server".into());
        }
    }
    bail!(
        "redis-server is not installed and could not be installed: apt-get install redis-server, or run with --compare none"
    )
}

impl Redis {
    /// Starts a private redis-server.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = redis_server()?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("kvshare-bench-redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = Command::new(&bin);
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args([
            "--protected-mode",
            "no",
            "--dir",
            &dir.to_string_lossy(),
            "--io-threads",
            "1",
        ]);
        Ok(Redis {
            server: Server::start(cmd, port, "redis-server").await?,
            url: format!("redis://127.0.0.1:{port}/"),
            version,
        })
    }

    /// Stops the server.
    pub fn stop(self) {
        self.server.stop();
    }
}

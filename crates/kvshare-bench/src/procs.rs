//! The processes a bench runs against: `kvshared`, `redis-server` and `kvshare-worker` (found
//! next to this binary), on loopback or, for the shaped-link cells, inside a network namespace
//! ([`Place::Netns`]). Every child is killed and reaped when its handle is dropped, so an error
//! or Ctrl-C never leaves servers behind.

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

/// The DNS name of the bench nodes' certificate; clients verify every node against it.
pub const BENCH_NODE_NAME: &str = "kvshare-bench-node";

/// Turns TLS on for every node this run starts and every client it makes: a CA and a node
/// certificate are generated into `dir`.
pub fn enable_tls(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = kvshare_testkit::pki::TestCa::new("kvshare-bench CA");
    // Nodes may listen on loopback or in a network namespace: one name for every address.
    let files = ca
        .issue("bench-node", &[BENCH_NODE_NAME], 1)
        .write(dir, "node");
    let client =
        ClientTls::from_pem(ca.cert_pem.as_bytes(), None)?.with_server_name(Some(BENCH_NODE_NAME));
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

/// Where a server runs: on loopback (a free port), or inside a network namespace on a given
/// address (started with `ip netns exec`, which execs the server in place: the child's pid is
/// the server's).
#[derive(Debug, Clone, Copy)]
pub enum Place<'a> {
    /// 127.0.0.1, a port the OS picks.
    Loopback,
    /// Inside namespace `ns`, bound to `ip`.
    Netns {
        /// Namespace name (as `ip netns` knows it).
        ns: &'a str,
        /// Address inside the namespace.
        ip: &'a str,
    },
}

impl Place<'_> {
    /// The address to bind and a port for it (`fixed` inside a namespace, where every port is
    /// free).
    fn addr(&self, fixed: u16) -> anyhow::Result<(String, u16)> {
        match self {
            Place::Loopback => Ok(("127.0.0.1".into(), free_port()?)),
            Place::Netns { ip, .. } => Ok(((*ip).to_string(), fixed)),
        }
    }

    /// A command running `program` here.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self {
            Place::Loopback => Command::new(program),
            Place::Netns { ns, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
        }
    }
}

/// Whether the process `pid` sees a TCP socket listening on `port` in its own network
/// namespace (`/proc/<pid>/net/tcp`, state `0A`).
pub fn listens_in_ns(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    let port_hex = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        local.ends_with(&port_hex) && state == "0A"
    })
}

/// Waits until the child listens on `port` inside its namespace; fails when it exits first or
/// after 20 s.
fn wait_for_port_in_ns(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        if listens_in_ns(child.id(), port) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what}: exited during start-up ({status})");
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("{what}: nothing listens on port {port} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A server child process; killed and reaped on drop.
struct Server {
    child: Child,
}

impl Server {
    /// Spawns `cmd` (stdout discarded) and waits until it listens on `port` at `place`.
    async fn start(
        mut cmd: Command,
        place: Place<'_>,
        port: u16,
        what: &str,
    ) -> anyhow::Result<Self> {
        let child = cmd
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        // From here on the guard kills the child on every error path.
        let mut server = Server { child };
        match place {
            Place::Loopback => wait_for_port(port, what, &mut server.child)?,
            Place::Netns { .. } => wait_for_port_in_ns(port, what, &mut server.child)?,
        }
        Ok(server)
    }

    /// Kills the process and reaps it.
    fn stop(self) {
        drop(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
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
    /// Starts a node on loopback with `capacity` and extra flags.
    pub async fn start(capacity: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_at(Place::Loopback, capacity, extra).await
    }

    /// Starts a node at `place` with `capacity` and extra flags (over TLS under `--tls`).
    pub async fn start_at(
        place: Place<'_>,
        capacity: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let tls = TLS.get().map(|t| (t.cert.clone(), t.key.clone()));
        Self::start_with(place, capacity, extra, tls).await
    }

    /// Starts a node at `place` with `capacity`, extra flags, and TLS from the given certificate
    /// and key files (whatever `--tls` says).
    pub async fn start_with(
        place: Place<'_>,
        capacity: &str,
        extra: &[&str],
        tls: Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Self> {
        Self::start_numbered(place, 0, capacity, extra, tls).await
    }

    /// As [`Node::start_with`], for node `n` of several in one namespace: its fixed ports there
    /// are 50051 + 10n (gRPC) and 9090 + 10n (HTTP); on loopback the OS picks them anyway.
    pub async fn start_numbered(
        place: Place<'_>,
        n: u16,
        capacity: &str,
        extra: &[&str],
        tls: Option<(PathBuf, PathBuf)>,
    ) -> anyhow::Result<Self> {
        let (host, grpc) = place.addr(50051 + 10 * n)?;
        let (_, http) = place.addr(9090 + 10 * n)?;
        let mut cmd = place.command(sibling_binary(
            "kvshared",
            "KVSHARED_BIN",
            "kvshare-server",
        )?);
        cmd.args([
            "--grpc-addr",
            &format!("{host}:{grpc}"),
            "--http-addr",
            &format!("{host}:{http}"),
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
        let scheme = if tls.is_some() { "https" } else { "http" };
        if let Some((cert, key)) = tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        Ok(Node {
            server: Server::start(cmd, place, grpc, "kvshared").await?,
            endpoint: format!("{scheme}://{host}:{grpc}"),
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

/// A `redis-server` child process: no persistence, `maxmemory` as the kvshare node's capacity
/// (4 GiB, evicting least recently used keys), so both are caches of the same size.
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
    /// Starts a private redis-server on loopback.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_at(Place::Loopback).await
    }

    /// Starts a private redis-server at `place`.
    pub async fn start_at(place: Place<'_>) -> anyhow::Result<Self> {
        let bin = redis_server()?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let (host, port) = place.addr(6379)?;
        let dir =
            std::env::temp_dir().join(format!("kvshare-bench-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut cmd = place.command(&bin);
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            &host,
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
        ])
        .args(["--maxmemory", "4gb", "--maxmemory-policy", "allkeys-lru"]);
        Ok(Redis {
            server: Server::start(cmd, place, port, "redis-server").await?,
            url: format!("redis://{host}:{port}/"),
            version,
        })
    }

    /// Stops the server.
    pub fn stop(self) {
        self.server.stop();
    }
}

//! The servers under test, each its own process on loopback: `kvshared` and `redis-server`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_for_port(port: u16, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(st) = child.try_wait()? {
            bail!("{what} exited during start-up ({st})");
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("{what} did not listen on port {port} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
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

/// A `kvshared` child process.
pub struct Node {
    child: Child,
    /// gRPC endpoint URL.
    pub endpoint: String,
}

fn kvshared_path() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("KVSHARED_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("kvshared");
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build it with `cargo build --release -p kvshare-server` (or set KVSHARED_BIN)",
            p.display()
        )
    }
}

impl Node {
    /// Starts a node with `capacity` and extra flags.
    pub async fn start(capacity: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let (grpc, http) = (free_port()?, free_port()?);
        let mut child = Command::new(kvshared_path()?)
            .args([
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
            .args(["--max-inflight-put", "2GiB"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .context("starting kvshared")?;
        wait_for_port(grpc, "kvshared", &mut child).await?;
        Ok(Node {
            child,
            endpoint: format!("http://127.0.0.1:{grpc}"),
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the node.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `redis-server` child process: loopback, no persistence.
pub struct Redis {
    child: Child,
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
        let mut child = Command::new(&bin)
            .args([
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
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        wait_for_port(port, "redis-server", &mut child).await?;
        Ok(Redis {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            version,
        })
    }

    /// Stops the server.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

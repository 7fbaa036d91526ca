//! Shaped-link cells: kvshare and Redis across a rate-limited link instead of loopback.
//!
//! Two network namespaces joined by a veth pair (10.231.0.1/30 on the server side, .2/30 on the
//! client side; the addresses exist only inside the namespaces). Each direction is shaped by a
//! `tbf` qdisc on the egress of its veth end: the server end shapes server→client (gets), the
//! client end client→server (puts). `kvshared` and `redis-server` run inside the server
//! namespace (`ip netns exec`); the clients of a cell are this binary re-executed inside the
//! client namespace (`kvshare-bench net-cell`, hidden), which writes its cells as JSON. With
//! `--parts secure`, the plain, auth and auth + TLS nodes of [`crate::secure`] run in the server
//! namespace too and `kvshare-bench secure-cell` (hidden) compares them across each link.
//!
//! tbf does not deliver its configured rate on a veth pair with every burst (measured: at
//! 5 Gbit/s a 4 MB burst gave 2.9 Gbit/s one day, 4.75 another), so every link is measured with
//! a plain TCP stream per direction (`tcp-serve` / `tcp-rate`, hidden subcommands, ~1 s each)
//! and the burst and latency are raised until both directions deliver within 10 % of the
//! target; the chosen values and every try are reported.
//!
//! Everything created is removed by [`Net`]'s `Drop` (on success, error, or Ctrl-C, which the
//! suite turns into dropping the running future), and stale namespaces and veths with the same
//! names from an earlier killed run are removed before creating new ones.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::procs::{Node, Place, Redis, listens_in_ns};
use crate::secure::{SecureNodes, SecureRow};
use crate::throughput::Cell;
use crate::{Args, Part};

/// Namespace of the servers.
pub const SERVER_NS: &str = "kvbench-srv";
/// Namespace of the clients.
pub const CLIENT_NS: &str = "kvbench-cli";
/// The veth end in the server namespace (created in the root namespace, then moved).
const VETH_SERVER: &str = "kvbench-vs";
/// The veth end in the client namespace.
const VETH_CLIENT: &str = "kvbench-vc";
/// Server address (inside [`SERVER_NS`] only).
pub const SERVER_IP: &str = "10.231.0.1";
/// Client address (inside [`CLIENT_NS`] only).
const CLIENT_IP: &str = "10.231.0.2";
/// Port of the raw TCP rate test in the server namespace.
const TCP_PORT: u16 = 5201;
/// How long each direction's raw TCP test streams.
const TCP_TEST: Duration = Duration::from_secs(1);

/// A link rate given on the command line: `2gbit`, `500mbit`, `2.5gbit`, `800kbit`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkRate {
    /// Bits per second.
    pub bits_per_s: u64,
    /// The label used in reports (as given, lower case).
    pub label: String,
}

impl FromStr for LinkRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let label = s.trim().to_ascii_lowercase();
        let split = label
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?}: give a unit, e.g. 2gbit or 500mbit"))?;
        let (num, unit) = label.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?}: {num:?} is not a number"))?;
        let mult = match unit {
            "gbit" | "g" => 1e9,
            "mbit" | "m" => 1e6,
            "kbit" | "k" => 1e3,
            _ => return Err(format!("{s:?}: unit must be gbit, mbit or kbit")),
        };
        let bits = n * mult;
        if !(bits.is_finite() && (1e6..=1e12).contains(&bits)) {
            return Err(format!("{s:?}: rate must be between 1mbit and 1000gbit"));
        }
        Ok(LinkRate {
            bits_per_s: bits as u64,
            label,
        })
    }
}

impl LinkRate {
    /// Target rate, Gbit/s.
    pub fn gbit(&self) -> f64 {
        self.bits_per_s as f64 / 1e9
    }
}

/// Runs `ip` with `args`; its stderr in the error.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Whether this process may create network namespaces and shape links in them (root or
/// CAP_NET_ADMIN, iproute2 with `tc`, the tbf qdisc): tries both on a namespace of its own and
/// removes it.
pub fn permitted() -> Result<(), String> {
    let probe = format!("kvbench-probe{}", std::process::id());
    ip(&["netns", "add", &probe]).map_err(|e| format!("{e:#}"))?;
    let shaped = tc(&[
        "-n", &probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit", "burst",
        "65536", "latency", "10ms",
    ]);
    let _ = ip(&["netns", "del", &probe]);
    shaped.map_err(|e| format!("{e:#}"))
}

/// Removes the namespaces and the veth of a run (this one's, or a stale one's): deleting a
/// namespace deletes the veth end inside it, and the veth is also looked for in the root
/// namespace (a run killed between creating and moving it).
fn remove_all() {
    for ns in [SERVER_NS, CLIENT_NS] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let _ = Command::new("ip")
        .args(["link", "del", VETH_SERVER])
        .stderr(std::process::Stdio::null())
        .status();
}

/// The two namespaces and their veth pair; removed on drop.
pub struct Net {
    _private: (),
}

impl Net {
    /// Removes stale leftovers with the same names, then creates the namespaces, the veth pair
    /// and the addresses (links up, no shaping yet).
    pub fn create() -> anyhow::Result<Net> {
        remove_all();
        // The guard exists before the first thing is created, so every error path cleans up.
        let net = Net { _private: () };
        ip(&["netns", "add", SERVER_NS])?;
        ip(&["netns", "add", CLIENT_NS])?;
        ip(&[
            "link",
            "add",
            VETH_SERVER,
            "type",
            "veth",
            "peer",
            "name",
            VETH_CLIENT,
        ])?;
        ip(&["link", "set", VETH_SERVER, "netns", SERVER_NS])?;
        ip(&["link", "set", VETH_CLIENT, "netns", CLIENT_NS])?;
        for (ns, dev, addr) in [
            (SERVER_NS, VETH_SERVER, SERVER_IP),
            (CLIENT_NS, VETH_CLIENT, CLIENT_IP),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Shapes both directions with tbf at `rate` (`None`: removes the shaping).
    pub fn shape(&self, rate: Option<(&LinkRate, &Tbf)>) -> anyhow::Result<()> {
        for (ns, dev) in [(SERVER_NS, VETH_SERVER), (CLIENT_NS, VETH_CLIENT)] {
            match rate {
                Some((rate, tbf)) => tc(&[
                    "-n",
                    ns,
                    "qdisc",
                    "replace",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{}bit", rate.bits_per_s),
                    "burst",
                    &tbf.burst_bytes.to_string(),
                    "latency",
                    &format!("{}us", tbf.latency_us),
                ])?,
                None => {
                    // Nothing to delete on a fresh veth: not an error.
                    let _ = tc(&["-n", ns, "qdisc", "del", "dev", dev, "root"]);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        remove_all();
    }
}

/// Runs `tc` with `args`.
fn tc(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("tc")
        .args(args)
        .output()
        .context("running tc (iproute2)")?;
    if !out.status.success() {
        bail!(
            "tc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// tbf parameters besides the rate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Tbf {
    /// Bucket size, bytes.
    pub burst_bytes: u64,
    /// Longest a packet may wait in the queue, µs (sets the queue limit: rate x latency +
    /// burst).
    pub latency_us: u64,
}

/// The tbf settings tried for `rate`, in order: a burst of 1, 2, 4, 8, 16 ms of traffic (at
/// least 64 KiB, one GSO segment) with a latency allowance that grows with it.
pub fn candidates(rate: &LinkRate) -> Vec<Tbf> {
    let bytes_per_ms = rate.bits_per_s / 8 / 1000;
    [(1, 10), (2, 10), (4, 20), (8, 20), (16, 50)]
        .into_iter()
        .map(|(burst_ms, latency_ms)| Tbf {
            burst_bytes: (bytes_per_ms * burst_ms).max(64 << 10),
            latency_us: latency_ms * 1000,
        })
        .collect()
}

/// Whether `delivered` is within 10 % of `target`.
pub fn within_10pct(delivered: f64, target: f64) -> bool {
    // The tiny slack keeps the band's edges (2.2 for 2) inside despite rounding.
    (delivered - target).abs() <= 0.1 * target * (1.0 + 1e-9)
}

/// One tbf setting and what a TCP stream got through it.
#[derive(Debug, Clone, Serialize)]
pub struct ShapeTry {
    /// The setting.
    pub tbf: Tbf,
    /// Server→client Gbit/s.
    pub down_gbit: f64,
    /// Client→server Gbit/s.
    pub up_gbit: f64,
}

/// A shaped link as used for its cells.
#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    /// Label (`2gbit`), as in the cells' `link`.
    pub link: String,
    /// Target rate, Gbit/s.
    pub target_gbit: f64,
    /// The tbf setting the cells ran with.
    pub tbf: Tbf,
    /// Raw TCP Gbit/s server→client with that setting (one stream, ~1 s).
    pub delivered_down_gbit: f64,
    /// Raw TCP Gbit/s client→server with that setting.
    pub delivered_up_gbit: f64,
    /// Whether both directions are within 10 % of the target.
    pub within_10pct: bool,
    /// Every setting tried, in order.
    pub tries: Vec<ShapeTry>,
}

/// kvshare against Redis in one shaped cell.
#[derive(Debug, Clone, Serialize)]
pub struct LinkRatio {
    /// Link label.
    pub link: String,
    /// `get` or `put`.
    pub op: String,
    /// Raw block size, bytes.
    pub block_bytes: u64,
    /// Concurrent clients.
    pub concurrency: usize,
    /// kvshare raw K/V GB/s.
    pub kvshare_raw_gbps: f64,
    /// kvshare bytes on the wire, GB/s.
    pub kvshare_wire_gbps: f64,
    /// Redis raw K/V GB/s.
    pub redis_raw_gbps: f64,
    /// kvshare / Redis, raw K/V.
    pub ratio: f64,
}

/// kvshare / Redis for every shaped cell that has both.
fn ratios(cells: &[Cell]) -> Vec<LinkRatio> {
    cells
        .iter()
        .filter(|c| c.system == "kvshare")
        .filter_map(|k| {
            let r = cells.iter().find(|r| {
                r.system == "redis"
                    && r.link == k.link
                    && r.op == k.op
                    && r.block_bytes == k.block_bytes
                    && r.concurrency == k.concurrency
            })?;
            Some(LinkRatio {
                link: k.link.clone(),
                op: k.op.clone(),
                block_bytes: k.block_bytes,
                concurrency: k.concurrency,
                kvshare_raw_gbps: k.raw_gbps,
                kvshare_wire_gbps: k.wire_gbps,
                redis_raw_gbps: r.raw_gbps,
                ratio: k.raw_gbps / r.raw_gbps.max(f64::MIN_POSITIVE),
            })
        })
        .collect()
}

/// The shaped-link part of the report.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ShapedReport {
    /// Raw TCP Gbit/s of the veth pair without shaping (server→client, client→server).
    pub unshaped_gbit: (f64, f64),
    /// Each link.
    pub links: Vec<LinkReport>,
    /// kvshare / Redis raw K/V GB/s per shaped cell.
    pub ratios: Vec<LinkRatio>,
    /// Cells (kvshare and Redis, get and put), `link` set to the link's label. Written to
    /// bench.json once, with the loopback cells under `throughput`.
    #[serde(skip)]
    pub cells: Vec<Cell>,
    /// Auth/TLS comparison rows over each link (`--parts secure`). Written to bench.json under
    /// `secure`, beside the loopback rows.
    #[serde(skip)]
    pub secure: Vec<SecureRow>,
}

/// Direction of a raw TCP test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// Server → client.
    Down,
    /// Client → server.
    Up,
}

/// Result of one raw TCP test, as `tcp-rate` prints it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct TcpRate {
    /// Bytes received.
    pub bytes: u64,
    /// From the first byte to the end of the stream, seconds.
    pub seconds: f64,
}

impl TcpRate {
    /// Gbit/s.
    pub fn gbit(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.seconds.max(1e-9) / 1e9
    }
}

/// Reads `s` to its end: bytes read and seconds from the first byte to the end.
fn drain(s: &mut TcpStream) -> std::io::Result<TcpRate> {
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut t0) = (0u64, None);
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        t0.get_or_insert_with(Instant::now);
        bytes += n as u64;
    }
    Ok(TcpRate {
        bytes,
        seconds: t0.map_or(0.0, |t| t.elapsed().as_secs_f64()),
    })
}

/// Writes `s` for `d`, then closes the writing half.
fn flood(s: &mut TcpStream, d: Duration) -> std::io::Result<()> {
    // Real K/V bytes, though the link does not compress: any bytes do.
    let buf = crate::throughput::kv_block(1 << 20, 0);
    let t0 = Instant::now();
    while t0.elapsed() < d {
        s.write_all(&buf)?;
    }
    s.shutdown(Shutdown::Write)
}

/// One connection of `tcp-serve`: a command byte (`d`: send for the milliseconds in the next
/// 8 bytes; `u`: receive to the end, then answer bytes and nanoseconds).
fn serve_one(mut s: TcpStream) -> std::io::Result<()> {
    let mut cmd = [0u8; 9];
    s.read_exact(&mut cmd)?;
    let ms = u64::from_le_bytes(cmd[1..9].try_into().unwrap_or_default());
    match cmd[0] {
        b'd' => flood(&mut s, Duration::from_millis(ms.min(60_000))),
        b'u' => {
            let r = drain(&mut s)?;
            let mut answer = [0u8; 16];
            answer[..8].copy_from_slice(&r.bytes.to_le_bytes());
            answer[8..].copy_from_slice(&((r.seconds * 1e9) as u64).to_le_bytes());
            s.write_all(&answer)
        }
        _ => Err(std::io::Error::other("unknown command")),
    }
}

/// `tcp-serve`: answers raw TCP tests on `listen` until killed.
pub fn tcp_serve(listen: &str) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    for s in l.incoming() {
        let s = s?;
        std::thread::spawn(move || {
            if let Err(e) = serve_one(s) {
                eprintln!("tcp-serve: {e}");
            }
        });
    }
    Ok(())
}

/// `tcp-rate`: one raw TCP test against `tcp-serve` at `connect`.
pub fn tcp_rate(connect: &str, dir: Direction, d: Duration) -> anyhow::Result<TcpRate> {
    let mut s = TcpStream::connect(connect).with_context(|| format!("connecting {connect}"))?;
    let mut cmd = [0u8; 9];
    cmd[0] = if dir == Direction::Down { b'd' } else { b'u' };
    cmd[1..].copy_from_slice(&(d.as_millis() as u64).to_le_bytes());
    s.write_all(&cmd)?;
    match dir {
        Direction::Down => Ok(drain(&mut s)?),
        Direction::Up => {
            flood(&mut s, d)?;
            let mut answer = [0u8; 16];
            s.read_exact(&mut answer)?;
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&answer[i..i + 8]);
                u64::from_le_bytes(w)
            };
            Ok(TcpRate {
                bytes: word(0),
                seconds: word(8) as f64 / 1e9,
            })
        }
    }
}

/// This binary, re-executed inside `ns` with `args` (killed if dropped before it ends).
fn bench_in(ns: &str, args: &[String]) -> anyhow::Result<tokio::process::Command> {
    let exe = std::env::current_exe().context("finding this binary")?;
    let mut c = tokio::process::Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .kill_on_drop(true);
    Ok(c)
}

/// A raw TCP test in direction `dir` from the client namespace.
async fn measure_direction(dir: Direction) -> anyhow::Result<f64> {
    let out = bench_in(
        CLIENT_NS,
        &[
            "tcp-rate".into(),
            "--connect".into(),
            format!("{SERVER_IP}:{TCP_PORT}"),
            "--direction".into(),
            format!("{dir:?}").to_lowercase(),
            "--millis".into(),
            TCP_TEST.as_millis().to_string(),
        ],
    )?
    .output()
    .await?;
    if !out.status.success() {
        bail!(
            "tcp-rate failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let r: TcpRate = serde_json::from_slice(&out.stdout).context("tcp-rate output")?;
    Ok(r.gbit())
}

/// Raw TCP Gbit/s (server→client, client→server) of the link as shaped now.
async fn measure_link() -> anyhow::Result<(f64, f64)> {
    Ok((
        measure_direction(Direction::Down).await?,
        measure_direction(Direction::Up).await?,
    ))
}

/// Shapes the link to `rate`, raising burst and latency until a TCP stream in each direction
/// gets within 10 % of the target; keeps the closest setting when none does.
async fn tune(net: &Net, rate: &LinkRate) -> anyhow::Result<LinkReport> {
    let target = rate.gbit();
    let mut tries: Vec<ShapeTry> = Vec::new();
    for tbf in candidates(rate) {
        net.shape(Some((rate, &tbf)))?;
        let (down, up) = measure_link().await?;
        println!(
            "  link {}: tbf burst {} B, latency {} ms -> raw TCP {:.2} Gbit/s down, {:.2} up",
            rate.label,
            tbf.burst_bytes,
            tbf.latency_us / 1000,
            down,
            up
        );
        tries.push(ShapeTry {
            tbf,
            down_gbit: down,
            up_gbit: up,
        });
        if within_10pct(down, target) && within_10pct(up, target) {
            break;
        }
    }
    let miss = |t: &ShapeTry| (t.down_gbit - target).abs().max((t.up_gbit - target).abs());
    let best = tries
        .iter()
        .min_by(|a, b| miss(a).total_cmp(&miss(b)))
        .cloned()
        .context("no tbf setting tried")?;
    let ok = within_10pct(best.down_gbit, target) && within_10pct(best.up_gbit, target);
    if tries.last().is_some_and(|t| t.tbf != best.tbf) {
        net.shape(Some((rate, &best.tbf)))?;
    }
    if ok {
        println!(
            "link {}: chose tbf burst {} B, latency {} ms: delivers {:.2} / {:.2} Gbit/s (target {target})",
            rate.label,
            best.tbf.burst_bytes,
            best.tbf.latency_us / 1000,
            best.down_gbit,
            best.up_gbit
        );
    } else {
        println!(
            "link {}: WARNING no tbf setting delivered within 10 % of {target} Gbit/s; using the \
             closest (burst {} B, latency {} ms: {:.2} / {:.2} Gbit/s); read its cells against \
             the delivered rate",
            rate.label,
            best.tbf.burst_bytes,
            best.tbf.latency_us / 1000,
            best.down_gbit,
            best.up_gbit
        );
    }
    Ok(LinkReport {
        link: rate.label.clone(),
        target_gbit: target,
        tbf: best.tbf,
        delivered_down_gbit: best.down_gbit,
        delivered_up_gbit: best.up_gbit,
        within_10pct: ok,
        tries,
    })
}

/// The suite options the cell runner inside the client namespace gets from this run.
fn cell_args(args: &Args) -> Vec<String> {
    let mut a = vec!["--codec".to_string(), args.codec.name().to_string()];
    if args.quick {
        a.push("--quick".into());
    }
    if !args.sizes.is_empty() {
        a.push("--sizes".into());
        a.push(args.sizes.join(","));
    }
    if !args.concurrency.is_empty() {
        a.push("--concurrency".into());
        a.push(
            args.concurrency
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    if let Some(b) = &args.bytes_per_cell {
        a.push("--bytes-per-cell".into());
        a.push(b.clone());
    }
    a.push("--repeat".into());
    a.push(args.repeat.to_string());
    a
}

/// Runs `runner` (`net-cell` or `secure-cell`, with `runner_args`) in the client namespace
/// with `env` set; its table goes to our stdout, its rows come back through a JSON file.
async fn in_client_ns<T: serde::de::DeserializeOwned>(
    runner: &str,
    runner_args: Vec<String>,
    env: &[(&str, &str)],
    link: &str,
) -> anyhow::Result<T> {
    let json = std::env::temp_dir().join(format!(
        "kvshare-bench-{runner}-{}-{link}.json",
        std::process::id()
    ));
    let mut a = vec![runner.to_string()];
    a.extend(runner_args);
    a.extend(["--link-label".into(), link.into()]);
    a.extend(["--json-out".into(), json.to_string_lossy().into_owned()]);
    let mut cmd = bench_in(CLIENT_NS, &a)?;
    cmd.envs(env.iter().copied());
    let status = cmd.status().await?;
    let rows = std::fs::read(&json);
    let _ = std::fs::remove_file(&json);
    if !status.success() {
        bail!("the {runner} runner in {CLIENT_NS} failed ({status})");
    }
    Ok(serde_json::from_slice(&rows.context("reading the rows")?)?)
}

/// The auth/TLS comparison over `link` against `nodes` in the server namespace.
async fn secure_rows(
    args: &Args,
    link: &str,
    nodes: &SecureNodes,
) -> anyhow::Result<Vec<SecureRow>> {
    let mut a = cell_args(args);
    a.extend(["--endpoints".into(), nodes.endpoints.join(",")]);
    a.extend(["--ca".into(), nodes.ca_file.to_string_lossy().into_owned()]);
    in_client_ns("secure-cell", a, &[("KVSHARE_TOKEN", &nodes.token)], link).await
}

/// Runs the get and put cells over `link` from the client namespace (this binary re-executed
/// as `net-cell`).
async fn link_cells(
    args: &Args,
    link: &str,
    node: &Node,
    redis: Option<&Redis>,
) -> anyhow::Result<Vec<Cell>> {
    let mut a = cell_args(args);
    a.extend(["--endpoint".into(), node.endpoint.clone()]);
    if let Some(r) = redis {
        a.extend(["--redis-url".into(), r.url.clone()]);
    }
    in_client_ns("net-cell", a, &[], link).await
}

/// A child process killed and reaped on drop.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The shaped-link cells for every rate in `links`; `None` (with a message) where network
/// namespaces are not allowed.
pub async fn run(args: &Args, links: &[LinkRate]) -> anyhow::Result<Option<ShapedReport>> {
    if let Err(e) = permitted() {
        println!(
            "\nSKIPPED shaped-link cells ({}): cannot create network namespaces here ({e}); they \
             need root or CAP_NET_ADMIN and iproute2",
            links
                .iter()
                .map(|l| l.label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Ok(None);
    }
    // Drop order (reverse of declaration): children, then servers, then the namespaces.
    let net = Net::create()?;
    println!(
        "\n== shaped links: namespaces {SERVER_NS} ({SERVER_IP}) and {CLIENT_NS} ({CLIENT_IP}), \
         veth pair, tbf each way"
    );
    let place = Place::Netns {
        ns: SERVER_NS,
        ip: SERVER_IP,
    };
    // The node listens on the namespace's private address: without the flag, protected mode
    // (no --auth-file on a non-loopback address) would refuse the client namespace.
    let part = |p: Part| args.parts.contains(&p);
    // Shaped throughput cells unless only the auth/TLS comparison was asked for.
    let cells = part(Part::Throughput) || !part(Part::Secure);
    let secure_nodes = if part(Part::Secure) {
        Some(SecureNodes::start(args, place).await?)
    } else {
        None
    };
    let node = Node::start_at(place, "4GiB", &["--insecure-no-auth"]).await?;
    let redis = match args.compare {
        crate::Baseline::Redis => Some(Redis::start_at(place).await?),
        crate::Baseline::None => None,
    };
    let exe = std::env::current_exe()?;
    let mut sink = ChildGuard(
        Command::new("ip")
            .args(["netns", "exec", SERVER_NS])
            .arg(exe)
            .args(["tcp-serve", "--listen", &format!("{SERVER_IP}:{TCP_PORT}")])
            .spawn()
            .context("starting tcp-serve")?,
    );
    let t0 = Instant::now();
    while !listens_in_ns(sink.0.id(), TCP_PORT) {
        if let Some(s) = sink.0.try_wait()? {
            bail!("tcp-serve exited ({s})");
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("tcp-serve does not listen after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut report = ShapedReport {
        unshaped_gbit: measure_link().await?,
        ..Default::default()
    };
    println!(
        "unshaped veth: raw TCP {:.2} Gbit/s down, {:.2} up (one stream)",
        report.unshaped_gbit.0, report.unshaped_gbit.1
    );
    for rate in links {
        let link = tune(&net, rate).await?;
        println!(
            "\n== throughput over link {} (delivers {:.2} / {:.2} Gbit/s): raw K/V GB/s (wire GB/s)",
            rate.label, link.delivered_down_gbit, link.delivered_up_gbit
        );
        if cells {
            report
                .cells
                .extend(link_cells(args, &rate.label, &node, redis.as_ref()).await?);
        }
        if let Some(nodes) = &secure_nodes {
            report
                .secure
                .extend(secure_rows(args, &rate.label, nodes).await?);
        }
        report.links.push(link);
        // The next link's tuning starts from an unshaped veth.
        net.shape(None)?;
    }
    report.ratios = ratios(&report.cells);
    drop(sink);
    if let Some(r) = redis {
        r.stop();
    }
    node.stop();
    if let Some(nodes) = secure_nodes {
        nodes.stop();
    }
    drop(net);
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_rates_parse() {
        let r: LinkRate = "2gbit".parse().unwrap();
        assert_eq!(r.bits_per_s, 2_000_000_000);
        assert_eq!(r.label, "2gbit");
        assert_eq!(
            "2.5Gbit".parse::<LinkRate>().unwrap().bits_per_s,
            2_500_000_000
        );
        assert_eq!(
            "500mbit".parse::<LinkRate>().unwrap().bits_per_s,
            500_000_000
        );
        for bad in [
            "2",
            "gbit",
            "2tbit",
            "0.1mbit",
            "5000gbit",
            "-1gbit",
            "1.2.3gbit",
        ] {
            assert!(bad.parse::<LinkRate>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn burst_candidates_grow_from_one_millisecond() {
        let c = candidates(&"2gbit".parse().unwrap());
        // 2 Gbit/s = 250,000 bytes per ms.
        assert_eq!(c[0].burst_bytes, 250_000);
        assert!(c.windows(2).all(|w| w[1].burst_bytes > w[0].burst_bytes));
        assert!(c.windows(2).all(|w| w[1].latency_us >= w[0].latency_us));
        // Never below one GSO segment.
        assert_eq!(
            candidates(&"100mbit".parse().unwrap())[0].burst_bytes,
            64 << 10
        );
    }

    #[test]
    fn ratios_pair_cells_of_the_same_link_op_and_size() {
        let c = |system: &str, link: &str, op: &str, gbps: f64| Cell {
            system: system.into(),
            link: link.into(),
            op: op.into(),
            block_bytes: 1 << 20,
            concurrency: 4,
            ops: 8,
            seconds: 1.0,
            raw_gbps: gbps,
            wire_gbps: gbps / 1.44,
            ops_per_s: 8.0,
        };
        let cells = vec![
            c("kvshare", "2gbit", "get", 0.344),
            c("redis", "2gbit", "get", 0.239),
            c("kvshare", "5gbit", "get", 0.847),
            c("redis", "5gbit", "get", 0.598),
            c("kvshare", "5gbit", "put", 0.471),
        ];
        let r = ratios(&cells);
        assert_eq!(r.len(), 2, "a cell without Redis has no ratio");
        assert_eq!((r[0].link.as_str(), r[0].redis_raw_gbps), ("2gbit", 0.239));
        assert!((r[0].ratio - 0.344 / 0.239).abs() < 1e-12);
        assert!((r[1].ratio - 0.847 / 0.598).abs() < 1e-12);
    }

    #[test]
    fn ten_percent_band() {
        assert!(within_10pct(1.9, 2.0));
        assert!(within_10pct(2.2, 2.0));
        assert!(!within_10pct(2.9, 5.0));
        assert!(!within_10pct(2.3, 2.0));
    }

    #[test]
    fn raw_tcp_test_on_loopback() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for s in l.incoming().take(2) {
                serve_one(s.unwrap()).unwrap();
            }
        });
        for dir in [Direction::Down, Direction::Up] {
            let r = tcp_rate(&addr, dir, Duration::from_millis(100)).unwrap();
            assert!(r.bytes >= 1 << 20, "{dir:?}: {r:?}");
            assert!(r.seconds > 0.0 && r.gbit() > 0.0, "{dir:?}: {r:?}");
        }
    }
}

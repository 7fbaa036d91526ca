//! Protected mode over real network interfaces: nodes listen on `0.0.0.0` inside a server
//! network namespace, and clients connect from a second namespace over a veth pair (a
//! non-loopback source address) or from loopback inside the server's namespace.
//!
//! - no `--auth-file`: the remote client gets `PERMISSION_DENIED` naming `--auth-file` and
//!   `--insecure-no-auth` on gRPC and `403` on `/api/stats`, while `/healthz` and `/readyz`
//!   stay open; a loopback client in the node's namespace is served;
//! - `--insecure-no-auth`: the remote client is served and the node logs the warning;
//! - `--auth-file`: the remote client is served with a valid token (and refused without).
//!
//! The clients are this test binary, re-run inside a namespace to execute one [`probe`]
//! command, so all traffic stays inside the namespaces (addresses in 10.214.<n>.0/24 exist only
//! there). Skipped, with a message, where `ip netns` is not permitted (not root, no iproute2).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvshare_client::{ClientOptions, KvClient};
use kvshare_core::{Codec, DType, KvLayout, Namespace};
use sha2::{Digest, Sha256};

/// Environment variable carrying a probe command (see [`run_probe`]).
const PROBE_ENV: &str = "KVSHARE_PROTECTED_PROBE";
/// Prefix of the probe's answer line on stdout.
const PROBE_ANSWER: &str = "probe-answer: ";
/// The token of the auth-file node (role writer of tenant `t`).
const TOKEN: &str = "protected-test-writer";

/// Namespaces and node processes, removed and killed on drop (also when an assertion fails).
struct Net {
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace removes the veth end inside it, and with it the pair.
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut a = vec!["netns", "exec", ns];
    a.extend_from_slice(args);
    ip(&a)
}

/// Two namespaces joined by a veth pair: `server` (10.214.<subnet>.1) and `client` (.2).
fn setup(tag: &str, subnet: u8, net: &mut Net) -> Result<(String, String), String> {
    let (server, client) = (format!("kvp{tag}s"), format!("kvp{tag}c"));
    for ns in [&server, &client] {
        ip(&["netns", "add", ns])?;
        net.namespaces.push(ns.clone());
    }
    let (vs, vc) = (format!("kvp{tag}vs"), format!("kvp{tag}vc"));
    ip(&["link", "add", &vs, "type", "veth", "peer", "name", &vc])?;
    for (ns, dev, host) in [(&server, &vs, 1), (&client, &vc, 2)] {
        ip(&["link", "set", dev, "netns", ns])?;
        let addr = format!("10.214.{subnet}.{host}/24");
        in_ns(ns, &["ip", "addr", "add", &addr, "dev", dev])?;
        in_ns(ns, &["ip", "link", "set", dev, "up"])?;
        in_ns(ns, &["ip", "link", "set", "lo", "up"])?;
    }
    Ok((server, client))
}

/// Runs one probe command inside namespace `ns` (this test binary, re-executed with
/// [`PROBE_ENV`] set); returns the probe's answer.
fn probe_in(ns: &str, command: &str) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args([
            "probe",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(PROBE_ENV, command)
        .output()
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    // libtest prints "test probe ... " on the same line, before the answer.
    let answer = stdout.lines().find_map(|l| l.split_once(PROBE_ANSWER));
    match answer.map(|(_, a)| a) {
        Some(answer) if out.status.success() => Ok(answer.to_string()),
        _ => Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))),
    }
}

/// Status line of `GET path` on `addr` (HTTP/1.0), with an optional bearer token.
fn http_status(addr: &str, path: &str, token: Option<&str>) -> Result<u16, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {out:?}"))
}

/// One probe command:
/// - `http <addr> <path> [token]`: `status=<code>`;
/// - `grpc <endpoint> [token]`: a Put, a Get (compared with what was put) and a Stats; `ok`
///   or `code=<gRPC code> <message>` of the first refusal.
async fn run_probe(command: &str) -> Result<String, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        ["http", addr, path, rest @ ..] => {
            http_status(addr, path, rest.first().copied()).map(|s| format!("status={s}"))
        }
        ["grpc", endpoint, rest @ ..] => {
            let opts = ClientOptions {
                timeout: Duration::from_secs(5),
                codec: Codec::None,
                token: rest.first().map(|t| t.to_string()),
                ..Default::default()
            };
            let mut c = KvClient::connect(endpoint, opts)
                .await
                .map_err(|e| e.to_string())?;
            let layout = KvLayout {
                num_layers: 1,
                num_kv_heads: 1,
                head_dim: 64,
                dtype: DType::U8,
                tokens_per_block: 4,
            };
            let ns = Namespace::new("protected", layout);
            let tokens: Vec<u32> = (0..8).collect();
            let blocks = vec![vec![3u8; 512], vec![4u8; 512]];
            let refused = |e: kvshare_client::ClientError| match e.code() {
                Some(code) => Ok(format!("code={code:?} {e}")),
                None => Err(e.to_string()),
            };
            if let Err(e) = c.put_prefix(&ns, &tokens, &blocks).await {
                return refused(e);
            }
            match c.get_prefix(&ns, &tokens).await {
                Ok(got) if got == blocks => {}
                Ok(got) => return Err(format!("got {} blocks, not what was put", got.len())),
                Err(e) => return refused(e),
            }
            match c.stats().await {
                Ok(s) if s.stored_blocks >= 2 => Ok("ok".to_string()),
                Ok(s) => Err(format!("stats show {} blocks", s.stored_blocks)),
                Err(e) => refused(e),
            }
        }
        _ => Err(format!("unknown probe command {command:?}")),
    }
}

/// Not a test on its own: the client half of the protected-mode test, run by [`probe_in`].
#[test]
#[ignore = "run by the protected-mode test inside a network namespace"]
fn probe() {
    let Ok(command) = std::env::var(PROBE_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    match rt.block_on(run_probe(&command)) {
        Ok(answer) => println!("{PROBE_ANSWER}{answer}"),
        Err(e) => panic!("probe {command:?} failed: {e}"),
    }
}

/// Starts `kvshared` inside namespace `ns` on `0.0.0.0:<grpc>` and `0.0.0.0:<http>`, its log
/// (stdout and stderr) in `log`.
fn start_node(ns: &str, id: &str, grpc: u16, http: u16, extra: &[&str], log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_kvshared"))
        .args(["--node-id", id])
        .args(["--grpc-addr", &format!("0.0.0.0:{grpc}")])
        .args(["--http-addr", &format!("0.0.0.0:{http}")])
        .args(["--capacity", "16MiB", "--log-level", "info"])
        .args(extra)
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("start kvshared in its namespace")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn protected_mode_refuses_remote_clients_until_auth_or_insecure_no_auth() {
    let t0 = Instant::now();
    let check = format!("kvsprot{}", std::process::id());
    if let Err(e) = ip(&["netns", "add", &check]) {
        eprintln!("SKIPPED protected-mode test: cannot create network namespaces here ({e})");
        return;
    }
    let _ = ip(&["netns", "del", &check]);

    let tag = format!("{:x}", std::process::id() % 0xfff);
    let subnet = (std::process::id() % 200) as u8 + 20;
    let mut net = Net {
        namespaces: vec![],
        children: vec![],
    };
    let (server, client) = setup(&tag, subnet, &mut net).expect("namespaces and veth pair");
    let node_ip = format!("10.214.{subnet}.1");

    let dir = tempfile::tempdir().expect("dir");
    let auth = dir.path().join("auth.toml");
    let digest = hex::encode(Sha256::digest(TOKEN.as_bytes()));
    std::fs::write(
        &auth,
        format!(
            "[tenants.t]\n[[tokens]]\ntenant = \"t\"\nrole = \"writer\"\nsha256 = \"{digest}\"\n"
        ),
    )
    .expect("auth file");
    let auth = auth.to_str().expect("utf-8 path");
    // (name, gRPC port, HTTP port, flags): all three in the server namespace.
    let nodes: [(&str, u16, u16, &[&str]); 3] = [
        ("protected", 50051, 9090, &[]),
        ("insecure", 50052, 9091, &["--insecure-no-auth"]),
        ("tokens", 50053, 9092, &["--auth-file", auth]),
    ];
    for (id, grpc, http, extra) in nodes {
        let log = dir.path().join(format!("{id}.log"));
        net.children
            .push(start_node(&server, id, grpc, http, extra, &log));
    }
    for (id, _, http, _) in nodes {
        wait_until(
            &format!("{id} serving /healthz"),
            Duration::from_secs(15),
            || {
                probe_in(&server, &format!("http 127.0.0.1:{http} /healthz"))
                    .is_ok_and(|a| a == "status=200")
            },
        );
    }
    let log = |id: &str| {
        std::fs::read_to_string(dir.path().join(format!("{id}.log"))).unwrap_or_default()
    };
    let remote = |cmd: &str| probe_in(&client, cmd).expect(cmd);
    let local = |cmd: &str| probe_in(&server, cmd).expect(cmd);

    // (a) Protected mode: a client from the other namespace is refused on gRPC and /api, with a
    // message naming both ways out; health endpoints stay open.
    let a = remote(&format!("grpc http://{node_ip}:50051"));
    assert!(a.starts_with("code=PermissionDenied"), "{a}");
    assert!(
        a.contains("--auth-file") && a.contains("--insecure-no-auth"),
        "{a}"
    );
    for (path, want) in [
        ("/api/stats", 403),
        ("/api/cluster", 403),
        ("/healthz", 200),
        ("/readyz", 200),
    ] {
        assert_eq!(
            remote(&format!("http {node_ip}:9090 {path}")),
            format!("status={want}"),
            "remote {path} in protected mode"
        );
    }
    assert!(
        log("protected").contains("protected mode"),
        "{}",
        log("protected")
    );

    // (b) A loopback client inside the node's own namespace is served.
    assert_eq!(local("grpc http://127.0.0.1:50051"), "ok");
    assert_eq!(local("http 127.0.0.1:9090 /api/stats"), "status=200");

    // (c) --insecure-no-auth: the remote client is served, and the node says it is exposed.
    assert_eq!(remote(&format!("grpc http://{node_ip}:50052")), "ok");
    assert_eq!(
        remote(&format!("http {node_ip}:9091 /api/stats")),
        "status=200"
    );
    let insecure_log = log("insecure");
    assert!(
        insecure_log.contains("WARN")
            && insecure_log.contains("--insecure-no-auth: no --auth-file")
            && insecure_log.contains("anyone who can reach this node"),
        "{insecure_log}"
    );

    // (d) --auth-file: the remote client is served with a valid token, refused without.
    let a = remote(&format!("grpc http://{node_ip}:50053"));
    assert!(a.starts_with("code=Unauthenticated"), "{a}");
    assert_eq!(
        remote(&format!("grpc http://{node_ip}:50053 {TOKEN}")),
        "ok"
    );
    assert_eq!(
        remote(&format!("http {node_ip}:9092 /api/stats")),
        "status=401"
    );
    assert_eq!(
        remote(&format!("http {node_ip}:9092 /api/stats {TOKEN}")),
        "status=200"
    );
    println!("protected-mode test took {:?}", t0.elapsed());
}

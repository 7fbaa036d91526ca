//! Tokens, roles, tenants and quotas against real `kvshared` processes started with
//! `--auth-file`: unauthenticated calls, each role against each RPC, tenant isolation, quotas,
//! revocation by reload on an open connection, HTTP, and forwarding with peer tokens in a
//! 3-node cluster.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvshare_client::{ClientOptions, KvClient, PutItem, encode_prefix};
use kvshare_core::{BlockKey, Codec, DType, KvLayout, Namespace};
use kvshare_testkit::{NodeProcess, free_port};
use sha2::{Digest, Sha256};
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_kvshared");

/// 512 raw bytes per block, stored uncompressed: charged 768 bytes.
fn layout() -> KvLayout {
    KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 64,
        dtype: DType::U8,
        tokens_per_block: 4,
    }
}

const CHARGE: u64 = 512 + 256;

fn sha(t: &str) -> String {
    hex::encode(Sha256::digest(t.as_bytes()))
}

/// Tenants a (quota 4 blocks) and b; tokens `<role>-<tenant>`, `admin`, `peer`.
fn auth_file(revoked: &[&str]) -> String {
    let mut s = format!("[tenants.a]\nquota = \"{}\"\n[tenants.b]\n", 4 * CHARGE);
    let tokens = [
        ("reader-a", "reader", Some("a")),
        ("writer-a", "writer", Some("a")),
        ("reader-b", "reader", Some("b")),
        ("writer-b", "writer", Some("b")),
        ("admin", "admin", None),
        ("peer", "peer", None),
    ];
    for (tok, role, tenant) in tokens {
        if revoked.contains(&tok) {
            continue;
        }
        s.push_str(&format!(
            "[[tokens]]\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            sha(tok)
        ));
        if let Some(t) = tenant {
            s.push_str(&format!("tenant = \"{t}\"\n"));
        }
    }
    s
}

fn write_auth(dir: &Path, revoked: &[&str]) -> PathBuf {
    let p = dir.join("auth.toml");
    // Written beside and renamed, as config management does (a new inode).
    let tmp = dir.join("auth.toml.tmp");
    std::fs::write(&tmp, auth_file(revoked)).expect("write auth file");
    std::fs::rename(&tmp, &p).expect("rename auth file");
    p
}

fn start(dir: &Path, id: &str, peers: &[String], grpc: u16, extra: &[&str]) -> NodeProcess {
    let auth = dir.join("auth.toml");
    let auth = auth.to_str().expect("utf-8 path");
    let peer = dir.join("peer-token");
    std::fs::write(&peer, "peer\n").expect("peer token");
    let peer = peer.to_str().expect("utf-8 path");
    let mut args = vec!["--auth-file", auth, "--peer-token-file", peer];
    args.extend_from_slice(extra);
    NodeProcess::start(
        Path::new(BIN),
        id,
        grpc,
        free_port().expect("port"),
        peers,
        &args,
    )
}

async fn client(endpoint: &str, token: Option<&str>) -> KvClient {
    let opts = ClientOptions {
        token: token.map(str::to_string),
        timeout: Duration::from_secs(10),
        codec: Codec::None,
        ..Default::default()
    };
    KvClient::connect(endpoint, opts).await.expect("connect")
}

fn prompt(n: u32, seed: u32) -> Vec<u32> {
    (0..n * 4).map(|i| i + seed * 100_000).collect()
}

fn items(ns: &Namespace, tokens: &[u32], fill: u8) -> (Vec<BlockKey>, Vec<PutItem>) {
    let keys = ns.block_keys(tokens).expect("keys");
    let blocks: Vec<Vec<u8>> = (0..keys.len())
        .map(|i| vec![fill.wrapping_add(i as u8); 512])
        .collect();
    let items = encode_prefix(ns, &keys, &blocks, Codec::None).expect("encode");
    (keys, items)
}

fn code<T: std::fmt::Debug>(r: Result<T, kvshare_client::ClientError>) -> Option<Code> {
    r.err().and_then(|e| e.code())
}

/// Status code and body of `GET path` with an optional bearer token.
fn http(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(2))).ok();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").as_bytes())
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_tokens_roles_tenants_quotas_and_reload() {
    let dir = tempfile::tempdir().expect("dir");
    write_auth(dir.path(), &[]);
    let node = start(dir.path(), "n1", &[], free_port().expect("port"), &[]);
    let ep = node.endpoint();
    let ns = Namespace::new("model", layout());
    let (keys, put) = items(&ns, &prompt(2, 1), 1);

    // No token, unknown token: UNAUTHENTICATED, naming the header.
    let mut anon = client(&ep, None).await;
    let e = anon
        .lookup_keys(&ns.digest(), &keys)
        .await
        .expect_err("anon");
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    assert!(e.to_string().contains("authorization"), "{e}");
    let mut unknown = client(&ep, Some("guess")).await;
    let e = unknown.stats().await.expect_err("unknown");
    assert_eq!(e.code(), Some(Code::Unauthenticated));
    assert!(e.to_string().contains("unknown token"), "{e}");
    // A malformed header (no scheme), sent by hand.
    let ch = tonic::transport::Endpoint::from_shared(ep.clone())
        .expect("ep")
        .connect()
        .await
        .expect("channel");
    let mut raw = kvshare_proto::transport::kv_client(ch);
    let mut req = tonic::Request::new(kvshare_proto::v1::StatsRequest::default());
    req.metadata_mut()
        .insert("authorization", "writer-a".parse().expect("ascii"));
    let e = raw.stats(req).await.expect_err("malformed");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("malformed"), "{}", e.message());

    // Roles against RPCs.
    let mut ra = client(&ep, Some("reader-a")).await;
    let mut wa = client(&ep, Some("writer-a")).await;
    let mut wb = client(&ep, Some("writer-b")).await;
    let mut rb = client(&ep, Some("reader-b")).await;
    let mut admin = client(&ep, Some("admin")).await;
    let mut peer = client(&ep, Some("peer")).await;
    let e = ra.put_blocks(put.clone()).await.expect_err("reader put");
    assert_eq!(e.code(), Some(Code::PermissionDenied));
    assert!(e.to_string().contains("writer or admin"), "{e}");
    assert_eq!(
        code(ra.delete_keys(&ns.digest(), &keys).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(wa.set_capacity(1 << 30).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(peer.lookup_keys(&ns.digest(), &keys).await),
        Some(Code::PermissionDenied)
    );
    assert_eq!(
        code(peer.put_blocks(put.clone()).await),
        Some(Code::PermissionDenied)
    );
    assert!(admin.set_capacity(1 << 30).await.is_ok());
    assert!(ra.cluster_info().await.is_ok() && peer.cluster_info().await.is_ok());
    assert_eq!(
        wa.put_blocks(put.clone())
            .await
            .expect("writer put")
            .stored(),
        2
    );
    assert_eq!(
        ra.lookup_keys(&ns.digest(), &keys).await.expect("lookup"),
        2
    );
    assert!(
        ra.get_blocks(&ns.digest(), &keys)
            .await
            .expect("get")
            .iter()
            .all(Option::is_some)
    );

    // Tenant b probes a's exact namespace and keys: answers identical to a miss.
    let (never, _) = items(&ns, &prompt(2, 99), 0);
    let miss_lookup = rb.presence(&ns.digest(), &never).await.expect("miss");
    assert_eq!(
        rb.presence(&ns.digest(), &keys).await.expect("probe"),
        miss_lookup
    );
    assert_eq!(rb.lookup_keys(&ns.digest(), &keys).await.expect("probe"), 0);
    let got = rb.get_blocks(&ns.digest(), &keys).await.expect("get");
    assert!(got.iter().all(Option::is_none));
    assert_eq!(
        wb.delete_keys(&ns.digest(), &keys).await.expect("delete"),
        0
    );
    assert_eq!(
        ra.lookup_keys(&ns.digest(), &keys)
            .await
            .expect("still there"),
        2
    );
    // b stores the same namespace and keys: its own copies, a's untouched.
    assert_eq!(wb.put_blocks(put.clone()).await.expect("b put").stored(), 2);
    assert_eq!(rb.lookup_keys(&ns.digest(), &keys).await.expect("b"), 2);
    // Stats: a reader sees its tenant only, an admin every tenant.
    let sa = ra.stats().await.expect("stats");
    assert_eq!((sa.stored_blocks, sa.capacity_bytes), (2, 4 * CHARGE));
    assert_eq!(admin.stats().await.expect("stats").stored_blocks, 4);

    // Quota: a holds at most 4 blocks; 6 more of a evict only a's blocks.
    let (keys2, put2) = items(&ns, &prompt(6, 2), 7);
    assert_eq!(wa.put_blocks(put2).await.expect("a put").stored(), 6);
    assert_eq!(ra.stats().await.expect("stats").stored_blocks, 4);
    assert_eq!(
        rb.lookup_keys(&ns.digest(), &keys).await.expect("b kept"),
        2
    );
    assert_eq!(
        ra.lookup_keys(&ns.digest(), &keys).await.expect("a oldest"),
        0
    );
    assert_eq!(
        ra.presence(&ns.digest(), &keys2)
            .await
            .expect("a")
            .iter()
            .filter(|p| **p)
            .count(),
        4
    );
    // A block larger than the quota: RESOURCE_EXHAUSTED.
    let big_layout = KvLayout {
        head_dim: 2048,
        ..layout()
    };
    let big_ns = Namespace::new("big", big_layout);
    let tokens = prompt(1, 3);
    let big_keys = big_ns.block_keys(&tokens).expect("keys");
    let big = encode_prefix(&big_ns, &big_keys, &[vec![1u8; 16_384]], Codec::None).expect("encode");
    let e = wa.put_blocks(big).await.expect_err("over quota");
    assert_eq!(e.code(), Some(Code::ResourceExhausted));
    assert!(e.to_string().contains("quota"), "{e}");

    // HTTP: health open, /api needs a token, /metrics open with per-tenant series.
    assert_eq!(http(&node.http, "/healthz", None).0, 200);
    assert_eq!(http(&node.http, "/api/stats", None).0, 401);
    assert_eq!(http(&node.http, "/api/stats", Some("nope")).0, 401);
    let (st, body) = http(&node.http, "/api/stats", Some("reader-b"));
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let tenants: Vec<&str> = v["tenants"]
        .as_array()
        .expect("tenants")
        .iter()
        .filter_map(|t| t["tenant"].as_str())
        .collect();
    assert_eq!(tenants, vec!["b"]);
    let (st, body) = http(&node.http, "/metrics", None);
    assert_eq!(st, 200);
    assert!(
        body.contains("kvshare_tenant_blocks{tenant=\"a\"} 4"),
        "{body}"
    );
    assert!(
        body.contains("kvshare_tenant_evictions_total{tenant=\"a\"}"),
        "{body}"
    );

    // Revocation: the open connection of writer-a is refused within 2 s of the new file.
    write_auth(dir.path(), &["writer-a"]);
    let t0 = Instant::now();
    loop {
        match wa.stats().await {
            Err(e) if e.code() == Some(Code::Unauthenticated) => break,
            _ if t0.elapsed() > Duration::from_secs(2) => panic!("token still accepted after 2 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(ra.stats().await.is_ok(), "other tokens keep working");
    // A broken file on reload keeps the old configuration and is counted.
    std::fs::write(dir.path().join("auth.toml"), "not = [valid").expect("write");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(ra.stats().await.is_ok());
    let (_, body) = http(&node.http, "/metrics", None);
    assert!(
        kvshare_testkit::metric(&body, "kvshare_auth_reload_failures_total").unwrap_or(0.0) >= 1.0,
        "{body}"
    );
}

#[test]
fn a_bad_auth_file_refuses_to_start() {
    let dir = tempfile::tempdir().expect("dir");
    let auth = dir.path().join("auth.toml");
    std::fs::write(&auth, "[[tokens]]\nrole = \"writer\"\nsha256 = \"xyz\"\n").expect("write");
    let out = std::process::Command::new(BIN)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--auth-file")
        .arg(&auth)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth file") && err.contains("sha256"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_forward_with_tokens_and_keep_tenants_apart() {
    let dir = tempfile::tempdir().expect("dir");
    write_auth(dir.path(), &[]);
    let ports: Vec<u16> = (0..3).map(|_| free_port().expect("port")).collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let nodes: Vec<NodeProcess> = (0..3)
        .map(|i| {
            start(
                dir.path(),
                &format!("n{i}"),
                &addrs,
                ports[i],
                &["--replicas", "2"],
            )
        })
        .collect();
    for n in &nodes {
        // Health checks run with the peer token (ClusterInfo needs one).
        wait_for_members_with_token(&n.endpoint(), 3).await;
    }
    let ns = Namespace::new("model", layout());
    let (keys, put) = items(&ns, &prompt(8, 5), 3);
    let mut wa = client(&nodes[0].endpoint(), Some("writer-b")).await;
    let r = wa.put_blocks(put).await.expect("put through A");
    assert_eq!(r.stored(), 8);
    let mut ra_c = client(&nodes[2].endpoint(), Some("reader-b")).await;
    let got = ra_c
        .get_blocks(&ns.digest(), &keys)
        .await
        .expect("get through C");
    assert!(
        got.iter().all(Option::is_some),
        "b (no quota) reads its blocks through another node"
    );
    assert_eq!(
        ra_c.lookup_keys(&ns.digest(), &keys).await.expect("lookup"),
        8
    );
    let mut rb_c = client(&nodes[2].endpoint(), Some("reader-a")).await;
    assert_eq!(
        rb_c.lookup_keys(&ns.digest(), &keys)
            .await
            .expect("b lookup"),
        0
    );
    let got = rb_c.get_blocks(&ns.digest(), &keys).await.expect("b get");
    assert!(got.iter().all(Option::is_none));
    // Each block is held twice, by tenant b, on the nodes.
    let mut total = 0;
    for n in &nodes {
        let mut adm = client(&n.endpoint(), Some("admin")).await;
        total += adm.stats().await.expect("stats").stored_blocks;
    }
    assert_eq!(total, 16);
    // A client's own do-not-forward request cannot name another tenant.
    let mut rb_direct = client(&nodes[0].endpoint(), Some("reader-a"))
        .await
        .no_forward();
    assert_eq!(
        rb_direct
            .lookup_keys(&ns.digest(), &keys[..1])
            .await
            .expect("b"),
        0
    );
}

/// `kvshare_testkit::wait_for_members` for nodes that need a token: waits until `endpoint` reports `healthy`
/// healthy members.
async fn wait_for_members_with_token(endpoint: &str, healthy: usize) {
    let t0 = Instant::now();
    loop {
        let mut c = client(endpoint, Some("admin")).await;
        if let Ok(info) = c.cluster_info().await
            && info.members.iter().filter(|m| m.healthy).count() >= healthy
        {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{endpoint}: members not healthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

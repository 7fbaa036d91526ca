//! TLS and mTLS against real `kvshared` processes: put/get through the Rust client over TLS,
//! clear failures for a wrong CA, plaintext or a missing client certificate, a 3-node mTLS
//! cluster that forwards, and hot reload of the certificate (file change and SIGHUP) that new
//! connections see while old ones keep working.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvshare_client::{ClientError, ClientOptions, KvClient};
use kvshare_core::{Codec, DType, Namespace};
use kvshare_testkit::pki::{IssuedFiles, TestCa};
use kvshare_testkit::{NodeProcess, free_port, kv_blocks, kv_sample_bytes, minilm_layout};

const BIN: &str = env!("CARGO_BIN_EXE_kvshared");
/// SANs of every test node certificate: nodes and clients dial 127.0.0.1.
const SANS: &[&str] = &["127.0.0.1", "localhost"];

fn start(id: &str, peers: &[String], grpc: u16, http: u16, extra: &[&str]) -> NodeProcess {
    NodeProcess::start(Path::new(BIN), id, grpc, http, peers, extra)
}

fn tls_args<'a>(cert: &'a IssuedFiles, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--tls-cert",
        cert.cert.to_str().expect("utf-8 path"),
        "--tls-key",
        cert.key.to_str().expect("utf-8 path"),
    ];
    v.extend_from_slice(extra);
    v
}

fn opts(ca: &TestCa) -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
        codec: Codec::Lz4,
        ..Default::default()
    }
    .with_tls_pem(ca.cert_pem.as_bytes(), None)
    .expect("CA loads")
}

/// A prompt of `n` blocks and its K/V.
fn prompt(n: usize, seed: u32) -> (Namespace, Vec<u32>, Vec<Vec<u8>>) {
    let layout = minilm_layout(DType::F16, 16);
    let data = kv_sample_bytes(DType::F16);
    let blocks = kv_blocks(&data, layout, n, 5, seed as usize);
    let tokens = kvshare_testkit::prompt_tokens(n * 16, seed);
    (Namespace::new("tls-test-model", layout), tokens, blocks)
}

async fn round_trip(c: &mut KvClient, seed: u32) {
    let (ns, tokens, blocks) = prompt(8, seed);
    let report = c.put_prefix(&ns, &tokens, &blocks).await.expect("put");
    assert_eq!(report.stored() + report.already_present(), 8);
    let back = c.get_prefix(&ns, &tokens).await.expect("get");
    assert_eq!(back.len(), 8);
    assert!(
        back.iter().zip(&blocks).all(|(a, b)| a == b),
        "blocks differ"
    );
}

/// The node's Gets and Puts went over its bulk transport (TLS too, as its gRPC port).
fn assert_bulk_used(node: &NodeProcess) {
    let (_, body) = node.http_get("/metrics").expect("metrics");
    for method in ["get", "put"] {
        let n = kvshare_testkit::metric(
            &body,
            &format!("kvshare_bulk_requests_total{{method=\"{method}\"}}"),
        );
        assert!(n.is_some_and(|n| n >= 1.0), "no bulk {method}: {body}");
    }
}

fn err_text(e: &ClientError) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Connects and makes one call; the error text when either fails.
async fn call(endpoint: &str, opts: ClientOptions) -> Result<(), String> {
    let mut c = KvClient::connect(endpoint, opts)
        .await
        .map_err(|e| err_text(&e))?;
    c.stats().await.map(|_| ()).map_err(|e| err_text(&e))
}

fn ports() -> (u16, u16) {
    (free_port().expect("port"), free_port().expect("port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_grpc_and_http_and_refuses_wrong_ca_and_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("kvshare test CA");
    let cert = ca.issue("node-0", SANS, 1).write(dir.path(), "node");
    let (g, h) = ports();
    let node =
        start("tls-0", &[], g, h, &tls_args(&cert, &[])).with_tls(opts(&ca).tls.expect("tls"));
    node.wait_ready(Duration::from_secs(20))
        .expect("ready over HTTPS");
    let (status, body) = node.http_get("/metrics").expect("metrics over HTTPS");
    assert_eq!(status, 200);
    assert!(body.contains("kvshare_stored_bytes"), "{body}");
    // Plain HTTP to the TLS port gets no answer.
    assert_eq!(kvshare_testkit::http_get(&node.http, "/readyz"), None);

    // The Rust client over TLS: https://, host:port and http:// (upgraded) all work.
    let ep = node.endpoint();
    assert!(ep.starts_with("https://"), "{ep}");
    for e in [
        ep.clone(),
        node.grpc.clone(),
        format!("http://{}", node.grpc),
    ] {
        let mut c = KvClient::connect(&e, opts(&ca)).await.expect("connect");
        assert!(c.endpoint().starts_with("https://"), "{}", c.endpoint());
        round_trip(&mut c, 1).await;
    }
    assert_bulk_used(&node);

    // A client that trusts another CA: a clear certificate error.
    let other = TestCa::new("some other CA");
    let e = call(&ep, opts(&other))
        .await
        .expect_err("wrong CA must fail");
    assert!(
        e.contains("TLS handshake") && e.contains("UnknownIssuer"),
        "unclear error: {e}"
    );
    // https:// without a CA: refused before connecting, saying what is missing.
    let e = call(&ep, ClientOptions::default())
        .await
        .expect_err("no CA");
    assert!(e.contains("--tls-ca"), "{e}");
    // Plaintext gRPC to the TLS port fails.
    let plain = ClientOptions {
        timeout: Duration::from_secs(3),
        ..Default::default()
    };
    assert!(
        call(&format!("http://{}", node.grpc), plain).await.is_err(),
        "plaintext gRPC must not work on a TLS port"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_client_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("kvshare test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let cert = ca.issue("node-0", SANS, 1).write(dir.path(), "node");
    let (g, h) = ports();
    let client_id = ca.issue("client", &["client.test"], 2);
    let mtls_opts = |id: &kvshare_testkit::pki::Issued| {
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..Default::default()
        }
        .with_tls_pem(ca.cert_pem.as_bytes(), Some(&id.identity()))
        .expect("loads")
    };
    let node = start(
        "mtls-0",
        &[],
        g,
        h,
        &tls_args(&cert, &["--tls-client-ca", ca_file.to_str().expect("path")]),
    )
    .with_tls(mtls_opts(&client_id).tls.expect("tls"));
    node.wait_ready(Duration::from_secs(20))
        .expect("ready over HTTPS with a client certificate");

    let mut c = KvClient::connect(&node.endpoint(), mtls_opts(&client_id))
        .await
        .expect("connect with a client certificate");
    round_trip(&mut c, 2).await;
    assert_bulk_used(&node);

    // No client certificate: the server refuses the handshake.
    let e = call(&node.endpoint(), opts(&ca))
        .await
        .expect_err("no client certificate must fail");
    assert!(
        e.contains("requires a client certificate (mTLS)"),
        "unclear error: {e}"
    );
    // A client certificate from another CA: refused too.
    let other = TestCa::new("other CA").issue("intruder", &["x.test"], 3);
    let e = call(&node.endpoint(), mtls_opts(&other))
        .await
        .expect_err("foreign client certificate must fail");
    assert!(e.contains("fatal alert: UnknownCA"), "unclear error: {e}");
    // HTTP without a client certificate: the probes (kubelet has no certificate) and nothing
    // else.
    let anon = opts(&ca).tls.expect("tls");
    let probe = kvshare_testkit::https_get(&node.http, "/readyz", &anon);
    assert_eq!(probe.map(|(s, _)| s), Some(200));
    for path in ["/metrics", "/api/stats", "/api/cluster", "/dashboard"] {
        let (status, body) = kvshare_testkit::https_get(&node.http, path, &anon).expect("answers");
        assert_eq!(status, 403, "{path}: {body}");
        assert!(body.contains("client certificate"), "{body}");
    }
    let (status, _) = node.http_get("/metrics").expect("metrics");
    assert_eq!(status, 200, "with a client certificate");
    // A client certificate from another CA fails the HTTP handshake.
    let foreign = ClientOptions::default()
        .with_tls_pem(ca.cert_pem.as_bytes(), Some(&other.identity()))
        .expect("loads")
        .tls
        .expect("tls");
    assert_eq!(
        kvshare_testkit::https_get(&node.http, "/readyz", &foreign),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_mtls_cluster_forwards_puts_and_gets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("kvshare cluster CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| ports()).collect();
    let peers: Vec<String> = ports
        .iter()
        .map(|(g, _)| format!("127.0.0.1:{g}"))
        .collect();
    let client_id = ca.issue("client", &["client.test"], 100);
    let copts = ClientOptions {
        timeout: Duration::from_secs(10),
        codec: Codec::Lz4,
        ..Default::default()
    }
    .with_tls_pem(ca.cert_pem.as_bytes(), Some(&client_id.identity()))
    .expect("loads");
    let certs: Vec<IssuedFiles> = (0..3)
        .map(|i| {
            ca.issue(&format!("node-{i}"), SANS, i as u64 + 1)
                .write(dir.path(), &format!("node-{i}"))
        })
        .collect();
    let nodes: Vec<NodeProcess> = (0..3)
        .map(|i| {
            let (g, h) = ports[i];
            start(
                &format!("mtls-node-{i}"),
                &peers,
                g,
                h,
                &tls_args(
                    &certs[i],
                    &["--tls-client-ca", ca_file.to_str().expect("path")],
                ),
            )
            .with_tls(copts.tls.clone().expect("tls"))
        })
        .collect();
    for n in &nodes {
        n.wait_ready(Duration::from_secs(20)).expect("ready");
    }
    // Peers' health checks run over mTLS: every node sees all three.
    for n in &nodes {
        kvshare_testkit::wait_for_members_with(&n.endpoint(), 3, copts.clone()).await;
    }
    // Through node 0 only: keys owned by the others are forwarded (2 replicas each).
    let mut c = KvClient::connect(&nodes[0].endpoint(), copts.clone())
        .await
        .expect("connect");
    let (ns, tokens, blocks) = prompt(24, 3);
    let report = c.put_prefix(&ns, &tokens, &blocks).await.expect("put");
    assert_eq!(report.stored(), 24);
    assert!(
        report.outcomes.iter().all(|o| o.replicas == 2),
        "{report:?}"
    );
    let mut per_node = Vec::new();
    for n in &nodes {
        let mut nc = KvClient::connect(&n.endpoint(), copts.clone())
            .await
            .expect("connect")
            .no_forward();
        per_node.push(nc.stats().await.expect("stats").stored_blocks);
    }
    assert_eq!(per_node.iter().sum::<u64>(), 48, "{per_node:?}");
    assert!(per_node[0] < 24, "nothing was forwarded: {per_node:?}");
    // Read back through node 2: it fetches what it does not hold from its peers.
    let mut c2 = KvClient::connect(&nodes[2].endpoint(), copts.clone())
        .await
        .expect("connect");
    let back = c2.get_prefix(&ns, &tokens).await.expect("get");
    assert_eq!(back.len(), 24);
    assert!(back.iter().zip(&blocks).all(|(a, b)| a == b));
}

/// Replaces `files` with `new` the way a Secret update does: write aside, rename over.
fn replace_files(files: &IssuedFiles, new: &kvshare_testkit::pki::Issued, dir: &Path) {
    let staged = new.write(dir, "staged");
    std::fs::rename(staged.key, &files.key).expect("rename key");
    std::fs::rename(staged.cert, &files.cert).expect("rename cert");
}

/// Waits until a new connection trusting only `ca` succeeds; how long it took.
async fn new_connection_trusts(endpoint: &str, ca: &TestCa, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if call(endpoint, opts(ca)).await.is_ok() {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "new connections did not see the new certificate within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reload_case(use_sighup: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca1 = TestCa::new("CA one");
    let ca2 = TestCa::new("CA two");
    let files = ca1.issue("node", SANS, 1).write(dir.path(), "node");
    let (g, h) = ports();
    // With SIGHUP, polling is made too slow to be what reloads.
    let interval = if use_sighup { "3600000" } else { "1000" };
    let node = start(
        if use_sighup { "hup-0" } else { "reload-0" },
        &[],
        g,
        h,
        &tls_args(&files, &["--tls-reload-interval-ms", interval]),
    )
    .with_tls(opts(&ca1).tls.expect("tls"));
    node.wait_ready(Duration::from_secs(20)).expect("ready");
    let ep = node.endpoint();
    // An open connection made with the old certificate (it trusts only CA one).
    let mut old = KvClient::connect(&ep, opts(&ca1)).await.expect("connect");
    round_trip(&mut old, 4).await;
    assert!(call(&ep, opts(&ca2)).await.is_err(), "CA two not yet");

    // New certificate: another CA and serial.
    replace_files(&files, &ca2.issue("node", SANS, 2), dir.path());
    if use_sighup {
        let pid = node.pid().expect("running").to_string();
        let st = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill -HUP");
        assert!(st.success());
    }
    let took = new_connection_trusts(&ep, &ca2, Duration::from_secs(2)).await;
    println!("new certificate seen after {took:?} (sighup: {use_sighup})");
    // New connections no longer get the old certificate.
    assert!(
        call(&ep, opts(&ca1)).await.is_err(),
        "old cert still served"
    );
    // The old connection was not dropped: had it been, its reconnect (trusting CA one only)
    // would fail against the new certificate.
    round_trip(&mut old, 5).await;
    // HTTPS serves the new certificate too.
    assert!(
        kvshare_testkit::https_get(&node.http, "/readyz", &opts(&ca2).tls.expect("tls")).is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_file_change_is_picked_up_without_dropping_connections() {
    reload_case(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    reload_case(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_refuse_to_start_and_tls_with_peers_needs_a_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("CA");
    let cert = ca.issue("node", SANS, 1).write(dir.path(), "node");
    let missing = PathBuf::from("/nonexistent/key.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("run kvshared");
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&[
        "--tls-cert",
        cert.cert.to_str().expect("path"),
        "--tls-key",
        missing.to_str().expect("path"),
    ]);
    assert!(err.contains("/nonexistent/key.pem"), "{err}");
    let err = run(&[
        "--tls-cert",
        cert.cert.to_str().expect("path"),
        "--tls-key",
        cert.key.to_str().expect("path"),
        "--peers",
        "127.0.0.1:1",
    ]);
    assert!(err.contains("--tls-ca"), "{err}");
}

/// A connection that never starts its TLS handshake, and one that completes TLS but never
/// sends the HTTP/2 preface, are both closed by the handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_covers_tls_and_the_http2_preface() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("CA");
    let cert = ca.issue("node", SANS, 1).write(dir.path(), "node");
    let (g, h) = ports();
    let node = start(
        "hs-0",
        &[],
        g,
        h,
        &tls_args(&cert, &["--handshake-timeout-ms", "300"]),
    )
    .with_tls(opts(&ca).tls.expect("tls"));
    node.wait_ready(Duration::from_secs(20)).expect("ready");
    let addr: std::net::SocketAddr = node.grpc.parse().expect("addr");
    // Silent TCP: closed after ~300 ms.
    let t0 = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    let took = t0.elapsed();
    assert_eq!(n, 0, "server sent bytes to a silent client");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // TLS done, no HTTP/2 preface: closed by the same deadline.
    let tls = opts(&ca).tls.expect("tls");
    let mut config = (*tls.config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let conn = rustls::ClientConnection::new(
        std::sync::Arc::new(config),
        rustls::pki_types::ServerName::from(addr.ip()),
    )
    .expect("client");
    let t0 = Instant::now();
    let tcp = std::net::TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // Reading drives the handshake, then waits for data: the server's SETTINGS arrive first
    // (HTTP/2 servers speak first), then the close.
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let took = t0.elapsed();
    assert!(!s.conn.is_handshaking(), "TLS handshake did not complete");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

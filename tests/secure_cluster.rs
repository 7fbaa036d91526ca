//! Every client against one authenticated mTLS cluster (issue 13, acceptance 3): three
//! `kvshared` processes with `--auth-file`, TLS, `--tls-client-ca` (peers talk over mTLS with the
//! peer token) and 2 replicas; then the Rust `ClusterClient`, the `kvshare` CLI and two
//! `kvshare-worker` processes, each with its token and TLS files. A worker that pushed a prompt
//! lets a second worker process take its prefix from the tier; a reader token can read but not
//! push; a client without a token or without a client certificate is refused with a message
//! that names what is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use kvshare_client::{ClientOptions, ClusterClient};
use kvshare_core::{Codec, DType, KvLayout, Namespace};
use kvshare_testkit::NodeProcess;
use kvshare_testkit::pki::TestCa;
use sha2::{Digest, Sha256};

/// A binary of this workspace, from the target directory this test runs in (`cargo test
/// --workspace` builds every package's binaries).
fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --workspace --bins --tests` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

fn sha(t: &str) -> String {
    hex::encode(Sha256::digest(t.as_bytes()))
}

/// Tenant `team` (writer, reader), an admin and the peers' token.
fn auth_file() -> String {
    let mut s = String::from("[tenants.team]\n");
    for (tok, role, tenant) in [
        ("team-writer", "writer", Some("team")),
        ("team-reader", "reader", Some("team")),
        ("ops-admin", "admin", None),
        ("peer-secret", "peer", None),
    ] {
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

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(bin: &Path, args: &[String]) -> Output {
    Command::new(bin)
        .args(args)
        .env_remove("KVSHARE_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The worker's JSON report of one `kvshare-worker run`.
fn worker_run(tier: &str, token: &str, tls: &[String], prompt: &str) -> serde_json::Value {
    let mut args = strings(&[
        "run",
        "--model",
        "tiny",
        "--tier",
        tier,
        "--token",
        token,
        "--max-new-tokens",
        "2",
        "--json",
        "--prompt",
        prompt,
    ]);
    args.extend(tls.iter().cloned());
    let o = run(&workspace_bin("kvshare-worker"), &args);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_works_against_an_authenticated_mtls_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let p = |x: &Path| x.to_str().expect("utf-8 path").to_string();
    let ca = TestCa::new("secure cluster CA");
    let ca_file = ca.write(d, "ca.pem");
    let client_id = ca.issue("team-client", &["client.test"], 100);
    let client_files = client_id.write(d, "client");
    std::fs::write(d.join("auth.toml"), auth_file()).expect("auth file");
    std::fs::write(d.join("peer-token"), "peer-secret\n").expect("peer token");
    let (ports, peers) = kvshare_testkit::cluster_ports(3);
    let probe_tls =
        kvshare_client::ClientTls::from_pem(ca.cert_pem.as_bytes(), Some(&client_id.identity()))
            .expect("client TLS");
    let mut nodes = Vec::new();
    for (i, (g, h)) in ports.iter().enumerate() {
        let cert = ca
            .issue(
                &format!("node-{i}"),
                &["127.0.0.1", "localhost"],
                i as u64 + 1,
            )
            .write(d, &format!("node-{i}"));
        let args = [
            "--auth-file".to_string(),
            p(&d.join("auth.toml")),
            "--peer-token-file".into(),
            p(&d.join("peer-token")),
            "--tls-cert".into(),
            p(&cert.cert),
            "--tls-key".into(),
            p(&cert.key),
            "--tls-client-ca".into(),
            p(&ca_file),
            "--replicas".into(),
            "2".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        nodes.push(
            NodeProcess::start(
                &workspace_bin("kvshared"),
                &format!("secure-{i}"),
                *g,
                *h,
                &peers,
                &args,
            )
            .with_tls(probe_tls.clone()),
        );
    }
    for n in &nodes {
        n.wait_ready(Duration::from_secs(20)).expect("ready");
    }
    let endpoints: Vec<String> = nodes.iter().map(NodeProcess::endpoint).collect();
    let opts = |token: &str| {
        ClientOptions {
            token: Some(token.into()),
            timeout: Duration::from_secs(10),
            codec: Codec::BytePlaneHuff,
            ..ClientOptions::default()
        }
        .with_tls_files(&ca_file, Some((&client_files.cert, &client_files.key)))
        .expect("TLS files load")
    };
    // Peers see each other over mTLS with the peer token.
    for e in &endpoints {
        kvshare_testkit::wait_for_members_with(e, 3, opts("ops-admin")).await;
    }

    // The Rust cluster client: writes to the owners, reads back, with replicas.
    let layout = KvLayout {
        num_layers: 2,
        num_kv_heads: 2,
        head_dim: 16,
        dtype: DType::BF16,
        tokens_per_block: 16,
    };
    let ns = Namespace::new("secure-cluster", layout);
    let tokens: Vec<u32> = (0..16 * 12).map(|t| t * 7 + 3).collect();
    let blocks: Vec<Vec<u8>> = (0..12)
        .map(|b| {
            let raw = kvshare_testkit::kv_sample_bytes(DType::BF16);
            raw.iter()
                .cycle()
                .skip(b * 4096)
                .take(layout.block_bytes() as usize)
                .copied()
                .collect()
        })
        .collect();
    let writer = ClusterClient::connect(&endpoints, opts("team-writer"))
        .await
        .expect("cluster client connects");
    let report = writer.put_prefix(&ns, &tokens, &blocks).await.expect("put");
    assert_eq!(report.stored(), 12, "{report:?}");
    assert!(
        report.outcomes.iter().all(|o| o.replicas == 2),
        "{report:?}"
    );
    let reader = ClusterClient::connect(&endpoints[2..], opts("team-reader"))
        .await
        .expect("reader connects");
    assert_eq!(
        reader
            .lookup(&ns, &tokens)
            .await
            .expect("lookup")
            .hit_blocks,
        12
    );
    let back = reader.get_prefix(&ns, &tokens).await.expect("get");
    assert_eq!(back.len(), 12);
    assert!(back.iter().zip(&blocks).all(|(a, b)| a[..] == b[..]));
    // A reader cannot write.
    let other: Vec<u32> = (0..16).map(|t| t + 70_000).collect();
    let refused = reader.put_prefix(&ns, &other, &blocks[..1]).await;
    let refused = format!("{refused:?}");
    assert!(refused.contains("PermissionDenied"), "{refused}");

    // The CLI: status and a put/get round trip with --token and the TLS flags.
    let cli = workspace_bin("kvshare");
    let tls_flags = vec![
        "--tls-ca".to_string(),
        p(&ca_file),
        "--tls-cert".into(),
        p(&client_files.cert),
        "--tls-key".into(),
        p(&client_files.key),
    ];
    let with = |token: Option<&str>, tls: &[String], rest: &[&str]| {
        let mut a = strings(&["--timeout", "10", "--endpoint", &endpoints[1]]);
        if let Some(t) = token {
            a.extend(["--token".to_string(), t.to_string()]);
        }
        a.extend(tls.iter().cloned());
        a.extend(strings(rest));
        run(&cli, &a)
    };
    let o = with(Some("ops-admin"), &tls_flags, &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("SERVING"),
        "{}",
        text(&o)
    );
    let kv: Vec<u8> = (0..2048u32).map(|i| (i * 31 % 251) as u8).collect();
    let kv_file = d.join("kv.bin");
    std::fs::write(&kv_file, &kv).expect("kv file");
    let cli_tokens: Vec<String> = (0..32).map(|t| (t + 90_000).to_string()).collect();
    let cli_tokens = cli_tokens.join(",");
    let layout_flags = [
        "--layers",
        "1",
        "--kv-heads",
        "2",
        "--head-dim",
        "16",
        "--dtype",
        "bf16",
        "--block-tokens",
        "16",
    ];
    let mut put = vec![
        "put",
        "--kv-file",
        kv_file.to_str().expect("path"),
        "--tokens",
        &cli_tokens,
    ];
    put.extend(layout_flags);
    let o = with(Some("team-writer"), &tls_flags, &put);
    assert!(o.status.success(), "{}", text(&o));
    let out = d.join("back.bin");
    let mut get = vec![
        "get",
        "--out",
        out.to_str().expect("path"),
        "--tokens",
        &cli_tokens,
    ];
    get.extend(layout_flags);
    let o = with(Some("team-reader"), &tls_flags, &get);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&out).expect("read back"), kv);
    // No token: refused, and the message names the flag.
    let o = with(None, &tls_flags, &["status"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("--token") || t.contains("KVSHARE_TOKEN"), "{t}");
    // A token but no client certificate: the node requires one, and the error says so.
    let o = with(Some("ops-admin"), &tls_flags[..2], &["status"]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("requires a client certificate"), "{t}");

    // Two worker processes: the first pushes its prompt, the second takes the shared prefix.
    let tier = endpoints.join(",");
    let doc = "The cache tier holds every block of this shared system prompt. ".repeat(8);
    let a = worker_run(
        &tier,
        "team-writer",
        &tls_flags,
        &format!("{doc} first question?"),
    );
    assert!(a["pushed_blocks"].as_u64().unwrap_or(0) > 0, "{a}");
    assert!(a["push_error"].is_null(), "{a}");
    let b = worker_run(
        &tier,
        "team-reader",
        &tls_flags,
        &format!("{doc} second one!"),
    );
    let cached = b["cached_tokens"].as_u64().unwrap_or(0);
    assert!(
        cached >= 16 * 20,
        "the reader worker took {cached} tokens from the tier: {b}"
    );
    assert!(b["cache_error"].is_null(), "{b}");
    // The reader's own push is refused (its role cannot write), and it says so.
    assert!(
        b["push_error"]
            .as_str()
            .is_some_and(|e| e.contains("PERMISSION_DENIED") || e.contains("ermission")),
        "{b}"
    );
}

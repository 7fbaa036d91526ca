#![cfg(feature = "demo")]
//! The CLI over TLS and mTLS against an embedded node: `--tls-ca`/`--tls-cert`/`--tls-key`
//! (and their KVSHARE_TLS_* variables), `https://` endpoints, put/get/status, and clear errors
//! without a CA or without a client certificate.

use std::process::{Command, Output};

use kvshare_server::ServerConfig;
use kvshare_testkit::pki::TestCa;

async fn kvshare(args: Vec<String>, envs: Vec<(&'static str, String)>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvshare"));
    cmd.args(["--timeout", "10"]).args(args).envs(envs);
    tokio::task::spawn_blocking(move || cmd.output().expect("run kvshare"))
        .await
        .expect("join")
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_puts_and_gets_over_mtls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cli test CA");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let node_cert = ca
        .issue("node", &["127.0.0.1"], 1)
        .write(dir.path(), "node");
    let client = ca
        .issue("operator", &["operator.test"], 2)
        .write(dir.path(), "client");
    let mut c = ServerConfig::local(64 << 20);
    c.node_id = Some("cli-tls-node".into());
    c.tls_cert = Some(node_cert.cert.clone());
    c.tls_key = Some(node_cert.key.clone());
    c.tls_client_ca = Some(ca_file.clone());
    let node = kvshare_server::start(c).await.expect("node starts");
    let ep = node.endpoint();
    assert!(ep.starts_with("https://"), "{ep}");

    let p = |x: &std::path::Path| x.to_str().expect("utf-8").to_string();
    let tls = vec![
        "--tls-ca".to_string(),
        p(&ca_file),
        "--tls-cert".into(),
        p(&client.cert),
        "--tls-key".into(),
        p(&client.key),
    ];
    let layout = s(&[
        "--layers",
        "1",
        "--kv-heads",
        "1",
        "--head-dim",
        "8",
        "--dtype",
        "bf16",
        "--block-tokens",
        "16",
    ]);
    let tokens: Vec<String> = (0..32).map(|t| t.to_string()).collect();
    let kv: Vec<u8> = (0..1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let kv_file = dir.path().join("kv.bin");
    std::fs::write(&kv_file, &kv).expect("write kv");

    // put with flags
    let mut args = vec!["--endpoint".to_string(), ep.clone()];
    args.extend(tls.clone());
    args.extend(s(&[
        "put",
        "--kv-file",
        &p(&kv_file),
        "--tokens",
        &tokens.join(","),
    ]));
    args.extend(layout.clone());
    let o = kvshare(args, vec![]).await;
    assert!(o.status.success(), "{}", text(&o));

    // get with the environment variables and a host:port endpoint
    let out = dir.path().join("back.bin");
    let mut args = s(&["get", "--out", &p(&out), "--tokens", &tokens.join(",")]);
    args.extend(layout.clone());
    let envs = vec![
        ("KVSHARE_ENDPOINT", node.grpc_addr.to_string()),
        ("KVSHARE_TLS_CA", p(&ca_file)),
        ("KVSHARE_TLS_CERT", p(&client.cert)),
        ("KVSHARE_TLS_KEY", p(&client.key)),
    ];
    let o = kvshare(args, envs).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&out).expect("read back"), kv);

    let mut args = vec!["--endpoint".to_string(), ep.clone()];
    args.extend(tls.clone());
    args.push("status".into());
    let o = kvshare(args, vec![]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("SERVING"),
        "{}",
        text(&o)
    );

    // https:// without --tls-ca: says what is missing.
    let o = kvshare(s(&["--endpoint", &ep, "status"]), vec![]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("--tls-ca"), "{}", text(&o));
    // The CA but no client certificate: the node requires one, and the error says so.
    let o = kvshare(
        s(&["--endpoint", &ep, "--tls-ca", &p(&ca_file), "status"]),
        vec![],
    )
    .await;
    assert!(!o.status.success());
    assert!(
        text(&o).contains("requires a client certificate"),
        "{}",
        text(&o)
    );
    node.shutdown(std::time::Duration::from_secs(5))
        .await
        .expect("shutdown");
}

//! The `kvshared` binary: flags and env vars, the port file, HTTP endpoints, and a graceful
//! SIGTERM that lets an in-flight Get stream finish.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout};
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;

fn wait_for_port_file(path: &std::path::Path) -> serde_json::Value {
    kvshare_testkit::wait_for_port_file(path, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("kvshared did not start: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_streams_then_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port_file = dir.path().join("ports.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvshared"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--node-id",
            "sig-node",
        ])
        .args(["--get-chunk-size", "4KiB", "--drain-seconds", "10"])
        .env("KVSHARE_CAPACITY", "256MiB") // config by environment
        .env("KVSHARE_PORT_FILE", &port_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kvshared");
    let ports = wait_for_port_file(&port_file);
    let grpc = format!("http://{}", ports["grpc"].as_str().expect("grpc addr"));

    let layout = KvLayout {
        num_layers: 4,
        num_kv_heads: 8,
        head_dim: 64,
        dtype: DType::F16,
        tokens_per_block: 16,
    };
    let raw: Vec<u8> = (0..layout.block_bytes())
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let ns = BlockKey([5; 32]);
    let block = EncodedBlock::encode(ns, layout, Codec::None, &raw).expect("encode");
    let mut c = KvCacheClient::connect(grpc).await.expect("connect");
    let keys: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 32])).collect();
    let msgs: Vec<pb::PutRequest> = keys
        .iter()
        .map(|k| pb::PutRequest {
            key: k.clone(),
            header: Some(block.header.to_proto()),
            data: block.payload.clone(),
            parent_key: Bytes::new(),
        })
        .collect();
    c.put(tokio_stream::iter(msgs)).await.expect("put");
    let s = c
        .stats(pb::StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(
        (s.node_id.as_str(), s.capacity_bytes),
        ("sig-node", 256 << 20)
    );

    // Start a Get of 8 x 256 KiB in 4 KiB chunks and read it slowly.
    let mut stream = c
        .get(pb::GetRequest {
            namespace: Bytes::from_static(&[5; 32]),
            keys: keys.clone(),
            packed_keys: Default::default(),
        })
        .await
        .expect("get")
        .into_inner();
    let first = stream.message().await.expect("first chunk").expect("some");
    assert!(first.found);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut received = first.data.len();
    while let Some(m) = stream
        .message()
        .await
        .expect("stream finishes despite SIGTERM")
    {
        received += m.data.len();
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    assert_eq!(received, 8 * raw.len(), "the whole stream arrived");
    let t0 = Instant::now();
    let exit = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "kvshared did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit:?}");
}

#[test]
fn bad_flags_are_refused_with_a_clear_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvshared"))
        .args(["--capacity", "lots"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--capacity") && err.contains("not a size"),
        "{err}"
    );
}

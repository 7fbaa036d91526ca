#![cfg(feature = "demo")]
//! `kvshare capacity set|get` against two embedded nodes: every member by default, one with
//! `--node`, refusals with a message and a non-zero exit.

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvshare_core::{BlockKey, BlockStore, Codec, DType, EncodedBlock, KvLayout, StoreKey};
use kvshare_server::{NodeHandle, ServerConfig};

const MIB: u64 = 1 << 20;

async fn two_nodes(capacity: u64) -> Vec<NodeHandle> {
    let ports: Vec<u16> = (0..2)
        .map(|_| kvshare_testkit::free_port().expect("port"))
        .collect();
    let peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let mut c = ServerConfig::local(capacity);
        c.grpc_addr = format!("127.0.0.1:{port}").parse().expect("addr");
        c.node_id = Some(format!("cap-node-{i}"));
        c.peers = peers.clone();
        c.peer_health_interval_ms = 100;
        nodes.push(kvshare_server::start(c).await.expect("node starts"));
    }
    let t0 = Instant::now();
    while nodes
        .iter()
        .any(|n| n.state.cluster.view().members().len() < 2)
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "nodes never met");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes
}

/// Fills `store` with 256 KiB blocks until it has evicted some.
fn fill(store: &BlockStore) {
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 128 << 10,
        dtype: DType::U8,
        tokens_per_block: 1,
    };
    let ns = BlockKey([7; 32]);
    let block = Arc::new(
        EncodedBlock::encode(ns, layout, Codec::None, &vec![3u8; 256 << 10]).expect("encode"),
    );
    let mut i = 0u32;
    while store.evictions() == 0 {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        let key = StoreKey {
            namespace: ns,
            key: BlockKey(k),
        };
        store.insert(key, None, block.clone()).expect("insert");
        i += 1;
    }
}

async fn kvshare(endpoint: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvshare"));
    cmd.args(["--endpoint", endpoint, "--timeout", "10"])
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run kvshare"))
        .await
        .expect("join")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_set_changes_every_member_or_one_and_refuses_nonsense() {
    let nodes = two_nodes(8 * MIB).await;
    for n in &nodes {
        fill(&n.state.store);
    }
    let ep = nodes[0].endpoint();

    // Every member, through one endpoint.
    let o = kvshare(&ep, &["capacity", "set", "4MiB"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    for n in &nodes {
        assert_eq!(n.state.store.capacity(), 4 * MIB);
        assert!(n.state.store.used_bytes() <= 4 * MIB);
        let id = n.state.node_id.as_str();
        let line = out
            .lines()
            .find(|l| l.starts_with(id))
            .expect("a line per node");
        assert!(
            line.contains("8.00 MiB -> 4.00 MiB") && line.contains("evicted"),
            "{line}"
        );
    }

    // One member.
    let o = kvshare(&ep, &["capacity", "set", "2MiB", "--node", "cap-node-1"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(nodes[0].state.store.capacity(), 4 * MIB);
    assert_eq!(nodes[1].state.store.capacity(), 2 * MIB);

    let o = kvshare(&ep, &["capacity", "get", "--json"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    let caps: Vec<(String, u64)> = rows
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().to_string(),
                r["capacity_bytes"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert!(caps.contains(&("cap-node-0".into(), 4 * MIB)), "{caps:?}");
    assert!(caps.contains(&("cap-node-1".into(), 2 * MIB)), "{caps:?}");

    // Refusals: the node's message, a non-zero exit, nothing changed.
    let o = kvshare(&ep, &["capacity", "set", "0"]).await;
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("InvalidArgument") && err.contains("capacity_bytes is 0"),
        "{err}"
    );
    let o = kvshare(&ep, &["capacity", "set", "100TiB", "--node", "cap-node-0"]).await;
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("70368744177664"), "{err}");
    let o = kvshare(&ep, &["capacity", "set", "1MiB", "--node", "nosuch"]).await;
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("cap-node-0") && err.contains("cap-node-1"),
        "{err}"
    );
    assert_eq!(nodes[0].state.store.capacity(), 4 * MIB);
    assert_eq!(nodes[1].state.store.capacity(), 2 * MIB);

    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    }
}

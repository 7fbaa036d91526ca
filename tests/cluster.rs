//! A 3-node cluster on 127.0.0.1: even spread with exactly R=2 copies, any-node routing, the
//! smart client's one-hop reads, and how little ownership moves when a 4th node joins.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kvshare_client::{ClientOptions, ClusterClient, KvClient, PutItem};
use kvshare_core::placement::{node_seed, owners};
use kvshare_core::{BlockKey, DType, Namespace};
use kvshare_server::NodeHandle;
use kvshare_tests::{
    free_port, http_get, kv_blocks, kv_sample_bytes, metric_value, minilm_layout, prompt_tokens,
    wait_for_members,
};

const BLOCKS: usize = 10_000;

async fn start_cluster(n: usize, extra_peer_ports: &[u16]) -> (Vec<NodeHandle>, Vec<String>) {
    let ports: Vec<u16> = (0..n).map(|_| free_port().expect("free port")).collect();
    let mut peers: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    peers.extend(extra_peer_ports.iter().map(|p| format!("127.0.0.1:{p}")));
    let mut nodes = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let peers = peers.clone();
        let node = kvshare_tests::start_node(1 << 30, move |c| {
            c.node_id = Some(format!("node-{i}"));
            c.grpc_addr = format!("127.0.0.1:{p}").parse().expect("addr");
            c.peers = peers;
            c.peer_health_interval_ms = 100;
        })
        .await;
        nodes.push(node);
    }
    for node in &nodes {
        wait_for_members(&node.endpoint(), n).await;
    }
    (nodes, peers)
}

fn block_items(ns: &Namespace, tokens: &[u32]) -> Vec<PutItem> {
    // 1-token blocks of real K/V (9,216 raw bytes), LZ4-compressed.
    let raw = kv_blocks(&kv_sample_bytes(DType::BF16), ns.layout, 256, 1, 0);
    kvshare_tests::lz4_items(ns, tokens, &raw)
}

async fn metrics_of(node: &NodeHandle) -> String {
    http_get(&node.http_addr.to_string(), "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_spread_replicate_and_route() {
    let (nodes, _) = start_cluster(3, &[]).await;
    let ns = Namespace::new("cluster-test", minilm_layout(DType::BF16, 1));
    let tokens = prompt_tokens(BLOCKS, 1);
    let items = block_items(&ns, &tokens);
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();

    // Write everything through node 0 only, in batches of 500 blocks.
    let mut c0 = KvClient::connect(&nodes[0].endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    for batch in items.chunks(500) {
        let r = c0.put_blocks(batch.to_vec()).await.expect("put");
        assert!(
            r.outcomes.iter().all(|o| o.replicas == 2),
            "every block reaches 2 replicas"
        );
    }

    // Spread: each node holds 2/3 of the blocks, within 15 %.
    let per_node: Vec<u64> = nodes
        .iter()
        .map(|n| n.state.stats(0).stored_blocks)
        .collect();
    let even = (2 * BLOCKS) as f64 / 3.0;
    println!("blocks per node: {per_node:?} (even share {even:.0})");
    for b in &per_node {
        assert!((*b as f64 - even).abs() <= 0.15 * even, "{per_node:?}");
    }
    assert_eq!(per_node.iter().sum::<u64>(), 2 * BLOCKS as u64);
    // Exactly 2 copies of each block: ask each node's own store (hop-local presence).
    let mut copies = vec![0u8; BLOCKS];
    for n in &nodes {
        let mut c = KvClient::connect(&n.endpoint(), ClientOptions::default())
            .await
            .expect("connect")
            .no_forward();
        for (chunk_i, chunk) in keys.chunks(2_000).enumerate() {
            let p = c.presence(&ns.digest(), chunk).await.expect("presence");
            for (j, hit) in p.into_iter().enumerate() {
                copies[chunk_i * 2_000 + j] += u8::from(hit);
            }
        }
    }
    assert!(
        copies.iter().all(|&c| c == 2),
        "copies per block: {:?}",
        copies.iter().collect::<HashSet<_>>()
    );

    // A client that knows only node 2 reaches every block, and lookups see the whole prefix.
    let mut c2 = KvClient::connect(&nodes[2].endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    assert_eq!(
        c2.lookup(&ns, &tokens).await.expect("lookup").hit_blocks,
        BLOCKS
    );
    let via_one = c2
        .get_blocks(&ns.digest(), &keys)
        .await
        .expect("get via node 2");
    assert!(
        via_one
            .iter()
            .zip(&items)
            .all(|(b, it)| b.as_ref() == Some(&it.block))
    );
    let forwarded_before: f64 = {
        let mut sum = 0.0;
        for n in &nodes {
            sum += metric_value(
                &metrics_of(n).await,
                "kvshare_forwarded_requests_total{method=\"get\"}",
            );
        }
        sum
    };
    assert!(
        forwarded_before >= 1.0,
        "node 2 forwarded gets to its peers"
    );

    // The smart client reads the same blocks straight from the owners: no forwarding at all.
    let smart = ClusterClient::connect(&[nodes[1].endpoint()], ClientOptions::default())
        .await
        .expect("smart");
    assert_eq!(smart.members().len(), 3);
    let direct = smart
        .get_blocks(&ns.digest(), &keys)
        .await
        .expect("smart get");
    assert!(
        direct
            .iter()
            .zip(&items)
            .all(|(b, it)| b.as_ref() == Some(&it.block))
    );
    let mut forwarded_after = 0.0;
    let mut served_locally = 0.0;
    for n in &nodes {
        let m = metrics_of(n).await;
        forwarded_after += metric_value(&m, "kvshare_forwarded_requests_total{method=\"get\"}");
        served_locally += metric_value(&m, "kvshare_peer_requests_total{method=\"get\"}");
    }
    assert_eq!(
        forwarded_after, forwarded_before,
        "smart-client gets took one hop (no node forwarded)"
    );
    assert!(served_locally >= 3.0);

    // Smart-client puts reach both owners directly too.
    let more = block_items(&ns, &prompt_tokens(300, 2));
    let r = smart.put_blocks(more.clone()).await.expect("smart put");
    assert!(r.outcomes.iter().all(|o| o.replicas == 2));
    assert_eq!(
        c2.get_blocks(&ns.digest(), &[more[299].key])
            .await
            .expect("get")[0]
            .as_ref(),
        Some(&more[299].block)
    );

    // Delete through any node removes every copy.
    assert_eq!(
        c2.delete_keys(&ns.digest(), &keys[..10])
            .await
            .expect("delete"),
        20
    );
    assert_eq!(
        c0.lookup_keys(&ns.digest(), &keys[..10])
            .await
            .expect("lookup"),
        0
    );
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_takes_about_a_quarter_of_ownership_and_loses_nothing() {
    // Nodes 0-2 list node 3's address from the start; node 3 is down at first.
    let port3 = free_port().expect("free port");
    let (mut nodes, peers) = start_cluster(3, &[port3]).await;
    let ns = Namespace::new("join-test", minilm_layout(DType::BF16, 1));
    let tokens = prompt_tokens(BLOCKS, 3);
    let items = block_items(&ns, &tokens);
    let keys: Vec<BlockKey> = items.iter().map(|i| i.key).collect();
    let mut c0 = KvClient::connect(&nodes[0].endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    for batch in items.chunks(1_000) {
        c0.put_blocks(batch.to_vec()).await.expect("put");
    }

    let ids3: Vec<String> = (0..3).map(|i| format!("node-{i}")).collect();
    let node3 = kvshare_tests::start_node(1 << 30, move |c| {
        c.node_id = Some("node-3".into());
        c.grpc_addr = format!("127.0.0.1:{port3}").parse().expect("addr");
        c.peers = peers;
        c.peer_health_interval_ms = 100;
    })
    .await;
    nodes.push(node3);
    for n in &nodes {
        wait_for_members(&n.endpoint(), 4).await;
    }
    let ids4: Vec<String> = (0..4).map(|i| format!("node-{i}")).collect();
    let seeds = |ids: &[String]| ids.iter().map(|i| node_seed(i)).collect::<Vec<_>>();
    let (s3, s4) = (seeds(&ids3), seeds(&ids4));
    let (mut moved_assignments, mut moved_keys) = (0usize, 0usize);
    for k in &keys {
        let before: HashSet<&str> = owners(&s3, k, 2)
            .into_iter()
            .map(|i| ids3[i].as_str())
            .collect();
        let after: HashSet<&str> = owners(&s4, k, 2)
            .into_iter()
            .map(|i| ids4[i].as_str())
            .collect();
        let gained = after.difference(&before).count();
        moved_assignments += gained;
        moved_keys += usize::from(gained > 0);
        // Only node 3 gains keys; nothing moves between the old nodes.
        assert!(after.difference(&before).all(|n| *n == "node-3"));
    }
    let frac = moved_assignments as f64 / (2 * BLOCKS) as f64;
    println!(
        "3 -> 4 nodes: {:.1}% of (key, owner) assignments moved ({:.1}% of keys changed one owner)",
        100.0 * frac,
        100.0 * moved_keys as f64 / BLOCKS as f64
    );
    assert!(frac <= 0.27, "{frac}");
    // Nothing is lost: every key keeps at least one old owner, and reads fall over to it.
    let mut c3 = KvClient::connect(&nodes[3].endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    assert_eq!(
        c3.lookup(&ns, &tokens).await.expect("lookup").hit_blocks,
        BLOCKS
    );
    let got = c3.get_blocks(&ns.digest(), &keys).await.expect("get");
    assert!(
        got.iter()
            .zip(&items)
            .all(|(b, it)| b.as_ref() == Some(&it.block))
    );
    // The old nodes hand node 3 the copies it now owns (their join sweep, after membership has
    // settled): it ends up holding exactly those, and no stand-in copies.
    let t0 = Instant::now();
    let held = loop {
        let held = nodes[3].state.stats(0).stored_blocks;
        if held == moved_assignments as u64 || t0.elapsed() > Duration::from_secs(60) {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        held, moved_assignments as u64,
        "copies node 3 holds of those it owns"
    );
    // New writes now land on node 3 too.
    let new = block_items(&ns, &prompt_tokens(1_000, 4));
    c0.put_blocks(new).await.expect("put");
    let on3 = nodes[3].state.stats(0).stored_blocks - held;
    println!("node-3 took {on3} of 2000 new block copies");
    assert!((350..=650).contains(&on3), "{on3}");
    let info = c0.cluster_info().await.expect("info");
    let _: HashMap<_, _> = info
        .members
        .iter()
        .map(|m| (m.node_id.clone(), m.healthy))
        .collect();
    for n in nodes {
        n.shutdown(Duration::from_secs(5)).await.expect("shutdown");
    }
}

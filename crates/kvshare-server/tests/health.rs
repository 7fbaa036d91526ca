//! Peer health and configuration checks against real `kvshared` processes:
//!
//! - a storm of forwarded Gets through a node that owns none of the keys never makes that node
//!   mark a healthy owner down, and never answers a stored block as missing;
//! - a frozen peer (SIGSTOP) is marked down within `interval x threshold + timeout`;
//! - misconfigurations (replica counts that differ, a `--peers` list missing a member, two
//!   processes with one node id) are reported in `/metrics` within 5 s of start, and a duplicate
//!   node id does not enter the others' placement.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshare_core::placement::{Placed, PlacementView};
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout};
use kvshare_proto::transport::mark_no_forward;
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;
use kvshare_testkit::{wait_for_listener, wait_for_members};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::transport::Channel;

const NS: [u8; 32] = [0x6b; 32];
const MIB: u32 = 1 << 20;

/// A `kvshared` process whose log (stdout and stderr) goes to a file; killed when dropped.
struct Node {
    id: String,
    grpc: String,
    http: String,
    log: PathBuf,
    child: Child,
}

impl Node {
    /// Starts a node listening on the given ports with `peers` and extra flags.
    fn start(
        dir: &Path,
        id: &str,
        (grpc, http): (u16, u16),
        peers: &[String],
        extra: &[&str],
    ) -> Node {
        let grpc = format!("127.0.0.1:{grpc}");
        let http = format!("127.0.0.1:{http}");
        let log = dir.join(format!("{id}-{}.log", grpc.replace(':', "_")));
        let file = std::fs::File::create(&log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvshared"))
            .args(["--node-id", id, "--grpc-addr", &grpc, "--http-addr", &http])
            .args(["--peers", &peers.join(","), "--log-level", "warn"])
            .args(extra)
            .stdout(Stdio::from(file.try_clone().expect("log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn kvshared");
        if let Err(e) = wait_for_listener(&grpc, Duration::from_secs(20), &mut child) {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!("{id} did not start: {e}; its log:\n{log}");
        }
        Node {
            id: id.into(),
            grpc,
            http,
            log,
            child,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    async fn client(&self) -> KvCacheClient<Channel> {
        KvCacheClient::connect(self.endpoint())
            .await
            .expect("connect")
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// The node's /metrics text (empty when it does not answer).
    async fn metrics(&self) -> String {
        http_get(&self.http, "/metrics").await.unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Body of an HTTP/1.0 GET.
async fn http_get(addr: &str, path: &str) -> Option<String> {
    let go = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
    };
    tokio::time::timeout(Duration::from_secs(2), go)
        .await
        .ok()
        .flatten()
}

/// Value of the sample `series` (name with labels, exactly as exported) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

struct Id(String);

impl Placed for Id {
    fn node_id(&self) -> &str {
        &self.0
    }
}

fn key(i: u32) -> BlockKey {
    let mut k = [0x22u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    BlockKey(k)
}

/// An uncompressed block of 1 MiB.
fn block(seed: u8) -> EncodedBlock {
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 512,
        dtype: DType::U8,
        tokens_per_block: MIB / 1024,
    };
    let raw: Vec<u8> = (0..MIB)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed)
        .collect();
    EncodedBlock::encode(BlockKey(NS), layout, Codec::None, &raw).expect("encode")
}

/// Per Get: (found blocks of the right size, blocks answered missing).
async fn get_counts(
    c: &mut KvCacheClient<Channel>,
    keys: &[Bytes],
) -> Result<(usize, usize), tonic::Status> {
    let mut s = c
        .get(pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys: keys.to_vec(),
            packed_keys: Default::default(),
        })
        .await?
        .into_inner();
    let mut sizes: Vec<Option<usize>> = Vec::new();
    while let Some(m) = s.message().await? {
        if m.index as usize == sizes.len() {
            sizes.push(m.found.then_some(0));
        }
        if let Some(Some(n)) = sizes.last_mut() {
            *n += m.data.len();
        }
    }
    let found = sizes.iter().filter(|s| **s == Some(MIB as usize)).count();
    Ok((found, keys.len() - found))
}

/// Mark-downs of each peer counted by a node, and whether any peer_up sample was 0.
fn peer_down(text: &str, peers: &[&str]) -> (f64, bool) {
    let mut markdowns = 0.0;
    let mut down = false;
    for p in peers {
        markdowns += sample(
            text,
            &format!("kvshare_peer_markdowns_total{{peer=\"{p}\"}}"),
        )
        .unwrap_or(0.0);
        down |= sample(text, &format!("kvshare_peer_up{{peer=\"{p}\"}}")) == Some(0.0);
    }
    (markdowns, down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_get_storm_through_a_non_owner_marks_no_owner_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, peers) = kvshare_testkit::cluster_ports(3);
    let ids = ["storm-a", "storm-b", "storm-c"];
    // Health checks as often and as short as the other process tests use (200 ms / 300 ms).
    let flags = [
        "--peer-health-interval-ms",
        "200",
        "--peer-health-timeout-ms",
        "300",
        "--capacity",
        "512MiB",
    ];
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::start(dir.path(), ids[i], p[i], &peers, &flags))
        .collect();
    for n in &nodes {
        wait_for_members(&n.endpoint(), 3).await;
    }
    // 64 keys owned by b and c (R=2), none by a: every Get through a is forwarded.
    let view = PlacementView::new(ids.iter().map(|i| Id(i.to_string())).collect(), 2);
    let keys: Vec<BlockKey> = (0..10_000)
        .map(key)
        .filter(|k| {
            view.owners(k)
                .iter()
                .all(|&m| view.members()[m].0 != "storm-a")
        })
        .take(64)
        .collect();
    assert_eq!(keys.len(), 64);
    let b = block(7);
    let mut c = nodes[0].client().await;
    for batch in keys.chunks(8) {
        let msgs: Vec<pb::PutRequest> = batch
            .iter()
            .flat_map(|k| kvshare_core::wire::put_chunks(k, None, &b, 1 << 20))
            .collect();
        let r = c.put(tokio_stream::iter(msgs)).await.expect("put");
        assert!(r.get_ref().outcomes.iter().all(|o| o.replicas == 2));
    }
    let keys: Vec<Bytes> = keys.iter().map(|k| Bytes::copy_from_slice(&k.0)).collect();
    // Check ownership as stored: a holds none, b and c hold all.
    for (i, n) in nodes.iter().enumerate() {
        let mut req = tonic::Request::new(pb::LookupRequest {
            namespace: Bytes::from_static(&NS),
            keys: keys.clone(),
            per_key: true,
            packed_keys: Default::default(),
        });
        mark_no_forward(&mut req);
        let present = n.client().await.lookup(req).await.expect("lookup");
        let held = present.get_ref().present.iter().filter(|p| **p).count();
        assert_eq!(held, if i == 0 { 0 } else { 64 }, "{}", n.id);
    }

    let storm = Duration::from_secs(5);
    let until = Instant::now() + storm;
    let mut clients = Vec::new();
    for _ in 0..32 {
        let mut c = nodes[0].client().await;
        let keys = keys.clone();
        clients.push(tokio::spawn(async move {
            let (mut gets, mut busy, mut misses) = (0u64, 0u64, 0u64);
            while Instant::now() < until {
                match get_counts(&mut c, &keys).await {
                    Ok((_, missing)) => {
                        gets += 1;
                        misses += missing as u64;
                    }
                    Err(s) if s.code() == Code::ResourceExhausted => busy += 1,
                    Err(s) => panic!("storm Get failed: {s}"),
                }
            }
            (gets, busy, misses)
        }));
    }
    // Sample a's view of b and c every 50 ms during the storm.
    let owners = ["storm-b", "storm-c"];
    let (mut samples, mut down_samples) = (0u32, 0u32);
    let t0 = Instant::now();
    while Instant::now() < until {
        let (_, down) = peer_down(&nodes[0].metrics().await, &owners);
        samples += 1;
        down_samples += u32::from(down);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut gets, mut busy, mut misses) = (0, 0, 0);
    for t in clients {
        let (g, b, m) = t.await.expect("client");
        gets += g;
        busy += b;
        misses += m;
    }
    let (markdowns, down) = peer_down(&nodes[0].metrics().await, &owners);
    eprintln!(
        "storm of {:.1} s: {gets} Gets of 64 MiB answered, {busy} refused as busy, {misses} \
         stored blocks answered missing; {down_samples} of {samples} samples saw an owner down; \
         {markdowns} mark-downs counted",
        t0.elapsed().as_secs_f64()
    );
    assert!(gets > 0, "no Get answered");
    assert_eq!(down_samples, 0, "an owner was marked down during the storm");
    assert!(!down);
    assert_eq!(markdowns, 0.0, "mark-downs counted during the storm");
    assert_eq!(misses, 0, "stored blocks answered missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_peer_is_marked_down_within_the_documented_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, peers) = kvshare_testkit::cluster_ports(2);
    // Production defaults: checks every 1 s, 500 ms deadline, 2 failures.
    let nodes: Vec<Node> = (0..2)
        .map(|i| Node::start(dir.path(), &format!("frozen-{i}"), p[i], &peers, &[]))
        .collect();
    for n in &nodes {
        wait_for_members(&n.endpoint(), 2).await;
    }
    let series = "kvshare_peer_up{peer=\"frozen-1\"}";
    let mut times = Vec::new();
    for round in 0..4 {
        // Freeze at a different phase of the check cycle each round.
        tokio::time::sleep(Duration::from_millis(250 * round + 100)).await;
        nodes[1].signal("-STOP");
        let t0 = Instant::now();
        while sample(&nodes[0].metrics().await, series) != Some(0.0) {
            assert!(t0.elapsed() < Duration::from_secs(10), "never marked down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        times.push(t0.elapsed().as_secs_f64());
        nodes[1].signal("-CONT");
        let t1 = Instant::now();
        while sample(&nodes[0].metrics().await, series) != Some(1.0) {
            assert!(t1.elapsed() < Duration::from_secs(10), "never back up");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!("frozen peer marked down after {times:.2?} s");
    // interval x threshold + timeout, plus scheduling slack.
    let bound = 1.0 * 2.0 + 0.5 + 0.2;
    assert!(
        times.iter().all(|t| *t <= bound),
        "mark-down took {times:?} s (bound {bound} s)"
    );
}

/// Polls `node`'s /metrics until `series` reads 1; returns the time since `t0`.
async fn wait_for_series(node: &Node, series: &str, t0: Instant) -> Duration {
    loop {
        if sample(&node.metrics().await, series) == Some(1.0) {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{}: no {series} within 5 s; /metrics:\n{}\nlog:\n{}",
            node.id,
            node.metrics().await,
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_count_mismatch_is_reported_within_5_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, peers) = kvshare_testkit::cluster_ports(3);
    let t0 = Instant::now();
    let a = Node::start(dir.path(), "rep-a", p[0], &peers, &["--replicas", "1"]);
    let b = Node::start(dir.path(), "rep-b", p[1], &peers, &[]);
    let _c = Node::start(dir.path(), "rep-c", p[2], &peers, &["--replicas", "2"]);
    let seen_by_b = wait_for_series(
        &b,
        "kvshare_config_mismatch{kind=\"replicas\",peer=\"rep-a\"}",
        t0,
    )
    .await;
    let seen_by_a = wait_for_series(
        &a,
        "kvshare_config_mismatch{kind=\"replicas\",peer=\"rep-b\"}",
        t0,
    )
    .await;
    assert!(a.log().contains("replicas"), "{}", a.log());
    eprintln!("replica mismatch reported after {seen_by_b:.2?} (by b), {seen_by_a:.2?} (by a)");
    let cluster = http_get(&b.http, "/api/cluster").await.unwrap_or_default();
    assert!(cluster.contains("\"config_warnings\":[{"), "{cluster}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_list_missing_a_member_is_reported_within_5_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, peers) = kvshare_testkit::cluster_ports(3);
    let t0 = Instant::now();
    // a does not list c.
    let a = Node::start(dir.path(), "mem-a", p[0], &peers[..2], &[]);
    let b = Node::start(dir.path(), "mem-b", p[1], &peers, &[]);
    let c = Node::start(dir.path(), "mem-c", p[2], &peers, &[]);
    let by_a = wait_for_series(
        &a,
        "kvshare_config_mismatch{kind=\"members\",peer=\"mem-b\"}",
        t0,
    )
    .await;
    let by_b = wait_for_series(
        &b,
        "kvshare_config_mismatch{kind=\"members\",peer=\"mem-a\"}",
        t0,
    )
    .await;
    let by_c = wait_for_series(
        &c,
        "kvshare_config_mismatch{kind=\"members\",peer=\"mem-a\"}",
        t0,
    )
    .await;
    eprintln!("member mismatch reported after {by_a:.2?} (a), {by_b:.2?} (b), {by_c:.2?} (c)");
    // b and c agree: no mismatch between them.
    let m = b.metrics().await;
    assert_eq!(
        sample(
            &m,
            "kvshare_config_mismatch{kind=\"members\",peer=\"mem-c\"}"
        ),
        None,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_node_id_is_reported_within_5_s_and_does_not_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (p, peers) = kvshare_testkit::cluster_ports(3);
    let t0 = Instant::now();
    let a = Node::start(dir.path(), "dup-a", p[0], &peers, &[]);
    let b = Node::start(dir.path(), "dup-b", p[1], &peers, &[]);
    // A second process calling itself dup-b, started later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b2 = Node::start(dir.path(), "dup-b", p[2], &peers, &[]);
    let (b_addr, b2_addr) = (b.grpc.clone(), b2.grpc.clone());
    let series = |addr: &str| {
        format!("kvshare_config_mismatch{{kind=\"duplicate_node_id\",peer=\"dup-b@{addr}\"}}")
    };
    let by_a = wait_for_series(&a, &series(&b2_addr), t0).await;
    let by_b = wait_for_series(&b, &series(&b2_addr), t0).await;
    let by_b2 = wait_for_series(&b2, &series(&b_addr), t0).await;
    eprintln!("duplicate node id reported after {by_a:.2?} (a), {by_b:.2?} (b), {by_b2:.2?} (b2)");
    let log = a.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&b_addr) && l.contains(&b2_addr)),
        "a's error names both addresses:\n{log}"
    );
    // In a's placement (its healthy members), dup-b appears once: the older process.
    let info = a
        .client()
        .await
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .expect("cluster info")
        .into_inner();
    let healthy_b: Vec<&pb::Member> = info
        .members
        .iter()
        .filter(|m| m.node_id == "dup-b" && m.healthy)
        .collect();
    assert_eq!(healthy_b.len(), 1, "{info:?}");
    assert_eq!(healthy_b[0].grpc_addr, b_addr);
    // b keeps b2 out of its placement.
    let info = b
        .client()
        .await
        .cluster_info(pb::ClusterInfoRequest {})
        .await
        .expect("cluster info")
        .into_inner();
    assert!(
        !info
            .members
            .iter()
            .any(|m| m.grpc_addr == b2_addr && m.healthy),
        "{info:?}"
    );
}

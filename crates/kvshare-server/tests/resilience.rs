//! Cluster resilience with real `kvshared` processes (3 nodes, R = 2): copies written while a
//! member was away are handed back when it returns, blocks of a member down past the grace
//! period are re-replicated before a second loss, and a frozen (SIGSTOPped) member costs reads
//! a hedge delay, not a timeout.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout};
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;
use kvshare_testkit::{NodeProcess, http_get, wait_for_members};
use tonic::transport::Channel;

const NS: [u8; 32] = [0x3c; 32];

/// The tests run one at a time: each restarts nodes on ports it picked earlier, which another
/// test picking free ports meanwhile could take, and nine nodes on two cores starve each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    ports: Vec<(u16, u16)>,
    peers: Vec<String>,
    nodes: Vec<Option<NodeProcess>>,
    extra: Vec<String>,
}

impl Cluster {
    async fn start(extra: &[&str]) -> Self {
        let (ports, peers) = kvshare_testkit::cluster_ports(3);
        let mut c = Cluster {
            ports,
            peers,
            nodes: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..3 {
            let n = c.spawn(i);
            c.nodes.push(Some(n));
        }
        c.wait_all_up().await;
        c
    }

    fn spawn(&self, i: usize) -> NodeProcess {
        let mut args: Vec<&str> = vec!["--replicas", "2", "--capacity", "256MiB"];
        args.extend(self.extra.iter().map(String::as_str));
        NodeProcess::start(
            Path::new(env!("CARGO_BIN_EXE_kvshared")),
            &format!("node-{i}"),
            self.ports[i].0,
            self.ports[i].1,
            &self.peers,
            &args,
        )
    }

    fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i].0)
    }

    async fn wait_all_up(&self) {
        for (i, n) in self.nodes.iter().enumerate() {
            if n.is_some() {
                wait_for_members(&self.endpoint(i), 3).await;
            }
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut n) = self.nodes[i].take() {
            n.kill();
        }
    }

    async fn restart(&mut self, i: usize) {
        self.kill(i);
        let n = self.spawn(i);
        self.nodes[i] = Some(n);
    }

    /// Re-replication sweeps node `i` has completed.
    fn sweeps(&self, i: usize) -> u64 {
        metric(self.ports[i].1, "kvshare_rebalance_sweeps_total")
    }

    /// Waits until every node that was live when `since` was taken has completed a sweep
    /// after it (a node started later sweeps nothing it did not already hold).
    async fn wait_for_sweeps(&self, since: &[Option<u64>], limit: Duration) {
        let t0 = Instant::now();
        for (i, before) in since.iter().enumerate() {
            let Some(before) = *before else { continue };
            if self.nodes[i].is_none() {
                continue;
            }
            while self.sweeps(i) <= before {
                if t0.elapsed() >= limit {
                    let addr = format!("127.0.0.1:{}", self.ports[i].1);
                    let cluster = http_get(&addr, "/api/cluster").map(|(_, b)| b);
                    panic!(
                        "node-{i} did not sweep within {limit:?} (sweeps before: {since:?}); its /api/cluster: {cluster:?}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Sweep counts of the live nodes (`None` for a node that is down).
    fn all_sweeps(&self) -> Vec<Option<u64>> {
        (0..3)
            .map(|i| self.nodes[i].as_ref().map(|_| self.sweeps(i)))
            .collect()
    }
}

/// A sample of a node's /metrics (0 when absent or unreachable).
fn metric(http_port: u16, name: &str) -> u64 {
    http_get(&format!("127.0.0.1:{http_port}"), "/metrics")
        .and_then(|(_, body)| kvshare_testkit::metric(&body, name))
        .map_or(0, |v| v as u64)
}

fn key(i: u32) -> Bytes {
    let mut k = [0x77u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    Bytes::copy_from_slice(&k)
}

/// An 8 KiB block.
fn block(seed: u32) -> EncodedBlock {
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 512,
        dtype: DType::U8,
        tokens_per_block: 8,
    };
    let raw: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(seed | 1) >> 3) as u8)
        .collect();
    EncodedBlock::encode(BlockKey(NS), layout, Codec::None, &raw).expect("encode")
}

async fn client(endpoint: String) -> KvCacheClient<Channel> {
    KvCacheClient::connect(endpoint).await.expect("connect")
}

/// Puts blocks `range` through `c`; returns how many were acknowledged.
async fn put_range(c: &mut KvCacheClient<Channel>, range: std::ops::Range<u32>) -> u32 {
    let msgs: Vec<pb::PutRequest> = range
        .clone()
        .flat_map(|i| {
            kvshare_core::wire::put_chunks(
                &BlockKey::from_slice(&key(i)).expect("key"),
                None,
                &block(i),
                1 << 20,
            )
        })
        .collect();
    let r = c
        .put(tokio_stream::iter(msgs))
        .await
        .expect("put")
        .into_inner();
    r.outcomes
        .iter()
        .filter(|o| o.status != pb::block_outcome::Status::Rejected as i32)
        .count() as u32
}

/// Blocks of `range` readable through `c` with the right bytes.
async fn readable(c: &mut KvCacheClient<Channel>, range: std::ops::Range<u32>) -> u32 {
    let keys: Vec<Bytes> = range.clone().map(key).collect();
    let Ok(resp) = c
        .get(pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys,
            packed_keys: Default::default(),
        })
        .await
    else {
        return 0;
    };
    let mut s = resp.into_inner();
    let mut payloads: Vec<Option<Vec<u8>>> = vec![None; range.len()];
    while let Ok(Some(m)) = s.message().await {
        if m.found {
            payloads[m.index as usize]
                .get_or_insert_with(Vec::new)
                .extend_from_slice(&m.data);
        }
    }
    range
        .zip(payloads)
        .filter(|(i, p)| p.as_deref() == Some(block(*i).payload.as_ref()))
        .count() as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_written_during_an_outage_are_handed_back() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::start(&[]).await;
    // node-2 dies; 400 blocks are written through node-1 (on node-1 and node-0 as stand-ins).
    c.kill(2);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let mut w = client(c.endpoint(1)).await;
    let mut acked = 0;
    for start in (0..400).step_by(50) {
        acked += put_range(&mut w, start..start + 50).await;
    }
    assert_eq!(acked, 400);
    // node-2 returns empty; the others hand back what it owns.
    let before = c.all_sweeps();
    c.restart(2).await;
    c.wait_all_up().await;
    c.wait_for_sweeps(&before, Duration::from_secs(20)).await;
    // node-0 restarts empty: every block must still be readable through every node.
    c.restart(0).await;
    c.wait_all_up().await;
    for i in 0..3 {
        let mut r = client(c.endpoint(i)).await;
        let found = readable(&mut r, 0..400).await;
        eprintln!("through node-{i}: {found} of 400 blocks readable");
        assert_eq!(found, 400, "blocks missing through node-{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_of_a_member_down_past_the_grace_period_survive_a_second_loss() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::start(&["--rereplicate-after-ms", "1500"]).await;
    let mut w = client(c.endpoint(0)).await;
    let mut acked = 0;
    for start in (0..600).step_by(100) {
        acked += put_range(&mut w, start..start + 100).await;
    }
    assert_eq!(acked, 600);
    let before = c.all_sweeps();
    c.kill(2);
    // Past the grace period the survivors copy node-2's blocks to their new owners.
    c.wait_for_sweeps(&before, Duration::from_secs(20)).await;
    c.kill(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut r = client(c.endpoint(0)).await;
    let found = readable(&mut r, 0..600).await;
    eprintln!("after losing node-2 then node-1: {found} of 600 blocks readable");
    assert!(found >= 594, "{} of 600 blocks lost", 600 - found);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_member_costs_reads_a_hedge_delay_not_a_timeout() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut c = Cluster::start(&[]).await;
    let mut w = client(c.endpoint(0)).await;
    assert_eq!(put_range(&mut w, 0..200).await, 200);
    let pid = c.nodes[2].as_ref().and_then(|n| n.pid()).expect("pid");
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    let opts = kvshare_client::ClientOptions {
        timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let endpoints: Vec<String> = (0..3).map(|i| c.endpoint(i)).collect();
    let smart = kvshare_client::ClusterClient::connect(&endpoints, opts)
        .await
        .expect("smart client");
    signal("-STOP");
    // Clients with a 2 s deadline read through node-0 and node-1 while node-2 is frozen, and a
    // smart client reads from the owners directly.
    let mut latencies = Vec::new();
    let mut errors = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    let mut n = 0u32;
    while Instant::now() < until {
        let mut r = client(c.endpoint((n % 2) as usize)).await;
        let keys: Vec<Bytes> = (0..16).map(|j| key((n * 16 + j) % 200)).collect();
        let mut req = tonic::Request::new(pb::LookupRequest {
            namespace: Bytes::from_static(&NS),
            keys: keys.clone(),
            per_key: false,
            packed_keys: Default::default(),
        });
        req.set_timeout(Duration::from_secs(2));
        let t0 = Instant::now();
        match r.lookup(req).await {
            Ok(l) if l.get_ref().hit_blocks == 16 => latencies.push(t0.elapsed()),
            Ok(l) => errors.push(format!("lookup hit {} of 16", l.get_ref().hit_blocks)),
            Err(s) => errors.push(format!("lookup: {s}")),
        }
        let mut req = tonic::Request::new(pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys,
            packed_keys: Default::default(),
        });
        req.set_timeout(Duration::from_secs(2));
        let t0 = Instant::now();
        let got = async {
            let mut s = r.get(req).await?.into_inner();
            let mut found = 0;
            while let Some(m) = s.message().await? {
                found += u32::from(m.found && m.last);
            }
            Ok::<u32, tonic::Status>(found)
        }
        .await;
        match got {
            Ok(16) => latencies.push(t0.elapsed()),
            Ok(f) => errors.push(format!("get found {f} of 16")),
            Err(s) => errors.push(format!("get: {s}")),
        }
        let smart_keys: Vec<BlockKey> = (0..16)
            .map(|j| BlockKey::from_slice(&key((n * 16 + j + 7) % 200)).expect("key"))
            .collect();
        let t0 = Instant::now();
        let direct = tokio::time::timeout(
            Duration::from_secs(2),
            smart.get_blocks(&BlockKey(NS), &smart_keys),
        )
        .await;
        match direct {
            Ok(Ok(blocks)) if blocks.iter().all(Option::is_some) => latencies.push(t0.elapsed()),
            Ok(Ok(blocks)) => errors.push(format!(
                "smart get found {} of 16",
                blocks.iter().flatten().count()
            )),
            Ok(Err(e)) => errors.push(format!("smart get: {e}")),
            Err(_) => errors.push("smart get: over its 2 s deadline".into()),
        }
        n += 1;
    }
    signal("-CONT");
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "frozen member: {} reads, p50 {:?}, p99 {:?}, max {:?}, errors {}",
        latencies.len(),
        p(0.5),
        p(0.99),
        latencies.last(),
        errors.len()
    );
    assert!(errors.is_empty(), "errors: {errors:?}");
    assert!(p(0.99) <= Duration::from_secs(1), "p99 {:?}", p(0.99));
    c.kill(2);
}

//! Failover under load: 3 `kvshared` processes with R=2; while 4 clients put and get, one node
//! is killed with SIGKILL. Gets of blocks written before the kill see no errors and lookups stay
//! exact; writes go on. The node restarts empty, rejoins, and takes new writes again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvshare_client::{ClientOptions, ClusterClient, KvClient, PutItem};
use kvshare_core::{BlockKey, DType, EncodedBlock, Namespace};
use kvshare_testkit::{
    NodeProcess, free_port, kv_blocks, kv_sample_bytes, lz4_items, minilm_layout, prompt_tokens,
    wait_for_members,
};

fn items_for(ns: &Namespace, tokens: &[u32], raw: &[Vec<u8>]) -> Vec<PutItem> {
    lz4_items(ns, tokens, raw)
}

/// Either a plain client of one node or the smart client.
enum Client {
    Plain(Box<KvClient>),
    Smart(ClusterClient),
}

impl Client {
    async fn get(
        &mut self,
        ns: &Namespace,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<EncodedBlock>>, String> {
        match self {
            Client::Plain(c) => c
                .get_blocks(&ns.digest(), keys)
                .await
                .map_err(|e| e.to_string()),
            Client::Smart(c) => c
                .get_blocks(&ns.digest(), keys)
                .await
                .map_err(|e| e.to_string()),
        }
    }
    async fn lookup(&mut self, ns: &Namespace, tokens: &[u32]) -> Result<usize, String> {
        match self {
            Client::Plain(c) => c
                .lookup(ns, tokens)
                .await
                .map(|l| l.hit_blocks)
                .map_err(|e| e.to_string()),
            Client::Smart(c) => c
                .lookup(ns, tokens)
                .await
                .map(|l| l.hit_blocks)
                .map_err(|e| e.to_string()),
        }
    }
    async fn put(&mut self, items: Vec<PutItem>) -> Result<u32, String> {
        let r = match self {
            Client::Plain(c) => c.put_blocks(items).await,
            Client::Smart(c) => c.put_blocks(items).await,
        };
        r.map(|r| r.outcomes.iter().map(|o| o.replicas).min().unwrap_or(0))
            .map_err(|e| e.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_under_load_costs_no_errors_and_it_rejoins() {
    let port = || free_port().expect("free port");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (port(), port())).collect();
    let peers: Vec<String> = ports
        .iter()
        .map(|(g, _)| format!("127.0.0.1:{g}"))
        .collect();
    let start = |i: usize| {
        NodeProcess::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_kvshared")),
            &format!("node-{i}"),
            ports[i].0,
            ports[i].1,
            &peers,
            &["--replicas", "2"],
        )
    };
    let mut nodes: Vec<NodeProcess> = (0..3).map(start).collect();
    for n in &nodes {
        wait_for_members(&n.endpoint(), 3).await;
    }

    let layout = minilm_layout(DType::BF16, 1);
    let raw = kv_blocks(&kv_sample_bytes(DType::BF16), layout, 64, 1, 0);
    let ns = Namespace::new("failover", layout);
    // Written before the kill: 20 prompts of 64 blocks.
    let prompts: Vec<Vec<u32>> = (0..20).map(|p| prompt_tokens(64, 100 + p)).collect();
    let mut writer = KvClient::connect(&nodes[0].endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    for t in &prompts {
        let r = writer
            .put_blocks(items_for(&ns, t, &raw))
            .await
            .expect("put");
        assert!(r.outcomes.iter().all(|o| o.replicas == 2));
    }
    let prompts = Arc::new(prompts);

    let stop = Arc::new(AtomicBool::new(false));
    let (gets, get_errors, puts, put_errors, lookups_wrong) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let mut client = if w % 2 == 0 {
            // Plain clients of the nodes that stay up (node 1 is the one killed).
            let target = if w == 0 { 0 } else { 2 };
            Client::Plain(Box::new(
                KvClient::connect(&nodes[target].endpoint(), ClientOptions::default())
                    .await
                    .expect("plain"),
            ))
        } else {
            Client::Smart(
                ClusterClient::connect(&[nodes[0].endpoint()], ClientOptions::default())
                    .await
                    .expect("smart"),
            )
        };
        let (ns, raw, prompts, stop) = (ns.clone(), raw.clone(), prompts.clone(), stop.clone());
        let (gets, get_errors, puts, put_errors, lookups_wrong) = (
            gets.clone(),
            get_errors.clone(),
            puts.clone(),
            put_errors.clone(),
            lookups_wrong.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0u32;
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                let t = &prompts[(i as usize + w) % prompts.len()];
                let keys = ns.block_keys(t).expect("keys");
                match client.get(&ns, &keys).await {
                    Ok(b) if b.iter().all(Option::is_some) => {}
                    Ok(b) => {
                        eprintln!(
                            "worker {w}: {} of {} blocks missing",
                            b.iter().filter(|x| x.is_none()).count(),
                            b.len()
                        );
                        get_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("worker {w}: get error {e}");
                        get_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                gets.fetch_add(1, Ordering::Relaxed);
                if client.lookup(&ns, t).await != Ok(64) {
                    lookups_wrong.fetch_add(1, Ordering::Relaxed);
                }
                // Writes continue: a fresh 8-block prompt.
                let fresh = prompt_tokens(8, 10_000 + w as u32 * 100_000 + i);
                match client.put(items_for(&ns, &fresh, &raw)).await {
                    Ok(r) if r >= 1 => {}
                    other => {
                        eprintln!("worker {w}: put {other:?}");
                        put_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                puts.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(800)).await;
    let before_kill = gets.load(Ordering::Relaxed);
    nodes[1].kill();
    let killed_at = Instant::now();
    // Survivors notice within a bounded time.
    wait_for_members(&nodes[0].endpoint(), 2).await;
    wait_for_members(&nodes[2].endpoint(), 2).await;
    println!(
        "node-1 marked down by both peers {:?} after SIGKILL",
        killed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after_kill_gets = gets.load(Ordering::Relaxed) - before_kill;

    // Restart it empty on the same address; it rejoins.
    nodes[1] = start(1);
    for n in &nodes {
        wait_for_members(&n.endpoint(), 3).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("worker");
    }
    println!(
        "gets {} ({} after the kill), get errors {}, puts {}, put errors {}, wrong lookups {}",
        gets.load(Ordering::Relaxed),
        after_kill_gets,
        get_errors.load(Ordering::Relaxed),
        puts.load(Ordering::Relaxed),
        put_errors.load(Ordering::Relaxed),
        lookups_wrong.load(Ordering::Relaxed)
    );
    assert!(after_kill_gets > 4, "load kept running through the failure");
    assert_eq!(get_errors.load(Ordering::Relaxed), 0);
    assert_eq!(lookups_wrong.load(Ordering::Relaxed), 0);
    assert_eq!(put_errors.load(Ordering::Relaxed), 0);

    // The restarted node takes its share of new writes.
    let mut c = KvClient::connect(&nodes[0].endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    let fresh = prompt_tokens(600, 777);
    let r = c
        .put_blocks(items_for(&ns, &fresh, &raw))
        .await
        .expect("put");
    assert!(r.outcomes.iter().all(|o| o.replicas == 2));
    let mut n1 = KvClient::connect(&nodes[1].endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    let s = n1.stats().await.expect("stats");
    println!(
        "restarted node-1 holds {} blocks after 600 new writes (2/3 share = 400)",
        s.stored_blocks
    );
    assert!(s.stored_blocks >= 300, "{}", s.stored_blocks);
}

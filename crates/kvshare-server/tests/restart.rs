//! Restarts with `--data-dir`: a node SIGTERMed writes its store to a snapshot and loads it
//! back on start, blocks byte-identical and chains still linked; and a rolling restart of a
//! 3-node cluster under load (SIGTERM, restart, ready, next) keeps the blocks written before
//! it, with no client errors.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvshare_client::{ClientOptions, ClusterClient, KvClient, PutItem};
use kvshare_core::{BlockKey, DType, EncodedBlock, Namespace};
use kvshare_testkit::{
    NodeProcess, free_port, http_get, kv_blocks, kv_sample_bytes, lz4_items, metric, minilm_layout,
    prompt_tokens, wait_for_members,
};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_kvshared"))
}

/// Blocks of namespace `ns` stored on the node (from Stats, which changes no recency).
async fn ns_blocks(c: &mut KvClient, ns: &Namespace) -> u64 {
    let s = c.stats().await.expect("stats");
    let d = ns.digest();
    s.namespaces
        .iter()
        .find(|n| n.namespace.as_ref() == d.0.as_slice())
        .map_or(0, |n| n.blocks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_and_restart_keeps_every_block_and_the_chains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_arg = data.to_str().expect("utf-8 path").to_string();
    let (g, h) = (free_port().expect("port"), free_port().expect("port"));
    let extra = ["--data-dir", &data_arg, "--capacity", "1MiB"];
    let mut node =
        tokio::task::block_in_place(|| NodeProcess::start(bin(), "persist", g, h, &[], &extra));
    tokio::task::block_in_place(|| node.wait_ready(Duration::from_secs(20))).expect("ready");

    let layout = minilm_layout(DType::BF16, 1);
    let raw = kv_blocks(&kv_sample_bytes(DType::BF16), layout, 64, 1, 0);
    let chain_ns = Namespace::new("restart-chain", layout);
    let other_ns = Namespace::new("restart-other", layout);
    let chain_tokens = prompt_tokens(32, 1);
    let chain = lz4_items(&chain_ns, &chain_tokens, &raw);
    let others: Vec<PutItem> = (0..20)
        .flat_map(|i| lz4_items(&other_ns, &prompt_tokens(1, 100 + i), &raw))
        .collect();
    let mut c = KvClient::connect(&node.endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    c.put_blocks(others.clone()).await.expect("put others");
    c.put_blocks(chain.clone()).await.expect("put chain");
    assert_eq!(
        c.lookup(&chain_ns, &chain_tokens)
            .await
            .expect("lookup")
            .hit_blocks,
        32
    );

    let status = tokio::task::block_in_place(|| node.terminate(Duration::from_secs(20)))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(data.join("store.snapshot").exists(), "snapshot written");

    let node =
        tokio::task::block_in_place(|| NodeProcess::start(bin(), "persist", g, h, &[], &extra));
    tokio::task::block_in_place(|| node.wait_ready(Duration::from_secs(20))).expect("ready");
    assert!(!data.join("store.snapshot").exists(), "deleted once loaded");
    let (_, m) = http_get(&node.http, "/metrics").expect("metrics");
    assert_eq!(
        metric(&m, "kvshare_snapshot_loaded_blocks"),
        Some(52.0),
        "{m}"
    );
    assert_eq!(metric(&m, "kvshare_snapshot_skipped_records"), Some(0.0));

    let mut c = KvClient::connect(&node.endpoint(), ClientOptions::default())
        .await
        .expect("connect");
    for (ns, items) in [(&chain_ns, &chain), (&other_ns, &others)] {
        let keys: Vec<BlockKey> = items.iter().map(|it| it.key).collect();
        let got = c.get_blocks(&ns.digest(), &keys).await.expect("get");
        for (it, b) in items.iter().zip(got) {
            assert_eq!(b.as_ref(), Some(&it.block), "block {:?}", it.key);
        }
    }

    // The chain is still linked: make its tail the most recent block, then push other blocks
    // through. By recency alone the head would go first; linked, the chain loses its tail
    // first, so what is left of it is always a prefix.
    let tail = chain[31].key;
    c.get_blocks(&chain_ns.digest(), &[tail])
        .await
        .expect("get tail");
    let filler_ns = Namespace::new("restart-filler", layout);
    let mut left = 32;
    for i in 0..2_000 {
        c.put_blocks(lz4_items(&filler_ns, &prompt_tokens(1, 10_000 + i), &raw))
            .await
            .expect("filler");
        left = ns_blocks(&mut c, &chain_ns).await;
        if left < 24 {
            break;
        }
    }
    assert!(left < 32, "the fillers evicted part of the chain");
    let keys: Vec<BlockKey> = chain.iter().map(|it| it.key).collect();
    let present: Vec<bool> = c
        .get_blocks(&chain_ns.digest(), &keys)
        .await
        .expect("get")
        .iter()
        .map(Option::is_some)
        .collect();
    let prefix = present.iter().take_while(|p| **p).count();
    assert_eq!(
        present.iter().filter(|p| **p).count(),
        prefix,
        "tail-first: {present:?}"
    );
    assert_eq!(prefix as u64, left);
    println!(
        "restart: 52 blocks back byte-identical; squeezed chain kept its first {prefix} of 32"
    );
}

/// Counters of the load running during the roll.
#[derive(Default)]
struct Load {
    gets: AtomicU64,
    get_errors: AtomicU64,
    /// Blocks written before the roll that a get did not find.
    missing: AtomicU64,
    puts: AtomicU64,
    put_errors: AtomicU64,
}

/// A plain client that retries a failed call on the next node.
struct Retrying {
    endpoints: Vec<String>,
    clients: Vec<Option<KvClient>>,
    next: usize,
}

impl Retrying {
    /// The client of the current node, connecting when needed.
    async fn current(&mut self) -> Result<&mut KvClient, String> {
        let i = self.next % self.endpoints.len();
        if self.clients[i].is_none() {
            let c = KvClient::connect(&self.endpoints[i], ClientOptions::default())
                .await
                .map_err(|e| e.to_string())?;
            self.clients[i] = Some(c);
        }
        self.clients[i]
            .as_mut()
            .ok_or_else(|| "no client".to_string())
    }

    /// Drops the current node's client and moves to the next node.
    fn failed(&mut self) {
        let i = self.next % self.endpoints.len();
        self.clients[i] = None;
        self.next += 1;
    }

    async fn get(
        &mut self,
        ns: &BlockKey,
        keys: &[BlockKey],
    ) -> Result<Vec<Option<EncodedBlock>>, String> {
        let mut last = String::new();
        for _ in 0..2 * self.endpoints.len() {
            match self.current().await {
                Ok(c) => match c.get_blocks(ns, keys).await {
                    Ok(v) => return Ok(v),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e,
            }
            self.failed();
        }
        Err(last)
    }

    async fn put(&mut self, items: Vec<PutItem>) -> Result<kvshare_client::PutReport, String> {
        let mut last = String::new();
        for _ in 0..2 * self.endpoints.len() {
            match self.current().await {
                Ok(c) => match c.put_blocks(items.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e,
            }
            self.failed();
        }
        Err(last)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_keeps_the_blocks_and_costs_no_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = || free_port().expect("free port");
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (port(), port())).collect();
    let peers: Vec<String> = ports
        .iter()
        .map(|(g, _)| format!("127.0.0.1:{g}"))
        .collect();
    let data: Vec<String> = (0..3)
        .map(|i| {
            let d = dir.path().join(format!("node-{i}"));
            d.to_str().expect("utf-8 path").to_string()
        })
        .collect();
    let start = |i: usize| {
        let n = NodeProcess::start(
            bin(),
            &format!("node-{i}"),
            ports[i].0,
            ports[i].1,
            &peers,
            &[
                "--replicas",
                "2",
                "--data-dir",
                &data[i],
                "--drain-seconds",
                "10",
            ],
        );
        n.wait_ready(Duration::from_secs(20)).expect("ready");
        n
    };
    let mut nodes: Vec<NodeProcess> = tokio::task::block_in_place(|| (0..3).map(start).collect());
    for n in &nodes {
        wait_for_members(&n.endpoint(), 3).await;
    }
    let endpoints: Vec<String> = nodes.iter().map(NodeProcess::endpoint).collect();

    let layout = minilm_layout(DType::BF16, 1);
    let raw = Arc::new(kv_blocks(&kv_sample_bytes(DType::BF16), layout, 64, 1, 0));
    let ns = Namespace::new("rolling", layout);
    // Written before the roll: 40 prompts of 32 blocks.
    let prompts: Arc<Vec<Vec<u32>>> =
        Arc::new((0..40).map(|p| prompt_tokens(32, 100 + p)).collect());
    let writer = ClusterClient::connect(&endpoints, ClientOptions::default())
        .await
        .expect("connect");
    for t in prompts.iter() {
        let r = writer
            .put_blocks(lz4_items(&ns, t, &raw))
            .await
            .expect("put");
        assert!(r.outcomes.iter().all(|o| o.replicas == 2));
    }
    let before = (prompts.len() * 32) as u64;

    let load = Arc::new(Load::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4usize {
        let (ns, raw, prompts, stop, load, endpoints) = (
            ns.clone(),
            raw.clone(),
            prompts.clone(),
            stop.clone(),
            load.clone(),
            endpoints.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let smart = if w % 2 == 0 {
                Some(
                    ClusterClient::connect(&endpoints, ClientOptions::default())
                        .await
                        .expect("smart"),
                )
            } else {
                None
            };
            let mut plain = Retrying {
                clients: vec![None; endpoints.len()],
                next: w,
                endpoints,
            };
            let digest = ns.digest();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let keys = ns
                    .block_keys(&prompts[(i as usize * 7 + w) % prompts.len()])
                    .expect("keys");
                let got = match &smart {
                    Some(c) => c
                        .get_blocks(&digest, &keys)
                        .await
                        .map_err(|e| e.to_string()),
                    None => plain.get(&digest, &keys).await,
                };
                load.gets.fetch_add(1, Ordering::Relaxed);
                match got {
                    Ok(b) => {
                        let miss = b.iter().filter(|x| x.is_none()).count() as u64;
                        if miss > 0 {
                            let kind = if smart.is_some() { "smart" } else { "plain" };
                            eprintln!("worker {w} ({kind}): {miss} of {} blocks missed", b.len());
                        }
                        load.missing.fetch_add(miss, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("worker {w}: get error {e}");
                        load.get_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let fresh = lz4_items(
                    &ns,
                    &prompt_tokens(8, 50_000 + w as u32 * 100_000 + i),
                    &raw,
                );
                let put = match &smart {
                    Some(c) => c.put_blocks(fresh).await.map_err(|e| e.to_string()),
                    None => plain.put(fresh).await,
                };
                load.puts.fetch_add(1, Ordering::Relaxed);
                match put {
                    Ok(r) if r.outcomes.iter().all(|o| o.replicas >= 1) => {}
                    other => {
                        eprintln!("worker {w}: put {:?}", other.map(|r| r.outcomes.len()));
                        load.put_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let roll = Instant::now();
    for i in 0..3 {
        let t0 = Instant::now();
        let status = tokio::task::block_in_place(|| nodes[i].terminate(Duration::from_secs(30)))
            .expect("exits after SIGTERM");
        assert!(status.success(), "node-{i}: {status:?}");
        let stopped = t0.elapsed();
        nodes[i] = tokio::task::block_in_place(|| start(i));
        let (_, m) = http_get(&nodes[i].http, "/metrics").expect("metrics");
        let loaded = metric(&m, "kvshare_snapshot_loaded_blocks").unwrap_or(-1.0);
        let skipped = metric(&m, "kvshare_snapshot_skipped_records").unwrap_or(-1.0);
        for n in &nodes {
            wait_for_members(&n.endpoint(), 3).await;
        }
        println!(
            "node-{i}: stopped in {stopped:?}, back and every member healthy after {:?}; \
             snapshot: {loaded} blocks loaded, {skipped} skipped",
            t0.elapsed()
        );
        assert!(loaded > 0.0 && skipped == 0.0);
        // Let the load run against the full cluster before the next node goes (what a
        // StatefulSet's minReadySeconds does).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let roll = roll.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("worker");
    }

    // Blocks written before the roll, read through a fresh smart client.
    let reader = ClusterClient::connect(&endpoints, ClientOptions::default())
        .await
        .expect("connect");
    let mut readable = 0u64;
    for t in prompts.iter() {
        let keys = ns.block_keys(t).expect("keys");
        let got = reader.get_blocks(&ns.digest(), &keys).await.expect("get");
        for (b, it) in got.iter().zip(lz4_items(&ns, t, &raw)) {
            if b.as_ref()
                .map(EncodedBlock::decode)
                .is_some_and(|d| d.is_ok())
            {
                readable += 1;
                assert_eq!(b.as_ref(), Some(&it.block));
            }
        }
    }
    // How many copies survived on the nodes that own them (both replicas back).
    let mut copies = 0;
    for e in &endpoints {
        let mut c = KvClient::connect(e, ClientOptions::default())
            .await
            .expect("connect");
        copies += c.stats().await.expect("stats").stored_blocks;
    }
    let l = &load;
    println!(
        "rolling restart of 3 nodes in {roll:?}: {readable} of {before} blocks written before \
         the roll readable after it ({:.1}%); load: {} gets ({} errors, {} pre-roll blocks \
         missed), {} puts ({} errors); {copies} block copies stored",
        100.0 * readable as f64 / before as f64,
        l.gets.load(Ordering::Relaxed),
        l.get_errors.load(Ordering::Relaxed),
        l.missing.load(Ordering::Relaxed),
        l.puts.load(Ordering::Relaxed),
        l.put_errors.load(Ordering::Relaxed),
    );
    assert!(readable * 100 >= before * 95, "{readable} of {before}");
    assert_eq!(l.get_errors.load(Ordering::Relaxed), 0);
    assert_eq!(l.put_errors.load(Ordering::Relaxed), 0);
    let gets = l.gets.load(Ordering::Relaxed);
    assert!(gets > 10, "the load ran");
    // Reads during the roll find the blocks too (a miss is not an error, but should be rare).
    assert!(
        l.missing.load(Ordering::Relaxed) * 100 <= gets * 32,
        "misses during the roll"
    );
}

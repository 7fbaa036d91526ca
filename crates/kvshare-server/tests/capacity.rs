//! Dynamic capacity against a real `kvshared` process: a node filled to 256 MiB by writers that
//! keep putting 256 KiB blocks is shrunk to 64 MiB with SetCapacity while they run. Stored bytes
//! are under the new cap when the RPC returns and stay there (Stats every 50 ms for a second),
//! and the process's resident memory follows once the freed memory is handed back (malloc_trim).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvshare_client::{ClientOptions, KvClient, PutItem};
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout};
use kvshare_testkit::{NodeProcess, free_port};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const MIB: u64 = 1 << 20;
const BUDGET: u64 = 32 * MIB;
const BEFORE: u64 = 256 * MIB;
const AFTER: u64 = 64 * MIB;
/// Fixed overhead on top of capacity and budget (as in tests/hostile.rs).
const OVERHEAD: u64 = 64 * MIB;

/// A 256 KiB block of incompressible bytes, stored uncompressed.
fn block(seed: u64) -> EncodedBlock {
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 128 << 10,
        dtype: DType::U8,
        tokens_per_block: 1,
    };
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let raw: Vec<u8> = (0..256 << 10)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    EncodedBlock::encode(BlockKey([9; 32]), layout, Codec::None, &raw).expect("encode")
}

/// Puts 256 KiB blocks with fresh keys until `stop`; counts stored blocks and failed calls.
async fn writer(
    endpoint: String,
    id: u8,
    stop: Arc<AtomicBool>,
    stored: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let mut c = KvClient::connect(&endpoint, ClientOptions::default())
        .await
        .expect("connect");
    let b = block(u64::from(id));
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut k = [id; 32];
        k[..4].copy_from_slice(&i.to_le_bytes());
        let item = PutItem {
            key: BlockKey(k),
            parent: None,
            block: b.clone(),
        };
        match c.put_blocks(vec![item]).await {
            Ok(_) => stored.fetch_add(1, Ordering::Relaxed),
            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
        };
        i += 1;
    }
}

async fn metric(http: &str, name: &str) -> Option<f64> {
    let mut s = tokio::net::TcpStream::connect(http).await.ok()?;
    let req = format!("GET /metrics HTTP/1.0\r\nHost: {http}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shrinking_under_load_holds_the_new_cap_and_gives_memory_back() {
    let (grpc, http) = (free_port().expect("port"), free_port().expect("port"));
    let node = NodeProcess::start(
        Path::new(env!("CARGO_BIN_EXE_kvshared")),
        "capacity-node",
        grpc,
        http,
        &[],
        &["--capacity", "256MiB", "--buffer-budget", "32MiB"],
    );
    let ep = node.endpoint();
    let mut admin = KvClient::connect(&ep, ClientOptions::default())
        .await
        .expect("connect");

    // Refusals first: nothing changes.
    for (bad, what) in [(0, "capacity_bytes is 0"), (u64::MAX, "70368744177664")] {
        let e = admin.set_capacity(bad).await.expect_err("refused");
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let (stored, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writers: Vec<_> = (1..=3u8)
        .map(|id| {
            tokio::spawn(writer(
                ep.clone(),
                id,
                stop.clone(),
                stored.clone(),
                failed.clone(),
            ))
        })
        .collect();

    // Fill to (nearly) 256 MiB and past it: eviction is running.
    let t0 = Instant::now();
    loop {
        let s = admin.stats().await.expect("stats");
        if s.evictions > 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "never filled: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (rss_before, _) = node.rss().expect("rss");
    let s = admin.stats().await.expect("stats");
    assert!(
        s.stored_bytes > BEFORE - 4 * MIB && s.stored_bytes <= BEFORE,
        "{s:?}"
    );

    let t = Instant::now();
    let r = admin.set_capacity(AFTER).await.expect("set capacity");
    let rpc_time = t.elapsed();
    assert_eq!(
        (r.old_capacity_bytes, r.new_capacity_bytes),
        (BEFORE, AFTER)
    );
    assert!(r.stored_bytes <= AFTER, "{r:?}");
    assert!(r.evicted_blocks >= 700, "{r:?}");
    eprintln!(
        "SetCapacity 256 MiB -> 64 MiB under load: {:.1} ms, evicted {} blocks, stored {:.1} MiB when it returned",
        rpc_time.as_secs_f64() * 1e3,
        r.evicted_blocks,
        r.stored_bytes as f64 / MIB as f64
    );

    // The writers keep going: the new cap holds for every sample of the next second.
    let stored_at_shrink = stored.load(Ordering::Relaxed);
    let t = Instant::now();
    let (mut samples, mut max_stored) = (0, 0);
    while t.elapsed() < Duration::from_secs(1) {
        let s = admin.stats().await.expect("stats");
        assert_eq!(s.capacity_bytes, AFTER);
        assert!(
            s.stored_bytes <= AFTER,
            "stored {} > {AFTER}",
            s.stored_bytes
        );
        max_stored = max_stored.max(s.stored_bytes);
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let put_during = stored.load(Ordering::Relaxed) - stored_at_shrink;
    assert!(put_during > 0, "the writers stalled");
    eprintln!(
        "next second: {samples} Stats samples, max stored {:.1} MiB; {put_during} blocks put meanwhile",
        max_stored as f64 / MIB as f64
    );
    let (rss_under_load, _) = node.rss().expect("rss");

    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    // malloc_trim runs in the background after the call; give it a moment.
    let bound = AFTER + BUDGET + OVERHEAD;
    let t = Instant::now();
    let mut rss_after = u64::MAX;
    while t.elapsed() < Duration::from_secs(3) {
        rss_after = node.rss().expect("rss").0;
        if rss_after <= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "RSS: {:.1} MiB before, {:.1} MiB a second after under load, {:.1} MiB after the writers stopped \
         (bound 64 MiB + 32 MiB budget + 64 MiB = {} MiB); {} puts, {} failed",
        rss_before as f64 / MIB as f64,
        rss_under_load as f64 / MIB as f64,
        rss_after as f64 / MIB as f64,
        bound / MIB,
        stored.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(
        rss_after <= bound,
        "RSS {} MiB after the shrink, over {} MiB",
        rss_after / MIB,
        bound / MIB
    );

    // Stats, the metrics gauge and the evictions counter follow.
    let s = admin.stats().await.expect("stats");
    assert_eq!(s.capacity_bytes, AFTER);
    assert!(s.evictions >= r.evicted_blocks);
    let http = format!("127.0.0.1:{http}");
    assert_eq!(
        metric(&http, "kvshare_capacity_bytes").await,
        Some(AFTER as f64)
    );

    // Growing is immediate.
    let r = admin.set_capacity(BEFORE).await.expect("grow");
    assert_eq!((r.new_capacity_bytes, r.evicted_blocks), (BEFORE, 0));
}

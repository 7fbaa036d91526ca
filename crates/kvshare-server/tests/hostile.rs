//! Hostile input against a real `kvshared` process: what an attacker or a buggy client can send
//! gets the right status, and the node's peak resident memory (`VmHWM` from `/proc`) stays
//! within capacity + buffer budget + 64 MiB. Each case is a scaled-down version of one found
//! with an independent client against the release binary.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kvshare_core::{BlockKey, Codec, DType, EncodedBlock, KvLayout, checksum};
use kvshare_proto::transport::mark_no_forward;
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;
use kvshare_testkit::{NodeProcess, free_port, wait_for_members};
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;
const NS: [u8; 32] = [0x5a; 32];
/// Fixed overhead allowed on top of capacity and budget.
const OVERHEAD: u64 = 64 * MIB;

/// A node with `capacity_mib` of store and `budget_mib` of buffer budget.
struct Node {
    process: NodeProcess,
    bound: u64,
}

impl Node {
    fn start(capacity_mib: u64, budget_mib: u64, peers: &[String], extra: &[&str]) -> Self {
        let (grpc, http) = (free_port().expect("port"), free_port().expect("port"));
        Self::start_on(grpc, http, capacity_mib, budget_mib, peers, extra)
    }

    fn start_on(
        grpc: u16,
        http: u16,
        capacity_mib: u64,
        budget_mib: u64,
        peers: &[String],
        extra: &[&str],
    ) -> Self {
        let (cap, budget) = (format!("{capacity_mib}MiB"), format!("{budget_mib}MiB"));
        let mut args = vec!["--capacity", &cap, "--buffer-budget", &budget];
        args.extend_from_slice(extra);
        let process = NodeProcess::start(
            Path::new(env!("CARGO_BIN_EXE_kvshared")),
            &format!("hostile-{grpc}"),
            grpc,
            http,
            peers,
            &args,
        );
        Node {
            process,
            bound: (capacity_mib + budget_mib) * MIB + OVERHEAD,
        }
    }

    /// Asserts the node's peak RSS so far is within its bound; returns (now, peak) in MiB.
    fn assert_memory(&self, case: &str) -> (u64, u64) {
        let (rss, peak) = self.process.rss().expect("node runs");
        eprintln!(
            "{case}: RSS {} MiB, peak {} MiB, bound {} MiB",
            rss / MIB,
            peak / MIB,
            self.bound / MIB
        );
        assert!(
            peak <= self.bound,
            "{case}: peak RSS {} MiB over the bound of {} MiB",
            peak / MIB,
            self.bound / MIB
        );
        (rss / MIB, peak / MIB)
    }

    async fn client(&self) -> KvCacheClient<Channel> {
        KvCacheClient::connect(self.process.endpoint())
            .await
            .expect("connect")
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }
}

fn key(i: u32) -> Bytes {
    let mut k = [0x11u8; 32];
    k[..4].copy_from_slice(&i.to_le_bytes());
    Bytes::copy_from_slice(&k)
}

/// A one-layer, one-head U8 layout of 512 dims and `bytes` raw bytes per block (a multiple
/// of 1 KiB).
fn flat_layout(bytes: u32) -> pb::KvLayout {
    pb::KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 512,
        dtype: pb::DType::DtypeU8 as i32,
        tokens_per_block: bytes / 1024,
    }
}

fn raw_header(layout: pb::KvLayout, raw_len: u64, payload_len: u64, sum: u64) -> pb::BlockHeader {
    pb::BlockHeader {
        namespace: Bytes::from_static(&NS),
        layout: Some(layout),
        codec: pb::Codec::None as i32,
        raw_len,
        checksum: sum,
        payload_len,
        payload_checksum: None,
    }
}

/// An uncompressed block of `bytes` bytes.
fn block(bytes: u32, seed: u8) -> EncodedBlock {
    let l = flat_layout(bytes);
    let layout = KvLayout {
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: l.head_dim,
        dtype: DType::U8,
        tokens_per_block: l.tokens_per_block,
    };
    let raw: Vec<u8> = (0..bytes)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    EncodedBlock::encode(BlockKey(NS), layout, Codec::None, &raw).expect("encode")
}

fn put_msgs(k: &Bytes, b: &EncodedBlock) -> Vec<pb::PutRequest> {
    kvshare_core::wire::put_chunks(&BlockKey::from_slice(k).expect("key"), None, b, 1 << 20)
}

async fn put(
    c: &mut KvCacheClient<Channel>,
    msgs: Vec<pb::PutRequest>,
) -> Result<pb::PutResponse, tonic::Status> {
    c.put(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// Reads a whole Get; the payload bytes of each found block.
async fn get_all(
    c: &mut KvCacheClient<Channel>,
    keys: Vec<Bytes>,
) -> Result<Vec<Option<Vec<u8>>>, tonic::Status> {
    let mut s = c
        .get(pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys,
            packed_keys: Default::default(),
        })
        .await?
        .into_inner();
    let mut out: Vec<Option<Vec<u8>>> = Vec::new();
    while let Some(m) = s.message().await? {
        if m.index as usize == out.len() {
            out.push(m.found.then(Vec::new));
        }
        if let Some(Some(buf)) = out.last_mut() {
            buf.extend_from_slice(&m.data);
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overflowing_layouts_are_refused_and_count_nothing() {
    let node = Node::start(64, 64, &[], &[]);
    let mut c = node.client().await;
    // The dims multiply to 2^64 + 8192, which wrapped to 8192 before sizes were checked.
    let wraps = pb::KvLayout {
        num_layers: 87_382,
        num_kv_heads: 45_712,
        head_dim: 44_208,
        dtype: pb::DType::DtypeU8 as i32,
        tokens_per_block: 52_232,
    };
    let data = Bytes::from(vec![7u8; 8192]);
    let msg = pb::PutRequest {
        key: key(1),
        header: Some(raw_header(wraps, 8192, 8192, checksum(&data))),
        data,
        parent_key: Bytes::new(),
    };
    let err = put(&mut c, vec![msg]).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("num_layers is 87382"),
        "{}",
        err.message()
    );
    let huge = pb::KvLayout {
        num_layers: 1 << 31,
        num_kv_heads: 2,
        head_dim: 1,
        dtype: pb::DType::DtypeU8 as i32,
        tokens_per_block: 1 << 31,
    };
    let msg = pb::PutRequest {
        key: key(2),
        header: Some(raw_header(huge, 0, 1, 0)),
        data: Bytes::from_static(b"x"),
        parent_key: Bytes::new(),
    };
    let err = put(&mut c, vec![msg]).await.expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    let r = c
        .lookup(pb::LookupRequest {
            namespace: Bytes::from_static(&NS),
            keys: vec![key(1), key(2)],
            per_key: true,
            packed_keys: Default::default(),
        })
        .await
        .expect("lookup")
        .into_inner();
    assert_eq!(r.hit_blocks, 0);
    let s = c
        .stats(pb::StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((s.stored_blocks, s.lookup_tokens), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_chunks_are_coalesced_into_one_buffer() {
    const BYTES: u32 = 1 << 20;
    let node = Node::start(16, 8, &[], &[]);
    let mut c = node.client().await;
    let b = block(BYTES, 3);
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let call = tokio::spawn({
        let mut c = c.clone();
        async move { c.put(ReceiverStream::new(rx)).await.map(|r| r.into_inner()) }
    });
    let header = b.header.to_proto();
    for i in 0..BYTES as usize - 1 {
        let msg = pb::PutRequest {
            key: key(1),
            header: (i == 0).then(|| header.clone()),
            data: b.payload.slice(i..i + 1),
            parent_key: Bytes::new(),
        };
        tx.send(msg).await.expect("send");
    }
    // Everything but the last byte is in; the node holds one buffer for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.assert_memory("1,048,575 one-byte chunks");
    let last = b.payload.slice(BYTES as usize - 1..);
    tx.send(pb::PutRequest {
        key: key(1),
        header: None,
        data: last,
        parent_key: Bytes::new(),
    })
    .await
    .expect("send last");
    drop(tx);
    let r = call.await.expect("join").expect("stored");
    assert_eq!(
        r.outcomes[0].status,
        pb::block_outcome::Status::Stored as i32
    );
    let got = get_all(&mut c, vec![key(1)]).await.expect("get");
    assert_eq!(got[0].as_deref(), Some(b.payload.as_ref()));
    node.assert_memory("after the block completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_repeating_one_key_65536_times_streams_within_the_budget() {
    let node = Node::start(48, 16, &[], &[]);
    let mut c = node.client().await;
    let b = block(8 << 20, 9);
    put(&mut c, put_msgs(&key(1), &b)).await.expect("put");
    // Four clients each ask for the block 65,536 times, read one message, and stall.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = node.client().await;
        let mut s = c
            .get(pb::GetRequest {
                namespace: Bytes::from_static(&NS),
                keys: vec![key(1); 65_536],
                packed_keys: Default::default(),
            })
            .await
            .expect("get")
            .into_inner();
        let first = s.message().await.expect("first message").expect("some");
        assert!(first.found);
        stalled.push((c, s));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.assert_memory("4 stalled Gets of 65,536 x 8 MiB");
    // Another client is still served.
    let got = get_all(&mut c, vec![key(1)]).await.expect("get");
    assert_eq!(got[0].as_deref(), Some(b.payload.as_ref()));
    drop(stalled);
    node.assert_memory("after the stalled Gets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_get_storm_stays_within_the_budget() {
    let (ports, peers) = kvshare_testkit::cluster_ports(2);
    let start = |i: usize| {
        Node::start_on(
            ports[i].0,
            ports[i].1,
            256,
            64,
            &peers,
            &["--replicas", "1"],
        )
    };
    let nodes = [start(0), start(1)];
    for n in &nodes {
        wait_for_members(&n.process.endpoint(), 2).await;
    }
    // 160 blocks of 1 MiB through node 0; the 64 it does not hold are fetched from node 1.
    let mut c = nodes[0].client().await;
    let b = block(1 << 20, 1);
    for batch in (0..160u32).collect::<Vec<_>>().chunks(16) {
        let msgs = batch.iter().flat_map(|i| put_msgs(&key(*i), &b)).collect();
        put(&mut c, msgs).await.expect("put");
    }
    let mut req = tonic::Request::new(pb::LookupRequest {
        namespace: Bytes::from_static(&NS),
        keys: (0..160).map(key).collect(),
        per_key: true,
        packed_keys: Default::default(),
    });
    mark_no_forward(&mut req);
    let local = c.lookup(req).await.expect("lookup").into_inner().present;
    let remote: Vec<Bytes> = (0..160)
        .filter(|i| !local[*i as usize])
        .map(key)
        .take(64)
        .collect();
    assert!(remote.len() >= 48, "only {} blocks on node 1", remote.len());
    // 32 clients, each on its own connection, loop Gets of those blocks through node 0.
    let until = Instant::now() + Duration::from_secs(4);
    let mut clients = Vec::new();
    for _ in 0..32 {
        let mut c = nodes[0].client().await;
        let keys = remote.clone();
        clients.push(tokio::spawn(async move {
            let (mut ok, mut busy) = (0u32, 0u32);
            while Instant::now() < until {
                match get_all(&mut c, keys.clone()).await {
                    Ok(blocks) => {
                        assert!(
                            blocks
                                .iter()
                                .all(|b| b.as_ref().is_some_and(|p| p.len() == 1 << 20))
                        );
                        ok += 1;
                    }
                    Err(s) if s.code() == Code::ResourceExhausted => busy += 1,
                    Err(s) => panic!("storm Get failed: {s}"),
                }
            }
            (ok, busy)
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in clients {
        let (o, b) = t.await.expect("client");
        ok += o;
        busy += b;
    }
    eprintln!(
        "storm: {ok} Gets of {} MiB answered, {busy} refused as busy",
        remote.len()
    );
    assert!(ok > 0);
    nodes[0].assert_memory("32-client forwarded Get storm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickling_uploads_neither_block_writers_nor_live_forever() {
    let node = Node::start(
        64,
        512,
        &[],
        &[
            "--stream-idle-timeout-ms",
            "4000",
            "--put-min-rate",
            "64KiB",
        ],
    );
    // Eight uploads announce 32 MiB blocks and send one byte.
    let announced = flat_layout(33_553_408);
    let mut stalled = Vec::new();
    for i in 0..8u32 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(pb::PutRequest {
            key: key(100 + i),
            header: Some(raw_header(announced, 33_553_408, 33_553_408, 0)),
            data: Bytes::from_static(b"x"),
            parent_key: Bytes::new(),
        })
        .await
        .expect("send");
        let mut c = node.client().await;
        let t0 = Instant::now();
        stalled.push((
            tokio::spawn(async move { (c.put(ReceiverStream::new(rx)).await, t0.elapsed()) }),
            tx,
        ));
    }
    // A trickle: a 128 KiB block at ~1 KiB/s, one message every 250 ms.
    let trickle_block = block(128 << 10, 4);
    let (ttx, trx) = tokio::sync::mpsc::channel(1);
    let trickler = {
        let mut c = node.client().await;
        tokio::spawn(async move { c.put(ReceiverStream::new(trx)).await })
    };
    let feeder = tokio::spawn(async move {
        let header = trickle_block.header.to_proto();
        for (i, chunk) in trickle_block.payload.chunks(256).enumerate() {
            let msg = pb::PutRequest {
                key: key(200),
                header: (i == 0).then(|| header.clone()),
                data: Bytes::copy_from_slice(chunk),
                parent_key: Bytes::new(),
            };
            if ttx.send(msg).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Other writers are served at once.
    let mut c = node.client().await;
    let b = block(147_456, 5);
    for i in 0..20u32 {
        let t0 = Instant::now();
        put(&mut c, put_msgs(&key(i), &b))
            .await
            .expect("writer's put");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "put {i} took {:?}",
            t0.elapsed()
        );
    }
    node.assert_memory("8 stalled uploads and a trickle");
    // The stalled uploads end after the idle timeout; the trickle once it is overdue
    // (4 s + 128 KiB at 64 KiB/s = 6 s).
    for (call, _tx) in stalled {
        let (r, took) = call.await.expect("join");
        let s = r.expect_err("stalled upload ended");
        assert_eq!(s.code(), Code::DeadlineExceeded, "{}", s.message());
        assert!(s.message().contains("upload stalled"), "{}", s.message());
        assert!(took < Duration::from_secs(8), "ended after {took:?}");
    }
    let s = trickler.await.expect("join").expect_err("trickle ended");
    assert_eq!(s.code(), Code::DeadlineExceeded, "{}", s.message());
    assert!(
        s.message().contains("arrived too slowly"),
        "{}",
        s.message()
    );
    feeder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_and_lengths_get_clear_statuses() {
    let node = Node::start(64, 64, &[], &[]);
    let mut c = node.client().await;
    // A Put message over the 80 MiB message limit.
    let b = block(1 << 20, 6);
    let mut msgs = put_msgs(&key(1), &b);
    msgs[0].parent_key = Bytes::from(vec![0u8; 81 << 20]);
    let s = put(&mut c, msgs).await.expect_err("too large");
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    // A unary request over it.
    let s = c
        .lookup(pb::LookupRequest {
            namespace: Bytes::from(vec![0u8; 81 << 20]),
            keys: vec![key(1)],
            per_key: false,
            packed_keys: Default::default(),
        })
        .await
        .expect_err("too large");
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    // A payload length no codec produces.
    let mut h = b.header.to_proto();
    h.payload_len = 1 << 62;
    let msg = pb::PutRequest {
        key: key(2),
        header: Some(h),
        data: Bytes::from_static(b"x"),
        parent_key: Bytes::new(),
    };
    let s = put(&mut c, vec![msg]).await.expect_err("refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(
        s.message().contains("larger than any codec produces"),
        "{}",
        s.message()
    );
    node.assert_memory("oversized messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_counted() {
    let node = Node::start(
        16,
        16,
        &[],
        &["--handshake-timeout-ms", "500", "--max-connections", "8"],
    );
    let addr = node.process.grpc.clone();
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    // The ninth is closed as it arrives.
    let mut ninth = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), ninth.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(n.map_or(true, |n| n == 0), "ninth connection got data");
    // The silent ones are closed after the handshake timeout (the server may first write its
    // own SETTINGS; read until end of stream).
    let t0 = Instant::now();
    for mut s in silent {
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection stayed open");
    }
    assert!(t0.elapsed() >= Duration::from_millis(300));
    // Real clients connect again.
    let mut c = node.client().await;
    c.stats(pb::StatsRequest::default()).await.expect("stats");
}

/// A raw, opened bulk-transport connection to the node whose bulk port is `port`.
async fn bulk_conn(port: u16) -> tokio::net::TcpStream {
    use kvshare_proto::bulk::{self, Kind};
    use prost::Message;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect bulk");
    bulk::write_magic(&mut s).await.expect("magic");
    bulk::write_frame(
        &mut s,
        Kind::Open,
        &pb::BulkOpen::default().encode_to_vec(),
        &[],
    )
    .await
    .expect("open");
    let p = bulk::read_prefix(&mut s)
        .await
        .expect("answer")
        .expect("frame");
    assert_eq!(p.kind, Kind::Done);
    bulk::skip(&mut s, u64::from(p.head_len))
        .await
        .expect("head");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transport_stalls_and_floods_stay_within_the_budget() {
    use kvshare_proto::bulk::{self, Kind, Prefix};
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    let node = Node::start(48, 16, &[], &["--stream-idle-timeout-ms", "3000"]);
    let mut c = node.client().await;
    let port = u16::try_from(
        c.cluster_info(pb::ClusterInfoRequest {})
            .await
            .expect("info")
            .into_inner()
            .bulk_port,
    )
    .expect("port");
    assert_ne!(port, 0);
    let b = block(8 << 20, 3);
    put(&mut c, put_msgs(&key(1), &b)).await.expect("put");

    let mut held = Vec::new();
    // Gets of one 8 MiB block 65,536 times whose clients read nothing.
    for _ in 0..4 {
        let mut s = bulk_conn(port).await;
        let req = pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys: vec![],
            packed_keys: (0..65_536).flat_map(|_| key(1).to_vec()).collect(),
        };
        bulk::write_frame(&mut s, Kind::Get, &req.encode_to_vec(), &[])
            .await
            .expect("get");
        held.push(s);
    }
    // Uploads of 32 MiB blocks that stop after 4 MiB.
    for i in 0..8u32 {
        let mut s = bulk_conn(port).await;
        let len = 32u64 << 20;
        let head = pb::PutRequest {
            key: key(100 + i),
            header: Some(raw_header(flat_layout(32 << 20), len, len, 0)),
            data: Bytes::new(),
            parent_key: Bytes::new(),
        }
        .encode_to_vec();
        let prefix = Prefix {
            kind: Kind::PutChunk,
            head_len: head.len() as u32,
            data_len: len,
        };
        s.write_all(&prefix.encode()).await.expect("prefix");
        s.write_all(&head).await.expect("head");
        // The node reads only as far as its budget lets it.
        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&vec![7u8; 4 << 20]))
            .await;
        held.push(s);
    }
    // Heads that announce 8 MiB and send half.
    for _ in 0..8 {
        let mut s = bulk_conn(port).await;
        let prefix = Prefix {
            kind: Kind::Get,
            head_len: bulk::MAX_HEAD_BYTES,
            data_len: 0,
        };
        s.write_all(&prefix.encode()).await.expect("prefix");
        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&vec![0u8; 4 << 20]))
            .await;
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    node.assert_memory("bulk: stalled Gets, stalled uploads, half heads");
    // They hold the whole budget (others wait, then get RESOURCE_EXHAUSTED) until the idle
    // timeout ends them and frees what they held; then clients are served again, over gRPC and
    // over the bulk transport.
    let t0 = Instant::now();
    loop {
        match get_all(&mut c, vec![key(1)]).await {
            Ok(got) => {
                assert_eq!(got[0].as_deref(), Some(b.payload.as_ref()));
                break;
            }
            Err(e)
                if e.code() == Code::ResourceExhausted
                    && t0.elapsed() < Duration::from_secs(30) => {}
            Err(e) => panic!("not served {:?} after the stalls: {e}", t0.elapsed()),
        }
    }
    eprintln!("served over gRPC again after {:?}", t0.elapsed());
    // An upload that waited for room reads what its socket buffered once room frees, then
    // stalls again until its own idle timeout: the budget frees in waves, so the bulk Get too
    // may be told RESOURCE_EXHAUSTED (and retry) until the last wave has ended.
    loop {
        let mut s = bulk_conn(port).await;
        let req = pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys: vec![key(1)],
            packed_keys: Bytes::new(),
        };
        bulk::write_frame(&mut s, Kind::Get, &req.encode_to_vec(), &[])
            .await
            .expect("get");
        let p = bulk::read_prefix(&mut s)
            .await
            .expect("read")
            .expect("frame");
        if p.kind == Kind::GetChunk {
            assert_eq!(p.data_len, 8 << 20);
            break;
        }
        assert_eq!(p.kind, Kind::Error, "{p:?}");
        let head = bulk::read_bytes(&mut s, p.head_len as usize)
            .await
            .expect("error head");
        let status = kvshare_proto::rpc::RpcStatus::decode(head).expect("google.rpc.Status");
        assert!(
            status.code == Code::ResourceExhausted as i32 && t0.elapsed() < Duration::from_secs(60),
            "bulk Get not served {:?} after the stalls: {status:?}",
            t0.elapsed()
        );
    }
    eprintln!(
        "served over the bulk transport again after {:?}",
        t0.elapsed()
    );
    drop(held);
    node.assert_memory("bulk: after the stalls");
    let stats = c
        .stats(pb::StatsRequest::default())
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.stored_blocks, 1, "no partial upload was stored");
}

//! Bad input gets the right gRPC status and a message a person can act on, stores nothing,
//! and leaves the node serving.

use std::time::Duration;

use bytes::Bytes;
use kvshare_core::{BlockKey, Codec, CoreError, DType, EncodedBlock, KvLayout};
use kvshare_proto::v1 as pb;
use kvshare_proto::v1::kv_cache_client::KvCacheClient;
use kvshare_tests::{kv_blocks, kv_sample_bytes, minilm_layout, start_node};
use tonic::Code;
use tonic::transport::Channel;

const NS: [u8; 32] = [9; 32];

fn key(i: u8) -> Bytes {
    Bytes::from(vec![i; 32])
}

fn block(codec: Codec) -> EncodedBlock {
    let layout = minilm_layout(DType::BF16, 4);
    let raw = &kv_blocks(&kv_sample_bytes(DType::BF16), layout, 1, 0, 40)[0];
    EncodedBlock::encode(BlockKey(NS), layout, codec, raw).expect("encode")
}

fn chunks(key: Bytes, b: &EncodedBlock, header: pb::BlockHeader, n: usize) -> Vec<pb::PutRequest> {
    let size = b.payload.len().div_ceil(n);
    b.payload
        .chunks(size)
        .enumerate()
        .map(|(i, c)| pb::PutRequest {
            key: key.clone(),
            header: (i == 0).then(|| header.clone()),
            data: Bytes::copy_from_slice(c),
            parent_key: Bytes::new(),
        })
        .collect()
}

async fn put(
    c: &mut KvCacheClient<Channel>,
    msgs: Vec<pb::PutRequest>,
) -> Result<pb::PutResponse, tonic::Status> {
    c.put(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

async fn lookup(c: &mut KvCacheClient<Channel>, keys: Vec<Bytes>) -> Result<u32, tonic::Status> {
    c.lookup(pb::LookupRequest {
        namespace: Bytes::from_static(&NS),
        keys,
        per_key: false,
        packed_keys: Default::default(),
    })
    .await
    .map(|r| r.into_inner().hit_blocks)
}

fn expect_err<T: std::fmt::Debug>(
    r: Result<T, tonic::Status>,
    code: Code,
    needle: &str,
) -> tonic::Status {
    let s = r.expect_err("must fail");
    assert_eq!(s.code(), code, "message: {}", s.message());
    assert!(
        s.message().to_lowercase().contains(&needle.to_lowercase()),
        "{:?} does not mention {needle:?}",
        s.message()
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_right_status_and_harms_nothing() {
    let node = start_node(64 << 20, |c| c.max_block_size = 64 * 1024).await;
    let mut c = KvCacheClient::connect(node.endpoint())
        .await
        .expect("connect");
    let good = block(Codec::BytePlaneZstd);

    // A good block first, so we can check it survives everything below.
    let r = put(&mut c, chunks(key(1), &good, good.header.to_proto(), 3))
        .await
        .expect("good put");
    assert_eq!(
        r.outcomes[0].status,
        pb::block_outcome::Status::Stored as i32
    );

    // 1. Wrong key length: in Lookup, Get, Delete and Put.
    expect_err(
        lookup(&mut c, vec![key(1), Bytes::from_static(b"short")]).await,
        Code::InvalidArgument,
        "keys[1] must be 32 bytes",
    );
    let g = c
        .get(pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys: vec![Bytes::from(vec![0; 33])],
            packed_keys: Default::default(),
        })
        .await;
    expect_err(g.map(|_| ()), Code::InvalidArgument, "32 bytes");
    let mut bad_key = chunks(key(2), &good, good.header.to_proto(), 1);
    bad_key[0].key = Bytes::from_static(&[1, 2, 3]);
    expect_err(
        put(&mut c, bad_key).await,
        Code::InvalidArgument,
        "key must be 32 bytes",
    );
    let bad_ns = c
        .lookup(pb::LookupRequest {
            namespace: Bytes::from_static(b"ns"),
            keys: vec![key(1)],
            per_key: false,
            packed_keys: Default::default(),
        })
        .await;
    expect_err(
        bad_ns,
        Code::InvalidArgument,
        "namespace must be the 32-byte",
    );

    // 2. Empty key list.
    expect_err(
        lookup(&mut c, vec![]).await,
        Code::InvalidArgument,
        "keys is empty",
    );
    let g = c
        .get(pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys: vec![],
            packed_keys: Default::default(),
        })
        .await;
    expect_err(g.map(|_| ()), Code::InvalidArgument, "keys is empty");
    let d = c
        .delete(pb::DeleteRequest {
            namespace: Bytes::from_static(&NS),
            keys: vec![],
            packed_keys: Default::default(),
        })
        .await;
    expect_err(d, Code::InvalidArgument, "keys is empty");
    expect_err(
        put(&mut c, vec![]).await,
        Code::InvalidArgument,
        "no blocks",
    );

    // 3. A block over the size limit (147,456 raw bytes > 64 KiB).
    let big_layout = minilm_layout(DType::BF16, 16);
    let big_raw = &kv_blocks(&kv_sample_bytes(DType::BF16), big_layout, 1, 0, 0)[0];
    let big = EncodedBlock::encode(BlockKey(NS), big_layout, Codec::Lz4, big_raw).expect("encode");
    let s = expect_err(
        put(&mut c, chunks(key(3), &big, big.header.to_proto(), 4)).await,
        Code::ResourceExhausted,
        "max-block-size",
    );
    let details =
        kvshare_proto::rpc::decode_put_details(s.details()).expect("details carry outcomes");
    assert_eq!(
        details.outcomes[0].status,
        pb::block_outcome::Status::Rejected as i32
    );
    assert_eq!(details.outcomes[0].code, Code::ResourceExhausted as i32);

    // 4. A payload whose checksum does not match. Without a payload checksum (older clients)
    // the node decodes the block and checks the raw checksum.
    let mut h = good.header.to_proto();
    h.checksum ^= 0xdead_beef;
    h.payload_checksum = None;
    expect_err(
        put(&mut c, chunks(key(4), &good, h, 2)).await,
        Code::InvalidArgument,
        "checksum mismatch",
    );
    // With one, the node checks the payload's hash instead of decoding.
    let mut h = good.header.to_proto();
    h.payload_checksum = h.payload_checksum.map(|c| c ^ 1);
    expect_err(
        put(&mut c, chunks(key(18), &good, h, 2)).await,
        Code::InvalidArgument,
        "payload checksum mismatch",
    );
    // A payload checksum that holds over a payload whose raw checksum does not: the node
    // stores it (it does not decode), and a reader refuses it as corrupt, never as valid.
    let mut lying = good.clone();
    lying.header.checksum ^= 0xdead_beef;
    put(&mut c, chunks(key(17), &lying, lying.header.to_proto(), 2))
        .await
        .expect("stored without decoding");
    let read_back = kvshare_client::KvClient::connect(&node.endpoint(), Default::default())
        .await
        .expect("client")
        .get_blocks(
            &BlockKey(NS),
            &[BlockKey::from_slice(&key(17)).expect("key")],
        )
        .await
        .expect("get");
    let fetched = read_back[0].as_ref().expect("found");
    assert!(
        matches!(fetched.decode(), Err(CoreError::ChecksumMismatch { .. })),
        "a reader must see the block as corrupt"
    );

    // A corrupted payload byte (checksum in the header is the true one).
    let mut corrupt = good.clone();
    let mut p = corrupt.payload.to_vec();
    let mid = p.len() / 2;
    p[mid] ^= 0x40;
    corrupt.payload = Bytes::from(p);
    let r = put(
        &mut c,
        chunks(key(5), &corrupt, corrupt.header.to_proto(), 1),
    )
    .await;
    let s = r.expect_err("corrupt payload refused");
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());

    // 5. A chunked block that stops half-way never becomes visible.
    let mut half = chunks(key(6), &good, good.header.to_proto(), 4);
    half.truncate(2);
    expect_err(
        put(&mut c, half).await,
        Code::InvalidArgument,
        "upload ended in the middle of block 0",
    );
    // Chunks of two blocks interleaved.
    let mut inter = chunks(key(7), &good, good.header.to_proto(), 2);
    inter.insert(
        1,
        chunks(key(8), &good, good.header.to_proto(), 1).remove(0),
    );
    expect_err(
        put(&mut c, inter).await,
        Code::InvalidArgument,
        "send a block's chunks consecutively",
    );
    // More bytes than payload_len.
    let mut over = chunks(key(9), &good, good.header.to_proto(), 1);
    over.push(pb::PutRequest {
        key: key(9),
        data: Bytes::from_static(b"extra"),
        ..Default::default()
    });
    let r = put(&mut c, over).await;
    assert!(r.is_ok() || r.as_ref().is_err_and(|s| s.code() == Code::InvalidArgument));

    // 6. A header whose raw length disagrees with the decoded length: the payload encodes
    // 3 tokens' worth of K/V while the header (and its layout) declare 4.
    let short_layout = minilm_layout(DType::BF16, 3);
    let short_raw = &kv_blocks(&kv_sample_bytes(DType::BF16), short_layout, 1, 0, 0)[0];
    let short =
        EncodedBlock::encode(BlockKey(NS), short_layout, Codec::Lz4, short_raw).expect("encode");
    let mut h = short.header.to_proto();
    h.layout = Some(minilm_layout(DType::BF16, 4).to_proto());
    h.raw_len = minilm_layout(DType::BF16, 4).block_bytes();
    // Without a payload checksum the node decodes, and sees the length is wrong (with one it
    // stores the block and readers refuse it, as for key 17 above).
    h.payload_checksum = None;
    expect_err(
        put(&mut c, chunks(key(10), &short, h, 1)).await,
        Code::InvalidArgument,
        "raw_len",
    );
    // And a raw_len that disagrees with the layout is refused before decoding.
    let mut h = good.header.to_proto();
    h.raw_len += 2;
    expect_err(
        put(&mut c, chunks(key(11), &good, h, 1)).await,
        Code::InvalidArgument,
        "raw_len",
    );

    // 7. An unknown codec.
    let mut h = good.header.to_proto();
    h.codec = 42;
    let s = expect_err(
        put(&mut c, chunks(key(12), &good, h, 2)).await,
        Code::InvalidArgument,
        "unknown codec 42",
    );
    assert!(kvshare_proto::rpc::decode_put_details(s.details()).is_some());

    // Other malformed headers.
    let mut h = good.header.to_proto();
    h.layout = Some(
        KvLayout {
            num_layers: 0,
            ..minilm_layout(DType::BF16, 4)
        }
        .to_proto(),
    );
    expect_err(
        put(&mut c, chunks(key(13), &good, h, 1)).await,
        Code::InvalidArgument,
        "num_layers",
    );
    let mut no_header = chunks(key(14), &good, good.header.to_proto(), 1);
    no_header[0].header = None;
    expect_err(
        put(&mut c, no_header).await,
        Code::InvalidArgument,
        "no header",
    );

    // A stream with a good block after a rejected one: the good one is stored, and the
    // details report both outcomes.
    let mut h = good.header.to_proto();
    h.payload_checksum = h.payload_checksum.map(|c| c ^ 1);
    let mut mixed = chunks(key(15), &good, h, 2);
    mixed.extend(chunks(key(16), &good, good.header.to_proto(), 2));
    let s = expect_err(put(&mut c, mixed).await, Code::InvalidArgument, "block 0");
    let d = kvshare_proto::rpc::decode_put_details(s.details()).expect("details");
    let statuses: Vec<i32> = d.outcomes.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        vec![
            pb::block_outcome::Status::Rejected as i32,
            pb::block_outcome::Status::Stored as i32
        ]
    );

    // Nothing bad became visible; the good blocks are intact; the node still serves.
    for k in [3u8, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 18] {
        assert_eq!(
            lookup(&mut c, vec![key(k)]).await.expect("lookup"),
            0,
            "key {k} must not be stored"
        );
    }
    assert_eq!(lookup(&mut c, vec![key(1)]).await.expect("lookup"), 1);
    assert_eq!(lookup(&mut c, vec![key(16)]).await.expect("lookup"), 1);
    let mut stream = c
        .get(pb::GetRequest {
            namespace: Bytes::from_static(&NS),
            keys: vec![key(1)],
            packed_keys: Default::default(),
        })
        .await
        .expect("get")
        .into_inner();
    let mut payload = Vec::new();
    while let Some(m) = stream.message().await.expect("chunk") {
        payload.extend_from_slice(&m.data);
    }
    assert_eq!(payload, good.payload.to_vec());
    let s = node.state.stats(0);
    assert!(
        s.puts_rejected >= 8,
        "rejections counted: {}",
        s.puts_rejected
    );
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_wait_for_budget_room_and_then_fail_cleanly() {
    // 1 MiB of buffer budget, 100 ms wait: a 600 KiB block fits, two concurrent ones
    // cannot both be buffered; an upload that never finishes must not hold the budget forever.
    let node = start_node(64 << 20, |c| {
        c.buffer_budget = 1 << 20;
        c.budget_wait_ms = 100;
    })
    .await;
    let layout = minilm_layout(DType::BF16, 16);
    let raw = &kv_blocks(&kv_sample_bytes(DType::BF16), layout, 1, 0, 0)[0];
    let b = EncodedBlock::encode(BlockKey(NS), layout, Codec::None, raw).expect("encode");
    let mut c = KvCacheClient::connect(node.endpoint())
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut first = chunks(key(1), &b, b.header.to_proto(), 2);
    tx.send(first.remove(0)).await.expect("send");
    let mut c2 = c.clone();
    let hanging = tokio::spawn(async move {
        c2.put(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Each block charges its payload as it arrives (~288 KiB); several in parallel exceed 1 MiB.
    let mut tasks = Vec::new();
    for i in 0..6u8 {
        let mut c = c.clone();
        let msgs = chunks(key(20 + i), &b, b.header.to_proto(), 1);
        tasks.push(tokio::spawn(async move { put(&mut c, msgs).await }));
    }
    for t in tasks {
        if let Err(s) = t.await.expect("task") {
            assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
            assert!(s.message().contains("retry"), "{}", s.message());
        }
    }
    drop(tx); // the hanging upload ends mid-block
    let r = hanging.await.expect("join");
    assert_eq!(r.expect_err("partial").code(), Code::InvalidArgument);
    // Budget is free again.
    let r = put(&mut c, chunks(key(99), &b, b.header.to_proto(), 1))
        .await
        .expect("put after");
    assert_eq!(r.outcomes.len(), 1);
    node.shutdown(Duration::from_secs(5))
        .await
        .expect("shutdown");
}

//! The bulk transport against real `kvshared` processes: clients move Get and Put bytes over
//! it (large blocks in several frames too), fall back to gRPC when a node has none, and hostile
//! bytes on the bulk port get a clear error and harm nothing.

use std::path::Path;
use std::time::Duration;

use kvshare_client::{ClientOptions, KvClient, PutItem, encode_prefix};
use kvshare_core::{BlockKey, Codec, DType, KvLayout, Namespace};
use kvshare_proto::bulk::{self, Kind};
use kvshare_proto::rpc::RpcStatus;
use kvshare_proto::v1 as pb;
use kvshare_testkit::{NodeProcess, free_port, metric};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_kvshared");

fn start(id: &str, extra: &[&str]) -> NodeProcess {
    let node = NodeProcess::start(
        Path::new(BIN),
        id,
        free_port().expect("port"),
        free_port().expect("port"),
        &[],
        extra,
    );
    node.wait_ready(Duration::from_secs(20)).expect("ready");
    node
}

/// `tokens_per_block` tokens of `bytes_per_token` bytes each (u8 elements, one layer; K and V
/// of `bytes_per_token / 2` bytes each, split into heads of at most 4,096 elements).
fn layout(tokens_per_block: u32, bytes_per_token: u32) -> KvLayout {
    let per_tensor = bytes_per_token / 2;
    let head_dim = (1..=4096)
        .rev()
        .find(|d| per_tensor.is_multiple_of(*d))
        .unwrap_or(1);
    KvLayout {
        num_layers: 1,
        num_kv_heads: per_tensor / head_dim,
        head_dim,
        dtype: DType::U8,
        tokens_per_block,
    }
}

fn items(
    ns: &Namespace,
    blocks: usize,
    block_bytes: usize,
    seed: u8,
) -> (Vec<BlockKey>, Vec<PutItem>) {
    let tokens: Vec<u32> = (0..(blocks * ns.tokens_per_block()) as u32)
        .map(|i| i + u32::from(seed) * 1_000_000)
        .collect();
    let keys = ns.block_keys(&tokens).expect("keys");
    let raw: Vec<Vec<u8>> = (0..blocks)
        .map(|b| {
            (0..block_bytes)
                .map(|i| (i.wrapping_mul(31) ^ b ^ usize::from(seed)) as u8)
                .collect()
        })
        .collect();
    let items = encode_prefix(ns, &keys, &raw, Codec::Lz4).expect("encode");
    (keys, items)
}

async fn client(endpoint: &str, bulk: bool) -> KvClient {
    let opts = ClientOptions {
        bulk,
        timeout: Duration::from_secs(20),
        ..Default::default()
    };
    KvClient::connect(endpoint, opts).await.expect("connect")
}

fn bulk_requests(node: &NodeProcess, method: &str) -> f64 {
    let (_, body) = node.http_get("/metrics").expect("metrics");
    metric(
        &body,
        &format!("kvshare_bulk_requests_total{{method=\"{method}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_move_blocks_over_the_bulk_transport_or_grpc_alike() {
    let node = start("bulk-on", &[]);
    let off = start("bulk-off", &["--bulk-addr", "off"]);
    let mut c = client(&node.endpoint(), true).await;
    let info = c.cluster_info().await.expect("info");
    assert_ne!(info.bulk_port, 0, "a node announces its bulk port");
    assert_eq!(
        client(&off.endpoint(), true)
            .await
            .cluster_info()
            .await
            .expect("info")
            .bulk_port,
        0
    );

    // Small blocks, and blocks above the node's 16 MiB Get frame (sent in several frames).
    for (blocks, bytes, tpb) in [(8usize, 300_000usize, 4u32), (2, 20 << 20, 2)] {
        let ns = Namespace::new(format!("bulk-{bytes}"), layout(tpb, (bytes as u32) / tpb));
        for (ep, bulk, seed) in [
            (node.endpoint(), true, 1u8),
            (node.endpoint(), false, 2),
            (off.endpoint(), true, 3),
        ] {
            let mut c = client(&ep, bulk).await;
            let (keys, put) = items(&ns, blocks, bytes, seed);
            let want: Vec<_> = put.iter().map(|p| p.block.clone()).collect();
            let report = c.put_blocks(put).await.expect("put");
            assert_eq!(report.stored(), blocks, "{ep} bulk={bulk}");
            let got = c.get_blocks(&ns.digest(), &keys).await.expect("get");
            for (g, w) in got.iter().zip(&want) {
                let g = g.as_ref().expect("stored block comes back");
                assert_eq!(g.header, w.header);
                assert_eq!(g.payload, w.payload);
                assert_eq!(g.decode().expect("decodes"), w.decode().expect("decodes"));
            }
            // A missing key is reported missing, never skipped.
            let mut with_missing = keys.clone();
            with_missing.insert(1, BlockKey([0xee; 32]));
            let got = c
                .get_blocks(&ns.digest(), &with_missing)
                .await
                .expect("get");
            assert!(got[0].is_some() && got[1].is_none() && got[2].is_some());
        }
    }
    assert!(
        bulk_requests(&node, "get") >= 4.0,
        "gets went over the bulk transport"
    );
    assert!(
        bulk_requests(&node, "put") >= 2.0,
        "puts went over the bulk transport"
    );
    assert_eq!(bulk_requests(&off, "get"), 0.0);

    // A rejected block over the bulk transport: the same outcome-carrying error as gRPC, and
    // the connection carries the next request.
    let ns = Namespace::new("bulk-reject", layout(4, 128));
    let (keys, mut put) = items(&ns, 2, 512, 9);
    put[1].block.header.checksum ^= 1;
    put[1].block.header.payload_checksum = None;
    let e = c.put_blocks(put).await.expect_err("corrupt block refused");
    match &e {
        kvshare_client::ClientError::Rejected {
            index, outcomes, ..
        } => {
            assert_eq!(*index, 1, "{e}");
            assert_eq!(outcomes.len(), 2);
        }
        other => panic!("expected Rejected, got {other}"),
    }
    let got = c.get_blocks(&ns.digest(), &keys).await.expect("get");
    assert!(got[0].is_some() && got[1].is_none());
}

/// A raw bulk connection to `node`, opened with `open` (None: nothing sent yet).
async fn raw(port: u16, open: Option<pb::BulkOpen>) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    if let Some(o) = open {
        bulk::write_magic(&mut s).await.expect("magic");
        bulk::write_frame(&mut s, Kind::Open, &o.encode_to_vec(), &[])
            .await
            .expect("open");
        let p = bulk::read_prefix(&mut s)
            .await
            .expect("answer")
            .expect("frame");
        assert_eq!(p.kind, Kind::Done, "the node admits the connection");
        bulk::read_bytes(&mut s, p.head_len as usize)
            .await
            .expect("head");
    }
    s
}

/// The node's next answer on `s`: `Ok(kind)`, or the status of an Error frame.
async fn answer(s: &mut TcpStream) -> Result<Kind, (Code, String)> {
    let read = async {
        let p = bulk::read_prefix(s).await.ok()??;
        let head = bulk::read_bytes(s, p.head_len as usize).await.ok()?;
        bulk::skip(s, p.data_len).await.ok()?;
        Some((p.kind, head))
    };
    match tokio::time::timeout(Duration::from_secs(15), read).await {
        Ok(Some((Kind::Error, head))) => {
            let st = RpcStatus::decode(head).expect("google.rpc.Status");
            Err((Code::from_i32(st.code), st.message))
        }
        Ok(Some((k, _))) => Ok(k),
        Ok(None) => Err((Code::Unavailable, "closed".into())),
        Err(_) => Err((Code::DeadlineExceeded, "no answer".into())),
    }
}

fn put_head(key: u8, payload_len: u64) -> Vec<u8> {
    let header = pb::BlockHeader {
        namespace: vec![7u8; 32].into(),
        layout: Some(pb::KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 8,
            dtype: pb::DType::DtypeU8 as i32,
            tokens_per_block: 4,
        }),
        codec: pb::Codec::None as i32,
        raw_len: payload_len,
        checksum: 0,
        payload_len,
        payload_checksum: None,
    };
    pb::PutRequest {
        key: vec![key; 32].into(),
        header: Some(header),
        data: Default::default(),
        parent_key: Default::default(),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bulk_input_gets_clear_errors_and_harms_nothing() {
    let node = start(
        "bulk-hostile",
        &[
            "--handshake-timeout-ms",
            "500",
            "--stream-idle-timeout-ms",
            "1000",
        ],
    );
    let mut c = client(&node.endpoint(), true).await;
    let port = u16::try_from(c.cluster_info().await.expect("info").bulk_port).expect("port");
    let open = || Some(pb::BulkOpen::default());

    // Not the bulk protocol at all.
    let mut s = raw(port, None).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let (code, msg) = answer(&mut s).await.expect_err("refused");
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains("not a kvshare bulk-transport connection"),
        "{msg}"
    );

    // Silence: closed after the handshake timeout.
    let mut s = raw(port, None).await;
    let (code, msg) = answer(&mut s).await.expect_err("timed out");
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");

    // A request before Open.
    let mut s = raw(port, None).await;
    bulk::write_magic(&mut s).await.expect("magic");
    bulk::write_frame(&mut s, Kind::Get, b"", &[])
        .await
        .expect("frame");
    let (code, msg) = answer(&mut s).await.expect_err("refused");
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("first frame must be an Open"), "{msg}");

    // An unknown frame kind; a head over the limit; a head that is not a GetRequest.
    for prefix in [
        [99u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        bulk::Prefix {
            kind: Kind::Get,
            head_len: bulk::MAX_HEAD_BYTES,
            data_len: 0,
        }
        .encode(),
    ] {
        let mut s = raw(port, open()).await;
        let mut p = prefix;
        if p[0] == Kind::Get as u8 {
            p[1..5].copy_from_slice(&(bulk::MAX_HEAD_BYTES + 1).to_le_bytes());
        }
        s.write_all(&p).await.expect("send");
        let (code, msg) = answer(&mut s).await.expect_err("refused");
        assert_eq!(code, Code::InvalidArgument, "{msg}");
    }
    let mut s = raw(port, open()).await;
    bulk::write_frame(&mut s, Kind::Get, &[0xff; 40], &[])
        .await
        .expect("frame");
    let (code, msg) = answer(&mut s).await.expect_err("refused");
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("not a GetRequest"), "{msg}");

    // A Get with a key of the wrong length: refused, and the connection carries on.
    let mut s = raw(port, open()).await;
    let bad = pb::GetRequest {
        namespace: vec![1u8; 32].into(),
        keys: vec![vec![2u8; 31].into()],
        packed_keys: Default::default(),
    };
    bulk::write_frame(&mut s, Kind::Get, &bad.encode_to_vec(), &[])
        .await
        .expect("frame");
    let (code, msg) = answer(&mut s).await.expect_err("refused");
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    let good = pb::GetRequest {
        namespace: vec![1u8; 32].into(),
        keys: vec![vec![2u8; 32].into()],
        packed_keys: Default::default(),
    };
    bulk::write_frame(&mut s, Kind::Get, &good.encode_to_vec(), &[])
        .await
        .expect("frame");
    assert_eq!(answer(&mut s).await, Ok(Kind::GetChunk), "the miss");
    assert_eq!(answer(&mut s).await, Ok(Kind::Done));

    // A block that claims a terabyte: refused before anything is buffered.
    let mut s = raw(port, open()).await;
    bulk::write_frame(&mut s, Kind::PutChunk, &put_head(1, 1 << 40), &[])
        .await
        .expect("frame");
    let (code, msg) = answer(&mut s).await.expect_err("refused");
    assert!(
        matches!(code, Code::InvalidArgument | Code::ResourceExhausted)
            && msg.contains("1099511627776"),
        "{code:?} {msg}"
    );

    // More data than the block announced.
    let mut s = raw(port, open()).await;
    bulk::write_frame(&mut s, Kind::PutChunk, &put_head(2, 1000), &[0u8; 2000])
        .await
        .expect("frame");
    let (code, msg) = answer(&mut s).await.expect_err("refused");
    assert_eq!(code, Code::InvalidArgument);
    assert!(msg.contains("more than header.payload_len"), "{msg}");

    // Half a block, then the client goes quiet: the upload times out, nothing is stored.
    let mut s = raw(port, open()).await;
    let head = put_head(3, 100_000);
    let prefix = bulk::Prefix {
        kind: Kind::PutChunk,
        head_len: head.len() as u32,
        data_len: 100_000,
    };
    s.write_all(&prefix.encode()).await.expect("prefix");
    s.write_all(&head).await.expect("head");
    s.write_all(&[0u8; 50_000]).await.expect("half");
    let (code, msg) = answer(&mut s).await.expect_err("timed out");
    assert_eq!(code, Code::DeadlineExceeded, "{msg}");

    // Half a block, then the connection closes.
    let mut s = raw(port, open()).await;
    s.write_all(&prefix.encode()).await.expect("prefix");
    s.write_all(&head).await.expect("head");
    s.write_all(&[0u8; 50_000]).await.expect("half");
    drop(s);

    // The node is fine: nothing of the above was stored, and clients still work.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = c.stats().await.expect("stats");
    assert_eq!(stats.stored_blocks, 0, "no partial or refused block stored");
    let ns = Namespace::new("after", layout(4, 128));
    let (keys, put) = items(&ns, 3, 512, 5);
    assert_eq!(c.put_blocks(put).await.expect("put").stored(), 3);
    let got = c.get_blocks(&ns.digest(), &keys).await.expect("get");
    assert!(got.iter().all(Option::is_some));
    let (_, body) = node.http_get("/metrics").expect("metrics");
    assert!(
        metric(&body, "kvshare_bulk_connections").is_some(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_connections_are_admitted_like_grpc_calls() {
    let dir = tempfile::tempdir().expect("dir");
    let auth = dir.path().join("auth.toml");
    let sha = |t: &str| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(t.as_bytes()))
    };
    std::fs::write(
        &auth,
        format!(
            "[tenants.a]\n[[tokens]]\nrole = \"reader\"\ntenant = \"a\"\nsha256 = \"{}\"\n",
            sha("reader-a")
        ),
    )
    .expect("auth file");
    let node = start("bulk-auth", &["--auth-file", auth.to_str().expect("utf-8")]);
    let mut c = KvClient::connect(
        &node.endpoint(),
        ClientOptions {
            token: Some("reader-a".into()),
            ..Default::default()
        },
    )
    .await
    .expect("connect");
    let port = u16::try_from(c.cluster_info().await.expect("info").bulk_port).expect("port");

    // No token, an unknown token: UNAUTHENTICATED at Open.
    for authorization in ["", "Bearer guess"] {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        bulk::write_magic(&mut s).await.expect("magic");
        let open = pb::BulkOpen {
            authorization: authorization.into(),
            no_forward: false,
        };
        bulk::write_frame(&mut s, Kind::Open, &open.encode_to_vec(), &[])
            .await
            .expect("open");
        let (code, msg) = answer(&mut s).await.expect_err("refused");
        assert_eq!(code, Code::Unauthenticated, "{msg}");
    }
    // A reader: Get over the bulk transport, Put refused with the role it needs; the
    // connection carries on.
    let ns = Namespace::new("m", layout(4, 128));
    let (keys, put) = items(&ns, 2, 512, 1);
    let e = c.put_blocks(put).await.expect_err("reader cannot put");
    assert_eq!(e.code(), Some(Code::PermissionDenied), "{e}");
    assert!(e.to_string().contains("writer or admin"), "{e}");
    let got = c.get_blocks(&ns.digest(), &keys).await.expect("get");
    assert!(got.iter().all(Option::is_none));
    assert!(bulk_requests(&node, "get") >= 1.0);
    assert!(bulk_requests(&node, "put") >= 1.0);
}

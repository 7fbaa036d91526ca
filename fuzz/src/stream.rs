//! `get_stream`: the Get-side chunk-stream state machine (`wire::GetAssembler`).

use arbitrary::Unstructured;
use bytes::Bytes;
use kvshare_core::wire::{GetAssembler, get_chunks};
use kvshare_core::{BlockHeader, BlockKey, CoreError, EncodedBlock};
use kvshare_proto::v1 as pb;
use prost::Message;

use crate::inputs;

/// Input: one mode byte. Even: hostile, a key count byte then length-delimited protobuf
/// `GetResponse` messages (an empty `key` is replaced by the expected key of its index, so the
/// fuzzer gets past the key check). Odd: `arbitrary` bytes describing valid blocks and a chunk
/// size, whose stream must reassemble exactly, and fail once one message is dropped or doubled.
pub fn check_get_stream(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        hostile(rest);
    } else {
        let _ = valid(&mut Unstructured::new(rest));
    }
}

/// Parses `rest` as a key count and length-delimited messages (see [`check_get_stream`]).
pub fn hostile_messages(rest: &[u8]) -> Option<(Vec<BlockKey>, Vec<pb::GetResponse>)> {
    let (&n, mut buf) = rest.split_first()?;
    let keys = inputs::stream_keys(usize::from(n % 8));
    let mut msgs = Vec::new();
    while !buf.is_empty() {
        let Ok(mut m) = pb::GetResponse::decode_length_delimited(&mut buf) else {
            break;
        };
        if m.key.is_empty()
            && let Some(k) = keys.get(m.index as usize)
        {
            m.key = Bytes::copy_from_slice(&k.0);
        }
        msgs.push(m);
    }
    Some((keys, msgs))
}

/// The bytes [`hostile_messages`] parses back to `msgs` (seed corpus).
pub fn encode_hostile(nkeys: u8, msgs: &[pb::GetResponse]) -> Vec<u8> {
    let mut out = vec![0, nkeys];
    for m in msgs {
        m.encode_length_delimited(&mut out)
            .expect("a Vec grows as needed");
    }
    out
}

fn hostile(rest: &[u8]) {
    let Some((keys, msgs)) = hostile_messages(rest) else {
        return;
    };
    let mut a = GetAssembler::new(&keys);
    let mut failed = false;
    // Keep pushing after an error: the assembler must not panic on any call order either.
    for m in msgs {
        failed |= a.push(m).is_err();
    }
    let Ok(out) = a.finish() else { return };
    if failed {
        return;
    }
    assert_eq!(out.len(), keys.len());
    for b in out.iter().flatten() {
        assert_eq!(b.payload.len() as u64, b.header.payload_len);
        assert_eq!(BlockHeader::from_proto(&b.header.to_proto()), Ok(b.header));
    }
}

fn push_all(
    keys: &[BlockKey],
    msgs: &[pb::GetResponse],
) -> Result<Vec<Option<EncodedBlock>>, CoreError> {
    let mut a = GetAssembler::new(keys);
    for m in msgs {
        a.push(m.clone())?;
    }
    a.finish()
}

fn valid(u: &mut Unstructured) -> arbitrary::Result<()> {
    let blocks = inputs::blocks(u, 4)?;
    // Any chunk size, but at most about 32 chunks per block: one-byte chunks of a 24 KiB block
    // test nothing more than 32 chunks do, at a thousand times the cost.
    let largest = blocks
        .iter()
        .filter_map(|(_, b)| b.as_ref().map(|(e, _)| e.payload.len()))
        .max()
        .unwrap_or(0);
    let chunk = u.int_in_range(0usize..=4096)?.max(largest.div_ceil(32));
    let keys: Vec<BlockKey> = blocks.iter().map(|(k, _)| *k).collect();
    let mut msgs = Vec::new();
    for (i, (key, b)) in blocks.iter().enumerate() {
        msgs.extend(get_chunks(i as u32, key, b.as_ref().map(|(e, _)| e), chunk));
    }
    let out = push_all(&keys, &msgs).expect("a valid stream reassembles");
    assert_eq!(out.len(), blocks.len());
    for (got, (_, want)) in out.iter().zip(&blocks) {
        assert_eq!(got.as_ref(), want.as_ref().map(|(e, _)| e));
        if let (Some(got), Some((_, raw))) = (got, want) {
            assert_eq!(
                &got.decode().expect("a reassembled block decodes")[..],
                &raw[..]
            );
        }
    }
    if msgs.is_empty() {
        return Ok(());
    }
    // Every message carries a block index or payload bytes the next one depends on: a stream
    // with one message dropped or sent twice must be refused.
    let i = u.choose_index(msgs.len())?;
    let mut dropped = msgs.clone();
    dropped.remove(i);
    assert!(push_all(&keys, &dropped).is_err(), "message {i} dropped");
    let mut doubled = msgs.clone();
    doubled.insert(i, msgs[i].clone());
    assert!(push_all(&keys, &doubled).is_err(), "message {i} doubled");
    Ok(())
}

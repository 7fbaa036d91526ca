//! Moving blocks over the `kvshare.v1` messages: cutting a block into upload or download chunks,
//! and reassembling a `Get` stream. Shared by the server (which forwards to peers) and the
//! client, so both speak the chunking rules identically.

use bytes::{Bytes, BytesMut};
use kvshare_proto::v1 as pb;

use crate::block::{BlockHeader, EncodedBlock};
use crate::error::CoreError;
use crate::keys::BlockKey;

/// Byte ranges `[start, end)` of chunks of at most `chunk` bytes covering `len` bytes (one empty
/// range for an empty payload).
fn ranges(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    let n = len.div_ceil(chunk).max(1);
    (0..n).map(move |i| (i * chunk, ((i + 1) * chunk).min(len)))
}

/// Upload messages for one block: the header on the first chunk, payload slices (no copies).
pub fn put_chunks(
    key: &BlockKey,
    parent: Option<&BlockKey>,
    block: &EncodedBlock,
    chunk: usize,
) -> Vec<pb::PutRequest> {
    let key_bytes = Bytes::copy_from_slice(&key.0);
    ranges(block.payload.len(), chunk)
        .map(|(start, end)| pb::PutRequest {
            key: key_bytes.clone(),
            header: (start == 0).then(|| block.header.to_proto()),
            data: block.payload.slice(start..end),
            parent_key: match (start, parent) {
                (0, Some(p)) => Bytes::copy_from_slice(&p.0),
                _ => Bytes::new(),
            },
        })
        .collect()
}

/// Download messages for the block at `index` of a Get; `None` reports a missing key. Payload
/// slices share the stored buffer, so a block evicted mid-stream stays alive until sent.
pub fn get_chunks(
    index: u32,
    key: &BlockKey,
    block: Option<&EncodedBlock>,
    chunk: usize,
) -> Vec<pb::GetResponse> {
    let key_bytes = Bytes::copy_from_slice(&key.0);
    let Some(block) = block else {
        return vec![pb::GetResponse {
            index,
            key: key_bytes,
            found: false,
            ..Default::default()
        }];
    };
    let len = block.payload.len();
    ranges(len, chunk)
        .map(|(start, end)| pb::GetResponse {
            index,
            key: key_bytes.clone(),
            found: true,
            header: (start == 0).then(|| block.header.to_proto()),
            offset: start as u64,
            data: block.payload.slice(start..end),
            last: end == len,
        })
        .collect()
}

/// Reassembles the messages of a Get stream into one entry per requested key.
pub struct GetAssembler<'a> {
    keys: &'a [BlockKey],
    out: Vec<Option<EncodedBlock>>,
    /// The block being received: its header and the payload so far.
    cur: Option<(BlockHeader, BytesMut)>,
    /// Whether a block that arrives in one message keeps that message's buffer (see
    /// [`GetAssembler::sharing`]).
    share_single: bool,
}

impl<'a> GetAssembler<'a> {
    /// An assembler for a Get of `keys` that copies every payload into a buffer of its own, so
    /// a held block pins exactly its payload (what a node that accounts memory needs).
    pub fn new(keys: &'a [BlockKey]) -> Self {
        GetAssembler {
            keys,
            out: Vec::with_capacity(keys.len()),
            cur: None,
            share_single: false,
        }
    }

    /// An assembler for a client that uses each block and drops it: a block that arrives in one
    /// message keeps that message's bytes without a copy (it may pin the receive buffer it was
    /// decoded from until dropped); blocks of several chunks are reassembled as with
    /// [`GetAssembler::new`].
    pub fn sharing(keys: &'a [BlockKey]) -> Self {
        GetAssembler {
            share_single: true,
            ..GetAssembler::new(keys)
        }
    }

    /// Consumes the next message. Errors name the index and what was wrong.
    pub fn push(&mut self, msg: pb::GetResponse) -> Result<(), CoreError> {
        let idx = msg.index as usize;
        let protocol = |m: String| CoreError::Corrupt(format!("get stream: {m}"));
        if idx != self.out.len()
            || idx >= self.keys.len()
            || msg.key.as_ref() != self.keys[idx].0.as_slice()
        {
            return Err(protocol(format!(
                "chunk for index {idx} while expecting block {} of {}",
                self.out.len(),
                self.keys.len()
            )));
        }
        if !msg.found {
            if self.cur.is_some() {
                return Err(protocol(format!("block {idx} reported missing mid-block")));
            }
            self.out.push(None);
            return Ok(());
        }
        let (header, mut buf) = match self.cur.take() {
            Some(c) => c,
            None => {
                let h = msg
                    .header
                    .as_ref()
                    .ok_or_else(|| protocol(format!("first chunk of block {idx} has no header")))?;
                let header = BlockHeader::from_proto(h)?;
                if self.share_single
                    && msg.last
                    && msg.offset == 0
                    && msg.data.len() as u64 == header.payload_len
                {
                    self.out.push(Some(EncodedBlock {
                        header,
                        payload: msg.data,
                    }));
                    return Ok(());
                }
                // The header bounds payload_len (at most the codec bound of a block of at most
                // 1 GiB), so reserving it is safe; pages become resident as bytes arrive.
                (header, BytesMut::with_capacity(header.payload_len as usize))
            }
        };
        let got = buf.len() as u64;
        if msg.offset != got {
            return Err(protocol(format!(
                "block {idx}: chunk at offset {} after {got} bytes",
                msg.offset
            )));
        }
        if got + msg.data.len() as u64 > header.payload_len {
            return Err(protocol(format!(
                "block {idx}: more than payload_len {} bytes",
                header.payload_len
            )));
        }
        // Copied out, so the message's receive buffer (often larger than the message: a
        // slice would pin all of it for the block's lifetime) is released at once.
        buf.extend_from_slice(&msg.data);
        if msg.last {
            if buf.len() as u64 != header.payload_len {
                return Err(protocol(format!(
                    "block {idx}: {} payload bytes, header says {}",
                    buf.len(),
                    header.payload_len
                )));
            }
            self.out.push(Some(EncodedBlock {
                header,
                payload: buf.freeze(),
            }));
        } else {
            self.cur = Some((header, buf));
        }
        Ok(())
    }

    /// The blocks, once every key has been answered.
    pub fn finish(self) -> Result<Vec<Option<EncodedBlock>>, CoreError> {
        if self.out.len() != self.keys.len() || self.cur.is_some() {
            return Err(CoreError::Corrupt(format!(
                "get stream ended after {} of {} blocks",
                self.out.len(),
                self.keys.len()
            )));
        }
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::layout::{DType, KvLayout};

    /// A raw block of the bytes 0..100.
    fn hundred_byte_block() -> EncodedBlock {
        let layout = KvLayout {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 50,
            dtype: DType::U8,
            tokens_per_block: 1,
        };
        let raw: Vec<u8> = (0..100).collect();
        EncodedBlock::encode(BlockKey([1; 32]), layout, Codec::None, &raw).expect("enc")
    }

    #[test]
    fn chunks_reassemble() {
        let b = hundred_byte_block();
        let keys = [BlockKey([2; 32]), BlockKey([3; 32])];
        let put = put_chunks(&keys[0], Some(&keys[1]), &b, 30);
        assert_eq!(put.len(), 4);
        assert!(put[0].header.is_some() && put[1].header.is_none());
        assert_eq!(put[0].parent_key.len(), 32);
        let mut a = GetAssembler::new(&keys);
        for m in get_chunks(0, &keys[0], Some(&b), 30) {
            a.push(m).expect("push");
        }
        for m in get_chunks(1, &keys[1], None, 30) {
            a.push(m).expect("push");
        }
        let out = a.finish().expect("finish");
        assert_eq!(out[0].as_ref(), Some(&b));
        assert!(out[1].is_none());
    }

    #[test]
    fn sharing_assembler_keeps_single_message_blocks_and_reassembles_the_rest() {
        let b = hundred_byte_block();
        let keys = [BlockKey([2; 32]), BlockKey([3; 32])];
        let mut a = GetAssembler::sharing(&keys);
        let single = get_chunks(0, &keys[0], Some(&b), 1 << 20);
        assert_eq!(single.len(), 1);
        let sent = single[0].data.clone();
        a.push(single.into_iter().next().expect("one"))
            .expect("push");
        for m in get_chunks(1, &keys[1], Some(&b), 30) {
            a.push(m).expect("push");
        }
        let out = a.finish().expect("finish");
        assert_eq!(out[0].as_ref(), Some(&b));
        assert_eq!(out[1].as_ref(), Some(&b));
        // The single-message block shares the message's bytes; the chunked one was copied.
        assert_eq!(
            out[0].as_ref().map(|b| b.payload.as_ptr()),
            Some(sent.as_ptr())
        );

        // A single message that is shorter than its header says is still an error.
        let mut short = get_chunks(0, &keys[0], Some(&b), 1 << 20);
        short[0].data = short[0].data.slice(..99);
        let mut a = GetAssembler::sharing(&keys[..1]);
        assert!(a.push(short.remove(0)).is_err());
    }

    #[test]
    fn out_of_order_and_truncated_streams_are_errors() {
        let keys = [BlockKey([2; 32])];
        let mut a = GetAssembler::new(&keys);
        let bad = pb::GetResponse {
            index: 1,
            key: Bytes::from(vec![2; 32]),
            ..Default::default()
        };
        assert!(a.push(bad).is_err());
        assert!(GetAssembler::new(&keys).finish().is_err());
    }
}

//! Blocks: a self-describing header plus an encoded payload.

use bytes::Bytes;
use kvshare_proto::v1 as pb;

use crate::codec::{Codec, checksum, max_encoded_len};
use crate::error::CoreError;
use crate::keys::BlockKey;
use crate::layout::KvLayout;

/// Header stored and sent with every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Digest of the namespace the block belongs to.
    pub namespace: BlockKey,
    /// Shape of the raw data.
    pub layout: KvLayout,
    /// Payload encoding.
    pub codec: Codec,
    /// Length of the raw (decoded) bytes; equals `layout.block_bytes()`.
    pub raw_len: u64,
    /// xxh3-64 of the raw bytes.
    pub checksum: u64,
    /// Length of the encoded payload.
    pub payload_len: u64,
    /// xxh3-64 of the encoded payload, when the writer sent one: a node checks it on put
    /// instead of decoding the block. Readers always check [`BlockHeader::checksum`].
    pub payload_checksum: Option<u64>,
}

impl BlockHeader {
    /// Converts from the wire message, checking every field that can be checked without the
    /// payload: namespace length, layout, codec, and that raw_len matches the layout.
    pub fn from_proto(p: &pb::BlockHeader) -> Result<Self, CoreError> {
        let namespace = BlockKey::from_slice(&p.namespace).map_err(|_| {
            CoreError::InvalidHeader(format!(
                "header.namespace must be the 32-byte namespace digest, got {} bytes",
                p.namespace.len()
            ))
        })?;
        let layout = p
            .layout
            .as_ref()
            .ok_or_else(|| CoreError::InvalidHeader("header.layout is missing".into()))
            .and_then(KvLayout::from_proto)?;
        let codec = Codec::from_proto(p.codec)?;
        if p.raw_len != layout.block_bytes() {
            return Err(CoreError::InvalidHeader(format!(
                "header.raw_len is {} but the layout ({} layers x 2 x {} tokens x {} heads x {} dims x {} bytes) makes {}",
                p.raw_len,
                layout.num_layers,
                layout.tokens_per_block,
                layout.num_kv_heads,
                layout.head_dim,
                layout.dtype.size(),
                layout.block_bytes()
            )));
        }
        if p.payload_len == 0 {
            return Err(CoreError::InvalidHeader(
                "header.payload_len must be > 0".into(),
            ));
        }
        if p.payload_len > max_encoded_len(p.raw_len) {
            return Err(CoreError::InvalidHeader(format!(
                "header.payload_len {} is larger than any codec produces for raw_len {} (at most {})",
                p.payload_len,
                p.raw_len,
                max_encoded_len(p.raw_len)
            )));
        }
        Ok(BlockHeader {
            namespace,
            layout,
            codec,
            raw_len: p.raw_len,
            checksum: p.checksum,
            payload_len: p.payload_len,
            payload_checksum: p.payload_checksum,
        })
    }

    /// The wire message.
    pub fn to_proto(&self) -> pb::BlockHeader {
        pb::BlockHeader {
            namespace: Bytes::copy_from_slice(&self.namespace.0),
            layout: Some(self.layout.to_proto()),
            codec: self.codec.to_proto() as i32,
            raw_len: self.raw_len,
            checksum: self.checksum,
            payload_len: self.payload_len,
            payload_checksum: self.payload_checksum,
        }
    }
}

/// A block as stored and transferred: header plus encoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBlock {
    /// The header.
    pub header: BlockHeader,
    /// The encoded payload (`header.payload_len` bytes).
    pub payload: Bytes,
}

impl EncodedBlock {
    /// Encodes raw K/V bytes of one block.
    pub fn encode(
        namespace: BlockKey,
        layout: KvLayout,
        codec: Codec,
        raw: &[u8],
    ) -> Result<Self, CoreError> {
        if raw.len() as u64 != layout.block_bytes() {
            return Err(CoreError::InvalidInput(format!(
                "block has {} raw bytes but the layout needs {}",
                raw.len(),
                layout.block_bytes()
            )));
        }
        let payload = Bytes::from(codec.encode(raw, layout.dtype.size()));
        let raw_checksum = checksum(raw);
        // A raw payload is the raw bytes: one hash serves as both checksums.
        let payload_checksum = if codec == Codec::None {
            raw_checksum
        } else {
            checksum(&payload)
        };
        Ok(EncodedBlock {
            header: BlockHeader {
                namespace,
                layout,
                codec,
                raw_len: raw.len() as u64,
                checksum: raw_checksum,
                payload_len: payload.len() as u64,
                payload_checksum: Some(payload_checksum),
            },
            payload,
        })
    }

    /// Decodes the payload and verifies length and checksum. A raw (`Codec::None`) payload is
    /// verified in place and returned without a copy (the result shares the payload's buffer).
    pub fn decode(&self) -> Result<Bytes, CoreError> {
        if self.header.codec == Codec::None {
            self.verify()?;
            return Ok(self.payload.clone());
        }
        self.check_payload_len()?;
        let raw = self
            .header
            .codec
            .decode(&self.payload, self.header.raw_len as usize)?;
        let actual = checksum(&raw);
        if actual != self.header.checksum {
            return Err(CoreError::ChecksumMismatch {
                expected: self.header.checksum,
                actual,
            });
        }
        Ok(Bytes::from(raw))
    }

    /// Checks that the payload decodes to `raw_len` bytes with the header's checksum, without
    /// keeping the decoded bytes (a raw payload is hashed in place, with no copy).
    pub fn verify(&self) -> Result<(), CoreError> {
        self.check_payload_len()?;
        if self.header.codec == Codec::None {
            if self.payload.len() as u64 != self.header.raw_len {
                return Err(CoreError::Corrupt(format!(
                    "codec none: payload has {} bytes but the header says raw_len {}",
                    self.payload.len(),
                    self.header.raw_len
                )));
            }
            let actual = checksum(&self.payload);
            if actual != self.header.checksum {
                return Err(CoreError::ChecksumMismatch {
                    expected: self.header.checksum,
                    actual,
                });
            }
            return Ok(());
        }
        self.decode().map(|_| ())
    }

    /// What a node checks before storing a block: the payload length, then the payload
    /// checksum when the header carries one (a hash, ~1/20 of a decode); a block without one is
    /// fully verified ([`EncodedBlock::verify`]). Readers decode and check the raw checksum, so
    /// a block that passes here but does not decode is still never returned as valid.
    pub fn verify_payload(&self) -> Result<(), CoreError> {
        match self.header.payload_checksum {
            Some(expected) if self.header.codec != Codec::None => {
                self.check_payload_len()?;
                let actual = checksum(&self.payload);
                if actual != expected {
                    return Err(CoreError::PayloadChecksumMismatch { expected, actual });
                }
                Ok(())
            }
            // A raw payload's checksum is the raw checksum: checking it costs the same hash.
            _ => self.verify(),
        }
    }

    /// Whether [`EncodedBlock::verify_payload`] decodes the block (and so needs a raw-size
    /// buffer and CPU time worth moving off an async runtime).
    pub fn verification_decodes(&self) -> bool {
        self.header.codec != Codec::None && self.header.payload_checksum.is_none()
    }

    fn check_payload_len(&self) -> Result<(), CoreError> {
        if self.payload.len() as u64 != self.header.payload_len {
            return Err(CoreError::Corrupt(format!(
                "payload has {} bytes but header.payload_len is {}",
                self.payload.len(),
                self.header.payload_len
            )));
        }
        Ok(())
    }

    /// Compression ratio raw / encoded.
    pub fn ratio(&self) -> f64 {
        self.header.raw_len as f64 / self.header.payload_len.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DType;

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
            dtype: DType::F16,
            tokens_per_block: 4,
        }
    }

    #[test]
    fn header_round_trips_and_validates() {
        let raw: Vec<u8> = (0..layout().block_bytes())
            .map(|i| (i % 251) as u8)
            .collect();
        let b = EncodedBlock::encode(BlockKey([3; 32]), layout(), Codec::BytePlaneZstd, &raw)
            .expect("enc");
        let p = b.header.to_proto();
        assert_eq!(BlockHeader::from_proto(&p), Ok(b.header));
        assert_eq!(b.decode().expect("dec"), raw);

        let mut bad = p.clone();
        bad.raw_len += 1;
        assert!(matches!(
            BlockHeader::from_proto(&bad),
            Err(CoreError::InvalidHeader(_))
        ));
        let mut bad = p.clone();
        bad.codec = 9;
        assert_eq!(
            BlockHeader::from_proto(&bad),
            Err(CoreError::UnknownCodec(9))
        );
        let mut bad = p;
        bad.namespace = Bytes::from_static(b"short");
        assert!(BlockHeader::from_proto(&bad).is_err());
    }

    #[test]
    fn checksum_mismatch_is_reported() {
        let raw = vec![1u8; layout().block_bytes() as usize];
        let mut b =
            EncodedBlock::encode(BlockKey([3; 32]), layout(), Codec::None, &raw).expect("enc");
        b.header.checksum ^= 1;
        assert!(matches!(
            b.decode(),
            Err(CoreError::ChecksumMismatch { .. })
        ));
    }

    /// Found by the codec_decode fuzz target: verify accepted a raw block whose header
    /// payload_len disagreed with its payload (decode refused it).
    #[test]
    fn verify_checks_payload_len_like_decode() {
        let raw = vec![1u8; layout().block_bytes() as usize];
        for codec in Codec::ALL {
            let mut b =
                EncodedBlock::encode(BlockKey([3; 32]), layout(), codec, &raw).expect("enc");
            b.header.payload_len += 1;
            assert!(matches!(b.verify(), Err(CoreError::Corrupt(_))), "{codec}");
            assert!(matches!(b.decode(), Err(CoreError::Corrupt(_))), "{codec}");
        }
    }
}

//! A minimal canonical CBOR encoder (RFC 8949 §4.2.1 "core deterministic encoding"), enough to
//! reproduce vLLM's `sha256_cbor` block hash: unsigned and negative integers, byte strings, text
//! strings, arrays and null. Python's `cbor2.dumps(x, canonical=True)` produces the same bytes for
//! these types (tuples and lists both become arrays).

/// A CBOR data item of the subset kvshare needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CborValue {
    /// Unsigned integer (major type 0).
    Uint(u64),
    /// Negative integer `-1 - n` (major type 1), stored as `n`.
    NegInt(u64),
    /// Byte string (major type 2).
    Bytes(Vec<u8>),
    /// Text string (major type 3).
    Text(String),
    /// Array (major type 4).
    Array(Vec<CborValue>),
    /// `null` (simple value 22).
    Null,
}

impl CborValue {
    /// A signed integer, encoded as major type 0 or 1.
    pub fn int(v: i64) -> Self {
        if v >= 0 {
            CborValue::Uint(v as u64)
        } else {
            CborValue::NegInt((-1 - v) as u64)
        }
    }

    /// Appends the canonical encoding of `self` to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            CborValue::Uint(v) => head(out, 0, *v),
            CborValue::NegInt(v) => head(out, 1, *v),
            CborValue::Bytes(b) => {
                head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            CborValue::Text(s) => {
                head(out, 3, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            CborValue::Array(items) => {
                head(out, 4, items.len() as u64);
                for item in items {
                    item.encode_into(out);
                }
            }
            CborValue::Null => out.push(0xf6),
        }
    }

    /// The canonical encoding of `self`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Writes a major type and argument in the shortest form.
pub(crate) fn head(out: &mut Vec<u8>, major: u8, v: u64) {
    let m = major << 5;
    if v < 24 {
        out.push(m | v as u8);
    } else if v <= u64::from(u8::MAX) {
        out.extend_from_slice(&[m | 24, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        out.push(m | 25);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(m | 26);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8949_examples() {
        // Appendix A of RFC 8949.
        assert_eq!(CborValue::Uint(0).encode(), [0x00]);
        assert_eq!(CborValue::Uint(23).encode(), [0x17]);
        assert_eq!(CborValue::Uint(24).encode(), [0x18, 0x18]);
        assert_eq!(CborValue::Uint(1000).encode(), [0x19, 0x03, 0xe8]);
        assert_eq!(
            CborValue::Uint(1_000_000).encode(),
            [0x1a, 0x00, 0x0f, 0x42, 0x40]
        );
        assert_eq!(
            CborValue::Uint(1_000_000_000_000).encode(),
            [0x1b, 0x00, 0x00, 0x00, 0xe8, 0xd4, 0xa5, 0x10, 0x00]
        );
        assert_eq!(CborValue::int(-1).encode(), [0x20]);
        assert_eq!(CborValue::int(-1000).encode(), [0x39, 0x03, 0xe7]);
        assert_eq!(CborValue::Text("a".into()).encode(), [0x61, 0x61]);
        assert_eq!(
            CborValue::Bytes(vec![1, 2, 3, 4]).encode(),
            [0x44, 1, 2, 3, 4]
        );
        assert_eq!(
            CborValue::Array(vec![
                CborValue::Uint(1),
                CborValue::Array(vec![CborValue::Uint(2), CborValue::Uint(3)])
            ])
            .encode(),
            [0x82, 0x01, 0x82, 0x02, 0x03]
        );
        assert_eq!(CborValue::Null.encode(), [0xf6]);
    }
}

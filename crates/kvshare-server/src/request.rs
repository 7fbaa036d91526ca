//! Validation of what clients send: namespaces, key lists, and size bounds.

use bytes::Bytes;
use kvshare_core::BlockKey;

use crate::rejection::Rejection;

/// The 32-byte namespace digest of a request.
pub fn parse_namespace(b: &[u8]) -> Result<BlockKey, Rejection> {
    BlockKey::from_slice(b).map_err(|_| {
        Rejection::invalid(format!(
            "namespace must be the 32-byte namespace digest, got {} bytes",
            b.len()
        ))
    })
}

/// A non-empty list of at most `max` 32-byte keys.
pub fn parse_keys(keys: &[Bytes], max: usize) -> Result<Vec<BlockKey>, Rejection> {
    if keys.is_empty() {
        return Err(Rejection::invalid(
            "keys is empty: send at least one 32-byte block key",
        ));
    }
    if keys.len() > max {
        return Err(Rejection::invalid(format!(
            "{} keys in one request; the limit is {max}: split the request",
            keys.len()
        )));
    }
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            BlockKey::from_slice(k).map_err(|_| {
                Rejection::invalid(format!("keys[{i}] must be 32 bytes, got {} bytes", k.len()))
            })
        })
        .collect()
}

/// Namespace and keys of a Lookup, Get or Delete.
pub fn parse_namespaced_keys(
    namespace: &[u8],
    keys: &[Bytes],
    max: usize,
) -> Result<(BlockKey, Vec<BlockKey>), Rejection> {
    Ok((parse_namespace(namespace)?, parse_keys(keys, max)?))
}

/// The first 16 hex digits of a key: enough to name a block in a message or log line.
pub fn key_prefix(k: &BlockKey) -> String {
    k.to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(parse_keys(&[], 4).is_err());
        let k = Bytes::from(vec![1u8; 32]);
        assert_eq!(
            parse_keys(&[k.clone(), k.clone()], 4).map(|v| v.len()),
            Ok(2)
        );
        let e = parse_keys(&vec![k.clone(); 5], 4).unwrap_err();
        assert!(e.message.contains("limit is 4"), "{}", e.message);
        let e = parse_keys(&[k, Bytes::from_static(b"short")], 4).unwrap_err();
        assert!(
            e.message.contains("keys[1] must be 32 bytes"),
            "{}",
            e.message
        );
        assert!(parse_namespace(&[0u8; 31]).is_err());
    }
}

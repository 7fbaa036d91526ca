//! Validation of what clients send: namespaces, key lists, and size bounds.

use bytes::Bytes;
use kvshare_core::BlockKey;
use kvshare_core::keys::{KEY_LEN, unpack_keys};

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

/// Keys sent packed end to end (`packed_keys`): a non-empty multiple of 32 bytes, at most `max`
/// keys.
pub fn parse_packed_keys(packed: &[u8], max: usize) -> Result<Vec<BlockKey>, Rejection> {
    let n = packed.len() / KEY_LEN;
    if n > max {
        return Err(Rejection::invalid(format!(
            "{n} keys in one request; the limit is {max}: split the request"
        )));
    }
    match unpack_keys(packed) {
        Some(keys) if !keys.is_empty() => Ok(keys),
        Some(_) => Err(Rejection::invalid(
            "keys is empty: send at least one 32-byte block key",
        )),
        None => Err(Rejection::invalid(format!(
            "packed_keys must be a multiple of 32 bytes (one 32-byte key after another), got {} bytes",
            packed.len()
        ))),
    }
}

/// Namespace and keys of a Lookup, Get or Delete: the keys from `keys` or `packed_keys`, which
/// must not both be set.
pub fn parse_namespaced_keys(
    namespace: &[u8],
    keys: &[Bytes],
    packed_keys: &[u8],
    max: usize,
) -> Result<(BlockKey, Vec<BlockKey>), Rejection> {
    let namespace = parse_namespace(namespace)?;
    let keys = match (keys.is_empty(), packed_keys.is_empty()) {
        (_, true) => parse_keys(keys, max)?,
        (true, false) => parse_packed_keys(packed_keys, max)?,
        (false, false) => {
            return Err(Rejection::invalid(
                "both keys and packed_keys are set: send the keys in one of them",
            ));
        }
    };
    Ok((namespace, keys))
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

    #[test]
    fn packed_keys_are_checked_like_key_lists() {
        let ns = [7u8; 32];
        let packed: Vec<u8> = (0..3u8).flat_map(|i| [i; 32]).collect();
        let (_, keys) = parse_namespaced_keys(&ns, &[], &packed, 4).expect("packed");
        assert_eq!(
            keys,
            vec![BlockKey([0; 32]), BlockKey([1; 32]), BlockKey([2; 32])]
        );
        let e = parse_namespaced_keys(&ns, &[], &packed[..95], 4).unwrap_err();
        assert!(e.message.contains("multiple of 32"), "{}", e.message);
        let e = parse_namespaced_keys(&ns, &[], &[0u8; 32 * 5], 4).unwrap_err();
        assert!(e.message.contains("limit is 4"), "{}", e.message);
        let one = Bytes::from(vec![1u8; 32]);
        let e = parse_namespaced_keys(&ns, &[one], &packed, 4).unwrap_err();
        assert!(
            e.message.contains("both keys and packed_keys"),
            "{}",
            e.message
        );
        let e = parse_namespaced_keys(&ns, &[], &[], 4).unwrap_err();
        assert!(e.message.contains("keys is empty"), "{}", e.message);
    }
}

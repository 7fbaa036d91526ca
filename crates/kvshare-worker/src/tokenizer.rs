//! Byte-level tokenizer for the demo and the command line: one token per UTF-8 byte (ids
//! 0..=255), so any model with a vocabulary of at least 256 accepts any text. The weights are
//! random, so the point is the token ids and timings, not the generated text.

/// Token ids of `text`: its UTF-8 bytes.
pub fn encode(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Text of token ids: bytes below 256 are decoded (lossily), other ids shown as `<id>`.
pub fn decode(tokens: &[u32]) -> String {
    let mut bytes = Vec::with_capacity(tokens.len());
    let mut out = String::new();
    for &t in tokens {
        match u8::try_from(t) {
            Ok(b) => bytes.push(b),
            Err(_) => {
                out.push_str(&String::from_utf8_lossy(&bytes));
                bytes.clear();
                out.push_str(&format!("<{t}>"));
            }
        }
    }
    out.push_str(&String::from_utf8_lossy(&bytes));
    out
}

/// `n` pseudo-random token ids below `vocab` (xorshift64 seeded by `seed`): synthetic prompts
/// for benchmarks and tests, the same on every machine.
pub fn random_tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let vocab = vocab.max(1) as u64;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_and_marks_large_ids() {
        assert_eq!(encode("héllo").len(), 6);
        assert_eq!(decode(&encode("héllo")), "héllo");
        assert_eq!(decode(&[104, 105, 300, 33]), "hi<300>!");
        let r = random_tokens(1000, 3, 50);
        assert!(r.iter().all(|&t| t < 50));
        assert_eq!(r, random_tokens(1000, 3, 50));
        assert_ne!(r, random_tokens(1000, 4, 50));
    }
}

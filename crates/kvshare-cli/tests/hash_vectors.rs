//! `kvshare hash` reproduces every vLLM `sha256_cbor` vector in tests/data, and the kvshare
//! scheme's published vector.

use std::process::Command;

fn kvshare(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kvshare"))
        .args(args)
        .output()
        .expect("run kvshare");
    assert!(
        out.status.success(),
        "kvshare {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn kvshare_hash_reproduces_the_vllm_vectors() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/data/vllm-sha256-cbor.json"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let cases = v["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let tokens: Vec<String> = case["token_ids"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_u64().expect("token").to_string())
            .collect();
        let tokens = tokens.join(",");
        let seed = case["pythonhashseed"].as_str().expect("seed");
        let block = case["block_size"].as_u64().expect("block").to_string();
        let out = kvshare(&[
            "hash",
            "--scheme",
            "vllm",
            "--hash-seed",
            seed,
            "--block-tokens",
            &block,
            "--tokens",
            &tokens,
            "--json",
        ]);
        let got: serde_json::Value = serde_json::from_str(&out).expect("json output");
        assert_eq!(got["root"], case["none_hash"], "{}", case["name"]);
        assert_eq!(
            got["block_hashes"], case["block_hashes"],
            "{}",
            case["name"]
        );
    }
}

#[test]
fn kvshare_hash_text_output_and_errors() {
    let out = kvshare(&[
        "hash",
        "--scheme",
        "vllm",
        "--block-tokens",
        "16",
        "--tokens",
        &(1..=48)
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    ]);
    assert!(
        out.contains("block 2    7db7c8652c5c4a69d8f91e08e8decadf88d48c3339d35aad480a8718e6d0b0b5"),
        "{out}"
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_kvshare"))
        .args(["hash", "--tokens", "1,two,3"])
        .output()
        .expect("run");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"two\" is not a token id"));
}

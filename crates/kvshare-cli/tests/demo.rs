#![cfg(feature = "demo")]
//! The README's first command: `kvshare demo` runs an embedded 3-node cluster with inference
//! workers, reuses cached prefixes with answers identical to full prefill, and stops cleanly.

use std::process::Command;

#[test]
fn demo_runs_a_local_cluster_and_reuses_prefixes() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvshare"))
        .args([
            "demo",
            "--requests",
            "6",
            "--capacity",
            "64MiB",
            "--document-tokens",
            "512",
        ])
        .output()
        .expect("run kvshare demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("embedded cluster of 3 node(s), 2 replica(s) per block"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("/dashboard").count(), 3, "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("tokens:"))
        .expect("tokens line");
    let pct: f64 = line
        .split('(')
        .nth(1)
        .and_then(|p| p.split('%').next())
        .and_then(|p| p.parse().ok())
        .expect("hit percentage");
    assert!(pct > 20.0, "{line}");
    assert!(
        stdout.contains("6 of 6 answers identical to the no-cache run"),
        "{stdout}"
    );
    // Requests 3.. reuse their document: most of the prompt comes from the tier.
    let row3 = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("3 "))
        .expect("row of request 3");
    let cached: usize = row3
        .split_whitespace()
        .nth(4)
        .and_then(|c| c.parse().ok())
        .expect("cached column");
    assert!(cached >= 960, "{row3}");
    assert!(stdout.contains("demo finished; nodes stopped cleanly"));
}

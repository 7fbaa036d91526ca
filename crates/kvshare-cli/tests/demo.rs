//! The README's first command: `kvshare demo` runs an embedded 3-node cluster with workers,
//! reuses cached prefixes, and stops cleanly.

use std::process::Command;

#[test]
fn demo_runs_a_local_cluster_and_reuses_prefixes() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvshare"))
        .args(["demo", "--requests", "8", "--capacity", "64MiB"])
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
    assert!(stdout.contains("demo finished; nodes stopped cleanly"));
}

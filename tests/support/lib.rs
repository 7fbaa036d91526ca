//! Helpers shared by the cross-crate integration tests in `tests/`: the process and sample
//! helpers of `kvshare-testkit`, plus in-process nodes and HTTP/metrics readers.

#![warn(missing_docs)]

pub use kvshare_testkit::*;

use kvshare_server::{NodeHandle, ServerConfig};

/// Starts an in-process node on loopback with ephemeral ports.
pub async fn start_node(capacity: u64, tweak: impl FnOnce(&mut ServerConfig)) -> NodeHandle {
    let mut c = ServerConfig::local(capacity);
    c.node_id = Some("test-node".into());
    tweak(&mut c);
    kvshare_server::start(c).await.expect("node starts")
}

/// `GET path` over plain HTTP/1.0 (no client library needed); returns status code and body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect http");
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Value of a Prometheus counter/gauge line `name{labels} value` (sum over matching lines).
pub fn metric_value(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

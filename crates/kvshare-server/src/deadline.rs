//! The client's deadline (its `grpc-timeout` header), carried through everything a request does
//! so that requests forwarded to peers end before the client gives up and the node answers in
//! time with what it has.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

tokio::task_local! {
    static DEADLINE: Option<Instant>;
}

/// The deadline a request's `grpc-timeout` header sets, counted from now.
pub fn from_metadata(metadata: &MetadataMap) -> Option<Instant> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    Some(Instant::now() + parse_grpc_timeout(v)?)
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs `f` with `deadline` as the request's deadline.
pub async fn scope<F: Future>(deadline: Option<Instant>, f: F) -> F::Output {
    DEADLINE.scope(deadline, f).await
}

/// The deadline of the request being served, if its client set one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok().flatten()
}

/// How long a call made now for the current request may take: `limit`, shortened so that it
/// ends a margin (a tenth of the time left, at most 100 ms) before the client's deadline.
pub fn budget(limit: Duration) -> Duration {
    match current() {
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let margin = (left / 10).min(Duration::from_millis(100));
            limit
                .min(left.saturating_sub(margin))
                .max(Duration::from_millis(1))
        }
        None => limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("2000m"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1S"), Some(Duration::from_secs(1)));
        assert_eq!(parse_grpc_timeout("5H"), Some(Duration::from_secs(18_000)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("12x"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
    }

    #[tokio::test]
    async fn budget_leaves_a_margin_before_the_deadline() {
        let limit = Duration::from_secs(5);
        assert_eq!(budget(limit), limit);
        let d = Instant::now() + Duration::from_secs(2);
        let b = scope(Some(d), async { budget(limit) }).await;
        assert!(b <= Duration::from_millis(1_900) && b > Duration::from_millis(1_500));
    }
}

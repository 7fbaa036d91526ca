//! The node's capacity: `--capacity auto` (derived from the container's cgroup memory limit),
//! the sanity limit on any capacity, and changes at run time (the `SetCapacity` RPC).
//!
//! A run-time change applies to this node only and lasts until it restarts; there is no
//! configuration reload (SIGHUP is not used for capacity). Shrinking evicts down to the new cap
//! (see [`BlockStore::set_capacity`](kvshare_core::BlockStore::set_capacity)), then hands the
//! freed memory back to the operating system with glibc's `malloc_trim`.
//!
//! The same trim keeps the memory contract under churn ([`keep_resident_memory_bounded`]):
//! when every put evicts a block, freed blocks sit in the allocator's free lists, spread over
//! the arenas of the threads that allocated them, and stay resident; once a second the node
//! compares its resident memory with what it holds and trims when the difference has grown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvshare_core::size::format_size;
use kvshare_proto::v1 as pb;
use tokio::sync::watch;
use tonic::Status;
use tracing::{debug, info};

use crate::rejection::Rejection;
use crate::state::NodeState;

/// Largest capacity a node accepts (64 TiB), at start or at run time: far above any machine's
/// memory, so a larger value is a mistake (a unit typo, or "no limit" read as a number).
pub const MAX_CAPACITY_BYTES: u64 = 64 << 40;

/// Memory `--capacity auto` leaves for the process beyond the store and the buffer budget
/// (256 MiB): code, thread stacks, the tokio runtime, HTTP/2 windows and send buffers, and the
/// allocator's free lists (the "fixed overhead" of the memory contract in docs/design.md). The
/// Kubernetes sizing rule uses the same figure: memory limit = capacity + buffer budget + this.
pub const RUNTIME_HEADROOM_BYTES: u64 = 256 << 20;

/// The memory limit of this container under cgroup v2.
pub const CGROUP_V2_MEMORY_MAX: &str = "/sys/fs/cgroup/memory.max";

/// The memory limit of this container under cgroup v1.
pub const CGROUP_V1_MEMORY_LIMIT: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";

/// Why `--capacity auto` could not derive a capacity.
#[derive(Debug, thiserror::Error)]
pub enum CapacityError {
    /// Neither cgroup file exists.
    #[error(
        "--capacity auto: no cgroup memory limit found (neither {v2} nor {v1} exists); \
         set --capacity (KVSHARE_CAPACITY) to a size, e.g. 4GiB"
    )]
    NoCgroup {
        /// The cgroup v2 file looked for.
        v2: PathBuf,
        /// The cgroup v1 file looked for.
        v1: PathBuf,
    },
    /// The cgroup file could not be read.
    #[error("--capacity auto: cannot read {path}: {source}; set --capacity to a size instead")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The cgroup file holds something other than a number or `max`.
    #[error(
        "--capacity auto: {path} holds {contents:?}, not a byte count or \"max\"; \
         set --capacity to a size instead"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What it holds (trimmed).
        contents: String,
    },
    /// The container has no memory limit.
    #[error(
        "--capacity auto: this container has no memory limit ({path} says {contents:?}), so \
         there is nothing to derive the capacity from; set a memory limit on the container or \
         set --capacity (KVSHARE_CAPACITY) to a size, e.g. 4GiB"
    )]
    Unlimited {
        /// The file.
        path: PathBuf,
        /// What it holds (trimmed).
        contents: String,
    },
    /// The limit leaves no room for a store.
    #[error(
        "--capacity auto: the memory limit {limit} ({path}) leaves no room for a store after \
         the buffer budget {budget} and {headroom} of runtime headroom; raise the memory limit \
         above {needed}, lower --buffer-budget, or set --capacity to a size",
        limit = format_size(*limit),
        path = path.display(),
        budget = format_size(*budget),
        headroom = format_size(RUNTIME_HEADROOM_BYTES),
        needed = format_size(budget.saturating_add(RUNTIME_HEADROOM_BYTES)),
    )]
    TooSmall {
        /// The memory limit, bytes.
        limit: u64,
        /// The file it came from.
        path: PathBuf,
        /// The buffer budget, bytes.
        budget: u64,
    },
}

/// What a cgroup memory limit file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// A limit, bytes.
    Bytes(u64),
    /// No limit.
    Unlimited,
}

/// A cgroup memory limit file's contents, or `None` when it is neither a byte count nor `max`.
/// `max` (cgroup v2) means no limit; so does a huge number (cgroup v1 reports about 2^63 for
/// an unlimited group): anything above [`MAX_CAPACITY_BYTES`].
pub fn parse_cgroup_memory_limit(contents: &str) -> Option<MemoryLimit> {
    let s = contents.trim();
    if s == "max" {
        return Some(MemoryLimit::Unlimited);
    }
    let n: u64 = s.parse().ok()?;
    Some(if n <= MAX_CAPACITY_BYTES {
        MemoryLimit::Bytes(n)
    } else {
        MemoryLimit::Unlimited
    })
}

/// The container's memory limit in bytes and the file it was read from: `v2` (cgroup v2's
/// `memory.max`) if it exists, else `v1` (cgroup v1's `memory.limit_in_bytes`).
pub fn cgroup_memory_limit(v2: &Path, v1: &Path) -> Result<(u64, PathBuf), CapacityError> {
    let path =
        [v2, v1]
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| CapacityError::NoCgroup {
                v2: v2.into(),
                v1: v1.into(),
            })?;
    let contents = std::fs::read_to_string(path).map_err(|source| CapacityError::Unreadable {
        path: path.into(),
        source,
    })?;
    let contents = contents.trim().to_string();
    match parse_cgroup_memory_limit(&contents) {
        Some(MemoryLimit::Bytes(limit)) => Ok((limit, path.into())),
        Some(MemoryLimit::Unlimited) => Err(CapacityError::Unlimited {
            path: path.into(),
            contents,
        }),
        None => Err(CapacityError::Malformed {
            path: path.into(),
            contents,
        }),
    }
}

/// The capacity `--capacity auto` gives under a memory limit of `limit` bytes (read from
/// `path`): the limit minus the buffer budget minus [`RUNTIME_HEADROOM_BYTES`], which must
/// leave more than 0.
pub fn auto_capacity(limit: u64, path: &Path, buffer_budget: u64) -> Result<u64, CapacityError> {
    match limit
        .checked_sub(buffer_budget)
        .and_then(|r| r.checked_sub(RUNTIME_HEADROOM_BYTES))
    {
        Some(c) if c > 0 => Ok(c),
        _ => Err(CapacityError::TooSmall {
            limit,
            path: path.into(),
            budget: buffer_budget,
        }),
    }
}

/// `--capacity auto` on this machine: reads [`CGROUP_V2_MEMORY_MAX`] or
/// [`CGROUP_V1_MEMORY_LIMIT`]; returns the capacity and the limit it came from.
pub fn auto_capacity_from_cgroup(buffer_budget: u64) -> Result<(u64, u64), CapacityError> {
    let (limit, path) = cgroup_memory_limit(
        Path::new(CGROUP_V2_MEMORY_MAX),
        Path::new(CGROUP_V1_MEMORY_LIMIT),
    )?;
    Ok((auto_capacity(limit, &path, buffer_budget)?, limit))
}

/// A capacity asked for by a `SetCapacity` request: more than 0 and at most
/// [`MAX_CAPACITY_BYTES`].
pub fn check_capacity(bytes: u64) -> Result<u64, Rejection> {
    if bytes == 0 {
        return Err(Rejection::invalid(
            "capacity_bytes is 0: give the new capacity in bytes (> 0); to empty a node, \
             delete its blocks instead",
        ));
    }
    if bytes > MAX_CAPACITY_BYTES {
        return Err(Rejection::invalid(format!(
            "capacity_bytes {bytes} is above this node's limit of {MAX_CAPACITY_BYTES} bytes ({}); \
             check the unit",
            format_size(MAX_CAPACITY_BYTES)
        )));
    }
    Ok(bytes)
}

/// Sets this node's capacity to `bytes` (already checked with [`check_capacity`]): evicts down
/// to it on a blocking thread, counts the evictions, then returns freed memory to the
/// operating system in the background.
pub async fn set_capacity(
    state: &Arc<NodeState>,
    bytes: u64,
) -> Result<pb::SetCapacityResponse, Status> {
    let store = state.store.clone();
    let t0 = Instant::now();
    let (old, evicted) = tokio::task::spawn_blocking(move || {
        let old = store.capacity();
        (old, store.set_capacity(bytes))
    })
    .await
    .map_err(|e| Status::internal(format!("changing the capacity failed: {e}")))?;
    let elapsed = t0.elapsed();
    state.metrics.evictions.inc_by(evicted);
    let stored = state.store.used_bytes();
    info!(
        old = old,
        new = bytes,
        evicted,
        stored,
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        "capacity changed"
    );
    if evicted > 0 {
        tokio::task::spawn_blocking(release_freed_memory);
    }
    Ok(pb::SetCapacityResponse {
        node_id: state.node_id.clone(),
        old_capacity_bytes: old,
        new_capacity_bytes: bytes,
        evicted_blocks: evicted,
        stored_bytes: stored,
    })
}

/// How often [`keep_resident_memory_bounded`] compares resident memory with what the node holds.
const MEMORY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Resident memory beyond the stored bytes and the buffers in use above which the allocator's
/// free pages are handed back (48 MiB, within the memory contract's fixed overhead).
pub const TRIM_ABOVE_BYTES: u64 = 48 << 20;

/// What the last trim left: resident and held bytes right after it.
#[derive(Debug, Clone, Copy, Default)]
struct AfterTrim {
    resident: u64,
    held: u64,
}

/// Whether to trim now: resident memory exceeds what the node holds (stored bytes plus buffers
/// in use) by more than [`TRIM_ABOVE_BYTES`], and since the last trim either resident memory
/// grew or the held bytes fell by half of that (so a process whose fixed part alone is above the
/// threshold, an embedded node say, is not trimmed again and again for nothing).
fn should_trim(resident: u64, held: u64, last: Option<AfterTrim>) -> bool {
    if resident.saturating_sub(held) <= TRIM_ABOVE_BYTES {
        return false;
    }
    let step = TRIM_ABOVE_BYTES / 2;
    last.is_none_or(|l| {
        resident >= l.resident.saturating_add(step) || held.saturating_add(step) <= l.held
    })
}

/// This process' resident memory in bytes (`/proc/self/statm`), where there is one.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|p| pages.saturating_mul(p))
}

/// Once a second until `shutdown`: trims the allocator (on a blocking thread) when resident
/// memory has drifted above the stored bytes plus the buffers in use (see [`should_trim`]).
/// Returns at once where `/proc/self/statm` cannot be read.
pub async fn keep_resident_memory_bounded(
    state: Arc<NodeState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(MEMORY_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let held = || {
        state
            .store
            .used_bytes()
            .saturating_add(state.budget.used_bytes())
    };
    let mut last = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|v| *v) => return,
            _ = tick.tick() => {}
        }
        let Some(resident) = resident_bytes() else {
            return;
        };
        if !should_trim(resident, held(), last) {
            continue;
        }
        if tokio::task::spawn_blocking(release_freed_memory)
            .await
            .is_err()
        {
            return;
        }
        state.metrics.allocator_trims.inc();
        let after = resident_bytes().unwrap_or(resident);
        debug!(
            before = resident,
            after,
            held = held(),
            "resident memory above what the node holds: allocator trimmed"
        );
        last = Some(AfterTrim {
            resident: after,
            held: held(),
        });
    }
}

/// Returns the allocator's free memory to the operating system (glibc's `malloc_trim(0)`, which
/// releases free pages in every arena, not only at the top of the heap). Blocking: it walks
/// every arena. Does nothing on other platforms.
pub fn release_freed_memory() {
    let t0 = Instant::now();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it takes the allocator's own locks.
    let released = unsafe { libc::malloc_trim(0) } != 0;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let released = false;
    debug!(
        released,
        elapsed_ms = t0.elapsed().as_secs_f64() * 1e3,
        "malloc_trim"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn trims_when_resident_memory_drifts_above_what_is_held() {
        // Within the allowance: never.
        assert!(!should_trim(100 * MIB, 60 * MIB, None));
        // Above it, first time: yes.
        assert!(should_trim(200 * MIB, 64 * MIB, None));
        // A trim that could not get below the allowance is not repeated for nothing...
        let last = Some(AfterTrim {
            resident: 150 * MIB,
            held: 64 * MIB,
        });
        assert!(!should_trim(160 * MIB, 64 * MIB, last));
        // ...but is once resident memory grows by half the allowance,
        assert!(should_trim(174 * MIB, 64 * MIB, last));
        // or once half the allowance of held bytes was freed (evictions, deletes).
        assert!(should_trim(150 * MIB, 40 * MIB, last));
        assert!(!should_trim(150 * MIB, 50 * MIB, last));
    }

    #[test]
    fn resident_memory_is_read_on_linux() {
        #[cfg(target_os = "linux")]
        assert!(resident_bytes().is_some_and(|b| b > MIB));
    }

    #[test]
    fn cgroup_files_parse() {
        use MemoryLimit::{Bytes, Unlimited};
        assert_eq!(parse_cgroup_memory_limit("max\n"), Some(Unlimited));
        assert_eq!(
            parse_cgroup_memory_limit("1073741824\n"),
            Some(Bytes(1 << 30))
        );
        // cgroup v1 without a limit: PAGE_COUNTER_MAX pages of 4 KiB.
        assert_eq!(
            parse_cgroup_memory_limit("9223372036854771712"),
            Some(Unlimited)
        );
        let above = (MAX_CAPACITY_BYTES + 1).to_string();
        assert_eq!(parse_cgroup_memory_limit(&above), Some(Unlimited));
        for bad in ["", "-1", "1G", "max max", "18446744073709551616"] {
            assert_eq!(parse_cgroup_memory_limit(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn auto_capacity_is_the_limit_minus_the_budget_and_headroom() {
        let p = Path::new(CGROUP_V2_MEMORY_MAX);
        assert_eq!(
            auto_capacity(4864 * MIB, p, 512 * MIB).ok(),
            Some(4096 * MIB)
        );
        for limit in [768 * MIB, 700 * MIB, 0] {
            let e = auto_capacity(limit, p, 512 * MIB).expect_err("no room");
            let msg = e.to_string();
            assert!(msg.contains("--capacity") && msg.contains("768"), "{msg}");
        }
    }

    #[test]
    fn cgroup_limit_is_read_from_v2_then_v1() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (v2, v1) = (dir.path().join("memory.max"), dir.path().join("v1"));
        let e = cgroup_memory_limit(&v2, &v1).expect_err("no files");
        assert!(matches!(e, CapacityError::NoCgroup { .. }), "{e}");
        assert!(e.to_string().contains("set --capacity"), "{e}");
        std::fs::write(&v1, "9223372036854771712\n").expect("write");
        let e = cgroup_memory_limit(&v2, &v1).expect_err("unlimited");
        assert!(matches!(e, CapacityError::Unlimited { .. }), "{e}");
        assert!(e.to_string().contains("set --capacity"), "{e}");
        std::fs::write(&v1, "2147483648\n").expect("write");
        assert_eq!(cgroup_memory_limit(&v2, &v1).expect("v1").0, 2 << 30);
        std::fs::write(&v2, "max\n").expect("write");
        assert!(matches!(
            cgroup_memory_limit(&v2, &v1),
            Err(CapacityError::Unlimited { .. })
        ));
        std::fs::write(&v2, "1073741824\n").expect("write");
        assert_eq!(
            cgroup_memory_limit(&v2, &v1).expect("v2"),
            (1 << 30, v2.clone())
        );
        std::fs::write(&v2, "lots\n").expect("write");
        assert!(matches!(
            cgroup_memory_limit(&v2, &v1),
            Err(CapacityError::Malformed { .. })
        ));
    }

    #[test]
    fn requested_capacities_are_checked() {
        assert_eq!(check_capacity(64 * MIB), Ok(64 * MIB));
        assert_eq!(check_capacity(MAX_CAPACITY_BYTES), Ok(MAX_CAPACITY_BYTES));
        let zero = check_capacity(0).expect_err("0");
        assert_eq!(zero.code, tonic::Code::InvalidArgument);
        let huge = check_capacity(MAX_CAPACITY_BYTES + 1).expect_err("huge");
        assert_eq!(huge.code, tonic::Code::InvalidArgument);
        assert!(
            huge.message.contains(&MAX_CAPACITY_BYTES.to_string()),
            "{}",
            huge.message
        );
    }

    #[test]
    fn releasing_freed_memory_does_not_fail() {
        let v = vec![1u8; 8 << 20];
        drop(v);
        release_freed_memory();
    }
}

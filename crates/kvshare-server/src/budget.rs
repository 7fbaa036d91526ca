//! The node's memory budget for buffered bytes: upload buffers (charged as bytes arrive), the
//! decode buffer that verifies a compressed block, blocks fetched from peers for a forwarded
//! Get, and Get response messages on their way to a client. Together with the store's capacity
//! it bounds what a node holds, whatever clients send: a caller that finds no room waits at
//! most the budget's wait, then gets `RESOURCE_EXHAUSTED`.
//!
//! Charges are counted in KiB (rounded up) on a fair semaphore, so a large request waiting for
//! room is not overtaken forever by small ones.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::rejection::Rejection;

/// The budget shared by every request of a node.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_kib: u32,
    wait: Duration,
}

/// Bytes held against the budget; returned when dropped.
#[derive(Debug, Default)]
pub struct Charge {
    permit: Option<OwnedSemaphorePermit>,
}

/// Largest budget in KiB (tokio's semaphore holds at most `usize::MAX >> 3` permits; a u32 of
/// KiB is 4 TiB, far above any node).
const MAX_KIB: u64 = u32::MAX as u64;

impl MemoryBudget {
    /// A budget of `bytes` (at least 1 KiB); callers wait at most `wait` for room.
    pub fn new(bytes: u64, wait: Duration) -> Self {
        let total_kib = bytes.div_ceil(1024).clamp(1, MAX_KIB) as u32;
        MemoryBudget {
            permits: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
            wait,
        }
    }

    /// The budget in bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_kib) * 1024
    }

    /// Bytes charged now.
    pub fn used_bytes(&self) -> u64 {
        let free = self.permits.available_permits() as u64;
        (u64::from(self.total_kib).saturating_sub(free)) * 1024
    }

    /// How long a caller waits for room.
    pub fn wait(&self) -> Duration {
        self.wait
    }

    /// Charges `bytes` for `what` (named in the error), waiting up to the budget's wait.
    pub async fn charge(&self, bytes: u64, what: &str) -> Result<Charge, Rejection> {
        if bytes == 0 {
            return Ok(Charge::default());
        }
        let kib = bytes.div_ceil(1024);
        if kib > u64::from(self.total_kib) {
            return Err(Rejection::exhausted(format!(
                "{what} needs {bytes} bytes of buffer, more than this node's whole --buffer-budget of {} bytes",
                self.total_bytes()
            )));
        }
        let acquire = self.permits.clone().acquire_many_owned(kib as u32);
        match tokio::time::timeout(self.wait, acquire).await {
            Ok(Ok(permit)) => Ok(Charge {
                permit: Some(permit),
            }),
            Ok(Err(_)) => Err(Rejection::new(
                tonic::Code::Unavailable,
                "node is shutting down",
            )),
            Err(_) => Err(Rejection::exhausted(format!(
                "node busy: its --buffer-budget of {} bytes stayed full for {:?} while {what} waited for {bytes} bytes; retry later",
                self.total_bytes(),
                self.wait
            ))),
        }
    }

    /// Closes the budget: every waiting and later charge fails with `UNAVAILABLE`.
    pub fn close(&self) {
        self.permits.close();
    }
}

impl Charge {
    /// Bytes held (a multiple of 1 KiB).
    pub fn bytes(&self) -> u64 {
        self.permit
            .as_ref()
            .map_or(0, |p| p.num_permits() as u64 * 1024)
    }

    /// Splits `bytes` (rounded up to KiB) off this charge, if it holds that much.
    pub fn take(&mut self, bytes: u64) -> Option<Charge> {
        if bytes == 0 {
            return Some(Charge::default());
        }
        let kib = usize::try_from(bytes.div_ceil(1024)).ok()?;
        let permit = self.permit.as_mut()?.split(kib)?;
        Some(Charge {
            permit: Some(permit),
        })
    }

    /// Adds `other`'s bytes to this charge.
    pub fn absorb(&mut self, other: Charge) {
        match (&mut self.permit, other.permit) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine @ None, theirs) => *mine = theirs,
            (Some(_), None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn charges_wait_then_fail_and_return_on_drop() {
        let b = MemoryBudget::new(4 << 10, Duration::from_millis(50));
        let mut a = b.charge(3_000, "test").await.expect("fits");
        assert_eq!(a.bytes(), 3 << 10);
        a.absorb(b.charge(1, "test").await.expect("fits"));
        assert_eq!((a.bytes(), b.used_bytes()), (4 << 10, 4 << 10));
        let err = b.charge(1, "a Get").await.expect_err("full");
        assert_eq!(err.code, tonic::Code::ResourceExhausted);
        assert!(err.message.contains("a Get"), "{}", err.message);
        drop(a);
        assert_eq!(b.used_bytes(), 0);
        let too_big = b.charge(5 << 10, "a block").await.expect_err("never fits");
        assert!(too_big.message.contains("whole --buffer-budget"));
        assert_eq!(b.charge(0, "nothing").await.map(|c| c.bytes()), Ok(0));
        let mut credit = b.charge(4 << 10, "credit").await.expect("fits");
        let part = credit.take(1_500).expect("held");
        assert_eq!((part.bytes(), credit.bytes()), (2 << 10, 2 << 10));
        assert!(credit.take(3 << 10).is_none());
    }
}

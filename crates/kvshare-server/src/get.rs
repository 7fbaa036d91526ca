//! The Get response: blocks streamed as they are produced, never materialised whole.
//!
//! A producer task fetches each block when its turn comes (from the local store, or from its
//! owners in windows of about [`WINDOW_BYTES`]) and hands the response messages one at a time
//! to the response stream through a channel of one message, so a client that reads slowly
//! slows the producer instead of piling messages up; one that reads nothing for the stream idle
//! timeout has its stream ended and what was fetched for it freed. Every message is charged to the node's
//! [`MemoryBudget`](crate::budget::MemoryBudget) until the client has taken it (the charge is
//! dropped when the next message is asked for), and so is every block fetched from a peer until
//! its last message is taken. A Get that cannot get room within the budget's wait ends with
//! `RESOURCE_EXHAUSTED`.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use kvshare_core::wire::get_chunks;
use kvshare_core::{BlockKey, EncodedBlock};
use kvshare_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;
use tracing::warn;

use crate::auth::Space;
use crate::budget::Charge;
use crate::cluster::View;
use crate::deadline;
use crate::rejection::Rejection;
use crate::routing::{self, Fetched};
use crate::state::{NodeState, Scope};

/// Bytes of blocks fetched from peers per window of a forwarded Get (two windows are in
/// flight: one being sent, the next being fetched).
pub const WINDOW_BYTES: u64 = 4 << 20;
/// Most keys in one window.
const MAX_WINDOW: usize = 1_024;
/// Bytes charged per response message on top of its payload slice (key, header, framing).
const MESSAGE_OVERHEAD: u64 = 512;

/// Stream type of Get.
pub type GetStream = Pin<Box<dyn Stream<Item = Result<pb::GetResponse, Status>> + Send>>;

type Item = Result<(pb::GetResponse, Charge), Status>;

/// Why the producer stopped early.
enum Stop {
    /// The client went away.
    Gone,
    /// The client took no message for the idle timeout: what was fetched for it is freed.
    Stalled,
    /// No room in the budget: the client is told.
    Refused(Rejection),
}

/// The response to a Get of `keys` in namespace `ns`, answered within `scope`.
/// `from_client`: counts hits and misses (a peer's forwarded Get is counted by the node that
/// received it from the client). Blocks go out in messages of at most `chunk` payload bytes.
pub fn respond(
    state: Arc<NodeState>,
    ns: Space,
    keys: Vec<BlockKey>,
    scope: Scope,
    from_client: bool,
    chunk: usize,
) -> GetStream {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(deadline::scope(deadline::current(), async move {
        let mut out = Responder {
            tx,
            state: &state,
            chunk: chunk.max(1),
            hits: 0,
            sent: 0,
        };
        let result = match scope {
            Scope::Local => local(&mut out, ns.store, &keys).await,
            Scope::Cluster(view) => forwarded(&mut out, &view, &ns, &keys).await,
        };
        let (hits, sent) = (out.hits, out.sent);
        match result {
            Err(Stop::Refused(r)) => {
                let _ = out.tx.send(Err(r.into_status())).await;
            }
            Err(Stop::Stalled) => {
                let idle = state.limits.stream_idle_timeout;
                warn!(
                    ?idle,
                    "Get stream ended: its client read nothing for the idle timeout"
                );
            }
            Err(Stop::Gone) | Ok(()) => {}
        }
        let m = &state.metrics;
        m.sent_bytes.inc_by(sent);
        if from_client {
            m.hits.inc_by(hits);
            m.misses
                .inc_by(keys.len() as u64 - hits.min(keys.len() as u64));
        }
    }));
    Box::pin(ChargedStream {
        rx,
        held: Charge::default(),
    })
}

/// Blocks from this node's store, each looked up when its turn comes.
async fn local(out: &mut Responder<'_>, ns: BlockKey, keys: &[BlockKey]) -> Result<(), Stop> {
    for (i, key) in keys.iter().enumerate() {
        let block = out
            .state
            .store
            .get_many(ns, std::slice::from_ref(key))
            .pop()
            .flatten();
        out.block(i, key, block.as_deref(), Charge::default())
            .await?;
    }
    Ok(())
}

/// Blocks from their owners, a window at a time; the next window is fetched while the current
/// one is sent.
async fn forwarded(
    out: &mut Responder<'_>,
    view: &View,
    ns: &Space,
    keys: &[BlockKey],
) -> Result<(), Stop> {
    let state = out.state;
    // A window's room is reserved whole before it is fetched (twice the bytes its blocks are
    // expected to take: the held block and its encoded response), so a stream never holds part
    // of a window while it waits for the rest; only the first block is charged as it arrives.
    let fetch = |range: Range<usize>, expected: u64| async move {
        let reserve = 2 * expected * range.len() as u64;
        let credit = state.budget.charge(reserve, "a forwarded Get").await;
        let got = match credit {
            Ok(credit) => routing::get(state, view, ns, &keys[range.clone()], credit).await,
            Err(r) => Err(r),
        };
        got.map(|blocks| (range, blocks)).map_err(Stop::Refused)
    };
    let mut current = fetch(0..1, 0).await?;
    let mut largest = 0;
    loop {
        let (range, blocks) = current;
        largest = blocks
            .iter()
            .flatten()
            .map(|f| f.block.payload.len() as u64)
            .fold(largest, u64::max);
        let window = (WINDOW_BYTES / largest.max(1)).clamp(1, MAX_WINDOW as u64) as usize;
        let next = range.end..(range.end + window).min(keys.len());
        let send = out.window(range.start, &keys[range.clone()], blocks);
        if next.is_empty() {
            return send.await;
        }
        let (sent, fetched) = futures::join!(send, fetch(next, largest));
        sent?;
        current = fetched?;
    }
}

/// Sends response messages, each with its charge, and counts what it sent.
struct Responder<'a> {
    tx: mpsc::Sender<Item>,
    state: &'a NodeState,
    chunk: usize,
    hits: u64,
    sent: u64,
}

impl Responder<'_> {
    /// The messages of the block at `index` (a miss when `None`); `held` (the charge of a
    /// block fetched from a peer) is released with its last message.
    async fn block(
        &mut self,
        index: usize,
        key: &BlockKey,
        block: Option<&EncodedBlock>,
        mut held: Charge,
    ) -> Result<(), Stop> {
        if let Some(b) = block {
            self.hits += 1;
            self.sent += b.payload.len() as u64;
        }
        let msgs = get_chunks(index as u32, key, block, self.chunk);
        let last = msgs.len().saturating_sub(1);
        let fetched = held.bytes() > 0;
        for (i, m) in msgs.into_iter().enumerate() {
            // A block fetched from a peer is charged already, and its messages are slices of
            // it; sending it needs no more room (so a stream never waits for room while it
            // holds a window that only its client can drain).
            let mut charge = if fetched {
                Charge::default()
            } else {
                let bytes = m.data.len() as u64 + MESSAGE_OVERHEAD;
                self.state
                    .budget
                    .charge(bytes, "a Get response")
                    .await
                    .map_err(Stop::Refused)?
            };
            if i == last {
                charge.absorb(std::mem::take(&mut held));
            }
            let idle = self.state.limits.stream_idle_timeout;
            match self.tx.send_timeout(Ok((m, charge)), idle).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(Stop::Gone),
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => return Err(Stop::Stalled),
            }
        }
        Ok(())
    }

    /// The messages of a window of fetched blocks starting at index `first`.
    async fn window(
        &mut self,
        first: usize,
        keys: &[BlockKey],
        blocks: Vec<Option<Fetched>>,
    ) -> Result<(), Stop> {
        for (i, (key, fetched)) in keys.iter().zip(blocks).enumerate() {
            match fetched {
                Some(f) => self.block(first + i, key, Some(&f.block), f.charge).await?,
                None => self.block(first + i, key, None, Charge::default()).await?,
            }
        }
        Ok(())
    }
}

/// The response stream: holds the charge of the message it last yielded until the next one
/// is asked for (by then that message has been encoded and handed to HTTP/2).
struct ChargedStream {
    rx: mpsc::Receiver<Item>,
    held: Charge,
}

impl Stream for ChargedStream {
    type Item = Result<pb::GetResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.held = Charge::default();
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok((msg, charge)))) => {
                self.held = charge;
                Poll::Ready(Some(Ok(msg)))
            }
            Poll::Ready(Some(Err(s))) => Poll::Ready(Some(Err(s))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

//! What a connection's outgoing side shares, whichever way its frames are written (a
//! writer task's queue, or straight to the socket through `wire`): the close signal, and
//! the count of connections whose queue is behind.

use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};

use chorus_protocol::ErrorCode;
use futures_util::task::AtomicWaker;

/// Why and how a connection must close immediately (queue overflow, takeover, shutdown).
///
/// Awaited by one task only, the connection's own (its reading loop and its writer run
/// in it): the signal holds one waker, not a list.
#[derive(Debug, Default)]
pub struct CloseSignal {
    requested: AtomicBool,
    waker: AtomicWaker,
    reason: Mutex<Option<(ErrorCode, String)>>,
}

impl CloseSignal {
    /// Requests an immediate close; the first reason wins.
    pub fn close(&self, code: ErrorCode, reason: impl Into<String>) {
        if let Ok(mut slot) = self.reason.lock() {
            if slot.is_none() {
                *slot = Some((code, reason.into()));
            }
        }
        self.requested.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Closes the connection as a slow consumer (4203): its outgoing queue is full.
    pub fn slow_consumer(&self) {
        metrics::counter!("chorus_slow_consumer_closes_total").increment(1);
        self.close(
            ErrorCode::SlowConsumer,
            "outgoing queue full: client too slow",
        );
    }

    /// Ready once a close was requested; else wakes the calling task when one is.
    pub fn poll_requested(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_requested() {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // Again after registering: a close between the two checks has woken no one.
        if self.is_requested() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Resolves when a close was requested.
    pub async fn requested(&self) {
        poll_fn(|cx| self.poll_requested(cx)).await
    }

    /// Whether a close was requested.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The close reason, if any.
    pub fn reason(&self) -> Option<(ErrorCode, String)> {
        self.reason.lock().ok().and_then(|slot| slot.clone())
    }
}

/// A connection counts as behind once its outgoing queue holds more than this many
/// frames, and as caught up again below [`BACKLOG_LOW_FRAMES`].
pub const BACKLOG_HIGH_FRAMES: usize = 64;
/// See [`BACKLOG_HIGH_FRAMES`].
pub const BACKLOG_LOW_FRAMES: usize = 16;

/// Connections of this process (one node per process) whose outgoing queue is behind (see
/// [`BACKLOG_HIGH_FRAMES`]).
static BACKLOGGED: AtomicUsize = AtomicUsize::new(0);

/// A node delivers behind once at least one in this many of its connections has a queue
/// behind: a quarter. A few slow clients (a bad mobile link) do not stop the node's
/// comments; a node short of CPU has most of its queues behind, but not evenly (clients
/// read at different speeds), and by the time half were behind the slowest would be
/// closed as slow consumers.
pub const BEHIND_SHARE_INVERSE: usize = 4;

/// Whether this node delivers behind what it takes: at least a quarter of its
/// `connections` have a queue behind (see [`BEHIND_SHARE_INVERSE`]). Comments are then
/// refused at once (`5001`) instead of being taken and delivered late: under overload the
/// acknowledged stay prompt.
pub fn delivery_behind(connections: usize) -> bool {
    let behind = BACKLOGGED.load(Ordering::Relaxed);
    behind > 0 && behind * BEHIND_SHARE_INVERSE >= connections
}

/// Whether one connection's queue counts as behind (in [`delivery_behind`]'s count until
/// lowered or dropped).
#[derive(Debug, Default)]
pub(crate) struct Backlog(AtomicBool);

impl Backlog {
    /// The queue is behind.
    pub(crate) fn raise(&self) {
        if !self.0.swap(true, Ordering::Relaxed) {
            let behind = BACKLOGGED.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::gauge!("chorus_connections_behind").set(behind as f64);
        }
    }

    /// The queue caught up (or is gone).
    pub(crate) fn lower(&self) {
        if self.0.swap(false, Ordering::Relaxed) {
            let behind = BACKLOGGED.fetch_sub(1, Ordering::Relaxed) - 1;
            metrics::gauge!("chorus_connections_behind").set(behind as f64);
        }
    }
}

impl Drop for Backlog {
    fn drop(&mut self) {
        self.lower();
    }
}

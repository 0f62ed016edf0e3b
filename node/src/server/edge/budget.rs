//! Budgets before trust: bytes a client may make the node hold before its messages are
//! complete.
//!
//! Every client stream (the upgraded WebSocket, the QUIC control stream) is read through a
//! [`BudgetedRead`]. It counts the bytes read since the transport last yielded a complete
//! message (the reader calls [`ReadBudget::message_done`]): that is what the connection
//! makes the node hold in a partial message, to within one read (a read may already carry
//! the start of the next message).
//!
//! - Before `auth` succeeds a connection may hold at most `preauth_message_bytes_max`
//!   (8 KiB by default): an `auth` frame is a few hundred bytes. A read beyond it fails;
//!   the reader reports [`BudgetExceeded::PreAuth`] and the connection is closed with
//!   `frame_too_large` (WebSocket 1009, QUIC 4001).
//! - After `auth`, the same first bytes of every partial message are free; what a
//!   connection holds beyond them is charged to one node-wide [`InboundBudget`]
//!   (`inbound_partial_bytes_max`, 64 MiB by default). The read that would take the node
//!   past it fails and that connection is closed with `unavailable` (4401): the connection
//!   growing a large message when the node is full is the one refused, and small
//!   messages (within the free bytes) never touch the budget, so a flood of partial large
//!   messages cannot starve well-behaved clients.
//!
//! The budget is released when the message completes and when the connection ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held in partial inbound messages across the node, beyond each connection's free
/// bytes.
#[derive(Debug)]
pub struct InboundBudget {
    held: AtomicUsize,
    max: usize,
}

impl InboundBudget {
    /// A budget of `max` bytes.
    pub fn new(max: usize) -> Self {
        InboundBudget {
            held: AtomicUsize::new(0),
            max,
        }
    }

    /// Bytes charged now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    fn try_charge(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                let next = held.checked_add(bytes)?;
                (next <= self.max).then_some(next)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        if bytes > 0 {
            self.held.fetch_sub(bytes, Ordering::AcqRel);
        }
    }
}

/// Why a read was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetExceeded {
    /// An unauthenticated connection sent more than a small message.
    PreAuth,
    /// The node's budget for partial messages is used up.
    Node,
}

const OK: u8 = 0;
const OVER_PREAUTH: u8 = 1;
const OVER_NODE: u8 = 2;

/// One connection's side of the budget, shared by its [`BudgetedRead`] and its reader.
#[derive(Debug)]
pub struct ReadBudget {
    node: Arc<InboundBudget>,
    /// Bytes read since the last complete message.
    pending: AtomicUsize,
    /// Of those, bytes charged to the node.
    charged: AtomicUsize,
    /// Bytes a partial message may hold without a charge.
    free_bytes: usize,
    authenticated: std::sync::atomic::AtomicBool,
    exceeded: AtomicU8,
}

impl ReadBudget {
    /// A connection's budget: `free_bytes` per partial message before `auth` (the most it
    /// may hold then) and after it (beyond which `node` is charged).
    pub fn new(node: Arc<InboundBudget>, free_bytes: usize) -> Arc<Self> {
        Arc::new(ReadBudget {
            node,
            pending: AtomicUsize::new(0),
            charged: AtomicUsize::new(0),
            free_bytes,
            authenticated: std::sync::atomic::AtomicBool::new(false),
            exceeded: AtomicU8::new(OK),
        })
    }

    /// The connection authenticated: from now on it may hold larger messages, charged to
    /// the node's budget.
    pub fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Release);
    }

    /// Whether the connection has authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Acquire)
    }

    /// A complete message (or control frame) was taken from the stream: what it held is
    /// released.
    pub fn message_done(&self) {
        self.pending.store(0, Ordering::Release);
        self.node.release(self.charged.swap(0, Ordering::AcqRel));
    }

    /// Why the last read was refused, if it was.
    pub fn exceeded(&self) -> Option<BudgetExceeded> {
        match self.exceeded.load(Ordering::Acquire) {
            OVER_PREAUTH => Some(BudgetExceeded::PreAuth),
            OVER_NODE => Some(BudgetExceeded::Node),
            _ => None,
        }
    }

    /// Accounts for `bytes` just read; the refusal, if they break the budget.
    fn read(&self, bytes: usize) -> Result<(), BudgetExceeded> {
        let pending = self.pending.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if !self.is_authenticated() {
            if pending > self.free_bytes {
                self.exceeded.store(OVER_PREAUTH, Ordering::Release);
                return Err(BudgetExceeded::PreAuth);
            }
            return Ok(());
        }
        let want = pending.saturating_sub(self.free_bytes);
        let charged = self.charged.load(Ordering::Acquire);
        if want > charged {
            if !self.node.try_charge(want - charged) {
                self.exceeded.store(OVER_NODE, Ordering::Release);
                metrics::counter!("chorus_inbound_budget_refused_total").increment(1);
                return Err(BudgetExceeded::Node);
            }
            self.charged.store(want, Ordering::Release);
        }
        Ok(())
    }
}

impl Drop for ReadBudget {
    fn drop(&mut self) {
        self.node.release(*self.charged.get_mut());
    }
}

/// A stream whose reads are counted against a [`ReadBudget`]; writes pass through.
pub struct BudgetedRead<T> {
    inner: T,
    budget: Arc<ReadBudget>,
}

impl<T> BudgetedRead<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, budget: Arc<ReadBudget>) -> Self {
        BudgetedRead { inner, budget }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BudgetedRead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(exceeded) = self.budget.exceeded() {
            return Poll::Ready(Err(budget_error(exceeded)));
        }
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                match this.budget.read(read) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(exceeded) => Poll::Ready(Err(budget_error(exceeded))),
                }
            }
            other => other,
        }
    }
}

fn budget_error(exceeded: BudgetExceeded) -> std::io::Error {
    std::io::Error::other(match exceeded {
        BudgetExceeded::PreAuth => "message too large before authentication",
        BudgetExceeded::Node => "the node's budget for partial messages is used up",
    })
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BudgetedRead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_auth_a_connection_holds_only_a_small_message() {
        let node = Arc::new(InboundBudget::new(1_000));
        let budget = ReadBudget::new(node.clone(), 100);
        assert_eq!(budget.read(60), Ok(()));
        assert_eq!(budget.read(40), Ok(()));
        budget.message_done();
        assert_eq!(budget.read(100), Ok(()));
        assert_eq!(budget.read(1), Err(BudgetExceeded::PreAuth));
        assert_eq!(budget.exceeded(), Some(BudgetExceeded::PreAuth));
        assert_eq!(node.held(), 0, "nothing is charged before auth");
    }

    #[test]
    fn after_auth_bytes_beyond_the_free_ones_are_charged_until_the_message_completes() {
        let node = Arc::new(InboundBudget::new(1_000));
        let a = ReadBudget::new(node.clone(), 100);
        let b = ReadBudget::new(node.clone(), 100);
        a.authenticated();
        b.authenticated();
        assert_eq!(a.read(600), Ok(()));
        assert_eq!(node.held(), 500);
        assert_eq!(b.read(80), Ok(()), "small messages are free");
        assert_eq!(b.read(520), Ok(()));
        assert_eq!(node.held(), 1_000);
        assert_eq!(a.read(1), Err(BudgetExceeded::Node));
        assert_eq!(a.exceeded(), Some(BudgetExceeded::Node));
        b.message_done();
        assert_eq!(node.held(), 500);
        drop(a);
        assert_eq!(node.held(), 0, "a closed connection releases its charge");
    }
}

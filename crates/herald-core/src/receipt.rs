//! Delivery receipts: how a publisher that waits (`await=delivery`) learns how many local connections
//! had its publication written.
//!
//! The hub gives each connection that receives such a publication a [`ReceiptToken`]. The token is
//! either marked written by the connection or, when dropped unmarked (connection gone, duplicate at a
//! resume seam), counted as abandoned, so a waiter never waits for a connection that no longer exists.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// Shared state of one awaited publication on one node.
#[derive(Debug, Default)]
pub struct Receipt {
    /// Set once the hub has fanned the publication out; `expected` is final from then on.
    fanned_out: AtomicBool,
    expected: AtomicUsize,
    written: AtomicUsize,
    abandoned: AtomicUsize,
    notify: Notify,
}

/// What a waiter learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptSummary {
    pub written: usize,
    pub timed_out: bool,
}

impl Receipt {
    pub(crate) fn fanned_out(self: &Arc<Self>, recipients: usize) {
        self.expected.store(recipients, Ordering::SeqCst);
        self.fanned_out.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn token(self: &Arc<Self>) -> ReceiptToken {
        ReceiptToken { receipt: Some(self.clone()) }
    }

    fn settled(&self) -> bool {
        self.fanned_out.load(Ordering::SeqCst)
            && self.written.load(Ordering::SeqCst) + self.abandoned.load(Ordering::SeqCst)
                >= self.expected.load(Ordering::SeqCst)
    }

    /// Waits until every recipient wrote or went away, or until `timeout`.
    pub async fn wait(&self, timeout: Duration) -> ReceiptSummary {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.settled() {
                return ReceiptSummary { written: self.written.load(Ordering::SeqCst), timed_out: false };
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return ReceiptSummary { written: self.written.load(Ordering::SeqCst), timed_out: !self.settled() };
            }
        }
    }
}

/// One connection's share of a receipt.
#[derive(Debug)]
pub struct ReceiptToken {
    receipt: Option<Arc<Receipt>>,
}

impl ReceiptToken {
    /// The connection wrote the publication.
    pub fn written(mut self) {
        if let Some(receipt) = self.receipt.take() {
            receipt.written.fetch_add(1, Ordering::SeqCst);
            receipt.notify.notify_waiters();
        }
    }
}

impl Drop for ReceiptToken {
    fn drop(&mut self) {
        if let Some(receipt) = self.receipt.take() {
            receipt.abandoned.fetch_add(1, Ordering::SeqCst);
            receipt.notify.notify_waiters();
        }
    }
}

//! What travels from the hub to one connection: the items of its bounded queue ([`Outbound`]) and
//! its close signal ([`Control`], with the [`CloseReason`] and the transport's [`CloseHook`]).
//!
//! Shared by the hub (which fills queues and closes connections) and the session (which drains them),
//! so neither has to import the other's internals for them. It depends on no other module of the hub.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures_util::task::AtomicWaker;

use crate::channel::ChannelName;
use crate::position::Position;
use crate::publication::Publication;
use crate::receipt::ReceiptToken;

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its outbound queue was full: it could not keep up.
    SlowConsumer,
    /// `/v1/disconnect` asked for it.
    Disconnected,
    /// The node is shutting down.
    ShuttingDown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow_consumer",
            Self::Disconnected => "disconnected",
            Self::ShuttingDown => "shutting_down",
        }
    }

    fn code(self) -> usize {
        self as usize + 1
    }

    fn from_code(code: usize) -> Option<Self> {
        [Self::SlowConsumer, Self::Disconnected, Self::ShuttingDown].get(code.checked_sub(1)?).copied()
    }
}

/// One queued item for a connection.
#[derive(Debug)]
pub enum Outbound {
    /// A publication to deliver, with this connection's share of a delivery receipt if one is awaited.
    Publication { publication: Arc<Publication>, receipt: Option<ReceiptToken> },
    /// The engine may have missed publications of `channel` up to `top` (it reconnected or history was
    /// lost): the session checks its position against `top` and replays or resets.
    /// Boxed: resyncs are rare, and a small item keeps every queue slot small on the hot path.
    Resync(Box<(ChannelName, Position)>),
}

/// Called once when the hub closes a connection, so the transport can abort a write that is blocked
/// on a client that stopped reading (the connection's task cannot see the close signal while it waits).
pub type CloseHook = Box<dyn Fn(CloseReason) + Send + Sync>;

/// The close signal of one connection; set once, by whoever closes it first.
///
/// The connection's task waits on it through an `AtomicWaker` (registered in the same poll as the
/// queue), which costs far less per wake-up than a `Notify` waiter list.
#[derive(Default)]
pub(crate) struct Control {
    reason: AtomicUsize,
    waker: AtomicWaker,
    hook: OnceLock<CloseHook>,
    /// Set by whichever of `close` and `set_hook` runs the hook, so it runs exactly once.
    hook_ran: AtomicBool,
}

impl Control {
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if first {
            self.waker.wake();
            self.run_hook(reason);
        }
        first
    }

    /// Installs the hook (only the first is kept). A connection closed before its hook was installed
    /// runs it now: a transport that registers late still gets its blocked write aborted.
    pub(crate) fn set_hook(&self, hook: CloseHook) {
        let _ = self.hook.set(hook);
        if let Some(reason) = self.reason() {
            self.run_hook(reason);
        }
    }

    fn run_hook(&self, reason: CloseReason) {
        if let Some(hook) = self.hook.get() {
            if !self.hook_ran.swap(true, Ordering::SeqCst) {
                hook(reason);
            }
        }
    }

    pub(crate) fn reason(&self) -> Option<CloseReason> {
        CloseReason::from_code(self.reason.load(Ordering::SeqCst))
    }

    /// Ready with the reason once closed; otherwise registers the task to be woken by `close`.
    pub(crate) fn poll_closed(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<CloseReason> {
        if let Some(reason) = self.reason() {
            return std::task::Poll::Ready(reason);
        }
        self.waker.register(cx.waker());
        match self.reason() {
            Some(reason) => std::task::Poll::Ready(reason),
            None => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting_hook(calls: &Arc<AtomicUsize>) -> CloseHook {
        let calls = calls.clone();
        Box::new(move |reason| {
            assert_eq!(reason, CloseReason::SlowConsumer);
            calls.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn the_first_close_wins_and_runs_the_hook_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let control = Control::default();
        control.set_hook(counting_hook(&calls));
        assert!(control.close(CloseReason::SlowConsumer));
        assert!(!control.close(CloseReason::ShuttingDown));
        assert_eq!(control.reason(), Some(CloseReason::SlowConsumer));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_hook_installed_after_the_close_runs_at_once() {
        let calls = Arc::new(AtomicUsize::new(0));
        let control = Control::default();
        assert!(control.close(CloseReason::SlowConsumer));
        control.set_hook(counting_hook(&calls));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a late transport still gets its write aborted");
        control.set_hook(counting_hook(&calls));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}

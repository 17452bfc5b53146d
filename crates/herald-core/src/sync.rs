//! The one locking helper of the crate's std mutexes (none is held across `.await`).

use std::sync::{Mutex, MutexGuard};

/// Takes `mutex`, also when a thread panicked while holding it: every critical section in this crate
/// leaves its map consistent at each step (an insert or a remove, never half of a multi-step update),
/// so the data behind a poisoned lock is still valid, and refusing it would stop delivery on the node.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

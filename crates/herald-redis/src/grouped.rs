//! Group commit: publishes that arrive while one is on its way to Redis wait, and go together in the
//! next call (the batch script for two or more), on one Redis with `durability = "none"`. Alone, a
//! publish goes at once, as before; under load one script call and one round trip carry many
//! publications instead of one each, so Redis runs one script instead of many and every process wakes
//! up less often per publication.
//!
//! Order: a publisher that waits for its answer before publishing again is never reordered (its next
//! publish starts after the last one ran). Publishes in flight at the same time have no order between
//! them; a lot keeps the order in which they arrived.

use std::sync::Mutex;

use herald_core::{EngineError, PublishOutcome, PublishRequest};
use tokio::sync::oneshot;

use crate::connection::lock;

/// At most this many publications, and this many bytes of data (beyond the first), go in one lot.
const MAX_LOT: usize = 128;
const MAX_LOT_BYTES: usize = 1 << 20;

/// A publish waiting for the next lot: the request, its message header, and where its outcome goes.
pub(crate) struct Waiting {
    pub(crate) request: (PublishRequest, String),
    pub(crate) answer: oneshot::Sender<Result<PublishOutcome, EngineError>>,
}

/// Whether a call is on its way, and who waits for the next.
#[derive(Default)]
pub(crate) struct Group {
    busy: bool,
    waiting: Vec<Waiting>,
}

/// What a publish does: send its own call now (then [`hand_on`]), or wait for its outcome from a lot.
pub(crate) enum Turn {
    Lead,
    Wait(oneshot::Receiver<Result<PublishOutcome, EngineError>>),
}

pub(crate) fn enter(group: &Mutex<Group>, request: &PublishRequest, header: &str) -> Turn {
    let mut group = lock(group);
    if !group.busy {
        group.busy = true;
        return Turn::Lead;
    }
    let (answer, outcome) = oneshot::channel();
    group.waiting.push(Waiting { request: (request.clone(), header.to_owned()), answer });
    Turn::Wait(outcome)
}

/// The call on its way came back: the next lot to send (the group stays busy with it), or none (idle).
/// When it failed for want of Redis (`unavailable`), the waiting ones fail with it at once instead of
/// each lot waiting out its own timeout in turn: nothing of theirs was sent, so they may be retried.
pub(crate) fn hand_on(group: &Mutex<Group>, unavailable: Option<&EngineError>) -> Option<Vec<Waiting>> {
    if let Some(error) = unavailable {
        fail_all(group, error);
        return None;
    }
    let mut group = lock(group);
    if group.waiting.is_empty() {
        group.busy = false;
        return None;
    }
    let mut bytes = 0;
    let mut count = 0;
    for waiting in &group.waiting {
        bytes += waiting.request.0.data.get().len();
        if count == MAX_LOT || (count > 0 && bytes > MAX_LOT_BYTES) {
            break;
        }
        count += 1;
    }
    Some(group.waiting.drain(..count).collect())
}

/// Nobody can send the waiting ones (no runtime is left to run a call): they hear that the engine is
/// unavailable, and the next publish leads again.
pub(crate) fn abandon(group: &Mutex<Group>) {
    fail_all(group, &dropped());
}

fn fail_all(group: &Mutex<Group>, error: &EngineError) {
    let waiting = {
        let mut group = lock(group);
        group.busy = false;
        std::mem::take(&mut group.waiting)
    };
    for waiting in waiting {
        let _ = waiting.answer.send(Err(error.clone()));
    }
}

/// The outcome a waiting publish gets when its lot never answers (the task that ran it ended).
pub(crate) fn dropped() -> EngineError {
    EngineError::Unavailable("the publish call was abandoned".into())
}

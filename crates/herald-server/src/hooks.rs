//! Lifecycle webhooks (`[hooks]`): `channel.occupied`, `channel.vacated`, `presence.joined` and
//! `presence.left`, POSTed as JSON to `hooks.url`, signed the Standard Webhooks way
//! (<https://www.standardwebhooks.com/>: `webhook-id`, `webhook-timestamp` in Unix seconds, and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` keyed with the decoded
//! `whsec_` secret), retried with exponential backoff, in order, one event at a time.
//!
//! Two tasks per node: the recorder applies the hub's transitions (queued under the hub's locks, taken
//! at once into a [`Backlog`] of net changes) to the engine's [`LifecycleStore`], retrying while the
//! engine is unreachable, and ticks it so that graces end; the deliverer, while the store says this
//! node leads, sends the store's pending events in batches, each channel's in order and up to
//! `hooks.max_concurrent` channels side by side, and acknowledges a batch once each of its events is
//! sent or given up. Delivery is at least once: an event whose acknowledgement is lost is sent again with the
//! same `webhook-id`, on which the backend dedups.
//!
//! Rule every edit must keep: an event is acknowledged only after a 2xx, or after it was given up (a
//! refusal that retrying cannot change, `hooks.max_attempts` used up, or older than
//! `hooks.max_event_age_secs`), and counted as `dropped` then.
//! Depends on `config.rs`; no handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::StreamExt;
use herald_core::lifecycle::{EventKind, LifecycleEvent, LifecycleSink, LifecycleStore};
use herald_core::publication::{format_timestamp, now_ms};
use herald_core::{ChannelName, Hub, Transition};
use hmac::{Hmac, Mac};
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// How often the recorder ends graces that are due.
const TICK_INTERVAL: Duration = Duration::from_millis(100);
/// How long the deliverer waits before looking again when nothing is pending (or it does not lead).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Longest wait between two attempts to record a transition while the engine is unreachable.
const APPLY_RETRY_MAX: Duration = Duration::from_secs(2);
/// Events the deliverer reads from the store at once (the next batch starts once all are done with).
const BATCH: usize = 256;

/// The HMAC key of a `whsec_<base64>` secret, or why it is not one.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, String> {
    let Some(encoded) = secret.strip_prefix("whsec_") else {
        return Err("must start with whsec_ (then the base64 of 24 to 64 random bytes)".to_owned());
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| "the part after whsec_ is not base64".to_owned())?;
    if !(24..=64).contains(&key.len()) {
        return Err(format!("the key must be 24 to 64 bytes once decoded, not {}", key.len()));
    }
    Ok(key)
}

/// The `webhook-signature` value of one attempt: `v1,<base64 HMAC-SHA256("<id>.<timestamp>.<body>")>`.
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(key) else { return String::new() };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// The JSON body of an event: `{"type","channel","user","timestamp"}` (`user` is null for channel
/// events; `timestamp` is when the cluster's state changed, RFC 3339 UTC).
pub fn body(event: &LifecycleEvent) -> Vec<u8> {
    serde_json::json!({
        "type": event.kind.as_str(),
        "channel": event.channel.as_str(),
        "user": event.user,
        "timestamp": format_timestamp(event.at_ms),
    })
    .to_string()
    .into_bytes()
}

/// What happened to deliveries on this node (`herald_hooks_*`).
#[derive(Debug, Default)]
pub struct HookStats {
    /// Events this node took up for delivery, by [`EventKind::ALL`]'s order.
    events: [AtomicU64; 4],
    /// Events the backend acknowledged (2xx).
    sent: AtomicU64,
    /// Attempts that got no 2xx (a connection error, a timeout or another status).
    failed: AtomicU64,
    /// Attempts after an event's first.
    retried: AtomicU64,
    /// Events given up (a status retrying cannot change, attempts used up, or a full store).
    dropped: AtomicU64,
}

/// The counters of [`HookStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookCounts {
    pub events: [u64; 4],
    pub sent: u64,
    pub failed: u64,
    pub retried: u64,
    pub dropped: u64,
}

/// The running webhooks of one node: their counters, the store (for what it dropped), and what stops
/// their tasks.
#[derive(Clone)]
pub struct Hooks {
    stats: Arc<HookStats>,
    store: Arc<dyn LifecycleStore>,
    stop: CancellationToken,
    /// The recorder's task, awaited by [`Hooks::shutdown`].
    recorder: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl Hooks {
    /// The engine's lifecycle store (what is pending, for operators and tests).
    pub fn store(&self) -> &Arc<dyn LifecycleStore> {
        &self.store
    }

    /// Stops the recorder and the deliverer (undelivered events stay in the store).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops them, waiting up to `bound` for the recorder to record the transitions already queued (a
    /// graceful shutdown, once every connection is closed), then gives up the delivery lease.
    pub async fn shutdown(&self, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        self.stop.cancel();
        let recorder = self.recorder.lock().ok().and_then(|mut recorder| recorder.take());
        if let Some(recorder) = recorder {
            if tokio::time::timeout_at(deadline, recorder).await.is_err() {
                tracing::warn!("hooks: lifecycle transitions still unrecorded at shutdown; the engine releases them");
            }
        }
        match tokio::time::timeout_at(deadline, self.store.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "hooks: the delivery lease could not be given up; it lapses"),
            Err(_) => tracing::warn!("hooks: the delivery lease was not given up in time; it lapses"),
        }
    }

    pub fn counts(&self) -> HookCounts {
        let s = &self.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        HookCounts {
            events: [load(&s.events[0]), load(&s.events[1]), load(&s.events[2]), load(&s.events[3])],
            sent: load(&s.sent),
            failed: load(&s.failed),
            retried: load(&s.retried),
            dropped: load(&s.dropped) + self.store.overflowed(),
        }
    }
}

/// Starts the webhooks of `hub` over the engine's `store` when `config` has `hooks.url`: installs the
/// hub's lifecycle sink and spawns the recorder and the deliverer (until [`Hooks::stop`]).
pub fn start(hub: &Hub, config: &Config, store: Arc<dyn LifecycleStore>) -> Result<Option<Hooks>, String> {
    let hooks = &config.hooks;
    let Some(url) = &hooks.url else { return Ok(None) };
    let keys = hooks
        .secret
        .iter()
        .map(|secret| secret_key(secret).map_err(|e| format!("hooks.secret: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if keys.is_empty() {
        return Err("hooks.secret must be set when hooks.url is".to_owned());
    }
    let stop = CancellationToken::new();
    let client = reqwest::Client::builder()
        // The backend is the operator's own service: no environment proxy, no redirects (a 3xx is not
        // an acknowledgement).
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("hooks: cannot make the HTTP client: {e}"))?;
    let stats = Arc::new(HookStats::default());
    let namespaces = config.namespaces.clone();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    hub.set_lifecycle(LifecycleSink::new(tx, move |channel: &ChannelName| {
        namespaces.get(channel.namespace()).and_then(|ns| ns.hooks).unwrap_or(true)
    }));
    let recorder = tokio::spawn(record(store.clone(), rx, stop.clone()));
    let sender = Sender {
        client,
        url: url.clone(),
        keys,
        timeout: Duration::from_millis(hooks.timeout_ms),
        max_attempts: hooks.max_attempts.max(1),
        retry_initial: Duration::from_millis(hooks.retry_initial_ms),
        retry_max: Duration::from_millis(hooks.retry_max_ms),
        max_age_ms: hooks.max_event_age_secs.saturating_mul(1000),
        max_concurrent: hooks.max_concurrent.max(1),
        stats: stats.clone(),
    };
    tokio::spawn(deliver(store.clone(), sender, stop.clone()));
    Ok(Some(Hooks { stats, store, stop, recorder: Arc::new(std::sync::Mutex::new(Some(recorder))) }))
}

/// Applies the hub's transitions to the store, in order, and ends due graces. Transitions are taken
/// from the hub's queue as they come, into a [`Backlog`], so that while the engine is unreachable the
/// queue does not grow with every reconnect attempt: what waits is at most one entry per channel and
/// per user in a channel.
async fn record(
    store: Arc<dyn LifecycleStore>,
    mut transitions: tokio::sync::mpsc::UnboundedReceiver<Transition>,
    stop: CancellationToken,
) {
    let mut backlog = Backlog::default();
    let mut last_tick = tokio::time::Instant::now();
    loop {
        while let Ok(transition) = transitions.try_recv() {
            backlog.push(transition, now_ms());
        }
        if last_tick.elapsed() >= TICK_INTERVAL {
            last_tick = tokio::time::Instant::now();
            if let Err(error) = store.tick(now_ms()).await {
                // Every tick while the engine is unreachable (the engine itself warns of that).
                tracing::debug!(%error, "hooks: due lifecycle events could not be emitted");
            }
        }
        if let Some((transition, at)) = backlog.pop() {
            if !apply(store.as_ref(), &transition, at, &mut transitions, &mut backlog, &stop).await {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => {
                // What the node's last connections left behind (a graceful shutdown closed them before
                // this): recorded now, once each, so that their channels are vacated after the grace
                // rather than once the node's lease expires. Bounded by the caller (`Hooks::shutdown`).
                while let Ok(transition) = transitions.try_recv() {
                    backlog.push(transition, now_ms());
                }
                while let Some((transition, at)) = backlog.pop() {
                    if let Err(error) = store.apply(transition, at).await {
                        tracing::warn!(%error, "hooks: a lifecycle transition could not be recorded at shutdown");
                    }
                }
                return;
            }
            transition = transitions.recv() => {
                let Some(transition) = transition else { return };
                backlog.push(transition, now_ms());
            }
            _ = tokio::time::sleep_until(last_tick + TICK_INTERVAL) => {}
        }
    }
}

/// Applies one transition (that happened at `at`), retrying (with backoff, up to [`APPLY_RETRY_MAX`]
/// apart) while the engine is unreachable, and meanwhile taking what the hub queues into `backlog`:
/// the next transitions wait, so each channel's stay in order. False once `stop` fired.
async fn apply(
    store: &dyn LifecycleStore,
    transition: &Transition,
    at: u64,
    transitions: &mut tokio::sync::mpsc::UnboundedReceiver<Transition>,
    backlog: &mut Backlog,
    stop: &CancellationToken,
) -> bool {
    let mut delay = TICK_INTERVAL;
    loop {
        match store.apply(transition.clone(), at).await {
            Ok(()) => return true,
            Err(error) => tracing::warn!(%error, "hooks: a lifecycle transition could not be recorded; retrying"),
        }
        let retry_at = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep_until(retry_at) => break,
                next = transitions.recv() => match next {
                    Some(next) => backlog.push(next, now_ms()),
                    None => return false,
                },
            }
        }
        delay = (delay * 2).min(APPLY_RETRY_MAX);
    }
}

/// Transitions waiting to be recorded, reduced to their net effect: per channel (and per user in a
/// channel) the transitions alternate (occupied, vacated, occupied, …), so an even number of them
/// changes nothing and an odd number is the last one. They come out in the order of each key's last
/// transition, which is the order they happened: a channel vacated at the end had every user leave
/// before, and one occupied at the end was occupied before any user that is joined at the end joined.
#[derive(Default)]
pub struct Backlog {
    /// The push number of each key's last transition -> the key.
    order: std::collections::BTreeMap<u64, BacklogKey>,
    /// Key -> its last transition, when it happened, whether the count so far is odd, its push number.
    net: std::collections::HashMap<BacklogKey, NetTransition>,
    pushed: u64,
}

/// A channel, or a user in a channel.
type BacklogKey = (ChannelName, Option<String>);
/// A key's last transition, when it happened, whether the count so far is odd, its push number.
type NetTransition = (Transition, u64, bool, u64);

impl Backlog {
    pub fn push(&mut self, transition: Transition, at: u64) {
        let key = match &transition {
            Transition::Occupied(channel) | Transition::Vacated(channel) => (channel.clone(), None),
            Transition::Joined(channel, user) | Transition::Left(channel, user) => {
                (channel.clone(), Some(user.clone()))
            }
        };
        self.pushed += 1;
        let odd = match self.net.get(&key) {
            Some((_, _, odd, seq)) => {
                self.order.remove(seq);
                !odd
            }
            None => true,
        };
        self.order.insert(self.pushed, key.clone());
        self.net.insert(key, (transition, at, odd, self.pushed));
    }

    /// The oldest transition that still changes something, and when it happened.
    pub fn pop(&mut self) -> Option<(Transition, u64)> {
        while let Some((_, key)) = self.order.pop_first() {
            if let Some((transition, at, true, _)) = self.net.remove(&key) {
                return Some((transition, at));
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.net.len()
    }

    pub fn is_empty(&self) -> bool {
        self.net.is_empty()
    }
}

/// While this node leads, sends pending events (per channel in order, channels concurrently),
/// acknowledging each batch once all of it is done with.
async fn deliver(store: Arc<dyn LifecycleStore>, sender: Sender, stop: CancellationToken) {
    loop {
        let batch = match store.lead().await {
            Ok(true) => store.pending(BATCH).await.unwrap_or_else(|error| {
                // Every poll while the engine is unreachable (the engine itself warns of that).
                tracing::debug!(%error, "hooks: pending events could not be read");
                Vec::new()
            }),
            Ok(false) => Vec::new(),
            Err(error) => {
                tracing::warn!(%error, "hooks: the delivery lease could not be checked");
                Vec::new()
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(IDLE_POLL) => continue,
            }
        }
        for event in &batch {
            if let Some(index) = EventKind::ALL.iter().position(|kind| *kind == event.kind) {
                sender.stats.events[index].fetch_add(1, Ordering::Relaxed);
            }
        }
        // Each channel's events one after the other, in order; channels side by side.
        let mut channels: Vec<Vec<&LifecycleEvent>> = Vec::new();
        let mut index: std::collections::HashMap<&ChannelName, usize> = std::collections::HashMap::new();
        for event in &batch {
            let slot = *index.entry(&event.channel).or_insert_with(|| {
                channels.push(Vec::new());
                channels.len() - 1
            });
            channels[slot].push(event);
        }
        let sending = futures_util::stream::iter(channels).for_each_concurrent(sender.max_concurrent, |events| {
            let sender = &sender;
            async move {
                for event in events {
                    sender.send(event).await;
                }
            }
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            () = sending => {}
        }
        // Every event of the batch is done with: the store moves past the last one.
        if let Some(last) = batch.last() {
            if let Err(error) = store.ack(last).await {
                tracing::warn!(%error, id = %last.id, "hooks: delivered events could not be acknowledged");
            }
        }
    }
}

/// How one attempt ended.
enum Attempt {
    Sent,
    /// Worth another attempt: no answer, a timeout, a 5xx or a 429.
    Retry(String),
    /// An answer retrying cannot change (another 4xx, a 3xx).
    GiveUp(String),
}

struct Sender {
    client: reqwest::Client,
    url: String,
    /// The keys each request is signed with (more than one while a secret is rotated).
    keys: Vec<Vec<u8>>,
    timeout: Duration,
    max_attempts: u32,
    retry_initial: Duration,
    retry_max: Duration,
    /// An event older than this (from its change) is dropped instead of attempted.
    max_age_ms: u64,
    /// Channels whose events are sent side by side.
    max_concurrent: usize,
    stats: Arc<HookStats>,
}

impl Sender {
    /// Sends one event until it is sent or given up (counted either way).
    async fn send(&self, event: &LifecycleEvent) {
        let body = body(event);
        let mut delay = self.retry_initial;
        for attempt in 1..=self.max_attempts {
            if attempt > 1 {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.retry_max);
            }
            let age_ms = now_ms().saturating_sub(event.at_ms);
            if age_ms > self.max_age_ms {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = %event.id, kind = event.kind.as_str(), age_ms,
                    "hooks: event dropped unsent, older than hooks.max_event_age_secs");
                return;
            }
            if attempt > 1 {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            match self.attempt(event, &body).await {
                Attempt::Sent => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Attempt::Retry(why) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(id = %event.id, attempt, %why, "hooks: attempt failed, retrying");
                }
                Attempt::GiveUp(why) => {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(id = %event.id, kind = event.kind.as_str(), %why, "hooks: event dropped");
                    return;
                }
            }
        }
        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(id = %event.id, kind = event.kind.as_str(), attempts = self.max_attempts,
            "hooks: event dropped after its last attempt");
    }

    /// `webhook-signature`: one `v1,…` per key, space-separated (Standard Webhooks' rotation).
    fn signatures(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let signatures: Vec<String> = self.keys.iter().map(|key| signature(key, id, timestamp, body)).collect();
        signatures.join(" ")
    }

    async fn attempt(&self, event: &LifecycleEvent, body: &[u8]) -> Attempt {
        let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let request = self
            .client
            .post(&self.url)
            .timeout(self.timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &event.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", self.signatures(&event.id, timestamp, body))
            .body(body.to_vec());
        match request.send().await {
            Ok(answer) if answer.status().is_success() => Attempt::Sent,
            Ok(answer) if answer.status().is_server_error() || answer.status().as_u16() == 429 => {
                Attempt::Retry(format!("status {}", answer.status().as_u16()))
            }
            Ok(answer) => Attempt::GiveUp(format!("status {}", answer.status().as_u16())),
            Err(error) => Attempt::Retry(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification (its reference libraries' test vector).
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn the_backlog_keeps_only_net_changes_in_order() {
        let room = ChannelName::parse("room:1").expect("channel");
        let other = ChannelName::parse("room:2").expect("channel");
        let mut backlog = Backlog::default();
        // Flapping while the engine was away: room:1 ends occupied with ana, room:2 comes and goes.
        for (at, transition) in [
            (1, Transition::Occupied(room.clone())),
            (2, Transition::Joined(room.clone(), "ana".into())),
            (3, Transition::Occupied(other.clone())),
            (4, Transition::Left(room.clone(), "ana".into())),
            (5, Transition::Vacated(room.clone())),
            (6, Transition::Vacated(other.clone())),
            (7, Transition::Occupied(room.clone())),
            (8, Transition::Joined(room.clone(), "ana".into())),
        ] {
            backlog.push(transition, at);
        }
        assert_eq!(backlog.len(), 3, "one entry per key, however many reconnects");
        assert_eq!(backlog.pop(), Some((Transition::Occupied(room.clone()), 7)));
        assert_eq!(backlog.pop(), Some((Transition::Joined(room.clone(), "ana".into()), 8)));
        assert_eq!(backlog.pop(), None, "room:2 came and went: nothing to record");
        assert!(backlog.is_empty());
        backlog.push(Transition::Left(room.clone(), "ana".into()), 9);
        backlog.push(Transition::Vacated(room.clone()), 9);
        assert_eq!(backlog.pop(), Some((Transition::Left(room.clone(), "ana".into()), 9)));
        assert_eq!(backlog.pop(), Some((Transition::Vacated(room.clone()), 9)));
        // Users who left and joined while the channel stayed occupied come out in the order they did.
        backlog.push(Transition::Joined(room.clone(), "bo".into()), 10);
        backlog.push(Transition::Left(room.clone(), "bo".into()), 11);
        backlog.push(Transition::Left(room.clone(), "cy".into()), 12);
        backlog.push(Transition::Joined(room.clone(), "bo".into()), 13);
        assert_eq!(backlog.pop(), Some((Transition::Left(room.clone(), "cy".into()), 12)));
        assert_eq!(backlog.pop(), Some((Transition::Joined(room, "bo".into()), 13)));
    }

    /// A store that fails its first `failures` applies (an unreachable engine) and records the rest.
    #[derive(Default)]
    struct Flaky {
        failures: std::sync::atomic::AtomicUsize,
        applied: std::sync::Mutex<Vec<Transition>>,
    }

    #[async_trait::async_trait]
    impl LifecycleStore for Flaky {
        async fn apply(&self, transition: Transition, _at: u64) -> Result<(), herald_core::EngineError> {
            let failing = self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if failing.is_ok() {
                return Err(herald_core::EngineError::Unavailable("down".into()));
            }
            self.applied.lock().expect("lock").push(transition);
            Ok(())
        }
        async fn tick(&self, _now: u64) -> Result<(), herald_core::EngineError> {
            Ok(())
        }
        async fn lead(&self) -> Result<bool, herald_core::EngineError> {
            Ok(false)
        }
        async fn pending(&self, _max: usize) -> Result<Vec<LifecycleEvent>, herald_core::EngineError> {
            Ok(Vec::new())
        }
        async fn ack(&self, _event: &LifecycleEvent) -> Result<(), herald_core::EngineError> {
            Ok(())
        }
        fn overflowed(&self) -> u64 {
            0
        }
    }

    #[tokio::test]
    async fn while_the_engine_is_away_transitions_wait_in_order_and_flaps_cancel_out() {
        let store = Arc::new(Flaky::default());
        store.failures.store(3, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let recorder = tokio::spawn(record(store.clone(), rx, stop.clone()));
        let channel = |name: &str| ChannelName::parse(name).expect("channel");
        tx.send(Transition::Occupied(channel("a:1"))).expect("send");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.failures.load(Ordering::SeqCst) == 3 {
            assert!(tokio::time::Instant::now() < deadline, "never tried");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The engine is away now; the recorder waits to retry while these come.
        let sent = [
            // A client reconnecting over and over.
            Transition::Occupied(channel("b:1")),
            Transition::Vacated(channel("b:1")),
            Transition::Occupied(channel("b:1")),
            Transition::Vacated(channel("b:1")),
            Transition::Joined(channel("a:1"), "u".into()),
        ];
        for transition in sent {
            tx.send(transition).expect("send");
        }
        let applied = || store.applied.lock().map(|a| a.clone()).unwrap_or_default();
        while applied().len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "never recorded: {:?}", applied());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A last one: anything of b:1 would have come before it.
        tx.send(Transition::Occupied(channel("c:1"))).expect("send");
        while applied().len() < 3 {
            assert!(tokio::time::Instant::now() < deadline, "never recorded: {:?}", applied());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            applied(),
            [
                Transition::Occupied(channel("a:1")),
                Transition::Joined(channel("a:1"), "u".into()),
                Transition::Occupied(channel("c:1"))
            ]
        );
        assert_eq!(store.failures.load(Ordering::SeqCst), 0, "the first one was retried until recorded");
        stop.cancel();
        recorder.await.expect("the recorder ends");
    }

    #[test]
    fn secrets_are_checked() {
        assert!(secret_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(secret_key("whsec_***").is_err());
        assert!(secret_key("whsec_c2hvcnQ=").is_err(), "5 bytes is too short");
    }
}

//! `durability = "replicated"`: a publish is acknowledged once enough replicas hold it. Publishes that
//! arrive while a `WAIT` runs share the next one, per connection (`WAIT` counts the writes of the
//! connection it is sent on).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::EngineError;
use tokio::sync::oneshot;

use crate::connection::{Commands, Live, lock, needs_new_connection};

/// Where a publish waiting for replicas hears the outcome.
type DurableReply = oneshot::Sender<Result<(), EngineError>>;

/// Publishes waiting for the next `WAIT`, each with the connection it wrote on.
#[derive(Default)]
struct Waits {
    waiting: Vec<(Live, DurableReply)>,
    running: bool,
}

pub(crate) struct Replication {
    commands: Arc<Commands>,
    waits: Mutex<Waits>,
}

impl Replication {
    pub(crate) fn new(commands: Arc<Commands>) -> Self {
        Self { commands, waits: Mutex::new(Waits::default()) }
    }

    /// Waits until replicas hold everything `live`'s connection wrote so far (`durability =
    /// replicated`). Publishes that arrive while a `WAIT` runs share the next one.
    pub(crate) async fn replicated(
        self: &Arc<Self>,
        live: Live,
        min_replicas: u32,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut durable = lock(&self.waits);
            durable.waiting.push((live, tx));
            !std::mem::replace(&mut durable.running, true)
        };
        if start {
            let inner = self.clone();
            tokio::spawn(async move { inner.run_waits(min_replicas, timeout).await });
        }
        rx.await.unwrap_or_else(|_| Err(EngineError::NotDurable("the replication wait was abandoned".into())))
    }

    async fn run_waits(self: Arc<Self>, min_replicas: u32, timeout: Duration) {
        loop {
            let waiting = {
                let mut durable = lock(&self.waits);
                if durable.waiting.is_empty() {
                    durable.running = false;
                    return;
                }
                std::mem::take(&mut durable.waiting)
            };
            // WAIT counts the writes of the connection it is sent on, so each connection gets its own.
            let mut by_connection: Vec<(Live, Vec<DurableReply>)> = Vec::new();
            for (live, tx) in waiting {
                match by_connection.iter_mut().find(|(l, _)| l.same_connection(&live)) {
                    Some((_, senders)) => senders.push(tx),
                    None => by_connection.push((live, vec![tx])),
                }
            }
            for (live, senders) in by_connection {
                let mut conn = live.conn.clone();
                let mut command = redis::cmd("WAIT");
                command.arg(min_replicas).arg(timeout.as_millis() as u64);
                let wait = command.query_async::<u32>(&mut conn);
                let answer = match tokio::time::timeout(timeout + self.commands.timeout(), wait).await {
                    Ok(Ok(count)) if count >= min_replicas => Ok(()),
                    Ok(Ok(count)) => Err(EngineError::NotDurable(format!(
                        "{count} of the {min_replicas} replicas required acknowledged the publication in time"
                    ))),
                    Ok(Err(error)) => {
                        if needs_new_connection(&error) {
                            self.commands.broken(&live);
                        }
                        Err(EngineError::NotDurable(format!("waiting for replicas failed: {error}")))
                    }
                    Err(_) => {
                        self.commands.broken(&live);
                        Err(EngineError::NotDurable("waiting for replicas timed out".into()))
                    }
                };
                for tx in senders {
                    let _ = tx.send(answer.clone());
                }
            }
        }
    }
}

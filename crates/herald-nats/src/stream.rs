//! The history stream: publish with per-channel offsets, top, history, fencing, idempotency.
//!
//! Every message of a channel's subject carries headers:
//! - `Herald-Position: <epoch>:<offset>`;
//! - `Herald-Prev: <sequence>`, the stream sequence of the subject's message before it (0 for none), so
//!   history is read by walking back from the top, one message per publication returned;
//! - `Herald-Replaces: <epoch>` once a fence moved the channel on from that epoch (carried on);
//! - `Herald-Marker: 1` on a message that is no publication: the first of an epoch (offset 0, written
//!   when a channel without messages is asked for its top, so every node agrees on its epoch) or a fence.
//!
//! A publication's payload is the header line, `\n`, the envelope: what the live subject carries.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream::{self, LastRawMessageErrorKind};
use async_nats::jetstream::{self as js};
use bytes::Bytes;
use herald_core::publication::now_ms;
use herald_core::{ChannelName, EngineError, Epoch, History, Position, Publication, PublishOutcome, PublishRequest};

use crate::config::NatsConfig;
use crate::names::Names;
use crate::shared::{Inner, Last, lock, unavailable};

const POSITION: &str = "Herald-Position";
const PREV: &str = "Herald-Prev";
const REPLACES: &str = "Herald-Replaces";
const MARKER: &str = "Herald-Marker";
const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// Publishes that lose the race for a channel's next offset this often in a row give up (503).
const MAX_ATTEMPTS: usize = 32;
/// An idempotency key reserved this long ago by a publish that never finished is taken over.
const RESERVATION_MAX_AGE: Duration = Duration::from_secs(10);

/// Makes (or updates) the history stream.
pub(crate) async fn ensure(
    js: &js::Context,
    names: &Names,
    config: &NatsConfig,
) -> Result<stream::Stream, EngineError> {
    let policies = &config.policies;
    let all = policies.namespaces.values().chain(std::iter::once(&policies.default_history));
    let (size, age) = all.fold((1usize, Duration::from_secs(1)), |(s, a), p| (s.max(p.size), a.max(p.ttl)));
    let wanted = stream::Config {
        name: names.stream(),
        subjects: vec![names.history_all()],
        max_messages_per_subject: size as i64,
        max_age: age,
        num_replicas: config.replicas,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        republish: Some(stream::Republish {
            source: names.history_all(),
            destination: names.live_all(),
            headers_only: false,
        }),
        ..Default::default()
    };
    match js.get_stream(names.stream()).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(unavailable)?.config.clone();
            if info.max_messages_per_subject != wanted.max_messages_per_subject
                || info.max_age != wanted.max_age
                || info.num_replicas != wanted.num_replicas
            {
                js.update_stream(wanted).await.map_err(unavailable)?;
            }
            Ok(existing)
        }
        Err(_) => match js.create_stream(wanted).await {
            Ok(created) => Ok(created),
            Err(_) => js.get_stream(names.stream()).await.map_err(unavailable),
        },
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.as_str())
}

fn read_position(headers: &HeaderMap) -> Option<Position> {
    let (epoch, offset) = header(headers, POSITION)?.split_once(':')?;
    Some(Position::new(Epoch::parse(epoch).ok()?, offset.parse().ok()?))
}

fn to_last(sequence: u64, headers: &HeaderMap) -> Result<Last, EngineError> {
    let position =
        read_position(headers).ok_or_else(|| EngineError::Protocol("history message without a position".into()))?;
    let replaces = header(headers, REPLACES).and_then(|e| Epoch::parse(e).ok());
    Ok(Last { sequence, position, replaces })
}

enum Written {
    Done(u64),
    /// Another publisher got there first: read the top again.
    Raced,
}

impl Inner {
    /// The subject's last message, or `None` when it has none.
    async fn read_last(
        &self,
        channel: &ChannelName,
    ) -> Result<Option<(Last, js::message::StreamMessage)>, EngineError> {
        let subject = self.names.history(channel);
        match tokio::time::timeout(self.config.command_timeout, self.stream.get_last_raw_message_by_subject(&subject))
            .await
        {
            Err(_) => Err(EngineError::Timeout),
            Ok(Err(error)) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Ok(Err(error)) => Err(unavailable(error)),
            Ok(Ok(message)) => Ok(Some((to_last(message.sequence, &message.headers)?, message))),
        }
    }

    /// Appends a message to the channel's subject if its last sequence is still `expected`.
    async fn append(
        &self,
        channel: &ChannelName,
        expected: u64,
        position: &Position,
        replaces: Option<&Epoch>,
        marker: bool,
        payload: Bytes,
    ) -> Result<Written, EngineError> {
        let mut headers = HeaderMap::new();
        headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, expected.to_string().as_str());
        headers.insert(POSITION, format!("{}:{}", position.epoch, position.offset).as_str());
        headers.insert(PREV, expected.to_string().as_str());
        if let Some(replaces) = replaces {
            headers.insert(REPLACES, replaces.as_str());
        }
        if marker {
            headers.insert(MARKER, "1");
        }
        let subject = self.names.history(channel);
        let ack = async {
            let pending = self.js.publish_with_headers(subject, headers, payload).await?;
            pending.await
        };
        match tokio::time::timeout(self.config.command_timeout, ack).await {
            Err(_) => Err(EngineError::Timeout),
            Ok(Ok(ack)) => Ok(Written::Done(ack.sequence)),
            Ok(Err(error)) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(Written::Raced),
            Ok(Err(error)) if error.kind() == PublishErrorKind::TimedOut => Err(EngineError::Timeout),
            Ok(Err(error)) => Err(unavailable(error)),
        }
    }

    /// The channel's last message. A channel without any gets the first of a fresh epoch, written so
    /// that every node agrees on it. A channel whose last offset is below what this node published or
    /// delivered in the same epoch lost data (NATS restored from an older backup, a store lost under a
    /// single server): it is fenced into a new epoch before anyone assigns an offset in it again.
    pub(crate) async fn current(
        &self,
        channel: &ChannelName,
    ) -> Result<(Last, Option<js::message::StreamMessage>), EngineError> {
        for _ in 0..MAX_ATTEMPTS {
            // What this node knew before the read: everything in it was stored before the read began, so
            // the read can only be behind it if the data rolled back. (Taken after the read, it could
            // include a publication of this node stored while the read was on its way.)
            let known = self.known(channel);
            let found = self.read_last(channel).await?;
            let behind = found.as_ref().and_then(|(last, _)| {
                known.into_iter().find(|k| k.epoch == last.position.epoch && k.offset > last.position.offset)
            });
            let expected = match (found, &behind) {
                (Some((last, message)), None) => return Ok((last, Some(message))),
                (Some((last, _)), Some(known)) => {
                    self.rollbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%channel, epoch = %known.epoch, seen_offset = known.offset,
                        engine_offset = last.position.offset,
                        "channel position went backwards in nats (its data rolled back); fencing it into a new epoch");
                    last.sequence
                }
                (None, _) => 0,
            };
            let replaces = behind.map(|known| known.epoch);
            let position = Position::new(Epoch::generate(), 0);
            let marker = self.append(channel, expected, &position, replaces.as_ref(), true, Bytes::new()).await?;
            if let Written::Done(sequence) = marker {
                let last = Last { sequence, position, replaces };
                lock(&self.tops).insert(channel.clone(), last.clone());
                return Ok((last, None));
            }
        }
        Err(EngineError::Unavailable("too many concurrent writers on the channel".into()))
    }

    pub(crate) async fn top(&self, channel: &ChannelName) -> Result<Last, EngineError> {
        Ok(self.current(channel).await?.0)
    }

    /// Positions of the channel this node published or delivered last.
    fn known(&self, channel: &ChannelName) -> Vec<Position> {
        let published = lock(&self.tops).get(channel).map(|last| last.position.clone());
        let delivered = self.relay.get().and_then(|relay| relay.delivered(channel));
        published.into_iter().chain(delivered).collect()
    }

    /// Moves the channel to a new epoch if it is still in `epoch`.
    pub(crate) async fn fence(&self, channel: &ChannelName, epoch: &Epoch) -> Result<(), EngineError> {
        lock(&self.tops).remove(channel);
        for _ in 0..MAX_ATTEMPTS {
            let last = self.top(channel).await?;
            if &last.position.epoch != epoch {
                return Ok(());
            }
            let fresh = Position::new(Epoch::generate(), 0);
            if let Written::Done(_) =
                self.append(channel, last.sequence, &fresh, Some(epoch), true, Bytes::new()).await?
            {
                tracing::info!(%channel, epoch = %fresh.epoch, replaces = %epoch, "channel fenced into a new epoch");
                return Ok(());
            }
        }
        Err(EngineError::Unavailable("too many concurrent writers on the channel".into()))
    }

    pub(crate) async fn publish(&self, request: &PublishRequest, header: &str) -> Result<PublishOutcome, EngineError> {
        let reservation = match &request.idempotency_key {
            Some(key) => match self.reserve(&request.channel, key).await? {
                Reservation::Seen(outcome) => return Ok(outcome),
                Reservation::Mine { key, revision } => Some((key, revision)),
            },
            None => None,
        };
        let result = self.publish_new(request, header).await;
        if let Some((key, revision)) = reservation {
            match &result {
                Ok(outcome) => {
                    let record =
                        format!("{}:{}:{}", outcome.position.epoch, outcome.position.offset, request.correlation_id);
                    if let Err(error) = self.bounded(self.dedup.update(&key, record.into(), revision)).await {
                        tracing::warn!(%error, "recording an idempotency key failed; a retry may publish again");
                    }
                }
                Err(_) => {
                    let _ = self.bounded(self.dedup.purge(&key)).await;
                }
            }
        }
        result
    }

    async fn publish_new(&self, request: &PublishRequest, header: &str) -> Result<PublishOutcome, EngineError> {
        let channel = &request.channel;
        let cached = lock(&self.tops).get(channel).cloned();
        let mut last = match cached {
            Some(last) => last,
            None => self.top(channel).await?,
        };
        for _ in 0..MAX_ATTEMPTS {
            let position = Position::new(last.position.epoch.clone(), last.position.offset + 1);
            let publication = Publication::new(
                channel.clone(),
                position.clone(),
                request.event.clone(),
                &request.data,
                request.correlation_id.clone(),
                now_ms(),
                None,
            );
            let envelope = publication.envelope();
            let mut payload = Vec::with_capacity(header.len() + 1 + envelope.len());
            payload.extend_from_slice(header.as_bytes());
            payload.push(b'\n');
            payload.extend_from_slice(envelope);
            let written =
                self.append(channel, last.sequence, &position, last.replaces.as_ref(), false, payload.into()).await;
            match written {
                Ok(Written::Done(sequence)) => {
                    if self.config.replicas > 1 {
                        self.check_unique(channel, &last, sequence).await?;
                    }
                    let replaces = last.replaces.clone();
                    lock(&self.tops).insert(channel.clone(), Last { sequence, position: position.clone(), replaces });
                    return Ok(PublishOutcome {
                        position,
                        correlation_id: request.correlation_id.clone(),
                        duplicate: false,
                        receivers: None,
                    });
                }
                Ok(Written::Raced) => last = self.top(channel).await?,
                Err(error) => {
                    lock(&self.tops).remove(channel);
                    return Err(error);
                }
            }
        }
        lock(&self.tops).remove(channel);
        Err(EngineError::Unavailable("too many concurrent publishers on the channel".into()))
    }

    /// A replicated stream does not make the last-subject-sequence check serializable (nats-server
    /// #4320: concurrent publishes expecting the same sequence can both be stored; #8469: also across a
    /// leader change), so two publications could hold one offset. The publication stored at `sequence`
    /// after `last` keeps its offset only if it is the first message after `last` on the subject;
    /// otherwise the channel is fenced into a new epoch (every client of the old one gets a reset)
    /// and this publish fails, to be retried.
    async fn check_unique(&self, channel: &ChannelName, last: &Last, sequence: u64) -> Result<(), EngineError> {
        let subject = self.names.history(channel);
        let first = self.bounded(self.stream.get_first_raw_message_by_subject(&subject, last.sequence + 1)).await?;
        if first.sequence == sequence {
            return Ok(());
        }
        lock(&self.tops).remove(channel);
        self.rollbacks.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%channel, epoch = %last.position.epoch, offset = last.position.offset + 1,
            "two publications were stored with one offset (nats did not serialize them); fencing the channel");
        self.fence(channel, &last.position.epoch).await?;
        Err(EngineError::Unavailable("a concurrent publication took this position; retry".into()))
    }

    /// Claims an idempotency key, or finds what the first publish with it got.
    async fn reserve(&self, channel: &ChannelName, key: &str) -> Result<Reservation, EngineError> {
        let key = Names::dedup_key(channel, key);
        let pending = || Bytes::from(format!("pending:{}", now_ms()));
        let deadline = tokio::time::Instant::now() + self.config.command_timeout * 2;
        loop {
            match tokio::time::timeout(self.config.command_timeout, self.dedup.create(&key, pending())).await {
                Err(_) => return Err(EngineError::Timeout),
                Ok(Ok(revision)) => return Ok(Reservation::Mine { key, revision }),
                Ok(Err(error)) if error.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Ok(Err(error)) => return Err(unavailable(error)),
            }
            let Some(entry) = self.bounded(self.dedup.entry(key.clone())).await? else { continue };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let value = String::from_utf8_lossy(&entry.value).into_owned();
            if let Some(since) = value.strip_prefix("pending:") {
                let age = now_ms().saturating_sub(since.parse().unwrap_or(0));
                if age > RESERVATION_MAX_AGE.as_millis() as u64 {
                    // Its publisher died before finishing: take the key over.
                    if let Ok(revision) = self.bounded(self.dedup.update(&key, pending(), entry.revision)).await {
                        return Ok(Reservation::Mine { key, revision });
                    }
                } else if tokio::time::Instant::now() >= deadline {
                    return Err(EngineError::Unavailable("a publish with this idempotency key is in progress".into()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            return seen_outcome(&value).map(Reservation::Seen);
        }
    }

    /// See [`herald_core::Engine::history`].
    pub(crate) async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        let policy = self.config.policies.history(channel);
        let (last, message) = match self.current(channel).await? {
            (last, Some(message)) => (last, message),
            (last, None) => {
                if let Some(since) = since.filter(|s| s.epoch != last.position.epoch || s.offset > 0) {
                    let rolled_back = last.replaces.as_ref() == Some(&since.epoch);
                    return Ok(History::Gone { top: last.position, rolled_back });
                }
                return Ok(History::Covered { top: last.position, publications: Vec::new() });
            }
        };
        let top = last.position.clone();
        let (wanted, from) = match since {
            None => (limit.min(policy.size) as u64, top.offset.saturating_sub(limit.min(policy.size) as u64)),
            Some(since) => {
                if since.epoch != top.epoch || since.offset > top.offset {
                    return Ok(History::Gone { rolled_back: last.replaces.as_ref() == Some(&since.epoch), top });
                }
                if top.offset - since.offset > policy.size as u64 {
                    return Ok(History::Gone { top, rolled_back: false });
                }
                (top.offset - since.offset, since.offset)
            }
        };
        if wanted == 0 {
            return Ok(History::Covered { top, publications: Vec::new() });
        }
        let oldest_kept = now_ms().saturating_sub(policy.ttl.as_millis() as u64);
        let chain = self.walk_back(&last, message, from, oldest_kept, policy.max_bytes).await?;
        let complete = chain.first().is_some_and(|p| p.position.offset == from + 1);
        // Without `since` (the latest publications), whatever unbroken run survives is the answer.
        if !complete && since.is_some() {
            return Ok(History::Gone { top, rolled_back: false });
        }
        let budget = self.config.max_read_bytes.max(1);
        let mut bytes = 0;
        let mut publications = Vec::new();
        for publication in chain {
            if publications.len() >= limit || bytes >= budget {
                break;
            }
            bytes += publication.envelope().len();
            publications.push(publication);
        }
        Ok(History::Covered { top, publications })
    }

    /// The publications after offset `from` up to `last`, oldest first, as far back as the chain of
    /// `Herald-Prev` links is unbroken and younger than `oldest_kept` (ms), and as far as the channel's
    /// byte budget reaches (`HistoryPolicy::max_bytes`, counted from the newest, which is always kept).
    async fn walk_back(
        &self,
        last: &Last,
        message: js::message::StreamMessage,
        from: u64,
        oldest_kept: u64,
        max_bytes: usize,
    ) -> Result<Vec<Arc<Publication>>, EngineError> {
        let mut chain: Vec<Arc<Publication>> = Vec::new();
        let mut bytes = 0usize;
        let mut message = message;
        while let Some(position) = read_position(&message.headers) {
            if position.epoch != last.position.epoch || position.offset <= from {
                break;
            }
            let stamp = message.time.unix_timestamp_nanos() / 1_000_000;
            if stamp < oldest_kept as i128 || header(&message.headers, MARKER).is_some() {
                break;
            }
            let Some(publication) = parse_payload(&message.payload) else { break };
            bytes = bytes.saturating_add(publication.envelope().len());
            if bytes > max_bytes && !chain.is_empty() {
                break;
            }
            chain.push(Arc::new(publication));
            let prev: u64 = header(&message.headers, PREV).and_then(|p| p.parse().ok()).unwrap_or(0);
            if prev == 0 {
                break;
            }
            match tokio::time::timeout(self.config.command_timeout, self.stream.get_raw_message(prev)).await {
                Err(_) => return Err(EngineError::Timeout),
                Ok(Ok(earlier)) => message = earlier,
                Ok(Err(error)) if error.kind() == LastRawMessageErrorKind::NoMessageFound => break,
                Ok(Err(error)) => return Err(unavailable(error)),
            }
        }
        chain.reverse();
        Ok(chain)
    }
}

/// The publication in a stored payload (header line, `\n`, envelope).
fn parse_payload(payload: &[u8]) -> Option<Publication> {
    let split = payload.iter().position(|b| *b == b'\n')?;
    Publication::from_envelope(Bytes::copy_from_slice(&payload[split + 1..]), None).ok()
}

enum Reservation {
    /// The key was published before: its outcome.
    Seen(PublishOutcome),
    /// This publish holds the key (at `revision`) until it records its outcome.
    Mine { key: String, revision: u64 },
}

/// `epoch:offset:correlation`, as recorded for an idempotency key.
fn seen_outcome(record: &str) -> Result<PublishOutcome, EngineError> {
    let protocol = || EngineError::Protocol(format!("unreadable idempotency record {record:?}"));
    let mut parts = record.splitn(3, ':');
    let (Some(epoch), Some(offset), Some(correlation)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(protocol());
    };
    let epoch = Epoch::parse(epoch).map_err(|_| protocol())?;
    Ok(PublishOutcome {
        position: Position::new(epoch, offset.parse().map_err(|_| protocol())?),
        correlation_id: Arc::from(correlation),
        duplicate: true,
        receivers: None,
    })
}

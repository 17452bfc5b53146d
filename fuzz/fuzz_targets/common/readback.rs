//! Shared by the `publish_readback` targets: publish `data` through the code path of `POST /v1/publish`
//! (`parse_publish_body`, then the memory engine), read it back through every path a client or a node
//! uses (the live envelope and its SSE line, the WebSocket message, `Publication::from_envelope` as
//! another node or the Redis history reads it, the envelope the Redis publish script assembles, the
//! `/v1/history` answer) and check that the data bytes are identical everywhere and nothing panics.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use herald_core::publication::format_timestamp;
use herald_core::{Engine, History, MemoryEngine, Policies, Publication, PublishRequest};
use serde_json::Value;
use serde_json::value::RawValue;

/// Runs a future of the memory engine, which never waits (its locks are synchronous).
fn now<F: Future>(future: F) -> F::Output {
    match pin!(future).as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the memory engine never waits"),
    }
}

fn without_whitespace(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().copied().filter(|b| !b" \t\n\r".contains(b)).collect()
}

pub fn check(data: &[u8]) {
    let mut body = Vec::with_capacity(data.len() + 32);
    body.extend_from_slice(br#"{"channel":"fuzz:1","data":"#);
    body.extend_from_slice(data);
    body.push(b'}');
    let Ok(valid) = herald_server::api::parse_publish_body(&body) else { return };
    let accepted = valid.data.get().as_bytes().to_vec();

    // Compaction removed whitespace between tokens and nothing else.
    assert!(!accepted.contains(&b'\n') && !accepted.contains(&b'\r'), "accepted data fits one line");
    if let Ok(sent) = serde_json::from_slice::<&RawValue>(data) {
        assert_eq!(without_whitespace(sent.get().as_bytes()), without_whitespace(&accepted), "only whitespace removed");
        if let Ok(value) = serde_json::from_str::<Value>(sent.get()) {
            let kept: Value = serde_json::from_slice(&accepted).expect("compacted JSON parses like the original");
            assert_eq!(value, kept);
        }
    }

    // Published as the API does.
    let engine = MemoryEngine::new("fuzz", Policies::default());
    let channel = valid.channel.clone();
    let event = valid.event.clone();
    let request = PublishRequest {
        channel: channel.clone(),
        event: valid.event,
        data: valid.data,
        idempotency_key: None,
        correlation_id: Arc::from("fuzz"),
        receipt: None,
        trace_parent: None,
    };
    let outcome = now(engine.publish(request)).expect("the memory engine accepts any valid publication");
    let History::Covered { top, publications } = now(engine.history(&channel, None, 10)).expect("history") else {
        panic!("history without since always covers");
    };
    let publication = publications.last().expect("the publication is in history");
    assert_eq!(publication.position, outcome.position);

    // The live envelope: exactly what the Redis publish script assembles, data as accepted, one line.
    let envelope = publication.envelope().clone();
    let mut expected = format!(
        r#"{{"channel":"{}","epoch":"{}","offset":{},"event":"{}","data":"#,
        channel.as_str(),
        top.epoch.as_str(),
        top.offset,
        event
    )
    .into_bytes();
    expected.extend_from_slice(&accepted);
    expected.extend_from_slice(
        format!(r#","correlation_id":"fuzz","published_at":"{}"}}"#, format_timestamp(publication.published_at_ms))
            .as_bytes(),
    );
    assert_eq!(&envelope[..], &expected[..], "envelope");
    assert!(!envelope.contains(&b'\n') && !envelope.contains(&b'\r'), "the envelope fits one SSE data: line");
    let mut ws = b"{\"type\":\"message\",".to_vec();
    ws.extend_from_slice(&envelope[1..]);
    assert_eq!(&publication.ws_message()[..], &ws[..], "WebSocket message");

    // Read back as another node (pub/sub) or the Redis engine's history (XRANGE) does.
    let back = Publication::from_envelope(envelope.clone(), None).expect("every envelope Herald makes reads back");
    assert_eq!(back.envelope(), &envelope);
    assert_eq!((&back.channel, &back.position), (&channel, &publication.position));
    assert_eq!((&*back.event, &*back.correlation_id), (&*event, "fuzz"));
    assert_eq!(back.published_at_ms, publication.published_at_ms);

    // The /v1/history answer: the stored envelope itself, in valid JSON.
    let answer: Vec<u8> = herald_server::api::history_chunks(&channel, &top, &publications, usize::MAX)
        .iter()
        .flat_map(|chunk| chunk.iter().copied())
        .collect();
    let mut expected = format!(
        r#"{{"channel":"{}","epoch":"{}","offset":{},"publications":["#,
        channel.as_str(),
        top.epoch.as_str(),
        top.offset
    )
    .into_bytes();
    expected.extend_from_slice(&envelope);
    expected.extend_from_slice(b"]}");
    assert_eq!(answer, expected, "history answer");
    assert!(serde_json::from_slice::<&RawValue>(&answer).is_ok(), "the history answer is JSON");
}

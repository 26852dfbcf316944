//! Stream continuation end to end: a stream cut after its commit point is finished on a
//! prefill-capable backup route, over real HTTP on loopback against `MockProvider`, under
//! paused time; and a property over a fake transport for any cut point and chunking.

#![cfg(feature = "testing")]

#[path = "support/log.rs"]
mod log;
#[path = "support/prices.rs"]
mod prices;
use log::response_log;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_resilience::attempt_log::{Decision, Outcome, StreamEnd};
use tower_llm_resilience::budget::SpendStatus;
use tower_llm_resilience::policy::{
    ContinuationCause, ContinuationPolicy, DEFAULT_CONTINUATION_INSTRUCTION, Policy, PrefillForm,
    Price, RouteConfig, SpendPolicy,
};
use tower_llm_resilience::testing::{self, MockProvider, Reply, ScriptKey};
use tower_llm_resilience::{
    AttemptLog, Body, Error, ErrorKind, ResilienceLayer, Resilient, StreamCause,
};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// The canonical answer, as the primary streams it and the backup continues it.
const ANSWER: [&str; 8] = [
    "The ", "quick ", "brown ", "fox ", "jumps ", "over ", "the ", "dog.",
];
const PRIMARY_MODEL: &str = "primary-model";
const BACKUP_MODEL: &str = "backup-model";

fn canonical() -> String {
    ANSWER.concat()
}

async fn start() -> MockProvider {
    MockProvider::start()
        .await
        .unwrap_or_else(|e| panic!("mock starts: {e}"))
}

fn backup(mock: &MockProvider, name: &str, model: &str, form: Option<PrefillForm>) -> RouteConfig {
    let route = RouteConfig::new(name)
        .base_url(format!("{}/{name}", mock.url()))
        .model(model);
    match form {
        Some(form) => route.prefill(form),
        None => route,
    }
}

/// The interactive preset, seeded, with continuation on and one prefill-capable backup.
fn policy(mock: &MockProvider, form: PrefillForm) -> Policy {
    let mut policy = Policy::interactive();
    policy.retry.seed = Some(11);
    policy.stream.continuation = ContinuationPolicy::enabled();
    policy.fallback.routes = vec![backup(mock, "backup", BACKUP_MODEL, Some(form))];
    policy
}

fn stack(policy: &Policy) -> Resilient<Client> {
    let layer = ResilienceLayer::new(policy).unwrap_or_else(|e| panic!("valid policy: {e}"));
    let mut client = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());
    client.get_mut().enable_continuation::<Full<Bytes>>();
    client
}

fn openai_request(mock: &MockProvider) -> Request<Full<Bytes>> {
    testing::chat_request(&mock.url(), PRIMARY_MODEL, true)
}

const ANTHROPIC_BODY: &str = r#"{"model":"primary-model","max_tokens":64,"stream":true,"system":"Be brief.","messages":[{"role":"user","content":"hello"}]}"#;

fn anthropic_request(mock: &MockProvider) -> Request<Full<Bytes>> {
    Request::post(format!("{}/v1/messages", mock.url()))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(Full::new(Bytes::from_static(ANTHROPIC_BODY.as_bytes())))
        .unwrap_or_else(|e| panic!("request: {e}"))
}

async fn call<S>(svc: &mut S, req: Request<Full<Bytes>>) -> Response<Body>
where
    S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
{
    match svc.ready().await {
        Ok(svc) => svc
            .call(req)
            .await
            .unwrap_or_else(|e| panic!("a committed stream: {e}")),
        Err(e) => panic!("ready: {e}"),
    }
}

/// Reads a body to its end: what reached the caller, and the error it ended with.
async fn read(body: Body) -> (String, Option<Error>) {
    let mut body = body;
    let mut out = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => return (String::from_utf8_lossy(&out).into_owned(), Some(e)),
            None => return (String::from_utf8_lossy(&out).into_owned(), None),
        }
    }
}

/// One event of the caller's stream.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    name: String,
    data: String,
}

/// The caller's stream as events; `None` when it is not one well-formed event stream (a
/// partial event at the end, a line outside `event:`/`data:`).
fn events(stream: &str) -> Option<Vec<Event>> {
    if !stream.is_empty() && !stream.ends_with("\n\n") {
        return None;
    }
    let mut out = Vec::new();
    for block in stream.split("\n\n").filter(|b| !b.is_empty()) {
        let (mut name, mut data) = (String::new(), Vec::new());
        for line in block.lines() {
            if let Some(n) = line.strip_prefix("event: ") {
                name = n.to_owned();
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push(d);
            } else {
                return None;
            }
        }
        out.push(Event {
            name,
            data: data.join("\n"),
        });
    }
    Some(out)
}

fn json(e: &Event) -> Value {
    serde_json::from_str(&e.data).unwrap_or_else(|err| panic!("JSON event {e:?}: {err}"))
}

/// Checks that `stream` is one well-formed OpenAI chat stream — one role chunk first, one id,
/// one finish reason, `[DONE]` once and last — and returns its text.
fn openai_stream_text(stream: &str) -> String {
    let events = events(stream).unwrap_or_else(|| panic!("well-formed events: {stream}"));
    let (last, chunks) = events
        .split_last()
        .unwrap_or_else(|| panic!("no events: {stream}"));
    assert_eq!(last.data, "[DONE]", "{stream}");
    let chunks: Vec<Value> = chunks.iter().map(json).collect();
    let roles = chunks
        .iter()
        .filter(|c| !c["choices"][0]["delta"]["role"].is_null())
        .count();
    assert_eq!(roles, 1, "one role chunk: {stream}");
    assert!(!chunks[0]["choices"][0]["delta"]["role"].is_null());
    let ids: std::collections::BTreeSet<String> = chunks
        .iter()
        .map(|c| c["id"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one chunk id: {ids:?}");
    let finishes = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"].is_string())
        .count();
    assert_eq!(finishes, 1, "{stream}");
    assert!(chunks.iter().all(|c| {
        c["choices"]
            .as_array()
            .is_none_or(|cs| cs.iter().all(|ch| ch["index"] == 0))
    }));
    chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Checks that `stream` is one well-formed Anthropic message stream — `message_start` once
/// and first, each content block started, given deltas and stopped in order with indices
/// counting from 0, one `message_delta` with a stop reason, `message_stop` once and last —
/// and returns its text.
fn anthropic_stream_text(stream: &str) -> String {
    let events = events(stream).unwrap_or_else(|| panic!("well-formed events: {stream}"));
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{stream}");
    assert_eq!(names.last(), Some(&"message_stop"), "{stream}");
    assert_eq!(names.iter().filter(|n| **n == "message_start").count(), 1);
    assert_eq!(names.iter().filter(|n| **n == "message_stop").count(), 1);
    let deltas: Vec<Value> = events
        .iter()
        .filter(|e| e.name == "message_delta")
        .map(json)
        .collect();
    assert_eq!(deltas.len(), 1, "{stream}");
    assert!(deltas[0]["delta"]["stop_reason"].is_string());
    let (mut open, mut next, mut text) = (None::<u64>, 0u64, String::new());
    for e in &events {
        let v = json(e);
        let index = v["index"].as_u64();
        match e.name.as_str() {
            "content_block_start" => {
                assert_eq!(open, None, "a block started inside another: {stream}");
                assert_eq!(index, Some(next), "block indices count from 0: {stream}");
                open = index;
                next += 1;
            }
            "content_block_delta" => {
                assert_eq!(index, open, "a delta outside its block: {stream}");
                text.push_str(v["delta"]["text"].as_str().unwrap_or(""));
            }
            "content_block_stop" => {
                assert_eq!(index, open, "{stream}");
                open = None;
            }
            "message_delta" | "message_stop" => assert_eq!(open, None, "{stream}"),
            _ => {}
        }
    }
    text
}

fn continues(log: &AttemptLog) -> Vec<(String, u64)> {
    log.attempts()
        .iter()
        .flat_map(|a| a.decisions.clone())
        .filter_map(|d| match d {
            Decision::Continue {
                to,
                delivered_bytes,
            } => Some((to.to_string(), delivered_bytes)),
            _ => None,
        })
        .collect()
}

/// The route of each attempt.
fn routes(log: &AttemptLog) -> Vec<Option<String>> {
    log.attempts()
        .iter()
        .map(|a| a.route.as_ref().map(|r| r.to_string()))
        .collect()
}

fn ends(log: &AttemptLog) -> Vec<Option<StreamEnd>> {
    log.attempts()
        .iter()
        .map(|a| a.stream.as_ref().map(|s| s.end.clone()))
        .collect()
}

/// The length of the first `n` events of `stream`.
fn events_len(stream: &str, n: usize) -> u64 {
    let mut at = 0;
    for _ in 0..n {
        match stream[at..].find("\n\n") {
            Some(i) => at += i + 2,
            None => panic!("fewer than {n} events: {stream}"),
        }
    }
    at as u64
}

// ------------------------------------------------------------------------------ OpenAI

#[tokio::test(start_paused = true)]
async fn an_openai_stream_cut_after_three_content_events_is_finished_by_the_backup() {
    let mock = start().await;
    // The role chunk and three content chunks, then the connection drops.
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut svc = stack(&policy(&mock, PrefillForm::OpenAi));
    let response = call(&mut svc, openai_request(&mock)).await;
    assert_eq!(response.status(), 200);
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(openai_stream_text(&stream), canonical());
    // The usage chunk is the continuation's.
    let usage = events(&stream)
        .and_then(|e| e.iter().rev().nth(1).cloned())
        .map(|e| json(&e));
    assert_eq!(
        usage.map(|u| u["usage"]["completion_tokens"].clone()),
        Some(Value::from(5))
    );

    // Two attempts: the cut one, then the continuation, each its own record.
    let attempts = log.attempts();
    assert_eq!(attempts.len(), 2, "{log}");
    assert_eq!(
        attempts[0].route.as_ref().map(|r| r.as_str()),
        Some("primary")
    );
    assert_eq!(
        attempts[1].route.as_ref().map(|r| r.as_str()),
        Some("backup")
    );
    let delivered = events_len(&stream, 4);
    assert_eq!(continues(&log), [("backup".to_owned(), delivered)], "{log}");
    assert_eq!(
        ends(&log),
        [
            Some(StreamEnd::Interrupted(StreamCause::Disconnected)),
            Some(StreamEnd::Complete)
        ]
    );
    assert_eq!(
        attempts[0].stream.as_ref().map(|s| s.bytes),
        Some(delivered)
    );
    assert_eq!(
        attempts[1]
            .stream
            .as_ref()
            .and_then(|s| s.usage)
            .map(|u| u.output_tokens),
        Some(5)
    );
    assert_eq!(
        log.snapshot().outcome,
        Some(Outcome::Success { status: 200 })
    );
    assert!(
        log.to_string()
            .contains(&format!("continue on backup after {delivered} bytes")),
        "{log}"
    );

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].prefill, None);
    assert_eq!(requests[1].path, "/backup/v1/chat/completions");
    assert_eq!(requests[1].prefill.as_deref(), Some("The quick brown "));
}

#[tokio::test(start_paused = true)]
async fn the_continuation_request_is_the_original_with_the_partial_answer_last() {
    let original = {
        let req = testing::chat_request("http://127.0.0.1:1", PRIMARY_MODEL, true);
        String::from_utf8_lossy(
            &req.into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default(),
        )
        .into_owned()
    };
    let instruction = serde_json::to_string(DEFAULT_CONTINUATION_INSTRUCTION).unwrap_or_default();
    for (form, added) in [
        (
            PrefillForm::OpenAi,
            format!(
                r#",{{"role":"system","content":{instruction}}},{{"role":"assistant","content":"The quick brown "}}"#
            ),
        ),
        (
            PrefillForm::Mistral,
            r#",{"role":"assistant","content":"The quick brown ","prefix":true}"#.to_owned(),
        ),
    ] {
        let mock = start().await;
        mock.script(
            ScriptKey::model(PRIMARY_MODEL),
            [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
        );
        mock.script(
            ScriptKey::model(BACKUP_MODEL),
            [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
        );
        let mut svc = stack(&policy(&mock, form));
        let response = call(&mut svc, openai_request(&mock)).await;
        let (stream, error) = read(response.into_body()).await;
        assert!(error.is_none(), "{form:?}: {error:?}");
        assert_eq!(openai_stream_text(&stream), canonical());
        let requests = mock.requests();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].body, original.as_bytes());
        // Byte for byte: the model switched, the partial answer after the original messages,
        // every other byte as the caller wrote it.
        let messages_end = r#""content":"hello"}"#;
        let want = original
            .replace(
                &format!(r#""model":"{PRIMARY_MODEL}""#),
                &format!(r#""model":"{BACKUP_MODEL}""#),
            )
            .replace(messages_end, &format!("{messages_end}{added}"));
        assert_eq!(String::from_utf8_lossy(&requests[1].body), want, "{form:?}");
        assert_eq!(
            requests[1].headers["content-length"],
            want.len().to_string().as_str()
        );
        let has_instruction =
            String::from_utf8_lossy(&requests[1].body).contains(DEFAULT_CONTINUATION_INSTRUCTION);
        assert_eq!(has_instruction, form == PrefillForm::OpenAi, "{form:?}");
    }
}

// ------------------------------------------------------------------------------ Anthropic

#[tokio::test(start_paused = true)]
async fn an_anthropic_stream_cut_after_three_content_events_is_finished_by_the_backup() {
    let mock = start().await;
    // message_start, content_block_start, ping, three deltas; then the connection drops.
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::anthropic_stream(PRIMARY_MODEL, &ANSWER).cut_after(6)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::anthropic_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut svc = stack(&policy(&mock, PrefillForm::Anthropic));
    let response = call(&mut svc, anthropic_request(&mock)).await;
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(anthropic_stream_text(&stream), canonical());
    assert_eq!(log.attempt_count(), 2, "{log}");
    assert_eq!(continues(&log).len(), 1);

    // The Messages API refuses a prefill ending in whitespace: it is sent without its trailing
    // space, and the space the continuation starts with is not given twice.
    let requests = mock.requests();
    assert_eq!(requests[1].path, "/backup/v1/messages");
    assert_eq!(requests[1].prefill.as_deref(), Some("The quick brown"));
    let want = ANTHROPIC_BODY.replace(PRIMARY_MODEL, BACKUP_MODEL).replace(
        r#""content":"hello"}"#,
        r#""content":"hello"},{"role":"assistant","content":"The quick brown"}"#,
    );
    assert_eq!(String::from_utf8_lossy(&requests[1].body), want);
    assert!(!want.contains("Continue exactly"));
    assert_eq!(requests[1].headers["anthropic-version"], "2023-06-01");
}

#[tokio::test(start_paused = true)]
async fn after_a_closed_block_the_continuations_blocks_follow_it() {
    let mock = start().await;
    // Everything up to the block's stop, then the connection drops before `message_delta`.
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::anthropic_stream(PRIMARY_MODEL, &ANSWER[..3]).cut_after(7)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::anthropic_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut svc = stack(&policy(&mock, PrefillForm::Anthropic));
    let response = call(&mut svc, anthropic_request(&mock)).await;
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    // Two blocks, 0 and 1, in order; the text is whole.
    assert_eq!(anthropic_stream_text(&stream), canonical());
    assert_eq!(stream.matches("event: content_block_start").count(), 2);
}

// ------------------------------------------------------------------------------ when not

#[tokio::test(start_paused = true)]
async fn a_continuation_that_is_cut_itself_ends_in_stream_interrupted() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
    );
    // The continuation's role chunk and two content chunks, then it drops too.
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER).cut_after(3)],
    );
    let mut svc = stack(&policy(&mock, PrefillForm::OpenAi));
    let response = call(&mut svc, openai_request(&mock)).await;
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    let Some(error) = error else {
        panic!("a cut continuation must not end cleanly: {stream}");
    };
    match error.kind() {
        ErrorKind::StreamInterrupted {
            delivered_bytes,
            cause,
        } => {
            assert_eq!(*delivered_bytes, stream.len() as u64);
            assert_eq!(*cause, StreamCause::Disconnected);
        }
        other => panic!("StreamInterrupted, not {other:?}"),
    }
    // Whole events only, and the text is where the answer was when the continuation dropped.
    let text: String = events(&stream)
        .unwrap_or_else(|| panic!("well-formed events: {stream}"))
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "The quick brown fox jumps ");
    assert!(!stream.contains("[DONE]"));
    // The limit of one continuation holds: nothing more was sent.
    assert_eq!(mock.request_count(), 2);
    assert_eq!(continues(&log).len(), 1);
    assert!(matches!(
        log.snapshot().outcome,
        Some(Outcome::Error { .. })
    ));
    assert_eq!(
        ends(&log)[1],
        Some(StreamEnd::Interrupted(StreamCause::Disconnected))
    );
}

#[tokio::test(start_paused = true)]
async fn two_continuations_when_the_policy_allows_two() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER).cut_after(3)],
    );
    mock.script(
        ScriptKey::model("second-model"),
        [Reply::openai_continuation("second-model", &ANSWER)],
    );
    let mut policy = policy(&mock, PrefillForm::OpenAi);
    policy.fallback.routes.push(backup(
        &mock,
        "second",
        "second-model",
        Some(PrefillForm::OpenAi),
    ));
    policy.stream.continuation.max_continuations = 2;
    let mut svc = stack(&policy);
    let response = call(&mut svc, openai_request(&mock)).await;
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(openai_stream_text(&stream), canonical());
    let requests = mock.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(
        requests[2].prefill.as_deref(),
        Some("The quick brown fox jumps ")
    );
    let c = continues(&log);
    assert_eq!(
        c.iter().map(|(to, _)| to.as_str()).collect::<Vec<_>>(),
        ["backup", "second"]
    );
    assert!(c[0].1 < c[1].1, "{c:?}");
}

#[tokio::test(start_paused = true)]
async fn a_route_without_supports_prefill_is_never_sent_a_prefill() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
    );
    mock.script(
        ScriptKey::model("plain-model"),
        [Reply::openai_continuation("plain-model", &ANSWER)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut policy = policy(&mock, PrefillForm::OpenAi);
    policy
        .fallback
        .routes
        .insert(0, backup(&mock, "plain", "plain-model", None));
    let mut svc = stack(&policy);
    let response = call(&mut svc, openai_request(&mock)).await;
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(openai_stream_text(&stream), canonical());
    let requests = mock.requests();
    assert!(requests.iter().all(|r| !r.path.starts_with("/plain")));
    assert_eq!(requests.len(), 2);

    // With only that route, continuation cannot be turned on at all.
    let mut only_plain = policy.clone();
    only_plain.fallback.routes.truncate(1);
    let err = ResilienceLayer::new(&only_plain).err();
    assert_eq!(
        err.as_ref().map(|e| e.field()),
        Some("stream.continuation.enabled")
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_before_the_commit_point_takes_the_ordinary_path_never_a_continuation() {
    let mock = start().await;
    // Only the role chunk before the cut: nothing reached the caller.
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(1)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut svc = stack(&policy(&mock, PrefillForm::OpenAi));
    let response = call(&mut svc, openai_request(&mock)).await;
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    // The whole answer once: the backup's own, not a continuation.
    assert_eq!(openai_stream_text(&stream), canonical());
    assert!(mock.requests().iter().all(|r| r.prefill.is_none()));
    assert!(continues(&log).is_empty(), "{log}");
    assert!(
        ends(&log)
            .iter()
            .any(|e| matches!(e, Some(StreamEnd::FailedBeforeCommit(_)))),
        "{log}"
    );
}

#[tokio::test(start_paused = true)]
async fn without_the_policy_or_the_sender_a_cut_stream_ends_in_stream_interrupted() {
    assert!(!Policy::interactive().stream.continuation.enabled);
    assert!(!Policy::batch().stream.continuation.enabled);
    for case in ["policy off", "no sender", "cause not listed"] {
        let mock = start().await;
        mock.script(
            ScriptKey::model(PRIMARY_MODEL),
            [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
        );
        mock.script(
            ScriptKey::model(BACKUP_MODEL),
            [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
        );
        let mut policy = policy(&mock, PrefillForm::OpenAi);
        let mut svc = match case {
            "policy off" => {
                policy.stream.continuation.enabled = false;
                stack(&policy)
            }
            "no sender" => ServiceBuilder::new()
                .layer(ResilienceLayer::new(&policy).unwrap_or_else(|e| panic!("{e}")))
                .service(testing::client()),
            _ => {
                policy.stream.continuation.causes = vec![ContinuationCause::IdleTimeout];
                stack(&policy)
            }
        };
        let response = call(&mut svc, openai_request(&mock)).await;
        let (stream, error) = read(response.into_body()).await;
        let kind = error.map(|e| e.kind().clone());
        assert_eq!(
            kind,
            Some(ErrorKind::StreamInterrupted {
                delivered_bytes: stream.len() as u64,
                cause: StreamCause::Disconnected
            }),
            "{case}"
        );
        assert_eq!(events(&stream).map(|e| e.len()), Some(4), "{case}");
        assert_eq!(mock.request_count(), 1, "{case}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_line_longer_than_any_event_is_handed_over_not_held_and_not_continued() {
    let mock = start().await;
    // Two content events, then a line of 5 MiB that never ends: the body closes within it.
    let chunk = |text: &str| {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let endless = format!("data: {}", "x".repeat(5 * 1024 * 1024));
    let body = format!("{}{}{endless}", chunk("The"), chunk(" quick"));
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::raw_sse(body.clone())],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut svc = stack(&policy(&mock, PrefillForm::OpenAi));
    let response = call(&mut svc, openai_request(&mock)).await;
    let (stream, error) = read(response.into_body()).await;
    // Every byte reached the caller as it came, none was held to the end; with a partial
    // line delivered there is no clean end to continue from.
    assert_eq!(stream.len(), body.len());
    assert!(
        stream == body,
        "the caller's stream is the primary's, byte for byte"
    );
    assert!(
        matches!(
            error.map(|e| e.kind().clone()),
            Some(ErrorKind::StreamInterrupted {
                cause: StreamCause::Truncated,
                ..
            })
        ),
        "{}",
        stream.len()
    );
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_in_band_error_is_continued_and_never_reaches_the_caller() {
    let mock = start().await;
    let overloaded = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}".to_owned();
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::anthropic_stream(PRIMARY_MODEL, &ANSWER).error_after(5, overloaded)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::anthropic_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut svc = stack(&policy(&mock, PrefillForm::Anthropic));
    let response = call(&mut svc, anthropic_request(&mock)).await;
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert!(!stream.contains("overloaded_error"));
    assert_eq!(anthropic_stream_text(&stream), canonical());
    assert_eq!(mock.requests()[1].prefill.as_deref(), Some("The quick"));
    assert!(matches!(
        ends(&log)[0],
        Some(StreamEnd::Interrupted(StreamCause::InBandError { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn spend_counts_both_attempts() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut policy = policy(&mock, PrefillForm::OpenAi);
    let mut spend = SpendPolicy::default();
    spend.cap = 1.0;
    spend.default_price = Some(Price::new(1.0, 1.0));
    spend.default_owner = Some("team".to_owned());
    policy.budget.spend = Some(spend);
    let layer = ResilienceLayer::new(&policy).unwrap_or_else(|e| panic!("{e}"));
    let handle = layer.spend().unwrap_or_else(|| panic!("a spend handle"));
    let mut svc = ServiceBuilder::new()
        .layer(layer)
        .service(testing::client());
    svc.get_mut().enable_continuation::<Full<Bytes>>();
    let response = call(&mut svc, openai_request(&mock)).await;
    // Each attempt reserves 71 (7 prompt tokens, 64 output); the continuation's is taken only
    // once the stream is cut.
    assert_eq!(
        handle.status("team").await.ok(),
        Some(SpendStatus::new(0, 71))
    );
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(openai_stream_text(&stream), canonical());
    // Settled: the cut attempt reported no usage and may have been billed, so it keeps its
    // reservation (71); the continuation is billed its usage (9 in, 5 out).
    assert_eq!(
        handle.status("team").await.ok(),
        Some(SpendStatus::new(71 + 14, 0))
    );
}

#[cfg(feature = "serde")]
#[test]
fn the_policy_file_turns_it_on_per_route() {
    let toml = r#"
        [stream.continuation]
        enabled = true
        causes = ["connection_lost", "truncated"]
        max_continuations = 2

        [fallback]
        primary = "primary"

        [[fallback.routes]]
        name = "backup"
        base_url = "https://backup.example/v1"
        model = "claude-backup"
        supports_prefill = true
        prefill_form = "anthropic"
    "#;
    let policy: Policy = toml::from_str(toml).unwrap_or_else(|e| panic!("{e}"));
    assert!(policy.validate().is_ok());
    let c = &policy.stream.continuation;
    assert!(c.enabled);
    assert_eq!(
        c.causes,
        [
            ContinuationCause::ConnectionLost,
            ContinuationCause::Truncated
        ]
    );
    assert_eq!(c.max_continuations, 2);
    assert_eq!(
        policy.fallback.routes[0].prefill_form,
        Some(PrefillForm::Anthropic)
    );
    assert!(ResilienceLayer::new(&policy).is_ok());

    // A prefill without its wire form is an error naming the field.
    let no_form = toml.replace("prefill_form = \"anthropic\"", "");
    let policy: Policy = toml::from_str(&no_form).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        policy.validate().err().map(|e| e.field().to_owned()),
        Some("fallback.routes[0].prefill_form".to_owned())
    );
    let zero = toml.replace("max_continuations = 2", "max_continuations = 0");
    let policy: Policy = toml::from_str(&zero).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        policy.validate().err().map(|e| e.field().to_owned()),
        Some("stream.continuation.max_continuations".to_owned())
    );
    // Unknown fields stay errors.
    assert!(
        toml::from_str::<Policy>(&toml.replace("max_continuations", "max_contnuations")).is_err()
    );
}

// ------------------------------------------------------------------------------ property

mod any_cut {
    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use http_body::Frame;
    use proptest::prelude::*;
    use tower_llm_resilience::replay::ReplayBody;

    /// An OpenAI chat stream of `chunks` with chunk id `id`, as providers write it.
    fn stream_of(id: &str, chunks: &[String]) -> Vec<u8> {
        let head = format!(r#""id":"{id}","object":"chat.completion.chunk","model":"m""#);
        let mut s = format!(
            "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"finish_reason\":null}}]}}\n\n"
        );
        for c in chunks {
            let text = serde_json::to_string(c).unwrap_or_default();
            s.push_str(&format!(
                "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{text}}},\"finish_reason\":null}}]}}\n\n"
            ));
        }
        s.push_str(&format!(
            "data: {{{head},\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\n"
        ));
        s.push_str(&format!(
            "data: {{{head},\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":{}}}}}\n\n",
            chunks.len()
        ));
        s.push_str("data: [DONE]\n\n");
        s.into_bytes()
    }

    /// A body of the given chunks that ends cleanly, or with an error when `cut`.
    struct Chunks {
        chunks: VecDeque<Bytes>,
        cut: bool,
    }

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if let Some(c) = self.chunks.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(c))));
            }
            if self.cut {
                self.cut = false;
                return Poll::Ready(Some(Err(std::io::Error::other("connection reset"))));
            }
            Poll::Ready(None)
        }
    }

    /// `bytes` up to `cut` (all of it when `None`), split at `points`.
    fn body(bytes: &[u8], cut: Option<usize>, points: &[usize]) -> Chunks {
        let end = cut.map_or(bytes.len(), |c| c.min(bytes.len()));
        let mut at: Vec<usize> = points.iter().map(|p| p % (end + 1)).collect();
        at.sort_unstable();
        let mut chunks = VecDeque::new();
        let mut from = 0;
        for p in at.into_iter().chain([end]) {
            if p > from {
                chunks.push_back(Bytes::copy_from_slice(&bytes[from..p]));
                from = p;
            }
        }
        Chunks {
            chunks,
            cut: end < bytes.len(),
        }
    }

    fn answer() -> Vec<String> {
        ANSWER.iter().map(|s| (*s).to_owned()).collect()
    }

    /// The text of the OpenAI chunks of a caller's stream; a partial event at the end is not
    /// text the caller can read.
    fn text_of(stream: &str) -> String {
        stream
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }

    fn runtime() -> tokio::runtime::Runtime {
        match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("a test runtime: {e}"),
        }
    }

    fn config() -> ProptestConfig {
        let c = ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        if std::env::var_os("PROPTEST_CASES").is_some() {
            return c;
        }
        ProptestConfig { cases: 96, ..c }
    }

    /// The stack over a fake transport: the primary answers `primary` cut at `cut` in
    /// `points`; the backup continues from the prefill, cut at `backup_cut`.
    fn fake_stack(
        policy: &Policy,
        cut: Option<usize>,
        points: Vec<usize>,
        backup_cut: Option<usize>,
        backup_points: Vec<usize>,
    ) -> impl Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error, Future: Send> + use<>
    {
        let primary = stream_of("p1", &answer());
        let transport = tower::service_fn(move |req: Request<Full<Bytes>>| {
            let primary = primary.clone();
            let points = points.clone();
            let backup_points = backup_points.clone();
            async move {
                let body = if req.uri().path().starts_with("/backup") {
                    let sent = req.body().to_bytes().unwrap_or_default();
                    let prefill = serde_json::from_slice::<Value>(&sent)
                        .ok()
                        .and_then(|v| {
                            let last = v["messages"].as_array()?.last()?.clone();
                            (last["role"] == "assistant")
                                .then(|| last["content"].as_str().map(str::to_owned))
                                .flatten()
                        })
                        .unwrap_or_default();
                    let whole = canonical();
                    let Some(rest) = whole.strip_prefix(prefill.as_str()) else {
                        let response = Response::builder()
                            .status(400)
                            .body(body(b"{}", None, &[]))
                            .unwrap_or_else(|e| panic!("{e}"));
                        return Ok::<_, Infallible>(response);
                    };
                    let words: Vec<String> = rest.split_inclusive(' ').map(str::to_owned).collect();
                    body(&stream_of("b1", &words), backup_cut, &backup_points)
                } else {
                    body(&primary, cut, &points)
                };
                let response = Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap_or_else(|e| panic!("{e}"));
                Ok::<_, Infallible>(response)
            }
        });
        let layer = ResilienceLayer::new(policy).unwrap_or_else(|e| panic!("{e}"));
        let mut svc = ServiceBuilder::new().layer(layer).service(transport);
        svc.get_mut().enable_continuation::<Full<Bytes>>();
        svc
    }

    fn fake_policy() -> Policy {
        let mut policy = Policy::interactive();
        policy.retry.seed = Some(3);
        policy.stream.continuation = ContinuationPolicy::enabled();
        policy.fallback.routes = vec![
            RouteConfig::new("backup")
                .base_url("http://127.0.0.1:9/backup")
                .model("backup-model")
                .prefill(PrefillForm::OpenAi),
        ];
        policy
    }

    /// Sends one streamed request: what reached the caller, the error it ended with, and
    /// whether a response came at all.
    fn run<S>(svc: S) -> (String, Option<Error>, bool)
    where
        S: Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Error>,
    {
        let mut svc = svc;
        runtime().block_on(async move {
            let req = testing::chat_request("http://127.0.0.1:9", "primary-model", true);
            match svc.ready().await {
                Ok(svc) => match svc.call(req).await {
                    Ok(response) => {
                        let (stream, error) = read(response.into_body()).await;
                        (stream, error, true)
                    }
                    Err(e) => (String::new(), Some(e), false),
                },
                Err(e) => (String::new(), Some(e), false),
            }
        })
    }

    #[test]
    fn a_cut_inside_an_event_reaches_the_caller_only_when_not_continued() {
        let primary = stream_of("p1", &answer());
        // Four whole events and half of the fifth.
        let fourth = {
            let s = String::from_utf8_lossy(&primary).into_owned();
            events_len(&s, 4) as usize
        };
        let cut = fourth + 20;
        let (stream, error, _) = run(fake_stack(&fake_policy(), Some(cut), vec![], None, vec![]));
        assert!(error.is_none(), "{error:?}");
        assert_eq!(openai_stream_text(&stream), canonical());
        // The four whole events as they came, then the continuation: no part of the fifth
        // (which `openai_stream_text` would have found malformed).
        assert_eq!(&stream.as_bytes()[..fourth], &primary[..fourth]);

        // Not a cause to continue: the stream ends as the guard ended it, partial event and all.
        let mut policy = fake_policy();
        policy.stream.continuation.causes = vec![ContinuationCause::IdleTimeout];
        let (stream, error, _) = run(fake_stack(&policy, Some(cut), vec![7, 300], None, vec![]));
        assert_eq!(stream.as_bytes(), &primary[..cut]);
        assert_eq!(
            error.map(|e| e.kind().clone()),
            Some(ErrorKind::StreamInterrupted {
                delivered_bytes: cut as u64,
                cause: StreamCause::Disconnected
            })
        );
    }

    proptest! {
        #![proptest_config(config())]

        /// For any cut point and chunking of the primary's stream, and any cut (or none) of the
        /// continuation's: the caller's text is a prefix of the canonical answer or the whole of
        /// it, and a clean end is the whole of it in one well-formed stream.
        #[test]
        fn the_callers_text_is_a_prefix_and_a_clean_end_is_whole(
            cut in proptest::option::weighted(0.9, 0usize..2000),
            points in proptest::collection::vec(0usize..2000, 0..12),
            backup_cut in proptest::option::weighted(0.3, 0usize..2000),
            backup_points in proptest::collection::vec(0usize..2000, 0..6),
        ) {
            let whole_answer = canonical();
            let svc = fake_stack(&fake_policy(), cut, points, backup_cut, backup_points);
            let (stream, error, answered) = run(svc);
            let text = text_of(&stream);
            prop_assert!(whole_answer.starts_with(&text), "{text:?} is not a prefix\n{stream}");
            if error.is_none() {
                prop_assert!(answered);
                prop_assert_eq!(openai_stream_text(&stream), whole_answer);
            } else if answered {
                let interrupted = matches!(
                    error.as_ref().map(Error::kind),
                    Some(ErrorKind::StreamInterrupted { delivered_bytes, .. })
                        if *delivered_bytes == stream.len() as u64
                );
                prop_assert!(interrupted, "{error:?}");
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_continuation_skips_a_route_that_does_not_stream() {
    let mock = start().await;
    mock.script(
        ScriptKey::model(PRIMARY_MODEL),
        [Reply::openai_stream(PRIMARY_MODEL, &ANSWER).cut_after(4)],
    );
    mock.script(
        ScriptKey::model("batch-only"),
        [Reply::openai_continuation("batch-only", &ANSWER)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut policy = policy(&mock, PrefillForm::OpenAi);
    let mut no_stream = tower_llm_resilience::policy::Capabilities::default();
    no_stream.streaming = false;
    policy.fallback.routes.insert(
        0,
        backup(&mock, "batch-only", "batch-only", Some(PrefillForm::OpenAi))
            .capabilities(no_stream),
    );
    let mut svc = stack(&policy);
    let response = call(&mut svc, openai_request(&mock)).await;
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(openai_stream_text(&stream), canonical());
    assert_eq!(
        routes(&log),
        [Some("primary".to_owned()), Some("backup".to_owned())],
        "{log}"
    );
    assert!(
        mock.requests()
            .iter()
            .all(|r| r.model.as_deref() != Some("batch-only"))
    );
}

#[tokio::test(start_paused = true)]
async fn a_continuation_follows_the_order_the_selection_strategy_chose() {
    let mock = start().await;
    // `lowest_cost` puts the cheapest route, written last, first: `second`, then `backup`.
    mock.script(
        ScriptKey::model("second-model"),
        [Reply::openai_stream("second-model", &ANSWER).cut_after(4)],
    );
    mock.script(
        ScriptKey::model(BACKUP_MODEL),
        [Reply::openai_continuation(BACKUP_MODEL, &ANSWER)],
    );
    let mut policy = policy(&mock, PrefillForm::OpenAi);
    policy.fallback.routes.push(backup(
        &mock,
        "second",
        "second-model",
        Some(PrefillForm::OpenAi),
    ));
    prices::lowest_cost(
        &mut policy,
        &[
            ("primary", 3.0, 15.0),
            ("backup", 1.0, 1.0),
            ("second", 0.15, 0.6),
        ],
    );
    let mut svc = stack(&policy);
    let response = call(&mut svc, openai_request(&mock)).await;
    let log = response_log(&response);
    let (stream, error) = read(response.into_body()).await;
    // `second` is the last route as written: only the strategy's order has a route after it.
    assert!(error.is_none(), "{error:?}");
    assert_eq!(openai_stream_text(&stream), canonical());
    assert_eq!(
        routes(&log),
        [Some("second".to_owned()), Some("backup".to_owned())],
        "{log}"
    );
    assert_eq!(
        continues(&log)
            .iter()
            .map(|(to, _)| to.as_str())
            .collect::<Vec<_>>(),
        ["backup"]
    );
    let paths: Vec<_> = mock.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/second/v1/chat/completions", "/backup/v1/chat/completions"]
    );
}

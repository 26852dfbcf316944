//! Every `MockProvider` behaviour, driven through the real hyper-util client over loopback.
#![cfg(feature = "testing")]

use std::error::Error as StdError;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};
use tower_llm_resilience::classify::{Classifier, DefaultClassifier, FailureClass};
use tower_llm_resilience::testing::{
    MockProvider, RecordedRequest, Reply, ScriptKey, chat_request, client,
};

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn start() -> (MockProvider, Client) {
    let mock = MockProvider::start().await.expect("mock starts");
    (mock, client())
}

async fn chat(client: &Client, mock: &MockProvider, model: &str) -> Response<Incoming> {
    client
        .request(chat_request(&mock.url(), model, false))
        .await
        .expect("response")
}

async fn text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("utf-8")
}

async fn json_body(resp: Response<Incoming>) -> Value {
    serde_json::from_str(&text(resp).await).expect("json body")
}

/// SSE events of a body: blocks separated by a blank line.
fn events(body: &str) -> Vec<String> {
    assert!(
        body.is_empty() || body.ends_with("\n\n"),
        "stream ends inside an event: {body:?}"
    );
    body.split_terminator("\n\n").map(str::to_owned).collect()
}

/// The JSON of an event's `data:` line (None for `[DONE]` or no data line).
fn data(event: &str) -> Option<Value> {
    let line = event.lines().find_map(|l| l.strip_prefix("data: "))?;
    serde_json::from_str(line).ok()
}

fn event_name(event: &str) -> Option<&str> {
    event.lines().find_map(|l| l.strip_prefix("event: "))
}

/// The raw events of a reply as a clean stream would deliver them.
async fn stream_events(client: &Client, mock: &MockProvider, reply: Reply) -> Vec<String> {
    mock.script(ScriptKey::Any, [reply]);
    let resp = client
        .request(chat_request(&mock.url(), "m", true))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    events(&text(resp).await)
}

/// Next data frame of a body (skipping trailers); None at a clean end.
async fn next_data(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

fn has_io_kind(err: &(dyn StdError + 'static), kind: std::io::ErrorKind) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == kind)
        {
            return true;
        }
        cur = e.source();
    }
    false
}

// ------------------------------------------------------------------------------- successes

#[tokio::test]
async fn openai_chat_success_with_usage_and_request_id() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [Reply::openai_chat("gpt-4o", "Hello there \"friend\"")],
    );
    let resp = chat(&client, &mock, "gpt-4o").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["x-request-id"], "req_mock_1");
    let body = json_body(resp).await;
    assert_eq!(
        body,
        json!({
            "id": "chatcmpl-mock-1",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "gpt-4o",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello there \"friend\"", "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
            "system_fingerprint": "fp_mock"
        })
    );
    // The id follows the request counter.
    let resp = chat(&client, &mock, "gpt-4o").await;
    assert_eq!(resp.headers()["x-request-id"], "req_mock_2");
    assert_eq!(json_body(resp).await["id"], "chatcmpl-mock-2");
    // An explicit header wins over the counter.
    mock.script(
        ScriptKey::Any,
        [Reply::openai_chat("gpt-4o", "x").header("x-request-id", "req_custom")],
    );
    let resp = chat(&client, &mock, "gpt-4o").await;
    let ids: Vec<_> = resp.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["req_custom"]);
}

#[tokio::test]
async fn anthropic_message_success_with_usage_and_request_id() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [Reply::anthropic_message("claude-sonnet-4", "Hi")],
    );
    let resp = chat(&client, &mock, "claude-sonnet-4").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["request-id"], "req_mock_1");
    assert!(resp.headers().get("x-request-id").is_none());
    let body = json_body(resp).await;
    assert_eq!(
        body,
        json!({
            "id": "msg_mock_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4",
            "content": [{"type": "text", "text": "Hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 9, "output_tokens": 1}
        })
    );
}

#[tokio::test]
async fn generic_replies_ok_json_text_and_headers() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [
            Reply::ok(),
            Reply::json(418, r#"{"teapot":true}"#)
                .header("x-one", "1")
                .header("x-one", "2"),
            Reply::text(413, "<html>413 Request Entity Too Large</html>"),
        ],
    );
    let resp = chat(&client, &mock, "whatever").await;
    assert_eq!(resp.status(), 200);
    let body = json_body(resp).await;
    assert_eq!(body["model"], "mock-model");
    assert_eq!(body["choices"][0]["message"]["content"], "ok");

    let resp = chat(&client, &mock, "whatever").await;
    assert_eq!(resp.status(), 418);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let ones: Vec<_> = resp.headers().get_all("x-one").iter().collect();
    assert_eq!(ones, ["1", "2"]);
    assert!(resp.headers().get("x-request-id").is_none());
    assert_eq!(text(resp).await, r#"{"teapot":true}"#);

    let resp = chat(&client, &mock, "whatever").await;
    assert_eq!(resp.status(), 413);
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(
        resp.headers()["content-length"],
        "41",
        "complete bodies have a length"
    );
    assert_eq!(
        text(resp).await,
        "<html>413 Request Entity Too Large</html>"
    );
}

#[tokio::test]
async fn invalid_reply_is_a_clear_500_not_a_panic() {
    let (mock, client) = start().await;
    for reply in [
        Reply::json(1000, "{}"),
        Reply::ok().header("bad header", "v"),
        Reply::ok().header("x-fine", "bad\r\nvalue"),
    ] {
        mock.script(ScriptKey::Any, [reply]);
        let resp = chat(&client, &mock, "m").await;
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["x-mock-error"], "invalid-reply");
        assert!(
            text(resp)
                .await
                .starts_with("MockProvider: invalid scripted reply: invalid")
        );
    }
}

// ------------------------------------------------------------------------------- streams

#[tokio::test]
async fn openai_stream_shape() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("gpt-4o", &["Hel", "lo"])],
    );
    let resp = client
        .request(chat_request(&mock.url(), "gpt-4o", true))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert_eq!(resp.headers()["x-request-id"], "req_mock_1");
    let evs = events(&text(resp).await);
    assert_eq!(evs.len(), 6, "{evs:?}");
    let chunk = |choices: Value| {
        json!({"id": "chatcmpl-mock-1", "object": "chat.completion.chunk", "created": 1700000000,
               "model": "gpt-4o", "choices": choices})
    };
    let delta = |delta: Value, finish: Value| {
        chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]))
    };
    assert_eq!(
        data(&evs[0]),
        Some(delta(
            json!({"role": "assistant", "content": ""}),
            Value::Null
        ))
    );
    assert_eq!(
        data(&evs[1]),
        Some(delta(json!({"content": "Hel"}), Value::Null))
    );
    assert_eq!(
        data(&evs[2]),
        Some(delta(json!({"content": "lo"}), Value::Null))
    );
    assert_eq!(data(&evs[3]), Some(delta(json!({}), json!("stop"))));
    let mut usage = chunk(json!([]));
    usage["usage"] = json!({"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11});
    assert_eq!(data(&evs[4]), Some(usage));
    assert_eq!(evs[5], "data: [DONE]");
    assert!(evs.iter().all(|e| e.starts_with("data: ")));
}

#[tokio::test]
async fn anthropic_stream_shape() {
    let (mock, client) = start().await;
    let evs = stream_events(
        &client,
        &mock,
        Reply::anthropic_stream("claude-sonnet-4", &["Hel", "lo"]),
    )
    .await;
    let names: Vec<_> = evs.iter().map(|e| event_name(e).unwrap_or("")).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    // Every event's data `type` matches its name.
    for (ev, name) in evs.iter().zip(&names) {
        assert_eq!(data(ev).expect("json data")["type"], *name);
    }
    let start = data(&evs[0]).expect("json");
    assert_eq!(start["message"]["id"], "msg_mock_1");
    assert_eq!(start["message"]["model"], "claude-sonnet-4");
    assert_eq!(start["message"]["stop_reason"], Value::Null);
    assert_eq!(start["message"]["usage"]["input_tokens"], 9);
    assert_eq!(
        data(&evs[3]).expect("json")["delta"],
        json!({"type": "text_delta", "text": "Hel"})
    );
    assert_eq!(data(&evs[4]).expect("json")["delta"]["text"], "lo");
    let delta = data(&evs[6]).expect("json");
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 2);
    assert!(!evs.iter().any(|e| e.contains("[DONE]")));
}

#[tokio::test]
async fn anthropic_stream_has_request_id_header() {
    let (mock, client) = start().await;
    mock.script(ScriptKey::Any, [Reply::anthropic_stream("c", &["x"])]);
    let resp = chat(&client, &mock, "c").await;
    assert_eq!(resp.headers()["request-id"], "req_mock_1");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
}

#[tokio::test]
async fn raw_sse_events_are_written_with_blank_lines() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [Reply::sse(vec![
            ": OPENROUTER PROCESSING".into(),
            "event: custom\ndata: {\"a\":1}".into(),
            "data: [DONE]".into(),
        ])],
    );
    let resp = chat(&client, &mock, "m").await;
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert!(resp.headers().get("x-request-id").is_none());
    assert_eq!(
        text(resp).await,
        ": OPENROUTER PROCESSING\n\nevent: custom\ndata: {\"a\":1}\n\ndata: [DONE]\n\n"
    );
}

#[tokio::test(start_paused = true)]
async fn event_delay_spaces_every_event_exactly() {
    let (mock, client) = start().await;
    let step = Duration::from_millis(250);
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("m", &["a", "b"]).event_delay(step)],
    );
    let t0 = Instant::now();
    let resp = chat(&client, &mock, "m").await;
    assert_eq!(t0.elapsed(), Duration::ZERO, "the head is not delayed");
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut all = BytesMut::new();
    while let Some(frame) = next_data(&mut body).await {
        let frame = frame.expect("clean stream");
        arrivals.push(t0.elapsed());
        all.extend_from_slice(&frame);
    }
    // One frame per event, each `step` after the previous one.
    let expected: Vec<_> = (1..=6u32).map(|k| step * k).collect();
    assert_eq!(arrivals, expected);
    assert_eq!(events(std::str::from_utf8(&all).expect("utf-8")).len(), 6);
}

#[tokio::test(start_paused = true)]
async fn stall_after_sends_n_events_then_nothing() {
    let (mock, client) = start().await;
    let full = stream_events(&client, &mock, Reply::openai_stream("m", &["a", "b"])).await;
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("m", &["a", "b"]).stall_after(2)],
    );
    let resp = chat(&client, &mock, "m").await;
    let mut body = resp.into_body();
    let mut got = BytesMut::new();
    let silence = Duration::from_secs(60);
    let stalled_at = loop {
        let started = Instant::now();
        match timeout(silence, next_data(&mut body)).await {
            Ok(Some(Ok(frame))) => got.extend_from_slice(&frame),
            Ok(other) => panic!("stream ended instead of stalling: {other:?}"),
            Err(_) => break started,
        }
    };
    assert_eq!(stalled_at.elapsed(), silence, "no frame within 60 s");
    let evs = events(std::str::from_utf8(&got).expect("utf-8"));
    // The ids differ by request number only.
    let full: Vec<_> = full
        .iter()
        .map(|e| e.replace("chatcmpl-mock-1", "chatcmpl-mock-2"))
        .collect();
    assert_eq!(evs, full[..2]);
}

#[tokio::test]
async fn cut_after_ends_with_a_body_error_not_a_clean_end() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [Reply::anthropic_stream("c", &["a", "b", "c"]).cut_after(3)],
    );
    let resp = chat(&client, &mock, "c").await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = BytesMut::new();
    let err = loop {
        match next_data(&mut body).await {
            Some(Ok(frame)) => got.extend_from_slice(&frame),
            Some(Err(e)) => break e,
            None => panic!("a cut stream must not end cleanly"),
        }
    };
    assert!(
        has_io_kind(&err, std::io::ErrorKind::UnexpectedEof),
        "the connection closed inside the chunked body: {err:?}"
    );
    let evs = events(std::str::from_utf8(&got).expect("utf-8"));
    let names: Vec<_> = evs.iter().map(|e| event_name(e).unwrap_or("")).collect();
    assert_eq!(names, ["message_start", "content_block_start", "ping"]);
}

#[tokio::test]
async fn cut_after_zero_events_and_after_delays() {
    let (mock, client) = start().await;
    for reply in [
        Reply::openai_stream("m", &["a"]).cut_after(0),
        Reply::openai_stream("m", &["a"])
            .event_delay(Duration::from_millis(5))
            .cut_after(2),
    ] {
        mock.script(ScriptKey::Any, [reply]);
        let resp = chat(&client, &mock, "m").await;
        let err = resp
            .into_body()
            .collect()
            .await
            .expect_err("cut is an error");
        assert!(
            has_io_kind(&err, std::io::ErrorKind::UnexpectedEof),
            "the connection closed inside the chunked body: {err:?}"
        );
    }
}

#[tokio::test]
async fn without_terminal_keeps_the_finish_reason() {
    let (mock, client) = start().await;
    let evs = stream_events(
        &client,
        &mock,
        Reply::openai_stream("m", &["a"]).without_terminal(),
    )
    .await;
    assert_eq!(evs.len(), 4);
    assert!(!evs.iter().any(|e| e == "data: [DONE]"));
    assert_eq!(
        data(&evs[2]).expect("json")["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(data(&evs[3]).expect("json")["usage"].is_object());

    let evs = stream_events(
        &client,
        &mock,
        Reply::anthropic_stream("c", &["a"]).without_terminal(),
    )
    .await;
    assert_eq!(
        event_name(evs.last().expect("events")),
        Some("message_delta")
    );
    assert_eq!(evs.len(), 6);
}

#[tokio::test]
async fn without_finish_is_truncated() {
    let (mock, client) = start().await;
    let evs = stream_events(
        &client,
        &mock,
        Reply::openai_stream("m", &["a"]).without_finish(),
    )
    .await;
    assert_eq!(evs.len(), 3, "{evs:?}");
    for ev in &evs {
        assert_ne!(ev, "data: [DONE]");
        let d = data(ev).expect("json");
        if let Some(choice) = d["choices"].get(0) {
            assert_eq!(choice["finish_reason"], Value::Null);
        }
    }

    let evs = stream_events(
        &client,
        &mock,
        Reply::anthropic_stream("c", &["a"]).without_finish(),
    )
    .await;
    let names: Vec<_> = evs.iter().map(|e| event_name(e).unwrap_or("")).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop"
        ]
    );
}

#[tokio::test]
async fn error_after_sends_the_in_band_error_and_ends() {
    let (mock, client) = start().await;
    let openai_err = r#"data: {"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}"#;
    let evs = stream_events(
        &client,
        &mock,
        Reply::openai_stream("m", &["a", "b"]).error_after(2, openai_err.into()),
    )
    .await;
    assert_eq!(evs.len(), 3);
    assert_eq!(
        data(&evs[1]).expect("json")["choices"][0]["delta"]["content"],
        "a"
    );
    assert_eq!(evs[2], openai_err);

    let anthropic_err = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}";
    let evs = stream_events(
        &client,
        &mock,
        Reply::anthropic_stream("c", &["a"]).error_after(4, anthropic_err.into()),
    )
    .await;
    let names: Vec<_> = evs.iter().map(|e| event_name(e).unwrap_or("")).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        data(&evs[4]).expect("json")["error"]["type"],
        "overloaded_error"
    );
}

#[tokio::test]
async fn malformed_after_inserts_a_broken_event() {
    let (mock, client) = start().await;
    let evs = stream_events(
        &client,
        &mock,
        Reply::openai_stream("m", &["a"]).malformed_after(1),
    )
    .await;
    assert_eq!(evs.len(), 6);
    assert_eq!(evs[1], r#"data: {"choices":[{"#);
    assert!(data(&evs[1]).is_none(), "not valid JSON");
    assert_eq!(
        data(&evs[2]).expect("json")["choices"][0]["delta"]["content"],
        "a"
    );
    assert_eq!(evs[5], "data: [DONE]");
}

// ------------------------------------------------------------------------------- transport

#[tokio::test(start_paused = true)]
async fn delayed_head_arrives_exactly_late() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [Reply::ok().delay_head(Duration::from_secs(2))],
    );
    let t0 = Instant::now();
    let resp = chat(&client, &mock, "m").await;
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(resp.status(), 200);
    assert_eq!(
        mock.requests()[0].at,
        t0,
        "recorded on arrival, not on answer"
    );
    assert_eq!(
        json_body(resp).await["choices"][0]["message"]["content"],
        "ok"
    );
}

#[tokio::test(start_paused = true)]
async fn never_answers() {
    let (mock, client) = start().await;
    mock.script(ScriptKey::Any, [Reply::never()]);
    let t0 = Instant::now();
    let outcome = timeout(Duration::from_secs(30), chat(&client, &mock, "m")).await;
    assert!(outcome.is_err(), "no answer within 30 s");
    assert_eq!(t0.elapsed(), Duration::from_secs(30));
    assert_eq!(mock.request_count(), 1, "the request was received");
}

#[tokio::test]
async fn reset_before_any_response_byte() {
    let (mock, client) = start().await;
    mock.script(ScriptKey::Any, [Reply::reset(), Reply::ok()]);
    let err = client
        .request(chat_request(&mock.url(), "m", false))
        .await
        .expect_err("reset is an error");
    assert!(!err.is_connect(), "the connection was established: {err:?}");
    assert!(
        has_io_kind(&err, std::io::ErrorKind::ConnectionReset),
        "a real TCP reset: {err:?}"
    );
    assert_eq!(mock.request_count(), 1, "the request was received first");
    // The server goes on serving.
    let resp = chat(&client, &mock, "m").await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn delayed_reset() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [Reply::reset().delay_head(Duration::from_secs(3))],
    );
    let t0 = Instant::now();
    let err = client
        .request(chat_request(&mock.url(), "m", false))
        .await
        .expect_err("reset");
    assert_eq!(t0.elapsed(), Duration::from_secs(3));
    assert!(
        has_io_kind(&err, std::io::ErrorKind::ConnectionReset),
        "{err:?}"
    );
}

// ------------------------------------------------------------------------------- failures

/// Stands for the request's `req_mock_{n}` in expected headers and bodies.
const REQ: &str = "{REQ}";

const JSON: &str = "application/json";
const HTML: &str = "text/html";

struct Preset {
    name: &'static str,
    reply: Reply,
    status: u16,
    content_type: &'static str,
    headers: &'static [(&'static str, &'static str)],
    absent: &'static [&'static str],
    /// The exact body, with [`REQ`] for the request id.
    body: &'static str,
    /// What `DefaultClassifier` must make of the real response.
    class: FailureClass,
    /// The wait hint the classifier must find, in milliseconds.
    wait_ms: Option<u128>,
}

fn presets() -> Vec<Preset> {
    use FailureClass::*;
    vec![
        // ------------------------------------------------------------------------ OpenAI
        Preset {
            name: "openai_rate_limited(Some)",
            reply: Reply::openai_rate_limited(Some("2")),
            status: 429,
            content_type: JSON,
            headers: &[
                ("retry-after", "2"),
                ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2s"),
                ("x-ratelimit-limit-tokens", "30000"),
                ("x-ratelimit-remaining-tokens", "29950"),
                ("x-request-id", REQ),
            ],
            absent: &["retry-after-ms", "x-ratelimit-reset-tokens"],
            body: concat!(
                r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-mock on requests per min (RPM): "#,
                r#"Limit 500, Used 500, Requested 1. Visit https://platform.openai.com/account/rate-limits to learn more.","#,
                r#""type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
            ),
            class: RateLimited,
            wait_ms: Some(2000),
        },
        Preset {
            name: "openai_rate_limited(None)",
            reply: Reply::openai_rate_limited(None),
            status: 429,
            content_type: JSON,
            headers: &[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-request-id", REQ),
            ],
            absent: &["retry-after", "x-ratelimit-reset-requests"],
            body: concat!(
                r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-mock on requests per min (RPM): "#,
                r#"Limit 500, Used 500, Requested 1. Visit https://platform.openai.com/account/rate-limits to learn more.","#,
                r#""type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
            ),
            class: RateLimited,
            wait_ms: None,
        },
        Preset {
            name: "openai_slow_down",
            reply: Reply::openai_slow_down(),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after", "retry-after-ms"],
            body: r#"{"error":{"message":"Please reduce your rate of requests.","type":"rate_limit_error","param":null,"code":"slow_down"}}"#,
            class: RateLimited,
            wait_ms: None,
        },
        Preset {
            name: "openai_request_too_large",
            reply: Reply::openai_request_too_large(),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"message":"Request too large for gpt-4o in organization org-mock on tokens per min (TPM): "#,
                r#"Limit 30000, Requested 42000. The input or output tokens must be reduced in order to run successfully. "#,
                r#"Visit https://platform.openai.com/account/rate-limits to learn more.","#,
                r#""type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#
            ),
            class: InvalidRequest,
            wait_ms: None,
        },
        Preset {
            name: "openai_insufficient_quota",
            reply: Reply::openai_insufficient_quota(),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details. "#,
                r#"For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.","#,
                r#""type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "openai_credit_balance_exhausted",
            reply: Reply::openai_credit_balance_exhausted(),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"message":"Your credit balance is exhausted. Add credits at "#,
                r#"https://platform.openai.com/settings/organization/billing to continue.","#,
                r#""type":"invalid_request_error","param":null,"code":"credit_balance_exhausted"}}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "openai_spend_limit(organization_spend_limit_exceeded)",
            reply: Reply::openai_spend_limit("organization_spend_limit_exceeded"),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"message":"Your organization has reached its spend limit. Raise the limit at "#,
                r#"https://platform.openai.com/settings/organization/limits to continue.","#,
                r#""type":"invalid_request_error","param":null,"code":"organization_spend_limit_exceeded"}}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "openai_spend_limit(project_spend_limit_exceeded)",
            reply: Reply::openai_spend_limit("project_spend_limit_exceeded"),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"message":"Your project has reached its spend limit. Raise the project's budget at "#,
                r#"https://platform.openai.com/settings/proj/limits to continue.","#,
                r#""type":"invalid_request_error","param":null,"code":"project_spend_limit_exceeded"}}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "openai_spend_limit(organization_usage_limit_exceeded)",
            reply: Reply::openai_spend_limit("organization_usage_limit_exceeded"),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"message":"Your organization has reached its usage limit. Raise the limit at "#,
                r#"https://platform.openai.com/settings/organization/limits to continue.","#,
                r#""type":"invalid_request_error","param":null,"code":"organization_usage_limit_exceeded"}}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "openai_overloaded",
            reply: Reply::openai_overloaded(),
            status: 503,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: r#"{"error":{"message":"The server is overloaded or not ready yet.","type":"server_error","param":null,"code":"server_is_overloaded"}}"#,
            class: Overloaded,
            wait_ms: None,
        },
        Preset {
            name: "openai_server_error",
            reply: Reply::openai_server_error(),
            status: 500,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"The server had an error while processing your request. Sorry about that!","#,
                r#""type":"server_error","param":null,"code":null}}"#
            ),
            class: ServerError,
            wait_ms: None,
        },
        Preset {
            name: "openai_context_length",
            reply: Reply::openai_context_length(),
            status: 400,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages "#,
                r#"resulted in 130532 tokens. Please reduce the length of the messages.","#,
                r#""type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#
            ),
            class: ContextOverflow,
            wait_ms: None,
        },
        Preset {
            name: "openai_content_policy",
            reply: Reply::openai_content_policy(),
            status: 400,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"Your request was rejected as a result of our safety system. Your prompt may "#,
                r#"contain text that is not allowed by our safety system.","#,
                r#""type":"invalid_request_error","param":null,"code":"content_policy_violation"}}"#
            ),
            class: PolicyBlock,
            wait_ms: None,
        },
        Preset {
            name: "openai_bad_request",
            reply: Reply::openai_bad_request(),
            status: 400,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"Invalid value for 'temperature': expected a number <= 2.","#,
                r#""type":"invalid_request_error","param":"temperature","code":"invalid_value"}}"#
            ),
            class: InvalidRequest,
            wait_ms: None,
        },
        Preset {
            name: "openai_model_not_found",
            reply: Reply::openai_model_not_found(),
            status: 404,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","#,
                r#""type":"invalid_request_error","param":null,"code":"model_not_found"}}"#
            ),
            class: InvalidRequest,
            wait_ms: None,
        },
        Preset {
            name: "unauthorized",
            reply: Reply::unauthorized(),
            status: 401,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"Incorrect API key provided: sk-mock***************0000. You can find your API "#,
                r#"key at https://platform.openai.com/account/api-keys.","#,
                r#""type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#
            ),
            class: Auth,
            wait_ms: None,
        },
        Preset {
            name: "openai_unsupported_region",
            reply: Reply::openai_unsupported_region(),
            status: 403,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"Country, region, or territory not supported","#,
                r#""type":"request_forbidden","param":null,"code":"unsupported_country_region_territory"}}"#
            ),
            class: Auth,
            wait_ms: None,
        },
        // ------------------------------------------------------------------ Azure OpenAI
        Preset {
            name: "azure_rate_limited",
            reply: Reply::azure_rate_limited("1500"),
            status: 429,
            content_type: JSON,
            headers: &[("retry-after-ms", "1500"), ("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation under Azure OpenAI "#,
                r#"API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. "#,
                r#"Please retry after 2 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to "#,
                r#"further increase the default rate limit."}}"#
            ),
            class: RateLimited,
            wait_ms: Some(1500),
        },
        Preset {
            name: "azure_content_filter",
            reply: Reply::azure_content_filter(),
            status: 400,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"The response was filtered due to the prompt triggering Azure OpenAI's content "#,
                r#"management policy. Please modify your prompt and retry. To learn more about our content filtering "#,
                r#"policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766","#,
                r#""type":null,"param":"prompt","code":"content_filter","status":400,"#,
                r#""innererror":{"code":"ResponsibleAIPolicyViolation","content_filter_result":{"#,
                r#""hate":{"filtered":false,"severity":"safe"},"self_harm":{"filtered":false,"severity":"safe"},"#,
                r#""sexual":{"filtered":false,"severity":"safe"},"violence":{"filtered":true,"severity":"medium"}}}}}"#
            ),
            class: PolicyBlock,
            wait_ms: None,
        },
        // --------------------------------------------------------------------- Anthropic
        Preset {
            name: "anthropic_rate_limited",
            reply: Reply::anthropic_rate_limited("7"),
            status: 429,
            content_type: JSON,
            headers: &[
                ("retry-after", "7"),
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("request-id", REQ),
            ],
            absent: &["x-request-id"],
            body: concat!(
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"This request would exceed the rate "#,
                r#"limit for your organization of 50 requests per minute. For details, refer to: "#,
                r#"https://docs.anthropic.com/en/api/rate-limits. You can see the response headers for current usage."},"#,
                r#""request_id":"{REQ}"}"#
            ),
            class: RateLimited,
            wait_ms: Some(7000),
        },
        Preset {
            name: "anthropic_overloaded",
            reply: Reply::anthropic_overloaded(),
            status: 529,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &["retry-after", "x-should-retry"],
            body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"{REQ}"}"#,
            class: Overloaded,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_api_overloaded",
            reply: Reply::anthropic_api_overloaded(),
            status: 500,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &["retry-after"],
            body: r#"{"type":"error","error":{"type":"api_error","message":"Overloaded"},"request_id":"{REQ}"}"#,
            class: Overloaded,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_server_error",
            reply: Reply::anthropic_server_error(),
            status: 500,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &[],
            body: r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"},"request_id":"{REQ}"}"#,
            class: ServerError,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_timeout",
            reply: Reply::anthropic_timeout(),
            status: 504,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &[],
            body: r#"{"type":"error","error":{"type":"timeout_error","message":"Request timed out"},"request_id":"{REQ}"}"#,
            class: ServerError,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_spend_limit",
            reply: Reply::anthropic_spend_limit(),
            status: 429,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified "#,
                r#"workspace API usage limits. You will regain access on 2025-09-01 at 00:00 UTC.","#,
                r#""details":{"error_code":"enforced_spend_limit_reached"}},"request_id":"{REQ}"}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_usage_limit",
            reply: Reply::anthropic_usage_limit(),
            status: 400,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"type":"error","error":{"type":"invalid_request_error","message":"You have reached your specified "#,
                r#"API usage limits. You will regain access on 2025-09-01 at 00:00 UTC."},"request_id":"{REQ}"}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_prompt_too_long",
            reply: Reply::anthropic_prompt_too_long(),
            status: 400,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"type":"error","error":{"type":"invalid_request_error","#,
                r#""message":"prompt is too long: 210000 tokens > 200000 maximum"},"request_id":"{REQ}"}"#
            ),
            class: ContextOverflow,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_request_too_large",
            reply: Reply::anthropic_request_too_large(),
            status: 413,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"type":"error","error":{"type":"request_too_large","#,
                r#""message":"Request exceeds the maximum allowed number of bytes."},"request_id":"{REQ}"}"#
            ),
            class: InvalidRequest,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_billing",
            reply: Reply::anthropic_billing(),
            status: 402,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"type":"error","error":{"type":"billing_error","message":"Your credit balance is too low to access "#,
                r#"the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."},"request_id":"{REQ}"}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "anthropic_unauthorized",
            reply: Reply::anthropic_unauthorized(),
            status: 401,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &["x-request-id"],
            body: r#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"},"request_id":"{REQ}"}"#,
            class: Auth,
            wait_ms: None,
        },
        Preset {
            name: "forbidden",
            reply: Reply::forbidden(),
            status: 403,
            content_type: JSON,
            headers: &[("request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"type":"error","error":{"type":"permission_error","message":"Your API key does not have permission "#,
                r#"to use the specified resource."},"request_id":"{REQ}"}"#
            ),
            class: Auth,
            wait_ms: None,
        },
        // ---------------------------------------------------------------- Gemini, Vertex
        Preset {
            name: "gemini_resource_exhausted",
            reply: Reply::gemini_resource_exhausted("15s"),
            status: 429,
            content_type: JSON,
            headers: &[],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing "#,
                r#"details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.","#,
                r#""status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","#,
                r#""violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","#,
                r#""quotaId":"GenerateRequestsPerMinutePerProjectPerModel-FreeTier","#,
                r#""quotaDimensions":{"location":"global","model":"gemini-2.0-flash"},"quotaValue":"15"}]},"#,
                r#"{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API "#,
                r#"quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]},"#,
                r#"{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"15s"}]}}"#
            ),
            class: RateLimited,
            wait_ms: Some(15_000),
        },
        Preset {
            name: "gemini_daily_quota",
            reply: Reply::gemini_daily_quota(),
            status: 429,
            content_type: JSON,
            headers: &[],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing "#,
                r#"details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.","#,
                r#""status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","#,
                r#""violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_free_tier_requests","#,
                r#""quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier","#,
                r#""quotaDimensions":{"location":"global","model":"gemini-2.0-flash"},"quotaValue":"15"}]},"#,
                r#"{"@type":"type.googleapis.com/google.rpc.Help","links":[{"description":"Learn more about Gemini API "#,
                r#"quotas","url":"https://ai.google.dev/gemini-api/docs/rate-limits"}]}]}}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "gemini_payment_required",
            reply: Reply::gemini_payment_required(),
            status: 402,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"error":{"code":402,"message":"Your prepayment credits are depleted. Please go to AI Studio at "#,
                r#"https://ai.studio/projects to manage your project and billing.","status":"FAILED_PRECONDITION"}}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "gemini_unavailable",
            reply: Reply::gemini_unavailable(),
            status: 503,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: r#"{"error":{"code":503,"message":"The model is overloaded. Please try again later.","status":"UNAVAILABLE"}}"#,
            class: Overloaded,
            wait_ms: None,
        },
        Preset {
            name: "gemini_internal",
            reply: Reply::gemini_internal(),
            status: 500,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"error":{"code":500,"message":"An internal error has occurred. Please retry or report in "#,
                r#"https://developers.generativeai.google/guide/troubleshooting","status":"INTERNAL"}}"#
            ),
            class: ServerError,
            wait_ms: None,
        },
        Preset {
            name: "gemini_deadline_exceeded",
            reply: Reply::gemini_deadline_exceeded(),
            status: 504,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: r#"{"error":{"code":504,"message":"Deadline expired before operation could complete.","status":"DEADLINE_EXCEEDED"}}"#,
            class: ServerError,
            wait_ms: None,
        },
        Preset {
            name: "gemini_context_overflow",
            reply: Reply::gemini_context_overflow(),
            status: 400,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"error":{"code":400,"message":"The input token count (1231284) exceeds the maximum number of "#,
                r#"tokens allowed (1048576).","status":"INVALID_ARGUMENT"}}"#
            ),
            class: ContextOverflow,
            wait_ms: None,
        },
        Preset {
            name: "gemini_api_key_invalid",
            reply: Reply::gemini_api_key_invalid(),
            status: 400,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","#,
                r#""status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","#,
                r#""reason":"API_KEY_INVALID","domain":"googleapis.com","#,
                r#""metadata":{"service":"generativelanguage.googleapis.com"}}]}}"#
            ),
            class: Auth,
            wait_ms: None,
        },
        Preset {
            name: "gemini_permission_denied",
            reply: Reply::gemini_permission_denied(),
            status: 403,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"error":{"code":403,"message":"Method doesn't allow unregistered callers (callers without "#,
                r#"established identity). Please use API Key or other form of API consumer identity to call this API.","#,
                r#""status":"PERMISSION_DENIED"}}"#
            ),
            class: Auth,
            wait_ms: None,
        },
        Preset {
            name: "vertex_resource_exhausted",
            reply: Reply::vertex_resource_exhausted(),
            status: 429,
            content_type: JSON,
            headers: &[],
            absent: &["retry-after"],
            body: concat!(
                r#"[{"error":{"code":429,"message":"Quota exceeded for aiplatform.googleapis.com/"#,
                r#"online_prediction_requests_per_base_model with base model: anthropic-claude-3-5-sonnet. "#,
                r#"Please submit a quota increase request.","status":"RESOURCE_EXHAUSTED"}}]"#
            ),
            class: RateLimited,
            wait_ms: None,
        },
        // ------------------------------------------------------------------------ others
        Preset {
            name: "bedrock_throttling",
            reply: Reply::bedrock_throttling(),
            status: 429,
            content_type: JSON,
            headers: &[
                (
                    "x-amzn-errortype",
                    "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
                ),
                ("x-amzn-requestid", REQ),
            ],
            absent: &["retry-after"],
            body: r#"{"message":"Too many requests, please wait before trying again."}"#,
            class: RateLimited,
            wait_ms: None,
        },
        Preset {
            name: "bedrock_unavailable",
            reply: Reply::bedrock_unavailable(),
            status: 503,
            content_type: JSON,
            headers: &[
                (
                    "x-amzn-errortype",
                    "ServiceUnavailableException:http://internal.amazon.com/coral/com.amazon.bedrock/",
                ),
                ("x-amzn-requestid", REQ),
            ],
            absent: &["retry-after"],
            body: r#"{"message":"Bedrock is unable to process your request."}"#,
            class: Overloaded,
            wait_ms: None,
        },
        Preset {
            name: "groq_capacity_exceeded",
            reply: Reply::groq_capacity_exceeded(),
            status: 498,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"The flex tier is at capacity for this model. Please try again later.","#,
                r#""type":"capacity_exceeded","param":null,"code":"capacity_exceeded"}}"#
            ),
            class: Overloaded,
            wait_ms: None,
        },
        Preset {
            name: "mistral_rate_limited",
            reply: Reply::mistral_rate_limited(),
            status: 429,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &[],
            body: r#"{"error":{"message":"Requests rate limit exceeded","type":"rate_limited","param":null,"code":null}}"#,
            class: RateLimited,
            wait_ms: None,
        },
        Preset {
            name: "openrouter_no_credits",
            reply: Reply::openrouter_no_credits(),
            status: 402,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"error":{"message":"Insufficient credits. Add more using https://openrouter.ai/settings/credits","#,
                r#""code":402,"metadata":{}},"user_id":"user_mock"}"#
            ),
            class: QuotaExhausted,
            wait_ms: None,
        },
        Preset {
            name: "openrouter_moderation",
            reply: Reply::openrouter_moderation(),
            status: 403,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was "#,
                r#"flagged for \"harassment\". No credits were charged.","metadata":{"reasons":["harassment"],"#,
                r#""flagged_input":"...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#
            ),
            class: PolicyBlock,
            wait_ms: None,
        },
        Preset {
            name: "unprocessable",
            reply: Reply::unprocessable(),
            status: 422,
            content_type: JSON,
            headers: &[],
            absent: &[],
            body: concat!(
                r#"{"object":"error","message":{"detail":[{"type":"missing","loc":["body","messages"],"#,
                r#""msg":"Field required","input":{"model":"mistral-large-latest"}}]},"#,
                r#""type":"invalid_request_error","param":null,"code":null}"#
            ),
            class: InvalidRequest,
            wait_ms: None,
        },
        Preset {
            name: "conflict",
            reply: Reply::conflict(),
            status: 409,
            content_type: JSON,
            headers: &[("x-request-id", REQ)],
            absent: &["retry-after"],
            body: concat!(
                r#"{"error":{"message":"Another request with the same idempotency key is in progress.","#,
                r#""type":"invalid_request_error","param":null,"code":"conflict"}}"#
            ),
            class: Conflict,
            wait_ms: None,
        },
        // -------------------------------------------------------------- gateways and CDNs
        Preset {
            name: "bad_gateway",
            reply: Reply::bad_gateway(),
            status: 502,
            content_type: HTML,
            headers: &[],
            absent: &["x-request-id"],
            body: "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
                   <center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n\
                   </body>\r\n</html>\r\n",
            class: ServerError,
            wait_ms: None,
        },
        Preset {
            name: "gateway_timeout",
            reply: Reply::gateway_timeout(),
            status: 504,
            content_type: HTML,
            headers: &[],
            absent: &["x-request-id"],
            body: "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n\
                   <center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n\
                   </body>\r\n</html>\r\n",
            class: ServerError,
            wait_ms: None,
        },
        Preset {
            name: "cdn_request_too_large",
            reply: Reply::cdn_request_too_large(),
            status: 413,
            content_type: HTML,
            headers: &[],
            absent: &["x-request-id"],
            body: "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n\
                   <center><h1>413 Request Entity Too Large</h1></center>\r\n\
                   <hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n",
            class: InvalidRequest,
            wait_ms: None,
        },
    ]
}

/// The class-deciding parts of each JSON preset's body, by JSON pointer.
fn expected_fields(name: &str) -> Vec<(&'static str, Value)> {
    let s = |v: &str| Value::String(v.to_owned());
    match name {
        "openai_rate_limited(Some)" | "openai_rate_limited(None)" => vec![
            ("/error/code", s("rate_limit_exceeded")),
            ("/error/type", s("requests")),
            ("/error/param", Value::Null),
        ],
        "openai_slow_down" => vec![
            ("/error/code", s("slow_down")),
            ("/error/type", s("rate_limit_error")),
        ],
        "openai_request_too_large" => vec![("/error/code", s("rate_limit_exceeded"))],
        "openai_insufficient_quota" => vec![
            ("/error/code", s("insufficient_quota")),
            ("/error/type", s("insufficient_quota")),
        ],
        "openai_credit_balance_exhausted" => {
            vec![("/error/code", s("credit_balance_exhausted"))]
        }
        "openai_spend_limit(organization_spend_limit_exceeded)" => {
            vec![("/error/code", s("organization_spend_limit_exceeded"))]
        }
        "openai_spend_limit(project_spend_limit_exceeded)" => {
            vec![("/error/code", s("project_spend_limit_exceeded"))]
        }
        "openai_spend_limit(organization_usage_limit_exceeded)" => {
            vec![("/error/code", s("organization_usage_limit_exceeded"))]
        }
        "openai_overloaded" => vec![("/error/code", s("server_is_overloaded"))],
        "openai_server_error" => vec![
            ("/error/type", s("server_error")),
            ("/error/code", Value::Null),
        ],
        "openai_context_length" => vec![("/error/code", s("context_length_exceeded"))],
        "openai_content_policy" => vec![("/error/code", s("content_policy_violation"))],
        "openai_bad_request" => vec![
            ("/error/type", s("invalid_request_error")),
            ("/error/code", s("invalid_value")),
        ],
        "openai_model_not_found" => vec![("/error/code", s("model_not_found"))],
        "unauthorized" => vec![("/error/code", s("invalid_api_key"))],
        "openai_unsupported_region" => {
            vec![("/error/code", s("unsupported_country_region_territory"))]
        }
        "azure_rate_limited" => vec![("/error/code", s("429"))],
        "azure_content_filter" => vec![
            ("/error/code", s("content_filter")),
            ("/error/type", Value::Null),
            ("/error/innererror/code", s("ResponsibleAIPolicyViolation")),
        ],
        "anthropic_rate_limited" => vec![
            ("/type", s("error")),
            ("/error/type", s("rate_limit_error")),
        ],
        "anthropic_overloaded" => vec![
            ("/type", s("error")),
            ("/error/type", s("overloaded_error")),
            ("/error/message", s("Overloaded")),
        ],
        "anthropic_api_overloaded" => vec![
            ("/error/type", s("api_error")),
            ("/error/message", s("Overloaded")),
        ],
        "anthropic_server_error" => vec![("/error/type", s("api_error"))],
        "anthropic_timeout" => vec![("/error/type", s("timeout_error"))],
        "anthropic_spend_limit" => vec![
            ("/error/type", s("rate_limit_error")),
            (
                "/error/details/error_code",
                s("enforced_spend_limit_reached"),
            ),
        ],
        "anthropic_usage_limit" => vec![("/error/type", s("invalid_request_error"))],
        "anthropic_prompt_too_long" => vec![
            ("/error/type", s("invalid_request_error")),
            (
                "/error/message",
                s("prompt is too long: 210000 tokens > 200000 maximum"),
            ),
        ],
        "anthropic_request_too_large" => vec![("/error/type", s("request_too_large"))],
        "anthropic_billing" => vec![("/error/type", s("billing_error"))],
        "anthropic_unauthorized" => vec![("/error/type", s("authentication_error"))],
        "forbidden" => vec![("/error/type", s("permission_error"))],
        "gemini_resource_exhausted" => vec![
            ("/error/code", json!(429)),
            ("/error/status", s("RESOURCE_EXHAUSTED")),
            (
                "/error/details/0/@type",
                s("type.googleapis.com/google.rpc.QuotaFailure"),
            ),
            (
                "/error/details/0/violations/0/quotaId",
                s("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
            ),
            (
                "/error/details/2/@type",
                s("type.googleapis.com/google.rpc.RetryInfo"),
            ),
            ("/error/details/2/retryDelay", s("15s")),
        ],
        "gemini_daily_quota" => vec![
            ("/error/status", s("RESOURCE_EXHAUSTED")),
            (
                "/error/details/0/violations/0/quotaId",
                s("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
            ),
        ],
        "gemini_payment_required" => vec![("/error/code", json!(402))],
        "gemini_unavailable" => vec![
            ("/error/code", json!(503)),
            ("/error/status", s("UNAVAILABLE")),
        ],
        "gemini_internal" => vec![("/error/status", s("INTERNAL"))],
        "gemini_deadline_exceeded" => vec![("/error/status", s("DEADLINE_EXCEEDED"))],
        "gemini_context_overflow" => vec![
            ("/error/code", json!(400)),
            ("/error/status", s("INVALID_ARGUMENT")),
        ],
        "gemini_api_key_invalid" => vec![
            ("/error/status", s("INVALID_ARGUMENT")),
            (
                "/error/details/0/@type",
                s("type.googleapis.com/google.rpc.ErrorInfo"),
            ),
            ("/error/details/0/reason", s("API_KEY_INVALID")),
        ],
        "gemini_permission_denied" => vec![
            ("/error/code", json!(403)),
            ("/error/status", s("PERMISSION_DENIED")),
        ],
        "vertex_resource_exhausted" => vec![
            ("/0/error/code", json!(429)),
            ("/0/error/status", s("RESOURCE_EXHAUSTED")),
        ],
        "bedrock_throttling" => vec![(
            "/message",
            s("Too many requests, please wait before trying again."),
        )],
        "bedrock_unavailable" => {
            vec![("/message", s("Bedrock is unable to process your request."))]
        }
        "groq_capacity_exceeded" => vec![("/error/code", s("capacity_exceeded"))],
        "mistral_rate_limited" => vec![("/error/type", s("rate_limited"))],
        "openrouter_no_credits" => vec![("/error/code", json!(402))],
        "openrouter_moderation" => vec![
            ("/error/code", json!(403)),
            ("/error/metadata/reasons/0", s("harassment")),
        ],
        "unprocessable" => vec![
            ("/object", s("error")),
            ("/type", s("invalid_request_error")),
        ],
        "conflict" => vec![("/error/code", s("conflict"))],
        other => panic!("no expectations for {other}"),
    }
}

/// The head and exact body bytes of a preset's real response, fetched over loopback.
async fn fetch(
    client: &Client,
    mock: &MockProvider,
    reply: Reply,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    mock.script(ScriptKey::Any, [reply]);
    let resp = chat(client, mock, "m").await;
    let (head, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (head.status, head.headers, body)
}

#[tokio::test]
async fn every_provider_failure_preset() {
    let (mock, client) = start().await;
    let presets = presets();
    assert_eq!(presets.len(), 52);
    for (i, preset) in presets.into_iter().enumerate() {
        let request_id = format!("req_mock_{}", i + 1);
        let name = preset.name;
        let (status, headers, body) = fetch(&client, &mock, preset.reply).await;
        assert_eq!(status, preset.status, "{name}");
        assert_eq!(headers["content-type"], preset.content_type, "{name}");
        assert_eq!(
            headers["content-length"],
            body.len().to_string().as_str(),
            "{name}: a complete body"
        );
        for (header, value) in preset.headers {
            let value = if *value == REQ {
                request_id.as_str()
            } else {
                value
            };
            assert_eq!(
                headers.get(*header).map(|v| v.to_str().expect("ascii")),
                Some(value),
                "{name}: {header}"
            );
        }
        for header in preset.absent {
            assert!(
                headers.get(*header).is_none(),
                "{name}: {header} must be absent"
            );
        }
        assert!(
            headers.get("x-should-retry").is_none(),
            "{name}: no retry override"
        );
        // The exact bytes, not just an equal JSON value.
        let expected = preset.body.replace(REQ, &request_id);
        assert_eq!(
            std::str::from_utf8(&body).expect("utf-8"),
            expected,
            "{name}: exact body"
        );
        if preset.content_type == JSON {
            let json: Value = serde_json::from_slice(&body).expect("json body");
            for (pointer, value) in expected_fields(name) {
                assert_eq!(json.pointer(pointer), Some(&value), "{name}: {pointer}");
            }
            if name.starts_with("anthropic") || name == "forbidden" {
                assert_eq!(json["request_id"], request_id.as_str(), "{name}");
            }
        } else {
            assert!(
                serde_json::from_slice::<Value>(&body).is_err(),
                "{name}: not JSON"
            );
        }
    }
}

#[tokio::test]
async fn every_preset_classifies_as_intended() {
    let (mock, client) = start().await;
    let classifier = DefaultClassifier::default();
    let mut failures = Vec::new();
    for (i, preset) in presets().into_iter().enumerate() {
        let request_id = format!("req_mock_{}", i + 1);
        let carries_id = preset.headers.iter().any(|(_, v)| *v == REQ) || preset.body.contains(REQ);
        let (status, headers, body) = fetch(&client, &mock, preset.reply).await;
        let c = classifier.classify_response(status, &headers, &body);
        let got = (
            c.class,
            c.status.map(|s| s.as_u16()),
            c.wait_hint.map(|h| h.wait.as_millis()),
            c.request_id,
        );
        let want = (
            Some(preset.class),
            Some(preset.status),
            preset.wait_ms,
            carries_id.then_some(request_id),
        );
        if got != want {
            failures.push(format!("{}:\n   got {got:?}\n  want {want:?}", preset.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn presets_cover_every_response_class() {
    for class in FailureClass::ALL {
        if matches!(
            class,
            FailureClass::Connect
                | FailureClass::Timeout
                | FailureClass::Transport
                | FailureClass::StreamInterrupted
        ) {
            continue; // transport behaviours, not error responses
        }
        assert!(
            presets().iter().any(|p| p.class == class),
            "no preset for {class}"
        );
    }
}

#[tokio::test]
async fn exact_bodies_of_key_presets() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::Any,
        [
            Reply::openai_rate_limited(Some("1")),
            Reply::anthropic_overloaded(),
            Reply::openai_request_too_large(),
            Reply::azure_rate_limited("2000"),
        ],
    );
    let body = text(chat(&client, &mock, "m").await).await;
    assert_eq!(
        body,
        concat!(
            r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-mock on requests per min (RPM): "#,
            r#"Limit 500, Used 500, Requested 1. Visit https://platform.openai.com/account/rate-limits to learn more.","#,
            r#""type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
        )
    );
    let body = text(chat(&client, &mock, "m").await).await;
    assert_eq!(
        body,
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_mock_2"}"#
    );
    let body = json_body(chat(&client, &mock, "m").await).await;
    let message = body["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("Request too large for gpt-4o"),
        "{message}"
    );
    let body = json_body(chat(&client, &mock, "m").await).await;
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("retry after 2 seconds"), "{message}");
}

// ------------------------------------------------------------------------------- scripting

#[tokio::test]
async fn script_matching_order_model_then_path_then_any() {
    let (mock, client) = start().await;
    let backup = format!("{}/backup", mock.url());
    let send = |base: String, model: &'static str| {
        let client = client.clone();
        async move {
            text(
                client
                    .request(chat_request(&base, model, false))
                    .await
                    .expect("response"),
            )
            .await
        }
    };
    mock.script(ScriptKey::model("gpt-4o"), [Reply::json(200, "model")]);
    mock.script(
        ScriptKey::path("/backup/v1/chat/completions"),
        [Reply::json(200, "path")],
    );
    mock.script(ScriptKey::Any, [Reply::json(200, "any")]);

    assert_eq!(send(backup.clone(), "gpt-4o").await, "model");
    assert_eq!(send(backup.clone(), "other").await, "path");
    assert_eq!(send(mock.url(), "other").await, "any");
    // The query is not part of the path match, but is recorded.
    assert_eq!(send(format!("{backup}?x"), "other").await, "any");
    let req = Request::post(format!(
        "{}/backup/v1/chat/completions?api-version=1",
        mock.url()
    ))
    .body(Full::new(Bytes::from_static(b"{\"model\":\"o\"}")))
    .expect("request");
    assert_eq!(
        text(client.request(req).await.expect("response")).await,
        "path"
    );
    assert_eq!(
        mock.requests()[4].path,
        "/backup/v1/chat/completions?api-version=1"
    );

    // An empty script removes the key: unmatched requests get the default reply.
    mock.script(ScriptKey::Any, []);
    let body: Value = serde_json::from_str(&send(mock.url(), "other").await).expect("json");
    assert_eq!(body["model"], "other");
    assert_eq!(body["choices"][0]["message"]["content"], "ok");
    assert_eq!(body["usage"]["total_tokens"], 10);
}

#[tokio::test]
async fn default_reply_without_model() {
    let (mock, client) = start().await;
    let req = Request::get(format!("{}/health", mock.url()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(json_body(resp).await["model"], "mock-model");
}

#[tokio::test]
async fn replies_in_order_then_last_repeats_and_rescript_restarts() {
    let (mock, client) = start().await;
    mock.script(
        ScriptKey::model("m"),
        [Reply::openai_overloaded(), Reply::json(200, "second")],
    );
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(chat(&client, &mock, "m").await.status().as_u16());
    }
    assert_eq!(statuses, [503, 200, 200, 200]);

    mock.script(
        ScriptKey::model("m"),
        [Reply::json(201, "a"), Reply::json(202, "b")],
    );
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(chat(&client, &mock, "m").await.status().as_u16());
    }
    assert_eq!(statuses, [201, 202, 202]);
}

#[tokio::test(start_paused = true)]
async fn records_every_request() {
    let (mock, client) = start().await;
    let t0 = Instant::now();
    let mut req = chat_request(&mock.url(), "gpt-4o", true);
    req.headers_mut()
        .insert("authorization", "Bearer sk-test".parse().expect("value"));
    req.headers_mut()
        .insert("x-stainless-retry-count", "0".parse().expect("value"));
    let _ = text(client.request(req).await.expect("response")).await;

    tokio::time::sleep(Duration::from_secs(5)).await;
    let req = Request::builder()
        .method(Method::PUT)
        .uri(format!("{}/v1/other?q=1", mock.url()))
        .body(Full::new(Bytes::from_static(b"not json")))
        .expect("request");
    let _ = text(client.request(req).await.expect("response")).await;

    assert_eq!(mock.request_count(), 2);
    let reqs: Vec<RecordedRequest> = mock.requests();
    assert_eq!(reqs[0].method, Method::POST);
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(reqs[0].headers["authorization"], "Bearer sk-test");
    assert_eq!(reqs[0].headers["x-stainless-retry-count"], "0");
    assert_eq!(reqs[0].headers["content-type"], "application/json");
    assert_eq!(
        reqs[0].body,
        Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}],"max_tokens":64,"stream":true}"#
        )
    );
    assert_eq!(reqs[0].model.as_deref(), Some("gpt-4o"));
    assert_eq!(reqs[0].at, t0);

    assert_eq!(reqs[1].method, Method::PUT);
    assert_eq!(reqs[1].path, "/v1/other?q=1");
    assert_eq!(reqs[1].body, Bytes::from_static(b"not json"));
    assert_eq!(reqs[1].model, None);
    assert_eq!(reqs[1].at - reqs[0].at, Duration::from_secs(5));
}

#[tokio::test]
async fn chat_request_helper() {
    let req = chat_request("http://127.0.0.1:9/", "gpt-4o", false);
    assert_eq!(req.method(), Method::POST);
    assert_eq!(req.uri(), "http://127.0.0.1:9/v1/chat/completions");
    assert_eq!(req.headers()["content-type"], "application/json");
    assert_eq!(req.headers().len(), 1);
    let body = req.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        body,
        Bytes::from_static(
            br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}],"max_tokens":64,"stream":false}"#
        )
    );
    let body = chat_request("http://x", "a\"b", true)
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let json: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["model"], "a\"b");
    assert_eq!(json["stream"], true);

    // A bad base URL does not panic; sending the request fails clearly.
    let req = chat_request("not a url", "m", false);
    assert_eq!(req.uri(), "/");
    assert!(client().request(req).await.is_err());
}

// ------------------------------------------------------------------------------- shutdown

#[tokio::test(start_paused = true)]
async fn drop_closes_listener_and_connections() {
    let (mock, pooled) = start().await;
    let url = mock.url();
    assert_eq!(chat(&pooled, &mock, "m").await.status(), 200);

    // A stream in flight when the mock goes away ends with an error, not silently.
    mock.script(
        ScriptKey::Any,
        [Reply::openai_stream("m", &["a"]).stall_after(1)],
    );
    let stalled = chat(&pooled, &mock, "m").await;
    let mut body = stalled.into_body();
    assert!(matches!(next_data(&mut body).await, Some(Ok(_))));
    let t0 = Instant::now();
    drop(mock);
    let end = timeout(Duration::from_secs(1), next_data(&mut body))
        .await
        .expect("the connection closes at once");
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    assert_eq!(t0.elapsed(), Duration::ZERO);

    // A new connection is refused.
    let err = client()
        .request(chat_request(&url, "m", false))
        .await
        .expect_err("no server");
    assert!(err.is_connect(), "{err:?}");
    assert!(
        has_io_kind(&err, std::io::ErrorKind::ConnectionRefused),
        "{err:?}"
    );
    // So does the old client, whatever it had pooled.
    assert!(
        pooled
            .request(chat_request(&url, "m", false))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn debug_and_addr() {
    let (mock, _client) = start().await;
    assert!(mock.addr().ip().is_loopback());
    assert_eq!(
        mock.url(),
        format!("http://127.0.0.1:{}", mock.addr().port())
    );
    let debug = format!("{mock:?}");
    assert!(debug.contains("MockProvider") && debug.contains("request_count: 0"));
}

#[test]
fn dropping_after_the_runtime_is_gone_does_not_panic() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let mock = runtime.block_on(async {
        let (mock, client) = start().await;
        mock.script(ScriptKey::Any, [Reply::never()]);
        // Leave a connection open with a request in flight.
        let pending = client.request(chat_request(&mock.url(), "m", false));
        let _ = timeout(Duration::from_secs(5), pending).await;
        assert_eq!(mock.request_count(), 1);
        mock
    });
    drop(runtime);
    assert_eq!(mock.request_count(), 1);
    drop(mock);
}
